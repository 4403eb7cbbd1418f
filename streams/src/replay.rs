//! Replay of `RCT_EVT` through ordered consumers (no server-side state): one command's
//! history, a time range with filters, or history then live for watchers.

use std::collections::VecDeque;

use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, pull};
use async_nats::jetstream::{self, Message};
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message as _;
use rct_bus::provenance::{self, Provenance, Trust};
use rct_bus::trace::{TRACEPARENT, TraceContext};
use rct_bus::{CommandId, EventKind, Subject, Target, Tower, proto, subject};
use time::OffsetDateTime;

use crate::topology::EVENT_STREAM;
use crate::{Error, Result};

/// One stored event, with where and when it was stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Sequence in `RCT_EVT`: the total order of the audit log.
    pub sequence: u64,
    /// When the server stored it.
    pub published: OffsetDateTime,
    /// The tower from the subject.
    pub tower: Tower,
    /// The target from the subject: the one the event names (see [`Target::of_event`]).
    pub target: Target,
    /// The command from the subject.
    pub command_id: CommandId,
    /// The slot from the subject.
    pub kind: EventKind,
    /// The event.
    pub event: proto::Event,
    /// The operation's trace, from the message's `traceparent` header.
    pub trace: Option<TraceContext>,
    /// Who wrote it: checked by readers given admission's keys ([`Filter::trust`]).
    pub provenance: Provenance,
}

impl Record {
    /// Reads a stored message: the subject must be an event subject and the payload an
    /// `Event` whose target, command id and kind agree with it.
    pub fn from_stored(
        sequence: u64,
        published: OffsetDateTime,
        subject: &str,
        payload: &[u8],
    ) -> Result<Self> {
        let malformed = |reason: String| Error::Malformed {
            sequence,
            subject: subject.to_owned(),
            reason,
        };
        let event = || proto::Event::decode(payload).map_err(|e| malformed(e.to_string()));
        let (tower, target, command_id, kind, event, at) = match subject.parse() {
            Ok(Subject::Event {
                tower,
                target,
                command_id,
                kind,
            }) => (tower, target, command_id, kind, event()?, 4),
            Ok(_) => return Err(malformed("not an event subject".into())),
            Err(e) => match subject::legacy_event(subject) {
                // Stored before subjects named the target: the payload's is taken.
                Some((tower, command_id, kind)) => {
                    let event = event()?;
                    let target = Target::of_event(&event.target);
                    (tower, target, command_id, kind, event, 3)
                }
                None => return Err(malformed(e.to_string())),
            },
        };
        // The subject's token is the command id as written: compare text, no allocation per
        // event (history folds millions of them).
        let written = subject.split('.').nth(at).unwrap_or_default();
        if event.command_id != written {
            return Err(malformed(format!(
                "payload names command {:?}",
                event.command_id
            )));
        }
        if EventKind::of(&event) != Some(kind) {
            return Err(malformed(format!("payload is not a {kind} event")));
        }
        if target != Target::of_event(&event.target) {
            return Err(malformed(format!(
                "payload names target {:?}",
                event.target
            )));
        }
        Ok(Self {
            sequence,
            published,
            tower,
            target,
            command_id,
            kind,
            event,
            trace: None,
            provenance: Provenance::Unchecked,
        })
    }

    /// Reads a stored message ([`Record::from_stored`]) with its trace and, given `trust`,
    /// who wrote it (see [`rct_bus::provenance`]).
    pub fn from_message(
        sequence: u64,
        published: OffsetDateTime,
        (subject, payload, headers): (&str, &[u8], Option<&async_nats::HeaderMap>),
        trust: Option<&Trust>,
    ) -> Result<Self> {
        Ok(Self::from_stored(sequence, published, subject, payload)?
            .checked((subject, payload, headers), trust))
    }

    /// This record of the stored message, with its trace and, given `trust`, who wrote it.
    fn checked(
        mut self,
        (subject, payload, headers): (&str, &[u8], Option<&async_nats::HeaderMap>),
        trust: Option<&Trust>,
    ) -> Self {
        self.trace = headers
            .and_then(|h| h.get(TRACEPARENT))
            .and_then(|v| TraceContext::parse(v.as_str()));
        if let Some(trust) = trust {
            self.provenance = trust
                .check_at(
                    self.sequence,
                    (&self.tower, &self.target, self.kind),
                    subject,
                    payload,
                    headers
                        .and_then(|h| h.get(provenance::HEADER))
                        .map(|v| v.as_str()),
                    self.published.into(),
                )
                .for_event(&self.event);
        }
        self
    }
}

