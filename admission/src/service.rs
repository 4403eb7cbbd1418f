//! The admission service: decides submissions from the shared durable consumer, answers
//! logins, serves the catalog. Fails closed: a decision or command it cannot write is not
//! acknowledged, and the submission comes back.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use prometheus_client::registry::Registry;
use prost::Message as _;
use rct_bus::catalog::Served;
use rct_bus::proto::{self, RejectionCode, event::Kind};
use rct_bus::provenance::{Author, Provenance, Signer, Trust};
use rct_bus::{
    CommandId, EventKind, KeyPair, PublicKey, Subject, Tower, Verifier, rejection_code_name,
    subject,
};
use rct_streams::telemetry::{self, Readiness};
use rct_streams::topology::{
    ADMISSION_CONSUMER, ADMISSION_KEYS_KEY, CATALOG_BUCKET, CATALOG_KEY, COMMAND_STREAM,
    EVENT_STREAM, SUBMIT_STREAM,
};
use rct_streams::{Outgoing, Publisher, Slot};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::config::Config;
use crate::decide::{Policy, Reject, Submitted, Verdict};
use crate::identity::{Certificates, DevIssuer, IdTokens, Services};
use crate::metrics::Metrics;
use crate::{Error, catalog};

mod coordinator;

/// Tower token under which refused logins are recorded.
pub const AUTH_TOWER: &str = "_auth";

/// A configured admission replica, ready to [`Admission::run`].
#[derive(Clone, Debug)]
pub struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The policy in force: replaced whole when the catalog is reloaded, so a decision
    /// uses one catalog and records its version.
    policy: tokio::sync::watch::Sender<Arc<Policy>>,
    /// The catalog in force, for the notifier.
    catalog: tokio::sync::watch::Sender<Arc<rct_bus::catalog::Catalog>>,
    /// What a reloaded policy is built from besides the catalog.
    previous: Vec<PublicKey>,
    /// Keys retired for good, with when: published for readers only (see
    /// `Config::retired_keys`).
    retired: Vec<(PublicKey, std::time::SystemTime)>,
    /// Who wrote what admission reads back: only its own decisions count.
    trust: Arc<Trust>,
    services: Services,
    /// The catalog file's bytes last read, by the watch (a change is reloaded once).
    catalog_file: std::sync::Mutex<Vec<u8>>,
    /// The bytes the watch saw last time it looked: a change is reloaded once it has held
    /// for one look (an editor may write a file in several steps).
    catalog_seen: std::sync::Mutex<Vec<u8>>,
    /// One reload at a time (SIGHUP and the watch may ask at once).
    reloading: tokio::sync::Mutex<()>,
    id_tokens: IdTokens,
    /// Which refused logins go on record one by one.
    refusals: std::sync::Mutex<crate::refusals::Budget>,
    dev: Option<DevIssuer>,
    client: async_nats::Client,
    js: jetstream::Context,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    config: Config,
}

impl Admission {
    /// Loads the catalog, keys and identities; any problem is reported before anything starts.
    pub fn new(config: Config, client: async_nats::Client) -> Result<Self, Error> {
        config.validate().map_err(Error::Config)?;
        let catalog = catalog::load(&config.catalog)?;
        let key = signing_key(&config.signing_key, config.generate_key)?;
        let previous = public_keys(&config.previous_keys)?;
        let retired = config
            .retired_keys
            .iter()
            .map(|retired| {
                let key = public_keys(std::slice::from_ref(&retired.path))?.remove(0);
                let at =
                    humantime::parse_rfc3339_weak(&retired.retired_at).map_err(|e| Error::Key {
                        path: retired.path.clone(),
                        reason: format!(
                            "retired_at {:?} is not an RFC 3339 time: {e}",
                            retired.retired_at
                        ),
                    })?;
                Ok((key, at))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let dev = config.dev_issuer.then(|| DevIssuer::new(&key));
        let mut issuers = config.issuers.clone();
        issuers.extend(dev.as_ref().map(DevIssuer::issuer_config));
        let id_tokens = IdTokens::new(&issuers).map_err(Error::Config)?;
        let services = Services::new(&config.services).map_err(Error::Config)?;
        let catalog_file = std::fs::read(&config.catalog).unwrap_or_default();
        let (catalog_sender, _) = tokio::sync::watch::channel(Arc::new(catalog.clone()));
        let signer = Arc::new(Signer::admission(
            KeyPair::from_pem(&key.to_pem()).expect("the key in force reads back"),
        ));
        let trust = Arc::new(
            Trust::new(Verifier::new(
                std::iter::once(key.public().clone()).chain(previous.iter().cloned()),
            ))
            .with_retired(retired.iter().cloned()),
        );
        let policy = build_policy(&config, catalog, key, &previous, &services);
        let js = config.nats.jetstream(client.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                policy: tokio::sync::watch::Sender::new(Arc::new(policy)),
                catalog: catalog_sender,
                previous,
                retired,
                trust,
                services,
                catalog_seen: std::sync::Mutex::new(catalog_file.clone()),
                catalog_file: std::sync::Mutex::new(catalog_file),
                reloading: tokio::sync::Mutex::new(()),
                id_tokens,
                refusals: std::sync::Mutex::new(crate::refusals::Budget::new(Instant::now())),
                dev,
                publisher: Publisher::new(js.clone()).signing(signer),
                js,
                client,
                metrics: Arc::default(),
                config,
            }),
        })
    }

    /// The public key commands are signed with: agents trust it.
    pub fn public_key(&self) -> PublicKey {
        self.inner.policy().key.public().clone()
    }

    /// The catalog file (reloaded by [`Admission::reload`]).
    pub fn catalog_file(&self) -> &Path {
        &self.inner.config.catalog
    }

    /// Whether the catalog file's bytes differ from those last read, and are the same as
    /// when this was last asked (a change that has settled: one written in several steps is
    /// not read half-way).
    pub fn catalog_file_changed(&self) -> bool {
        let Ok(bytes) = std::fs::read(&self.inner.config.catalog) else {
            return false;
        };
        let settled = {
            let mut seen = self.inner.catalog_seen.lock().expect("not poisoned");
            let settled = *seen == bytes;
            *seen = bytes.clone();
            settled
        };
        settled && *self.inner.catalog_file.lock().expect("not poisoned") != bytes
    }

    /// The catalog in force.
    pub fn catalog(&self) -> Arc<rct_bus::catalog::Catalog> {
        self.inner.catalog.borrow().clone()
    }

    /// The version of the catalog in force.
    pub fn catalog_version(&self) -> String {
        self.inner.policy().catalog_version.clone()
    }

    /// Loads the catalog file again (`why` is recorded): checked first, put in force and
    /// served when sound, and recorded as an event either way (`_catalog/reload`: admitted
    /// and succeeded with the new version, or rejected with every problem, the old catalog
    /// kept).
    pub async fn reload(&self, why: &str) -> Reload {
        self.inner.reload(why).await
    }

    /// Decision counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// Serves until `shutdown` fires, then stops pulling and lets in-flight submissions
    /// finish within the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let inner = &self.inner;
        let readiness = Readiness::default();
        for condition in [STREAMS, CATALOG, CONSUMER] {
            readiness.expect(condition);
        }
        // Loaded by `new`, or it would not have been built.
        readiness.set(KEYS, true);
        if let Some(listen) = inner.config.telemetry.listen {
            let mut registry = Registry::default();
            inner.metrics.register(&mut registry);
            telemetry::serve(listen, registry, readiness.clone(), inner.client.clone())
                .map_err(|e| Error::Config(format!("cannot serve telemetry on {listen}: {e}")))?;
        }
        if inner.config.provision {
            let report = crate::provision(&inner.js, &inner.config).await?;
            tracing::info!(changed = report.changed(), "provisioned streams");
        }
        for stream in [SUBMIT_STREAM, COMMAND_STREAM, EVENT_STREAM] {
            inner.js.get_stream(stream).await.map_err(|e| {
                Error::Nats(format!(
                    "stream {stream} is missing ({e}); provision first: rct-admission --provision"
                ))
            })?;
        }
        readiness.set(STREAMS, true);
        inner.publish_catalog().await?;
        // Events are signed from here on; what is stored before reads as history from
        // before signing.
        let first = rct_streams::topology::mark_signed_from(&inner.js)
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        tracing::debug!(first, "events are signed from this sequence");
        readiness.set(CATALOG, true);

        let tracker = TaskTracker::new();
        let login = inner
            .client
            .queue_subscribe(Subject::Login.to_string(), "admission".into())
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        tracker.spawn(respond(
            self.clone(),
            login,
            shutdown.clone(),
            Responder::Login,
        ));
        let enrolments = inner
            .client
            .queue_subscribe(subject::enrolments(), "admission".into())
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        tracker.spawn(respond(
            self.clone(),
            enrolments,
            shutdown.clone(),
            Responder::Enrol,
        ));
        if inner.dev.is_some() {
            let dev = inner
                .client
                .queue_subscribe(Subject::DevToken.to_string(), "admission".into())
                .await
                .map_err(|e| Error::Nats(e.to_string()))?;
            tracker.spawn(respond(
                self.clone(),
                dev,
                shutdown.clone(),
                Responder::DevToken,
            ));
            tracing::warn!("the development issuer is on: anyone can log in as anyone");
        }

        if inner.config.role == crate::Role::All && !inner.config.notify.channels.is_empty() {
            let notifier = crate::notify::Notifier::new(
                inner.js.clone(),
                inner.catalog.subscribe(),
                &inner.config.notify,
                inner.trust.clone(),
            );
            tracker.spawn(notifier.run(shutdown.clone()));
        }

        let consumer: PullConsumer = inner
            .js
            .get_consumer_from_stream(ADMISSION_CONSUMER, SUBMIT_STREAM)
            .await
            .map_err(|e| {
                Error::Nats(format!(
                    "cannot bind consumer {ADMISSION_CONSUMER} on {SUBMIT_STREAM}: {e}"
                ))
            })?;
        tracing::info!(
            instance = %inner.config.instance,
            catalog_version = %inner.policy().catalog_version,
            key_id = %inner.policy().key.id(),
            "admission ready"
        );
        readiness.set(CONSUMER, true);
        if let Some(every) = inner.config.watch_catalog {
            tracker.spawn(watch_catalog(self.clone(), every, shutdown.clone()));
        }
        tracker.spawn(sweep_pending(self.clone(), shutdown.clone()));
        tracker.spawn(coordinator::coordinate(self.clone(), shutdown.clone()));
        tracker.spawn(watch_pending(
            consumer.clone(),
            inner.metrics.clone(),
            shutdown.clone(),
        ));
        let result = rct_streams::work::consume(
            &consumer,
            inner.config.concurrency,
            &shutdown,
            &tracker,
            |message| {
                let this = self.clone();
                async move { this.inner.handle(message).await }
            },
        )
        .await
        .map_err(Error::from);
        // Unacknowledged messages still buffered come back after ack_wait, to any replica.
        shutdown.cancel();
        tracker.close();
        if tokio::time::timeout(inner.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight submissions did not finish within the grace period; they will be redelivered"
            );
        }
        tracing::info!("admission stopped");
        result
    }
}

/// The span every log line about one submission carries: command, operation, operator, trace.
fn decision_span(verdict: &Verdict) -> tracing::Span {
    let (_, _, decision) = verdict.parts();
    let operator = decided_request(decision)
        .and_then(|r| r.operator.as_ref())
        .map(|o| o.email.clone())
        .unwrap_or_default();
    tracing::info_span!(
        "submission",
        command_id = %decision.command_id,
        operation = %decision.operation,
        operator = %operator,
        trace_id = tracing::field::Empty,
    )
}

/// Readiness conditions (`/readyz`).
const STREAMS: &str = "streams present";
const CATALOG: &str = "catalog published";
const CONSUMER: &str = "consumer bound";
const KEYS: &str = "keys loaded";

/// Keeps the pending-submissions gauge current (every 5 s) until shutdown.
async fn watch_pending(
    mut consumer: PullConsumer,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        if let Ok(info) = consumer.info().await {
            metrics.pending(info.num_pending + info.num_ack_pending as u64);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
    }
}

/// What [`Inner::settle`] may decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settle {
    /// Whatever the request's state calls for.
    Any,
    /// Only a refusal (expired, denied, catalog changed): the sweep's part.
    Refusals,
}

/// How often requests waiting for approvals are looked over for expiry and catalog changes.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Settles requests waiting for approvals whose time ran out or whose operation changed
/// (see [`Inner::sweep`]), every [`SWEEP_EVERY`], until shutdown. Every replica sweeps: the
/// decision slot takes one decision.
async fn sweep_pending(admission: Admission, shutdown: CancellationToken) {
    let mut settled = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        if settled.len() > 100_000 {
            settled.clear();
        }
        if let Err(e) = admission.inner.sweep(&mut settled).await {
            tracing::warn!(error = %e, "cannot look over the requests waiting for approvals; trying again");
        }
    }
}

/// What [`Admission::reload`] did.
#[derive(Debug)]
pub enum Reload {
    /// The file holds the catalog in force (this version).
    Unchanged(String),
    /// A new catalog is in force.
    Loaded {
        /// The version before.
        from: String,
        /// The version now.
        to: String,
    },
    /// The file is not a sound catalog: the one in force stays.
    Refused(catalog::Error),
    /// The catalog is sound but could not be served to the agents: the one in force stays
    /// (commands admitted under a version agents cannot read would fail).
    Unserved(String),
}

