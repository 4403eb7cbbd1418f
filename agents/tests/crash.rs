//! An agent process killed with SIGKILL in the middle of a command: the command ends
//! `Unknown` once its presence expires, and no other agent runs it again.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rct_agents::script::Scripts;
use rct_bus::EventKind;
use rct_bus::catalog::Catalog;
use rct_bus::proto::event::Kind;
use support::{Harness, outcome};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn catalog() -> Catalog {
    serde_yaml_ng::from_str(
        "towers:\n  scripts:\n    flavour: simple\noperations:\n  scripts/linger:\n    allowed_groups: [sre_team]\n",
    )
    .unwrap()
}

#[tokio::test]
async fn a_killed_agent_leaves_its_command_unknown_and_never_rerun() {
    let h = Harness::start_with_catalog(catalog()).await;
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("executions");
    let scripts = dir.path().join("scripts.yaml");
    std::fs::write(
        &scripts,
        format!(
            "tower: scripts\noperations:\n  linger:\n    command: {:?}\n    args: [\"--\", {:?}]\n",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/linger.py"),
            record
        ),
    )
    .unwrap();
    let key = dir.path().join("admission.pub");
    std::fs::write(&key, h.admission.public().to_pem()).unwrap();

    let mut first = Agent(
        Command::new(env!("CARGO_BIN_EXE_rct-agent"))
            .args(["--scripts".as_ref(), scripts.as_os_str()])
            .args([
                "--server",
                &h.server.url(),
                "--instance",
                "doomed",
                "--create-consumer",
            ])
            .arg("--trusted-key")
            .arg(&key)
            .env("RCT_LOG", "warn")
            .env("RCT_HEARTBEAT", "1s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let command = h.command("scripts/linger", "_", &[]);
    h.publish(&command).await;
    // Killed mid-command: once the script itself runs (its executions line), not merely once
    // the claim is written.
    tokio::time::timeout(Duration::from_secs(30), async {
        while !h
            .events(&command.command_id)
            .await
            .iter()
            .any(|r| r.kind == EventKind::Claim)
            || std::fs::read_to_string(&record)
                .unwrap_or_default()
                .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the first agent starts the command, and its script runs");
    assert!(
        h.present("scripts", 1).await[0]
            .instance
            .starts_with("doomed-")
    );
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    // Nobody removes a killed agent's presence: its TTL does.
    h.present("scripts", 0).await;

    // Another agent of the tower takes the redelivered command.
    let second = h.run(
        Scripts::load(&scripts)
            .unwrap()
            .tower()
            .config(h.config("survivor")),
    );
    let records = h.finished(&command.command_id).await;
    let Kind::Unknown(unknown) = outcome(&records) else {
        panic!("{records:#?}");
    };
    assert!(unknown.reason.contains("doomed-"), "{unknown:?}");
    assert!(
        unknown
            .reason
            .contains("stopped before reporting an outcome")
    );
    let claims = records
        .iter()
        .filter(|r| r.kind == EventKind::Claim)
        .count();
    assert_eq!(claims, 1, "never started twice");
    let executions = std::fs::read_to_string(&record).unwrap();
    assert_eq!(executions.lines().count(), 1, "{executions}");

    // The orphaned script of the killed agent is still ours to clean up in this test.
    for pid in executions.split_whitespace().skip(1) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid.parse().unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    second.stop().await;
}
