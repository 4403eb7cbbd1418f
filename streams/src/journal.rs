//! The claim journal: what the single-slot events of one command say (its claim, its
//! outcome), read from the stream leader (the `STREAM.MSG.GET` API, never a direct get that a
//! lagging replica could answer), and the one way to end a command without running it.
//!
//! The claim slot decides a command's fate: whoever takes it either runs the command or, with
//! a claim marked `without_running`, ends it unrun. So a run and an end without running can
//! never both happen, whatever races, pauses or cluster elections come between them.

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use prost::Message as _;
use rct_bus::provenance::Trust;
use rct_bus::{CommandId, EventKind, Subject, Target, Tower, proto};

use crate::topology::{AGENTS_BUCKET, EVENT_STREAM};
use crate::{Error, Publisher, Result, Slot};

/// One command's journal at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Look {
    /// Its claim, if any. A slot holding something that is not an event reads as a claim
    /// with no holder: nobody can take it any more.
    pub claim: Option<proto::Event>,
    /// Its outcome, if any.
    pub outcome: Option<proto::Event>,
    /// Why what holds a slot does not count, read with [`look_trusting`]: a claim its
    /// writer did not sign reads as a claim with no holder (nobody can take the slot any
    /// more), an outcome as an outcome (the slot is taken, so nothing may run).
    pub doubt: Option<String>,
}

impl Look {
    /// The claim's `Started` body, if it was claimed by an agent (or ended unrun).
    pub fn started(&self) -> Option<&proto::Started> {
        match self.claim.as_ref()?.kind.as_ref()? {
            proto::event::Kind::Started(started) => Some(started),
            _ => None,
        }
    }

    /// The instance that claimed it, if it was claimed.
    pub fn holder(&self) -> Option<&str> {
        self.started().map(|s| s.agent.as_str())
    }
}

/// Reads the journal of command `id` of `tower` on `target`.
pub async fn look(
    js: &jetstream::Context,
    tower: &Tower,
    target: &Target,
    id: CommandId,
) -> Result<Look> {
    look_trusting(js, tower, target, id, None).await
}

/// [`look`], checking who wrote each slot's occupant against `trust` (see [`Look::doubt`]).
pub async fn look_trusting(
    js: &jetstream::Context,
    tower: &Tower,
    target: &Target,
    id: CommandId,
    trust: Option<&Trust>,
) -> Result<Look> {
    let mut doubt = None;
    let claim = match slot_trusting(js, tower, target, id, EventKind::Claim, trust).await {
        Err(Error::Malformed { .. }) => Some(proto::Event::default()),
        Ok(Some((_, Some(why)))) => {
            doubt = Some(format!(
                "its claim slot holds an event that is not its agent's ({why})"
            ));
            Some(proto::Event::default())
        }
        other => other?.map(|(event, _)| event),
    };
    let outcome = match slot_trusting(js, tower, target, id, EventKind::Outcome, trust).await? {
        Some((event, Some(why))) => {
            doubt = Some(format!(
                "its outcome slot holds an event that is not its agent's ({why})"
            ));
            Some(event)
        }
        other => other.map(|(event, _)| event),
    };
    Ok(Look {
        claim,
        outcome,
        doubt,
    })
}

/// The event in one single-slot subject of a command, if any (`Error::Malformed` when the
/// slot holds something that is not an event).
pub async fn slot(
    js: &jetstream::Context,
    tower: &Tower,
    target: &Target,
    id: CommandId,
    kind: EventKind,
) -> Result<Option<proto::Event>> {
    Ok(slot_trusting(js, tower, target, id, kind, None)
        .await?
        .map(|(event, _)| event))
}

/// [`slot`], with why its occupant does not count when `trust` says it was not written by
/// whoever may write it (`None`: it counts, or was not checked).
pub async fn slot_trusting(
    js: &jetstream::Context,
    tower: &Tower,
    target: &Target,
    id: CommandId,
    kind: EventKind,
    trust: Option<&Trust>,
) -> Result<Option<(proto::Event, Option<String>)>> {
    let subject = Subject::event(tower, target, id, kind).to_string();
    match first(js, EVENT_STREAM, &subject, |_| true).await? {
        Some(stored) => {
            let event =
                proto::Event::decode(stored.payload.clone()).map_err(|e| Error::Malformed {
                    sequence: stored.sequence,
                    subject: subject.clone(),
                    reason: e.to_string(),
                })?;
            let doubt = trust.and_then(|trust| {
                trust
                    .check_at(
                        stored.sequence,
                        (tower, target, kind),
                        &subject,
                        &stored.payload,
                        stored
                            .headers
                            .get(rct_bus::provenance::HEADER)
                            .map(|v| v.as_str()),
                        stored.time.into(),
                    )
                    .for_event(&event)
                    .doubt()
            });
            Ok(Some((event, doubt)))
        }
        None => Ok(None),
    }
}

