//! A real nats-server, provisioned, with admission running in-process, and an operator that
//! logs in and submits like the CLI does.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use jsonwebtoken::Algorithm;
use prost::Message;
use rct_admission::identity::{IssuerConfig, KeyConfig};
use rct_admission::{Admission, Config};
use rct_bus::proto::{self, event::Kind};
use rct_bus::{CommandId, KeyPair, OperationName, PublicKey, Purpose, Subject};
use rct_streams::replay::{self, Filter, Item};
use rct_streams::testkit::Server;
use rct_streams::timestamp::from_datetime;
use rct_streams::{Outgoing, Publisher, Slot};
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const IDP: &str = "https://idp.example.com";
pub const RSA_KEY: &str = include_str!("../fixtures/idp-rsa.key");
pub const RSA_PUB: &str = include_str!("../fixtures/idp-rsa.pub");

pub fn catalog_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/catalog.example.yaml")
}

/// The example catalog with `from` written `to`, in a file of its own under `dir`.
pub fn catalog_with(dir: &Path, from: &str, to: &str) -> PathBuf {
    let example = std::fs::read_to_string(catalog_path()).unwrap();
    let changed = example.replace(from, to);
    assert_ne!(changed, example, "{from:?} is not in the example catalog");
    let path = dir.join("catalog.yaml");
    std::fs::write(&path, changed).unwrap();
    path
}

/// An admission replica started by [`Harness::second_replica`].
pub struct Replica {
    stop: CancellationToken,
    task: JoinHandle<Result<(), rct_admission::Error>>,
}

