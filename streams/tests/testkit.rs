//! The testkit's own promises: restarts keep the port and the store.

mod support;

use rct_bus::CommandId;
use rct_streams::testkit::Server;
use rct_streams::{Config, Publisher, provision, replay};
use support::{admitted, event, tower};

#[tokio::test]
async fn a_restarted_server_keeps_its_port_and_its_data() {
    let mut server = Server::start().await;
    let port = server.port();
    let js = server.jetstream().await;
    provision(&js, &Config::default()).await.unwrap();
    let id = CommandId::generate();
    Publisher::new(js.clone())
        .event(&tower("traffic"), &event(id, "prod-1", admitted()), 0)
        .await
        .unwrap();

    server.restart().await;
    assert_eq!(server.port(), port);
    assert!(server.is_running());
    let js = server.jetstream().await;
    assert_eq!(replay::command_history(&js, id).await.unwrap().len(), 1);

    server.kill();
    assert!(!server.is_running());
    server.start_again().await;
    let js = server.jetstream().await;
    assert_eq!(replay::command_history(&js, id).await.unwrap().len(), 1);
}

/// Agents behind leaf nodes reach the hub's JetStream through its domain; the topology and
/// publisher work the same way through `with_domain`.
#[tokio::test]
async fn the_topology_works_through_a_jetstream_domain() {
    let server = Server::start_in_domain("hub").await;
    let js = async_nats::jetstream::with_domain(server.client().await, "hub");
    provision(&js, &Config::default()).await.unwrap();
    let id = CommandId::generate();
    Publisher::new(js.clone())
        .event(&tower("traffic"), &event(id, "prod-1", admitted()), 0)
        .await
        .unwrap();
    assert_eq!(replay::command_history(&js, id).await.unwrap().len(), 1);
}

#[test]
fn the_development_server_config_is_valid() {
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/nats/dev.conf");
    let output = std::process::Command::new(rct_streams::testkit::nats_server_bin())
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "nats-server refuses {}: {}{}",
        conf.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
