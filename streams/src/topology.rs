//! The JetStream topology as code: streams, durable consumers and KV buckets, and
//! [`provision`], which converges a server to them.

use std::fmt;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, kv};
use rct_bus::{Target, Tower, subject};
use serde::Serialize;
use serde_json::Value;

use crate::config::{self, Config, Storage};
use crate::{Error, Result};

/// The public keys admission signs with, as it publishes them in [`CATALOG_BUCKET`] under
/// [`ADMISSION_KEYS_KEY`] (JSON): the one in force and earlier ones still trusted (PEM), and
/// those retired for good with when (PEM, RFC 3339).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdmissionKeys {
    /// Trusted keys.
    pub keys: Vec<String>,
    /// Retired keys and when they were retired.
    pub retired: Vec<(String, String)>,
}

impl AdmissionKeys {
    /// As published.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("keys always serialize")
    }

    /// What readers check who wrote an event against.
    pub fn trust(&self) -> std::result::Result<rct_bus::provenance::Trust, String> {
        let pem = |text: &str| rct_bus::PublicKey::from_pem(text).map_err(|e| e.to_string());
        let keys = self
            .keys
            .iter()
            .map(|k| pem(k))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let retired = self
            .retired
            .iter()
            .map(|(key, at)| {
                let at = humantime::parse_rfc3339_weak(at).map_err(|e| format!("{at:?}: {e}"))?;
                Ok((pem(key)?, at))
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        Ok(rct_bus::provenance::Trust::new(rct_bus::Verifier::new(keys)).with_retired(retired))
    }
}

/// The entry under `key` in [`CATALOG_BUCKET`], if there is one; a failed read says `what`.
async fn catalog_entry(
    js: &jetstream::Context,
    key: &str,
    what: &str,
) -> Result<Option<bytes::Bytes>> {
    let read = |cause: async_nats::Error| Error::Read {
        what: format!("{what} ({CATALOG_BUCKET}/{key})"),
        cause,
    };
    js.get_key_value(CATALOG_BUCKET)
        .await
        .map_err(|e| read(e.into()))?
        .get(key)
        .await
        .map_err(|e| read(e.into()))
}

/// The keys admission publishes ([`AdmissionKeys`]), as a [`rct_bus::provenance::Trust`]:
/// what readers check who wrote an event against when they pin none themselves. `None` when
/// none are published.
pub async fn admission_trust(
    js: &jetstream::Context,
) -> Result<Option<rct_bus::provenance::Trust>> {
    let what = "admission's public keys";
    let Some(bytes) = catalog_entry(js, ADMISSION_KEYS_KEY, what).await? else {
        return Ok(None);
    };
    let unreadable = |why: String| Error::Read {
        what: format!("{what} ({CATALOG_BUCKET}/{ADMISSION_KEYS_KEY})"),
        cause: why.into(),
    };
    let keys: AdmissionKeys =
        serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))?;
    let trust = keys.trust().map_err(unreadable)?;
    Ok(Some(trust.signed_from(signed_from(js).await?)))
}

/// The first `RCT_EVT` sequence from which every event is signed, as admission marked it in
/// [`CATALOG_BUCKET`] under [`SIGNED_FROM_KEY`] the first time it ran signing them; `None`
/// when it is not marked.
pub async fn signed_from(js: &jetstream::Context) -> Result<Option<u64>> {
    let value = catalog_entry(js, SIGNED_FROM_KEY, "where signed events begin").await?;
    Ok(value.and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse().ok()))
}

/// Marks where signed events begin (see [`signed_from`]), once: the sequence after the last
/// event stored now, or, when the stream already holds signed events (the mark was lost or
/// deleted), the first of them: unsigned events stored since then never become history. A
/// mark already there stays (created, never overwritten).
pub async fn mark_signed_from(js: &jetstream::Context) -> Result<u64> {
    let read = |cause: async_nats::Error| Error::Read {
        what: format!("where signed events begin ({CATALOG_BUCKET}/{SIGNED_FROM_KEY})"),
        cause,
    };
    if let Some(first) = signed_from(js).await? {
        return Ok(first);
    }
    let first = first_signed(js).await?;
    let bucket = js
        .get_key_value(CATALOG_BUCKET)
        .await
        .map_err(|e| read(e.into()))?;
    match bucket
        .create(SIGNED_FROM_KEY, first.to_string().into())
        .await
    {
        Ok(_) => Ok(first),
        // Another replica marked it first: its mark holds.
        Err(_) => signed_from(js)
            .await?
            .ok_or_else(|| read("the mark cannot be written or read".into())),
    }
}

