//! `rct bench --quick` as a smoke test: it runs every scenario and prints a table with
//! numbers. Timings are never asserted here (they are for docs/BENCHMARKS.md, on a quiet box).

use std::process::{Command, Stdio};

#[test]
fn the_quick_bench_runs_every_scenario_and_prints_numbers() {
    let out = Command::new(env!("CARGO_BIN_EXE_rct"))
        .args(["bench", "--quick"])
        .env("NATS_SERVER_BIN", rct_streams::testkit::nats_server_bin())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| scenario"))
        .collect();
    for scenario in [
        "latency",
        "admission throughput",
        "replay",
        "fan-out",
        "rollout to",
        "agent processes",
        "[3 nodes, R3, sync always]",
        "CLI process start",
        "who wrote an event",
    ] {
        let row = rows
            .iter()
            .find(|r| r.contains(scenario))
            .unwrap_or_else(|| panic!("no {scenario} row in:\n{stdout}"));
        assert!(row.chars().any(|c| c.is_ascii_digit()), "{row}");
    }
}