/// Which events to replay. Empty means all of them.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this command's events.
    pub command: Option<CommandId>,
    /// Only this tower's events.
    pub tower: Option<Tower>,
    /// With `command`: only this slot of its history.
    pub kind: Option<EventKind>,
    /// Only events about this target.
    pub target: Option<Target>,
    /// Only events stored at or after this instant.
    pub since: Option<OffsetDateTime>,
    /// Only events stored at or before this instant.
    pub until: Option<OffsetDateTime>,
    /// Only events stored at or after this stream sequence (instead of `since`).
    pub from_sequence: Option<u64>,
    /// Check who wrote each event against admission's keys (see [`Record::provenance`]);
    /// without, every record is [`Provenance::Unchecked`].
    pub trust: Option<std::sync::Arc<Trust>>,
    /// With `trust`: progress events are not checked (left [`Provenance::Unchecked`]), for
    /// summaries of long ranges where progress only sets an open command's percentage and
    /// checking a signature costs more than reading the event.
    pub progress_unchecked: bool,
}

impl Filter {
    /// All events of one command.
    pub fn command(command_id: CommandId) -> Self {
        Self {
            command: Some(command_id),
            ..Self::default()
        }
    }

    /// The same filter, checking who wrote each event against `trust` (see
    /// [`Filter::trust`]).
    pub fn trusting(self, trust: Option<std::sync::Arc<Trust>>) -> Self {
        Self { trust, ..self }
    }

    /// The consumer's filter. One command's events are few and filtered by the server; wider
    /// reads take the whole stream and filter here: the server delivers a partial wildcard
    /// (`rct.evt.<tower>.>`) over a stream with a subject per command and kind about 25 times
    /// slower than the whole stream (10 k against 250 k events/s measured), so a tower's
    /// history is read faster by skipping the other towers' events ourselves.
    fn subject(&self) -> String {
        match (&self.command, self.kind) {
            // One exact subject when the tower and target are known too.
            (Some(id), Some(kind)) => match (&self.tower, &self.target) {
                (Some(tower), Some(target)) => Subject::event(tower, target, *id, kind).to_string(),
                (Some(tower), None) => subject::events_of_tower_command(tower, *id, kind),
                (None, _) => subject::events_of_kind(*id, kind),
            },
            (Some(id), None) => subject::events_for_command(*id),
            // Read from a recent sequence (a live follow), a tower's events of one kind are
            // few: filtered by the server.
            (None, Some(kind)) if self.from_sequence.is_some() => match &self.tower {
                Some(tower) => subject::events_of_tower_kind(tower, kind),
                None => subject::all_events(),
            },
            (None, _) => subject::all_events(),
        }
    }

    fn admits(&self, record: &Record) -> bool {
        self.since.is_none_or(|since| record.published >= since)
            && self.tower.as_ref().is_none_or(|t| *t == record.tower)
            && self.kind.is_none_or(|k| k == record.kind)
            && self.target.as_ref().is_none_or(|t| *t == record.target)
    }
}

/// What a follower sees.
// One item per received message, moved once: boxing the event would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// An event, in stream order.
    Event(Record),
    /// Everything stored when the follow began has been delivered; what comes next is live.
    CaughtUp,
}

/// Events matching `filter`, in stream order, ending with the last one stored (or at
/// `filter.until`). A malformed message is yielded as [`Error::Malformed`] and replay goes on.
pub async fn history(
    js: &jetstream::Context,
    filter: &Filter,
) -> Result<impl Stream<Item = Result<Record>> + Unpin + use<>> {
    let replay = Replay::start(js, filter.clone(), false).await?;
    Ok(replay
        .into_stream()
        .try_filter_map(|item| async move {
            Ok(match item {
                Item::Event(record) => Some(record),
                Item::CaughtUp => None,
            })
        })
        .boxed())
}

/// Events matching `filter`: the stored ones, then [`Item::CaughtUp`], then live ones as they
/// are stored, until dropped (or `filter.until` passes).
pub async fn follow(
    js: &jetstream::Context,
    filter: &Filter,
) -> Result<impl Stream<Item = Result<Item>> + Unpin + use<>> {
    Ok(Replay::start(js, filter.clone(), true)
        .await?
        .into_stream()
        .boxed())
}

