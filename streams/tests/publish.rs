//! Publishing against a real server: single-slot subjects hold one message whatever races,
//! and retried publishes are stored once.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use rct_bus::{CommandId, EventKind, Subject};
use rct_streams::testkit::Server;
use rct_streams::topology::{COMMAND_STREAM, EVENT_STREAM};
use rct_streams::{Config, Outgoing, Publisher, Retry, Slot, provision};
use support::{admitted, event, progress, started, succeeded, tower};

async fn provisioned() -> (Server, jetstream::Context) {
    let server = Server::start().await;
    let js = server.jetstream().await;
    provision(&js, &Config::default()).await.unwrap();
    (server, js)
}

async fn count(js: &jetstream::Context, stream: &str, subject: &str) -> usize {
    let stream = js.get_stream(stream).await.unwrap();
    let info = stream.info_with_subjects(subject).await.unwrap();
    let mut total = 0;
    futures::pin_mut!(info);
    while let Some(entry) = futures::StreamExt::next(&mut info).await {
        total += entry.unwrap().1;
    }
    total
}

/// A short ack timeout and many attempts: an outage or a lost ack outlasts one attempt, so
/// the publisher must retry.
fn prod1() -> rct_bus::Target {
    "prod-1".parse().unwrap()
}

fn patient(client: async_nats::Client) -> (jetstream::Context, Publisher) {
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(500))
        .build(client);
    let publisher = Publisher::new(js.clone()).with_retry(Retry {
        attempts: 60,
        pause: Duration::from_millis(100),
        max_pause: Duration::from_millis(500),
    });
    (js, publisher)
}

/// A fresh command id and the subject of a drain of prod-1.
fn drain_command() -> (CommandId, String) {
    let operation = "traffic/drain-cluster".parse().unwrap();
    let subject = Subject::command(&operation, &"prod-1".parse().unwrap()).to_string();
    (CommandId::generate(), subject)
}

#[tokio::test]
async fn twenty_racing_claims_have_exactly_one_winner() {
    let (_server, js) = provisioned().await;
    let publisher = Publisher::new(js.clone());
    let id = CommandId::generate();
    let traffic = tower("traffic");

    let mut tasks = Vec::new();
    for agent in 0..20 {
        let publisher = publisher.clone();
        let traffic = traffic.clone();
        tasks.push(tokio::spawn(async move {
            let mut claim = event(id, "prod-1", started());
            claim.source = format!("agent-{agent}");
            // Each racer writes under its own id, as distinct agents would.
            let outgoing = Outgoing::event(&traffic, &claim, agent).unwrap();
            publisher.send(outgoing).await.unwrap()
        }));
    }
    let mut won = 0;
    let mut taken = 0;
    for task in tasks {
        match task.await.unwrap() {
            Slot::Written(_) => won += 1,
            Slot::Taken { .. } => taken += 1,
        }
    }
    assert_eq!((won, taken), (1, 19));
    let subject = Subject::event(&traffic, &prod1(), id, EventKind::Claim).to_string();
    assert_eq!(count(&js, EVENT_STREAM, &subject).await, 1);
}

#[tokio::test]
async fn decisions_and_outcomes_are_single_slot_progress_is_not() {
    let (_server, js) = provisioned().await;
    let publisher = Publisher::new(js.clone());
    let id = CommandId::generate();
    let traffic = tower("traffic");

    for (kind, single) in [
        (admitted(), true),
        (succeeded(), true),
        (progress(10), false),
    ] {
        let e = event(id, "prod-1", kind);
        assert!(matches!(
            publisher.event(&traffic, &e, 0).await.unwrap(),
            Slot::Written(_)
        ));
        let second = publisher.event(&traffic, &e, 1).await.unwrap();
        assert_eq!(matches!(second, Slot::Taken { .. }), single, "{e:?}");
    }
}

/// A publish retried after a lost acknowledgement carries the same id. The server refuses it
/// on the expected sequence before looking at the id, so the publisher must recognise the
/// slot's holder as its own write, not a rival's.
#[tokio::test]
async fn a_retried_single_slot_publish_is_recognised_as_ours() {
    let (_server, js) = provisioned().await;
    let publisher = Publisher::new(js.clone());
    let id = CommandId::generate();
    let decision = event(id, "prod-1", admitted());

    let first = publisher
        .event(&tower("traffic"), &decision, 0)
        .await
        .unwrap();
    let again = publisher
        .event(&tower("traffic"), &decision, 0)
        .await
        .unwrap();
    let (Slot::Written(first), Slot::Written(again)) = (first, again) else {
        panic!("a retry with the same id must not be refused as taken");
    };
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(first.sequence, again.sequence);
}