/// The first message on `subject` (a filter) in `stream` that `counts`, read from the stream
/// leader. A single-slot subject's occupant is its first message: a writer of the slot is
/// refused once anything is there, so whatever was stored after it (by an identity that
/// may write there without that condition) never replaces it.
pub async fn first(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    counts: impl Fn(&StreamMessage) -> bool,
) -> Result<Option<StreamMessage>> {
    first_from(js, stream, subject, 1, counts).await
}

/// [`first`], among the messages from sequence `from` on.
pub async fn first_from(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    mut from: u64,
    counts: impl Fn(&StreamMessage) -> bool,
) -> Result<Option<StreamMessage>> {
    let read = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| Error::read(stream, e))?;
    loop {
        match read.get_first_raw_message_by_subject(subject, from).await {
            Ok(stored) if counts(&stored) => return Ok(Some(stored)),
            Ok(stored) => from = stored.sequence + 1,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(Error::read(subject, e)),
        }
    }
}

/// What became of [`end_unrun`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The command is ended with this outcome, or another one that was recorded first
    /// (never after a run: its claim is ours, marked `without_running`).
    Recorded,
    /// Someone else claimed it first: look at it again.
    ClaimedElsewhere,
}

/// Ends an unclaimed command without running it: takes its claim, marked `without_running`
/// (`claim` must be a `Started` event of the command with that mark), then records `outcome`.
/// Both carry `writer` in their ids, so a retry of our own write is ours. If the writer stops
/// between the two, the claim still says the command never ran.
pub async fn end_unrun(
    publisher: &Publisher,
    tower: &Tower,
    claim: &proto::Event,
    outcome: &proto::Event,
    writer: &str,
) -> Result<Ended> {
    debug_assert!(matches!(
        &claim.kind,
        Some(proto::event::Kind::Started(s)) if s.without_running
    ));
    match publisher.event(tower, claim, writer).await? {
        Slot::Written(_) => {}
        Slot::Taken { .. } => return Ok(Ended::ClaimedElsewhere),
    }
    publisher.event(tower, outcome, writer).await?;
    Ok(Ended::Recorded)
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
        Ok(stored) => Ok(!removed(&stored.headers)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
        Err(e) => Err(Error::read(&subject, e)),
    }
}

/// Every agent presence in `rct_agents` now: each key (`<tower>.<target>.<instance>`) with
/// its value, in the order they were last written.
pub async fn presences(js: &jetstream::Context) -> Result<Vec<(String, bytes::Bytes)>> {
    entries(js, AGENTS_BUCKET).await
}

/// Every key of `bucket` now with its value, in the order they were last written, read by
/// direct gets (no consumer: read-only identities may list a bucket this way).
pub async fn entries(js: &jetstream::Context, bucket: &str) -> Result<Vec<(String, bytes::Bytes)>> {
    let stream = format!("KV_{bucket}");
    let prefix = format!("$KV.{bucket}.");
    // The bucket keeps one value per key: reading it whole gives every key's latest (a key
    // written again while this reads moves after the read's position, so it is read once
    // more and the later value kept). No `multi_last`: the server answers that for at most
    // 1,024 keys.
    let mut reader = crate::direct::Reader::new(js, &stream).await?;
    let mut latest: std::collections::HashMap<String, StreamMessage> = Default::default();
    let mut start = 1;
    loop {
        let batch = reader
            .batch(
                crate::direct::Start::Sequence(start),
                &format!("{prefix}>"),
                crate::direct::BATCH,
            )
            .await?;
        let done = batch.pending == 0 || batch.messages.is_empty();
        for entry in batch.messages {
            start = entry.sequence + 1;
            let Some(key) = entry.subject.as_str().strip_prefix(&prefix) else {
                continue;
            };
            latest.insert(key.to_owned(), entry);
        }
        if done {
            break;
        }
    }
    let mut live: Vec<(String, StreamMessage)> = latest
        .into_iter()
        .filter(|(_, entry)| !removed(&entry.headers))
        .collect();
    live.sort_by_key(|(_, entry)| entry.sequence);
    Ok(live
        .into_iter()
        .map(|(key, entry)| (key, entry.payload))
        .collect())
}

/// Whether a stored key-value entry says its key was deleted or purged.
fn removed(headers: &async_nats::HeaderMap) -> bool {
    headers
        .get("KV-Operation")
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
}
