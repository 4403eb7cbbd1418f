//! Crash safety: two admission replicas (real processes) share the consumer, one is killed
//! with SIGKILL mid-stream, and still every submission is decided exactly once and every
//! admitted command reaches RCT_CMD exactly once; a replica that dies between its decision
//! and its command leaves a submission that is finished as decided, whatever changed since;
//! a redelivered submission is never recorded twice.

mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prost::Message;
use rct_bus::proto::event::Kind;
use rct_bus::{KeyPair, Subject};
use rct_streams::testkit::Server;
use support::{Harness, drain, submission_sequence};

const SUBMISSIONS: usize = 500;

/// A child process killed when dropped, so a failing test leaves nothing behind.
struct Replica(Child);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn replica(config: &std::path::Path, instance: &str, log: &std::path::Path) -> Replica {
    let log = std::fs::File::create(log).unwrap();
    Replica(
        Command::new(env!("CARGO_BIN_EXE_rct-admission"))
            .arg("--config")
            .arg(config)
            .arg("--instance")
            .arg(instance)
            .env("RCT_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[tokio::test]
async fn every_submission_is_decided_once_across_a_replica_kill() {
    let server = Server::start().await;
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    // Redeliver quickly, so the killed replica's in-flight submissions come back soon.
    let mut streams = rct_streams::Config::default();
    streams.admission.ack_wait = Duration::from_secs(2);
    streams.admission.backoff = Vec::new();
    rct_streams::provision(&js, &streams).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate();
    std::fs::write(dir.path().join("admission.key"), key.to_pem()).unwrap();
    let config = dir.path().join("admission.yaml");
    std::fs::write(
        &config,
        format!(
            "nats:\n  servers: [{url}]\ncatalog: {catalog:?}\nsigning_key: {key:?}\ndev_issuer: true\n",
            url = server.url(),
            catalog = support::catalog_path(),
            key = dir.path().join("admission.key"),
        ),
    )
    .unwrap();
    let mut a = replica(&config, "a", &dir.path().join("a.log"));
    let _b = replica(&config, "b", &dir.path().join("b.log"));

    // Log in through whichever replica answers first.
    let harness_like = Login {
        client: client.clone(),
    };
    let alice = harness_like.operator().await;

    let publisher = rct_streams::Publisher::new(js.clone());
    let mut sequences = Vec::with_capacity(SUBMISSIONS);
    for i in 0..SUBMISSIONS {
        // Operations that lock nothing: every one is admitted.
        let submission = support::workload("workloads/restart", &format!("app-{i}"), "SRE-101");
        let operation = submission.operation.parse().unwrap();
        let outgoing = rct_streams::Outgoing::new(
            Subject::submit(&operation),
            submission.command_id.clone(),
            alice.sign(&submission).encode_to_vec().into(),
        );
        match publisher.send(outgoing).await.unwrap() {
            rct_streams::Slot::Written(ack) => sequences.push(ack.sequence),
            rct_streams::Slot::Taken { .. } => unreachable!(),
        }
        if i == SUBMISSIONS / 4 {
            // Mid-stream: SIGKILL one replica, whatever it is doing.
            a.0.kill().unwrap();
            a.0.wait().unwrap();
        }
    }

    // Wait until every submission has its decision.
    let events = js.get_stream("RCT_EVT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let decided = count_decisions(&events).await;
            if decided >= SUBMISSIONS {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "not every submission was decided; replica b's log:\n{}",
            std::fs::read_to_string(dir.path().join("b.log")).unwrap_or_default()
        )
    });

    let decisions = support::decisions_in(&js).await;
    let mut per_submission: HashMap<u64, usize> = HashMap::new();
    for decision in &decisions {
        assert!(
            matches!(decision.kind, Some(Kind::Admitted(_))),
            "refused: {decision:?}"
        );
        *per_submission
            .entry(submission_sequence(decision).unwrap())
            .or_default() += 1;
    }
    for sequence in &sequences {
        assert_eq!(
            per_submission.get(sequence),
            Some(&1),
            "submission {sequence}"
        );
    }
    assert_eq!(decisions.len(), SUBMISSIONS);

    // The kill hit work in flight: submissions the killed replica held unacknowledged were
    // delivered again (a delivery count above the submissions says so).
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(rct_streams::topology::ADMISSION_CONSUMER, "RCT_SUBMIT")
        .await
        .unwrap();
    let mut consumer = consumer;
    let deliveries = consumer.info().await.unwrap().delivered.consumer_sequence;
    assert!(
        deliveries > SUBMISSIONS as u64,
        "no submission was delivered again ({deliveries} deliveries): the kill hit nothing"
    );

    // Every admitted command is in RCT_CMD exactly once, the very set admitted (possibly
    // after a moment: the decision can land before its command). A count alone would pass
    // a duplicate and a missing one.
    let admitted: std::collections::BTreeSet<String> =
        decisions.iter().map(|d| d.command_id.clone()).collect();
    assert_eq!(admitted.len(), SUBMISSIONS);
    let mut commands = js.get_stream("RCT_CMD").await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        while commands.info().await.unwrap().state.messages < SUBMISSIONS as u64 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("every admitted command is published");
    let mut published: HashMap<String, usize> = HashMap::new();
    for id in command_ids(&commands, key.public()).await {
        *published.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = published.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "published more than once: {twice:?}");
    let published: std::collections::BTreeSet<String> = published.into_keys().collect();
    assert_eq!(
        published, admitted,
        "RCT_CMD holds exactly the admitted commands"
    );
}

/// The command id of every message in RCT_CMD, from the commands themselves (each verified
/// as signed by `admission`).
async fn command_ids(
    stream: &async_nats::jetstream::stream::Stream,
    admission: &rct_bus::PublicKey,
) -> Vec<String> {
    use async_nats::jetstream::consumer::pull;
    use futures::StreamExt;
    let consumer = stream
        .create_consumer(pull::OrderedConfig::default())
        .await
        .unwrap();
    let total = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.unwrap();
    let mut ids = Vec::new();
    while (ids.len() as u64) < total {
        let message = messages.next().await.unwrap().unwrap();
        let command: rct_bus::proto::Command = rct_bus::Unverified::decode(&message.payload)
            .unwrap()
            .verify_with(admission, rct_bus::Purpose::Command)
            .unwrap()
            .decode()
            .unwrap();
        ids.push(command.command_id);
    }
    ids
}

async fn count_decisions(events: &async_nats::jetstream::stream::Stream) -> usize {
    use futures::StreamExt;
    let events = events.clone();
    let subjects = events
        .info_with_subjects("rct.evt.*.*.*.decision")
        .await
        .unwrap();
    futures::pin_mut!(subjects);
    let mut total = 0;
    while let Some(entry) = subjects.next().await {
        total += entry.unwrap().1;
    }
    total
}

struct Login {
    client: async_nats::Client,
}

impl Login {
    async fn operator(&self) -> support::Operator {
        use rct_bus::proto;
        let request = |subject: Subject, body: Vec<u8>| {
            let client = self.client.clone();
            async move {
                loop {
                    match client
                        .request(subject.to_string(), body.clone().into())
                        .await
                    {
                        Ok(reply) => break reply.payload,
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        };
        let token = proto::DevTokenResponse::decode(
            request(
                Subject::DevToken,
                proto::DevTokenRequest {
                    user: "alice".into(),
                    email: String::new(),
                    groups: vec!["sre_team".into()],
                }
                .encode_to_vec(),
            )
            .await,
        )
        .unwrap();
        let Some(proto::dev_token_response::Result::IdToken(token)) = token.result else {
            panic!("no dev token");
        };
        let session = KeyPair::generate();
        let login = proto::LoginResponse::decode(
            request(
                Subject::Login,
                proto::LoginRequest {
                    id_token: token,
                    session_public_key: session.public().to_bytes().to_vec(),
                    client: None,
                }
                .encode_to_vec(),
            )
            .await,
        )
        .unwrap();
        let Some(proto::login_response::Result::Certificate(certificate)) = login.result else {
            panic!("login refused");
        };
        support::Operator {
            session,
            certificate: certificate.token,
        }
    }
}

/// A replica recorded the admission and died before publishing the command. By the time the
/// submission comes back, the operator's certificate has expired and the catalog has changed
/// (another timeout, another default): the command is published exactly as it was admitted,
/// not re-decided (which refused it, recorded a second decision and stranded the command).
#[tokio::test]
async fn an_admitted_command_is_published_as_decided_after_its_certificate_expired() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.yaml");
    let example = std::fs::read_to_string(support::catalog_path()).unwrap();
    std::fs::write(&catalog, &example).unwrap();
    let path = catalog.clone();
    let mut h = Harness::start_with(move |c| {
        c.catalog = path.clone();
        c.certificate_ttl = Duration::from_secs(1);
    })
    .await;
    let alice = h.operator("alice", &["sre_team"]).await;
    h.stop_admission().await;

    let submission = drain("prod-3");
    let sequence = h.submit(&alice, &submission).await;
    let rct_admission::decide::Verdict::Admit(admitted) = h.decide_and_die(sequence).await else {
        panic!("the dead replica did not admit it");
    };

    // The certificate expires (its 1 s life plus admission's leeway) ...
    let certificates = h.replica_policy("admission/probe").certificates;
    tokio::time::timeout(Duration::from_secs(30), async {
        while certificates.verify(&alice.certificate).is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the certificate expires");
    // ... and the catalog changes.
    let changed = example.replace("timeout: 15m", "timeout: 20m").replace(
        "keep_percent: { type: integer, min: 0, max: 100, default: 0 }",
        "keep_percent: { type: integer, min: 0, max: 100, default: 10 }",
    );
    assert_ne!(changed, example);
    std::fs::write(&catalog, changed).unwrap();

    h.start_admission().await;
    let command = h.command_on("rct.cmd.traffic.prod-3.drain-cluster").await;
    assert_eq!(
        command.payload, admitted.command,
        "the command is the one admitted, byte for byte"
    );
    h.submissions_settled().await;
    let decisions = h.decisions().await;
    assert_eq!(decisions.len(), 1, "{decisions:#?}");
    assert_eq!(decisions[0].source, "admission/dead");
    assert_eq!(h.commands().await, 1);
}

/// Garbage is recorded under an id of admission's choosing. It was a fresh random one on
/// every delivery, so a lost acknowledgement recorded the same garbage twice.
#[tokio::test]
async fn a_redelivered_garbage_submission_is_recorded_once() {
    let mut h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let garbage = h
        .publish_raw(
            "rct.submit.traffic.drain-cluster",
            "garbage-1",
            b"garbage".to_vec(),
        )
        .await;
    // A submission whose command id is taken is recorded elsewhere too.
    let first = drain("prod-1");
    h.submit(&alice, &first).await;
    let mut replay = drain("prod-2");
    replay.command_id = first.command_id.clone();
    // Under another Nats-Msg-Id, or RCT_SUBMIT itself would drop it as a duplicate.
    let taken = h
        .publish_raw(
            "rct.submit.traffic.drain-cluster",
            "replay-1",
            alice.sign(&replay).encode_to_vec(),
        )
        .await;
    let garbage_decision = h.decision(garbage).await;
    let taken_decision = h.decision(taken).await;

    h.redeliver_everything().await;
    h.submissions_settled().await;

    let decisions = h.decisions().await;
    for (sequence, recorded) in [(garbage, garbage_decision), (taken, taken_decision)] {
        let of_it: Vec<_> = decisions
            .iter()
            .filter(|d| submission_sequence(d) == Some(sequence))
            .collect();
        assert_eq!(of_it.len(), 1, "submission {sequence}: {of_it:#?}");
        assert_eq!(of_it[0].command_id, recorded.command_id);
    }
    assert_eq!(decisions.len(), 3, "{decisions:#?}");
    assert_eq!(h.commands().await, 1);
}
