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
  scripts/output:
    allowed_groups: [sre_team]
    params:
      mode: { type: string, max_len: 20 }
      arg: { type: string, max_len: 500 }
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
  output:
    command: {output:?}
    args: ["--", "{{mode}}", "{{arg}}"]
    timeout: 2m
"#,
            argv = script("argv.py"),
            output = script("output.py"),
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

/// Every line logged, in order (a log event may pack several lines).
fn logs(records: &[rct_streams::Record]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| match &r.event.kind {
            Some(Kind::Log(l)) => Some(l.line.split('\n').map(str::to_owned).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
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

/// Runs `output.py <mode> <arg>` and returns its events; fails (rather than hangs) if the
/// outcome does not come `within`.
async fn output(h: &Harness, mode: &str, arg: &str, within: Duration) -> Vec<rct_streams::Record> {
    let command = h.command(
        "scripts/output",
        "_",
        &[("mode", string(mode)), ("arg", string(arg))],
    );
    h.publish(&command).await;
    tokio::time::timeout(within, h.finished(&command.command_id))
        .await
        .unwrap_or_else(|_| panic!("no outcome for output.py {mode} within {within:?}"))
}

fn log_events(records: &[rct_streams::Record]) -> usize {
    records.iter().filter(|r| r.kind == EventKind::Log).count()
}

/// `…truncated N bytes` at the end of `line`: N, and the text before the marker.
fn truncated(line: &str) -> Option<(&str, u64)> {
    let (kept, rest) = line.rsplit_once("…truncated ")?;
    Some((kept, rest.strip_suffix(" bytes")?.parse().ok()?))
}

#[tokio::test]
async fn a_line_larger_than_max_payload_no_longer_wedges_the_command() {
    let h = Harness::start_with_catalog(catalog()).await;
    let dir = tempfile::tempdir().unwrap();
    let scripts = Scripts::load(&scripts_file(dir.path(), &dir.path().join("r"), "1m")).unwrap();
    let agent = h.run(scripts.tower().config(h.config("s")));

    // 2 MiB with no newline: more than the server's max_payload (1 MiB).
    let records = output(&h, "huge", "2097152", Duration::from_secs(30)).await;
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    let line = logs(&records)
        .into_iter()
        .find(|l| l.starts_with('x'))
        .expect("the line is recorded");
    let (kept, cut) = truncated(&line).unwrap_or_else(|| panic!("no marker: {line:.100}"));
    assert!(kept.len() <= 8192, "kept {} bytes", kept.len());
    assert!(kept.bytes().all(|b| b == b'x'));
    assert_eq!(
        kept.len() as u64 + cut,
        2 * 1024 * 1024,
        "the marker counts what was cut"
    );
    let (summary, _) = truncated(&succeeded.summary).expect("the summary is capped too");
    assert!(summary.len() <= 8192);
    agent.stop().await;
}

#[tokio::test]
async fn a_child_holding_the_pipes_neither_delays_the_outcome_nor_outlives_the_script() {
    let h = Harness::start_with_catalog(catalog()).await;
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("daemon");
    let scripts = Scripts::load(&scripts_file(dir.path(), &record, "1m")).unwrap();
    let agent = h.run(scripts.tower().config(h.config("s")));

    let started = std::time::Instant::now();
    let records = output(
        &h,
        "daemon",
        record.to_str().unwrap(),
        Duration::from_secs(20),
    )
    .await;
    let took = started.elapsed();
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(succeeded.summary, "daemon started");
    assert!(took < Duration::from_secs(5), "the outcome took {took:?}");
    let id = &records[0].event.command_id;
    let sleeper = pids(&record, id).await[0];
    let gone = std::time::Instant::now();
    while alive(sleeper) {
        assert!(
            gone.elapsed() < Duration::from_secs(2),
            "sleep 90 (pid {sleeper}) outlived its script"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.stop().await;
}

#[tokio::test]
async fn a_non_utf8_byte_no_longer_ends_output_capture() {
    let h = Harness::start_with_catalog(catalog()).await;
    let dir = tempfile::tempdir().unwrap();
    let scripts = Scripts::load(&scripts_file(dir.path(), &dir.path().join("r"), "1m")).unwrap();
    let agent = h.run(scripts.tower().config(h.config("s")));

    let records = output(&h, "binary", "-", Duration::from_secs(30)).await;
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(succeeded.summary, "the last line");
    let lines = logs(&records);
    let at = |text: &str| lines.iter().position(|l| l == text);
    let before = at("before").expect("the first line");
    let bad = at("bad \u{FFFD} byte").expect("the bad byte, replaced");
    let after = lines
        .iter()
        .position(|l| l.starts_with("after 1999 "))
        .expect("the lines after it");
    let last = at("the last line").expect("the last line");
    assert!(before < bad && bad < after && after < last);
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("after ")).count(),
        2000
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_chatty_script_no_longer_floods_the_event_stream() {
    let h = Harness::start_with_catalog(catalog()).await;
    let dir = tempfile::tempdir().unwrap();
    let scripts = Scripts::load(&scripts_file(dir.path(), &dir.path().join("r"), "1m")).unwrap();
    let agent = h.run(scripts.tower().config(h.config("s")));

    let records = output(&h, "chatty", "200000", Duration::from_secs(60)).await;
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(succeeded.summary, "line 199999");
    let events = log_events(&records);
    assert!(events < 500, "{events} log events for 200000 lines");
    let lines = logs(&records);
    assert_eq!(lines[0], "line 0", "the head is kept");
    assert!(
        lines.iter().any(|l| l.contains("lines elided")),
        "no elided notice in {} lines",
        lines.len()
    );
    assert_eq!(
        lines.iter().rev().find(|l| l.starts_with("line ")).unwrap(),
        "line 199999",
        "the tail is kept"
    );
    agent.stop().await;
}

#[tokio::test]
async fn an_event_the_server_refuses_is_dropped_with_its_reason_not_retried_forever() {
    let h = Harness::start_with_catalog(catalog()).await;
    // A stream that refuses events over 2 KiB: no retry can ever store a bigger one.
    let mut config =
        h.js.get_stream(rct_streams::topology::EVENT_STREAM)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .clone();
    config.max_message_size = 2048;
    h.js.update_stream(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let scripts = Scripts::load(&scripts_file(dir.path(), &dir.path().join("r"), "1m")).unwrap();
    let agent = h.run(scripts.tower().config(h.config("s")));

    let records = output(&h, "wide", "3000", Duration::from_secs(30)).await;
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(succeeded.summary, "done");
    let lines = logs(&records);
    let notice = lines
        .iter()
        .find(|l| l.contains("dropped"))
        .unwrap_or_else(|| panic!("no record of the dropped event in {lines:?}"));
    assert!(notice.contains("maximum"), "the reason is given: {notice}");
    assert!(lines.iter().all(|l| !l.starts_with("www")), "{lines:?}");
    agent.stop().await;
}

/// This process's resident set: (now, peak since the last reset), in KiB.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A benchmark, not a test: how much memory and how many events a flood of output costs.
/// The agent runs in this process (the nats-server is another), so the peak resident set
/// measured here is the agent's plus the test harness's. Run it with
/// `cargo test -p rct-agents --test scripts -- --ignored --nocapture output_measurements`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints numbers, asserts nothing about them"]
#[allow(clippy::print_stdout)] // the numbers are its output
async fn output_measurements() {
    let h = Harness::start_with_catalog(catalog()).await;
    let dir = tempfile::tempdir().unwrap();
    let scripts = Scripts::load(&scripts_file(dir.path(), &dir.path().join("r"), "1m")).unwrap();
    let config = h.config("s");
    let limits = config.output.clone();
    let agent = h.run(scripts.tower().config(config));
    let events =
        h.js.get_stream(rct_streams::topology::EVENT_STREAM)
            .await
            .unwrap();
    println!("limits: {limits:?}");
    println!(
        "| output | took | events | log events | lines recorded | bytes stored in RCT_EVT | \
         agent RSS before | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (what, mode, arg) in [
        ("100 MB of short lines", "flood", "100000000"),
        ("one 50 MB line", "line", "50000000"),
    ] {
        let stored_before = events.get_info().await.unwrap().state.bytes;
        // Resets the peak (VmHWM) to the current resident set.
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let (before, _) = rss();
        let started = std::time::Instant::now();
        let command = h.command(
            "scripts/output",
            "_",
            &[("mode", string(mode)), ("arg", string(arg))],
        );
        h.publish(&command).await;
        let records = tokio::time::timeout(Duration::from_secs(600), async {
            loop {
                let records = h.events(&command.command_id).await;
                if records.iter().any(|r| r.kind == EventKind::Outcome) {
                    return records;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .expect("an outcome within 10 minutes");
        let took = started.elapsed();
        let (_, peak) = rss();
        let stored = events.get_info().await.unwrap().state.bytes - stored_before;
        assert!(
            matches!(outcome(&records), Kind::Succeeded(_)),
            "{records:#?}"
        );
        println!(
            "| {what} | {:.1} s | {} | {} | {} | {} KiB | {} MiB | {} MiB |",
            took.as_secs_f64(),
            records.len(),
            log_events(&records),
            logs(&records).len(),
            stored / 1024,
            before / 1024,
            peak / 1024,
        );
    }
    agent.stop().await;
}