/// [`follow`], starting again after the last event read as soon as `connected` says the
/// connection is back (rather than when the pull that was waiting times out, tens of seconds
/// later): nothing is missed or delivered twice.
pub async fn follow_reconnecting(
    js: &jetstream::Context,
    filter: &Filter,
    connected: tokio::sync::watch::Receiver<bool>,
) -> Result<impl Stream<Item = Result<Item>> + Unpin + use<>> {
    let mut replay = Replay::start(js, filter.clone(), true).await?;
    let mut connected = connected;
    // Up now (the first connect is announced too): only a return after a loss resumes.
    replay.up = *connected.borrow_and_update();
    replay.connected = Some(connected);
    Ok(replay.into_stream().boxed())
}

/// The whole stored history of one command, in order. Malformed messages are logged and
/// skipped; infrastructure errors end the read.
pub async fn command_history(js: &jetstream::Context, id: CommandId) -> Result<Vec<Record>> {
    records(js, &Filter::command(id)).await
}

/// Every stored event `filter` takes, in order. Malformed messages are logged and skipped;
/// infrastructure errors end the read.
pub async fn records(js: &jetstream::Context, filter: &Filter) -> Result<Vec<Record>> {
    let mut events = history(js, filter).await?;
    let mut records = Vec::new();
    while let Some(record) = events.next().await {
        match record {
            Ok(record) => records.push(record),
            Err(e @ Error::Malformed { .. }) => tracing::warn!(error = %e, "skipping"),
            Err(e) => return Err(e),
        }
    }
    Ok(records)
}

/// The event in one single-slot `kind` (decision, claim, outcome, …) of one command of
/// `tower` on `target`, if it has one (the first, for a slot written more than once).
pub async fn slot(
    js: &jetstream::Context,
    tower: &Tower,
    target: &Target,
    id: CommandId,
    kind: EventKind,
) -> Result<Option<Record>> {
    slot_trusting(js, tower, target, id, kind, None).await
}

