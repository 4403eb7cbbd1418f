//! The tower framework: pull admitted commands, verify, claim once, run the handler with
//! progress, logs, cancellation and a timeout, record exactly one outcome.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use prost::Message as _;
use rct_bus::catalog::Served;
use rct_bus::presence::Presence;
use rct_bus::proto::{self, event::Kind};
use rct_bus::{
    CommandId, EventKind, OperationName, PublicKey, Purpose, Subject, Target, Unverified, Verifier,
};
use rct_streams::replay::{self, Filter, Item};
use rct_streams::telemetry::{self, Readiness};
use rct_streams::timestamp::{from_datetime, to_datetime};
use rct_streams::topology::{
    self, AGENTS_BUCKET, CATALOG_BUCKET, CATALOG_KEY, COMMAND_STREAM, EVENT_STREAM,
};
use rct_streams::{Publisher, Slot};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::context::{Context, Failure, Outcome, Params};
use crate::metrics::Metrics;
use crate::{Config, Error, emitter};

type Handler =
    Arc<dyn Fn(Context, Params) -> BoxFuture<'static, Result<Outcome, Failure>> + Send + Sync>;

/// A tower: a name, optionally the one target this agent serves (cluster flavour), and its
/// operations' handlers.
///
/// ```no_run
/// # async fn drain(_: rct_agents::Context, _: rct_agents::Params)
/// #     -> Result<rct_agents::Outcome, rct_agents::Failure> { unimplemented!() }
/// # async fn example(client: async_nats::Client) -> Result<(), rct_agents::Error> {
/// rct_agents::Tower::new("traffic")
///     .cluster("prod-1")
///     .operation("drain-cluster", drain)
///     .run(client, tokio_util::sync::CancellationToken::new())
///     .await
/// # }
/// ```
pub struct Tower {
    name: String,
    target: Option<String>,
    handlers: BTreeMap<String, Handler>,
    config: Config,
    trusted: Vec<PublicKey>,
}

impl std::fmt::Debug for Tower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tower")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("operations", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Tower {
    /// A tower named `name` (simple flavour until [`Tower::cluster`]).
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            target: None,
            handlers: BTreeMap::new(),
            config: Config::default(),
            trusted: Vec::new(),
        }
    }

    /// Cluster flavour: this agent serves `target` only, on its own consumer.
    pub fn cluster(mut self, target: &str) -> Self {
        self.target = Some(target.to_owned());
        self
    }

    /// Serves operation `name` (`<tower>/<name>` in the catalog) with `handler`.
    pub fn operation<F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Context, Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Outcome, Failure>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |ctx, params| Box::pin(handler(ctx, params)));
        self.handlers.insert(name.to_owned(), handler);
        self
    }

    /// Replaces the settings.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Trusts one more admission key (besides `trusted_keys` files).
    pub fn trust(mut self, key: PublicKey) -> Self {
        self.trusted.push(key);
        self
    }

    /// Serves until `shutdown`, then stops pulling and lets running commands finish within the
    /// grace period.
    pub async fn run(
        self,
        client: async_nats::Client,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let runner = Arc::new(Runner::new(self, client)?);
        runner.serve(shutdown).await
    }
}

struct Runner {
    tower: rct_bus::Tower,
    target: Target,
    cluster: bool,
    handlers: BTreeMap<String, Handler>,
    /// The admission keys trusted now; `trust_reload` replaces it.
    verifier: RwLock<Verifier>,
    /// Keys given in code (`Tower::trust`), kept across reloads.
    trusted: Vec<PublicKey>,
    js: jetstream::Context,
    publisher: Publisher,
    catalog: RwLock<Option<Arc<Served>>>,
    incarnation: String,
    source: String,
    config: Config,
    running: Mutex<HashSet<CommandId>>,
    started_at: OffsetDateTime,
    metrics: Metrics,
    readiness: Readiness,
}

