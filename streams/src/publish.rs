//! Publishing: every message through the JetStream API, with an id, its PubAck awaited, and
//! a timed-out publish retried with the same id (the server stores it once).

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use prost::Message as _;

use rct_bus::provenance::{self, Signer};
use rct_bus::{EventKind, Subject, Target, Tower, proto};

use crate::{Error, Result};

/// How long to keep retrying a publish whose acknowledgement did not come.
#[derive(Clone, Debug)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Pause after the first failed attempt; doubles after each, up to `max_pause`.
    pub pause: Duration,
    /// Longest pause between attempts.
    pub max_pause: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        // With the context's 5 s ack timeout: about a minute in all, well inside the streams'
        // duplicate window (10 min by default), so every retry is deduplicated.
        Self {
            attempts: 10,
            pause: Duration::from_millis(100),
            max_pause: Duration::from_secs(2),
        }
    }
}

/// One message to publish.
#[derive(Clone, Debug)]
pub struct Outgoing {
    subject: String,
    msg_id: String,
    payload: Bytes,
    headers: HeaderMap,
    once: bool,
    /// With `once`: the subjects (a filter) the slot spans, when more than the message's own.
    slot: Option<String>,
    /// The stream that takes it, when known (where a refused single-slot publish's holder is
    /// read, without a stream lookup).
    stream: Option<&'static str>,
}

impl Outgoing {
    /// A message for `subject` with `Nats-Msg-Id` `msg_id`.
    pub fn new(subject: impl Into<String>, msg_id: impl Into<String>, payload: Bytes) -> Self {
        Self {
            subject: subject.into(),
            msg_id: msg_id.into(),
            payload,
            headers: HeaderMap::new(),
            once: false,
            slot: None,
            stream: None,
        }
    }

    /// Event `n` of its kind for its command, on
    /// `rct.evt.<tower>.<target>.<command_id>.<kind>` (the target the event names, `_` when
    /// it names none that is a token: see [`Target::of_event`]); decisions, pending requests,
    /// claims and outcomes are single-slot. A claim's or outcome's slot is its target's (another
    /// target's writer cannot take it); a decision's (and a pending request's) spans every
    /// tower and target, so a
    /// command id has one decision whatever its submissions name. `None` if the event has no body or
    /// a command id that is not a ULID.
    pub fn event(tower: &Tower, event: &proto::Event, n: impl std::fmt::Display) -> Option<Self> {
        let kind = EventKind::of(event)?;
        let command_id: rct_bus::CommandId = event.command_id.parse().ok()?;
        let mut outgoing = Self::new(
            Subject::event(tower, &Target::of_event(&event.target), command_id, kind),
            command_id.event_msg_id(kind, n),
            event.encode_to_vec().into(),
        );
        outgoing.stream = Some(crate::topology::EVENT_STREAM);
        Some(match kind {
            EventKind::Decision | EventKind::Pending => {
                outgoing.once_over(rct_bus::subject::events_of_kind(command_id, kind))
            }
            _ if kind.is_single_slot() => outgoing.once(),
            _ => outgoing,
        })
    }

    /// Single-slot over `slot` (a filter the subject is in): the server refuses the message
    /// if any subject of `slot` holds one (`Nats-Expected-Last-Subject-Sequence-Subject`).
    pub fn once_over(mut self, slot: String) -> Self {
        self.slot = Some(slot);
        self.once()
    }

    /// Makes the subject single-slot: the server refuses the message if the subject already
    /// holds one (`Nats-Expected-Last-Subject-Sequence: 0`).
    pub fn once(mut self) -> Self {
        self.once = true;
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Its id with a digest of its subject and bytes: a writer can only take it by storing
    /// this very message, and every attempt to send it, in any process, gives the same id.
    fn unguessable_id(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(self.subject.as_bytes())
            .chain_update(b"\n")
            .chain_update(&self.payload)
            .finalize();
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}.{hex}", self.msg_id)
    }
}

/// The server's acknowledgement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The stream that stored the message.
    pub stream: String,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// The message was already stored by an earlier attempt with the same id.
    pub duplicate: bool,
}

/// What became of a publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Stored (or already stored under the same id by an earlier attempt of ours).
    Written(Ack),
    /// Single-slot subject already taken by another writer: a second decision, claim or
    /// outcome. Nothing was stored.
    Taken {
        /// Stream sequence of the message that holds the slot.
        sequence: u64,
    },
}

/// Publishes with acknowledgement, dedup ids and retries. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Publisher {
    js: jetstream::Context,
    retry: Retry,
    trace: Option<String>,
    signer: Option<Arc<Signer>>,
}

impl Publisher {
    /// A publisher with the default [`Retry`].
    pub fn new(js: jetstream::Context) -> Self {
        Self {
            js,
            retry: Retry::default(),
            trace: None,
            signer: None,
        }
    }

    /// The same publisher, signing every event it publishes with `signer` (see
    /// [`rct_bus::provenance`]).
    pub fn signing(&self, signer: Arc<Signer>) -> Self {
        Self {
            signer: Some(signer),
            ..self.clone()
        }
    }

