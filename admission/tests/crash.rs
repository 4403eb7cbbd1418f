//! Crash safety with real processes: two admission replicas share the consumer, one is
//! killed with SIGKILL mid-stream, and still every submission is decided exactly once and
//! every admitted command reaches RCT_CMD exactly once.

mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prost::Message;
use rct_bus::proto::event::Kind;
use rct_bus::{KeyPair, Subject};
use rct_streams::testkit::Server;
use support::{drain, submission_sequence};

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
        let submission = drain(&format!("prod-{}", i % 4 + 1));
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

    // Every admitted command is in RCT_CMD exactly once (possibly after a moment: the
    // decision can land before its command).
    let mut commands = js.get_stream("RCT_CMD").await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        while commands.info().await.unwrap().state.messages < SUBMISSIONS as u64 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("every admitted command is published");
    assert_eq!(
        commands.info().await.unwrap().state.messages,
        SUBMISSIONS as u64
    );
}

async fn count_decisions(events: &async_nats::jetstream::stream::Stream) -> usize {
    use futures::StreamExt;
    let events = events.clone();
    let subjects = events
        .info_with_subjects("rct.evt.*.*.decision")
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
