//! The CI slice of `rct chaos`: real processes under kill -9 and SIGSTOP, the checker's
//! verdict as the exit code. docs/RELIABILITY.md records the large runs.

use std::process::Command;

/// The kinds of the first wave of faults: processes killed and paused.
const PROCESS_FAULTS: &str =
    "kill-nats,pause-nats,kill-admission,pause-admission,kill-agent,pause-agent";
/// Faults that each wedged, lost or misreported commands before: lost PubAcks, agents paused
/// before they claim, a catalog outage, a panicking handler, scripts whose output misbehaves,
/// requests dated by skewed clocks, agents whose clocks are off admission's.
const EDGE_FAULTS: &str = "pause-nats-long,pause-before-claim,catalog-outage,panic,flood,\
                           huge-line,orphan,clock-skew,agent-clock-skew";

fn chaos(args: &[&str], names: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_rct"))
        .arg("chaos")
        .args(args)
        .env("NATS_SERVER_BIN", rct_streams::testkit::nats_server_bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The table names every fault kind that was injected, and each one bit.
    for fault in names {
        assert!(
            stdout.contains(&format!("{fault} ×")),
            "{fault} missing:\n{stdout}"
        );
    }
    assert!(!stdout.contains("did not bite:"), "{stdout}");
    assert!(stderr.contains("— ok"), "{stderr}");
}

const PROCESS_NAMES: [&str; 6] = [
    "kill nats",
    "pause nats",
    "kill admission",
    "pause admission",
    "kill agent",
    "pause agent",
];

#[test]
fn nothing_is_lost_decided_or_executed_twice_under_faults_on_one_server() {
    chaos(
        &[
            "--commands",
            "300",
            "--faults",
            "2",
            "--seeds",
            "1",
            "--kinds",
            PROCESS_FAULTS,
        ],
        &PROCESS_NAMES,
    );
}

#[test]
fn nothing_is_lost_when_cluster_nodes_die_under_load() {
    chaos(
        &[
            "--commands",
            "150",
            "--faults",
            "1",
            "--seeds",
            "2",
            "--topology",
            "cluster",
            "--kinds",
            PROCESS_FAULTS,
        ],
        &PROCESS_NAMES,
    );
}

/// Two agents per target share its consumer: claims race, and a burst sent to paused agents
/// is claimed by exactly one after they resume.
#[test]
fn commands_end_once_and_as_recorded_under_the_faults_that_broke_them_before() {
    chaos(
        &[
            "--commands",
            "80",
            "--faults",
            "1",
            "--seeds",
            "3",
            "--agents",
            "2",
            "--kinds",
            EDGE_FAULTS,
        ],
        &[
            "pause nats past timeouts",
            "pause agents before claim",
            "catalog outage",
            "panicking handler",
            "output flood",
            "huge line",
            "child holding pipes",
            "clock skew",
            "agent clock skew",
        ],
    );
}