#[tokio::test]
async fn a_publish_during_a_server_restart_is_retried_until_stored() {
    let (mut server, _) = provisioned().await;
    // A short ack timeout makes the outage outlast it, so the publisher must retry.
    let client = server.client().await;
    let (js, publisher) = patient(client);
    let (id, subject) = drain_command();

    server.kill();
    let publishing = {
        let outgoing = Outgoing::new(subject.clone(), id.msg_id(), Bytes::from_static(b"cmd"));
        tokio::spawn(async move { publisher.send(outgoing).await })
    };
    // Let the first attempt go out into the void and time out at least once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.start_again().await;

    let slot = tokio::time::timeout(Duration::from_secs(60), publishing)
        .await
        .expect("the publish completes after the restart")
        .unwrap()
        .unwrap();
    assert!(matches!(slot, Slot::Written(_)));
    assert_eq!(count(&js, COMMAND_STREAM, &subject).await, 1);
    let stored = js
        .get_stream(COMMAND_STREAM)
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    assert_eq!(stored.payload.as_ref(), b"cmd");
}

/// A TCP relay to the server on `to` that, while held, lets the client's bytes through but
/// throws away what the server says, and on release closes the connections it held so the
/// client reconnects: a message stored whose acknowledgement never arrives.
async fn relay(to: u16) -> (u16, tokio::sync::watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (hold, held) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let up = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            let mut held = held.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                let mut dropped = false;
                loop {
                    tokio::select! {
                        read = server_read.read(&mut buffer) => {
                            let Ok(n @ 1..) = read else { break };
                            if *held.borrow() {
                                dropped = true;
                            } else if client_write.write_all(&buffer[..n]).await.is_err() {
                                break;
                            }
                        }
                        changed = held.changed() => {
                            // Released after bytes were thrown away: this connection is
                            // broken, close it.
                            if changed.is_err() || (!*held.borrow() && dropped) {
                                break;
                            }
                        }
                    }
                }
                up.abort();
            });
        }
    });
    (port, hold)
}

/// The server stores the message and its acknowledgement is lost: the publisher's retry
/// (the same `Nats-Msg-Id`) is deduplicated by the server, so one copy is stored, and the
/// publisher learns it was already written.
#[tokio::test]
async fn a_publish_whose_ack_is_lost_is_stored_once_and_known_as_written() {
    let (server, admin) = provisioned().await;
    let (port, hold) = relay(server.port()).await;
    let client = async_nats::ConnectOptions::new()
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap();
    let (_, publisher) = patient(client);
    let (id, subject) = drain_command();

    hold.send_replace(true);
    let publishing = {
        let outgoing = Outgoing::new(subject.clone(), id.msg_id(), Bytes::from_static(b"cmd"));
        tokio::spawn(async move { publisher.send(outgoing).await })
    };
    // Stored, while its acknowledgement is thrown away...
    let started = std::time::Instant::now();
    while count(&admin, COMMAND_STREAM, &subject).await == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... for longer than the publisher waits for one, so it must retry.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !publishing.is_finished(),
        "acknowledged while the acks were held"
    );
    hold.send_replace(false);

    let slot = tokio::time::timeout(Duration::from_secs(60), publishing)
        .await
        .expect("the publish completes once acks get through")
        .unwrap()
        .unwrap();
    let Slot::Written(ack) = slot else {
        panic!("not written: {slot:?}");
    };
    assert!(
        ack.duplicate,
        "the retry was recognised as the stored message: {ack:?}"
    );
    assert_eq!(count(&admin, COMMAND_STREAM, &subject).await, 1);
}

