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