/// The sequence of the first signed event in the audit stream, or the one after the last
/// event if none is signed: read once, when no mark says it.
async fn first_signed(js: &jetstream::Context) -> Result<u64> {
    let mut reader = crate::direct::Reader::new(js, EVENT_STREAM).await?;
    let mut start = 1;
    loop {
        let batch = reader
            .batch(
                crate::direct::Start::Sequence(start),
                &subject::all_events(),
                crate::direct::BATCH,
            )
            .await?;
        if let Some(signed) = batch
            .messages
            .iter()
            .find(|m| m.headers.get(rct_bus::provenance::HEADER).is_some())
        {
            return Ok(signed.sequence);
        }
        if let Some(last) = batch.messages.last() {
            start = last.sequence + 1;
        }
        if batch.pending == 0 || batch.messages.is_empty() {
            return Ok(start);
        }
    }
}

/// The catalog admission serves in [`CATALOG_BUCKET`]; `None` when it serves none yet.
pub async fn served_catalog(js: &jetstream::Context) -> Result<Option<rct_bus::catalog::Served>> {
    let Some(bytes) = catalog_entry(js, CATALOG_KEY, "the catalog").await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Read {
            what: format!("the catalog ({CATALOG_BUCKET})"),
            cause: e.into(),
        })
}

/// Stream of signed submissions, `rct.submit.>`.
pub const SUBMIT_STREAM: &str = "RCT_SUBMIT";
/// Stream of admitted, admission-signed commands, `rct.cmd.>`.
pub const COMMAND_STREAM: &str = "RCT_CMD";
/// Stream of events, `rct.evt.>`: the audit log.
pub const EVENT_STREAM: &str = "RCT_EVT";
/// Live agents, kept alive by heartbeats.
pub const AGENTS_BUCKET: &str = "rct_agents";
/// Locks held by running commands (`rct_bus::lock`), written by admission alone.
pub const LOCKS_BUCKET: &str = "rct_locks";
/// The catalog admission serves, with its version.
pub const CATALOG_BUCKET: &str = "rct_catalog";
/// The key under which admission serves the catalog in [`CATALOG_BUCKET`].
pub const CATALOG_KEY: &str = "catalog";
/// The key of [`CATALOG_BUCKET`] under which admission publishes its public keys
/// ([`AdmissionKeys`]).
pub const ADMISSION_KEYS_KEY: &str = "admission-keys";
/// The key of [`CATALOG_BUCKET`] that says from which `RCT_EVT` sequence events are signed.
pub const SIGNED_FROM_KEY: &str = "signed-from";
/// Admission's durable consumer on `RCT_SUBMIT`, shared by its replicas.
pub const ADMISSION_CONSUMER: &str = "admission";
/// The notifier's durable consumer on `RCT_EVT`, shared by admission's replicas.
pub const NOTIFIER_CONSUMER: &str = "notifier";

/// The three streams, as `create_or_update_stream` takes them.
pub fn streams(config: &Config) -> Vec<stream::Config> {
    let stream = |name: &str, subject: String, description: &str, s: &config::Stream| {
        let largest = match name {
            SUBMIT_STREAM => config::MAX_SUBMISSION,
            _ => config::MAX_MESSAGE,
        };
        stream::Config {
            max_message_size: s.max_msg_size.unwrap_or(largest),
            name: name.to_owned(),
            description: Some(description.to_owned()),
            subjects: vec![subject],
            retention: RetentionPolicy::Limits,
            storage: storage(config.storage),
            num_replicas: config.replicas,
            max_age: s.max_age,
            duplicate_window: s.duplicate_window,
            max_consumers: s.max_consumers,
            deny_delete: config.deny_delete,
            deny_purge: config.deny_purge,
            // Full streams refuse new writes instead of dropping history.
            discard: DiscardPolicy::New,
            allow_direct: true,
            ..Default::default()
        }
    };
    vec![
        stream(
            SUBMIT_STREAM,
            subject::all_submissions(),
            "rct: signed submissions from operators and services",
            &config.submit,
        ),
        stream(
            COMMAND_STREAM,
            subject::all_commands(),
            "rct: admitted commands, signed by admission",
            &config.commands,
        ),
        stream(
            EVENT_STREAM,
            subject::all_events(),
            "rct: decisions, claims, progress, logs and outcomes (the audit log)",
            &config.events,
        ),
    ]
}

/// The KV buckets.
pub fn buckets(config: &Config) -> Vec<kv::Config> {
    let bucket = |name: &str, description: &str, history: i64| kv::Config {
        bucket: name.to_owned(),
        description: description.to_owned(),
        history,
        storage: storage(config.storage),
        num_replicas: config.replicas,
        ..Default::default()
    };
    vec![
        kv::Config {
            max_age: config.agent_ttl,
            ..bucket(AGENTS_BUCKET, "rct: live agents (heartbeat TTL)", 1)
        },
        bucket(
            CATALOG_BUCKET,
            "rct: the catalog admission serves",
            config.catalog_history,
        ),
        bucket(
            LOCKS_BUCKET,
            "rct: locks held by running commands (admission's)",
            1,
        ),
    ]
}