/// [`slot`], with each record's provenance checked against `trust`.
pub async fn slot_trusting(
    js: &jetstream::Context,
    tower: &Tower,
    target: &Target,
    id: CommandId,
    kind: EventKind,
    trust: Option<&std::sync::Arc<Trust>>,
) -> Result<Option<Record>> {
    let filter = Filter {
        command: Some(id),
        tower: Some(tower.clone()),
        target: Some(target.clone()),
        kind: Some(kind),
        trust: trust.cloned(),
        ..Filter::default()
    };
    let mut events = history(js, &filter).await?;
    while let Some(record) = events.next().await {
        match record {
            Ok(record) => return Ok(Some(record)),
            Err(e @ Error::Malformed { .. }) => tracing::warn!(error = %e, "skipping"),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

struct Replay {
    messages: Option<pull::Ordered>,
    js: jetstream::Context,
    filter: Filter,
    follow: bool,
    /// Everything stored at the start has been delivered; later messages are live.
    caught_up: bool,
    /// The stream sequence of the last message read: a replay that failed resumes after it.
    last: Option<u64>,
    /// The read failed (a server restart, a lost connection): start again after `last`.
    resume: bool,
    /// Whether the connection is up: when it comes back, start again after `last`.
    connected: Option<tokio::sync::watch::Receiver<bool>>,
    /// Whether it was up when last looked at.
    up: bool,
    queue: VecDeque<Result<Item>>,
}

/// How long to wait between attempts to resume a failed replay.
const RESUME_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

impl Replay {
    /// An ordered consumer reading `filter`'s events from `deliver_policy` on.
    async fn consumer(
        js: &jetstream::Context,
        filter: &Filter,
        deliver_policy: DeliverPolicy,
    ) -> Result<jetstream::consumer::Consumer<pull::OrderedConfig>> {
        let stream = js
            .get_stream_no_info(EVENT_STREAM)
            .await
            .map_err(|e| Error::read(EVENT_STREAM, e))?;
        stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter.subject(),
                deliver_policy,
                replay_policy: ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::read(EVENT_STREAM, e))
    }

    fn deliver_policy(filter: &Filter, after: Option<u64>) -> DeliverPolicy {
        match (after, filter.from_sequence, filter.since) {
            (Some(last), _, _) => DeliverPolicy::ByStartSequence {
                start_sequence: last + 1,
            },
            (None, Some(start_sequence), _) => DeliverPolicy::ByStartSequence { start_sequence },
            (None, None, Some(start_time)) => DeliverPolicy::ByStartTime { start_time },
            (None, None, None) => DeliverPolicy::All,
        }
    }

    /// After a failed read: a new ordered consumer from the message after the last one read,
    /// tried until it can be made (the server may still be coming back).
    async fn resume(&mut self) {
        loop {
            let policy = Self::deliver_policy(&self.filter, self.last);
            let made = match Self::consumer(&self.js, &self.filter, policy).await {
                Ok(consumer) => consumer
                    .messages()
                    .await
                    .map_err(|e| Error::read(EVENT_STREAM, e)),
                Err(e) => Err(e),
            };
            match made {
                Ok(messages) => {
                    self.messages = Some(messages);
                    self.resume = false;
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "resuming the replay");
                    tokio::time::sleep(RESUME_PAUSE).await;
                }
            }
        }
    }

    async fn start(js: &jetstream::Context, filter: Filter, follow: bool) -> Result<Self> {
        let consumer = Self::consumer(js, &filter, Self::deliver_policy(&filter, None)).await?;
        let empty = consumer.cached_info().num_pending == 0;
        let mut queue = VecDeque::new();
        if empty && follow {
            queue.push_back(Ok(Item::CaughtUp));
        }
        let messages = if empty && !follow {
            None
        } else {
            Some(
                consumer
                    .messages()
                    .await
                    .map_err(|e| Error::read(EVENT_STREAM, e))?,
            )
        };
        Ok(Self {
            messages,
            js: js.clone(),
            filter,
            follow,
            caught_up: empty,
            last: None,
            resume: false,
            connected: None,
            up: true,
            queue,
        })
    }

    fn into_stream(self) -> impl Stream<Item = Result<Item>> {
        futures::stream::unfold(self, |mut replay| async move {
            loop {
                if let Some(item) = replay.queue.pop_front() {
                    return Some((item, replay));
                }
                if replay.resume {
                    replay.resume().await;
                }
                let messages = replay.messages.as_mut()?;
                let message = match replay.connected.as_mut() {
                    None => messages.next().await?,
                    Some(connected) => tokio::select! {
                        message = messages.next() => message?,
                        changed = connected.changed() => {
                            match changed {
                                Ok(()) => {
                                    let up = *connected.borrow_and_update();
                                    // Back after a loss: the pull that was waiting may never
                                    // answer.
                                    if up && !replay.up {
                                        replay.resume = true;
                                    }
                                    replay.up = up;
                                }
                                Err(_) => replay.connected = None,
                            }
                            continue;
                        }
                    },
                };
                match message {
                    Ok(message) => replay.take(&message),
                    // The ordered consumer recreates itself after gaps and lost heartbeats,
                    // but not after a failed pull (a server restart): then a new one starts
                    // after the last message read. Reported either way.
                    Err(e) => {
                        replay.resume = true;
                        replay.queue.push_back(Err(Error::read(EVENT_STREAM, e)));
                    }
                }
            }
        })
    }

    fn take(&mut self, message: &Message) {
        let info = match message.info() {
            Ok(info) => info,
            Err(e) => {
                self.queue.push_back(Err(Error::read(EVENT_STREAM, e)));
                return;
            }
        };
        let (sequence, published, pending) = (info.stream_sequence, info.published, info.pending);
        // A resumed consumer starts after the last one read; anything older is not new.
        if self.last.is_some_and(|last| sequence <= last) {
            return;
        }
        self.last = Some(sequence);
        if self.filter.until.is_some_and(|until| published > until) {
            self.messages = None;
            return;
        }
        let stored = (
            message.subject.as_str(),
            message.payload.as_ref(),
            message.headers.as_ref(),
        );
        // Filtered first: a signature is checked only for what is read.
        match Record::from_stored(sequence, published, stored.0, stored.1) {
            Ok(record) if self.filter.admits(&record) => {
                let spared = self.filter.progress_unchecked && record.kind == EventKind::Progress;
                let trust = self.filter.trust.as_deref().filter(|_| !spared);
                let record = record.checked(stored, trust);
                self.queue.push_back(Ok(Item::Event(record)))
            }
            Ok(_) => {}
            Err(e) => self.queue.push_back(Err(e)),
        }
        if pending == 0 && !self.caught_up {
            self.caught_up = true;
            if self.follow {
                self.queue.push_back(Ok(Item::CaughtUp));
            } else {
                self.messages = None;
            }
        }
    }
}
