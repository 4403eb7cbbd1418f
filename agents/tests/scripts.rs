//! The script runner against a real nats-server, with real child processes.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rct_agents::script::Scripts;
use rct_bus::EventKind;
use rct_bus::catalog::Catalog;
use rct_bus::proto::{self, event::Kind};
use support::{Harness, outcome};

fn catalog() -> Catalog {
    serde_yaml_ng::from_str(
        r#"
towers:
  scripts:
    flavour: simple
operations:
  scripts/argv:
    allowed_groups: [sre_team]
    params:
      text: { type: string, max_len: 200 }
      flag: { type: string, max_len: 200 }
      token: { type: string, secret: true, default: "s3cr3t-t0ken" }
  scripts/fail:
    allowed_groups: [sre_team]
  scripts/linger:
    allowed_groups: [sre_team]
  scripts/changed:
    allowed_groups: [sre_team]
"#,
    )
    .unwrap()
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scripts")
        .join(name)
}

/// A scripts file for the test tower; `record` is where linger.py writes its pids.
fn scripts_file(dir: &Path, record: &Path, linger_timeout: &str) -> PathBuf {
    let path = dir.join("scripts.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
tower: scripts
operations:
  argv:
    command: {argv:?}
    args: ["--text={{text}}", "--token={{token}}", "--", "{{flag}}", "{{text}}"]
    env: {{ EXTRA: "x" }}
  fail:
    command: {fail:?}
  linger:
    command: {linger:?}
    args: ["--", {record:?}]
    timeout: {linger_timeout}
  changed:
    command: {argv:?}
    sha256: "0000000000000000000000000000000000000000000000000000000000000000"
"#,
            argv = script("argv.py"),
            fail = script("fail.py"),
            linger = script("linger.py"),
            record = record,
        ),
    )
    .unwrap();
    path
}

fn string(s: &str) -> proto::Value {
    proto::Value {
        kind: Some(proto::value::Kind::String(s.into())),
    }
}

