//! Replay of RCT_EVT against a real server: by command, by time range with filters, and
//! history then live.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use rct_bus::CommandId;
use rct_streams::replay::{self, Filter, Item};
use rct_streams::testkit::Server;
use rct_streams::{CommandState, Config, Outgoing, Phase, Publisher, Slot, provision};
use support::{admitted, event, progress, started, succeeded, tower};
use time::OffsetDateTime;

async fn setup() -> (Server, async_nats::jetstream::Context, Publisher) {
    let server = Server::start().await;
    let js = server.jetstream().await;
    provision(&js, &Config::default()).await.unwrap();
    let publisher = Publisher::new(js.clone());
    (server, js, publisher)
}

/// Publishes `n` progress events for a fresh command and returns it with their sequences.
async fn burst(
    publisher: &Publisher,
    tower_name: &str,
    target: &str,
    n: u64,
) -> (CommandId, Vec<u64>) {
    let id = CommandId::generate();
    let mut sequences = Vec::new();
    for i in 0..n {
        let e = event(id, target, progress(i as u32));
        let Slot::Written(ack) = publisher.event(&tower(tower_name), &e, i).await.unwrap() else {
            panic!("progress is never single-slot");
        };
        sequences.push(ack.sequence);
    }
    (id, sequences)
}

async fn collect(js: &async_nats::jetstream::Context, filter: &Filter) -> Vec<u64> {
    replay::history(js, filter)
        .await
        .unwrap()
        .map(|r| r.unwrap().sequence)
        .collect()
        .await
}

/// When the server stored the message with `sequence`.
async fn stored_at(js: &async_nats::jetstream::Context, sequence: u64) -> OffsetDateTime {
    replay::history(js, &Filter::default())
        .await
        .unwrap()
        .map(|r| r.unwrap())
        .filter(|r| std::future::ready(r.sequence == sequence))
        .next()
        .await
        .expect("the message is stored")
        .published
}

#[tokio::test]
async fn a_time_range_returns_exactly_its_events_in_order() {
    let (_server, js, publisher) = setup().await;
    // Events just outside the range on both sides: the exact comparison below excludes them.
    burst(&publisher, "traffic", "prod-1", 3).await;
    let (_, inside_a) = burst(&publisher, "traffic", "prod-1", 4).await;
    let (_, inside_b) = burst(&publisher, "workloads", "_", 2).await;
    let (_, after) = burst(&publisher, "traffic", "prod-2", 3).await;
    // The range's ends are the server's own timestamps of its first and last events.
    let since = stored_at(&js, inside_a[0]).await;
    let until = stored_at(&js, *inside_b.last().unwrap()).await;

    let range = Filter {
        since: Some(since),
        until: Some(until),
        ..Filter::default()
    };
    let expected: Vec<u64> = inside_a.iter().chain(&inside_b).copied().collect();
    assert_eq!(collect(&js, &range).await, expected);

    // Filters narrow within the range.
    let traffic = Filter {
        tower: Some(tower("traffic")),
        ..range.clone()
    };
    assert_eq!(collect(&js, &traffic).await, inside_a);
    let prod2 = Filter {
        target: Some("prod-2".parse().unwrap()),
        since: Some(since),
        ..Filter::default()
    };
    assert_eq!(collect(&js, &prod2).await, after);

    // An empty range is empty, and ends.
    let nothing = Filter {
        since: Some(OffsetDateTime::now_utc() + time::Duration::hours(1)),
        ..Filter::default()
    };
    assert!(collect(&js, &nothing).await.is_empty());
}

