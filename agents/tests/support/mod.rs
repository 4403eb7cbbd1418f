//! A real nats-server with the topology, the example catalog served as admission serves it,
//! and commands signed with a test admission key.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use rct_agents::{Config, Context, Failure, Outcome, Params, Tower};
use rct_bus::catalog::{Catalog, Served};
use rct_bus::proto::{self, event::Kind};
use rct_bus::{CommandId, KeyPair, OperationName, Purpose, Subject, Target};
use rct_streams::replay::{self, Filter, Item, Record};
use rct_streams::testkit::{Server, Setup};
use rct_streams::timestamp::from_datetime;
use rct_streams::{Outgoing, Publisher};
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Harness {
    pub server: Server,
    pub js: async_nats::jetstream::Context,
    pub client: async_nats::Client,
    pub admission: KeyPair,
    pub streams: rct_streams::Config,
    /// The version of the catalog served at start: the one commands are admitted under.
    pub catalog_version: String,
    /// Certifies the agents' keys as admission would (with `admission`).
    pub enroller: tokio_util::task::AbortOnDropHandle<()>,
}

pub fn example_catalog_text() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/catalog.example.yaml");
    std::fs::read_to_string(path).unwrap()
}

pub fn example_catalog() -> Catalog {
    serde_yaml_ng::from_str(&example_catalog_text()).unwrap()
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with_catalog(example_catalog()).await
    }

    pub async fn start_with_catalog(catalog: Catalog) -> Self {
        Self::start_with(Setup::default(), catalog).await
    }

    /// As [`Harness::start_with_catalog`], on a server set up as `setup` says (users and
    /// permissions, say); the harness's own client needs none.
    pub async fn start_with(setup: Setup, catalog: Catalog) -> Self {
        let server = Server::start_with(setup).await;
        let client = server.client().await;
        let js = async_nats::jetstream::new(client.clone());
        // Short enough for tests: presence expires quickly, redeliveries come quickly.
        let streams = rct_streams::Config {
            agent_ttl: Duration::from_secs(2),
            towers: rct_streams::config::Consumer {
                ack_wait: Duration::from_secs(2),
                backoff: Vec::new(),
                ..Default::default()
            },
            ..Default::default()
        };
        rct_streams::provision(&js, &streams).await.unwrap();
        let served = Served {
            version: catalog.version(),
            catalog,
        };
        let catalog_version = served.version.clone();
        let admission = KeyPair::generate();
        let enroller = rct_streams::testkit::enroller(&client, &admission).await;
        js.get_key_value("rct_catalog")
            .await
            .unwrap()
            .put("catalog", serde_json::to_vec(&served).unwrap().into())
            .await
            .unwrap();
        Self {
            server,
            js,
            client,
            admission,
            streams,
            catalog_version,
            enroller,
        }
    }

    pub fn config(&self, instance: &str) -> Config {
        Config {
            nats: rct_streams::Connection::to([self.server.url()]),
            instance: instance.into(),
            create_consumer: true,
            streams: self.streams.clone(),
            heartbeat: Duration::from_secs(1),
            cancel_grace: Duration::from_secs(2),
            ..Config::default()
        }
    }

    /// A command as admission would produce it.
    pub fn command(
        &self,
        operation: &str,
        target: &str,
        params: &[(&str, proto::Value)],
    ) -> proto::Command {
        let now = OffsetDateTime::now_utc();
        proto::Command {
            command_id: CommandId::generate().to_string(),
            operation: operation.into(),
            target: target.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            justification: "SRE-1".into(),
            dry_run: false,
            operator: Some(proto::Operator {
                subject: "alice".into(),
                email: "alice@example.com".into(),
                groups: vec!["sre_team".into()],
            }),
            admitted_at: Some(from_datetime(now)),
            deadline: Some(from_datetime(now + time::Duration::minutes(2))),
            timeout: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            catalog_version: self.catalog_version.clone(),
            submission: None,
            approvals: Vec::new(),
            break_glass: String::new(),
            plan: false,
            approved_plan: None,
            parent: String::new(),
        }
    }

    pub fn signed(&self, command: &proto::Command) -> Vec<u8> {
        self.admission
            .sign(Purpose::Command, command.encode_to_vec())
            .encode_to_vec()
    }

    /// Publishes the signed command under `msg_id` (the command id, as admission does).
    pub async fn publish_bytes(&self, command: &proto::Command, bytes: Vec<u8>, msg_id: &str) {
        let operation: OperationName = command.operation.parse().unwrap();
        let target: Target = command.target.parse().unwrap();
        Publisher::new(self.js.clone())
            .send(Outgoing::new(
                Subject::command(&operation, &target),
                msg_id,
                Bytes::from(bytes),
            ))
            .await
            .unwrap();
    }

    pub async fn publish(&self, command: &proto::Command) {
        self.publish_bytes(command, self.signed(command), &command.command_id)
            .await;
    }

    /// Every event of a command, in order.
    pub async fn events(&self, id: &str) -> Vec<Record> {
        replay::command_history(&self.js, id.parse().unwrap())
            .await
            .unwrap()
    }

    /// Waits for the command's outcome and returns all its events.
    pub async fn finished(&self, id: &str) -> Vec<Record> {
        let mut follow = replay::follow(&self.js, &Filter::command(id.parse().unwrap()))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(item) = follow.next().await {
                match item {
                    Ok(Item::Event(r)) if r.kind == rct_bus::EventKind::Outcome => break,
                    Ok(_) => {}
                    // A read that failed (a server reloading, say): the follow resumes after
                    // the last event it read, so nothing is missed.
                    Err(e) => eprintln!("following {id}: {e}; resuming"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no outcome for {id}"));
        self.events(id).await
    }

    /// A publisher that signs as the test admission does (its cancel requests, say).
    pub fn as_admission(&self) -> Publisher {
        let key = KeyPair::from_pem(&self.admission.to_pem()).unwrap();
        Publisher::new(self.js.clone())
            .signing(Arc::new(rct_bus::provenance::Signer::admission(key)))
    }

    /// A publisher that signs as an agent `instance` of tower `traffic` on `target` would,
    /// certified by the test admission (a rival agent's events, say).
    pub fn as_agent(&self, target: &str, instance: &str) -> Publisher {
        let key = KeyPair::generate();
        let now = std::time::SystemTime::now();
        let certificate = rct_bus::provenance::certify(
            &self.admission,
            &"traffic".parse().unwrap(),
            &Target::of_event(target),
            instance,
            key.public(),
            now,
            now + Duration::from_secs(3600),
        );
        Publisher::new(self.js.clone()).signing(Arc::new(rct_bus::provenance::Signer::agent(
            key,
            certificate,
        )))
    }

    /// Starts `tower` trusting the test admission key.
    pub fn run(&self, tower: Tower) -> Running {
        self.run_trusting(tower, self.admission.public().clone())
    }

    /// Starts `tower` trusting `key` only.
    pub fn run_trusting(&self, tower: Tower, key: rct_bus::PublicKey) -> Running {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tower.trust(key).run(self.client.clone(), shutdown.clone()));
        Running { shutdown, task }
    }

    /// Waits until tower consumer `consumer` has every delivered command acknowledged and
    /// none left to deliver.
    pub async fn acknowledged(&self, consumer: &str) {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = self
            .js
            .get_consumer_from_stream(consumer, "RCT_CMD")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let info = consumer.info().await.unwrap();
                if info.num_pending == 0 && info.num_ack_pending == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("every delivery is acknowledged");
    }

    /// Waits until `n` agents of `tower` are present.
    /// The presences of `tower`'s agents now, read once.
    pub async fn present_now(&self, tower: &str) -> Vec<rct_bus::presence::Presence> {
        let bucket = self.js.get_key_value("rct_agents").await.unwrap();
        let mut found = Vec::new();
        let mut keys = bucket.keys().await.unwrap();
        while let Some(key) = keys.next().await {
            let key = key.unwrap();
            if key.starts_with(&format!("{tower}."))
                && let Some(value) = bucket.get(&key).await.unwrap()
            {
                found.push(serde_json::from_slice(&value).unwrap());
            }
        }
        found
    }

    pub async fn present(&self, tower: &str, n: usize) -> Vec<rct_bus::presence::Presence> {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let found = self.present_now(tower).await;
                if found.len() == n {
                    return found;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never {n} agents of {tower}"))
    }
}

pub struct Running {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), rct_agents::Error>>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Executions recorded by test handlers: (command id, agent instance).
#[derive(Clone, Default)]
pub struct Ledger(pub Arc<Mutex<Vec<(String, String)>>>);

impl Ledger {
    pub fn record(&self, ctx: &Context, instance: &str) {
        self.0
            .lock()
            .unwrap()
            .push((ctx.command_id().to_owned(), instance.to_owned()));
    }

    pub fn executions(&self, id: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _)| c == id)
            .count()
    }
}

