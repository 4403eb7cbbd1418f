//! Admission key rotation, end to end, as docs/OPERATING.md describes it: add the new key to
//! the agents' trust → the agents reload it → admission switches (operators' certificates
//! from the old key still count) → the old key is retired, and a command signed with it is
//! refused with a clear event.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rct_bus::proto::{self, event::Kind};
use rct_bus::{KeyPair, Unverified};
use rct_streams::replay::{self, Filter};
use rct_streams::testkit::{free_port, http_until};
use rct_streams::{Outgoing, Publisher};
use support::Hub;
use tokio_util::sync::CancellationToken;

async fn drain(operator: &Arc<support::Operator>) -> String {
    let op = operator.clone();
    tokio::task::spawn_blocking(move || op.drain("prod-1"))
        .await
        .unwrap()
}

/// The key ids of the commands in RCT_CMD, in order, and the last command's bytes.
async fn command_keys(js: &async_nats::jetstream::Context) -> (Vec<String>, bytes::Bytes) {
    let mut stream = js.get_stream("RCT_CMD").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut keys = Vec::new();
    let mut bytes = bytes::Bytes::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        keys.push(
            Unverified::decode(&message.payload)
                .unwrap()
                .key_id()
                .to_owned(),
        );
        bytes = message.payload;
    }
    (keys, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_end_to_end_and_the_retired_key_refused() {
    let hub = Hub::start().await;
    hub.provision().await;
    let dir = hub.dir.path().to_owned();
    let (old, new) = (KeyPair::generate(), KeyPair::generate());
    std::fs::write(dir.join("old.key"), old.to_pem()).unwrap();
    std::fs::write(dir.join("old.pub"), old.public().to_pem()).unwrap();
    std::fs::write(dir.join("new.key"), new.to_pem()).unwrap();
    let bundle = dir.join("trusted.pem");
    std::fs::write(&bundle, old.public().to_pem()).unwrap();

    let first = CancellationToken::new();
    let (_, first_task) = hub
        .admission_with(&first, |c| c.signing_key = dir.join("old.key"))
        .await;
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agents = CancellationToken::new();
    let agent = rct_agents::Config {
        nats: hub.connection("agent_traffic_prod1", "_INBOX_agent.traffic.prod-1"),
        instance: "rotating".into(),
        trusted_keys: vec![bundle.clone()],
        trust_reload: Duration::from_millis(200),
        heartbeat: Duration::from_secs(1),
        telemetry: rct_streams::telemetry::Config {
            listen: Some(address),
        },
        ..rct_agents::Config::default()
    };
    support::spawn_traffic_agent(agent, Default::default(), &agents).await;
    let operator = Arc::new(hub.operator());
    let op = operator.clone();
    tokio::task::spawn_blocking(move || op.login())
        .await
        .unwrap();
    assert!(drain(&operator).await.contains("succeeded"));
    let trusted = |n: usize| {
        move |status: u16, body: &str| {
            status == 200 && body.contains(&format!("rct_agent_trusted_keys {n}\n"))
        }
    };
    http_until(address, "/metrics", trusted(1)).await;

    // 1. The agents trust old and new.
    std::fs::write(
        &bundle,
        format!("{}{}", old.public().to_pem(), new.public().to_pem()),
    )
    .unwrap();
    http_until(address, "/metrics", trusted(2)).await;

    // 2. Admission switches to the new key; operators' certificates from the old one count
    // until they expire (no new login here).
    first.cancel();
    first_task.await.unwrap();
    let second = CancellationToken::new();
    hub.admission_with(&second, |c| {
        c.signing_key = dir.join("new.key");
        c.previous_keys = vec![dir.join("old.pub")];
    })
    .await;
    assert!(drain(&operator).await.contains("succeeded"));

    let admin = hub.connection("admin", "_INBOX_admin");
    let js = admin.jetstream(admin.connect("admin", false).await.unwrap());
    let (keys, _) = command_keys(&js).await;
    assert_eq!(
        keys,
        [old.id().to_string(), new.id().to_string()],
        "the first command signed with the old key, the second with the new"
    );

    // 3. The old key is retired. A command it signed (a replay, or a replica left on the
    // old key) is refused, on record, and not run.
    std::fs::write(&bundle, new.public().to_pem()).unwrap();
    http_until(address, "/metrics", trusted(1)).await;
    let stream = js.get_stream("RCT_CMD").await.unwrap();
    let first_command = stream.get_raw_message(1).await.unwrap();
    let replayed: proto::Command = Unverified::decode(&first_command.payload)
        .unwrap()
        .verify_with(old.public(), rct_bus::Purpose::Command)
        .unwrap()
        .decode()
        .unwrap();
    Publisher::new(js.clone())
        .send(Outgoing::new(
            first_command.subject.to_string(),
            "replayed-old-key",
            first_command.payload.clone(),
        ))
        .await
        .unwrap();
    let refusal = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let records = replay::history(&js, &Filter::default())
                .await
                .unwrap()
                .filter_map(|r| async move { r.ok() })
                .collect::<Vec<_>>()
                .await;
            if let Some(message) = records.iter().find_map(|r| match &r.event.kind {
                Some(Kind::Failed(f)) if f.code == "refused" => Some(f.message.clone()),
                _ => None,
            }) {
                return message;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the replayed command was never refused");
    assert!(
        refusal.contains(&old.id().to_string()) && refusal.contains("does not trust"),
        "{refusal}"
    );
    let history = replay::command_history(&js, replayed.command_id.parse().unwrap())
        .await
        .unwrap();
    let starts = history
        .iter()
        .filter(|r| matches!(r.event.kind, Some(Kind::Started(_))))
        .count();
    assert_eq!(starts, 1, "only the original run: {history:#?}");
    // The replay reuses a command that already ran, so its journal alone would stop it: a
    // fresh command signed with the retired key shows that trust refuses it.
    let mut fresh = replayed.clone();
    fresh.command_id = rct_bus::CommandId::generate().to_string();
    let signed = old.sign(
        rct_bus::Purpose::Command,
        prost::Message::encode_to_vec(&fresh),
    );
    Publisher::new(js.clone())
        .send(Outgoing::new(
            first_command.subject.to_string(),
            fresh.command_id.clone(),
            prost::Message::encode_to_vec(&signed).into(),
        ))
        .await
        .unwrap();
    let fresh_id: rct_bus::CommandId = fresh.command_id.parse().unwrap();
    let noted = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let history = replay::command_history(&js, fresh_id).await.unwrap();
            if let Some(note) = history
                .iter()
                .find_map(|r| rct_bus::refusal_note(&r.event).map(|n| n.reason.to_owned()))
            {
                return (note, history);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the fresh command signed with the retired key was never refused");
    let (note, history) = noted;
    assert!(note.contains("does not trust"), "{note}");
    assert!(
        history
            .iter()
            .all(|r| !matches!(r.event.kind, Some(Kind::Started(_)))),
        "a command signed with the retired key started: {history:#?}"
    );
    second.cancel();
    agents.cancel();
}