impl Runner {
    fn new(tower: Tower, client: async_nats::Client) -> Result<Self, Error> {
        tower.config.validate().map_err(Error::Config)?;
        let name =
            rct_bus::Tower::new(tower.name.as_str()).map_err(|e| Error::Config(e.to_string()))?;
        let (target, cluster) = match &tower.target {
            Some(t) => (
                Target::new(t.as_str()).map_err(|e| Error::Config(e.to_string()))?,
                true,
            ),
            None => (Target::none(), false),
        };
        if tower.handlers.is_empty() {
            return Err(Error::Config(format!("tower {name} has no operations")));
        }
        let verifier =
            load_trust(&tower.trusted, &tower.config.trusted_keys).map_err(Error::Config)?;
        let js = tower.config.nats.jetstream(client);
        let incarnation = format!(
            "{}-{}",
            tower.config.instance,
            ulid::Ulid::new().to_string().to_lowercase()
        );
        Ok(Self {
            source: format!("agent/{name}/{target}/{incarnation}"),
            metrics: Metrics::new(name.as_str(), target.as_str()),
            tower: name,
            target,
            cluster,
            handlers: tower.handlers,
            verifier: RwLock::new(verifier),
            trusted: tower.trusted,
            publisher: Publisher::new(js.clone()),
            js,
            catalog: RwLock::new(None),
            incarnation,
            config: tower.config,
            running: Mutex::default(),
            started_at: OffsetDateTime::now_utc(),
            readiness: Readiness::default(),
        })
    }