impl Replica {
    /// Stops it, asserting it ran without error.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

pub struct Harness {
    pub server: Server,
    pub js: async_nats::jetstream::Context,
    pub client: async_nats::Client,
    pub dir: tempfile::TempDir,
    pub admission_key: PublicKey,
    pub admission: Option<(
        CancellationToken,
        JoinHandle<Result<(), rct_admission::Error>>,
    )>,
    pub metrics: std::sync::Arc<rct_admission::metrics::Metrics>,
    /// A registered service identity (group sre_team).
    pub service: KeyPair,
    change: Box<dyn Fn(&mut Config) + Send + Sync>,
}

pub fn config(server: &Server, dir: &Path, service: &PublicKey) -> Config {
    Config {
        services: vec![rct_admission::identity::ServiceConfig {
            name: "deployer".into(),
            public_key: service.to_pem(),
            groups: vec!["sre_team".into()],
        }],
        nats: rct_streams::Connection::to([server.url()]),
        instance: "test".into(),
        catalog: catalog_path(),
        signing_key: dir.join("admission.key"),
        generate_key: true,
        dev_issuer: true,
        ..Config::default()
    }
}

/// Admission with the test identity provider (`IDP`, key `k1`) instead of the development
/// issuer: the two never run together.
pub fn idp(config: &mut Config) {
    config.dev_issuer = false;
    config.issuers = vec![IssuerConfig {
        keys: vec![KeyConfig {
            kid: Some("k1".into()),
            pem: Some(RSA_PUB.into()),
            ..KeyConfig::default()
        }],
        ..IssuerConfig::new(IDP, "rct", Algorithm::RS256)
    }];
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with a configuration changed by `change`.
    pub async fn start_with(change: impl Fn(&mut Config) + Send + Sync + 'static) -> Self {
        let server = Server::start().await;
        let client = server.client().await;
        let js = async_nats::jetstream::new(client.clone());
        rct_streams::provision(&js, &rct_streams::Config::default())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut harness = Self {
            admission_key: KeyPair::generate().public().clone(),
            metrics: Default::default(),
            server,
            js,
            client,
            dir,
            admission: None,
            service: KeyPair::generate(),
            change: Box::new(change),
        };
        harness.start_admission().await;
        harness
    }

    pub fn config(&self) -> Config {
        let mut config = config(&self.server, self.dir.path(), self.service.public());
        (self.change)(&mut config);
        config
    }

    pub async fn start_admission(&mut self) {
        let admission = Admission::new(self.config(), self.client.clone()).unwrap();
        self.admission_key = admission.public_key().clone();
        self.metrics = admission.metrics();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(admission.run(shutdown.clone()));
        self.admission = Some((shutdown, task));
        // Ready when it answers: the dev issuer leaves no trace; without it, a refused login
        // probe is on record under tower _auth, like any refused login.
        if self.config().dev_issuer {
            self.dev_token("probe", &[]).await;
        } else {
            let _: proto::LoginResponse = self
                .request(
                    Subject::Login,
                    proto::LoginRequest::default().encode_to_vec(),
                )
                .await;
        }
    }

    pub async fn stop_admission(&mut self) {
        if let Some((shutdown, task)) = self.admission.take() {
            shutdown.cancel();
            task.await.unwrap().unwrap();
        }
    }

    /// The admission signing key (the test plays another admission instance with it).
    pub fn admission_keypair(&self) -> KeyPair {
        KeyPair::from_pem(&std::fs::read_to_string(self.dir.path().join("admission.key")).unwrap())
            .unwrap()
    }

    pub async fn request<M: Message + Default>(&self, subject: Subject, body: Vec<u8>) -> M {
        let reply = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match self
                    .client
                    .request(subject.to_string(), body.clone().into())
                    .await
                {
                    Ok(reply) => break reply,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .expect("admission answers");
        M::decode(reply.payload).unwrap()
    }

    pub async fn dev_token(&self, user: &str, groups: &[&str]) -> String {
        let response: proto::DevTokenResponse = self
            .request(
                Subject::DevToken,
                proto::DevTokenRequest {
                    user: user.into(),
                    email: String::new(),
                    groups: groups.iter().map(|g| g.to_string()).collect(),
                }
                .encode_to_vec(),
            )
            .await;
        match response.result.unwrap() {
            proto::dev_token_response::Result::IdToken(token) => token,
            proto::dev_token_response::Result::Refused(r) => panic!("dev token refused: {r:?}"),
        }
    }

    pub async fn login_with(&self, id_token: &str, session: &KeyPair) -> proto::LoginResponse {
        self.request(
            Subject::Login,
            proto::LoginRequest {
                id_token: id_token.into(),
                session_public_key: session.public().to_bytes().to_vec(),
                client: None,
            }
            .encode_to_vec(),
        )
        .await
    }

    /// A login with `id_token` and a fresh session key, from a connection of its own.
    pub async fn login_from_new_connection(&self, id_token: &str) -> proto::LoginResponse {
        let client = async_nats::connect(self.server.url()).await.unwrap();
        let request = proto::LoginRequest {
            id_token: id_token.into(),
            session_public_key: KeyPair::generate().public().to_bytes().to_vec(),
            client: None,
        };
        let reply = client
            .request(Subject::Login.to_string(), request.encode_to_vec().into())
            .await
            .unwrap();
        proto::LoginResponse::decode(reply.payload).unwrap()
    }

    /// Logs in through the dev issuer.
    pub async fn operator(&self, user: &str, groups: &[&str]) -> Operator {
        let session = KeyPair::generate();
        let token = self.dev_token(user, groups).await;
        let certificate = match self.login_with(&token, &session).await.result.unwrap() {
            proto::login_response::Result::Certificate(c) => c.token,
            proto::login_response::Result::Refused(r) => panic!("login refused: {r:?}"),
        };
        Operator {
            session,
            certificate,
        }
    }

    /// Publishes raw bytes to a submit subject; returns its RCT_SUBMIT sequence.
    pub async fn publish_raw(&self, subject: &str, msg_id: &str, payload: Vec<u8>) -> u64 {
        let outgoing = Outgoing::new(subject, msg_id, Bytes::from(payload));
        match Publisher::new(self.js.clone())
            .send(outgoing)
            .await
            .unwrap()
        {
            Slot::Written(ack) => ack.sequence,
            Slot::Taken { .. } => unreachable!("submissions are not single-slot"),
        }
    }

    /// Publishes a signed submission; returns its RCT_SUBMIT sequence.
    pub async fn submit(&self, operator: &Operator, submission: &proto::Submission) -> u64 {
        let envelope = operator.sign(submission);
        self.publish_envelope(submission, envelope).await
    }

    pub async fn publish_envelope(
        &self,
        submission: &proto::Submission,
        envelope: proto::SignedEnvelope,
    ) -> u64 {
        let operation: OperationName = submission.operation.parse().unwrap();
        self.publish_raw(
            &Subject::submit(&operation).to_string(),
            &submission.command_id,
            envelope.encode_to_vec(),
        )
        .await
    }

    /// Waits for the one decision about the submission stored at `sequence`.
    pub async fn decision(&self, sequence: u64) -> proto::Event {
        let mut events = replay::follow(&self.js, &Filter::default()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(item) = events.next().await {
                if let Item::Event(record) = item.unwrap()
                    && submission_sequence(&record.event) == Some(sequence)
                {
                    return record.event;
                }
            }
            panic!("the event stream ended");
        })
        .await
        .unwrap_or_else(|_| panic!("no decision for submission {sequence}"))
    }

    /// Every decision event stored so far.
    pub async fn decisions(&self) -> Vec<proto::Event> {
        decisions_in(&self.js).await
    }

    /// A second admission replica on the same configuration, deciding alongside the first
    /// until it is stopped.
    pub fn second_replica(&self) -> Replica {
        let other = rct_admission::Admission::new(self.config(), self.client.clone()).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(other.run(stop.clone()));
        Replica { stop, task }
    }

    /// Submits `submission` as `who` and waits for its decision.
    pub async fn decided(&self, who: &Operator, submission: &proto::Submission) -> proto::Event {
        let sequence = self.submit(who, submission).await;
        self.decision(sequence).await
    }

    /// How many messages RCT_CMD holds.
    pub async fn commands(&self) -> u64 {
        let mut stream = self.js.get_stream("RCT_CMD").await.unwrap();
        stream.info().await.unwrap().state.messages
    }
}

/// Every decision event stored so far.
pub async fn decisions_in(js: &async_nats::jetstream::Context) -> Vec<proto::Event> {
    replay::history(js, &Filter::default())
        .await
        .unwrap()
        .filter_map(|r| async move {
            let r = r.unwrap();
            (r.kind == rct_bus::EventKind::Decision).then_some(r.event)
        })
        .collect()
        .await
}

pub fn submission_sequence(event: &proto::Event) -> Option<u64> {
    match event.kind.as_ref()? {
        Kind::Admitted(a) => a.request.as_ref().map(|r| r.submission_sequence),
        Kind::Rejected(r) => r.request.as_ref().map(|r| r.submission_sequence),
        _ => None,
    }
}

pub fn rejection(event: &proto::Event) -> Option<(proto::RejectionCode, String)> {
    match event.kind.as_ref()? {
        Kind::Rejected(r) => Some((
            proto::RejectionCode::try_from(r.code).unwrap(),
            r.message.clone(),
        )),
        _ => None,
    }
}

pub struct Operator {
    pub session: KeyPair,
    pub certificate: String,
}

impl Operator {
    pub fn sign(&self, submission: &proto::Submission) -> proto::SignedEnvelope {
        let mut envelope = self
            .session
            .sign(Purpose::Submission, submission.encode_to_vec());
        envelope.certificate = self.certificate.clone();
        envelope
    }
}

pub fn value(kind: proto::value::Kind) -> proto::Value {
    proto::Value { kind: Some(kind) }
}

/// A drain of `cluster` with a good justification, made now.
pub fn drain(cluster: &str) -> proto::Submission {
    run(
        "traffic/drain-cluster",
        cluster,
        [("cluster", value(proto::value::Kind::Target(cluster.into())))],
        "SRE-101",
    )
}

pub fn run<const N: usize>(
    operation: &str,
    target: &str,
    params: [(&str, proto::Value); N],
    justification: &str,
) -> proto::Submission {
    let now = OffsetDateTime::now_utc();
    proto::Submission {
        command_id: CommandId::generate().to_string(),
        operation: operation.into(),
        justification: justification.into(),
        requested_at: Some(from_datetime(now)),
        expires_at: Some(from_datetime(now + time::Duration::minutes(1))),
        client: None,
        request: Some(proto::submission::Request::Run(proto::Run {
            target: target.into(),
            params: params
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect::<BTreeMap<_, _>>(),
            dry_run: false,
            break_glass: String::new(),
            plan: false,
            undo_of: String::new(),
            rollout: None,
        })),
    }
}

impl Harness {
    /// The policy of another replica with this configuration and admission key, as it stood
    /// when it decided (the test plays a replica that dies after recording its decision).
    pub fn replica_policy(&self, source: &str) -> rct_admission::decide::Policy {
        let config = self.config();
        let catalog = rct_admission::catalog::load(&config.catalog).unwrap();
        let key = self.admission_keypair();
        rct_admission::decide::Policy {
            catalog_version: catalog.version(),
            catalog,
            certificates: rct_admission::identity::Certificates::new(
                &key,
                &[],
                config.certificate_ttl,
            ),
            services: rct_admission::identity::Services::new(&config.services).unwrap(),
            key,
            freshness: config.freshness,
            clock_skew: config.clock_skew,
            max_payload: config.max_payload,
            source: source.into(),
        }
    }

