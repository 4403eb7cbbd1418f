//! The `rct_locks` bucket: taking and releasing a lock by compare-and-set, and listing them
//! (see `rct_bus::lock` for what a lock is).
//!
//! Every write names the revision it read, so of two replicas taking one key at once, one
//! writes and the other reads again and sees it. A holder is never trusted to still hold: the
//! caller says whether it does (its outcome recorded, its expiry passed), and one that does
//! not is dropped from the key by the next writer.

use async_nats::jetstream::{self, kv};
use futures::future::BoxFuture;
use rct_bus::lock::{Holder, Lock};

use crate::topology::LOCKS_BUCKET;
use crate::{Error, Result};

/// Compare-and-set attempts on one key before giving up (each lost one means another
/// writer's change landed first).
const ATTEMPTS: usize = 32;

/// The `rct_locks` bucket.
pub async fn bucket(js: &jetstream::Context) -> Result<kv::Store> {
    js.get_key_value(LOCKS_BUCKET)
        .await
        .map_err(|e| Error::read(LOCKS_BUCKET, e))
}

/// What [`take`] did.
#[derive(Debug)]
pub enum Took {
    /// `me` holds it now.
    Taken,
    /// `me` held it already (a submission decided again): nothing changed.
    Held,
    /// This holder, which still holds, conflicts with `me`: nothing was written.
    Conflict(Holder),
}

/// Adds `me` to the holders of `key` (standing for `resource`), unless a holder that still
/// holds (`holds`) conflicts with it. Holders that no longer hold are dropped. Only the same
/// command for the same submission is `me` ([`Holder::is`]).
pub async fn take<'a>(
    store: &kv::Store,
    key: &str,
    resource: &str,
    me: &Holder,
    holds: &(dyn Fn(Holder) -> BoxFuture<'a, Result<bool>> + Sync),
) -> Result<Took> {
    for _ in 0..ATTEMPTS {
        let (revision, lock) = read(store, key).await?;
        if lock.holders.iter().any(|h| h.is(me)) {
            return Ok(Took::Held);
        }
        let mut kept = Vec::new();
        for holder in lock.holders {
            if !holds(holder.clone()).await? {
                continue;
            }
            if holder.conflicts(&me.operation, &me.conflicts_with) {
                return Ok(Took::Conflict(holder));
            }
            kept.push(holder);
        }
        kept.push(me.clone());
        let value = Lock {
            resource: resource.to_owned(),
            holders: kept,
        };
        if write(store, key, revision, &value).await? {
            return Ok(Took::Taken);
        }
    }
    Err(contended(key))
}

/// Drops `me` ([`Holder::is`]) from the holders of `key` (deleting the key when none is
/// left).
pub async fn release(store: &kv::Store, key: &str, me: &Holder) -> Result<()> {
    for _ in 0..ATTEMPTS {
        let (revision, mut lock) = read(store, key).await?;
        let before = lock.holders.len();
        lock.holders.retain(|h| !h.is(me));
        if lock.holders.len() == before {
            return Ok(());
        }
        let written = if lock.holders.is_empty() {
            match store.delete_expect_revision(key, Some(revision)).await {
                Ok(()) => true,
                Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => false,
                Err(e) => return Err(Error::read(key, e)),
            }
        } else {
            write(store, key, revision, &lock).await?
        };
        if written {
            return Ok(());
        }
    }
    Err(contended(key))
}

/// The lease of the replica that coordinates rollouts.
pub const ROLLOUT_LEASE: &str = "lease.rollouts";

/// A lease: who holds it, until when (milliseconds since the epoch, by the holder's clock).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Lease {
    holder: String,
    until_ms: u128,
}

/// Takes or renews the lease `key` for `me`, for `ttl`: true when `me` holds it now. Taken
/// over when its holder let it lapse (stopped, or cut off). One compare-and-set write, so
/// of two replicas taking it at once one does.
pub async fn lease(
    store: &kv::Store,
    key: &str,
    me: &str,
    ttl: std::time::Duration,
) -> Result<bool> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let entry = store.entry(key).await.map_err(|e| Error::read(key, e))?;
    let revision = match entry {
        Some(entry) if entry.operation == kv::Operation::Put => {
            let held = serde_json::from_slice::<Lease>(&entry.value).ok();
            if held.is_some_and(|l| l.holder != me && l.until_ms > now) {
                return Ok(false);
            }
            entry.revision
        }
        Some(entry) => entry.revision,
        None => 0,
    };
    let lease = Lease {
        holder: me.to_owned(),
        until_ms: now + ttl.as_millis(),
    };
    let value = serde_json::to_vec(&lease).expect("a lease always serializes");
    match store.update(key, value.into(), revision).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
        Err(e) => Err(Error::read(key, e)),
    }
}

/// Gives the lease `key` up if `me` holds it, so another replica takes it at once.
pub async fn give_up(store: &kv::Store, key: &str, me: &str) -> Result<()> {
    let entry = store.entry(key).await.map_err(|e| Error::read(key, e))?;
    if let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put)
        && serde_json::from_slice::<Lease>(&entry.value).is_ok_and(|l| l.holder == me)
    {
        // Lost to a newer write: then it is not ours to give up.
        let _ = store
            .delete_expect_revision(key, Some(entry.revision))
            .await;
    }
    Ok(())
}

/// Every lock in the bucket now, by key, holders that no longer hold included (the caller
/// tells which still do).
pub async fn list(js: &jetstream::Context) -> Result<Vec<(String, Lock)>> {
    Ok(crate::journal::entries(js, LOCKS_BUCKET)
        .await?
        .into_iter()
        .filter(|(key, _)| key.starts_with(rct_bus::lock::PREFIX))
        .filter_map(|(key, value)| Some((key, serde_json::from_slice(&value).ok()?)))
        .collect())
}

/// The key's revision (0 when it was never written) and its lock (no holders when deleted
/// or unreadable: only admission writes the bucket).
async fn read(store: &kv::Store, key: &str) -> Result<(u64, Lock)> {
    let entry = store.entry(key).await.map_err(|e| Error::read(key, e))?;
    Ok(match entry {
        None => (0, Lock::default()),
        Some(entry) if entry.operation == kv::Operation::Put => (
            entry.revision,
            serde_json::from_slice(&entry.value).unwrap_or_default(),
        ),
        Some(entry) => (entry.revision, Lock::default()),
    })
}

/// Writes `lock` to `key` if its revision is still `revision`; `false` when another write
/// came first.
async fn write(store: &kv::Store, key: &str, revision: u64, lock: &Lock) -> Result<bool> {
    let value = serde_json::to_vec(lock).expect("a lock always serializes");
    match store.update(key, value.into(), revision).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
        Err(e) => Err(Error::read(key, e)),
    }
}

fn contended(key: &str) -> Error {
    Error::read(
        key,
        format!("{ATTEMPTS} writers changed it first, one after another; try again"),
    )
}