    async fn serve(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), Error> {
        self.readiness.expect(CONSUMER);
        self.readiness.expect(PRESENCE);
        // `new` refuses to build without one.
        self.readiness.set(KEYS, true);
        if let Some(listen) = self.config.telemetry.listen {
            let mut registry = Registry::default();
            self.metrics.register(&mut registry);
            let client = self.js.client();
            telemetry::serve(listen, registry, self.readiness.clone(), client)
                .map_err(|e| Error::Config(format!("cannot serve telemetry on {listen}: {e}")))?;
        }
        let desired = topology::tower_consumer(
            &self.config.streams,
            &self.tower,
            self.cluster.then_some(&self.target),
        );
        let name = desired.durable_name.clone().unwrap_or_default();
        if self.config.create_consumer {
            topology::ensure_consumer(&self.js, COMMAND_STREAM, desired).await?;
        }
        let mut consumer: PullConsumer = self
            .js
            .get_consumer_from_stream(&name, COMMAND_STREAM)
            .await
            .map_err(|e| {
                Error::Nats(format!("cannot bind consumer {COMMAND_STREAM}/{name}: {e}"))
            })?;
        let ack_wait = consumer
            .info()
            .await
            .map_err(|e| Error::Nats(e.to_string()))?
            .config
            .ack_wait;
        // In-progress acks well before the server's ack wait runs out.
        let keepalive = (ack_wait / 3).max(Duration::from_millis(200));

        self.readiness.set(CONSUMER, true);
        let tracker = TaskTracker::new();
        let presence_stop = CancellationToken::new();
        tracker.spawn(self.clone().presence(presence_stop.clone()));
        tracker.spawn(self.clone().reload_trust(presence_stop.clone()));

        tracing::info!(
            tower = %self.tower,
            target = %self.target,
            instance = %self.incarnation,
            consumer = %name,
            operations = ?self.handlers.keys().collect::<Vec<_>>(),
            "agent ready"
        );
        let result = rct_streams::work::consume(
            &consumer,
            self.config.concurrency,
            &shutdown,
            &tracker,
            |message| {
                let this = self.clone();
                async move { this.handle(message, keepalive).await }
            },
        )
        .await
        .map_err(Error::from);
        tracker.close();
        let running = async {
            // Presence stays while commands finish, so no other agent calls them unknown.
            while !self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(self.config.shutdown_grace, running)
            .await
            .is_err()
        {
            tracing::warn!(
                "commands still running after the grace period; their outcome will be unknown"
            );
        }
        presence_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        tracing::info!("agent stopped");
        result
    }

    /// Reads `trusted_keys` again every `trust_reload` and trusts exactly what they hold; a
    /// file that cannot be read keeps the current keys (and says so).
    async fn reload_trust(self: Arc<Self>, stop: CancellationToken) {
        let ids = |v: &Verifier| {
            let mut ids: Vec<String> = v.key_ids().map(ToString::to_string).collect();
            ids.sort();
            ids
        };
        let current = ids(&self.verifier.read().unwrap_or_else(|p| p.into_inner()));
        self.metrics.trusted_keys(current.len());
        if self.config.trust_reload.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.config.trust_reload) => {}
            }
            match load_trust(&self.trusted, &self.config.trusted_keys) {
                Ok(fresh) => {
                    let mut verifier = self.verifier.write().unwrap_or_else(|p| p.into_inner());
                    let (before, after) = (ids(&verifier), ids(&fresh));
                    if before != after {
                        tracing::info!(?before, ?after, "trusted admission keys changed");
                        self.metrics.trusted_keys(after.len());
                        *verifier = fresh;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload trusted_keys; keeping the keys trusted so far");
                }
            }
        }
    }

    /// Keeps this agent's entry in `rct_agents` fresh; removes it on the way out.
    async fn presence(self: Arc<Self>, stop: CancellationToken) {
        let bucket = match self.js.get_key_value(AGENTS_BUCKET).await {
            Ok(bucket) => bucket,
            Err(e) => {
                tracing::warn!(error = %e, "no presence: cannot open {AGENTS_BUCKET}");
                return;
            }
        };
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        let key =
            rct_bus::presence::key(self.tower.as_str(), self.target.as_str(), &self.incarnation);
        loop {
            let presence = Presence {
                tower: self.tower.to_string(),
                target: self.target.to_string(),
                instance: self.incarnation.clone(),
                host: host.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                started_at: self
                    .started_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                operations: self.handlers.keys().cloned().collect(),
                catalog_version: self
                    .catalog
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(|c| c.version.clone())
                    .unwrap_or_default(),
            };
            let json = serde_json::to_vec(&presence).expect("presence serializes");
            let written = bucket.put(&key, json.into()).await;
            if let Err(e) = &written {
                tracing::warn!(error = %e, "cannot refresh presence");
            }
            self.metrics.heartbeat(written.is_ok());
            self.readiness.set(PRESENCE, written.is_ok());
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.config.heartbeat) => {}
            }
        }
        let _ = bucket.delete(&key).await;
    }

    async fn alive(&self, incarnation: &str) -> bool {
        let Ok(bucket) = self.js.get_key_value(AGENTS_BUCKET).await else {
            // Unsure: assume alive, so nothing is declared unknown on a hunch.
            return true;
        };
        let key = rct_bus::presence::key(self.tower.as_str(), self.target.as_str(), incarnation);
        !matches!(bucket.get(&key).await, Ok(None))
    }

    async fn handle(self: Arc<Self>, message: jetstream::Message, keepalive: Duration) {
        let command = match self.verify(&message) {
            Ok(command) => command,
            Err(reason) => {
                tracing::warn!(subject = %message.subject, %reason, "refusing a command");
                self.record_refusal(&message.subject, &reason).await;
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let id: CommandId = command.command_id.parse().expect("checked in verify");
        let command = Arc::new(command);
        let redelivered = message.info().map_or(true, |i| i.delivered > 1);
        let operator = command
            .operator
            .as_ref()
            .map(|o| o.email.clone())
            .unwrap_or_default();
        let span = tracing::info_span!(
            "command",
            command_id = %id,
            operation = %command.operation,
            target = %command.target,
            operator = %operator,
            trace_id = tracing::field::Empty,
        );
        // The operation's trace goes on in every event this agent writes for it.
        let publisher = self
            .publisher
            .traced(&telemetry::continue_trace(&span, message.headers.as_ref()));
        async {
            match self.prepare(&publisher, &command, id, redelivered).await {
                Prepared::Run(params, secrets) => {
                    self.run(&publisher, message, command, id, params, secrets, keepalive)
                        .await
                }
                Prepared::Done => {
                    let _ = message.double_ack().await;
                }
                Prepared::Later(pause) => {
                    let _ = message.ack_with(AckKind::Nak(Some(pause))).await;
                }
                Prepared::Leave => {}
            }
        }
        .instrument(span)
        .await
    }

    /// Signature (a trusted admission key), then the command's own consistency with the
    /// subject it came on and the agent it reached.
    fn verify(&self, message: &jetstream::Message) -> Result<proto::Command, String> {
        let envelope = Unverified::decode(&message.payload)
            .map_err(|_| "the command is not a signed envelope".to_owned())?;
        let verified = self
            .verifier
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .verify(envelope, Purpose::Command)
            .map_err(|e| match e {
                rct_bus::Error::UntrustedKey { key_id } => format!(
                    "the command is signed with key {key_id}, which this agent does not trust \
                     (a retired admission key, or a new one not yet added to trusted_keys)"
                ),
                e => format!("the command's signature is not admission's ({e})"),
            })?;
        let command: proto::Command = verified
            .decode()
            .map_err(|_| "the signed body is not a command".to_owned())?;
        command
            .command_id
            .parse::<CommandId>()
            .map_err(|_| format!("command id {:?} is not a ULID", command.command_id))?;
        let Ok(Subject::Command { operation, target }) = message.subject.parse::<Subject>() else {
            return Err(format!("{} is not a command subject", message.subject));
        };
        if operation.to_string() != command.operation || target.as_str() != command.target {
            return Err(format!(
                "the command for {} on {} arrived on {}",
                command.operation, command.target, message.subject
            ));
        }
        if operation.tower() != &self.tower || (self.cluster && target != self.target) {
            return Err(format!("{} is not for this agent", message.subject));
        }
        Ok(command)
    }

    /// Decides what to do with a verified command before running it.
    async fn prepare(
        &self,
        publisher: &Publisher,
        command: &proto::Command,
        id: CommandId,
        redelivered: bool,
    ) -> Prepared {
        let now = OffsetDateTime::now_utc();
        let deadline = command
            .deadline
            .as_ref()
            .and_then(to_datetime)
            .unwrap_or(now);

        // Claimed already? Then it is never run again, here or anywhere. A first delivery
        // within its deadline skips the look: the claim itself is single-slot, and a taken
        // slot sends the command back here as a redelivery.
        if redelivered || now > deadline {
            match self.read_slot(id, EventKind::Claim).await {
                Err(()) => return Prepared::Later(Duration::from_secs(2)),
                Ok(Some(claim)) => {
                    return self.claimed_before(publisher, command, id, &claim).await;
                }
                Ok(None) => {}
            }
        }
        if now > deadline {
            let expired = Kind::Expired(proto::Expired {
                deadline: command.deadline,
            });
            return match self.outcome(publisher, command, expired).await {
                Ok(_) => Prepared::Done,
                Err(()) => Prepared::Later(Duration::from_secs(2)),
            };
        }
        let op_name = command.operation.rsplit('/').next().unwrap_or_default();
        if !self.handlers.contains_key(op_name) {
            tracing::warn!(operation = %command.operation, "no handler here; leaving it for an agent that has one");
            return Prepared::Later(Duration::from_secs(10));
        }
        let Some(served) = self.catalog(&command.catalog_version).await else {
            tracing::warn!("the catalog is not available; cannot re-validate, trying later");
            return Prepared::Later(Duration::from_secs(5));
        };
        let name: OperationName = match command.operation.parse() {
            Ok(name) => name,
            Err(e) => {
                return self
                    .fail(publisher, command, "invalid_params", e.to_string())
                    .await;
            }
        };
        let Some((tower_spec, operation)) = served.catalog.operation(&name) else {
            return self
                .fail(
                    publisher,
                    command,
                    "invalid_params",
                    format!("{name} is not in catalog {}", served.version),
                )
                .await;
        };
        let checked = match operation.check(tower_spec, &command.params) {
            Ok(checked) => checked,
            Err(errors) => {
                let messages: Vec<String> = errors.into_iter().map(|e| e.message).collect();
                return self
                    .fail(publisher, command, "invalid_params", messages.join("; "))
                    .await;
            }
        };
        if checked.target.as_str() != command.target {
            return self
                .fail(
                    publisher,
                    command,
                    "invalid_params",
                    "the target disagrees with the parameters".into(),
                )
                .await;
        }
        let secrets = operation
            .params
            .iter()
            .filter(|(_, p)| p.secret)
            .filter_map(|(n, _)| checked.params.get(n))
            .map(rct_bus::catalog::display_value)
            .collect();
        Prepared::Run(Params::new(checked.params), secrets)
    }

    /// A command whose claim exists: finished, running elsewhere, or orphaned.
    async fn claimed_before(
        &self,
        publisher: &Publisher,
        command: &proto::Command,
        id: CommandId,
        claim: &proto::Event,
    ) -> Prepared {
        match self.read_slot(id, EventKind::Outcome).await {
            Err(()) => return Prepared::Later(Duration::from_secs(2)),
            Ok(Some(_)) => return Prepared::Done,
            Ok(None) => {}
        }
        let holder = match &claim.kind {
            Some(Kind::Started(s)) => s.agent.clone(),
            _ => String::new(),
        };
        if holder == self.incarnation
            && self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&id)
        {
            // Still running here; the running task acknowledges it.
            return Prepared::Leave;
        }
        if holder != self.incarnation && self.alive(&holder).await {
            return Prepared::Later(Duration::from_secs(5));
        }
        let unknown = Kind::Unknown(proto::Unknown {
            reason: format!(
                "the agent that started it ({holder}) stopped before reporting an outcome; it is \
                 not run again: check {} by hand",
                if command.target == Target::NONE {
                    "the system"
                } else {
                    &command.target
                }
            ),
        });
        match self.outcome(publisher, command, unknown).await {
            Ok(_) => Prepared::Done,
            Err(()) => Prepared::Later(Duration::from_secs(2)),
        }
    }

    #[allow(clippy::too_many_arguments)] // one command's whole context, passed once
    async fn run(
        &self,
        publisher: &Publisher,
        message: jetstream::Message,
        command: Arc<proto::Command>,
        id: CommandId,
        params: Params,
        secrets: Vec<String>,
        keepalive: Duration,
    ) {
        let op_name = command
            .operation
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let handler = self.handlers[&op_name].clone();
        if !self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id)
        {
            // Another copy of this command is running here right now; this copy comes back
            // later and finds the outcome.
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }

        let claim = self.event(
            &command,
            Kind::Started(proto::Started {
                agent: self.incarnation.clone(),
                host: nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_default(),
                target: command.target.clone(),
            }),
        );
        match publisher
            .event(&self.tower, &claim, &self.incarnation)
            .await
        {
            Ok(Slot::Written(ack)) if ack.duplicate => {
                // This agent claimed it before (another copy of the command): never again.
                self.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let next = match self.read_slot(id, EventKind::Claim).await {
                    Ok(Some(claim)) => self.claimed_before(publisher, &command, id, &claim).await,
                    _ => Prepared::Later(Duration::from_secs(1)),
                };
                match next {
                    Prepared::Done => {
                        let _ = message.double_ack().await;
                    }
                    Prepared::Later(pause) => {
                        let _ = message.ack_with(AckKind::Nak(Some(pause))).await;
                    }
                    Prepared::Leave | Prepared::Run(..) => {}
                }
                return;
            }
            Ok(Slot::Written(_)) => {}
            Ok(Slot::Taken { .. }) => {
                // Someone else started it between our look and our claim.
                self.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
            Err(e) => {
                tracing::warn!(command_id = %id, error = %e, "cannot claim; trying later");
                self.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                    .await;
                return;
            }
        }
        tracing::info!(command_id = %id, operation = %command.operation, target = %command.target, "started");
        self.metrics.started();
        let began = std::time::Instant::now();

        // Keep the server from redelivering while the handler works.
        let keeper = {
            let message = message.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(keepalive).await;
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            })
        };
        let cancel_watch = {
            let js = self.js.clone();
            let tower = self.tower.clone();
            tokio::spawn(async move { cancel_request(&js, tower, id).await })
        };

        let timeout = command
            .timeout
            .as_ref()
            .map_or(Duration::from_secs(15 * 60), |d| {
                Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
            });
        let finish_by = OffsetDateTime::now_utc() + timeout;
        let (emitter, emitting) = emitter::start(
            publisher.clone(),
            self.tower.clone(),
            self.event(&command, Kind::Log(proto::Log::default())),
            secrets,
            &self.config.output,
        );
        let token = CancellationToken::new();
        let ctx = Context::new(command.clone(), finish_by, token.clone(), emitter);
        let mut work = handler(ctx, params);

        enum Ended {
            Done(Result<Outcome, Failure>),
            Cancelled(String),
            TimedOut,
        }
        let mut cancel_watch = cancel_watch;
        let ended = tokio::select! {
            result = &mut work => Ended::Done(result),
            by = &mut cancel_watch => {
                token.cancel();
                Ended::Cancelled(by.unwrap_or_else(|_| "someone".into()))
            }
            _ = tokio::time::sleep(timeout) => {
                token.cancel();
                Ended::TimedOut
            }
        };
        let (ended, late) = match ended {
            Ended::Done(result) => (None, Some(result)),
            other => {
                let late = tokio::time::timeout(self.config.cancel_grace, &mut work)
                    .await
                    .ok();
                (Some(other), late)
            }
        };
        drop(work);
        cancel_watch.abort();
        // Every progress and log line is out before the outcome.
        emitting.finish().await;

        let kind = match (ended, late) {
            (_, Some(Ok(outcome))) => Kind::Succeeded(proto::Succeeded {
                summary: outcome.summary,
                outputs: outcome.outputs.into_iter().collect(),
            }),
            (Some(Ended::Cancelled(by)), _) => Kind::Cancelled(proto::Cancelled {
                reason: format!("cancelled by {by}"),
            }),
            (Some(Ended::TimedOut), _) => Kind::Failed(proto::Failed {
                code: "timeout".into(),
                message: format!(
                    "did not finish within {}",
                    humantime::format_duration(timeout)
                ),
            }),
            (_, Some(Err(failure))) => Kind::Failed(proto::Failed {
                code: failure.code,
                message: failure.message,
            }),
            (_, None) => Kind::Failed(proto::Failed {
                code: "abandoned".into(),
                message: "the handler did not stop after cancellation".into(),
            }),
        };
        let summary = match &kind {
            Kind::Succeeded(_) => "succeeded",
            Kind::Cancelled(_) => "cancelled",
            _ => "failed",
        };
        // An outcome we cannot write is retried; the command stays ours (running) meanwhile.
        while self
            .outcome(publisher, &command, kind.clone())
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        keeper.abort();
        for _ in 0..5 {
            if message.double_ack().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.metrics.ended(&op_name, summary, began.elapsed());
        tracing::info!(command_id = %id, outcome = summary, "finished");
    }

    /// Records a failure before running (no claim): the command is refused, not run.
    async fn fail(
        &self,
        publisher: &Publisher,
        command: &proto::Command,
        code: &str,
        message: String,
    ) -> Prepared {
        tracing::warn!(command_id = %command.command_id, code, %message, "refusing to run");
        let operation = command.operation.rsplit('/').next().unwrap_or_default();
        self.metrics.count(operation, "refused");
        let failed = Kind::Failed(proto::Failed {
            code: code.to_owned(),
            message,
        });
        match self.outcome(publisher, command, failed).await {
            Ok(_) => Prepared::Done,
            Err(()) => Prepared::Later(Duration::from_secs(2)),
        }
    }

    /// Writes the outcome (once per command); `Ok(false)` if another writer had already.
    async fn outcome(
        &self,
        publisher: &Publisher,
        command: &proto::Command,
        kind: Kind,
    ) -> Result<bool, ()> {
        let event = self.event(command, kind);
        match publisher.event(&self.tower, &event, 0).await {
            Ok(Slot::Written(_)) => Ok(true),
            Ok(Slot::Taken { .. }) => {
                tracing::warn!(command_id = %command.command_id, "an outcome was already recorded");
                Ok(false)
            }
            Err(e) => {
                tracing::warn!(command_id = %command.command_id, error = %e, "cannot record the outcome");
                Err(())
            }
        }
    }

    /// A refused command is recorded under a fresh id: the id in a forged command could be a
    /// real command's, whose outcome slot must not be taken by the forgery.
    async fn record_refusal(&self, subject: &str, reason: &str) {
        let (operation, target) = match subject.parse::<Subject>() {
            Ok(Subject::Command { operation, target }) => {
                (operation.to_string(), target.to_string())
            }
            _ => (String::new(), String::new()),
        };
        let event = proto::Event {
            command_id: CommandId::generate().to_string(),
            at: Some(from_datetime(OffsetDateTime::now_utc())),
            source: self.source.clone(),
            operation,
            target,
            kind: Some(Kind::Failed(proto::Failed {
                code: "refused".into(),
                message: format!("{reason}; it was not run"),
            })),
        };
        emitter::publish(&self.publisher, &self.tower, &event, 0).await;
    }

    fn event(&self, command: &proto::Command, kind: Kind) -> proto::Event {
        proto::Event {
            command_id: command.command_id.clone(),
            at: Some(from_datetime(OffsetDateTime::now_utc())),
            source: self.source.clone(),
            operation: command.operation.clone(),
            target: command.target.clone(),
            kind: Some(kind),
        }
    }

    /// The event in one single-slot subject of a command, if any.
    async fn read_slot(&self, id: CommandId, kind: EventKind) -> Result<Option<proto::Event>, ()> {
        let subject = Subject::event(&self.tower, id, kind).to_string();
        let stream = self
            .js
            .get_stream_no_info(EVENT_STREAM)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot read {EVENT_STREAM}");
            })?;
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(stored) => Ok(proto::Event::decode(stored.payload).ok()),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(%subject, error = %e, "cannot read");
                Err(())
            }
        }
    }

    /// The served catalog, fetched again when a command names another version.
    async fn catalog(&self, version: &str) -> Option<Arc<Served>> {
        if let Some(cached) = self
            .catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            && cached.version == version
        {
            return Some(cached.clone());
        }
        let bucket = self.js.get_key_value(CATALOG_BUCKET).await.ok()?;
        let bytes = bucket.get(CATALOG_KEY).await.ok()??;
        let served: Arc<Served> = Arc::new(serde_json::from_slice(&bytes).ok()?);
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = Some(served.clone());
        Some(served)
    }
}