    /// The submission stored at `sequence` in RCT_SUBMIT: its subject and bytes.
    pub async fn stored_submission(&self, sequence: u64) -> (String, Bytes) {
        let stored = self
            .js
            .get_stream("RCT_SUBMIT")
            .await
            .unwrap()
            .get_raw_message(sequence)
            .await
            .unwrap();
        (stored.subject.to_string(), stored.payload)
    }

    /// What a replica that decided the submission at `sequence` and died at once leaves
    /// behind: its decision, recorded as admission records it, and no command. Returns the
    /// verdict it reached.
    pub async fn decide_and_die(&self, sequence: u64) -> rct_admission::decide::Verdict {
        self.decide_signed_as(sequence, Some(self.admission_keypair()))
            .await
    }

    /// As [`Harness::decide_and_die`], the decision signed with `key` (`None`: unsigned), as
    /// anyone who can write the stream could forge it.
    pub async fn decide_signed_as(
        &self,
        sequence: u64,
        key: Option<KeyPair>,
    ) -> rct_admission::decide::Verdict {
        use rct_admission::decide::Submitted;
        let (subject, payload) = self.stored_submission(sequence).await;
        let verdict = self.replica_policy("admission/dead").decide(Submitted {
            subject: &subject,
            payload: &payload,
            sequence,
            now: OffsetDateTime::now_utc(),
        });
        let (tower, _, decision) = verdict.parts();
        let mut publisher = Publisher::new(self.js.clone());
        if let Some(key) = key {
            let signer = rct_bus::provenance::Signer::admission(key);
            publisher = publisher.signing(std::sync::Arc::new(signer));
        }
        match publisher.event(tower, decision, sequence).await.unwrap() {
            Slot::Written(ack) => assert!(!ack.duplicate),
            Slot::Taken { .. } => panic!("the decision slot was taken"),
        }
        verdict
    }