fn logs(records: &[rct_streams::Record]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| match &r.event.kind {
            Some(Kind::Log(l)) => Some(l.line.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn shell_metacharacters_arrive_as_single_argv_items() {
    let h = Harness::start_with_catalog(catalog()).await;
    let dir = tempfile::tempdir().unwrap();
    let scripts = Scripts::load(&scripts_file(dir.path(), &dir.path().join("r"), "1m")).unwrap();
    let agent = h.run(scripts.tower().config(h.config("s")));

    let nasty = "; rm -rf / $(id) `id` \"quoted\" 'single' \\back\nnewline *glob* >out";
    let command = h.command(
        "scripts/argv",
        "_",
        &[("text", string(nasty)), ("flag", string("-rf"))],
    );
    h.publish(&command).await;
    let records = h.finished(&command.command_id).await;
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(succeeded.summary, "done with 5 arguments");

    let args: Vec<String> = logs(&records)
        .iter()
        .filter_map(|l| l.strip_prefix("arg "))
        .map(|json| serde_json::from_str(json).unwrap())
        .collect();
    assert_eq!(
        args,
        [
            format!("--text={nasty}"),
            "--token=***".to_owned(),
            "--".to_owned(),
            "-rf".to_owned(),
            nasty.to_owned(),
        ],
        "each value is one argv item, and the secret is masked in the log"
    );
    let env_line = logs(&records)
        .into_iter()
        .find(|l| l.starts_with("env "))
        .unwrap();
    let env: Vec<String> = serde_json::from_str(&env_line[4..]).unwrap();
    // Cleared: nothing of the agent's own environment but the allow-list (an interpreter
    // wrapper may add its own variables).
    assert!(
        std::env::var("CARGO_MANIFEST_DIR").is_ok(),
        "cargo sets it for tests"
    );
    for leaked in ["HOME", "CARGO_MANIFEST_DIR", "NATS_SERVER_BIN", "USER"] {
        assert!(
            !env.contains(&leaked.to_owned()),
            "{leaked} leaked: {env:?}"
        );
    }
    for given in ["PATH", "EXTRA", "RCT_COMMAND_ID", "RCT_DRY_RUN"] {
        assert!(env.contains(&given.to_owned()), "{given} missing: {env:?}");
    }
    let progress: Vec<u32> = records
        .iter()
        .filter_map(|r| match &r.event.kind {
            Some(Kind::Progress(p)) => Some(p.percent),
            _ => None,
        })
        .collect();
    assert_eq!(progress, [50]);
    agent.stop().await;
}

#[tokio::test]
async fn a_failing_script_fails_with_its_stderr_and_a_changed_one_never_runs() {
    let h = Harness::start_with_catalog(catalog()).await;
    let dir = tempfile::tempdir().unwrap();
    let scripts = Scripts::load(&scripts_file(dir.path(), &dir.path().join("r"), "1m")).unwrap();
    let agent = h.run(scripts.tower().config(h.config("s")));

    let failing = h.command("scripts/fail", "_", &[]);
    h.publish(&failing).await;
    let Kind::Failed(failed) = outcome(&h.finished(&failing.command_id).await).clone() else {
        panic!("not failed");
    };
    assert_eq!(failed.code, "exit_status");
    assert_eq!(
        failed.message,
        "exited with status 3: the load balancer said no"
    );

    let changed = h.command("scripts/changed", "_", &[]);
    h.publish(&changed).await;
    let records = h.finished(&changed.command_id).await;
    let Kind::Failed(failed) = outcome(&records) else {
        panic!("not failed");
    };
    assert_eq!(failed.code, "script_changed");
    assert!(logs(&records).is_empty(), "it never ran");
    agent.stop().await;
}

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie is gone for our purpose once reaped by init.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split_whitespace().nth(2) == Some("Z"))
            .unwrap_or(true)
}

async fn pids(record: &Path, id: &str) -> Vec<i32> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(text) = std::fs::read_to_string(record)
                && let Some(line) = text.lines().find(|l| l.starts_with(id))
            {
                return line
                    .split_whitespace()
                    .skip(1)
                    .map(|p| p.parse().unwrap())
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the script started")
}

#[tokio::test]
async fn cancel_and_timeout_stop_the_whole_process_group() {
    let h = Harness::start_with_catalog(catalog()).await;
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("pids");
    let scripts = Scripts::load(&scripts_file(dir.path(), &record, "2s")).unwrap();
    let agent = h.run(scripts.tower().config(h.config("s")));

    // Cancelled: stopped within 2 s of the request.
    let cancelled = h.command("scripts/linger", "_", &[]);
    h.publish(&cancelled).await;
    let group = pids(&record, &cancelled.command_id).await;
    let asked = std::time::Instant::now();
    let request = proto::Event {
        command_id: cancelled.command_id.clone(),
        at: Some(rct_streams::timestamp::from_datetime(
            time::OffsetDateTime::now_utc(),
        )),
        source: "admission/test".into(),
        operation: cancelled.operation.clone(),
        target: "_".into(),
        kind: Some(Kind::CancelRequested(proto::CancelRequested {
            by: cancelled.operator.clone(),
            justification: "SRE-3".into(),
        })),
    };
    rct_streams::Publisher::new(h.js.clone())
        .event(&"scripts".parse().unwrap(), &request, "c")
        .await
        .unwrap();
    // The script's child ignores TERM: the group is stopped by KILL after a short grace.
    while group.iter().any(|p| alive(*p)) {
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "processes {group:?} survived the cancel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(2), "stopping took {took:?}");
    let records = h.finished(&cancelled.command_id).await;
    assert!(
        matches!(outcome(&records), Kind::Cancelled(_)),
        "{records:#?}"
    );

    // Timed out (the script's own 2 s limit): the whole group is gone too.
    let slow = h.command("scripts/linger", "_", &[]);
    h.publish(&slow).await;
    let group = pids(&record, &slow.command_id).await;
    let records = h.finished(&slow.command_id).await;
    let Kind::Failed(failed) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(failed.code, "timeout");
    assert!(
        group.iter().all(|p| !alive(*p)),
        "processes {group:?} survived the timeout"
    );
    let _ = EventKind::Claim;
    agent.stop().await;
}