/// The keys given in code plus every key in `files`; an error says which file and why.
fn load_trust(in_code: &[PublicKey], files: &[std::path::PathBuf]) -> Result<Verifier, String> {
    let mut verifier = Verifier::new(in_code.iter().cloned());
    for path in files {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for key in PublicKey::all_from_pem(&text).map_err(|e| format!("{}: {e}", path.display()))? {
            verifier.trust(key);
        }
    }
    if verifier.key_ids().next().is_none() {
        return Err(
            "no admission key is trusted: set trusted_keys (admission's public key PEM)".into(),
        );
    }
    Ok(verifier)
}

/// Readiness conditions (`/readyz`).
const CONSUMER: &str = "consumer bound";
const PRESENCE: &str = "presence written";
const KEYS: &str = "keys loaded";

/// How long a command runs before its cancel requests are watched.
const CANCEL_WATCH_DELAY: Duration = Duration::from_millis(100);

enum Prepared {
    /// Run it with these parameters; mask these values in what is published.
    Run(Params, Vec<String>),
    /// Nothing more to do: acknowledge.
    Done,
    /// Not now: redeliver after this pause.
    Later(Duration),
    /// Another task of this agent owns the message.
    Leave,
}

/// Resolves with who asked, when a cancel request for `id` is recorded.
async fn cancel_request(js: &jetstream::Context, tower: rct_bus::Tower, id: CommandId) -> String {
    // Commands that finish within this never pay for the watch (a consumer per command);
    // the watch reads the command's history from the start, so an earlier request is seen.
    tokio::time::sleep(CANCEL_WATCH_DELAY).await;
    let filter = Filter {
        command: Some(id),
        kind: Some(EventKind::Cancel),
        tower: Some(tower),
        ..Filter::default()
    };
    loop {
        match replay::follow(js, &filter).await {
            Ok(mut events) => {
                while let Some(item) = events.next().await {
                    if let Ok(Item::Event(record)) = item
                        && let Some(Kind::CancelRequested(c)) = record.event.kind
                    {
                        return c
                            .by
                            .map(|o| {
                                if o.email.is_empty() {
                                    o.subject
                                } else {
                                    o.email
                                }
                            })
                            .unwrap_or_else(|| "someone".into());
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot follow cancel requests; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