/// Admission's durable consumer on `RCT_SUBMIT`.
pub fn admission_consumer(config: &Config) -> pull::Config {
    work_consumer(
        ADMISSION_CONSUMER.to_owned(),
        subject::all_submissions(),
        &config.admission,
    )
}

/// The notifier's durable consumer on `RCT_EVT`: starts with the events stored after it is
/// created (no flood of history), and never gives an event up: a webhook that is down for an
/// hour gets its messages when it is back.
pub fn notifier_consumer() -> pull::Config {
    pull::Config {
        durable_name: Some(NOTIFIER_CONSUMER.to_owned()),
        name: Some(NOTIFIER_CONSUMER.to_owned()),
        filter_subject: subject::all_events(),
        deliver_policy: DeliverPolicy::New,
        ack_policy: AckPolicy::Explicit,
        ack_wait: std::time::Duration::from_secs(30),
        max_deliver: -1,
        max_ack_pending: 1000,
        ..Default::default()
    }
}

/// The durable consumer a tower's agents pull from: one per target for a cluster tower
/// (`rct.cmd.<tower>.<target>.>`), one shared work queue for a simple tower
/// (`rct.cmd.<tower>.>`, `target` = `None`).
pub fn tower_consumer(config: &Config, tower: &Tower, target: Option<&Target>) -> pull::Config {
    let (name, filter) = match target {
        Some(target) => (
            format!("tower-{tower}@{target}"),
            subject::commands_for_target(tower, target),
        ),
        None => (format!("tower-{tower}"), subject::commands_for_tower(tower)),
    };
    work_consumer(name, filter, &config.towers)
}

fn work_consumer(name: String, filter: String, settings: &config::Consumer) -> pull::Config {
    pull::Config {
        durable_name: Some(name.clone()),
        name: Some(name),
        filter_subject: filter,
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        // The server replaces ack_wait by the first backoff step; say so up front, so that
        // what we ask for is what the server reports and provisioning sees no drift.
        ack_wait: settings
            .backoff
            .first()
            .copied()
            .unwrap_or(settings.ack_wait),
        max_deliver: settings.max_deliver,
        backoff: settings.backoff.clone(),
        max_ack_pending: settings.max_ack_pending,
        ..Default::default()
    }
}

fn storage(storage: Storage) -> StorageType {
    match storage {
        Storage::File => StorageType::File,
        Storage::Memory => StorageType::Memory,
    }
}

/// What [`provision`] did to one stream, bucket or consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// It did not exist and was created.
    Created,
    /// It existed with other settings, named here, and was converged.
    Updated(Vec<String>),
    /// It already matched.
    Unchanged,
}

/// One line of a [`Report`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// `stream RCT_EVT`, `bucket rct_agents`, `consumer RCT_SUBMIT/admission`.
    pub what: String,
    /// What happened to it.
    pub change: Change,
}

/// What [`provision`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One item per stream, bucket and consumer, in provisioning order.
    pub items: Vec<Item>,
    /// Settings that could not be applied and why (deny-delete and deny-purge are one-way).
    pub warnings: Vec<String>,
}

impl Report {
    /// Whether anything was created or updated.
    pub fn changed(&self) -> bool {
        self.items.iter().any(|i| i.change != Change::Unchanged)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for item in &self.items {
            match &item.change {
                Change::Created => writeln!(f, "created   {}", item.what)?,
                Change::Updated(fields) => {
                    writeln!(f, "updated   {} ({})", item.what, fields.join(", "))?
                }
                Change::Unchanged => writeln!(f, "unchanged {}", item.what)?,
            }
        }
        for warning in &self.warnings {
            writeln!(f, "warning   {warning}")?;
        }
        Ok(())
    }
}

/// Converges the server to the topology: creates what is missing, updates what drifted,
/// leaves the rest alone, and reports each. Running it twice changes nothing the second time.
pub async fn provision(js: &jetstream::Context, config: &Config) -> Result<Report> {
    config.validate().map_err(Error::Config)?;
    let mut report = Report::default();

    for mut desired in streams(config) {
        let what = format!("stream {}", desired.name);
        let before = stream_config(js, &desired.name).await?;
        if let Some(before) = &before {
            keep_one_way_flags(&mut desired, before, &what, &mut report.warnings);
        }
        let after = js
            .create_or_update_stream(desired)
            .await
            .map_err(|e| Error::provision(&what, e))?
            .config;
        report.items.push(Item {
            change: change(before.as_ref(), &after),
            what,
        });
    }

    for desired in buckets(config) {
        let stream_name = format!("KV_{}", desired.bucket);
        let what = format!("bucket {}", desired.bucket);
        let before = stream_config(js, &stream_name).await?;
        js.create_or_update_key_value(desired)
            .await
            .map_err(|e| Error::provision(&what, e))?;
        let after = stream_config(js, &stream_name)
            .await?
            .ok_or_else(|| Error::provision(&what, "bucket vanished after creation"))?;
        report.items.push(Item {
            change: change(before.as_ref(), &after),
            what,
        });
    }

    let consumer = admission_consumer(config);
    report
        .items
        .push(ensure_consumer(js, SUBMIT_STREAM, consumer).await?);
    report
        .items
        .push(ensure_consumer(js, EVENT_STREAM, notifier_consumer()).await?);
    Ok(report)
}