#[tokio::test]
async fn a_command_history_folds_into_its_state() {
    let (_server, js, publisher) = setup().await;
    let id = CommandId::generate();
    let traffic = tower("traffic");
    burst(&publisher, "traffic", "prod-1", 2).await; // another command's noise
    for (n, kind) in [admitted(), started(), progress(50), succeeded()]
        .into_iter()
        .enumerate()
    {
        publisher
            .event(&traffic, &event(id, "prod-1", kind), n as u64)
            .await
            .unwrap();
    }

    let records = replay::command_history(&js, id).await.unwrap();
    assert_eq!(records.len(), 4);
    assert!(records.iter().all(|r| r.command_id == id));
    assert!(records.windows(2).all(|w| w[0].sequence < w[1].sequence));
    let state = CommandState::fold(&records).unwrap();
    assert_eq!(state.phase, Phase::Succeeded);
    assert_eq!(state.started.unwrap().agent, "agent-1");

    assert!(
        replay::command_history(&js, CommandId::generate())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn history_then_follow_sees_what_is_published_after_it_started() {
    let (_server, js, publisher) = setup().await;
    let (id, stored) = burst(&publisher, "traffic", "prod-1", 3).await;
    let mut follow = replay::follow(&js, &Filter::command(id)).await.unwrap();

    let mut seen = Vec::new();
    while let Item::Event(record) = follow.next().await.unwrap().unwrap() {
        seen.push(record.sequence);
    }
    assert_eq!(seen, stored);

    let mut live = Vec::new();
    for n in 3..6 {
        let e = event(id, "prod-1", progress(n as u32));
        if let Slot::Written(ack) = publisher.event(&tower("traffic"), &e, n).await.unwrap() {
            live.push(ack.sequence);
        }
    }
    let mut seen_live = Vec::new();
    while seen_live.len() < live.len() {
        let item = tokio::time::timeout(Duration::from_secs(30), follow.next())
            .await
            .expect("live events arrive")
            .unwrap()
            .unwrap();
        match item {
            Item::Event(record) => seen_live.push(record.sequence),
            Item::CaughtUp => panic!("caught up twice"),
        }
    }
    assert_eq!(seen_live, live);
}

#[tokio::test]
async fn following_an_empty_history_is_caught_up_at_once() {
    let (_server, js, _publisher) = setup().await;
    let mut follow = replay::follow(&js, &Filter::command(CommandId::generate()))
        .await
        .unwrap();
    assert_eq!(follow.next().await.unwrap().unwrap(), Item::CaughtUp);
}

#[tokio::test]
async fn a_malformed_message_is_reported_and_replay_goes_on() {
    let (_server, js, publisher) = setup().await;
    let id = CommandId::generate();
    let decision = event(id, "prod-1", admitted());
    publisher
        .event(&tower("traffic"), &decision, 0)
        .await
        .unwrap();
    let garbage = Outgoing::new(
        format!("rct.evt.traffic.prod-1.{id}.log"),
        "garbage",
        Bytes::from_static(b"\xff\xff\xff not protobuf"),
    );
    publisher.send(garbage).await.unwrap();
    publisher
        .event(&tower("traffic"), &event(id, "prod-1", started()), 0)
        .await
        .unwrap();

    let items: Vec<_> = replay::history(&js, &Filter::command(id))
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(items.len(), 3);
    assert!(matches!(
        items[1],
        Err(rct_streams::Error::Malformed { .. })
    ));
    assert!(items[2].is_ok());
    assert_eq!(replay::command_history(&js, id).await.unwrap().len(), 2);
}

/// A stored message may carry headers named like the server's own (a writer can set any
/// header): they neither hide events from replay nor make it fail.
#[tokio::test]
async fn headers_a_writer_made_up_do_not_disturb_replay() {
    let (_server, js, publisher) = setup().await;
    let (_, before) = burst(&publisher, "traffic", "prod-1", 3).await;
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in [
        ("Nats-Last-Sequence", "1"),
        ("Nats-Num-Pending", "0"),
        ("Nats-Sequence", "999"),
    ] {
        headers.insert(name, value);
    }
    let id = CommandId::generate();
    let subject = format!("rct.evt.traffic.prod-1.{id}.log");
    let odd = js
        .publish_with_headers(
            subject,
            headers,
            prost::Message::encode_to_vec(&event(id, "prod-1", progress(1))).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    let (_, after) = burst(&publisher, "traffic", "prod-1", 3).await;
    let stored: Vec<u64> = replay::history(&js, &Filter::default())
        .await
        .unwrap()
        .map(|r| match r {
            Ok(r) => r.sequence,
            Err(rct_streams::Error::Malformed { sequence, .. }) => sequence,
            Err(e) => panic!("replay failed: {e}"),
        })
        .collect()
        .await;
    let expected: Vec<u64> = before.into_iter().chain([odd]).chain(after).collect();
    assert_eq!(stored, expected);
}

/// Every live agent is listed, however many there are (the server answers a `multi_last`
/// for at most 1,024 subjects), and a deleted one is not.
#[tokio::test]
async fn every_presence_is_listed_however_many() {
    let (_server, js, _) = setup().await;
    let bucket = js
        .get_key_value(rct_streams::topology::AGENTS_BUCKET)
        .await
        .unwrap();
    for i in 0..1100 {
        bucket
            .put(format!("traffic.t{i}.a"), "{}".into())
            .await
            .unwrap();
    }
    // Written again after the first: listed once, in its new place.
    bucket
        .put("traffic.t0.a", "{\"again\":1}".into())
        .await
        .unwrap();
    bucket.delete("traffic.t1.a").await.unwrap();
    let live = rct_streams::journal::presences(&js).await.unwrap();
    assert_eq!(live.len(), 1099);
    assert!(!live.iter().any(|(key, _)| key == "traffic.t1.a"));
    let (last, value) = live.last().unwrap();
    assert_eq!(
        (last.as_str(), value.as_ref()),
        ("traffic.t0.a", &b"{\"again\":1}"[..])
    );
}
