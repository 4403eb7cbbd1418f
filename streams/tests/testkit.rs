//! The testkit's own promises: restarts keep the port and the store.

mod support;

use rct_bus::CommandId;
use rct_streams::testkit::{Server, Setup};
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
    assert_eq!(server.port(), port);
    let js = server.jetstream().await;
    assert_eq!(replay::command_history(&js, id).await.unwrap().len(), 1);
}

/// Agents behind leaf nodes reach the hub's JetStream through its domain; the topology and
/// publisher work the same way through `with_domain`.
#[tokio::test]
async fn the_topology_works_through_a_jetstream_domain() {
    let server = Server::start_with(Setup {
        domain: Some("hub".into()),
        ..Setup::default()
    })
    .await;
    let js = async_nats::jetstream::with_domain(server.client().await, "hub");
    provision(&js, &Config::default()).await.unwrap();
    let id = CommandId::generate();
    Publisher::new(js.clone())
        .event(&tower("traffic"), &event(id, "prod-1", admitted()), 0)
        .await
        .unwrap();
    assert_eq!(replay::command_history(&js, id).await.unwrap().len(), 1);
}

/// Every config shipped in ops/nats parses (`nats-server -t`), with the secrets it takes
/// from the environment set to a well-formed value.
#[test]
fn every_shipped_server_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/nats");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let conf = entry.unwrap().path();
        let name = conf.file_name().unwrap().to_string_lossy().into_owned();
        // Included by the others, not a server config of its own.
        if !name.ends_with(".conf") || name == "accounts.conf" || name == "identities.conf" {
            continue;
        }
        let output = std::process::Command::new(rct_streams::testkit::nats_server_bin())
            .arg("-t")
            .arg("-c")
            .arg(&conf)
            .env(
                "RCT_LEAF_SEED",
                "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY",
            )
            .env("SERVER_NAME", "hub-0")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "nats-server refuses {}: {}{}",
            conf.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        checked.push(name);
    }
    checked.sort();
    assert_eq!(checked, ["dev.conf", "hub.conf", "leaf.conf"]);
}
