//! The three-node cluster helper: replicated streams keep taking writes with a node down,
//! and the node catches up when it comes back.

mod support;

use rct_bus::CommandId;
use rct_streams::replay;
use rct_streams::testkit::Cluster;
use rct_streams::{Config, Publisher, Slot, provision};
use support::{event, progress, tower};

#[tokio::test]
async fn replicated_streams_survive_a_killed_node() {
    let mut cluster = Cluster::start().await;
    let js = cluster.jetstream().await;
    let config = Config {
        replicas: 3,
        ..Config::default()
    };
    // The testkit hands over a cluster that can already place R3 streams.
    let report = provision(&js, &config).await.unwrap();
    assert_eq!(report.items.len(), 8, "{report}");
    let info = js.get_stream("RCT_EVT").await.unwrap();
    assert_eq!(info.cached_info().config.num_replicas, 3);

    let publisher = Publisher::new(js.clone());
    let id = CommandId::generate();
    let traffic = tower("traffic");
    publisher
        .event(&traffic, &event(id, "prod-1", progress(1)), 1)
        .await
        .unwrap();

    cluster.node(2).kill();
    let slot = publisher
        .event(&traffic, &event(id, "prod-1", progress(2)), 2)
        .await
        .unwrap();
    assert!(
        matches!(slot, Slot::Written(_)),
        "a quorum of two still writes"
    );

    cluster.node(2).start_again().await;
    // Replay may be served by any replica; wait until the restarted one has caught up.
    let mut events = js.get_stream("RCT_EVT").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            let info = events.info().await.unwrap();
            let replicas = info
                .cluster
                .as_ref()
                .map(|c| c.replicas.clone())
                .unwrap_or_default();
            if replicas.len() == 2 && replicas.iter().all(|r| r.current && !r.offline) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the restarted node catches up");
    // A busy cluster that just regained a node may time out an API call: that is an error to
    // retry, never a wrong answer.
    let mut last_error = None;
    for _ in 0..20 {
        match replay::command_history(&js, id).await {
            Ok(records) => {
                assert_eq!(records.len(), 2);
                return;
            }
            Err(e) => {
                last_error = Some(e);
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
    panic!("replay kept failing: {last_error:?}");
}
