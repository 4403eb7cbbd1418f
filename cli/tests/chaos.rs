//! The CI slice of `rct chaos`: real processes under kill -9 and SIGSTOP, the checker's
//! verdict as the exit code. docs/RELIABILITY.md records the large runs.

use std::process::Command;

fn chaos(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_rct"))
        .arg("chaos")
        .args(args)
        .env("NATS_SERVER_BIN", rct_streams::testkit::nats_server_bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The table names every fault kind that was injected.
    for fault in [
        "kill nats",
        "pause nats",
        "kill admission",
        "pause admission",
        "kill agent",
        "pause agent",
    ] {
        assert!(stdout.contains(fault), "{fault} missing:\n{stdout}");
    }
    assert!(stderr.contains("— ok"), "{stderr}");
}

#[test]
fn nothing_is_lost_decided_or_executed_twice_under_faults_on_one_server() {
    chaos(&["--commands", "300", "--faults", "2", "--seeds", "1"]);
}

#[test]
fn nothing_is_lost_when_cluster_nodes_die_under_load() {
    chaos(&[
        "--commands",
        "150",
        "--faults",
        "1",
        "--seeds",
        "2",
        "--topology",
        "cluster",
    ]);
}
