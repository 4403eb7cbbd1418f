//! The tower framework: pull admitted commands, verify, claim once, run the handler with
//! progress, logs, cancellation and a timeout, record exactly one outcome.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt};
use prometheus_client::registry::Registry;
use prost::Message as _;
use rct_bus::catalog::{Secrets, Served};
use rct_bus::presence::Presence;
use rct_bus::proto::{self, event::Kind};
use rct_bus::provenance::{Author, Provenance, Signer, Trust};
use rct_bus::sealed::{Binding, Keys};
use rct_bus::{
    CommandId, EventKind, KeyPair, OperationName, PublicKey, Purpose, Subject, Target, Unverified,
    Verifier,
};
use rct_streams::journal::{self, Look};
use rct_streams::replay::{self, Filter, Item};
use rct_streams::telemetry::{self, Readiness};
use rct_streams::timestamp::{from_datetime, to_datetime};
use rct_streams::topology::{self, AGENTS_BUCKET, CATALOG_BUCKET, CATALOG_KEY, COMMAND_STREAM};
use rct_streams::{Publisher, Slot};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::Instrument as _;

use crate::context::{Context, Failure, Outcome, Params};
use crate::delivery::{self, AfterClaim, Facts, Step};
use crate::metrics::Metrics;
use crate::{Config, Error, emitter};

type Handler =
    Arc<dyn Fn(Context, Params) -> BoxFuture<'static, Result<Outcome, Failure>> + Send + Sync>;

