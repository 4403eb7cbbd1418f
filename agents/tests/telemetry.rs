//! An agent's `/metrics`, `/healthz` and `/readyz` against a real nats-server.

mod support;

use std::net::SocketAddr;

use rct_streams::testkit::{free_port, http_until};
use support::{Harness, Ledger, drain_handler, target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_commands_by_outcome_and_readiness_needs_the_consumer() {
    let h = Harness::start().await;
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ledger = Ledger::default();
    let mut config = h.config("m");
    config.telemetry.listen = Some(address);
    let agent = h.run(
        rct_agents::Tower::new("traffic")
            .cluster("prod-1")
            .operation("drain-cluster", drain_handler(ledger.clone(), "m"))
            .config(config),
    );
    let ready = http_until(address, "/readyz", |status, _| status == 200).await;
    for condition in [
        "nats connected: yes",
        "consumer bound: yes",
        "presence written: yes",
        "keys loaded: yes",
    ] {
        assert!(ready.contains(condition), "{ready}");
    }

    let command = h.command(
        "traffic/drain-cluster",
        "prod-1",
        &[("cluster", target("prod-1"))],
    );
    h.publish(&command).await;
    h.finished(&command.command_id).await;
    let labels = r#"tower="traffic",target="prod-1""#;
    let metrics = http_until(address, "/metrics", |status, body| {
        status == 200 && body.contains("rct_agent_commands_total")
    })
    .await;
    for line in [
        format!(
            r#"rct_agent_commands_total{{{labels},operation="drain-cluster",outcome="succeeded"}} 1"#
        ),
        format!(r#"rct_agent_commands_in_flight{{{labels}}} 0"#),
        format!(r#"rct_agent_handler_seconds_count{{{labels},operation="drain-cluster"}} 1"#),
        "rct_nats_connected 1".to_owned(),
    ] {
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    assert!(
        metrics.contains(&format!(
            r#"rct_agent_heartbeats_total{{{labels},result="ok"}}"#
        )),
        "{metrics}"
    );
    agent.stop().await;
}