pub fn target(value: &str) -> proto::Value {
    proto::Value {
        kind: Some(proto::value::Kind::Target(value.into())),
    }
}

/// A drain handler that records its execution, reports progress and logs, and succeeds.
pub fn drain_handler(
    ledger: Ledger,
    instance: &'static str,
) -> impl Fn(Context, Params) -> futures::future::BoxFuture<'static, Result<Outcome, Failure>>
+ Send
+ Sync
+ 'static {
    move |ctx: Context, params: Params| {
        let ledger = ledger.clone();
        Box::pin(async move {
            ledger.record(&ctx, instance);
            let keep = params.i64("keep_percent").unwrap_or(0);
            ctx.log(format!(
                "draining {} to {keep}%",
                params.str("cluster").unwrap_or("?")
            ));
            for step in 1..=4u32 {
                ctx.progress(step * 25, format!("step {step}"), "moving traffic");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Outcome::new("drained").output("kept", keep.to_string()))
        })
    }
}

/// A `traffic` cluster agent for `target` running [`drain_handler`], named `instance`.
pub fn drain_agent(h: &Harness, target: &str, instance: &'static str, ledger: &Ledger) -> Running {
    h.run(
        Tower::new("traffic")
            .cluster(target)
            .operation("drain-cluster", drain_handler(ledger.clone(), instance))
            .config(h.config(instance)),
    )
}

