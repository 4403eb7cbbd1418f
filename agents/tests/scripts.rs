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
    catalog_sealing_to(&[support::example_recipient()])
}

/// The test catalog, its secrets sealed to `recipients`.
fn catalog_sealing_to(recipients: &[String]) -> Catalog {
    let catalog: Catalog = serde_yaml_ng::from_str(
        &r#"
towers:
  scripts:
    flavour: simple
    recipients: [RECIPIENT]
operations:
  scripts/argv:
    allowed_groups: [sre_team]
    params:
      text: { type: string, max_len: 200 }
      flag: { type: string, max_len: 200 }
      token: { type: string, secret: true, max_len: 100 }
  scripts/secrets:
    allowed_groups: [sre_team]
    params:
      value: { type: string, secret: true, pattern: "[^x]*", max_len: 100 }
      mode: { type: string, max_len: 20 }
  scripts/leaky:
    allowed_groups: [sre_team]
    params:
      value: { type: string, secret: true, max_len: 100 }
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
"#
        .replace("RECIPIENT", &recipients.join(", ")),
    )
    .unwrap();
    assert_eq!(catalog.problems(), []);
    catalog
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
    secret_in_argv: true
  secrets:
    command: {secrets:?}
    args: ["--", "{{mode}}", {record:?}]
    env: {{ SECRET_VALUE: "{{value}}" }}
    secret_files: {{ SECRET_FILE: value }}

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
            secrets = script("secrets.py"),
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
    let config = with_keys(&h, "s", vec![support::example_key_file()]);
    let agent = h.run(scripts.tower().config(config));

    let nasty = "; rm -rf / $(id) `id` \"quoted\" 'single' \\back\nnewline *glob* >out";
    let mut command = h.command(
        "scripts/argv",
        "_",
        &[("text", string(nasty)), ("flag", string("-rf"))],
    );
    let token = support::sealed_for(
        &command,
        "token",
        "s3cr3t-t0ken",
        &[support::example_recipient()],
    );
    command.params.insert("token".into(), token);
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
        "each value is one argv item, and the secret (in argv, as the YAML allows) is \
         masked in the log"
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
    let agent = h.run(scripts.tower().config(keyed(&h, "s")));

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
    let agent = h.run(scripts.tower().config(keyed(&h, "s")));

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
            resume: false,
        })),
    };
    h.as_admission()
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
    let agent = h.run(scripts.tower().config(keyed(&h, "s")));

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
    let agent = h.run(scripts.tower().config(keyed(&h, "s")));

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
    let agent = h.run(scripts.tower().config(keyed(&h, "s")));

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
    let agent = h.run(scripts.tower().config(keyed(&h, "s")));

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
    let agent = h.run(scripts.tower().config(keyed(&h, "s")));

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
    let config = keyed(&h, "s");
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

/// The command `id` as RCT_CMD stores it.
async fn stored_command(h: &Harness, id: &str) -> proto::Command {
    use prost::Message as _;
    let stream = h.js.get_stream("RCT_CMD").await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let envelope = proto::SignedEnvelope::decode(message.payload).unwrap();
        let command = proto::Command::decode(envelope.body.as_slice()).unwrap();
        if command.command_id == id {
            return command;
        }
    }
    panic!("{id} is not in RCT_CMD")
}

/// How many stored messages of RCT_SUBMIT, RCT_CMD and RCT_EVT hold `needle`, by stream.
async fn stored_with(h: &Harness, needle: &str) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    for name in ["RCT_SUBMIT", "RCT_CMD", "RCT_EVT"] {
        let mut stream = h.js.get_stream(name).await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        for sequence in 1..=last {
            let Ok(message) = stream.get_raw_message(sequence).await else {
                continue;
            };
            let bytes: &[u8] = &message.payload;
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                found.push((name.to_owned(), sequence));
            }
        }
    }
    found
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A `scripts/secrets` command (mode `mode`) whose value is sealed to `recipients`.
fn secret_command(h: &Harness, mode: &str, value: &str, recipients: &[String]) -> proto::Command {
    let mut command = h.command("scripts/secrets", "_", &[("mode", string(mode))]);
    let sealed = support::sealed_for(&command, "value", value, recipients);
    command.params.insert("value".into(), sealed);
    command
}

