//! Replay of `RCT_EVT` by batched direct gets (no consumer, no server-side state; see
//! [`crate::direct`]): one command's history, a time range with filters, or history then
//! live for watchers, who are woken by a core subscription to the events' subject and read
//! what the stream stored.

use std::collections::VecDeque;

use async_nats::jetstream::{self, message::StreamMessage};
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message as _;
use rct_bus::provenance::{self, Provenance, Trust};
use rct_bus::trace::{TRACEPARENT, TraceContext};
use rct_bus::{CommandId, EventKind, Subject, Target, Tower, proto, subject};
use time::OffsetDateTime;

use crate::direct::{self, Batch, Reader, Start};
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

/// [`follow`], looking again as soon as `connected` says the connection changed (rather
/// than at the next poll): nothing is missed or delivered twice.
pub async fn follow_reconnecting(
    js: &jetstream::Context,
    filter: &Filter,
    connected: tokio::sync::watch::Receiver<bool>,
) -> Result<impl Stream<Item = Result<Item>> + Unpin + use<>> {
    let mut replay = Replay::start(js, filter.clone(), true).await?;
    let mut connected = connected;
    connected.borrow_and_update();
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
    reader: Reader,
    /// Where the next read starts.
    start: Start,
    /// The stream subject `filter` reads.
    subject: String,
    filter: Filter,
    follow: bool,
    /// Everything stored at the start has been delivered; later messages are live.
    caught_up: bool,
    /// Nothing more to read (history read to its end, or `filter.until` passed).
    ended: bool,
    /// The read failed: wait a little before reading again.
    failed: bool,
    /// For a follow: a core subscription to the events' subject, which says something was
    /// published (its messages are not read as events: only what the stream stored counts).
    doorbell: Option<async_nats::Subscriber>,
    /// Quick looks left after the doorbell rang and nothing new was stored yet (the stream
    /// stores an event a moment after it is published, a replica a moment later still).
    eager: u32,
    /// Whether the connection is up: when it comes back, read at once.
    connected: Option<tokio::sync::watch::Receiver<bool>>,
    queue: VecDeque<Result<Item>>,
}

/// How long to wait between attempts to resume a failed replay.
const RESUME_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// How often a follow looks for new events when the doorbell has not rung: what it misses
/// while reconnecting is found by this look.
const POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Quick looks after the doorbell rings, 5 ms apart and doubling (about 1.3 s in all).
const EAGER: u32 = 8;

impl Replay {
    async fn start(js: &jetstream::Context, filter: Filter, follow: bool) -> Result<Self> {
        let subject = filter.subject();
        // Rung before the first read: nothing stored after it is missed.
        let doorbell = if follow {
            let client = js.client();
            let doorbell = client
                .subscribe(subject.clone())
                .await
                .map_err(|e| Error::read(EVENT_STREAM, e))?;
            Some(doorbell)
        } else {
            None
        };
        let start = match (filter.from_sequence, filter.since) {
            (Some(sequence), _) => Start::Sequence(sequence),
            (None, Some(at)) => Start::Time(at),
            (None, None) => Start::Sequence(1),
        };
        let mut replay = Self {
            reader: Reader::new(js, EVENT_STREAM).await?,
            start,
            subject,
            filter,
            follow,
            caught_up: false,
            ended: false,
            failed: false,
            doorbell,
            eager: 0,
            connected: None,
            queue: VecDeque::new(),
        };
        // A first read that keeps failing is the caller's to see; one that fails once (a
        // server reloading) is tried again.
        let mut attempts = 0;
        while let Err(e) = replay.read().await {
            attempts += 1;
            if attempts == 3 {
                return Err(e);
            }
            tokio::time::sleep(RESUME_PAUSE).await;
        }
        Ok(replay)
    }

    /// Reads one batch from where the replay is and takes its events; says whether it held
    /// any. Before it says it has caught up, it asks the stream leader whether anything is
    /// stored past the batch: a direct get may be answered by a replica that is behind.
    async fn read(&mut self) -> Result<bool> {
        let batch: Batch = self
            .reader
            .batch(self.start, &self.subject, direct::BATCH)
            .await?;
        let mut delivered = !batch.messages.is_empty();
        for message in &batch.messages {
            self.take(message);
            if self.ended {
                return Ok(delivered);
            }
        }
        if batch.pending == 0 && !self.caught_up {
            // Read from a time with nothing found yet, there is no sequence to ask from:
            // the replica's word is taken.
            if let Start::Sequence(from) = self.start
                && let Some(behind) = self.reader.leader_next(from, &self.subject).await?
            {
                self.take(&behind);
                return Ok(true);
            }
            self.caught_up = true;
            if self.follow {
                self.queue.push_back(Ok(Item::CaughtUp));
            } else {
                self.ended = true;
            }
        }
        // A follow asks the leader only when the doorbell rang and the replica answering had
        // nothing: the quick looks that follow a ring find it otherwise.
        if self.caught_up
            && !delivered
            && self.eager == 1
            && let Start::Sequence(from) = self.start
            && let Some(behind) = self.reader.leader_next(from, &self.subject).await?
        {
            self.take(&behind);
            delivered = true;
        }
        Ok(delivered)
    }

    /// Waits until a look is worth taking: the doorbell rang, the connection came back, or
    /// a while passed.
    async fn wait(&mut self) {
        let pause = if self.failed {
            RESUME_PAUSE
        } else if !self.caught_up {
            return;
        } else if self.eager > 0 {
            std::time::Duration::from_millis(5 << (EAGER - self.eager))
        } else {
            POLL
        };
        // After a failed read, the pause holds whatever rings.
        let failed = self.failed;
        let doorbell = async {
            match self.doorbell.as_mut().filter(|_| !failed) {
                Some(doorbell) => doorbell.next().await,
                None => std::future::pending().await,
            }
        };
        let connected = async {
            match self.connected.as_mut() {
                Some(connected) => connected.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            rang = doorbell => match rang {
                Some(_) => {
                    self.eager = EAGER;
                    // Every ring waiting now is answered by the same look.
                    if let Some(doorbell) = self.doorbell.as_mut() {
                        while let Some(Some(_)) = futures::FutureExt::now_or_never(doorbell.next()) {}
                    }
                }
                None => self.doorbell = None,
            },
            open = connected => if !open {
                self.connected = None;
            },
            () = tokio::time::sleep(pause) => {
                self.eager = self.eager.saturating_sub(1);
            }
        }
    }

    fn into_stream(self) -> impl Stream<Item = Result<Item>> {
        futures::stream::unfold(self, |mut replay| async move {
            loop {
                if let Some(item) = replay.queue.pop_front() {
                    return Some((item, replay));
                }
                if replay.ended {
                    return None;
                }
                replay.wait().await;
                match replay.read().await {
                    Ok(delivered) => {
                        replay.failed = false;
                        // More may be on its way (a burst, or a replica behind): look again
                        // soon, then less and less often.
                        if delivered && replay.caught_up {
                            replay.eager = EAGER;
                        }
                    }
                    // Reported, then read again from the same place: nothing is missed or
                    // delivered twice.
                    Err(e) => {
                        replay.failed = true;
                        replay.queue.push_back(Err(e));
                    }
                }
            }
        })
    }

    fn take(&mut self, message: &StreamMessage) {
        let (sequence, published) = (message.sequence, message.time);
        self.start = Start::Sequence(sequence + 1);
        if self.filter.until.is_some_and(|until| published > until) {
            self.ended = true;
            return;
        }
        let stored = (
            message.subject.as_str(),
            message.payload.as_ref(),
            Some(&message.headers),
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
    }
}