#[tokio::test]
async fn publishing_to_a_subject_no_stream_covers_is_an_error_not_a_hang() {
    let (_server, js) = provisioned().await;
    let publisher = Publisher::new(js).with_retry(Retry {
        attempts: 2,
        pause: Duration::from_millis(10),
        max_pause: Duration::from_millis(10),
    });
    let error = publisher
        .send(Outgoing::new("nowhere.at.all", "x", Bytes::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(error, rct_streams::Error::Publish { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn events_without_a_kind_are_refused_before_sending() {
    let (_server, js) = provisioned().await;
    let publisher = Arc::new(Publisher::new(js));
    let mut empty = event(CommandId::generate(), "prod-1", started());
    empty.kind = None;
    assert!(matches!(
        publisher.event(&tower("traffic"), &empty, 0).await,
        Err(rct_streams::Error::InvalidEvent { .. })
    ));
}

/// Ending a command without running it goes through its claim slot: a rival's claim that
/// came first wins (nothing is recorded), and a retry of our own end is ours.
#[tokio::test]
async fn ending_a_command_unrun_takes_its_claim_first() {
    use rct_bus::proto::{self, event::Kind};
    use rct_streams::journal::{self, Ended};
    let (_server, js) = provisioned().await;
    let publisher = Publisher::new(js.clone());
    let traffic = tower("traffic");
    let unrun = |id| {
        event(
            id,
            "prod-1",
            Kind::Started(proto::Started {
                agent: "me".into(),
                without_running: true,
                ..Default::default()
            }),
        )
    };
    let expired = |id| event(id, "prod-1", Kind::Expired(Default::default()));

    // A rival claimed it first: nothing is ended.
    let claimed = CommandId::generate();
    publisher
        .event(&traffic, &event(claimed, "prod-1", started()), "rival")
        .await
        .unwrap();
    let ended = journal::end_unrun(
        &publisher,
        &traffic,
        &unrun(claimed),
        &expired(claimed),
        "me",
    )
    .await
    .unwrap();
    assert_eq!(ended, Ended::ClaimedElsewhere);
    let look = journal::look(&js, &traffic, &prod1(), claimed)
        .await
        .unwrap();
    assert_eq!(look.holder(), Some("agent-1"));
    assert!(look.outcome.is_none());

    // Unclaimed: claimed unrun, then ended; doing it again (a lost ack) is ours.
    let free = CommandId::generate();
    for _ in 0..2 {
        let ended = journal::end_unrun(&publisher, &traffic, &unrun(free), &expired(free), "me")
            .await
            .unwrap();
        assert_eq!(ended, Ended::Recorded);
    }
    let look = journal::look(&js, &traffic, &prod1(), free).await.unwrap();
    assert!(look.started().unwrap().without_running);
    assert!(matches!(look.outcome.unwrap().kind, Some(Kind::Expired(_))));
    assert_eq!(
        count(
            &js,
            EVENT_STREAM,
            &Subject::event(&traffic, &prod1(), free, EventKind::Outcome).to_string()
        )
        .await,
        1
    );
}

/// A writer that knows how rct names its messages publishes first, on another subject, under
/// the id of a message rct is about to write (a progress line under the id of the command's
/// outcome, or a log line under the id of a progress): the server answers rct's write as a
/// duplicate. The publisher checks the stored message, finds it on another subject, and
/// stores its message all the same, under a digest id; writing it again is a duplicate of
/// that, stored once. Before, the outcome was silently dropped as a duplicate.
#[tokio::test]
async fn a_message_whose_id_another_took_first_is_stored_all_the_same() {
    let (_server, js) = provisioned().await;
    let publisher = Publisher::new(js.clone());
    let traffic = tower("traffic");
    let id = CommandId::generate();
    let impostor = |on: EventKind, taken: EventKind, n: &str| {
        let fake = event(id, "prod-1", progress(99));
        let subject = Subject::event(&traffic, &prod1(), id, on).to_string();
        Outgoing::new(
            subject,
            id.event_msg_id(taken, n),
            prost::Message::encode_to_vec(&fake).into(),
        )
    };

    for (real, on, n) in [
        (
            event(id, "prod-1", succeeded()),
            EventKind::Progress,
            "agent-1",
        ),
        (event(id, "prod-1", progress(3)), EventKind::Log, "3"),
    ] {
        let kind = EventKind::of(&real).unwrap();
        publisher.send(impostor(on, kind, n)).await.unwrap();
        let subject = Subject::event(&traffic, &prod1(), id, kind).to_string();
        let before = count(&js, EVENT_STREAM, &subject).await;
        let Slot::Written(ack) = publisher.event(&traffic, &real, n).await.unwrap() else {
            panic!("{kind}: its slot is empty, yet it was refused");
        };
        assert!(!ack.duplicate, "{kind} was taken for the impostor: {ack:?}");
        assert_eq!(
            count(&js, EVENT_STREAM, &subject).await,
            before + 1,
            "{kind}"
        );
        // Our own write again (a retry after a lost ack): ours, stored once.
        let Slot::Written(again) = publisher.event(&traffic, &real, n).await.unwrap() else {
            panic!("{kind}: our own retry was taken for a rival's");
        };
        assert_eq!(again.sequence, ack.sequence, "{kind}");
        assert_eq!(
            count(&js, EVENT_STREAM, &subject).await,
            before + 1,
            "{kind}"
        );
    }
    let look = rct_streams::journal::look(&js, &traffic, &prod1(), id)
        .await
        .unwrap();
    assert!(matches!(
        look.outcome.and_then(|o| o.kind),
        Some(rct_bus::proto::event::Kind::Succeeded(_))
    ));
}

/// A command id has one decision whatever tower and target its submissions name: the decision
/// slot spans them all (`Nats-Expected-Last-Subject-Sequence-Subject`), so a second decision
/// under the same id elsewhere is refused by the server itself, however the two race.
#[tokio::test]
async fn a_command_id_has_one_decision_whatever_its_target() {
    let (_server, js) = provisioned().await;
    let publisher = Publisher::new(js.clone());
    let traffic = tower("traffic");
    let id = CommandId::generate();
    let tasks: Vec<_> = [
        (traffic.clone(), "prod-1"),
        (traffic.clone(), "prod-2"),
        (traffic, "prod-3"),
        (tower("workloads"), "_"),
    ]
    .into_iter()
    .map(|(tower, target)| {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            publisher
                .event(&tower, &event(id, target, admitted()), target)
                .await
                .unwrap()
        })
    })
    .collect();
    let mut written = 0;
    for task in tasks {
        if matches!(task.await.unwrap(), Slot::Written(_)) {
            written += 1;
        }
    }
    assert_eq!(written, 1);
    let any = rct_bus::subject::events_of_kind(id, EventKind::Decision);
    assert_eq!(count(&js, EVENT_STREAM, &any).await, 1);
}

/// The streams bound what one message can make them keep for ever: a submission over
/// `MAX_SUBMISSION` or an event over `MAX_MESSAGE` is refused by the server, the publisher says
/// so (a refusal, not "maybe stored"), and nothing is stored. Before, a 1 MB refused submission
/// stayed in RCT_SUBMIT.
#[tokio::test]
async fn a_message_over_its_streams_size_limit_is_refused_and_not_stored() {
    use rct_streams::config::{MAX_MESSAGE, MAX_SUBMISSION};
    use rct_streams::topology::SUBMIT_STREAM;
    let (_server, js) = provisioned().await;
    let publisher = Publisher::new(js.clone());
    let huge = |n: i32| Bytes::from(vec![b'x'; n as usize + 1]);
    let fits = |n: i32| Bytes::from(vec![b'x'; n as usize - 512]);
    let id = CommandId::generate();
    for (subject, stream, limit) in [
        (
            "rct.submit.traffic.drain-cluster".to_owned(),
            SUBMIT_STREAM,
            MAX_SUBMISSION,
        ),
        (
            Subject::event(&tower("traffic"), &prod1(), id, EventKind::Log).to_string(),
            EVENT_STREAM,
            MAX_MESSAGE,
        ),
    ] {
        let refused = publisher
            .send(Outgoing::new(subject.clone(), "too-big", huge(limit)))
            .await
            .unwrap_err();
        assert!(
            matches!(refused, rct_streams::Error::Publish { .. }),
            "{subject}: {refused}"
        );
        assert!(refused.to_string().contains("size"), "{refused}");
        assert_eq!(count(&js, stream, &subject).await, 0, "{subject}");
        publisher
            .send(Outgoing::new(subject.clone(), "fits", fits(limit)))
            .await
            .unwrap();
        assert_eq!(count(&js, stream, &subject).await, 1, "{subject}");
    }
}

/// A single slot's occupant is its first message: one stored after it by a writer that did
/// not ask for an empty slot (anyone with write access to the subject) neither hides it from
/// readers nor makes our own retry look refused.
#[tokio::test]
async fn what_is_appended_to_a_taken_slot_never_replaces_its_occupant() {
    let (_server, js) = provisioned().await;
    let publisher = Publisher::new(js.clone());
    let traffic = tower("traffic");
    let id = CommandId::generate();
    for real in [
        event(id, "prod-1", started()),
        event(id, "prod-1", succeeded()),
    ] {
        let kind = EventKind::of(&real).unwrap();
        let Slot::Written(ack) = publisher.event(&traffic, &real, "agent-1").await.unwrap() else {
            panic!("{kind}: its slot is empty, yet it was refused");
        };
        // Appended without any condition, as a plain publish does.
        let mut forged = real.clone();
        forged.kind = Some(match kind {
            EventKind::Claim => rct_bus::proto::event::Kind::Started(rct_bus::proto::Started {
                agent: "someone-else".into(),
                ..Default::default()
            }),
            _ => rct_bus::proto::event::Kind::Failed(rct_bus::proto::Failed {
                code: "forged".into(),
                message: "written over".into(),
                ..Default::default()
            }),
        });
        let subject = Subject::event(&traffic, &prod1(), id, kind).to_string();
        js.publish(
            subject.clone(),
            prost::Message::encode_to_vec(&forged).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        assert_eq!(count(&js, EVENT_STREAM, &subject).await, 2, "{kind}");
        let held = rct_streams::journal::slot(&js, &traffic, &prod1(), id, kind)
            .await
            .unwrap();
        assert_eq!(
            held.as_ref(),
            Some(&real),
            "{kind}: the slot reads as the appended one"
        );
        // Our own write again (a retry after a lost ack) is still ours.
        let Slot::Written(again) = publisher.event(&traffic, &real, "agent-1").await.unwrap()
        else {
            panic!("{kind}: our own retry was taken for a rival's");
        };
        assert_eq!(again.sequence, ack.sequence, "{kind}");
    }
}