    /// Waits for the first command on `subject` in RCT_CMD.
    pub async fn command_on(&self, subject: &str) -> async_nats::jetstream::message::StreamMessage {
        let stream = self.js.get_stream("RCT_CMD").await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Ok(m) = stream.get_last_raw_message_by_subject(subject).await {
                    break m;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no command on {subject}"))
    }

    /// Waits until admission has taken and acknowledged every submission stored so far.
    pub async fn submissions_settled(&self) {
        let mut stream = self.js.get_stream("RCT_SUBMIT").await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .get_consumer(rct_streams::topology::ADMISSION_CONSUMER)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let info = consumer.info().await.unwrap();
                if info.ack_floor.stream_sequence >= last {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("admission acknowledges every submission");
    }

    /// Makes the shared consumer deliver every stored submission again, as a lost
    /// acknowledgement would: recreated from scratch while admission is stopped.
    pub async fn redeliver_everything(&mut self) {
        self.stop_admission().await;
        self.js
            .delete_consumer_from_stream(rct_streams::topology::ADMISSION_CONSUMER, "RCT_SUBMIT")
            .await
            .unwrap();
        rct_streams::provision(&self.js, &rct_streams::Config::default())
            .await
            .unwrap();
        self.start_admission().await;
    }
}

/// A run of workloads operation `operation` on deployment `deployment` of namespace shop,
/// justified by `why`.
pub fn workload(operation: &str, deployment: &str, why: &str) -> proto::Submission {
    use proto::value::Kind as V;
    run(
        operation,
        "_",
        [
            ("namespace", value(V::String("shop".into()))),
            ("deployment", value(V::String(deployment.into()))),
        ],
        why,
    )
}

/// An approval (or denial) of command `id` of `operation` with `digest`, justified by `why`.
pub fn approval(
    operation: &str,
    id: &str,
    digest: &[u8],
    deny: bool,
    why: &str,
) -> proto::Submission {
    let now = OffsetDateTime::now_utc();
    proto::Submission {
        command_id: CommandId::generate().to_string(),
        operation: operation.into(),
        justification: why.into(),
        requested_at: Some(from_datetime(now)),
        expires_at: Some(from_datetime(now + time::Duration::minutes(1))),
        client: None,
        request: Some(rct_bus::approval::request(id, digest, deny)),
    }
}

/// The event in `kind`'s single slot of workloads command `id`, once there (within 30 s).
pub async fn workloads_slot(h: &Harness, id: &str, kind: rct_bus::EventKind) -> proto::Event {
    let tower = rct_bus::Tower::new("workloads").unwrap();
    let id: CommandId = id.parse().unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(record) = replay::slot(&h.js, &tower, &rct_bus::Target::none(), id, kind)
                .await
                .unwrap()
            {
                return record.event;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("nothing in the {kind} slot of {id}"))
}

/// The pending event of workloads command `id`, once there.
pub async fn workloads_pending(h: &Harness, id: &str) -> proto::Pending {
    match workloads_slot(h, id, rct_bus::EventKind::Pending)
        .await
        .kind
    {
        Some(Kind::Pending(p)) => p,
        other => panic!("not a pending request: {other:?}"),
    }
}

/// A publisher that writes as an agent of `tower` on `target` would, with a key admission
/// certified.
pub fn as_agent_of(h: &Harness, tower: &rct_bus::Tower, target: &str) -> Publisher {
    let key = KeyPair::generate();
    let now = std::time::SystemTime::now();
    let certificate = rct_bus::provenance::certify(
        &h.admission_keypair(),
        tower,
        &rct_bus::Target::of_event(target),
        "agent-1",
        key.public(),
        now,
        now + Duration::from_secs(3600),
    );
    Publisher::new(h.js.clone()).signing(std::sync::Arc::new(rct_bus::provenance::Signer::agent(
        key,
        certificate,
    )))
}

/// A weight change of `cluster`.
pub fn weights(cluster: &str, weight: i64) -> proto::Submission {
    use proto::value::Kind as V;
    run(
        "traffic/set-weights",
        cluster,
        [
            ("cluster", value(V::Target(cluster.into()))),
            ("weight", value(V::Integer(weight))),
        ],
        "SRE-202",
    )
}

/// `submission` as a dry run.
pub fn dry(mut submission: proto::Submission) -> proto::Submission {
    if let Some(proto::submission::Request::Run(run)) = &mut submission.request {
        run.dry_run = true;
    }
    submission
}

/// The refusal's message, asserting its code.
pub fn refused(decision: &proto::Event, code: proto::RejectionCode) -> String {
    let (got, message) = rejection(decision).unwrap_or_else(|| panic!("admitted: {decision:?}"));
    assert_eq!(got, code, "{message}");
    message
}

/// What the agent of `target` records when it ran `submission` to `outcome`.
pub async fn ran(h: &Harness, submission: &proto::Submission, target: &str, outcome: Kind) {
    ran_command(
        h,
        &submission.command_id,
        &submission.operation,
        target,
        outcome,
    )
    .await;
}

/// What the agent of `target` records when it ran command `command_id` of `operation` to
/// `outcome`: its claim, then the outcome.
pub async fn ran_command(
    h: &Harness,
    command_id: &str,
    operation: &str,
    target: &str,
    outcome: Kind,
) {
    let tower: rct_bus::Tower = operation.parse::<OperationName>().unwrap().tower().clone();
    let agent = as_agent_of(h, &tower, target);
    for kind in [
        Kind::Started(proto::Started {
            agent: format!("{tower}/{target}/agent-1"),
            host: "edge".into(),
            target: target.into(),
            without_running: false,
        }),
        outcome,
    ] {
        let event = proto::Event {
            command_id: command_id.to_owned(),
            at: Some(rct_streams::timestamp::from_datetime(
                time::OffsetDateTime::now_utc(),
            )),
            source: "agent".into(),
            operation: operation.to_owned(),
            target: target.into(),
            kind: Some(kind),
        };
        agent.event(&tower, &event, "agent").await.unwrap();
    }
}

/// The parameters the decision `decision` recorded.
pub fn decided_params(decision: &proto::Event) -> BTreeMap<String, proto::Value> {
    match &decision.kind {
        Some(Kind::Admitted(a)) => a.request.clone().unwrap_or_default().params,
        Some(Kind::Rejected(r)) => r.request.clone().unwrap_or_default().params,
        _ => BTreeMap::new(),
    }
}