/// Settings for a test agent holding the example key.
fn keyed(h: &Harness, instance: &str) -> rct_agents::Config {
    with_keys(h, instance, vec![support::example_key_file()])
}

fn with_keys(h: &Harness, instance: &str, keys: Vec<PathBuf>) -> rct_agents::Config {
    rct_agents::Config {
        secret_keys: keys,
        ..h.config(instance)
    }
}

/// The value reaches the script in the environment variable and the 0600 file its YAML names,
/// nowhere else; the file is gone once the script ends; and nothing stored (submissions,
/// commands, events: progress, logs, summary, failure message) holds the value or its base64.
#[tokio::test]
async fn a_secret_reaches_the_script_only_as_its_yaml_says_and_is_stored_nowhere() {
    let h = Harness::start_with_catalog(catalog()).await;
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("received.json");
    let scripts = Scripts::load(&scripts_file(dir.path(), &record, "1m")).unwrap();
    let config = with_keys(&h, "s", vec![support::example_key_file()]);
    let agent = h.run(scripts.tower().config(config));
    let secret = "hunter2 Zz9/+?&=é";
    let recipients = [support::example_recipient()];

    let ok = secret_command(&h, "ok", secret, &recipients);
    h.publish(&ok).await;
    let records = h.finished(&ok.command_id).await;
    let Kind::Succeeded(succeeded) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(succeeded.summary, "done with ***");
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    assert_eq!(got["env"], secret);
    assert_eq!(got["file"], secret);
    assert_eq!(got["file_mode"], 0o600);
    assert_eq!(got["dir_mode"], 0o700);
    assert!(!got["argv"].to_string().contains("hunter2"), "{got}");
    let path = PathBuf::from(got["path"].as_str().unwrap());
    assert!(!path.exists(), "{} outlived the script", path.display());
    assert!(!path.parent().unwrap().exists());
    let logged = logs(&records);
    for expected in ["clear ***", "base64 ***", "stderr ***"] {
        assert!(
            logged.iter().any(|l| l == expected),
            "{expected:?} in {logged:#?}"
        );
    }

    let failing = secret_command(&h, "fail", secret, &recipients);
    h.publish(&failing).await;
    let records = h.finished(&failing.command_id).await;
    let Kind::Failed(failed) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(failed.code, "exit_status");
    assert!(failed.message.contains("failed using ***"), "{failed:?}");

    for needle in [secret.to_owned(), base64_of(secret), "hunter2".to_owned()] {
        assert_eq!(stored_with(&h, &needle).await, [], "{needle:?} is stored");
    }
    agent.stop().await;
}