pub fn outcome(records: &[Record]) -> &Kind {
    records
        .iter()
        .find(|r| r.kind == rct_bus::EventKind::Outcome)
        .and_then(|r| r.event.kind.as_ref())
        .expect("an outcome")
}

/// The example key file (`ops/examples/workloads.agekey`), whose public half the example
/// catalog lists for the workloads tower.
pub fn example_key_file() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/examples/workloads.agekey")
}

/// The public half of [`example_key_file`].
pub fn example_recipient() -> String {
    let text = std::fs::read_to_string(example_key_file()).unwrap();
    rct_bus::sealed::Keys::parse(&text).unwrap().recipients()[0].clone()
}

/// `value` sealed to `recipients` for parameter `param` of `command`, as the CLI seals it.
pub fn sealed_for(
    command: &proto::Command,
    param: &str,
    value: &str,
    recipients: &[String],
) -> proto::Value {
    let binding = rct_bus::sealed::Binding {
        command_id: command.command_id.clone(),
        operation: command.operation.clone(),
        target: command.target.clone(),
        param: param.into(),
        operator: command.operator.as_ref().unwrap().subject.clone(),
        params: rct_bus::sealed::params_digest(&command.params, |n| n == param),
    };
    let clear = proto::Value {
        kind: Some(proto::value::Kind::String(value.into())),
    };
    rct_bus::sealed::seal(recipients, &binding, &clear).unwrap()
}