    /// The same publisher, stamping every message with `traceparent: <trace>` (one
    /// operation's messages, one trace).
    pub fn traced(&self, trace: &rct_bus::trace::TraceContext) -> Self {
        Self {
            trace: Some(trace.to_string()),
            ..self.clone()
        }
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Publishes and waits for the server to store the message. A publish that times out,
    /// finds no responder (a server restarting), loses its connection, or meets an earlier
    /// attempt still in process (a leader without its quorum) is sent again with the same id,
    /// so it is stored once. Out of attempts, the error says whether the message may be
    /// stored ([`Error::Unacknowledged`]: some attempt may have reached a stream) or surely
    /// is not ([`Error::Publish`]: no stream ever answered, or one refused it).
    ///
    /// A duplicate acknowledgement of a message whose stream is known is checked against the
    /// stored message: one on another subject under our id is not ours (a writer that guessed
    /// the id and published first elsewhere, to swallow this message: a log line under the id
    /// of an outcome). The message is then sent again under an id no one can take before it
    /// is published (see [`Outgoing::unguessable_id`]), so it is stored all the same. Other
    /// bytes on our own subject are taken for ours: our own earlier attempt, rebuilt (a
    /// writer of the same subject has our very permissions).
    pub async fn send(&self, mut message: Outgoing) -> Result<Slot> {
        let mut ack = self.deliver(&message).await?;
        let mut renamed = false;
        while let Some(dup) = ack.as_ref().filter(|a| a.duplicate)
            && !self.ours(&message, dup).await?
        {
            if renamed {
                // Other bytes under the digest of ours: not a thing a writer can do.
                return Err(Error::read(
                    &format!("the message stored under id {}", message.msg_id),
                    "another message holds the id derived from this message's own bytes",
                ));
            }
            renamed = true;
            let fresh = message.unguessable_id();
            tracing::warn!(
                subject = %message.subject,
                msg_id = %message.msg_id,
                impostor = dup.sequence,
                fresh = %fresh,
                "another message was stored under this message's id first; sending it again under a fresh id"
            );
            message.msg_id = fresh;
            ack = self.deliver(&message).await?;
        }
        match ack {
            Some(ack) => Ok(Slot::Written(ack)),
            None => match self.holder(&message).await? {
                Holder::Ours(ack) => Ok(Slot::Written(ack)),
                Holder::Other(sequence) => Ok(Slot::Taken { sequence }),
                Holder::None => Err(Error::read(
                    &format!("the holder of {}", message.subject),
                    "the server refused the expected sequence, and the subject is empty",
                )),
            },
        }
    }

    /// Sends until stored (`Some`) or refused for its expected sequence (`None`), retrying
    /// what may not have reached a stream. Out of attempts, the error says whether the
    /// message may be stored ([`Error::Unacknowledged`]) or surely is not
    /// ([`Error::Publish`]).
    async fn deliver(&self, message: &Outgoing) -> Result<Option<Ack>> {
        let mut pause = self.retry.pause;
        let mut attempt = 1;
        let mut maybe_stored = false;
        loop {
            match self.attempt(message).await {
                Ok(ack) => {
                    return Ok(Some(Ack {
                        stream: ack.stream,
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    }));
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence && message.once => {
                    return Ok(None);
                }
                Err(e) if is_retryable(&e) => {
                    // No responders means no stream took it; anything else may have.
                    maybe_stored |= e.kind() != PublishErrorKind::StreamNotFound;
                    if attempt >= self.retry.attempts {
                        return Err(if maybe_stored {
                            Error::Unacknowledged {
                                subject: message.subject.clone(),
                                msg_id: message.msg_id.clone(),
                                attempts: attempt,
                                cause: e,
                            }
                        } else {
                            Error::Publish {
                                subject: message.subject.clone(),
                                cause: e,
                            }
                        });
                    }
                    tracing::debug!(
                        subject = %message.subject,
                        msg_id = %message.msg_id,
                        attempt,
                        error = %e,
                        "publish not acknowledged; retrying with the same id"
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(self.retry.max_pause);
                    attempt += 1;
                }
                Err(cause) => {
                    return Err(Error::Publish {
                        subject: message.subject.clone(),
                        cause,
                    });
                }
            }
        }
    }

    /// Publishes an event of a command of `tower` (see [`Outgoing::event`]).
    pub async fn event(
        &self,
        tower: &Tower,
        event: &proto::Event,
        n: impl std::fmt::Display,
    ) -> Result<Slot> {
        let mut outgoing = Outgoing::event(tower, event, n).ok_or_else(|| Error::InvalidEvent {
            command_id: event.command_id.clone(),
        })?;
        if let Some(signer) = &self.signer {
            let signature = signer
                .sign(&outgoing.subject, &outgoing.payload)
                .ok_or_else(|| Error::Unsigned {
                    subject: outgoing.subject.clone(),
                    why: "this agent's key is not certified by admission now",
                })?;
            outgoing = outgoing.header(provenance::HEADER, &signature);
        }
        self.send(outgoing).await
    }

    /// Whether the message the server reports as a duplicate of `message` is on its subject.
    /// Only checked where the stream is known (events): the ids of submissions and commands
    /// are their command ids, which nobody else can know before they are published.
    async fn ours(&self, message: &Outgoing, ack: &Ack) -> Result<bool> {
        if message.stream.is_none() {
            return Ok(true);
        }
        let read = |e: async_nats::Error| {
            Error::read(&format!("{} message {}", ack.stream, ack.sequence), e)
        };
        let stored = self
            .js
            .get_stream_no_info(&ack.stream)
            .await
            .map_err(|e| read(e.into()))?
            .get_raw_message(ack.sequence)
            .await
            .map_err(|e| read(e.into()))?;
        Ok(stored.subject.as_str() == message.subject)
    }

    /// The server checks the expected sequence before the dedup id, so a retry of our own
    /// earlier, stored write is refused like a rival's. Tell them apart by the id of the
    /// message on the subject (read from the stream leader, which is authoritative).
    async fn holder(&self, message: &Outgoing) -> Result<Holder> {
        let read =
            |e: async_nats::Error| Error::read(&format!("the holder of {}", message.subject), e);
        let stream = match message.stream {
            Some(stream) => stream.to_owned(),
            None => self
                .js
                .stream_by_subject(message.subject.clone())
                .await
                .map_err(|e| read(e.into()))?,
        };
        let slot = message.slot.as_deref().unwrap_or(&message.subject);
        let Some(holder) = crate::journal::first(&self.js, &stream, slot, |_| true).await? else {
            return Ok(Holder::None);
        };
        // Ours: our id, or our id renamed for an impostor (see `send`).
        let ours = holder
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .is_some_and(|id| {
                id.as_str() == message.msg_id
                    || id
                        .as_str()
                        .strip_prefix(message.msg_id.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            });
        Ok(if ours {
            Holder::Ours(Ack {
                stream,
                sequence: holder.sequence,
                duplicate: true,
            })
        } else {
            Holder::Other(holder.sequence)
        })
    }

    async fn attempt(
        &self,
        message: &Outgoing,
    ) -> Result<jetstream::publish::PublishAck, PublishError> {
        let mut publish = PublishMessage::build()
            .payload(message.payload.clone())
            .message_id(&message.msg_id);
        for (name, values) in message.headers.iter() {
            for value in values {
                publish = publish.header(name.clone(), value.clone());
            }
        }
        if let Some(trace) = &self.trace
            && message.headers.get(rct_bus::trace::TRACEPARENT).is_none()
        {
            publish = publish.header(rct_bus::trace::TRACEPARENT, trace.as_str());
        }
        if message.once {
            publish = publish.expected_last_subject_sequence(0);
            if let Some(slot) = &message.slot {
                publish = publish.header(EXPECTED_OVER, slot.as_str());
            }
        }

        self.js
            .send_publish(message.subject.clone(), publish)
            .await?
            .await
    }
}

/// The header that makes `Nats-Expected-Last-Subject-Sequence` range over a filter.
const EXPECTED_OVER: &str = "Nats-Expected-Last-Subject-Sequence-Subject";

/// Who holds the subject a conditional publish was refused on.
enum Holder {
    /// Our own earlier attempt.
    Ours(Ack),
    /// Another writer's message, at this sequence.
    Other(u64),
    /// Nobody: the subject is empty.
    None,
}

fn is_retryable(error: &PublishError) -> bool {
    matches!(
        error.kind(),
        PublishErrorKind::TimedOut
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::BrokenPipe
    ) || in_process(error)
}

/// The stream's leader holds an earlier write it has not committed yet: an attempt with this
/// id (its quorum is lost), or, on a clustered stream, any write to this single-slot subject
/// (10164, "wrong last sequence" without a sequence: the leader refuses a second expected-
/// sequence write while one is in process). What becomes of it is not known, so the same id is
/// tried again: once it is settled, the retry is a duplicate, or is refused for its expected
/// sequence and the subject's holder says whose it is.
fn in_process(error: &PublishError) -> bool {
    use async_nats::jetstream::ErrorCode;
    std::error::Error::source(error)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|e| {
            [
                ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT,
                ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT,
            ]
            .contains(&e.error_code())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server error as the server sends it.
    fn server(err_code: u64, description: &str) -> PublishError {
        let error: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400,
            "err_code": err_code,
            "description": description,
        }))
        .unwrap();
        PublishError::with_source(PublishErrorKind::Other, error)
    }

    /// A clustered leader answers a single-slot write with 10164 while another write to the
    /// subject is in process (a first attempt whose PubAck was lost, or a rival's): retried,
    /// not taken for a refusal. Before, rct's writes of decisions, claims and outcomes on R3
    /// streams failed on it (found by `rct bench`'s cluster scenario).
    #[test]
    fn a_write_in_process_on_a_clustered_leader_is_tried_again() {
        assert!(is_retryable(&server(10164, "wrong last sequence")));
        assert!(is_retryable(&server(
            10158,
            "duplicate message id is in process"
        )));
        // Refusals stay refusals.
        assert!(!is_retryable(&server(10077, "maximum messages exceeded")));
        assert!(!is_retryable(&server(10071, "wrong last sequence: 7")));
    }
}