/// Creates or converges one durable consumer (the agents' consumers are created this way by
/// whoever administers the tower, so that agents themselves only need to bind and pull).
pub async fn ensure_consumer(
    js: &jetstream::Context,
    stream: &str,
    desired: pull::Config,
) -> Result<Item> {
    let name = desired.durable_name.clone().unwrap_or_default();
    let what = format!("consumer {stream}/{name}");
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| Error::provision(&what, e))?;
    let before = match stream.consumer_info(&name).await {
        Ok(info) => Some(info.config),
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => None,
        Err(e) => return Err(Error::provision(&what, e)),
    };
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(desired)
        .await
        .map_err(|e| Error::provision(&what, e))?;
    let after = consumer
        .info()
        .await
        .map_err(|e| Error::provision(&what, e))?
        .config
        .clone();
    Ok(Item {
        change: change(before.as_ref(), &after),
        what,
    })
}

async fn stream_config(js: &jetstream::Context, name: &str) -> Result<Option<stream::Config>> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().config.clone())),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                Ok(None)
            }
            _ => Err(Error::provision(&format!("stream {name}"), e)),
        },
    }
}

/// Deny-delete and deny-purge can never be turned off on a server; keep them on and say so.
fn keep_one_way_flags(
    desired: &mut stream::Config,
    before: &stream::Config,
    what: &str,
    warnings: &mut Vec<String>,
) {
    for (name, wanted, existing) in [
        ("deny_delete", &mut desired.deny_delete, before.deny_delete),
        ("deny_purge", &mut desired.deny_purge, before.deny_purge),
    ] {
        if existing && !*wanted {
            *wanted = true;
            warnings.push(format!(
                "{what}: {name} is on and can never be turned off; left on"
            ));
        }
    }
}

fn change<T: Serialize>(before: Option<&T>, after: &T) -> Change {
    match before {
        None => Change::Created,
        Some(before) => {
            let fields = differing_fields(before, after);
            if fields.is_empty() {
                Change::Unchanged
            } else {
                Change::Updated(fields)
            }
        }
    }
}

/// Names of the top-level fields whose serialized values differ.
fn differing_fields<T: Serialize>(before: &T, after: &T) -> Vec<String> {
    let as_map = |value: &T| match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let (before, after) = (as_map(before), as_map(after));
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_cover_the_contracts_subjects() {
        let config = Config::default();
        let subjects: Vec<_> = streams(&config)
            .into_iter()
            .map(|s| (s.name, s.subjects))
            .collect();
        assert_eq!(
            subjects,
            [
                ("RCT_SUBMIT".to_owned(), vec!["rct.submit.>".to_owned()]),
                ("RCT_CMD".to_owned(), vec!["rct.cmd.>".to_owned()]),
                ("RCT_EVT".to_owned(), vec!["rct.evt.>".to_owned()]),
            ]
        );
    }

    #[test]
    fn tower_consumers_are_named_and_filtered_per_flavour() {
        let config = Config::default();
        let tower = Tower::new("traffic").unwrap();
        let target = Target::new("prod-1").unwrap();
        let cluster = tower_consumer(&config, &tower, Some(&target));
        assert_eq!(
            cluster.durable_name.as_deref(),
            Some("tower-traffic@prod-1")
        );
        assert_eq!(cluster.filter_subject, "rct.cmd.traffic.prod-1.>");
        let simple = tower_consumer(&config, &tower, None);
        assert_eq!(simple.durable_name.as_deref(), Some("tower-traffic"));
        assert_eq!(simple.filter_subject, "rct.cmd.traffic.>");
        assert_eq!(simple.ack_wait, config.towers.backoff[0]);
    }

    #[test]
    fn drift_is_reported_by_field_name() {
        let a = streams(&Config::default()).remove(2);
        let mut b = a.clone();
        b.max_age = std::time::Duration::from_secs(60);
        b.num_replicas = 3;
        assert_eq!(
            change(Some(&a), &b),
            Change::Updated(vec!["max_age".into(), "num_replicas".into()])
        );
        assert_eq!(change(Some(&a), &a), Change::Unchanged);
        assert_eq!(change(None, &a), Change::Created);
    }
}
