//! Firewalled clusters: an agent connected only to its cluster's leaf node (the shipped
//! `ops/nats/leaf.conf`, dialling out to the hub) runs commands end to end, and the leaf
//! connection carries nothing the hub's `leaf-*` permissions do not allow.

mod support;

use std::time::Duration;

use rct_streams::testkit::{Server, Setup};
use support::Hub;
use tokio_util::sync::CancellationToken;

/// The shipped leaf.conf, pointed at `hub` and keyed with the test's identities.
fn leaf_config(hub: &Hub) -> String {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ops/nats/leaf.conf"
    ))
    .unwrap();
    let seed = std::fs::read_to_string(&hub.id("leaf_prod1").seed_file).unwrap();
    let shipped_agent_key = "UDL3UXLXHCVT4ELALE6ZGXUXVF4KVCVZVQDOC3NKEUJT5636SVGJOQIZ";
    assert!(
        shipped.contains(shipped_agent_key),
        "leaf.conf names prod-1's agent"
    );
    shipped
        .lines()
        // The test server sets its own name and port.
        .filter(|l| !l.starts_with("server_name:") && !l.starts_with("listen:"))
        .map(|l| {
            if l.trim_start().starts_with("urls:") {
                format!("      urls: [\"nats-leaf://127.0.0.1:{}\"]", hub.leaf_port)
            } else {
                l.replace("$RCT_LEAF_SEED", &format!("\"{}\"", seed.trim()))
                    .replace(shipped_agent_key, &hub.id("agent_traffic_prod1").public)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_behind_a_leaf_node_runs_commands_end_to_end() {
    let hub = Hub::start().await;
    hub.provision().await;
    let leaf = Server::start_with(Setup {
        extra: leaf_config(&hub),
        no_jetstream: true,
        ..Setup::default()
    })
    .await;
    leaf.wait_for_log("Leafnode connection created").await;

    let shutdown = CancellationToken::new();
    let key = hub.admission(&shutdown).await;
    // The agent knows only the leaf, and reaches JetStream through the hub's domain.
    let mut agent = hub.connection("agent_traffic_prod1", "_INBOX_agent.traffic.prod-1");
    agent.servers = vec![leaf.url()];
    agent.domain = Some("hub".into());
    hub.traffic_agent("prod-1", agent, key, &shutdown).await;

    let operator = std::sync::Arc::new(hub.operator());
    let op = operator.clone();
    let out = tokio::task::spawn_blocking(move || {
        op.login();
        op.fire_drain("prod-1", &[], &[])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("prod-1 drained"),
        "{stdout}\n{}\nhub refusals:\n{}\nleaf log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        hub.violations().join("\n"),
        leaf.log()
    );
    let op = operator.clone();
    let agents = tokio::task::spawn_blocking(move || op.ok(&["agents"]))
        .await
        .unwrap();
    assert!(
        agents.contains("prod-1"),
        "{agents}\nhub refusals:\n{}\nleaf log:\n{}",
        hub.violations().join("\n"),
        leaf.log()
    );

    // Through the leaf, the agent's identity reaches its own consumer and nothing else: the
    // hub drops what its `leaf-*` permissions do not name (silently, so the request times
    // out).
    let mut agent = hub.connection("agent_traffic_prod1", "_INBOX_agent.traffic.prod-1");
    agent.servers = vec![leaf.url()];
    let client = agent.connect("probe", false).await.unwrap();
    // A pull asks for one message without waiting, so an allowed one is answered at once
    // (a 404 with nothing pending) and silence means refused.
    let ask = |subject: &'static str| {
        let client = client.clone();
        let body = if subject.contains(".MSG.NEXT.") {
            bytes::Bytes::from_static(br#"{"batch":1,"no_wait":true}"#)
        } else {
            bytes::Bytes::new()
        };
        async move {
            tokio::time::timeout(Duration::from_secs(3), client.request(subject, body))
                .await
                .ok()
                .and_then(Result::ok)
        }
    };
    for own in [
        "$JS.hub.API.CONSUMER.INFO.RCT_CMD.tower-traffic@prod-1",
        "$JS.hub.API.CONSUMER.MSG.NEXT.RCT_CMD.tower-traffic@prod-1",
    ] {
        assert!(ask(own).await.is_some(), "{own} was not answered");
    }
    for other in [
        "$JS.hub.API.CONSUMER.INFO.RCT_CMD.tower-traffic@prod-2",
        "$JS.hub.API.CONSUMER.MSG.NEXT.RCT_CMD.tower-traffic@prod-2",
        "$JS.hub.API.CONSUMER.MSG.NEXT.RCT_CMD.tower-workloads",
        "$JS.hub.API.STREAM.DELETE.RCT_EVT",
        // replay is by direct gets: a consumer could deliver events anywhere
        "$JS.hub.API.CONSUMER.CREATE.RCT_EVT",
    ] {
        assert!(ask(other).await.is_none(), "{other} was answered");
    }

    shutdown.cancel();
    assert_eq!(hub.violations(), Vec::<String>::new());
    let leaf_refusals: Vec<_> = leaf
        .log()
        .lines()
        .filter(|l| l.contains(" Violation - "))
        .map(String::from)
        .collect();
    assert_eq!(leaf_refusals, Vec::<String>::new());
}