/// A secret the agent cannot open, or one that arrived in clear, fails the command with a code
/// and a sentence, without running it and without showing the value.
#[tokio::test]
async fn a_secret_that_does_not_open_fails_the_command_with_its_reason() {
    let h = Harness::start_with_catalog(catalog()).await;
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("received.json");
    let scripts = Scripts::load(&scripts_file(dir.path(), &record, "1m")).unwrap();
    let agent = h.run(scripts.clone().tower().config(with_keys(
        &h,
        "s",
        vec![support::example_key_file()],
    )));
    let ours = [support::example_recipient()];
    let theirs = rct_bus::sealed::Keys::generate().recipients();

    let foreign = secret_command(&h, "ok", "hunter2", &theirs);
    let mut tampered = secret_command(&h, "ok", "hunter2", &ours);
    if let Some(proto::value::Kind::Sealed(s)) = &mut tampered.params.get_mut("value").unwrap().kind
    {
        let last = s.age.len() - 1;
        s.age[last] ^= 1;
    }
    let mut copied = secret_command(&h, "ok", "hunter2", &ours);
    copied.command_id = rct_bus::CommandId::generate().to_string();
    let mut moved = secret_command(&h, "ok", "hunter2", &ours);
    moved.params.insert("mode".into(), string("fail"));
    let mut clear = h.command("scripts/secrets", "_", &[("mode", string("ok"))]);
    clear.params.insert("value".into(), string("hunter2"));
    // Opened, then checked like any value: the pattern refuses an `x`, without echoing it.
    let unfit = secret_command(&h, "ok", "hunter2x", &ours);
    let cases = [
        (
            unfit,
            "invalid_params",
            "value must match [^x]*, and the value does not",
        ),
        (
            foreign,
            "secret_undecryptable",
            "no key of this agent opens it",
        ),
        (tampered, "secret_tampered", "changed after it was sealed"),
        (
            copied,
            "secret_misbound",
            "was sealed for parameter value of command",
        ),
        (
            moved,
            "secret_misbound",
            "this command's other parameters differ",
        ),
        (clear, "secret_not_sealed", "arrived in clear"),
    ];
    for (command, code, words) in cases {
        h.publish(&command).await;
        let records = h.finished(&command.command_id).await;
        let Kind::Failed(failed) = outcome(&records) else {
            panic!("{code}: {records:#?}");
        };
        assert_eq!(failed.code, code, "{failed:?}");
        assert!(failed.message.contains(words), "{failed:?}");
        assert!(!failed.message.contains("hunter2"), "{failed:?}");
        assert!(
            records.iter().all(|r| r.kind != EventKind::Log),
            "{code}: the script ran: {records:#?}"
        );
    }
    assert!(!record.exists(), "a script ran");
    agent.stop().await;

    // An agent that holds none of the keys its operations' secrets are sealed to does not
    // start, and says why.
    let agent = h.run(scripts.tower().config(with_keys(&h, "nokeys", Vec::new())));
    let refused = agent.task.await.unwrap().unwrap_err().to_string();
    assert!(
        refused.contains(
            "operation secrets takes secret parameters (value), sealed to age1h8w2m3amcn8m9r4m4g9cdnhch3d74rtutexzgxjjtz08t9rk0dgsmwq8e5, \
             and this agent holds none of those keys"
        ),
        "{refused}"
    );
}

/// A script tower that would put a secret into argv does not start against the served
/// catalog; and should a later catalog make an argv parameter secret, its commands fail
/// without running.
#[tokio::test]
async fn a_secret_in_argv_is_refused_unless_the_yaml_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("leaky.yaml");
    std::fs::write(
        &file,
        format!(
            "tower: scripts\noperations:\n  leaky:\n    command: {:?}\n    \
             args: [\"--value={{value}}\"]\n",
            script("argv.py")
        ),
    )
    .unwrap();
    let scripts = Scripts::load(&file).unwrap();
    let problems = scripts.problems(&catalog());
    assert_eq!(problems.len(), 1, "{problems:?}");
    let expected = "operation leaky: --value={value} puts a secret parameter into argv";
    assert!(problems[0].starts_with(expected), "{problems:?}");

    let h = Harness::start_with_catalog(catalog()).await;
    let agent = h.run(scripts.clone().tower().config(keyed(&h, "s")));
    let refused = agent.task.await.unwrap().unwrap_err().to_string();
    assert!(refused.contains(expected), "{refused}");

    // Served a catalog in which it is not secret, it starts; then the catalog changes.
    let mut plain = catalog();
    plain
        .operations
        .get_mut("scripts/leaky")
        .unwrap()
        .params
        .get_mut("value")
        .unwrap()
        .secret = false;
    let h = Harness::start_with_catalog(plain).await;
    let agent = h.run(scripts.tower().config(keyed(&h, "s")));
    h.present("scripts", 1).await;
    let secret = rct_bus::catalog::Served {
        version: catalog().version(),
        catalog: catalog(),
    };
    h.js.get_key_value("rct_catalog")
        .await
        .unwrap()
        .put("catalog", serde_json::to_vec(&secret).unwrap().into())
        .await
        .unwrap();
    let mut leaky = h.command("scripts/leaky", "_", &[]);
    leaky.catalog_version = secret.version.clone();
    let sealed = support::sealed_for(&leaky, "value", "hunter2", &[support::example_recipient()]);
    leaky.params.insert("value".into(), sealed);
    h.publish(&leaky).await;
    let records = h.finished(&leaky.command_id).await;
    let Kind::Failed(failed) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert_eq!(failed.code, "secret_in_argv");
    assert!(
        failed
            .message
            .starts_with("not run: --value={value} puts a secret parameter into argv"),
        "{failed:?}"
    );
    assert!(
        logs(&records).iter().all(|l| !l.starts_with("arg ")),
        "argv.py ran: {records:#?}"
    );
    agent.stop().await;
}

