//! Reads of stored messages by batched direct gets (`$JS.API.DIRECT.GET.<stream>` with a
//! `batch`): no consumer, so a reader leaves no state on the server and cannot ask it to
//! deliver anything anywhere but its own inbox. A push consumer's deliver subject is not
//! checked against its creator's permissions (nats-io/nats-server#8274), so read-only
//! identities are given these reads instead of consumers.
//!
//! Each answer is a run of messages ending with an `EOB` status that says how many matching
//! messages remain; each message names the sequence of the one sent before it, so a message
//! lost on the way (a slow reader) is noticed and the batch read again.

use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};
use async_nats::{Client, Subscriber};
use futures::StreamExt;
use time::OffsetDateTime;

use crate::{Error, Result};

/// Messages per batch: large enough that a long history is a few round trips per 100,000
/// events, small enough to sit in a subscription's buffer.
pub const BATCH: usize = 1000;

/// Bytes per batch at most (the server sends at least one message).
const MAX_BYTES: usize = 8 << 20;

/// How long each message of an answer may take before the read fails.
const WAIT: Duration = Duration::from_secs(5);

/// Where a read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// At this stream sequence.
    Sequence(u64),
    /// At the first message stored at or after this instant.
    Time(OffsetDateTime),
}

/// One answer: the messages, in stream order, and how many matching ones remain after them.
#[derive(Debug)]
pub struct Batch {
    /// What was read.
    pub messages: Vec<StreamMessage>,
    /// Matching messages stored after the last one read, when it was read.
    pub pending: u64,
}

/// A reader of one stream, with its own reply subscription.
#[derive(Debug)]
pub struct Reader {
    js: jetstream::Context,
    stream: String,
    inbox: String,
    replies: Subscriber,
    request: u64,
}

impl Reader {
    /// A reader of `stream`.
    pub async fn new(js: &jetstream::Context, stream: &str) -> Result<Self> {
        let client: Client = js.client();
        let inbox = client.new_inbox();
        let replies = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| Error::read(stream, e))?;
        Ok(Self {
            js: js.clone(),
            stream: stream.to_owned(),
            inbox,
            replies,
            request: 0,
        })
    }

    /// Up to `limit` messages on `subject` (wildcards allowed) from `start` on.
    pub async fn batch(&mut self, start: Start, subject: &str, limit: usize) -> Result<Batch> {
        let mut request = serde_json::json!({
            "batch": limit,
            "max_bytes": MAX_BYTES,
            "next_by_subj": subject,
        });
        match start {
            Start::Sequence(seq) => request["seq"] = seq.max(1).into(),
            Start::Time(at) => {
                let at = at
                    .format(&time::format_description::well_known::Rfc3339)
                    .map_err(|e| Error::read(&self.stream, e))?;
                request["start_time"] = at.into();
            }
        }
        self.ask(request).await
    }

    async fn ask(&mut self, request: serde_json::Value) -> Result<Batch> {
        self.request += 1;
        let reply = format!("{}.{}", self.inbox, self.request);
        self.js
            .send_request(
                format!("DIRECT.GET.{}", self.stream),
                async_nats::Request::new()
                    .inbox(reply.clone())
                    .payload(request.to_string().into()),
            )
            .await
            .map_err(|e| Error::read(&self.stream, e))?;
        let mut messages: Vec<StreamMessage> = Vec::new();
        loop {
            let message = tokio::time::timeout(WAIT, self.replies.next())
                .await
                .map_err(|_| self.failed("no answer in time".into()))?
                .ok_or_else(|| self.failed("the reply subscription ended".into()))?;
            // An answer to an earlier request that timed out.
            if message.subject.as_str() != reply {
                continue;
            }
            // The server's own header is the last of its name: a stored message may carry one
            // of the same name its writer made up.
            let header = |name: &str| -> Option<u64> {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get_last(name))
                    .and_then(|v| v.as_str().parse().ok())
            };
            let previous = header("Nats-Last-Sequence");
            let pending = header("Nats-Num-Pending");
            let expected = messages.last().map_or(0, |m| m.sequence);
            match message.status.map(|s| s.as_u16()) {
                Some(404) if messages.is_empty() => {
                    return Ok(Batch {
                        messages,
                        pending: 0,
                    });
                }
                Some(204) => {
                    if previous != Some(expected) {
                        return Err(self.failed(format!(
                            "the answer ended after message {previous:?}, not {expected}: \
                             messages were lost on the way"
                        )));
                    }
                    return Ok(Batch {
                        messages,
                        pending: pending.unwrap_or(0),
                    });
                }
                Some(status) => {
                    return Err(self.failed(format!(
                        "{status} {}",
                        message.description.as_deref().unwrap_or_default()
                    )));
                }
                None => {
                    if previous.is_some_and(|p| p != expected) {
                        return Err(self.failed(format!(
                            "message {previous:?} came before {expected}: messages were lost \
                             on the way"
                        )));
                    }
                    let stored = StreamMessage::try_from(message)
                        .map_err(|e| Error::read(&self.stream, e))?;
                    messages.push(stored);
                }
            }
        }
    }

    /// The first message on `subject` at or after sequence `from`, read from the stream
    /// leader (a direct get may be answered by a replica that is behind: what it says is the
    /// end of the stream is checked here).
    pub async fn leader_next(&self, from: u64, subject: &str) -> Result<Option<StreamMessage>> {
        crate::journal::first_from(&self.js, &self.stream, subject, from, |_| true).await
    }

    fn failed(&self, why: String) -> Error {
        Error::read(&self.stream, why)
    }
}