/// What a tower finds wrong with a catalog (one sentence each), checked before it serves.
type CatalogCheck = Arc<dyn Fn(&rct_bus::catalog::Catalog) -> Vec<String> + Send + Sync>;

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
    /// The operations whose handlers plan (see [`Context::planning`]).
    planners: BTreeSet<String>,
    config: Config,
    trusted: Vec<PublicKey>,
    checks: Vec<CatalogCheck>,
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
            planners: BTreeSet::new(),
            config: Config::default(),
            trusted: Vec::new(),
            checks: Vec::new(),
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
        self.planners.remove(name);
        self
    }

    /// Serves operation `name` with `handler`, which can also plan: when
    /// [`Context::planning`] is true it describes what it would change through
    /// [`Context::change`], returns the plan's summary as its outcome's, and changes
    /// nothing. An operation the catalog says plans (`plan: true`) needs such a handler.
    pub fn planning_operation<F, Fut>(self, name: &str, handler: F) -> Self
    where
        F: Fn(Context, Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Outcome, Failure>> + Send + 'static,
    {
        let mut tower = self.operation(name, handler);
        tower.planners.insert(name.to_owned());
        tower
    }

    /// Replaces the settings.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Refuses to serve a catalog in which `check` finds problems (checked against the served
    /// catalog at start; each problem is one sentence).
    pub fn check_catalog(
        mut self,
        check: impl Fn(&rct_bus::catalog::Catalog) -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.checks.push(Arc::new(check));
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
    planners: BTreeSet<String>,
    /// The admission keys trusted now; `trust_reload` replaces it.
    verifier: RwLock<Verifier>,
    /// Keys given in code (`Tower::trust`), kept across reloads.
    trusted: Vec<PublicKey>,
    /// The keys secret parameters are opened with (`secret_keys`), reloaded like trust.
    keys: RwLock<Keys>,
    checks: Vec<CatalogCheck>,
    js: jetstream::Context,
    publisher: Publisher,
    /// The latest served catalog seen (its version is in presence).
    catalog: RwLock<Option<Arc<Served>>>,
    /// Catalog versions commands were checked against, by version.
    catalogs: Mutex<HashMap<String, Arc<Served>>>,
    incarnation: String,
    host: String,
    /// Fired when shutdown is asked for: nothing new is started after it.
    stopping: CancellationToken,
    /// When presence was last written successfully.
    last_heartbeat: Mutex<Option<std::time::Instant>>,
    /// The presence bucket's TTL, as the server has it (else the configured `agent_ttl`).
    presence_ttl: std::sync::OnceLock<Duration>,
    source: String,
    config: Config,
    running: Mutex<HashSet<CommandId>>,
    /// Commands this instance claimed (or tried to) and has not started or ended: a stop
    /// ends them, and a handler starts only by taking its command out of here.
    claims: Mutex<Claims>,
    started_at: OffsetDateTime,
    metrics: Metrics,
    readiness: Readiness,
    /// Signs every event this agent writes, with a key admission certified for its tower and
    /// target (see [`Runner::enrol`]).
    signer: Arc<Signer>,
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
        let keys = load_keys(&tower.config.secret_keys, true).map_err(Error::Config)?;
        let js = tower.config.nats.jetstream(client);
        let incarnation = format!(
            "{}-{}",
            tower.config.instance,
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let signer = Arc::new(Signer::unenrolled());
        Ok(Self {
            source: format!("agent/{name}/{target}/{incarnation}"),
            metrics: Metrics::new(name.as_str(), target.as_str()),
            tower: name,
            target,
            cluster,
            handlers: tower.handlers,
            planners: tower.planners,
            verifier: RwLock::new(verifier),
            trusted: tower.trusted,
            keys: RwLock::new(keys),
            checks: tower.checks,
            publisher: Publisher::new(js.clone()).signing(signer.clone()),
            signer,
            js,
            catalog: RwLock::new(None),
            catalogs: Mutex::default(),
            incarnation,
            host: host_name(),
            stopping: CancellationToken::new(),
            last_heartbeat: Mutex::default(),
            presence_ttl: std::sync::OnceLock::new(),
            config: tower.config,
            running: Mutex::default(),
            claims: Mutex::default(),
            started_at: OffsetDateTime::now_utc(),
            readiness: Readiness::default(),
        })
    }

    async fn serve(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), Error> {
        {
            // `stopping` follows `shutdown`, so deliveries already pulled start nothing new.
            let (shutdown, stopping) = (shutdown.clone(), self.stopping.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                stopping.cancel();
            });
        }
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
        self.check_served_catalog().await?;
        self.readiness.expect(CERTIFIED);
        // Nothing is written before admission certified this agent's key: every event it
        // writes is signed.
        let mut pause = Duration::from_millis(200);
        while let Err(why) = self.enrol().await {
            tracing::warn!(%why, "not certified by admission yet; trying again");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
            // Soon again while admission comes up (an unanswered request costs nothing).
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        self.readiness.set(CERTIFIED, true);
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
        tracker.spawn(self.clone().renew(presence_stop.clone()));

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
        // Presence stays meanwhile too: no other agent calls these unknown first.
        self.end_unstarted().await;
        presence_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        tracing::info!("agent stopped");
        result
    }

    /// Asks admission to certify a fresh key for this agent's tower and target, on
    /// `rct.auth.enrol.<tower>.<target>` (which only this target's agent may publish on), and
    /// signs with it from then on. The certificate must name this agent's tower, target and
    /// key.
    async fn enrol(&self) -> Result<(), String> {
        use proto::enrol_response::Result as R;
        let key = KeyPair::generate();
        let request = proto::EnrolRequest {
            public_key: key.public().to_bytes().to_vec(),
            agent: self.incarnation.clone(),
        };
        let subject = Subject::Enrol {
            tower: self.tower.clone(),
            target: self.target.clone(),
        };
        let client = self.js.client();
        let asked = client.request(subject.to_string(), request.encode_to_vec().into());
        let reply = tokio::time::timeout(ENROL_WITHIN, asked)
            .await
            .map_err(|_| format!("admission did not answer on {subject}"))?
            .map_err(|e| format!("cannot ask admission on {subject}: {e}"))?;
        let response = proto::EnrolResponse::decode(reply.payload)
            .map_err(|e| format!("admission's answer does not decode: {e}"))?;
        let envelope = match response.result {
            Some(R::Certificate(envelope)) => envelope,
            Some(R::Refused(r)) => {
                return Err(format!(
                    "admission refused to certify this agent ({}): {}",
                    r.code, r.message
                ));
            }
            None => return Err("admission's answer holds no certificate".into()),
        };
        // Readers judge the certificate, not this agent: one signed by a key it does not
        // trust yet (a rotation under way) is used, and said.
        let unverified = Unverified::from_proto(envelope.clone());
        let verified = self
            .verifier
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .verify(unverified.clone(), Purpose::AgentCertificate);
        if let Err(e) = verified {
            tracing::warn!(error = %e, "admission's certificate for this agent is not signed by a key it trusts; readers that trust admission's keys judge its events");
        }
        let certificate: proto::AgentCertificate =
            unverified.peek().ok_or("the certificate does not decode")?;
        if certificate.tower != self.tower.as_str()
            || certificate.target != self.target.as_str()
            || certificate.public_key != key.public().to_bytes()
        {
            return Err("the certificate is for another tower, target or key".into());
        }
        let time = |t: Option<prost_types::Timestamp>| t.and_then(|t| SystemTime::try_from(t).ok());
        let (Some(from), Some(until)) = (time(certificate.not_before), time(certificate.not_after))
        else {
            return Err("the certificate has no validity".into());
        };
        if until.duration_since(from).is_err() {
            return Err("the certificate ends before it begins".into());
        }
        self.signer.renew(key, envelope);
        tracing::info!(
            until = %humantime::format_rfc3339_seconds(until),
            "admission certified this agent's key"
        );
        Ok(())
    }

    /// Renews the certificate half-way through its life, with a fresh key; a renewal that
    /// fails is tried again every [`ENROL_RETRY`] (the one in force still holds meanwhile).
    async fn renew(self: Arc<Self>, stop: CancellationToken) {
        loop {
            // Half-way through its life; never a tight loop, whatever a certificate says.
            let wait = match (self.signer.left(), self.signer.life()) {
                (Some(left), Some(life)) => left.saturating_sub(life / 2),
                _ => Duration::ZERO,
            }
            .max(ENROL_RETRY);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if let Err(why) = self.enrol().await {
                tracing::warn!(%why, "cannot renew this agent's certificate; trying again");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(ENROL_RETRY) => {}
                }
            }
        }
    }

    /// Who wrote what this agent reads back, checked against the admission keys it trusts now.
    fn trust(&self) -> Trust {
        Trust::new(
            self.verifier
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    /// Whether the certificate in force holds for a while yet: events written under one that
    /// ran out would not verify.
    fn certified_for_now(&self) -> bool {
        self.signer
            .left()
            .is_some_and(|left| left > CERTIFIED_MARGIN)
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
                    let changed = {
                        let mut verifier = self.verifier.write().unwrap_or_else(|p| p.into_inner());
                        let (before, after) = (ids(&verifier), ids(&fresh));
                        let changed = before != after;
                        if changed {
                            tracing::info!(?before, ?after, "trusted admission keys changed");
                            self.metrics.trusted_keys(after.len());
                            *verifier = fresh;
                        }
                        changed
                    };
                    // A certificate from a key no longer trusted (a rotation's last step) is
                    // replaced now rather than half-way through its life: readers that drop
                    // the key too would take this agent's events for forgeries.
                    let issuer = self.signer.issuer();
                    let untrusted = issuer.as_ref().is_some_and(|issuer| {
                        self.verifier
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .key(issuer)
                            .is_none()
                    });
                    if changed
                        && untrusted
                        && let Err(why) = self.enrol().await
                    {
                        tracing::warn!(%why, "cannot replace a certificate from a key no longer trusted; trying again half-way through its life");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload trusted_keys; keeping the keys trusted so far");
                }
            }
            // What the files hold now, and nothing else: a key removed from them (or a file
            // deleted) is forgotten at once, so destroying a key shreds what was sealed to it.
            let fresh = load_keys(&self.config.secret_keys, false).unwrap_or_default();
            let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
            let (before, after) = (keys.recipients(), fresh.recipients());
            if before != after {
                tracing::info!(
                    ?before,
                    ?after,
                    "secret keys changed (a key file that cannot be read holds none)"
                );
                *keys = fresh;
            }
        }
    }

    /// Before serving: the served catalog must not be one this tower refuses (its own checks),
    /// and for every operation it serves that takes secrets, this agent must hold a key the
    /// values are sealed to. With no catalog served yet, each command is checked instead.
    async fn check_served_catalog(&self) -> Result<(), Error> {
        let served = match topology::served_catalog(&self.js).await {
            Ok(Some(served)) => served,
            Ok(None) => {
                tracing::warn!("no catalog is served yet: the catalog is checked per command");
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "the catalog is checked per command");
                return Ok(());
            }
        };
        let mut problems: Vec<String> = self
            .checks
            .iter()
            .flat_map(|c| c(&served.catalog))
            .collect();
        let held = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .recipients();
        if let Some(tower) = served.catalog.towers.get(self.tower.as_str()) {
            let sealed_to = tower.recipients_for(self.target.as_str());
            for name in self.handlers.keys() {
                let Some(operation) = served
                    .catalog
                    .operations
                    .get(&format!("{}/{name}", self.tower))
                else {
                    continue;
                };
                if operation.plan && !self.planners.contains(name) {
                    problems.push(format!(
                        "operation {name} plans (`plan: true` in the catalog), and this agent's \
                         handler for it cannot: serve it with planning_operation (a script: \
                         `plan: true`)"
                    ));
                }
                let secret: Vec<&str> = operation
                    .params
                    .iter()
                    .filter(|(_, p)| p.secret)
                    .map(|(n, _)| n.as_str())
                    .collect();
                if !secret.is_empty() && !sealed_to.iter().any(|r| held.contains(r)) {
                    problems.push(format!(
                        "operation {name} takes secret parameters ({}), sealed to {}, and this \
                         agent holds none of those keys: give it one in secret_keys",
                        secret.join(", "),
                        if sealed_to.is_empty() {
                            "no one".to_owned()
                        } else {
                            sealed_to.join(", ")
                        }
                    ));
                }
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::Config(format!(
            "tower {} cannot serve catalog {}:\n  {}",
            self.tower,
            served.version,
            problems.join("\n  ")
        )))
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
        if let Ok(status) = bucket.status().await
            && !status.max_age().is_zero()
        {
            let ttl = status.max_age();
            if self.config.heartbeat * 2 > ttl {
                tracing::error!(
                    heartbeat = %humantime::format_duration(self.config.heartbeat),
                    ttl = %humantime::format_duration(ttl),
                    "presence lasts less than two heartbeats: this agent starts nothing until heartbeat is at most half of {AGENTS_BUCKET}'s TTL"
                );
            }
            let _ = self.presence_ttl.set(ttl);
        }
        let host = self.host.clone();
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
            if written.is_ok() {
                *self
                    .last_heartbeat
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
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

    /// Whether agent instance `incarnation` is present, read from the bucket's leader. When
    /// that cannot be read, it counts as alive: nothing is declared unknown on a hunch.
    async fn alive(&self, incarnation: &str) -> bool {
        let key = rct_bus::presence::key(self.tower.as_str(), self.target.as_str(), incarnation);
        journal::present(&self.js, &key).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read presence; taking the holder for alive");
            true
        })
    }

    async fn handle(self: Arc<Self>, message: jetstream::Message, keepalive: Duration) {
        // In-progress acks from receipt: while this copy looks at the journal, waits for the
        // catalog or runs, the server hands no second copy out.
        let keeper = keep_in_progress(&message, keepalive);
        let command = match self.verify(&message) {
            Ok(command) => command,
            Err(refusal) => {
                tracing::warn!(subject = %message.subject, reason = %refusal.reason, retry = ?refusal.retry_until, "refusing a command");
                self.record_refusal(&message, &refusal).await;
                drop(keeper);
                // A key not trusted yet (a rotation under way, a replica behind) may be
                // trusted later, here or by another replica: until the deadline it claims.
                let settle = match refusal.retry_until {
                    Some(until) if OffsetDateTime::now_utc() < until => {
                        AckKind::Nak(Some(self.config.retry_pause))
                    }
                    _ => AckKind::Term,
                };
                let _ = message.ack_with(settle).await;
                return;
            }
        };
        let id: CommandId = command.command_id.parse().expect("checked in verify");
        let command = Arc::new(command);
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
            let settle = self.process(&publisher, &message, command, id).await;
            if matches!(settle, Settle::Ack) {
                // Ended, here or elsewhere: nothing of it is left for a stop to end.
                self.claimed().held.remove(&id);
            }
            drop(keeper);
            settle.apply(&message).await;
        }
        .instrument(span)
        .await
    }

    /// Takes one verified command through the steps of [`delivery`] and says how to settle
    /// its message.
    async fn process(
        &self,
        publisher: &Publisher,
        message: &jetstream::Message,
        command: Arc<proto::Command>,
        id: CommandId,
    ) -> Settle {
        let Some(mark) = Mark::enter(&self.running, id) else {
            // Another copy runs here now: it settles its own message; this one comes back and
            // finds the outcome. Nothing is written for it, Expired least of all.
            return Settle::Later(self.config.retry_pause);
        };
        let past_deadline = || past(command.deadline.as_ref());
        let redelivered = message.info().map_or(true, |i| i.delivered > 1);
        let look = if redelivered || past_deadline() {
            match journal::look_trusting(
                &self.js,
                &self.tower,
                &Target::of_event(&command.target),
                id,
                Some(&self.trust()),
            )
            .await
            {
                Ok(look) => Some(look),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the command's journal; trying later");
                    return Settle::Later(self.config.retry_pause);
                }
            }
        } else {
            None
        };
        if let Some(holder) = look.as_ref().and_then(Look::holder)
            && holder != self.incarnation
        {
            // A claim of ours whose write was not confirmed did not land: not ours to end.
            self.claimed().held.remove(&id);
        }
        let holder_alive = match look.as_ref().and_then(Look::holder) {
            // A holder that is no valid instance name is nobody's presence.
            Some(holder) if holder != self.incarnation => {
                rct_bus::Token::new("instance", holder.to_owned()).is_ok()
                    && self.alive(holder).await
            }
            _ => false,
        };
        let step = delivery::next(Facts {
            running_here: false,
            past_deadline: past_deadline(),
            may_start: self.may_start(),
            journal: look.as_ref(),
            me: &self.incarnation,
            holder_alive,
        });
        tracing::debug!(?step, "next step");
        let expired = || {
            Kind::Expired(proto::Expired {
                deadline: command.deadline,
            })
        };
        match step {
            Step::Busy | Step::HeldElsewhere => Settle::Later(self.config.retry_pause),
            Step::Wait => Settle::Later(RELOOK),
            Step::Ended => {
                if let Some(why) = look.as_ref().and_then(|l| l.doubt.as_deref()) {
                    tracing::error!(%why, "not run: its outcome slot is taken");
                }
                Settle::Ack
            }
            Step::Finish => {
                let holder = look.as_ref().and_then(Look::holder).unwrap_or_default();
                let kind = if past_deadline() {
                    expired()
                } else {
                    failed(
                        "not_run",
                        format!(
                            "{holder} took it to end it without running, and stopped before \
                             recording why; it was not run"
                        ),
                    )
                };
                self.end_held(publisher, &command, kind).await
            }
            Step::Orphaned { holder } => {
                let place = if command.target == Target::NONE {
                    "the system"
                } else {
                    &command.target
                };
                let reason = match look.as_ref().and_then(|l| l.doubt.as_deref()) {
                    // Someone else's event holds the claim: what they did is not known.
                    Some(why) => format!(
                        "{why}: it was not run here, and what its writer did is not known: \
                         check {place} by hand"
                    ),
                    None if holder.is_empty() => format!(
                        "its claim slot holds no readable claim: it was not run here: check \
                         {place} by hand"
                    ),
                    None => format!(
                        "the agent that started it ({holder}) stopped before reporting an \
                         outcome; it is not run again: check {place} by hand"
                    ),
                };
                let unknown = Kind::Unknown(proto::Unknown { reason });
                self.end_held(publisher, &command, unknown).await
            }
            Step::Expire { held: true } => self.end_held(publisher, &command, expired()).await,
            Step::Expire { held: false } => self.end_unrun(publisher, &command, expired()).await,
            Step::Resume => match self.check(&command).await {
                Checked::Run(params, secrets) => {
                    self.run(publisher, &command, id, params, secrets, mark)
                        .await
                }
                Checked::End(kind) => self.end_held(publisher, &command, *kind).await,
                Checked::Later(pause) => Settle::Later(pause),
            },
            Step::Claim => match self.check(&command).await {
                // The check may have waited: "start before" is checked again at the claim.
                Checked::Run(..) if past_deadline() => {
                    self.end_unrun(publisher, &command, expired()).await
                }
                Checked::Run(params, secrets) => match self.claim(publisher, &command, id).await {
                    Ok(AfterClaim::Run) => {
                        self.run(publisher, &command, id, params, secrets, mark)
                            .await
                    }
                    Ok(AfterClaim::Ended) => Settle::Ack,
                    Err(pause) => Settle::Later(pause),
                },
                Checked::End(kind) => self.end_unrun(publisher, &command, *kind).await,
                Checked::Later(pause) => Settle::Later(pause),
            },
        }
    }

    /// Whether this agent may start work now: its presence was refreshed recently enough
    /// that no other agent takes it for dead while it runs, its certificate holds, and it is
    /// not shutting down.
    fn may_start(&self) -> bool {
        if self.stopping.is_cancelled() || !self.certified_for_now() {
            return false;
        }
        let ttl = *self
            .presence_ttl
            .get()
            .unwrap_or(&self.config.streams.agent_ttl);
        self.last_heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() + self.config.heartbeat / 2 < ttl)
    }

    /// Signature (a trusted admission key), then the command's own consistency with the
    /// subject it came on and the agent it reached.
    fn verify(&self, message: &jetstream::Message) -> Result<proto::Command, Refusal> {
        let envelope = Unverified::decode(&message.payload)
            .map_err(|_| Refusal::new("the command is not a signed envelope"))?;
        // What it claims, unverified: only to put a note on that command's timeline, and to
        // know how long a copy signed with a key not trusted yet is worth retrying.
        let peeked = envelope.peek::<proto::Command>();
        let claimed = peeked
            .as_ref()
            .and_then(|c| c.command_id.parse::<CommandId>().ok());
        let claimed_deadline = peeked
            .as_ref()
            .and_then(|c| c.deadline.as_ref())
            .and_then(to_datetime)
            .map(|d| d.min(OffsetDateTime::now_utc() + LONGEST_RETRY));
        let refuse = |reason: String| Refusal {
            reason,
            claimed,
            retry_until: None,
        };
        let verified = self
            .verifier
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .verify(envelope, Purpose::Command)
            .map_err(|e| match e {
                rct_bus::Error::UntrustedKey { key_id } => Refusal {
                    retry_until: claimed_deadline,
                    ..refuse(format!(
                        "the command is signed with key {key_id}, which this agent does not \
                         trust (a retired admission key, or a new one not yet added to \
                         trusted_keys)"
                    ))
                },
                e => refuse(format!("the command's signature is not admission's ({e})")),
            })?;
        let command: proto::Command = verified
            .decode()
            .map_err(|_| refuse("the signed body is not a command".into()))?;
        command
            .command_id
            .parse::<CommandId>()
            .map_err(|_| refuse(format!("command id {:?} is not a ULID", command.command_id)))?;
        let Ok(Subject::Command { operation, target }) = message.subject.parse::<Subject>() else {
            return Err(refuse(format!(
                "{} is not a command subject",
                message.subject
            )));
        };
        if operation.to_string() != command.operation || target.as_str() != command.target {
            return Err(refuse(format!(
                "the command for {} on {} arrived on {}",
                command.operation, command.target, message.subject
            )));
        }
        if operation.tower() != &self.tower || (self.cluster && target != self.target) {
            return Err(refuse(format!("{} is not for this agent", message.subject)));
        }
        Ok(command)
    }

    /// Checks a command against the catalog version it was admitted under, as admission did.
    async fn check(&self, command: &proto::Command) -> Checked {
        let op_name = command.operation.rsplit('/').next().unwrap_or_default();
        if !self.handlers.contains_key(op_name) {
            // Never given up: an agent that has it may come, and the deadline ends the wait.
            tracing::warn!(operation = %command.operation, "no handler here; leaving it for an agent that has one");
            return Checked::Later(self.config.retry_pause);
        }
        let served = match self.catalog(&command.catalog_version).await {
            Catalog::Found(served) => served,
            Catalog::Unavailable(e) => {
                tracing::warn!(error = %e, "the catalog is not available; cannot re-validate, trying later");
                return Checked::Later(self.config.retry_pause);
            }
            Catalog::Missing { kept } => {
                return Checked::End(Box::new(failed(
                    "catalog_unknown",
                    format!(
                        "it was admitted under catalog version {}, which {CATALOG_BUCKET} no \
                         longer holds (it keeps {kept} versions): the agent cannot check it \
                         against what admission checked; submit it again",
                        command.catalog_version
                    ),
                )));
            }
        };
        let invalid = |message: String| Checked::End(Box::new(failed("invalid_params", message)));
        let name: OperationName = match command.operation.parse() {
            Ok(name) => name,
            Err(e) => return invalid(e.to_string()),
        };
        let Some((tower_spec, operation)) = served.catalog.operation(&name) else {
            return invalid(format!("{name} is not in catalog {}", served.version));
        };
        if (command.plan || command.approved_plan.is_some()) && !operation.plan {
            return invalid(format!(
                "it asks for a plan, and {name} does not plan in catalog {}",
                served.version
            ));
        }
        if operation.plan && !self.planners.contains(op_name) {
            return Checked::End(Box::new(failed(
                "cannot_plan",
                format!(
                    "{name} plans (`plan: true`), and this agent's handler for it cannot \
                     describe its changes: it was not run"
                ),
            )));
        }
        // Approvals are checked here too, not taken on admission's word: each approver's own
        // signature over this very request's digest, by a certificate admission issued.
        if let Some(rule) = &operation.approvals {
            let trusted = self
                .verifier
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let checked = rct_bus::approval::requested(command, tower_spec, operation, &trusted)
                .and_then(|requester| {
                    if command.plan {
                        // It changes nothing: what it describes is what approvers approve.
                        Ok(vec![requester])
                    } else if command.break_glass.is_empty() {
                        if operation.plan && command.approved_plan.is_none() {
                            return Err(
                                "it carries no approved plan, and the operation plans".into()
                            );
                        }
                        rct_bus::approval::verify(command, &requester, rule, &trusted)
                    } else {
                        match &operation.break_glass {
                            Some(glass) => rct_bus::approval::verify_break_glass(&requester, glass)
                                .map(|()| vec![requester]),
                            None => {
                                Err("it broke the glass, which the operation does not allow".into())
                            }
                        }
                    }
                });
            match checked {
                Ok(approvers) => {
                    let names: Vec<&str> = approvers
                        .iter()
                        .map(|a| a.operator.email.as_str())
                        .collect();
                    if command.plan {
                        tracing::info!(requester = %names.join(", "), "plan only: the request is verified");
                    } else if command.break_glass.is_empty() {
                        tracing::info!(approvers = %names.join(", "), "approvals verified");
                    } else {
                        tracing::warn!(requester = %names.join(", "), reason = %command.break_glass, "run by breaking the glass: no approvals");
                    }
                }
                Err(why) => {
                    return Checked::End(Box::new(failed(
                        "approvals_invalid",
                        format!(
                            "{name} needs {} approvals from {}, and {why}: it was not run",
                            rule.required,
                            rule.approver_groups.join(", ")
                        ),
                    )));
                }
            }
        }
        let given = match self.open_secrets(command, operation) {
            Ok(given) => given,
            Err(kind) => return Checked::End(kind),
        };
        let checked = match operation.check(tower_spec, &given, Secrets::Open) {
            Ok(checked) => checked,
            Err(errors) => {
                let messages: Vec<String> = errors.into_iter().map(|e| e.message).collect();
                return invalid(messages.join("; "));
            }
        };
        if checked.target.as_str() != command.target {
            return invalid("the target disagrees with the parameters".into());
        }
        let secret: Vec<&String> = operation
            .params
            .iter()
            .filter(|(_, p)| p.secret)
            .map(|(n, _)| n)
            .collect();
        let masked = secret
            .iter()
            .filter_map(|n| checked.params.get(*n))
            .flat_map(|v| emitter::forms(&rct_bus::catalog::display_value(v)))
            .collect();
        let params = Params::new(checked.params).with_secrets(secret.into_iter().cloned());
        Checked::Run(params, masked)
    }

    /// The command's parameters with every sealed secret opened; a secret that does not open
    /// ends the command with a failure that says why.
    fn open_secrets(
        &self,
        command: &proto::Command,
        operation: &rct_bus::catalog::Operation,
    ) -> Result<BTreeMap<String, proto::Value>, Box<Kind>> {
        let mut given = command.params.clone();
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let secret = operation.params.iter().filter(|(_, p)| p.secret);
        for name in secret.map(|(name, _)| name) {
            let sealed = match given.get(name).and_then(|v| v.kind.as_ref()) {
                Some(proto::value::Kind::Sealed(sealed)) => sealed,
                // Missing: the check says so.
                None => continue,
                Some(proto::value::Kind::Masked(_)) => {
                    return Err(Box::new(failed(
                        "secret_not_sealed",
                        format!(
                            "secret parameter {name} arrived masked, with no value: the command \
                             was rebuilt from a record that holds none (a secret's default in an \
                             older catalog); fire it again"
                        ),
                    )));
                }
                Some(_) => {
                    return Err(Box::new(failed(
                        "secret_not_sealed",
                        format!(
                            "secret parameter {name} arrived in clear, so the command stream \
                             holds it: not run. Replace that secret, and check the version of \
                             admission that signed this command"
                        ),
                    )));
                }
            };
            if keys.is_empty() {
                return Err(Box::new(failed(
                    "secret_undecryptable",
                    format!(
                        "secret parameter {name} is sealed, and this agent has no secret key \
                         to open it: set secret_keys (rct-agent keygen makes one)"
                    ),
                )));
            }
            let binding = Binding {
                command_id: command.command_id.clone(),
                operation: command.operation.clone(),
                target: command.target.clone(),
                param: name.clone(),
                operator: command
                    .operator
                    .as_ref()
                    .map(|o| o.subject.clone())
                    .unwrap_or_default(),
                params: rct_bus::sealed::params_digest(&command.params, |n| {
                    operation.params.get(n).is_some_and(|p| p.secret)
                }),
            };
            match keys.open(sealed, &binding) {
                Ok(value) => {
                    given.insert(name.clone(), value);
                }
                Err(e) => {
                    tracing::warn!(param = %name, code = e.code(), "a secret parameter does not open");
                    return Err(Box::new(failed(
                        e.code(),
                        format!("secret parameter {name} cannot be opened: {e}"),
                    )));
                }
            }
        }
        Ok(given)
    }

    /// Claims the command (single slot), then looks at its outcome slot: an outcome written
    /// before the claim landed (a rival's `Expired`) means it must not run. A claim that
    /// comes back as a duplicate of our own id is ours (an earlier attempt whose
    /// acknowledgement was lost), not a rival's. `Err` carries the pause before trying again.
    async fn claim(
        &self,
        publisher: &Publisher,
        command: &Arc<proto::Command>,
        id: CommandId,
    ) -> Result<AfterClaim, Duration> {
        {
            // Tracked before the write: a write whose acknowledgement is lost may have
            // landed. Once a stop took the claims to end them, nothing more is claimed.
            let mut claims = self.claimed();
            if claims.closed {
                return Err(self.config.retry_pause);
            }
            claims.held.insert(
                id,
                Claimed {
                    command: command.clone(),
                    publisher: publisher.clone(),
                    confirmed: false,
                },
            );
        }
        let claim = self.claim_event(command, false);
        match publisher
            .event(&self.tower, &claim, &self.incarnation)
            .await
        {
            Ok(Slot::Written(_)) => {
                if let Some(claimed) = self.claimed().held.get_mut(&id) {
                    claimed.confirmed = true;
                }
            }
            Ok(Slot::Taken { .. }) => {
                // Someone else claimed it first; its redelivery finds their claim.
                self.claimed().held.remove(&id);
                return Err(RELOOK);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim; trying later");
                return Err(self.config.retry_pause);
            }
        }
        // The claim is ours and nothing ran. This delivery keeps it (its in-progress acks go
        // on) and reads the slot again, rather than hand it to an agent that would only find
        // it held; for a while, then the next delivery resumes it. It starts nothing once
        // this agent may not (a stop asked for, presence not fresh): a later delivery
        // resumes it, or the stop ends it unrun.
        for read in 1..=READS {
            let target = Target::of_event(&command.target);
            let outcome = match journal::slot_trusting(
                &self.js,
                &self.tower,
                &target,
                id,
                EventKind::Outcome,
                Some(&self.trust()),
            )
            .await
            {
                // Something that is not an event holds the slot: nobody can record an
                // outcome, so nothing may run.
                Err(rct_streams::Error::Malformed { .. }) => Some(proto::Event::default()),
                Ok(outcome) => {
                    if let Some((_, Some(why))) = &outcome {
                        tracing::error!(%why, "not run: its outcome slot is taken");
                    }
                    outcome.map(|(event, _)| event)
                }
                Err(e) => {
                    tracing::warn!(error = %e, read, "cannot read the outcome slot after claiming; reading again");
                    let given_up =
                        past(command.deadline.as_ref()) || !self.claimed().held.contains_key(&id);
                    if given_up {
                        break;
                    }
                    tokio::select! {
                        _ = self.stopping.cancelled() => break,
                        _ = tokio::time::sleep(REREAD) => continue,
                    }
                }
            };
            let next = delivery::after_claim(outcome.is_some());
            if next == AfterClaim::Ended {
                tracing::warn!("an outcome was recorded before our claim; not running it");
            } else if !self.may_start() {
                break;
            }
            return Ok(next);
        }
        Err(self.config.retry_pause)
    }

    /// The commands claimed here and not started or ended.
    fn claimed(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends every command this instance claimed and never started: once it is gone, the
    /// next agent would find a claim whose holder left no outcome and record `Unknown` for a
    /// command that never ran. A claim whose write was never confirmed is ended only if the
    /// journal shows it ours. All at once, for at most [`END_UNSTARTED_WITHIN`]; what is left
    /// then ends `Unknown`.
    async fn end_unstarted(&self) {
        let claimed: Vec<(CommandId, Claimed)> = {
            let mut claims = self.claimed();
            claims.closed = true;
            claims.held.drain().collect()
        };
        if claimed.is_empty() {
            return;
        }
        let ending = futures::future::join_all(claimed.iter().map(|(id, claimed)| async move {
            while let Err(e) = self.end_claimed(*id, claimed).await {
                tracing::warn!(command_id = %id, error = %e, "cannot end a claim never started; trying again");
                tokio::time::sleep(REREAD).await;
            }
        }));
        if tokio::time::timeout(END_UNSTARTED_WITHIN, ending)
            .await
            .is_err()
        {
            tracing::warn!(
                "claims never started are left without an outcome; the next agent records \
                 them unknown"
            );
        }
    }

    async fn end_claimed(&self, id: CommandId, claimed: &Claimed) -> rct_streams::Result<()> {
        if !claimed.confirmed {
            let target = Target::of_event(&claimed.command.target);
            // A claim naming this incarnation that it did not sign is not its own.
            let trust = self.trust();
            let look =
                journal::look_trusting(&self.js, &self.tower, &target, id, Some(&trust)).await?;
            if look.outcome.is_some() || look.holder() != Some(self.incarnation.as_str()) {
                return Ok(());
            }
        }
        let command = &claimed.command;
        let kind = if past(command.deadline.as_ref()) {
            Kind::Expired(proto::Expired {
                deadline: command.deadline,
            })
        } else {
            failed(
                "not_run",
                format!(
                    "agent {} claimed it and stopped before starting it; it was not run: fire \
                     it again",
                    self.incarnation
                ),
            )
        };
        let event = self.event(command, kind.clone());
        // A rival's outcome recorded first wins the single slot: the command is ended then too.
        claimed
            .publisher
            .event(&self.tower, &event, &self.incarnation)
            .await?;
        self.count_unrun(command, &kind);
        Ok(())
    }

    /// Runs a claimed command to its one outcome.
    async fn run(
        &self,
        publisher: &Publisher,
        command: &Arc<proto::Command>,
        id: CommandId,
        params: Params,
        secrets: Vec<String>,
        mark: Mark<'_>,
    ) -> Settle {
        let op_name = command
            .operation
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let handler = self.handlers[&op_name].clone();
        if self.claimed().held.remove(&id).is_none() {
            // A stop took it to end it: never both ended unrun and run.
            return Settle::Later(self.config.retry_pause);
        }
        // From here the command stays marked running until its outcome is written, whatever
        // happens: a copy delivered meanwhile never resumes it.
        let running = mark.hold();
        tracing::info!(operation = %command.operation, target = %command.target, "started");
        self.metrics.started();
        let began = std::time::Instant::now();

        let trust = self.trust();
        let cancel_watch = AbortOnDropHandle::new(tokio::spawn(cancel_request(
            self.js.clone(),
            self.tower.clone(),
            Target::of_event(&command.target),
            id,
            trust,
        )));
        let timeout = command
            .timeout
            .as_ref()
            .map_or(DEFAULT_TIMEOUT, rct_streams::timestamp::to_std_duration);
        let finish_by = OffsetDateTime::now_utc()
            .checked_add(timeout.try_into().unwrap_or(time::Duration::MAX))
            .unwrap_or(OffsetDateTime::new_utc(
                time::Date::MAX,
                time::Time::MIDNIGHT,
            ));
        let (emitter, emitting) = emitter::start(
            publisher.clone(),
            self.tower.clone(),
            self.event(command, Kind::Log(proto::Log::default())),
            secrets.clone(),
            &self.config.output,
        );
        let token = CancellationToken::new();
        // Whatever the handler started with the context's token stops when the command ends.
        let _stop = token.clone().drop_guard();
        let ctx = Context::new(command.clone(), finish_by, token.clone(), emitter);
        let work = Box::pin(work(
            handler,
            ctx,
            params,
            command.clone(),
            secrets.clone(),
            self.config.output.clone(),
        ));
        // A panic in the handler is its failure, not the agent's: caught here.
        let mut work = std::panic::AssertUnwindSafe(work).catch_unwind();

        enum Ended {
            Done(std::thread::Result<Result<Work, Failure>>),
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
        drop(cancel_watch);
        // Every progress and log line is out before the outcome.
        emitting.finish().await;

        let mut plan = None;
        let kind = match (ended, late) {
            (_, Some(Ok(Ok(Work::Ran(outcome))))) => Kind::Succeeded(proto::Succeeded {
                summary: outcome.summary,
                outputs: outcome.outputs.into_iter().collect(),
            }),
            (_, Some(Ok(Ok(Work::Planned(made))))) => {
                let summary = format!(
                    "planned {} change{}: {}",
                    made.changes.len(),
                    if made.changes.len() == 1 { "" } else { "s" },
                    made.summary
                );
                plan = Some(made);
                Kind::Succeeded(proto::Succeeded {
                    summary,
                    outputs: Default::default(),
                })
            }
            (_, Some(Ok(Ok(Work::Stale { approved, fresh })))) => Kind::Failed(proto::Failed {
                code: "stale_plan".into(),
                message: format!(
                    "what it would change now is not the plan that was approved ({}); nothing \
                     was changed: submit it again to have the new plan approved",
                    plan_difference(&approved, &fresh)
                ),
                approved_plan: Some(approved),
                fresh_plan: Some(fresh),
            }),
            (Some(Ended::Cancelled(by)), _) => Kind::Cancelled(proto::Cancelled {
                reason: format!("cancelled by {by}"),
            }),
            (Some(Ended::TimedOut), _) => failed(
                "timeout",
                format!(
                    "did not finish within {}",
                    humantime::format_duration(timeout)
                ),
            ),
            (_, Some(Ok(Err(failure)))) => failed(&failure.code, failure.message),
            (_, Some(Err(panic))) => failed(
                "panic",
                format!(
                    "the handler panicked: {}; what it changed before is not known",
                    panic_message(&*panic)
                ),
            ),
            (_, None) => failed(
                "abandoned",
                "the handler did not stop after cancellation".into(),
            ),
        };
        let summary = match &kind {
            Kind::Succeeded(_) => "succeeded",
            Kind::Cancelled(_) => "cancelled",
            _ => "failed",
        };
        // The plan before the outcome: whoever sees the outcome finds the plan.
        let mut kind = kind;
        if let Some(plan) = plan
            && let Err(why) = self.record_plan(publisher, command, plan).await
        {
            kind = failed("plan_not_recorded", why);
        }
        // Masked and bounded like every other event: an outcome must always be publishable.
        let kind = emitter::bound_kind(kind, &secrets, &self.config.output);
        self.record_outcome(publisher, command, kind).await;
        running.release();
        self.metrics.ended(&op_name, summary, began.elapsed());
        tracing::info!(outcome = summary, "finished");
        Settle::Ack
    }

    /// Writes the plan a plan-only command's handler made, trying until it is stored or the
    /// server refuses it for what it is (too large, say): the error says why.
    async fn record_plan(
        &self,
        publisher: &Publisher,
        command: &proto::Command,
        plan: proto::Plan,
    ) -> Result<(), String> {
        let event = self.event(command, Kind::Plan(plan));
        loop {
            match publisher
                .event(&self.tower, &event, &self.incarnation)
                .await
            {
                Ok(Slot::Written(_)) => return Ok(()),
                Ok(Slot::Taken { sequence }) => {
                    return Err(format!(
                        "another plan was recorded for it first (event {sequence})"
                    ));
                }
                Err(e) if emitter::refused(&e) => {
                    return Err(format!("the plan could not be recorded: {e}"));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record the plan yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Writes the outcome of a command that ran, trying until it is stored (the command stays
    /// running here meanwhile). An outcome the server refuses for good (too large, say) is
    /// replaced by a failure that says so.
    async fn record_outcome(&self, publisher: &Publisher, command: &proto::Command, kind: Kind) {
        let mut kind = kind;
        loop {
            let event = self.event(command, kind.clone());
            match publisher
                .event(&self.tower, &event, &self.incarnation)
                .await
            {
                Ok(Slot::Written(_)) => return,
                Ok(Slot::Taken { sequence }) => {
                    // The journal must still say what happened here.
                    tracing::error!(
                        sequence,
                        "another outcome was recorded first (an agent took this one for dead)"
                    );
                    let note = self.event(
                        command,
                        Kind::Log(proto::Log {
                            stream: proto::LogStream::Agent as i32,
                            line: format!(
                                "agent {} ran this command and it {}, but another outcome had \
                                 been recorded first (event {sequence}): that outcome is not \
                                 what happened here",
                                self.incarnation,
                                describe(&kind)
                            ),
                            undone_by: String::new(),
                        }),
                    );
                    self.note(&note, format!("late-{}", self.incarnation)).await;
                    return;
                }
                // Refused for what it is (never for the state the server is in, which passes):
                // record that instead, so the command still ends.
                Err(e)
                    if emitter::refused(&e)
                        && !matches!(&kind, Kind::Failed(f) if f.code == "outcome_refused") =>
                {
                    tracing::error!(error = %e, "the server refuses the outcome; recording why instead");
                    let why = failed(
                        "outcome_refused",
                        format!(
                            "the handler ended ({}), but its outcome could not be recorded: {e}",
                            describe(&kind)
                        ),
                    );
                    // Small whatever `max_line` allows: this one must fit.
                    let small = crate::config::Output {
                        max_line: self.config.output.max_line.min(1024),
                        ..self.config.output.clone()
                    };
                    kind = emitter::bound_kind(why, &[], &small);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record the outcome yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Ends a command this agent holds the claim of (or whose holder is gone) without running
    /// it: the outcome slot is single, so a rival's outcome wins and ours is dropped.
    async fn end_held(
        &self,
        publisher: &Publisher,
        command: &proto::Command,
        kind: Kind,
    ) -> Settle {
        self.count_unrun(command, &kind);
        let event = self.event(command, kind);
        match publisher
            .event(&self.tower, &event, &self.incarnation)
            .await
        {
            Ok(_) => Settle::Ack,
            Err(e) => {
                tracing::warn!(error = %e, "cannot record the outcome; trying later");
                Settle::Later(self.config.retry_pause)
            }
        }
    }

    /// Ends an unclaimed command without running it: takes its claim marked
    /// `without_running`, then records `kind` ([`journal::end_unrun`]). If someone claimed it
    /// first, the command is looked at again.
    async fn end_unrun(
        &self,
        publisher: &Publisher,
        command: &proto::Command,
        kind: Kind,
    ) -> Settle {
        let claim = self.claim_event(command, true);
        let outcome = self.event(command, kind.clone());
        match journal::end_unrun(publisher, &self.tower, &claim, &outcome, &self.incarnation).await
        {
            Ok(journal::Ended::Recorded) => {
                self.count_unrun(command, &kind);
                Settle::Ack
            }
            Ok(journal::Ended::ClaimedElsewhere) => Settle::Later(RELOOK),
            Err(e) => {
                // A claim taken unrun and no outcome yet: the next delivery finishes it.
                tracing::warn!(error = %e, "cannot record the outcome; trying later");
                Settle::Later(self.config.retry_pause)
            }
        }
    }

    fn count_unrun(&self, command: &proto::Command, kind: &Kind) {
        let operation = command.operation.rsplit('/').next().unwrap_or_default();
        let (label, code, message) = match kind {
            Kind::Expired(_) => ("expired", "expired", "past its deadline"),
            Kind::Unknown(u) => ("unknown", "unknown", u.reason.as_str()),
            Kind::Failed(f) => ("refused", f.code.as_str(), f.message.as_str()),
            _ => ("refused", "", ""),
        };
        tracing::warn!(code, %message, "ended without running");
        self.metrics.count(operation, label);
    }

    /// Records a refused command: under an id derived from its place in `RCT_CMD` (the same
    /// on every redelivery; the id in a forged command could be a real command's, whose slots
    /// must not be taken by the forgery), and, when it names a command id, as a note on that
    /// command's timeline (a log line, never a slot), so whoever waits for it learns why.
    async fn record_refusal(&self, message: &jetstream::Message, refusal: &Refusal) {
        let (operation, target) = match message.subject.parse::<Subject>() {
            Ok(Subject::Command { operation, target }) => {
                (operation.to_string(), target.to_string())
            }
            _ => (String::new(), String::new()),
        };
        let (sequence, stored) = message
            .info()
            .map(|i| (i.stream_sequence, i.published))
            .unwrap_or((0, OffsetDateTime::now_utc()));
        let id = CommandId::derived(stored.into(), COMMAND_STREAM, sequence, &message.payload);
        let record = proto::Event {
            command_id: id.to_string(),
            at: Some(from_datetime(OffsetDateTime::now_utc())),
            source: self.source.clone(),
            operation: operation.clone(),
            target: target.clone(),
            kind: Some(failed(
                "refused",
                if refusal.retry_until.is_some() {
                    format!(
                        "{}; it was not run, and is delivered again until its deadline",
                        refusal.reason
                    )
                } else {
                    format!("{}; it was not run", refusal.reason)
                },
            )),
        };
        self.note(&record, &self.incarnation).await;
        if let Some(claimed) = refusal.claimed {
            let note = proto::Event {
                command_id: claimed.to_string(),
                kind: Some(Kind::Log(proto::Log {
                    stream: proto::LogStream::Agent as i32,
                    line: format!(
                        "{} agent {} refused a copy of this command from {}: {}; \
                         that copy was not run{} (see {})",
                        if refusal.retry_until.is_some() {
                            rct_bus::REFUSAL_NOTE_FOR_NOW
                        } else {
                            rct_bus::REFUSAL_NOTE
                        },
                        self.incarnation,
                        message.subject,
                        refusal.reason,
                        if refusal.retry_until.is_some() {
                            ", and is delivered again until its deadline"
                        } else {
                            ""
                        },
                        record.command_id
                    ),
                    undone_by: String::new(),
                })),
                ..record
            };
            let n = format!("refused-{sequence}");
            self.note(&note, n).await;
        }
    }

    /// Publishes a record of a refusal (the publisher retries for about a minute); one that
    /// cannot be stored is logged, and the refused command is not run either way.
    async fn note(&self, event: &proto::Event, n: impl std::fmt::Display) {
        if let Err(e) = self.publisher.event(&self.tower, event, n).await {
            tracing::error!(command_id = %event.command_id, error = %e, "cannot record a refusal");
        }
    }

    /// This agent's claim of `command`: to run it, or only to end it `without_running`.
    fn claim_event(&self, command: &proto::Command, without_running: bool) -> proto::Event {
        self.event(
            command,
            Kind::Started(proto::Started {
                agent: self.incarnation.clone(),
                host: self.host.clone(),
                target: command.target.clone(),
                without_running,
            }),
        )
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

    /// The served catalog of `version`: the cached one, the one served now, or an earlier
    /// one from the bucket's history (a command is checked against the version it was
    /// admitted under, never a later one).
    async fn catalog(&self, version: &str) -> Catalog {
        if let Some(cached) = self
            .catalogs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(version)
        {
            return Catalog::Found(cached.clone());
        }
        let bucket = match self.js.get_key_value(CATALOG_BUCKET).await {
            Ok(bucket) => bucket,
            Err(e) => return Catalog::Unavailable(e.to_string()),
        };
        let latest = match bucket.entry(CATALOG_KEY).await {
            Ok(Some(entry)) => entry,
            Ok(None) => return Catalog::Unavailable("no catalog is served yet".into()),
            Err(e) => return Catalog::Unavailable(e.to_string()),
        };
        // The bucket holds one key, so its earlier versions are the revisions before the
        // latest; the oldest ones may have been aged out (catalog_history).
        let mut kept = 0;
        let mut found = None;
        let oldest = latest.revision.saturating_sub(CATALOGS_CACHED as u64);
        let mut entry = Some(latest.clone());
        let mut revision = latest.revision;
        while revision > oldest {
            if let Some(e) = entry.take()
                && let Ok(served) = serde_json::from_slice::<Served>(&e.value)
            {
                kept += 1;
                let served = Arc::new(served);
                if e.revision == latest.revision {
                    *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = Some(served.clone());
                }
                if served.version == version {
                    found = Some(served);
                    break;
                }
            }
            revision -= 1;
            if revision == 0 {
                break;
            }
            entry = match bucket.entry_for_revision(CATALOG_KEY, revision).await {
                Ok(entry) => entry,
                Err(e) if e.kind() == async_nats::jetstream::kv::EntryErrorKind::TimedOut => {
                    return Catalog::Unavailable(e.to_string());
                }
                // Aged out, or not a catalog entry: look further back.
                Err(_) => None,
            };
        }
        match found {
            Some(served) => {
                let mut cache = self.catalogs.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= CATALOGS_CACHED {
                    cache.clear();
                }
                cache.insert(version.to_owned(), served.clone());
                Catalog::Found(served)
            }
            None => Catalog::Missing { kept },
        }
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

/// Every key in `files` (none: an agent that takes no secrets); an error says which file and
/// why, never what it holds. At start (`strict`) a file that cannot be used is an error; later
/// it holds no keys (it was deleted or emptied: its keys are gone), and says so.
fn load_keys(files: &[std::path::PathBuf], strict: bool) -> Result<Keys, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut keys = Keys::default();
    for path in files {
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read secret key file {}: {e}", path.display()))
            .and_then(|text| Keys::parse(&text).map_err(|e| format!("{}: {e}", path.display())));
        match parsed {
            Ok(more) => keys.extend(more),
            Err(e) if strict => return Err(e),
            Err(e) => tracing::debug!(error = %e, "the keys of this file are dropped"),
        }
        if strict
            && let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(file = %path.display(), "the secret key file is readable by others than its owner; chmod 600 it");
        }
    }
    Ok(keys)
}

/// Readiness conditions (`/readyz`).
const CONSUMER: &str = "consumer bound";
const PRESENCE: &str = "presence written";
const KEYS: &str = "keys loaded";
const CERTIFIED: &str = "certified by admission";

/// How long admission has to answer an enrolment.
const ENROL_WITHIN: Duration = Duration::from_secs(5);

/// The longest pause between attempts to enrol or renew.
const ENROL_RETRY: Duration = Duration::from_secs(10);

/// Nothing new is started under a certificate with less than this left.
const CERTIFIED_MARGIN: Duration = Duration::from_secs(60);

/// A command's timeout when it carries none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// After a write found the journal changed under it: look again soon.
const RELOOK: Duration = Duration::from_millis(200);

/// The longest a copy signed with a key not trusted yet is delivered again, whatever
/// deadline it claims.
const LONGEST_RETRY: time::Duration = time::Duration::hours(1);

/// Catalog versions kept in memory (the bucket keeps at most 64).
const CATALOGS_CACHED: usize = 64;

/// The pause before reading a slot again, or writing an outcome again, when it failed.
const REREAD: Duration = Duration::from_secs(1);

/// How often the delivery that claimed a command reads its outcome slot before it leaves it
/// to the next delivery.
const READS: u32 = 30;

/// How long a stop tries to end the claims it never started.
const END_UNSTARTED_WITHIN: Duration = Duration::from_secs(10);

/// How long a command runs before its cancel requests are watched.
const CANCEL_WATCH_DELAY: Duration = Duration::from_millis(100);

/// The commands this instance claimed (or tried to) and has neither started nor ended.
#[derive(Default)]
struct Claims {
    held: HashMap<CommandId, Claimed>,
    /// A stop took them to end them: nothing more is claimed.
    closed: bool,
}

/// A command this instance claimed and has not started or ended.
struct Claimed {
    command: Arc<proto::Command>,
    /// The publisher its events go out with (its trace).
    publisher: Publisher,
    /// The claim's write was acknowledged as ours (else it may or may not have landed).
    confirmed: bool,
}

/// Whether `deadline` (none: always) has passed.
fn past(deadline: Option<&prost_types::Timestamp>) -> bool {
    deadline
        .and_then(to_datetime)
        .is_none_or(|d| OffsetDateTime::now_utc() > d)
}

/// How a delivery's message is settled.
#[derive(Debug)]
enum Settle {
    /// Done with it, for good.
    Ack,
    /// Not now: redeliver after this pause.
    Later(Duration),
}

impl Settle {
    async fn apply(self, message: &jetstream::Message) {
        match self {
            Settle::Ack => {
                for _ in 0..5 {
                    if message.double_ack().await.is_ok() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                tracing::warn!("cannot acknowledge; the next delivery finds the outcome");
            }
            Settle::Later(pause) => {
                let _ = message.ack_with(AckKind::Nak(Some(pause))).await;
            }
        }
    }
}

/// A command marked running in this agent. Dropped before the handler starts, the mark goes;
/// once [`Mark::hold`] is called it stays until [`Held::release`], after the outcome is
/// written, so no later copy takes a command that started here for one that never ran.
struct Mark<'a> {
    running: &'a Mutex<HashSet<CommandId>>,
    id: CommandId,
}

impl<'a> Mark<'a> {
    /// Marks `id` running; `None` if it already is.
    fn enter(running: &'a Mutex<HashSet<CommandId>>, id: CommandId) -> Option<Self> {
        // Not `then_some`: it would build (and drop) a mark for the copy already running,
        // removing that copy's mark.
        let fresh = running.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
        if fresh {
            Some(Self { running, id })
        } else {
            None
        }
    }

    fn hold(self) -> Held<'a> {
        let held = Held {
            running: self.running,
            id: self.id,
        };
        std::mem::forget(self);
        held
    }
}

impl Drop for Mark<'_> {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// A command whose handler started here; see [`Mark`].
struct Held<'a> {
    running: &'a Mutex<HashSet<CommandId>>,
    id: CommandId,
}

impl Held<'_> {
    fn release(self) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// The result of checking a command before running it.
enum Checked {
    /// Run it with these parameters; mask these values in what is published.
    Run(Params, Vec<String>),
    /// End it without running, with this outcome (boxed: an event body is large).
    End(Box<Kind>),
    /// Not now: redeliver after this pause.
    Later(Duration),
}

/// A catalog version looked up.
enum Catalog {
    Found(Arc<Served>),
    /// The bucket answers but no longer holds it; `kept` versions are there.
    Missing {
        kept: usize,
    },
    /// The bucket cannot be read now.
    Unavailable(String),
}

/// Why a command was refused, the command id it claims (unverified), and until when it is
/// delivered again (a key not trusted yet), if it is.
#[derive(Debug)]
struct Refusal {
    reason: String,
    claimed: Option<CommandId>,
    retry_until: Option<OffsetDateTime>,
}

impl Refusal {
    fn new(reason: &str) -> Self {
        Self {
            reason: reason.to_owned(),
            claimed: None,
            retry_until: None,
        }
    }
}

/// Starts in-progress acks for `message` every `every`, until the handle is dropped.
fn keep_in_progress(message: &jetstream::Message, every: Duration) -> AbortOnDropHandle<()> {
    let message = message.clone();
    AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            let _ = message.ack_with(AckKind::Progress).await;
            tokio::time::sleep(every).await;
        }
    }))
}

/// This machine's name, as reported in claims and presence.
fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// What a handler's work came to.
enum Work {
    /// It ran.
    Ran(Outcome),
    /// It planned (a plan-only command).
    Planned(proto::Plan),
    /// The plan it made before running is not the approved one: it did not run.
    Stale {
        approved: proto::Plan,
        fresh: proto::Plan,
    },
}

/// Runs `command` with `handler`: only its plan for a plan-only command; for a command that
/// carries its approved plan, the plan again first, and the command itself only if that plan
/// is the approved one.
async fn work(
    handler: Handler,
    ctx: Context,
    params: Params,
    command: Arc<proto::Command>,
    secrets: Vec<String>,
    output: crate::config::Output,
) -> Result<Work, Failure> {
    let plan = |params: Params| {
        let (planning, changes) = ctx.for_plan();
        let made = handler(planning, params);
        let (secrets, output) = (&secrets, &output);
        async move {
            let outcome = made.await?;
            let changes = std::mem::take(
                &mut *changes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            let plan = proto::Plan {
                summary: outcome.summary,
                changes,
            };
            Ok::<_, Failure>(emitter::bound_plan(plan, secrets, output))
        }
    };
    if command.plan {
        return plan(params).await.map(Work::Planned);
    }
    if let Some(approved) = &command.approved_plan {
        let fresh = plan(params.clone()).await?;
        if fresh != *approved {
            return Ok(Work::Stale {
                approved: approved.clone(),
                fresh,
            });
        }
    }
    handler(ctx, params).await.map(Work::Ran)
}

/// Where two plans part, in a few words.
fn plan_difference(approved: &proto::Plan, fresh: &proto::Plan) -> String {
    let shown = |c: &proto::Change| format!("{} {} {}", c.action, c.resource, c.detail);
    let first = approved
        .changes
        .iter()
        .zip(&fresh.changes)
        .position(|(a, f)| a != f);
    match first {
        Some(n) => format!(
            "change {} was \"{}\" and is now \"{}\"",
            n + 1,
            shown(&approved.changes[n]).trim(),
            shown(&fresh.changes[n]).trim()
        ),
        None if approved.changes.len() != fresh.changes.len() => format!(
            "{} changes were approved, and it would make {}",
            approved.changes.len(),
            fresh.changes.len()
        ),
        None => format!(
            "the summary was \"{}\" and is now \"{}\"",
            approved.summary, fresh.summary
        ),
    }
}

fn failed(code: &str, message: String) -> Kind {
    Kind::Failed(proto::Failed {
        code: code.to_owned(),
        message,
        ..Default::default()
    })
}

/// How a command ended, in words.
fn describe(kind: &Kind) -> String {
    match kind {
        Kind::Succeeded(s) => format!("succeeded ({})", s.summary),
        Kind::Failed(f) => format!("failed ({}: {})", f.code, f.message),
        Kind::Cancelled(c) => format!("was cancelled ({})", c.reason),
        _ => "ended".into(),
    }
}

/// The text a panic carried, when it carried text.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Resolves with who asked, when a cancel request for `id` is recorded at its own target
/// (where only admission may write one) and signed by admission: any other is ignored.
async fn cancel_request(
    js: jetstream::Context,
    tower: rct_bus::Tower,
    target: Target,
    id: CommandId,
    trust: Trust,
) -> String {
    // Commands that finish within this never pay for the watch (a subscription and reads per
    // command);
    // the watch reads the command's history from the start, so an earlier request is seen.
    tokio::time::sleep(CANCEL_WATCH_DELAY).await;
    let filter = Filter {
        command: Some(id),
        kind: Some(EventKind::Cancel),
        tower: Some(tower),
        target: Some(target),
        trust: Some(Arc::new(trust)),
        ..Filter::default()
    };
    loop {
        match replay::follow(&js, &filter).await {
            Ok(mut events) => {
                while let Some(item) = events.next().await {
                    if let Ok(Item::Event(record)) = item
                        && record.provenance == Provenance::Verified(Author::Admission)
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
