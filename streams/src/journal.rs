//! The claim journal: what the single-slot events of one command say (its claim, its
//! outcome) and the last sequence of all its events, read from the stream leader (the
//! `STREAM.MSG.GET` API, never a direct get that a lagging replica could answer).

use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use prost::Message as _;
use rct_bus::{CommandId, EventKind, Subject, Tower, proto, subject};

use crate::topology::{AGENTS_BUCKET, EVENT_STREAM};
use crate::{Error, Result};

/// One command's journal at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Look {
    /// The stream sequence of the command's latest event (0: none), read before the slots,
    /// so a publish guarded by it ([`crate::Outgoing::guarded`]) fails if anything was
    /// written since, in particular a claim or an outcome the slots did not show.
    pub last: u64,
    /// Its claim (`Started`), if any.
    pub claim: Option<proto::Event>,
    /// Its outcome, if any.
    pub outcome: Option<proto::Event>,
}

impl Look {
    /// The agent instance that claimed it, if it was claimed.
    pub fn holder(&self) -> Option<&str> {
        match self.claim.as_ref()?.kind.as_ref()? {
            proto::event::Kind::Started(started) => Some(&started.agent),
            _ => None,
        }
    }
}

/// Reads the journal of command `id` of `tower`: the last sequence first, then the slots.
pub async fn look(js: &jetstream::Context, tower: &Tower, id: CommandId) -> Result<Look> {
    let last = last_sequence(js, id).await?;
    Ok(Look {
        last,
        claim: slot(js, tower, id, EventKind::Claim).await?,
        outcome: slot(js, tower, id, EventKind::Outcome).await?,
    })
}

/// The event in one single-slot subject of a command, if any. An undecodable message in a
/// slot reads as an error: the slot is taken, by something that is not an event.
pub async fn slot(
    js: &jetstream::Context,
    tower: &Tower,
    id: CommandId,
    kind: EventKind,
) -> Result<Option<proto::Event>> {
    let subject = Subject::event(tower, id, kind).to_string();
    match last_message(js, &subject).await? {
        None => Ok(None),
        Some((sequence, payload)) => {
            proto::Event::decode(payload)
                .map(Some)
                .map_err(|e| Error::Malformed {
                    sequence,
                    subject,
                    reason: e.to_string(),
                })
        }
    }
}

/// The stream sequence of the latest event of command `id` (0: it has none).
pub async fn last_sequence(js: &jetstream::Context, id: CommandId) -> Result<u64> {
    Ok(last_message(js, &subject::events_for_command(id))
        .await?
        .map_or(0, |(sequence, _)| sequence))
}

/// The guard filter for [`crate::Outgoing::guarded`]: every event of command `id`.
pub fn guard(id: CommandId) -> String {
    subject::events_for_command(id)
}

async fn last_message(
    js: &jetstream::Context,
    filter: &str,
) -> Result<Option<(u64, bytes::Bytes)>> {
    let stream = js
        .get_stream_no_info(EVENT_STREAM)
        .await
        .map_err(|e| Error::read(EVENT_STREAM, e))?;
    match stream.get_last_raw_message_by_subject(filter).await {
        Ok(stored) => Ok(Some((stored.sequence, stored.payload))),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(Error::read(filter, e)),
    }
}

/// Whether agent presence `key` is in `rct_agents` now, read from the bucket's stream leader
/// (a replica that lags could still show an agent that is gone, or miss one that is there).
pub async fn present(js: &jetstream::Context, key: &str) -> Result<bool> {
    let stream = format!("KV_{AGENTS_BUCKET}");
    let subject = format!("$KV.{AGENTS_BUCKET}.{key}");
    let stream = js
        .get_stream_no_info(&stream)
        .await
        .map_err(|e| Error::read(&stream, e))?;
    match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(stored) => Ok(!stored
            .headers
            .get(KV_OPERATION)
            .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
        Err(e) => Err(Error::read(&subject, e)),
    }
}

/// The header a KV delete or purge carries.
const KV_OPERATION: &str = "KV-Operation";