/// The tower token under which catalog reloads are recorded.
pub const CATALOG_TOWER: &str = "_catalog";

/// The policy for `catalog`, with everything else from the configuration.
fn build_policy(
    config: &Config,
    catalog: rct_bus::catalog::Catalog,
    key: KeyPair,
    previous: &[PublicKey],
    services: &Services,
) -> Policy {
    Policy {
        catalog_version: catalog.version(),
        catalog,
        certificates: Certificates::new(&key, previous, config.certificate_ttl),
        services: services.clone(),
        key,
        freshness: config.freshness,
        clock_skew: config.clock_skew,
        max_payload: config.max_payload,
        source: format!("admission/{}", config.instance),
    }
}

/// Reloads the catalog whenever its file's bytes change (looked at every `every`).
async fn watch_catalog(
    admission: Admission,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if admission.catalog_file_changed() {
            admission.reload("the catalog file changed").await;
        }
    }
}

/// The public half of the configured signing key, as PEM (made first with `generate_key`).
pub fn public_key_pem(config: &Config) -> Result<String, Error> {
    Ok(signing_key(&config.signing_key, config.generate_key)?
        .public()
        .to_pem())
}

/// The public keys in the PEM files at `paths`.
fn public_keys(paths: &[std::path::PathBuf]) -> Result<Vec<PublicKey>, Error> {
    paths
        .iter()
        .map(|path| {
            let pem = std::fs::read_to_string(path).map_err(|e| Error::Key {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            PublicKey::from_pem(&pem).map_err(|e| Error::Key {
                path: path.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Where the public half of a generated key is written: `admission.key` → `admission.pub`.
fn public_key_path(key: &Path) -> std::path::PathBuf {
    key.with_extension("pub")
}

/// Loads admission's key, creating it (mode 0600) when allowed and missing; a generated key's
/// public half is written next to it (see [`public_key_path`]), for the agents to trust.
fn signing_key(path: &Path, generate: bool) -> Result<KeyPair, Error> {
    let error = |reason: String| Error::Key {
        path: path.to_owned(),
        reason,
    };
    if generate && public_key_path(path) == path {
        return Err(error(
            "its public half would be written over it (a generated key's public half goes to \
             the same name ending .pub): name the key differently, e.g. admission.key"
                .into(),
        ));
    }
    match std::fs::read_to_string(path) {
        Ok(pem) => {
            let key = KeyPair::from_pem(&pem).map_err(|e| error(e.to_string()))?;
            let public = public_key_path(path);
            if generate && std::fs::read_to_string(&public).ok() != Some(key.public().to_pem()) {
                std::fs::write(&public, key.public().to_pem())
                    .map_err(|e| error(format!("cannot write {}: {e}", public.display())))?;
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && generate => {
            let key = KeyPair::generate();
            write_private(path, &key.to_pem())
                .map_err(|e| error(format!("cannot create it: {e}")))?;
            let public = public_key_path(path);
            std::fs::write(&public, key.public().to_pem())
                .map_err(|e| error(format!("cannot write {}: {e}", public.display())))?;
            tracing::info!(path = %path.display(), public = %public.display(), key_id = %key.id(), "generated a signing key");
            Ok(key)
        }
        Err(e) => Err(error(format!(
            "cannot read it: {e}{}",
            if generate {
                ""
            } else {
                " (set generate_key for development)"
            }
        ))),
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(contents.as_bytes())
}

#[derive(Clone, Copy, Debug)]
enum Responder {
    Login,
    DevToken,
    Enrol,
}

/// Requests of one kind answered at once; more wait for one to finish.
const ANSWERED_AT_ONCE: usize = 32;

/// Answers requests, up to [`ANSWERED_AT_ONCE`] at a time (a login waiting for its
/// provider's keys, or for its refusal to be recorded, holds up no other). Once a minute,
/// refused logins not recorded one by one are recorded as a count.
async fn respond(
    admission: Admission,
    mut requests: async_nats::Subscriber,
    shutdown: CancellationToken,
    responder: Responder,
) {
    let at_once = Arc::new(tokio::sync::Semaphore::new(ANSWERED_AT_ONCE));
    let answering = TaskTracker::new();
    let mut minute = tokio::time::interval(crate::refusals::WINDOW);
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = minute.tick() => {
                // Recorded aside: a slow write holds up no login.
                let admission = admission.clone();
                answering.spawn(async move { admission.inner.record_unrecorded_refusals().await });
                continue;
            }
            request = requests.next() => match request { Some(r) => r, None => break },
        };
        let Some(reply) = request.reply.clone() else {
            continue;
        };
        let Ok(permit) = at_once.clone().acquire_owned().await else {
            break;
        };
        let admission = admission.clone();
        answering.spawn(async move {
            let source = crate::refusals::source(&reply);
            let answer = match responder {
                Responder::Login => admission
                    .inner
                    .login(&request.payload, source)
                    .await
                    .encode_to_vec(),
                Responder::DevToken => admission.inner.dev_token(&request.payload).encode_to_vec(),
                Responder::Enrol => admission
                    .inner
                    .enrol(&request.subject, &request.payload, source)
                    .await
                    .encode_to_vec(),
            };
            if let Err(e) = admission.inner.client.publish(reply, answer.into()).await {
                tracing::warn!(error = %e, "cannot answer a {responder:?} request");
            }
            drop(permit);
        });
    }
    // No more requests to this replica (the others answer them), then the ones taken finish.
    let _ = requests.unsubscribe().await;
    answering.close();
    answering.wait().await;
    let unrecorded = {
        let budget = &admission.inner.refusals;
        let mut budget = budget.lock().unwrap_or_else(|p| p.into_inner());
        budget.flush(Instant::now())
    };
    admission.inner.record_unrecorded(unrecorded).await;
}

impl Inner {
    fn policy(&self) -> Arc<Policy> {
        self.policy.borrow().clone()
    }

    async fn reload(&self, why: &str) -> Reload {
        let _one_at_a_time = self.reloading.lock().await;
        let path = &self.config.catalog;
        // What is checked is what is remembered as read.
        let read = std::fs::read(path);
        let loaded = match &read {
            Ok(bytes) => catalog::parse(path, &String::from_utf8_lossy(bytes)),
            Err(_) => catalog::load(path),
        };
        *self.catalog_file.lock().expect("not poisoned") = read.unwrap_or_default();
        let current = self.policy();
        let from = current.catalog_version.clone();
        let catalog = match loaded {
            Ok(catalog) => catalog,
            Err(error) => {
                tracing::warn!(%why, "{error}; catalog {from} stays in force");
                // One line on record: the problems, each after a semicolon.
                let message = format!(
                    "{}; catalog {from} stays in force",
                    error.to_string().replace("\n  ", "; ")
                );
                self.record_reload(
                    why,
                    &from,
                    Kind::Rejected(proto::Rejected {
                        code: RejectionCode::InvalidParams as i32,
                        message,
                        request: None,
                    }),
                    None,
                )
                .await;
                return Reload::Refused(error);
            }
        };
        let to = catalog.version();
        if to == from {
            tracing::info!(%why, version = %to, "the catalog is unchanged");
            return Reload::Unchanged(to);
        }
        let key = KeyPair::from_pem(&current.key.to_pem()).expect("the key in force reads back");
        let summary = changes(&current.catalog, &catalog);
        // Served (and its towers' consumers made) before it decides anything: a command
        // admitted under a version agents cannot read would fail.
        if self.config.provision
            && let Err(e) = crate::provision(&self.js, &self.config).await
        {
            tracing::error!(error = %e, "cannot create the consumers of the reloaded catalog's towers");
        }
        if let Err(e) = self.publish(&to, &catalog).await {
            let message = format!(
                "catalog {to} cannot be served to the agents ({e}); catalog {from} stays in force"
            );
            tracing::error!(%why, "{message}");
            self.record_reload(
                why,
                &from,
                Kind::Rejected(proto::Rejected {
                    code: RejectionCode::InvalidParams as i32,
                    message: message.clone(),
                    request: None,
                }),
                None,
            )
            .await;
            return Reload::Unserved(message);
        }
        self.catalog.send_replace(Arc::new(catalog.clone()));
        self.policy.send_replace(Arc::new(build_policy(
            &self.config,
            catalog,
            key,
            &self.previous,
            &self.services,
        )));
        tracing::info!(%why, %from, %to, "{summary}");
        self.record_reload(
            why,
            &from,
            Kind::Admitted(proto::Admitted {
                catalog_version: to.clone(),
                ..Default::default()
            }),
            Some(Kind::Succeeded(proto::Succeeded {
                summary: format!("catalog {to} in force (was {from}): {summary}"),
                outputs: [
                    ("version".to_owned(), to.clone()),
                    ("previous".to_owned(), from.clone()),
                ]
                .into(),
            })),
        )
        .await;
        Reload::Loaded { from, to }
    }

    /// Records a reload as a command of its own under [`CATALOG_TOWER`]: its decision, then
    /// its outcome.
    async fn record_reload(&self, why: &str, from: &str, decision: Kind, outcome: Option<Kind>) {
        let tower = Tower::new(CATALOG_TOWER).expect("a valid token");
        let id = CommandId::generate();
        let mut decision = decision;
        let request = proto::Request {
            operator: Some(proto::Operator {
                subject: self.policy().source.clone(),
                ..Default::default()
            }),
            justification: why.to_owned(),
            params: [(
                "previous".to_owned(),
                proto::Value {
                    kind: Some(proto::value::Kind::String(from.to_owned())),
                },
            )]
            .into(),
            ..Default::default()
        };
        match &mut decision {
            Kind::Admitted(a) => a.request = Some(request),
            Kind::Rejected(r) => r.request = Some(request),
            _ => {}
        }
        for kind in std::iter::once(decision).chain(outcome) {
            let mut event = proto::Event {
                command_id: id.to_string(),
                at: Some(rct_streams::timestamp::from_datetime(
                    OffsetDateTime::now_utc(),
                )),
                source: self.policy().source.clone(),
                operation: format!("{CATALOG_TOWER}/reload"),
                target: String::new(),
                kind: Some(kind),
            };
            // The loader's messages quote the file.
            rct_bus::text::make_printable_within(&mut event, crate::decide::QUOTED_MAX);
            if let Err(e) = self.publisher.event(&tower, &event, 0).await {
                tracing::error!(error = %e, "cannot record the catalog reload");
                return;
            }
        }
    }

    async fn publish_catalog(&self) -> Result<(), Error> {
        let policy = self.policy();
        self.publish(&policy.catalog_version, &policy.catalog)
            .await?;
        // Beside it, the keys readers check who wrote an event against.
        let keys = rct_streams::topology::AdmissionKeys {
            keys: std::iter::once(policy.key.public())
                .chain(&self.previous)
                .map(PublicKey::to_pem)
                .collect(),
            retired: self
                .retired
                .iter()
                .map(|(key, at)| {
                    (
                        key.to_pem(),
                        humantime::format_rfc3339_seconds(*at).to_string(),
                    )
                })
                .collect(),
        };
        self.js
            .get_key_value(CATALOG_BUCKET)
            .await
            .map_err(|e| Error::Nats(format!("cannot open bucket {CATALOG_BUCKET}: {e}")))?
            .put(ADMISSION_KEYS_KEY, keys.to_json().into())
            .await
            .map_err(|e| Error::Nats(format!("cannot publish admission's public keys: {e}")))?;
        Ok(())
    }

    /// The event `stored` holds, if admission wrote it (signed with one of its keys): what
    /// anyone else put in a slot admission reads back is never taken for its decision.
    fn own_event(
        &self,
        stored: &async_nats::jetstream::message::StreamMessage,
    ) -> Option<proto::Event> {
        let published = stored.time;
        let message = (
            stored.subject.as_str(),
            stored.payload.as_ref(),
            Some(&stored.headers),
        );
        match rct_streams::Record::from_message(
            stored.sequence,
            published,
            message,
            Some(&self.trust),
        ) {
            Ok(record) if record.provenance == Provenance::Verified(Author::Admission) => {
                Some(record.event)
            }
            Ok(record) => {
                tracing::error!(
                    sequence = stored.sequence,
                    subject = %stored.subject,
                    why = record.provenance.doubt().unwrap_or_default(),
                    "an event admission reads back is not admission's: ignored"
                );
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "an event admission reads back does not read: ignored");
                None
            }
        }
    }

    /// Serves `catalog` as `version` in `rct_catalog`.
    async fn publish(
        &self,
        version: &str,
        catalog: &rct_bus::catalog::Catalog,
    ) -> Result<(), Error> {
        let served = Served {
            version: version.to_owned(),
            catalog: catalog.clone(),
        };
        let json = serde_json::to_vec(&served).expect("a catalog always serializes");
        let bucket = self
            .js
            .get_key_value(CATALOG_BUCKET)
            .await
            .map_err(|e| Error::Nats(format!("cannot open bucket {CATALOG_BUCKET}: {e}")))?;
        bucket
            .put(CATALOG_KEY, json.into())
            .await
            .map_err(|e| Error::Nats(format!("cannot publish the catalog: {e}")))?;
        Ok(())
    }

    async fn handle(&self, message: jetstream::Message) {
        let started = Instant::now();
        let (sequence, stored_at) = match message.info() {
            Ok(info) => (info.stream_sequence, info.published),
            Err(e) => {
                tracing::warn!(error = %e, "a submission without delivery info; leaving it");
                return;
            }
        };
        let verdict = self.policy().decide(Submitted {
            subject: message.subject.as_str(),
            payload: &message.payload,
            sequence,
            now: OffsetDateTime::now_utc(),
        });
        // The submitter's trace continues here and on into the command and its events.
        let span = decision_span(&verdict);
        let publisher = self
            .publisher
            .traced(&telemetry::continue_trace(&span, message.headers.as_ref()));
        async {
            let stored = Stored {
                message: &message,
                sequence,
                at: stored_at,
            };
            // On the heap: the slot reads and refusals make it large.
            match Box::pin(self.record(&publisher, stored, verdict)).await {
                Ok(outcome) => {
                    if let Err(e) = message.ack().await {
                        tracing::warn!(error = %e, sequence, "cannot acknowledge; it will be redelivered and completed again");
                    }
                    self.metrics.decided(&outcome, started.elapsed());
                }
                Err(e) => {
                    tracing::warn!(error = %e, sequence, "cannot record the decision; the submission will come back");
                    self.metrics.failed();
                    let _ = message
                        .ack_with(AckKind::Nak(Some(std::time::Duration::from_secs(1))))
                        .await;
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Records the verdict: the decision (once per command), then the command or the cancel
    /// request. Returns the metrics label.
    async fn record(
        &self,
        publisher: &Publisher,
        stored: Stored<'_>,
        verdict: Verdict,
    ) -> Result<String, rct_streams::Error> {
        let sequence = stored.sequence;
        let verdict = match verdict {
            Verdict::Cancel(cancel) => self.check_cancel_target(cancel).await?,
            // On the heap: its reads would make every submission's future large.
            Verdict::Approve(approve) => Box::pin(self.check_approval(approve)).await?,
            Verdict::Admit(admit) => {
                // A plan changes nothing: a freeze does not stop it; nor does one stop a
                // break-glass run. Undo and locks hold for both.
                let frozen_out = decided_request(&admit.decision)
                    .is_some_and(|r| r.break_glass.is_empty() && !r.plan);
                let verdict = match frozen_out {
                    true => self.check_freeze(Verdict::Admit(admit)).await?,
                    false => Verdict::Admit(admit),
                };
                Box::pin(self.check_gates(verdict)).await?
            }
            // A rollout is a run: a freeze stops it (and each child it would send).
            Verdict::Record(record) if is_rollout(&record.decision) => {
                let verdict = self.check_freeze(Verdict::Record(record)).await?;
                self.check_rollout_undo(verdict).await?
            }
            Verdict::Park(park) => {
                // An undo that cannot be admitted waits for no approvals.
                let verdict = Box::pin(self.check_undo(Verdict::Park(park))).await?;
                self.check_freeze(verdict).await?
            }
            other => other,
        };
        let (tower, command_id, decision) = verdict.parts();
        let Some(command_id) = command_id else {
            // Refused before its id could be trusted (an expired certificate, a rotated key):
            // a redelivery of a submission admitted earlier is finished as admitted.
            if let Some(holder) = self.decided_before(stored).await? {
                self.complete(publisher, stored, &holder).await?;
                return Ok("redelivered".into());
            }
            let recorded =
                self.record_elsewhere(publisher, tower, decision.clone(), Some(stored), None);
            return Ok(match recorded.await? {
                Recorded::Now => label(&verdict),
                Recorded::Before => "redelivered".into(),
            });
        };
        // A request waiting for approvals holds its pending slot now and its decision slot
        // later: a submission reusing its id (public once it waits) must not take that
        // decision slot, nor may a request wait under the id of a decided command.
        let other = match verdict {
            Verdict::Park(_) => EventKind::Decision,
            _ => EventKind::Pending,
        };
        if let Some(holder) = self
            .own_event_on(&subject::events_of_kind(command_id, other))
            .await?
        {
            if decided_request(&holder).map(|r| r.submission_sequence) != Some(sequence) {
                return self
                    .refuse_reused(publisher, stored, tower, &verdict, command_id, false)
                    .await;
            }
            if other == EventKind::Pending {
                // This very submission, parked when it came first: its plan may not have
                // been sent.
                self.describe(publisher, &holder).await?;
                return Ok("redelivered".into());
            }
        }
        // The decision's id names the submission (`<command>.decision.<submission seq>`): a
        // redelivery of this submission is recognised as ours, a replay of its command id by
        // another submission is not.
        // The decision slot spans every tower and target (`Outgoing::event`): a decision
        // under this id anywhere holds it.
        match publisher.event(tower, decision, sequence).await? {
            Slot::Written(ack) if !ack.duplicate => {
                log_decision(&verdict);
                self.follow_up(publisher, stored, &verdict).await?;
                Ok(label(&verdict))
            }
            written => {
                // Ours from an earlier attempt (the same id), or another's: only a decision
                // admission signed, for this very submission, is finished as decided.
                let (at, ours) = match written {
                    Slot::Written(ack) => (ack.sequence, true),
                    Slot::Taken { sequence } => (sequence, false),
                };
                let holder = self.stored_event(at).await?;
                let this_one = |h: &proto::Event| {
                    ours || decided_request(h).map(|r| r.submission_sequence) == Some(sequence)
                };
                let forged = holder.is_none();
                if let Some(holder) = holder.filter(this_one) {
                    self.complete(publisher, stored, &holder).await?;
                    return Ok("redelivered".into());
                }
                self.refuse_reused(publisher, stored, tower, &verdict, command_id, forged)
                    .await
            }
        }
    }

    /// Refuses a submission whose command id another submission holds (`forged`: a message
    /// admission did not sign holds its slot), recorded under an id of admission's choosing.
    /// A submission refused anyway keeps its own reason.
    async fn refuse_reused(
        &self,
        publisher: &Publisher,
        stored: Stored<'_>,
        tower: &Tower,
        verdict: &Verdict,
        command_id: CommandId,
        forged: bool,
    ) -> Result<String, rct_streams::Error> {
        let (_, _, decision) = verdict.parts();
        let refusal = match verdict {
            Verdict::Reject(r) => r.decision.clone(),
            _ if forged => rejection(
                decision,
                RejectionCode::Duplicate,
                format!(
                    "the decision slot of command id {command_id} holds a decision \
                     admission did not sign (UNVERIFIED: see rct show {command_id}); \
                     this submission was not admitted: check rct show before firing it \
                     again, with a new id"
                ),
            ),
            _ => rejection(
                decision,
                RejectionCode::Duplicate,
                format!(
                    "command id {command_id} was already used by another submission; \
                     every submission needs a new id"
                ),
            ),
        };
        let code = match &refusal.kind {
            Some(Kind::Rejected(r)) => r.code,
            _ => RejectionCode::Duplicate as i32,
        };
        let recorded =
            self.record_elsewhere(publisher, tower, refusal, Some(stored), Some(command_id));
        Ok(match recorded.await? {
            Recorded::Now => format!("rejected:{}", rejection_code_name(code)),
            Recorded::Before => "redelivered".into(),
        })
    }

    /// A redelivered submission whose decision is already recorded (the replica that decided
    /// it may have died before publishing the command): finish it exactly as it was decided,
    /// from the decision itself. Never decided again: the certificate may have expired, the
    /// catalog or the keys changed since, and what was admitted stays admitted.
    async fn complete(
        &self,
        publisher: &Publisher,
        stored: Stored<'_>,
        holder: &proto::Event,
    ) -> Result<(), rct_streams::Error> {
        let Some(Kind::Admitted(admitted)) = &holder.kind else {
            // A pending request is complete once recorded and, if it plans, its plan sent
            // (the replica that parked it may have stopped before); a refusal is complete.
            return self.describe(publisher, holder).await;
        };
        if admitted
            .request
            .as_ref()
            .is_some_and(|r| !r.approves.is_empty())
        {
            return Box::pin(self.approval_follow_up(publisher, holder, &stored.message.payload))
                .await;
        }
        if admitted
            .request
            .as_ref()
            .is_some_and(|r| r.freeze.is_some() || r.rollout.is_some())
        {
            // A freeze is its decision; a rollout's children are the coordinator's to send.
            return Ok(());
        }
        let is_cancel = admitted
            .request
            .as_ref()
            .is_some_and(|r| !r.cancels.is_empty());
        if is_cancel {
            let Some((_, cancel)) = Policy::recorded_cancel(holder) else {
                tracing::error!(command_id = %holder.command_id, "the recorded cancel request names no command; nothing to cancel");
                return Ok(());
            };
            let Ok(tower) = holder.operation.parse::<rct_bus::OperationName>() else {
                tracing::error!(command_id = %holder.command_id, operation = %holder.operation, "the recorded cancel request names no operation");
                return Ok(());
            };
            publisher
                .event(tower.tower(), &cancel, &holder.command_id)
                .await?;
            return self.withdraw(publisher, tower.tower(), &cancel).await;
        }
        self.link_undo(publisher, holder).await?;
        match self
            .policy()
            .recorded_command(holder, &stored.message.payload, Vec::new(), None)
        {
            Ok((subject, command)) => {
                let msg_id = holder.command_id.clone();
                publisher
                    .send(Outgoing::new(subject, msg_id, command))
                    .await?;
            }
            Err(reason) => {
                tracing::error!(
                    command_id = %holder.command_id,
                    %reason,
                    "admitted earlier, but its command cannot be rebuilt from the record; ending it unrun"
                );
                self.end_unpublished(publisher, holder, &reason).await?;
            }
        }
        Ok(())
    }

    /// An admitted command that can never be published: ended on record, through its claim
    /// slot (so no agent can be running it), instead of left admitted for ever.
    async fn end_unpublished(
        &self,
        publisher: &Publisher,
        holder: &proto::Event,
        reason: &str,
    ) -> Result<(), rct_streams::Error> {
        let Ok(operation) = holder.operation.parse::<rct_bus::OperationName>() else {
            return Ok(());
        };
        let event = |kind| proto::Event {
            at: Some(rct_streams::timestamp::from_datetime(
                OffsetDateTime::now_utc(),
            )),
            source: self.policy().source.clone(),
            kind: Some(kind),
            ..holder.clone()
        };
        let claim = event(Kind::Started(proto::Started {
            agent: self.policy().source.clone(),
            host: String::new(),
            target: holder.target.clone(),
            without_running: true,
        }));
        let failed = event(Kind::Failed(proto::Failed {
            code: "not_published".into(),
            message: format!(
                "it was admitted, but its command cannot be built from the record ({reason}); \
                 it was not run: submit it again"
            ),
            ..Default::default()
        }));
        rct_streams::journal::end_unrun(publisher, operation.tower(), &claim, &failed, "admission")
            .await?;
        Ok(())
    }

    /// The decision recorded earlier for this very submission, found through the command id
    /// it claims (read without trusting it: only a decision naming this submission's sequence
    /// counts).
    async fn decided_before(
        &self,
        stored: Stored<'_>,
    ) -> Result<Option<proto::Event>, rct_streams::Error> {
        let Ok(Subject::Submit { .. }) = stored.message.subject.as_str().parse::<Subject>() else {
            return Ok(None);
        };
        let claimed = proto::SignedEnvelope::decode(stored.message.payload.as_ref())
            .ok()
            .and_then(|e| proto::Submission::decode(e.body.as_slice()).ok())
            .and_then(|s| s.command_id.parse::<CommandId>().ok());
        let Some(claimed) = claimed else {
            return Ok(None);
        };
        // Decided, or still waiting for approvals.
        for kind in [EventKind::Decision, EventKind::Pending] {
            let holder = self
                .own_event_on(&subject::events_of_kind(claimed, kind))
                .await?
                .filter(|h| {
                    decided_request(h).map(|r| r.submission_sequence) == Some(stored.sequence)
                });
            if holder.is_some() {
                return Ok(holder);
            }
        }
        Ok(None)
    }

    async fn follow_up(
        &self,
        publisher: &Publisher,
        stored: Stored<'_>,
        verdict: &Verdict,
    ) -> Result<(), rct_streams::Error> {
        match verdict {
            Verdict::Approve(a) => {
                Box::pin(self.approval_follow_up(publisher, &a.decision, &stored.message.payload))
                    .await?;
            }
            Verdict::Park(park) => self.describe(publisher, &park.pending).await?,
            Verdict::Admit(a) => {
                self.link_undo(publisher, &a.decision).await?;
                let outgoing =
                    Outgoing::new(a.subject.clone(), a.command_id.msg_id(), a.command.clone());
                publisher.send(outgoing).await?;
            }
            Verdict::Cancel(c) => {
                publisher.event(&c.tower, &c.cancel, c.command_id).await?;
                self.withdraw(publisher, &c.tower, &c.cancel).await?;
            }
            Verdict::Reject(_) | Verdict::Record(_) => {}
        }
        Ok(())
    }

    /// A run (not a break-glass one) of a tower in a freeze is refused `frozen`, naming the
    /// freeze and when it ends; checked after everything else, so that a request refused
    /// anyway says why.
    async fn check_freeze(&self, verdict: Verdict) -> Result<Verdict, rct_streams::Error> {
        let (tower, Some(command_id), decision) = verdict.parts() else {
            return Ok(verdict);
        };
        match self.frozen(tower, OffsetDateTime::now_utc()).await? {
            Some(freeze) => Ok(Verdict::Reject(Reject {
                tower: tower.clone(),
                command_id: Some(command_id),
                decision: rejection(
                    decision,
                    RejectionCode::Frozen,
                    freeze.refusal(&decision.operation),
                ),
            })),
            None => Ok(verdict),
        }
    }

    /// What an admitted run passes last, where its decision is made (at once, or once
    /// approved): an undo must be what its original's record allows ([`Self::undo_problem`]),
    /// then it takes its locks ([`Self::take_locks`]).
    async fn gates(
        &self,
        decision: &mut proto::Event,
    ) -> Result<Option<(RejectionCode, String)>, rct_streams::Error> {
        if let Some(why) = self.undo_problem(decision).await? {
            return Ok(Some((RejectionCode::NotUndoable, why)));
        }
        let taken = match self.take_locks(decision).await? {
            Ok(taken) => taken,
            Err(why) => return Ok(Some((RejectionCode::Locked, why))),
        };
        // Read again while holding them: another undo of the same command, admitted after
        // the first reading, is seen now.
        if let Some(why) = self.undo_problem(decision).await? {
            self.release(&taken).await?;
            return Ok(Some((RejectionCode::NotUndoable, why)));
        }
        Ok(None)
    }

    /// An admitted run passes its [`Self::gates`] before its decision is written, or is
    /// refused (`not_undoable`, or `locked` naming the holder).
    async fn check_gates(&self, verdict: Verdict) -> Result<Verdict, rct_streams::Error> {
        let Verdict::Admit(mut admit) = verdict else {
            return Ok(verdict);
        };
        Ok(match self.gates(&mut admit.decision).await? {
            None => Verdict::Admit(admit),
            Some((code, why)) => Verdict::Reject(Reject {
                tower: admit.tower.clone(),
                command_id: Some(admit.command_id),
                decision: rejection(&admit.decision, code, why),
            }),
        })
    }

    /// A rollout that undoes another (`undo_of`) must name a rollout that ended, of the
    /// operation its operation undoes, and only targets of it. Each child is then checked as
    /// any undo, against the original child on its target ([`Self::undo_problem`]).
    async fn check_rollout_undo(&self, verdict: Verdict) -> Result<Verdict, rct_streams::Error> {
        let Verdict::Record(record) = verdict else {
            return Ok(verdict);
        };
        let Some(request) = decided_request(&record.decision).filter(|r| !r.undo_of.is_empty())
        else {
            return Ok(Verdict::Record(record));
        };
        let original = request.undo_of.parse::<CommandId>().ok();
        let recorded = match original {
            Some(id) => {
                self.own_event_on(&subject::events_of_kind(id, EventKind::Decision))
                    .await?
            }
            None => None,
        };
        let plan = recorded
            .as_ref()
            .and_then(decided_request)
            .and_then(|r| r.rollout.as_ref());
        let inverse = recorded
            .as_ref()
            .and_then(|r| r.operation.parse::<rct_bus::OperationName>().ok())
            .and_then(|name| {
                let policy = self.policy();
                policy
                    .catalog
                    .operation(&name)
                    .and_then(|(_, op)| op.inverse.as_ref().map(|i| i.operation.clone()))
            });
        let ended = match original {
            Some(id) => self
                .own_event_on(&subject::events_of_kind(id, EventKind::Outcome))
                .await?
                .is_some(),
            None => false,
        };
        let targets = request.rollout.as_ref().map(|p| p.targets.as_slice());
        let problem = match (&recorded, plan) {
            (None, _) => Some("it has no decision on record".to_owned()),
            (Some(_), None) => Some(
                "it is not a rollout: undo a single command with rct undo, one target".to_owned(),
            ),
            _ if inverse.as_deref() != Some(record.decision.operation.as_str()) => Some(format!(
                "its operation is undone by {}, not {}",
                inverse
                    .as_deref()
                    .unwrap_or("nothing (no inverse in the catalog)"),
                record.decision.operation
            )),
            _ if !ended => Some("it has not ended: undo it once it has".to_owned()),
            (Some(_), Some(plan)) => targets
                .unwrap_or_default()
                .iter()
                .find(|t| !plan.targets.contains(t))
                .map(|t| format!("{t} is not one of its targets")),
        };
        Ok(match problem {
            None => Verdict::Record(record),
            Some(why) => Verdict::Reject(Reject {
                tower: record.tower.clone(),
                command_id: Some(record.command_id),
                decision: rejection(
                    &record.decision,
                    RejectionCode::NotUndoable,
                    format!("rollout {} cannot be undone: {why}", request.undo_of),
                ),
            }),
        })
    }

    /// An undo waiting for approvals must be one its original's record allows, too.
    async fn check_undo(&self, verdict: Verdict) -> Result<Verdict, rct_streams::Error> {
        let (tower, Some(command_id), decision) = verdict.parts() else {
            return Ok(verdict);
        };
        Ok(match self.undo_problem(decision).await? {
            None => verdict,
            Some(why) => Verdict::Reject(Reject {
                tower: tower.clone(),
                command_id: Some(command_id),
                decision: rejection(decision, RejectionCode::NotUndoable, why),
            }),
        })
    }

    /// Why the request of `decision` (admitted or pending), if it is an undo (`undo_of`),
    /// cannot be admitted: its original must have been admitted to run, have succeeded, be
    /// of an operation whose `inverse` is this one, and not be undone already by an undo
    /// that has not failed; the parameters the inverse names must be those its record fills
    /// in. Two undos of one command never run at once: each locks `undo of <id>`.
    async fn undo_problem(
        &self,
        decision: &proto::Event,
    ) -> Result<Option<String>, rct_streams::Error> {
        let Some(request) = decided_request(decision).filter(|r| !r.undo_of.is_empty()) else {
            return Ok(None);
        };
        let Ok(original) = request.undo_of.parse::<CommandId>() else {
            return Ok(Some(format!("{:?} is not a command id", request.undo_of)));
        };
        let refuse = |why: String| Ok(Some(format!("command {original} cannot be undone: {why}")));
        let Some(recorded) = self
            .own_event_on(&subject::events_of_kind(original, EventKind::Decision))
            .await?
        else {
            return refuse("it has no decision on record".into());
        };
        let Some(Kind::Admitted(admitted)) = &recorded.kind else {
            return refuse("it was refused, and ran nothing".into());
        };
        let Some(before) = admitted.request.as_ref() else {
            return refuse("its decision records no request".into());
        };
        // A child of an undo of a rollout undoes that rollout's child on its target, and
        // nothing else someone submitted under that child's id.
        if !request.parent.is_empty() {
            let child_of = before.parent.parse::<CommandId>().ok().filter(|parent| {
                !before.health
                    && rct_bus::Target::new(recorded.target.as_str()).is_ok_and(|t| {
                        rct_bus::rollout::child_id(*parent, &t) == original
                            && recorded.target == decision.target
                    })
            });
            if child_of.is_none() {
                return refuse(
                    "it is not the undone rollout's child on this target (another command \
                     holds that child's id)"
                        .into(),
                );
            }
        }
        if before.dry_run || before.plan {
            return refuse("it was a dry run or a plan, and changed nothing".into());
        }
        let Ok(name) = recorded.operation.parse::<rct_bus::OperationName>() else {
            return refuse(format!(
                "its operation {:?} has no name",
                recorded.operation
            ));
        };
        let policy = self.policy();
        let Some((_, operation)) = policy.catalog.operation(&name) else {
            return refuse(format!("{name} is no longer in the catalog"));
        };
        let Some(inverse) = &operation.inverse else {
            return refuse(format!(
                "{name} has no inverse in the catalog; run the operation that reverses it \
                 yourself"
            ));
        };
        if inverse.operation != decision.operation {
            return refuse(format!(
                "{name} is undone by {}, not {}",
                inverse.operation, decision.operation
            ));
        }
        let outputs = match self.ended(name.tower(), &recorded.target, original).await? {
            Some(Kind::Succeeded(succeeded)) => succeeded.outputs,
            None => return refuse("it has not ended: undo it once it succeeded".into()),
            Some(_) => {
                return refuse(format!(
                    "it did not succeed (rct show {original}): rct undo reverses a success only"
                ));
            }
        };
        let filled = match inverse.fill(&before.params, &outputs) {
            Ok(filled) => filled,
            Err(why) => return refuse(why),
        };
        let inverse_name: rct_bus::OperationName = match inverse.operation.parse() {
            Ok(name) => name,
            Err(e) => return refuse(format!("its inverse: {e}")),
        };
        let Some((_, undo)) = policy.catalog.operation(&inverse_name) else {
            return refuse(format!("its inverse {inverse_name} is not in the catalog"));
        };
        // Every parameter is what the record gives, or the default: an undo changes only
        // what its original changed.
        for (param, spec) in &undo.params {
            let (wanted, said) = match filled.get(param) {
                Some(text) => match spec.parse(param, text) {
                    Ok(value) => (value, format!("{text:?}, as its record says")),
                    Err(e) => {
                        return refuse(format!(
                            "its record gives {param} = {text:?}, which {inverse_name} does \
                             not take: {}",
                            e.message
                        ));
                    }
                },
                None => match spec.default_value() {
                    Some(value) => {
                        let shown = rct_bus::catalog::display_value(&value);
                        (
                            value,
                            format!("its default {shown:?}: the inverse does not name it"),
                        )
                    }
                    None => continue,
                },
            };
            if request.params.get(param) != Some(&wanted) {
                let given = request
                    .params
                    .get(param)
                    .map(rct_bus::catalog::display_value)
                    .unwrap_or_default();
                return refuse(format!(
                    "its undo sets {param} to {said}, and this request asks for {given:?}: \
                     undo it with rct undo {original}"
                ));
            }
        }
        for undo_id in self.undone_by(&recorded).await? {
            if undo_id.to_string() == decision.command_id {
                continue;
            }
            let Some(earlier) = self
                .own_event_on(&subject::events_of_kind(undo_id, EventKind::Decision))
                .await?
            else {
                continue;
            };
            let Ok(earlier_name) = earlier.operation.parse::<rct_bus::OperationName>() else {
                continue;
            };
            // An undo that failed, was cancelled or expired leaves it to undo again; one that
            // ended unknown may have changed anything.
            match self
                .ended(earlier_name.tower(), &earlier.target, undo_id)
                .await?
            {
                None => {
                    return refuse(format!(
                        "it is being undone, by command {undo_id} (rct watch {undo_id})"
                    ));
                }
                Some(Kind::Succeeded(_)) => {
                    return refuse(format!(
                        "it was undone already, by command {undo_id} (rct show {undo_id})"
                    ));
                }
                Some(Kind::Unknown(_)) => {
                    return refuse(format!(
                        "command {undo_id} undid it and ended unknown (its agent stopped \
                         mid-way): see what it changed (rct show {undo_id}) and set it right by \
                         hand"
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(None)
    }

    /// The undos admitted for `original` (its decision): the links admission wrote on its
    /// timeline, in order.
    async fn undone_by(
        &self,
        original: &proto::Event,
    ) -> Result<Vec<CommandId>, rct_streams::Error> {
        let Some((name, id)) = named(&original.operation, &original.command_id) else {
            return Ok(Vec::new());
        };
        let filter = rct_streams::replay::Filter {
            command: Some(id),
            tower: Some(name.tower().clone()),
            target: Some(rct_bus::Target::of_event(&original.target)),
            kind: Some(EventKind::Log),
            trust: Some(self.trust.clone()),
            ..Default::default()
        };
        Ok(rct_streams::replay::records(&self.js, &filter)
            .await?
            .into_iter()
            .filter(|r| matches!(r.provenance, Provenance::Verified(Author::Admission)))
            .filter_map(|r| match r.event.kind {
                Some(Kind::Log(log)) => log.undone_by.parse().ok(),
                _ => None,
            })
            .collect())
    }

    /// Writes the link from an admitted undo's original to it (`undone_by`, on the original's
    /// timeline), once however often it is called: the undo's `undo_of` links the other way.
    async fn link_undo(
        &self,
        publisher: &Publisher,
        decision: &proto::Event,
    ) -> Result<(), rct_streams::Error> {
        let Some(Kind::Admitted(admitted)) = &decision.kind else {
            return Ok(());
        };
        let Some(request) = admitted
            .request
            .as_ref()
            .filter(|r| !r.undo_of.is_empty() && !r.dry_run && !r.plan)
        else {
            return Ok(());
        };
        let Ok(original) = request.undo_of.parse::<CommandId>() else {
            return Ok(());
        };
        let Some(recorded) = self
            .own_event_on(&subject::events_of_kind(original, EventKind::Decision))
            .await?
        else {
            return Ok(());
        };
        let Ok(name) = recorded.operation.parse::<rct_bus::OperationName>() else {
            return Ok(());
        };
        let undo_id: CommandId = match decision.command_id.parse() {
            Ok(id) => id,
            Err(_) => return Ok(()),
        };
        // Once, even when the submission is delivered again after the stream's duplicate
        // window.
        if self.undone_by(&recorded).await?.contains(&undo_id) {
            return Ok(());
        }
        let who = request
            .operator
            .as_ref()
            .map(|o| o.email.clone())
            .unwrap_or_default();
        let link = proto::Event {
            command_id: recorded.command_id.clone(),
            at: Some(rct_streams::timestamp::from_datetime(
                OffsetDateTime::now_utc(),
            )),
            source: self.policy().source.clone(),
            operation: recorded.operation.clone(),
            target: recorded.target.clone(),
            kind: Some(Kind::Log(proto::Log {
                stream: proto::LogStream::Admission as i32,
                line: format!(
                    "undone by command {} ({} on {}, asked by {who}: {:?})",
                    decision.command_id, decision.operation, decision.target, request.justification
                ),
                undone_by: decision.command_id.clone(),
            })),
        };
        publisher
            .event(
                name.tower(),
                &link,
                format!("undone-by-{}", decision.command_id),
            )
            .await?;
        Ok(())
    }

    /// Takes the locks an `Admitted` decision's command needs, in key order, and lists them
    /// in the decision: the holder it is in each and the keys it newly took; or why not, when
    /// one is held (the ones it took are given back). Plans and dry runs change nothing and
    /// take none. A lock is held until its holder's outcome is recorded, its decision is a
    /// refusal or its expiry passes ([`Self::holds`]): released by the next command that
    /// takes it, never stuck.
    async fn take_locks(
        &self,
        decision: &mut proto::Event,
    ) -> Result<Result<Taken, String>, rct_streams::Error> {
        let none = Ok(Ok(Taken::default()));
        let (command_id, target) = (decision.command_id.clone(), decision.target.clone());
        let Ok(name) = decision.operation.parse::<rct_bus::OperationName>() else {
            return none;
        };
        let Some(Kind::Admitted(admitted)) = &mut decision.kind else {
            return none;
        };
        let Some(request) = admitted.request.as_ref().filter(|r| !r.dry_run && !r.plan) else {
            return none;
        };
        let policy = self.policy();
        let Some((_, operation)) = policy.catalog.operation(&name) else {
            return none;
        };
        let mut locks = rct_bus::lock::locks(operation, &request.params);
        if !request.undo_of.is_empty() {
            // Two undos of one command never run at once: each reads the other's link while
            // it holds this lock (see `Self::gates`).
            let resource = format!("undo of {}", request.undo_of);
            locks.push((rct_bus::lock::key(&resource), resource));
            locks.sort();
        }
        // A rollout's child is decided by the coordinator alone, under an id anyone can
        // derive: a request someone parked under it (waiting for approvals) takes no slot
        // of the child's, so the child takes its locks.
        if locks.is_empty()
            || (request.parent.is_empty() && self.reused(command_id.parse().ok(), request).await?)
        {
            return none;
        }
        let now = jiff::Timestamp::now();
        let deadline = admitted
            .deadline
            .as_ref()
            .and_then(rct_streams::timestamp::to_datetime)
            .and_then(|at| jiff::Timestamp::from_nanosecond(at.unix_timestamp_nanos()).ok())
            .unwrap_or(now);
        let timeout = admitted
            .timeout
            .as_ref()
            .map(rct_streams::timestamp::to_std_duration)
            .unwrap_or(operation.timeout);
        let me = rct_bus::lock::Holder {
            command_id,
            submission: request.submission_sequence,
            operation: name.to_string(),
            target,
            operator: request
                .operator
                .as_ref()
                .map(|o| o.email.clone())
                .unwrap_or_default(),
            justification: request.justification.clone(),
            conflicts_with: operation.conflicts_with.clone(),
            taken_at: now.to_string(),
            expires_at: rct_bus::lock::expiry(deadline, timeout, self.config.lock_grace)
                .to_string(),
        };
        let store = rct_streams::locks::bucket(&self.js).await?;
        let mut taken = Taken {
            holder: Some(me.clone()),
            keys: Vec::new(),
        };
        let mut resources = Vec::new();
        for (key, resource) in &locks {
            let holds = |holder: rct_bus::lock::Holder| -> futures::future::BoxFuture<'_, _> {
                Box::pin(async move { self.holds(&holder).await })
            };
            match rct_streams::locks::take(&store, key, resource, &me, &holds).await? {
                rct_streams::locks::Took::Taken => taken.keys.push(key.clone()),
                rct_streams::locks::Took::Held => {}
                rct_streams::locks::Took::Conflict(holder) => {
                    self.release(&taken).await?;
                    tracing::info!(command_id = %me.command_id, holder = %holder.command_id, %resource, "locked");
                    return Ok(Err(holder.refusal(resource)));
                }
            }
            resources.push(resource.clone());
        }
        admitted.locks = resources;
        Ok(Ok(taken))
    }

    /// Whether command `id` is decided, or waits, for another submission than `request`'s: a
    /// submission reusing it is refused `duplicate` once its decision finds the slot taken,
    /// and takes no lock meanwhile.
    async fn reused(
        &self,
        id: Option<CommandId>,
        request: &proto::Request,
    ) -> Result<bool, rct_streams::Error> {
        let Some(id) = id else {
            return Ok(false);
        };
        for kind in [EventKind::Decision, EventKind::Pending] {
            if let Some(holder) = self
                .own_event_on(&subject::events_of_kind(id, kind))
                .await?
                && decided_request(&holder).map(|r| r.submission_sequence)
                    != Some(request.submission_sequence)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Gives back the locks a command newly took.
    async fn release(&self, taken: &Taken) -> Result<(), rct_streams::Error> {
        let Some(me) = &taken.holder else {
            return Ok(());
        };
        let store = rct_streams::locks::bucket(&self.js).await?;
        for key in &taken.keys {
            rct_streams::locks::release(&store, key, me).await?;
        }
        Ok(())
    }

    /// Whether `holder` still holds its lock: before its expiry, not ended (an outcome
    /// `unknown` holds on to the expiry: its agent stopped, what it ran may not have), and
    /// not refused. Its decision must be for the submission it was taken for (one reusing
    /// the command id holds nothing); with no decision at all (admission stopped between
    /// the lock and the decision, or the submission was refused elsewhere) it holds for
    /// `lock_grace` after it was taken, when a redelivery has decided it again.
    async fn holds(&self, holder: &rct_bus::lock::Holder) -> Result<bool, rct_streams::Error> {
        let now = jiff::Timestamp::now();
        if holder.lapsed(now) {
            return Ok(false);
        }
        let Some((name, id)) = named(&holder.operation, &holder.command_id) else {
            return Ok(false);
        };
        match self.ended(name.tower(), &holder.target, id).await? {
            Some(Kind::Unknown(_)) => return Ok(true),
            Some(_) => return Ok(false),
            None => {}
        }
        let decision = self
            .own_event_on(&subject::events_of_kind(id, EventKind::Decision))
            .await?;
        Ok(match decision {
            Some(decision) => {
                decided_request(&decision).map(|r| r.submission_sequence) == Some(holder.submission)
                    && matches!(decision.kind, Some(Kind::Admitted(_)))
            }
            None => holder
                .taken_at
                .parse::<jiff::Timestamp>()
                .ok()
                .and_then(|at| {
                    let grace = jiff::SignedDuration::try_from(self.config.lock_grace).ok()?;
                    at.checked_add(grace).ok()
                })
                .is_some_and(|until| now < until),
        })
    }

    /// The outcome of command `id` of `tower` on `target`, if one is on record from its
    /// tower's agents or admission.
    async fn ended(
        &self,
        tower: &Tower,
        target: &str,
        id: CommandId,
    ) -> Result<Option<Kind>, rct_streams::Error> {
        let filter = rct_streams::replay::Filter {
            command: Some(id),
            tower: Some(tower.clone()),
            target: Some(rct_bus::Target::of_event(target)),
            kind: Some(EventKind::Outcome),
            trust: Some(self.trust.clone()),
            ..Default::default()
        };
        Ok(rct_streams::replay::records(&self.js, &filter)
            .await?
            .into_iter()
            .find(|r| {
                matches!(
                    r.provenance,
                    Provenance::Verified(Author::Agent(_) | Author::Admission)
                )
            })
            .and_then(|r| r.event.kind))
    }

    /// The freeze in force for `tower` at `now`: the catalog's windows, and the freezes
    /// started on record (admission-signed `_freeze/<tower>` decisions of the last
    /// [`rct_bus::freeze::LONGEST_FREEZE`]).
    async fn frozen(
        &self,
        tower: &Tower,
        now: OffsetDateTime,
    ) -> Result<Option<rct_bus::freeze::Active>, rct_streams::Error> {
        let longest = time::Duration::try_from(rct_bus::freeze::LONGEST_FREEZE)
            .unwrap_or(time::Duration::DAY);
        let filter = rct_streams::replay::Filter {
            tower: Some(Tower::new(rct_bus::freeze::TOWER).expect("a tower name")),
            target: Some(rct_bus::Target::of_event(tower.as_str())),
            since: Some(now - longest),
            trust: Some(self.trust.clone()),
            ..Default::default()
        };
        let decisions: Vec<proto::Event> = rct_streams::replay::records(&self.js, &filter)
            .await?
            .into_iter()
            .filter(|r| r.provenance == Provenance::Verified(Author::Admission))
            .map(|r| r.event)
            .collect();
        let at = jiff::Timestamp::from_nanosecond(now.unix_timestamp_nanos())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let recorded: Vec<_> = rct_bus::freeze::recorded(&decisions, at)
            .into_iter()
            .collect();
        Ok(self.policy().frozen(tower, now, &recorded))
    }

    /// A cancel request must name an admitted command of the same operation. Its decision
    /// and its cancel event take that command's target: the cancel event goes where the
    /// command's agents watch, and a redelivery rebuilds it from the decision alone.
    async fn check_cancel_target(
        &self,
        mut cancel: crate::decide::Cancel,
    ) -> Result<Verdict, rct_streams::Error> {
        let on = |kind| subject::events_of_tower_command(&cancel.tower, cancel.target, kind);
        let resume = decided_request(&cancel.decision).is_some_and(|r| r.resume);
        let mut target = self.own_event_on(&on(EventKind::Decision)).await?;
        if target.is_none() {
            // Still waiting for approvals: cancelling withdraws it (see `settle`).
            target = self.own_event_on(&on(EventKind::Pending)).await?;
        }
        let problem = match &target {
            None => Some(format!(
                "there is no command {} of tower {}",
                cancel.target, cancel.tower
            )),
            Some(e) if !matches!(e.kind, Some(Kind::Admitted(_) | Kind::Pending(_))) => {
                Some(format!(
                    "command {} was rejected; there is nothing to cancel",
                    cancel.target
                ))
            }
            Some(e) if e.operation != cancel.decision.operation => Some(format!(
                "command {} is a {} command, not {}",
                cancel.target, e.operation, cancel.decision.operation
            )),
            Some(e) if resume && !is_rollout(e) => Some(format!(
                "command {} is not a rollout; only a rollout pauses and resumes",
                cancel.target
            )),
            Some(_) => None,
        };
        Ok(match problem {
            None => {
                let target = target.map(|e| e.target).unwrap_or_default();
                cancel.decision.target.clone_from(&target);
                cancel.cancel.target = target;
                Verdict::Cancel(cancel)
            }
            Some(message) => Verdict::Reject(Reject {
                tower: cancel.tower,
                command_id: Some(cancel.command_id),
                decision: rejection(&cancel.decision, RejectionCode::UnknownCommand, message),
            }),
        })
    }

    /// An approval or denial must name a command of the same operation that waits for
    /// approvals, carry that request's digest, come before its expiry, once per approver,
    /// and not from the requester unless the rule allows it. Its decision takes that
    /// command's target.
    async fn check_approval(
        &self,
        mut approve: crate::decide::Approve,
    ) -> Result<Verdict, rct_streams::Error> {
        use RejectionCode as C;
        let id = approve.target;
        let tower = approve.tower.clone();
        if approve.review {
            return self.check_review(approve).await;
        }
        let verb = if approve.deny { "denial" } else { "approval" };
        let pending = self
            .own_event_on(&subject::events_of_tower_command(
                &tower,
                id,
                EventKind::Pending,
            ))
            .await?;
        let decided = self
            .own_event_on(&subject::events_of_tower_command(
                &tower,
                id,
                EventKind::Decision,
            ))
            .await?;
        let problem = match (&pending, &decided) {
            (_, Some(decision)) => Some((
                C::NotPending,
                format!(
                    "command {id} does not wait for approvals: it was {}; the {verb} changes \
                     nothing",
                    match &decision.kind {
                        Some(Kind::Admitted(_)) => "admitted".to_owned(),
                        Some(Kind::Rejected(r)) =>
                            format!("rejected ({})", rejection_code_name(r.code)),
                        _ => "decided".to_owned(),
                    }
                ),
            )),
            (None, None) => Some((
                C::UnknownCommand,
                format!("there is no command {id} of tower {tower} waiting for approvals"),
            )),
            (Some(pending), None) => self.approval_problem(&approve, pending).await?,
        };
        if let Some((code, message)) = problem {
            return Ok(Verdict::Reject(Reject {
                tower,
                command_id: Some(approve.command_id),
                decision: rejection(&approve.decision, code, message),
            }));
        }
        approve.decision.target = pending.map(|p| p.target).unwrap_or_default();
        Ok(Verdict::Approve(approve))
    }

    /// A review must name a command of the same operation admitted by breaking the glass, by
    /// someone other than its requester, once per reviewer. Its decision takes that
    /// command's target.
    async fn check_review(
        &self,
        mut review: crate::decide::Approve,
    ) -> Result<Verdict, rct_streams::Error> {
        use RejectionCode as C;
        let id = review.target;
        let tower = review.tower.clone();
        let decided = self
            .own_event_on(&subject::events_of_tower_command(
                &tower,
                id,
                EventKind::Decision,
            ))
            .await?;
        let reviewer = decided_request(&review.decision)
            .and_then(|r| r.operator.clone())
            .unwrap_or_default();
        let waiting = match &decided {
            None => self
                .own_event_on(&subject::events_of_tower_command(
                    &tower,
                    id,
                    EventKind::Pending,
                ))
                .await?
                .is_some(),
            Some(_) => false,
        };
        let problem = match &decided {
            None if waiting => Some((
                C::NotPending,
                format!(
                    "command {id} waits for its approvals: it was not run by breaking the \
                     glass, and there is nothing to review (rct approve {id} to approve it)"
                ),
            )),
            None => Some((
                C::UnknownCommand,
                format!("there is no command {id} of tower {tower} to review"),
            )),
            Some(d) if d.operation != review.decision.operation => Some((
                C::UnknownCommand,
                format!(
                    "command {id} is a {} command, not {}",
                    d.operation, review.decision.operation
                ),
            )),
            Some(d) => match decided_request(d) {
                Some(r)
                    if matches!(d.kind, Some(Kind::Admitted(_))) && !r.break_glass.is_empty() =>
                {
                    if r.operator.as_ref().map(|o| &o.subject) == Some(&reviewer.subject) {
                        Some((
                            C::SelfApproval,
                            format!(
                                "{} broke the glass for command {id} and cannot review it: \
                                 someone else must",
                                reviewer.email
                            ),
                        ))
                    } else {
                        let reviews = self.approvals_of(d).await?;
                        reviews
                            .iter()
                            .find(|(_, a)| {
                                a.review
                                    && a.by.as_ref().map(|b| &b.subject) == Some(&reviewer.subject)
                            })
                            .map(|(_, before)| {
                                (
                                    C::AlreadyApproved,
                                    format!(
                                        "{} already reviewed command {id} (request {})",
                                        reviewer.email, before.approval_id
                                    ),
                                )
                            })
                    }
                }
                _ => Some((
                    C::NotPending,
                    format!(
                        "command {id} was not run by breaking the glass; there is nothing to \
                         review"
                    ),
                )),
            },
        };
        if let Some((code, message)) = problem {
            return Ok(Verdict::Reject(Reject {
                tower,
                command_id: Some(review.command_id),
                decision: rejection(&review.decision, code, message),
            }));
        }
        review.decision.target = decided.map(|d| d.target).unwrap_or_default();
        Ok(Verdict::Approve(review))
    }

    /// What is wrong with `approve` of the request `pending` (not decided yet), if anything.
    async fn approval_problem(
        &self,
        approve: &crate::decide::Approve,
        pending: &proto::Event,
    ) -> Result<Option<(RejectionCode, String)>, rct_streams::Error> {
        use RejectionCode as C;
        let id = approve.target;
        let verb = if approve.deny { "denial" } else { "approval" };
        let Some(Kind::Pending(p)) = &pending.kind else {
            return Ok(Some((
                C::UnknownCommand,
                format!("command {id} holds no request"),
            )));
        };
        if pending.operation != approve.decision.operation {
            return Ok(Some((
                C::UnknownCommand,
                format!(
                    "command {id} is a {} command, not {}",
                    pending.operation, approve.decision.operation
                ),
            )));
        }
        let expires_at = p
            .expires_at
            .as_ref()
            .and_then(rct_streams::timestamp::to_datetime);
        if expires_at.is_none_or(|at| OffsetDateTime::now_utc() > at) {
            return Ok(Some((
                C::ApprovalExpired,
                format!(
                    "command {id} waited for approvals until {}; the {verb} came too late, and \
                     the request is refused",
                    expires_at.map_or_else(|| "?".into(), |at| at.to_string())
                ),
            )));
        }
        let digest = match self.plan_of(pending, p).await? {
            Described::Unplanned => p.digest.clone(),
            Described::Planned { plan, .. } => rct_bus::approval::recompute(p, Some(&plan))
                .map(|d| d.to_vec())
                .unwrap_or_default(),
            Described::Waiting => {
                return Ok(Some((
                    C::DigestMismatch,
                    format!(
                        "the plan of command {id} is not made yet (plan-only command {}): \
                         nothing can be approved before it is; look at it once it is there \
                         (rct approve {id})",
                        p.plan_id
                    ),
                )));
            }
            Described::Failed(why) => {
                return Ok(Some((
                    C::PlanFailed,
                    format!("command {id} cannot be approved: {why}"),
                )));
            }
        };
        if approve.digest != digest {
            return Ok(Some((
                C::DigestMismatch,
                format!(
                    "the {verb} is for digest {}, but the request of command {id} has digest \
                     {}: look at it again (rct approve {id}) and decide on what it is",
                    rct_bus::approval::hex(&approve.digest),
                    rct_bus::approval::hex(&digest)
                ),
            )));
        }
        let approver = decided_request(&approve.decision).and_then(|r| r.operator.as_ref());
        let requester = p.request.as_ref().and_then(|r| r.operator.as_ref());
        let name = approver.map(|a| a.email.clone()).unwrap_or_default();
        let allow_self = p.rule.as_ref().is_some_and(|r| r.allow_self);
        if !approve.deny
            && !allow_self
            && approver.map(|a| &a.subject) == requester.map(|r| &r.subject)
        {
            return Ok(Some((
                C::SelfApproval,
                format!(
                    "{name} asked for command {id} and cannot approve it: {} needs approvals by \
                     others",
                    pending.operation
                ),
            )));
        }
        let approvals = self.approvals_of(pending).await?;
        if let Some((_, before)) = approvals
            .iter()
            .find(|(_, a)| a.by.as_ref().map(|b| &b.subject) == approver.map(|a| &a.subject))
        {
            return Ok(Some((
                C::AlreadyApproved,
                format!(
                    "{name} already {} command {id} (request {}); each approver counts once",
                    if before.denied { "denied" } else { "approved" },
                    before.approval_id
                ),
            )));
        }
        Ok(None)
    }

    /// The approval events admission recorded for the request `pending`, with their
    /// sequences, in stream order.
    async fn approvals_of(
        &self,
        pending: &proto::Event,
    ) -> Result<Vec<(u64, proto::Approval)>, rct_streams::Error> {
        let Some((name, id)) = named(&pending.operation, &pending.command_id) else {
            return Ok(Vec::new());
        };
        let filter = rct_streams::replay::Filter {
            command: Some(id),
            tower: Some(name.tower().clone()),
            target: Some(rct_bus::Target::of_event(&pending.target)),
            kind: Some(EventKind::Approval),
            trust: Some(self.trust.clone()),
            ..Default::default()
        };
        Ok(rct_streams::replay::records(&self.js, &filter)
            .await?
            .into_iter()
            .filter(|r| r.provenance == Provenance::Verified(Author::Admission))
            .filter_map(|r| match r.event.kind {
                Some(Kind::Approval(a)) => Some((r.sequence, a)),
                _ => None,
            })
            .collect())
    }

    /// Records the approval an admitted approval request (`decision`, with the approver's
    /// submission as stored in `payload`) makes on the command it names, then settles that
    /// command. Run on the first attempt and on every redelivery alike.
    async fn approval_follow_up(
        &self,
        publisher: &Publisher,
        decision: &proto::Event,
        payload: &[u8],
    ) -> Result<(), rct_streams::Error> {
        let Some(approval) = Policy::recorded_approval(decision, payload) else {
            tracing::error!(command_id = %decision.command_id, "the recorded approval names no request; nothing to approve");
            return Ok(());
        };
        let Some((name, id)) = named(&decision.operation, &approval.command_id) else {
            return Ok(());
        };
        let n = decided_request(decision).map_or(0, |r| r.submission_sequence);
        publisher.event(name.tower(), &approval, n).await?;
        self.settle(publisher, name.tower(), id, Settle::Any).await
    }

    /// Decides the request `id` waiting for approvals, if its time has come: admitted (and
    /// its command published) once the threshold is met, refused when denied, expired or its
    /// operation changed; left waiting otherwise. Safe to run by any replica at any time:
    /// the decision slot takes one decision, and a decision already there is completed.
    /// With [`Settle::Refusals`], only refusals are written.
    async fn settle(
        &self,
        publisher: &Publisher,
        tower: &Tower,
        id: CommandId,
        what: Settle,
    ) -> Result<(), rct_streams::Error> {
        use crate::decide::Tally;
        let on = |kind| subject::events_of_tower_command(tower, id, kind);
        let Some(pending) = self.own_event_on(&on(EventKind::Pending)).await? else {
            return Ok(());
        };
        let Some(Kind::Pending(p)) = &pending.kind else {
            return Ok(());
        };
        let sequence = p.request.as_ref().map_or(0, |r| r.submission_sequence);
        let ours =
            |d: &proto::Event| decided_request(d).map(|r| r.submission_sequence) == Some(sequence);
        if let Some(decision) = self.own_event_on(&on(EventKind::Decision)).await? {
            if ours(&decision) && what == Settle::Any {
                self.publish_approved(publisher, &decision, p).await?;
            }
            return Ok(());
        }
        let approvals = self.approvals_of(&pending).await?;
        let cancelled = self.own_event_on(&on(EventKind::Cancel)).await?;
        let policy = self.policy();
        let now = OffsetDateTime::now_utc();
        let refuse = |code: RejectionCode, message: String| {
            let mut refusal = rejection(&pending, code, message);
            refusal.at = Some(rct_streams::timestamp::from_datetime(now));
            refusal.source.clone_from(&policy.source);
            refusal
        };
        let (digest, plan) = match self.plan_of(&pending, p).await? {
            Described::Unplanned => (Some(p.digest.clone()), 0),
            Described::Planned { sequence, plan } => (
                rct_bus::approval::recompute(p, Some(&plan)).map(|d| d.to_vec()),
                sequence,
            ),
            Described::Waiting => (None, 0),
            Described::Failed(why) => {
                let refusal = refuse(
                    RejectionCode::PlanFailed,
                    format!("{why}; nothing can be approved: submit it again"),
                );
                return self.decide_waiting(publisher, tower, id, &refusal, p).await;
            }
        };
        let tally = match cancelled.as_ref().and_then(|e| e.kind.as_ref()) {
            Some(Kind::CancelRequested(c)) => Tally::Withdrawn(withdrawn(c)),
            _ => policy.tally(&pending, digest.as_deref(), &approvals, now),
        };
        let decision = match tally {
            Tally::Waiting { .. } => return Ok(()),
            Tally::Approved(_) if what == Settle::Refusals => return Ok(()),
            Tally::Approved(_) if let Some(freeze) = self.frozen(tower, now).await? => refuse(
                RejectionCode::Frozen,
                format!(
                    "it was approved, but {}",
                    freeze.refusal(&pending.operation)
                ),
            ),
            Tally::Approved(counted) => match policy.approved(&pending, counted, plan, now) {
                Ok(mut decision) => match Box::pin(self.gates(&mut decision)).await? {
                    None => decision,
                    Some((code, why)) => refuse(code, format!("it was approved, but {why}")),
                },
                Err(reason) => refuse(
                    RejectionCode::CatalogChanged,
                    format!("it was approved, but cannot be admitted: {reason}"),
                ),
            },
            Tally::Denied(message) => refuse(RejectionCode::Denied, message),
            Tally::Expired(message) => refuse(RejectionCode::ApprovalExpired, message),
            Tally::CatalogChanged(message) => refuse(RejectionCode::CatalogChanged, message),
            Tally::Withdrawn(message) => refuse(RejectionCode::Withdrawn, message),
        };
        self.decide_waiting(publisher, tower, id, &decision, p)
            .await
    }

    /// Writes `decision` for the request `id` that waited for approvals (`pending`), and
    /// publishes its command if the decision slot holds an admission of it.
    async fn decide_waiting(
        &self,
        publisher: &Publisher,
        tower: &Tower,
        id: CommandId,
        decision: &proto::Event,
        p: &proto::Pending,
    ) -> Result<(), rct_streams::Error> {
        let sequence = p.request.as_ref().map_or(0, |r| r.submission_sequence);
        let ours =
            |d: &proto::Event| decided_request(d).map(|r| r.submission_sequence) == Some(sequence);
        let on = |kind| subject::events_of_tower_command(tower, id, kind);
        let holder = match publisher.event(tower, decision, sequence).await? {
            Slot::Written(ack) if !ack.duplicate => {
                tracing::info!(
                    command_id = %id,
                    decision = match &decision.kind {
                        Some(Kind::Admitted(_)) => "admitted",
                        _ => "rejected",
                    },
                    "a request that waited for approvals is decided"
                );
                Some(decision.clone())
            }
            _ => self.own_event_on(&on(EventKind::Decision)).await?,
        };
        if let Some(holder) = holder.filter(ours) {
            self.publish_approved(publisher, &holder, p).await?;
        }
        Ok(())
    }

    /// Sends the plan-only command that describes the request `pending` (waiting for
    /// approvals of an operation that plans), with its decision: both are the same whoever
    /// sends them and however often, so a redelivery sends them again safely.
    async fn describe(
        &self,
        publisher: &Publisher,
        pending: &proto::Event,
    ) -> Result<(), rct_streams::Error> {
        let Some(Kind::Pending(p)) = &pending.kind else {
            return Ok(());
        };
        let Some((name, plan_id)) = named(&pending.operation, &p.plan_id) else {
            return Ok(());
        };
        let decision = match self.policy().plan_decision(pending) {
            Ok(decision) => decision,
            Err(reason) => {
                // The request waits until its time runs out: nothing can approve it.
                tracing::error!(command_id = %pending.command_id, %reason, "cannot send the plan of a request waiting for approvals");
                return Ok(());
            }
        };
        let sequence = p.request.as_ref().map_or(0, |r| r.submission_sequence);
        let holder = match publisher.event(name.tower(), &decision, sequence).await? {
            Slot::Written(ack) if !ack.duplicate => Some(decision),
            _ => {
                self.own_event_on(&subject::events_of_tower_command(
                    name.tower(),
                    plan_id,
                    EventKind::Decision,
                ))
                .await?
            }
        };
        let Some(holder) = holder.filter(|h| describes(h, pending)) else {
            // plan_of finds it so, and the request is refused plan_failed.
            tracing::error!(command_id = %pending.command_id, %plan_id, "the decision slot of the plan holds another command; the plan is not sent");
            return Ok(());
        };
        let payload = p
            .submission
            .as_ref()
            .map(prost::Message::encode_to_vec)
            .unwrap_or_default();
        match self
            .policy()
            .recorded_command(&holder, &payload, Vec::new(), None)
        {
            Ok((subject, command)) => {
                publisher
                    .send(Outgoing::new(subject, plan_id.msg_id(), command))
                    .await?;
            }
            Err(reason) => {
                tracing::error!(command_id = %pending.command_id, %reason, "cannot build the plan-only command");
            }
        }
        Ok(())
    }

    /// Where the plan of the request `pending` stands: the first plan event an agent of its
    /// tower and target wrote for its plan-only command, or why there is none.
    async fn plan_of(
        &self,
        pending: &proto::Event,
        p: &proto::Pending,
    ) -> Result<Described, rct_streams::Error> {
        if p.plan_id.is_empty() {
            return Ok(Described::Unplanned);
        }
        let Some((name, plan_id)) = named(&pending.operation, &p.plan_id) else {
            return Ok(Described::Failed(format!(
                "its plan-only command {:?} is not a command id",
                p.plan_id
            )));
        };
        let read = rct_streams::replay::Filter {
            command: Some(plan_id),
            tower: Some(name.tower().clone()),
            target: Some(rct_bus::Target::of_event(&pending.target)),
            kind: Some(EventKind::Plan),
            trust: Some(self.trust.clone()),
            ..Default::default()
        };
        // Only the plan-only command admission admitted to describe this very request.
        let admitted = self
            .own_event_on(&subject::events_of_tower_command(
                name.tower(),
                plan_id,
                EventKind::Decision,
            ))
            .await?;
        if admitted.as_ref().is_some_and(|d| !describes(d, pending)) {
            return Ok(Described::Failed(format!(
                "the id of its plan-only command, {plan_id}, is another command's"
            )));
        }
        let by_agent = |r: &rct_streams::Record| {
            matches!(r.provenance, Provenance::Verified(Author::Agent(_)))
        };
        // The outcome before the plan: the agent writes the plan first, so an outcome read
        // first is never taken for an end without one when the plan came in between.
        let ended = self.ended(name.tower(), &pending.target, plan_id).await?;
        let plan = rct_streams::replay::records(&self.js, &read)
            .await?
            .into_iter()
            .find(by_agent);
        if let Some(record) = plan
            && let Some(Kind::Plan(plan)) = record.event.kind
        {
            return Ok(Described::Planned {
                sequence: record.sequence,
                plan,
            });
        }
        Ok(match ended {
            None => Described::Waiting,
            Some(outcome) => Described::Failed(format!(
                "its plan (plan-only command {plan_id}) was not made: {}",
                describe_outcome(&outcome)
            )),
        })
    }

    /// After a cancel request is recorded: a command still waiting for approvals is ended,
    /// withdrawn, instead of ever running.
    async fn withdraw(
        &self,
        publisher: &Publisher,
        tower: &Tower,
        cancel: &proto::Event,
    ) -> Result<(), rct_streams::Error> {
        let Ok(id) = cancel.command_id.parse::<CommandId>() else {
            return Ok(());
        };
        if matches!(&cancel.kind, Some(Kind::CancelRequested(c)) if c.resume) {
            return Ok(());
        }
        self.settle(publisher, tower, id, Settle::Refusals).await
    }

    /// Publishes the command an `Admitted` decision of a request that waited for approvals
    /// admitted, with the approvers' signed approvals it lists (nothing for a refusal).
    async fn publish_approved(
        &self,
        publisher: &Publisher,
        decision: &proto::Event,
        pending: &proto::Pending,
    ) -> Result<(), rct_streams::Error> {
        let Some(Kind::Admitted(admitted)) = &decision.kind else {
            return Ok(());
        };
        let mut approvals = Vec::new();
        for sequence in &admitted.approvals {
            match self.stored_event(*sequence).await?.and_then(|e| e.kind) {
                Some(Kind::Approval(proto::Approval {
                    submission: Some(envelope),
                    ..
                })) => approvals.push(envelope),
                _ => {
                    tracing::error!(command_id = %decision.command_id, sequence, "an approval the decision lists cannot be read; ending it unrun");
                    let reason = format!("approval event {sequence} cannot be read");
                    return self.end_unpublished(publisher, decision, &reason).await;
                }
            }
        }
        let plan = match admitted.plan {
            0 => None,
            sequence => match self
                .stored_agent_event(sequence)
                .await?
                .and_then(|e| e.kind)
            {
                Some(Kind::Plan(plan)) => Some(plan),
                _ => {
                    tracing::error!(command_id = %decision.command_id, sequence, "the plan the decision names cannot be read; ending it unrun");
                    let reason = format!("plan event {sequence} cannot be read");
                    return self.end_unpublished(publisher, decision, &reason).await;
                }
            },
        };
        let payload = pending
            .submission
            .as_ref()
            .map(prost::Message::encode_to_vec)
            .unwrap_or_default();
        self.link_undo(publisher, decision).await?;
        match self
            .policy()
            .recorded_command(decision, &payload, approvals, plan)
        {
            Ok((subject, command)) => {
                publisher
                    .send(Outgoing::new(subject, decision.command_id.clone(), command))
                    .await?;
            }
            Err(reason) => {
                tracing::error!(command_id = %decision.command_id, %reason, "an approved command cannot be built from the record; ending it unrun");
                self.end_unpublished(publisher, decision, &reason).await?;
            }
        }
        Ok(())
    }

    /// Settles every request waiting for approvals that arrived within the longest approval
    /// wait the catalog allows: those whose time ran out, or whose operation the catalog
    /// changed, are refused. `settled` remembers the ones decided, so each is read once.
    /// Admitting is left to the approval that meets the threshold (and to its redelivery,
    /// should its replica stop half-way): it writes its approval before it counts, so of
    /// two last approvals counted at once, the one counted last sees both.
    async fn sweep(
        &self,
        settled: &mut std::collections::HashSet<String>,
    ) -> Result<(), rct_streams::Error> {
        // However the catalog changed since, no request waits longer than this; a day more
        // covers a sweep that could not run for a while.
        let since = OffsetDateTime::now_utc()
            - time::Duration::try_from(rct_bus::catalog::LONGEST_APPROVAL_WAIT)
                .unwrap_or(time::Duration::DAY)
            - time::Duration::DAY;
        let subject = subject::events_of_every_command(EventKind::Pending);
        let mut reader = rct_streams::direct::Reader::new(&self.js, EVENT_STREAM).await?;
        let mut start = rct_streams::direct::Start::Time(since);
        loop {
            let batch = reader
                .batch(start, &subject, rct_streams::direct::BATCH)
                .await?;
            let Some(last) = batch.messages.last().map(|m| m.sequence) else {
                return Ok(());
            };
            for stored in &batch.messages {
                let Some(pending) = self.own_event(stored) else {
                    continue;
                };
                if settled.contains(&pending.command_id) {
                    continue;
                }
                let Some((name, id)) = named(&pending.operation, &pending.command_id) else {
                    continue;
                };
                // One request that cannot be settled now holds up none of the others.
                if let Err(e) = self
                    .settle(&self.publisher, name.tower(), id, Settle::Refusals)
                    .await
                {
                    tracing::warn!(command_id = %id, error = %e, "cannot settle a request waiting for approvals; trying again at the next sweep");
                    continue;
                }
                let decided = self
                    .own_event_on(&subject::events_of_tower_command(
                        name.tower(),
                        id,
                        EventKind::Decision,
                    ))
                    .await?;
                if decided.is_some() {
                    settled.insert(pending.command_id);
                }
            }
            if batch.pending == 0 {
                return Ok(());
            }
            start = rct_streams::direct::Start::Sequence(last + 1);
        }
    }

    /// The first event on `subject` (a filter) in RCT_EVT that admission wrote, if any:
    /// what anyone else stored there, before or after, is not admission's word.
    async fn own_event_on(
        &self,
        subject: &str,
    ) -> Result<Option<proto::Event>, rct_streams::Error> {
        Ok(
            rct_streams::journal::first(&self.js, EVENT_STREAM, subject, |stored| {
                self.own_event(stored).is_some()
            })
            .await?
            .and_then(|stored| self.own_event(&stored)),
        )
    }

    /// Records a refusal that cannot go into its own command's decision slot (no valid id,
    /// or the id is taken) under an id of admission's choosing: for a submission, the one
    /// [`CommandId::derived`] gives it, so that a redelivery lands on the same single slot
    /// and is recorded once; otherwise (a refused login) a fresh one.
    async fn record_elsewhere(
        &self,
        publisher: &Publisher,
        tower: &Tower,
        mut decision: proto::Event,
        submission: Option<Stored<'_>>,
        claimed: Option<CommandId>,
    ) -> Result<Recorded, rct_streams::Error> {
        let (id, n) = match submission {
            Some(stored) => (
                CommandId::derived(
                    stored.at.into(),
                    SUBMIT_STREAM,
                    stored.sequence,
                    &stored.message.payload,
                ),
                stored.sequence,
            ),
            None => (CommandId::generate(), 0),
        };
        decision.command_id = id.to_string();
        // What a refusal holds came from outside (a login's token, a submission's words).
        if matches!(decision.kind, Some(Kind::Rejected(_))) {
            rct_bus::text::make_printable_within(&mut decision, crate::decide::QUOTED_MAX);
        }
        if let (Some(claimed), Some(Kind::Rejected(r))) = (claimed, decision.kind.as_mut())
            && r.code != RejectionCode::Duplicate as i32
        {
            r.message = format!(
                "{} (recorded as {id}: the submission claimed command id {claimed}, which is taken)",
                r.message
            );
        }
        match publisher.event(tower, &decision, n).await? {
            Slot::Written(ack) if !ack.duplicate => {
                log_decision(&Verdict::Reject(Reject {
                    tower: tower.clone(),
                    command_id: Some(id),
                    decision,
                }));
                Ok(Recorded::Now)
            }
            Slot::Written(_) => Ok(Recorded::Before),
            Slot::Taken { sequence } => {
                let holder = self.stored_event(sequence).await?;
                let ours = submission.is_some_and(|s| {
                    holder
                        .as_ref()
                        .and_then(decided_request)
                        .map(|r| r.submission_sequence)
                        == Some(s.sequence)
                });
                if !ours {
                    // Someone chose this very id for a command of their own; the refusal
                    // cannot be recorded, and retrying would not change that.
                    tracing::warn!(command_id = %id, holder = sequence, "the id a refusal is recorded under is taken; the refusal is not recorded");
                }
                Ok(Recorded::Before)
            }
        }
    }

    /// The event at `sequence`, if admission wrote it (see [`Inner::own_event`]).
    async fn stored_event(
        &self,
        sequence: u64,
    ) -> Result<Option<proto::Event>, rct_streams::Error> {
        Ok(self.own_event(&self.stored_message(sequence).await?))
    }

    /// The event stored at `sequence` in RCT_EVT, if an agent of its tower and target wrote
    /// it (a plan).
    async fn stored_agent_event(
        &self,
        sequence: u64,
    ) -> Result<Option<proto::Event>, rct_streams::Error> {
        let stored = self.stored_message(sequence).await?;
        let message = (
            stored.subject.as_str(),
            stored.payload.as_ref(),
            Some(&stored.headers),
        );
        Ok(rct_streams::Record::from_message(
            stored.sequence,
            stored.time,
            message,
            Some(&self.trust),
        )
        .ok()
        .filter(|r| matches!(r.provenance, Provenance::Verified(Author::Agent(_))))
        .map(|r| r.event))
    }

    async fn stored_message(
        &self,
        sequence: u64,
    ) -> Result<async_nats::jetstream::message::StreamMessage, rct_streams::Error> {
        let read = |e: async_nats::Error| rct_streams::Error::Read {
            what: format!("{EVENT_STREAM} message {sequence}"),
            cause: e,
        };
        self.js
            .get_stream_no_info(EVENT_STREAM)
            .await
            .map_err(|e| read(e.into()))?
            .get_raw_message(sequence)
            .await
            .map_err(|e| read(e.into()))
    }

    /// Answers a login from `source` (see [`crate::refusals::source`]); every refusal is
    /// recorded, one by one within the budget, as a count beyond it.
    async fn login(&self, payload: &[u8], source: &str) -> proto::LoginResponse {
        use proto::login_response::Result as R;
        let refuse = |code: RejectionCode, message: String| async move {
            self.record_refusal(source, "login", code, &message).await;
            proto::LoginResponse {
                result: Some(R::Refused(proto::LoginRefused {
                    code: rejection_code_name(code as i32).to_owned(),
                    message,
                })),
            }
        };
        let Ok(request) = proto::LoginRequest::decode(payload) else {
            let message = "the login request does not decode".to_owned();
            return refuse(RejectionCode::Malformed, message).await;
        };
        let verified = match self.id_tokens.verify(&request.id_token).await {
            Ok(verified) => verified,
            Err(refusal) => return refuse(refusal.code, refusal.message).await,
        };
        let Ok(session_key) = PublicKey::from_bytes(&request.session_public_key) else {
            let message = "the session public key is not 32 bytes of Ed25519".to_owned();
            return refuse(RejectionCode::Malformed, message).await;
        };
        let (token, expires_at) =
            self.policy()
                .certificates
                .issue(&verified.identity, &session_key, verified.expires_at);
        tracing::info!(operator = verified.identity.name(), groups = ?verified.identity.groups, "logged in");
        proto::LoginResponse {
            result: Some(R::Certificate(proto::Certificate {
                token,
                expires_at: Some(prost_types::Timestamp {
                    seconds: i64::try_from(expires_at).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
            })),
        }
    }

    /// Answers an agent's enrolment on `subject` (`rct.auth.enrol.<tower>.<target>`): only
    /// that target's agent may publish there, so the key it sends is certified for that
    /// tower and target, for `agent_certificate_ttl`, if the catalog knows them. Every
    /// refusal is recorded like a refused login.
    async fn enrol(&self, subject: &str, payload: &[u8], source: &str) -> proto::EnrolResponse {
        use proto::enrol_response::Result as R;
        let refuse = |code: RejectionCode, message: String| async move {
            self.record_refusal(source, "enrol", code, &message).await;
            proto::EnrolResponse {
                result: Some(R::Refused(proto::LoginRefused {
                    code: rejection_code_name(code as i32).to_owned(),
                    message,
                })),
            }
        };
        let Ok(Subject::Enrol { tower, target }) = subject.parse::<Subject>() else {
            let message = format!(
                "an enrolment comes on rct.auth.enrol.<tower>.<target>, not {}",
                rct_bus::text::printable(subject)
            );
            return refuse(RejectionCode::Malformed, message).await;
        };
        let Ok(request) = proto::EnrolRequest::decode(payload) else {
            let message = "the enrolment request does not decode".to_owned();
            return refuse(RejectionCode::Malformed, message).await;
        };
        let Ok(key) = PublicKey::from_bytes(&request.public_key) else {
            let message = "the agent's public key is not 32 bytes of Ed25519".to_owned();
            return refuse(RejectionCode::Malformed, message).await;
        };
        let policy = self.policy();
        let known = policy.catalog.towers.get(tower.as_str()).map(|spec| {
            if spec.targets.is_empty() {
                target == rct_bus::Target::none()
            } else {
                spec.targets.iter().any(|t| t == target.as_str())
            }
        });
        match known {
            Some(true) => {}
            Some(false) => {
                let message = format!("tower {tower} has no target {target} in the catalog");
                return refuse(RejectionCode::UnknownTarget, message).await;
            }
            None => {
                let message = format!("no tower {tower} in the catalog");
                return refuse(RejectionCode::UnknownTarget, message).await;
            }
        }
        let agent: String = rct_bus::text::printable(&request.agent)
            .chars()
            .take(128)
            .collect();
        let now = std::time::SystemTime::now();
        let certificate = rct_bus::provenance::certify(
            &policy.key,
            &tower,
            &target,
            &agent,
            &key,
            now,
            now + self.config.agent_certificate_ttl,
        );
        tracing::info!(%tower, %target, %agent, key_id = %key.id(), "certified an agent key");
        proto::EnrolResponse {
            result: Some(R::Certificate(certificate)),
        }
    }

    /// Records a refused `what` (`login`, `enrol`) from `source`, if the budget allows;
    /// first, the count of those a window that is over did not record.
    async fn record_refusal(&self, source: &str, what: &str, code: RejectionCode, message: &str) {
        let (unrecorded, admitted) = {
            let mut budget = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            (budget.roll(Instant::now()), budget.admit(source))
        };
        self.record_unrecorded(unrecorded).await;
        if admitted {
            self.record_auth_refusal(what, code, message).await;
        }
    }

    /// Once the budget's window is over: the refused logins it did not record one by one,
    /// as one event.
    async fn record_unrecorded_refusals(&self) {
        let unrecorded = {
            let mut budget = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            budget.roll(Instant::now())
        };
        self.record_unrecorded(unrecorded).await;
    }

    async fn record_unrecorded(&self, unrecorded: Option<crate::refusals::Unrecorded>) {
        if let Some(unrecorded) = unrecorded {
            tracing::warn!(
                refusals = unrecorded.refusals,
                sources = unrecorded.sources,
                "refused logins beyond the budget for recording them one by one"
            );
            self.record_auth_refusal("login", RejectionCode::TooMany, &unrecorded.message())
                .await;
        }
    }

    async fn record_auth_refusal(&self, what: &str, code: RejectionCode, message: &str) {
        let tower = Tower::new(AUTH_TOWER).expect("a valid token");
        let event = proto::Event {
            command_id: String::new(),
            at: Some(rct_streams::timestamp::from_datetime(
                OffsetDateTime::now_utc(),
            )),
            source: self.policy().source.clone(),
            operation: format!("{AUTH_TOWER}/{what}"),
            target: String::new(),
            kind: Some(Kind::Rejected(proto::Rejected {
                code: code as i32,
                message: message.to_owned(),
                request: None,
            })),
        };
        if let Err(e) = self
            .record_elsewhere(&self.publisher, &tower, event, None, None)
            .await
        {
            tracing::warn!(error = %e, "cannot record a refused {what}");
        }
    }

    fn dev_token(&self, payload: &[u8]) -> proto::DevTokenResponse {
        use proto::dev_token_response::Result as R;
        let Some(dev) = &self.dev else {
            return proto::DevTokenResponse {
                result: Some(R::Refused(proto::LoginRefused {
                    code: "disabled".into(),
                    message: "the development issuer is off".into(),
                })),
            };
        };
        match proto::DevTokenRequest::decode(payload) {
            Ok(request) if !request.user.is_empty() => proto::DevTokenResponse {
                result: Some(R::IdToken(dev.mint(
                    &request.user,
                    &request.email,
                    &request.groups,
                ))),
            },
            _ => proto::DevTokenResponse {
                result: Some(R::Refused(proto::LoginRefused {
                    code: "malformed".into(),
                    message: "a dev token request needs a user".into(),
                })),
            },
        }
    }
}

/// A submission as stored in RCT_SUBMIT.
#[derive(Clone, Copy, Debug)]
struct Stored<'a> {
    message: &'a jetstream::Message,
    sequence: u64,
    /// When the server stored it.
    at: OffsetDateTime,
}

/// Whether a refusal was recorded by this call or by an earlier delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recorded {
    Now,
    Before,
}

/// Why a request cancelled while it waited for approvals was not run.
/// The operation and command an event's texts name, if they are well formed.
fn named(operation: &str, command_id: &str) -> Option<(rct_bus::OperationName, CommandId)> {
    Some((operation.parse().ok()?, command_id.parse().ok()?))
}

/// What [`Inner::take_locks`] took: the holder it wrote, and the keys it newly holds.
#[derive(Debug, Default)]
struct Taken {
    holder: Option<rct_bus::lock::Holder>,
    keys: Vec<String>,
}

/// Where the plan of a request waiting for approvals stands (see `Service::plan_of`).
enum Described {
    /// Its operation does not plan: the pending event's digest is the request digest.
    Unplanned,
    /// Its plan, recorded in the plan event at `sequence`.
    Planned { sequence: u64, plan: proto::Plan },
    /// Not made yet.
    Waiting,
    /// Its plan-only command ended without one: why.
    Failed(String),
}

/// Whether `decision` admits the plan-only command that describes the request `pending`:
/// a plan, of the same operation and target, made from the same submission.
fn describes(decision: &proto::Event, pending: &proto::Event) -> bool {
    let asked = decided_request(pending);
    matches!(decision.kind, Some(Kind::Admitted(_)))
        && decision.operation == pending.operation
        && decision.target == pending.target
        && decided_request(decision).is_some_and(|r| {
            r.plan && Some(r.submission_sequence) == asked.map(|a| a.submission_sequence)
        })
}

/// An outcome in a few words, for a sentence.
fn describe_outcome(outcome: &Kind) -> String {
    match outcome {
        Kind::Failed(f) => format!("it failed ({}: {})", f.code, f.message),
        Kind::Expired(_) => "no agent took it before its deadline".into(),
        Kind::Cancelled(c) => format!("it was cancelled ({})", c.reason),
        Kind::Unknown(u) => format!("its agent stopped ({})", u.reason),
        Kind::Succeeded(_) => "it succeeded without recording a plan".into(),
        _ => "it ended".into(),
    }
}

fn withdrawn(cancel: &proto::CancelRequested) -> String {
    let by = cancel.by.as_ref().map_or("someone", |o| {
        if o.email.is_empty() {
            &o.subject
        } else {
            &o.email
        }
    });
    let why = if cancel.justification.is_empty() {
        String::new()
    } else {
        format!(" ({})", cancel.justification)
    };
    format!("{by} cancelled it{why} while it waited for approvals; it was not run")
}

/// The request summary of a decision event.
/// Whether `decision` admitted a rollout.
fn is_rollout(decision: &proto::Event) -> bool {
    matches!(&decision.kind, Some(Kind::Admitted(a)) if a.request.as_ref().is_some_and(|r| r.rollout.is_some()))
}

fn decided_request(event: &proto::Event) -> Option<&proto::Request> {
    match event.kind.as_ref()? {
        Kind::Admitted(a) => a.request.as_ref(),
        Kind::Rejected(r) => r.request.as_ref(),
        Kind::Pending(p) => p.request.as_ref(),
        _ => None,
    }
}

/// The same decision turned into a refusal with `code` and `message`, printable as every
/// refusal on record is.
fn rejection(decision: &proto::Event, code: RejectionCode, message: String) -> proto::Event {
    let mut rejected = proto::Event {
        kind: Some(Kind::Rejected(proto::Rejected {
            code: code as i32,
            message,
            request: decided_request(decision).cloned(),
        })),
        ..decision.clone()
    };
    rct_bus::text::make_printable_within(&mut rejected, crate::decide::QUOTED_MAX);
    rejected
}

fn label(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Admit(_) => "admitted".into(),
        Verdict::Cancel(_) => "cancel".into(),
        Verdict::Park(_) => "pending".into(),
        Verdict::Approve(a) if a.deny => "deny".into(),
        Verdict::Approve(a) if a.review => "review".into(),
        Verdict::Approve(_) => "approve".into(),
        Verdict::Record(_) => "freeze".into(),
        Verdict::Reject(r) => format!("rejected:{}", rejection_code_name(r.code() as i32)),
    }
}

fn log_decision(verdict: &Verdict) {
    match verdict {
        Verdict::Admit(a) => tracing::info!(
            command_id = %a.command_id,
            operation = %a.decision.operation,
            target = %a.decision.target,
            "admitted"
        ),
        Verdict::Cancel(c) => tracing::info!(
            command_id = %c.command_id,
            cancels = %c.target,
            "cancel requested"
        ),
        Verdict::Park(p) => tracing::info!(
            command_id = %p.command_id,
            operation = %p.pending.operation,
            target = %p.pending.target,
            "waiting for approvals"
        ),
        Verdict::Approve(a) => tracing::info!(
            command_id = %a.command_id,
            approves = %a.target,
            deny = a.deny,
            "approval recorded"
        ),
        Verdict::Record(r) => tracing::info!(
            command_id = %r.command_id,
            operation = %r.decision.operation,
            tower = %r.decision.target,
            "freeze recorded"
        ),
        Verdict::Reject(r) => tracing::info!(
            command_id = %r.decision.command_id,
            operation = %r.decision.operation,
            code = rejection_code_name(r.code() as i32),
            reason = r.message(),
            "rejected"
        ),
    }
}

/// What changed between two catalogs, in a phrase: operations added, removed and changed.
fn changes(before: &rct_bus::catalog::Catalog, after: &rct_bus::catalog::Catalog) -> String {
    let json = |c: &rct_bus::catalog::Catalog, name: &str| {
        c.operations
            .get(name)
            .map(|op| serde_json::to_string(op).unwrap_or_default())
    };
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut changed = Vec::new();
    for name in after.operations.keys() {
        match json(before, name) {
            None => added.push(name.as_str()),
            old if old != json(after, name) => changed.push(name.as_str()),
            _ => {}
        }
    }
    for name in before.operations.keys() {
        if !after.operations.contains_key(name) {
            removed.push(name.as_str());
        }
    }
    let mut parts = Vec::new();
    for (what, names) in [("added", added), ("removed", removed), ("changed", changed)] {
        if !names.is_empty() {
            parts.push(format!("{what} {}", names.join(", ")));
        }
    }
    if parts.is_empty() {
        "no operation changed (towers or settings did)".into()
    } else {
        parts.join("; ")
    }
}
