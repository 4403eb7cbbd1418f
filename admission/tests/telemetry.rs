//! Admission's `/metrics`, `/healthz` and `/readyz` against a real nats-server: decisions
//! show up by outcome and code, readiness follows the connection.

mod support;

use std::net::SocketAddr;

use rct_streams::testkit::{free_port, http_until as until};
use support::{Harness, drain};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_decisions_and_readiness_follows_the_connection() {
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut h = Harness::start_with(move |c| c.telemetry.listen = Some(address)).await;

    let ready = until(address, "/readyz", |status, _| status == 200).await;
    for condition in [
        "nats connected: yes",
        "streams present: yes",
        "catalog published: yes",
        "consumer bound: yes",
        "keys loaded: yes",
    ] {
        assert!(ready.contains(condition), "{ready}");
    }

    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["app_oncall"]).await;
    let admitted = h.submit(&alice, &drain("prod-1")).await;
    let refused = h.submit(&bob, &drain("prod-2")).await;
    h.decision(admitted).await;
    h.decision(refused).await;
    let metrics = until(address, "/metrics", |status, body| {
        status == 200 && body.contains("rct_admission_decision_seconds_count 2")
    })
    .await;
    for line in [
        r#"rct_admission_decisions_total{outcome="admitted",code=""} 1"#,
        r#"rct_admission_decisions_total{outcome="rejected",code="forbidden"} 1"#,
        "rct_nats_connected 1",
        "# TYPE rct_admission_submissions_pending gauge",
        "# TYPE rct_admission_write_failures counter",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }

    // NATS goes away: not ready, still alive; back: ready again.
    h.server.kill();
    let not_ready = until(address, "/readyz", |status, _| status == 503).await;
    assert!(not_ready.contains("nats connected: no"), "{not_ready}");
    until(address, "/healthz", |status, body| {
        status == 200 && body == "ok\n"
    })
    .await;
    let metrics = until(address, "/metrics", |status, _| status == 200).await;
    assert!(metrics.contains("rct_nats_connected 0"), "{metrics}");
    h.server.start_again().await;
    until(address, "/readyz", |status, _| status == 200).await;
}