/// Rotation: with the old and the new key both values open; once the old key is gone (read
/// again without a restart), what was sealed to it no longer opens, in the command stream or
/// anywhere, while values sealed to the new key run.
#[tokio::test]
async fn rotating_the_key_shreds_what_was_sealed_to_the_old_one() {
    let (old, new) = (
        rct_bus::sealed::Keys::generate(),
        rct_bus::sealed::Keys::generate(),
    );
    let both = [old.recipients(), new.recipients()].concat();
    let h = Harness::start_with_catalog(catalog_sealing_to(&both)).await;
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("received.json");
    let scripts = Scripts::load(&scripts_file(dir.path(), &record, "1m")).unwrap();
    let key_file = dir.path().join("agent.agekey");
    std::fs::write(
        &key_file,
        format!("{}{}", old.to_file_text(), new.to_file_text()),
    )
    .unwrap();
    let config = rct_agents::Config {
        trust_reload: Duration::from_millis(100),
        ..with_keys(&h, "s", vec![key_file.clone()])
    };
    let agent = h.run(scripts.tower().config(config));
    let succeeds = |command: proto::Command| {
        let h = &h;
        async move {
            h.publish(&command).await;
            let records = h.finished(&command.command_id).await;
            outcome(&records).clone()
        }
    };
    // While rotating: sealed to either key (or both), it opens.
    for recipients in [
        old.recipients(),
        new.recipients(),
        [old.recipients(), new.recipients()].concat(),
    ] {
        let kind = succeeds(secret_command(&h, "ok", "during", &recipients)).await;
        assert!(matches!(kind, Kind::Succeeded(_)), "{kind:?}");
    }
    // Run before the rotation, and kept in RCT_CMD for ever.
    let before = secret_command(&h, "ok", "sealed-to-old", &old.recipients());
    let kind = succeeds(before.clone()).await;
    assert!(matches!(kind, Kind::Succeeded(_)), "{kind:?}");

    // The old key is removed from the agent's file: it reads it again.
    std::fs::write(&key_file, new.to_file_text()).unwrap();
    let mut shredded = None;
    for _ in 0..50 {
        let kind = succeeds(secret_command(&h, "ok", "probe", &old.recipients())).await;
        if let Kind::Failed(f) = kind {
            shredded = Some(f);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shredded = shredded.expect("the agent never dropped the old key");
    assert_eq!(shredded.code, "secret_undecryptable");

    // The command stored before the rotation: its value opens with the old key only, which
    // is gone, and not with what the agent holds now.
    let stored = stored_command(&h, &before.command_id).await;
    let Some(proto::value::Kind::Sealed(sealed)) = &stored.params["value"].kind else {
        panic!("not sealed");
    };
    let binding = rct_bus::sealed::Binding {
        command_id: stored.command_id.clone(),
        operation: stored.operation.clone(),
        target: stored.target.clone(),
        param: "value".into(),
        operator: stored.operator.as_ref().unwrap().subject.clone(),
        params: rct_bus::sealed::params_digest(&stored.params, |n| n == "value"),
    };
    let held = rct_bus::sealed::Keys::parse(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    assert_eq!(
        held.open(sealed, &binding),
        Err(rct_bus::sealed::OpenError::NoKey)
    );
    assert_eq!(
        old.open(sealed, &binding).unwrap(),
        string("sealed-to-old"),
        "the stored ciphertext is the one the old key opened"
    );
    // New ones work.
    let kind = succeeds(secret_command(&h, "ok", "after", &new.recipients())).await;
    assert!(matches!(kind, Kind::Succeeded(_)), "{kind:?}");

    // Deleting the key file forgets its keys too.
    std::fs::remove_file(&key_file).unwrap();
    let mut forgotten = None;
    for _ in 0..50 {
        let kind = succeeds(secret_command(&h, "ok", "probe", &new.recipients())).await;
        if let Kind::Failed(f) = kind {
            forgotten = Some(f);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let forgotten = forgotten.expect("the agent kept the keys of a deleted file");
    assert_eq!(forgotten.code, "secret_undecryptable");
    agent.stop().await;
}
