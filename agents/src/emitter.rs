//! Publishes a running command's progress and log lines as events, in order, off the
//! handler's path, within bounds ([`Output`]) so that no output can wedge, stall or lose a
//! command:
//!
//! - every text is masked (secret values become `***`) and cut to `max_line` bytes, ending
//!   `…truncated N bytes`;
//! - lines that come faster than they are published are packed, several to a log event
//!   (joined with `\n`), up to `max_event` bytes; progress is coalesced to the latest;
//! - a command records at most `max_lines` lines or `max_bytes` bytes: past that, lines are
//!   counted and only the last `tail_lines` kept, and one event says how many were elided;
//! - the queue is bounded: [`Emitter::send`] waits for room (backpressure, for pipe readers),
//!   [`Emitter::log`] never blocks and counts the line it cannot queue;
//! - an event the server or client refuses for good (larger than `max_payload` or the
//!   stream's `max_msg_size`) is dropped and a small event says what and why; one that is
//!   merely unacknowledged is retried with the same id;
//! - [`Flush::finish`] ends it: what is queued is published within `flush_timeout`, the rest
//!   is dropped and counted.
//!
//! Notes about the output itself (budget reached, lines elided, events dropped) are log
//! events with stream `LOG_STREAM_UNSPECIFIED` and a line starting with `rct: `.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::PublishErrorKind;
use rct_bus::proto::{self, LogStream, event::Kind};
use rct_bus::{EventKind, Tower};
use rct_streams::Publisher;
use rct_streams::timestamp::from_datetime;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::config::Output;

/// Written instead of a secret value.
const MASK: &str = "***";
/// Items taken from the queue at once, to be packed into events.
const BATCH: usize = 1024;
/// Pause before publishing again an event that was not acknowledged.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Once the flush has given up: how long the one event saying so may take.
const LAST_WORD: Duration = Duration::from_secs(2);

#[derive(Debug)]
enum Emit {
    Progress(proto::Progress),
    Log(LogStream, String),
    /// The first line over the budget came: say so, in order.
    BudgetReached,
}

/// What both sides share: the limits and the per-command tally of output.
#[derive(Debug)]
struct Shared {
    limits: Output,
    secrets: Vec<String>,
    tally: Mutex<Tally>,
}

#[derive(Debug, Default)]
struct Tally {
    /// Lines and bytes queued for publishing (the budget spent).
    lines: u64,
    bytes: u64,
    /// The budget is spent: later lines go to `tail`.
    over: bool,
    /// `BudgetReached` found the queue full: the publisher says it when it can.
    budget_notice: bool,
    /// The last lines over the budget, published at the end.
    tail: VecDeque<(LogStream, String)>,
    /// Lines over the budget that fell out of `tail`.
    elided_lines: u64,
    elided_bytes: u64,
    /// Lines a handler logged while the queue was full.
    overflow: u64,
    /// Lines that came after the flush began.
    late: u64,
    /// The latest progress that found the queue full.
    progress: Option<proto::Progress>,
    /// The flush began: nothing more is taken.
    closed: bool,
}

impl Shared {
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        // Why a std mutex: held for a few field updates, never across an await. A panic
        // while it is held leaves counters that are still counters.
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `text` masked and cut to `max_line` (`cut`: bytes already cut before it came here).
    fn bound(&self, text: &str, cut: u64) -> String {
        bound(text, cut, &self.secrets, self.limits.max_line)
    }

    /// The line as it will be recorded, if it is to be queued now; else it is counted (and
    /// kept in the tail when over the budget). The first line over the budget queues
    /// `BudgetReached` instead.
    fn admit(&self, stream: LogStream, text: &str, cut: u64) -> Option<Emit> {
        let line = self.bound(text, cut);
        let size = line.len() as u64;
        let mut t = self.tally();
        if t.closed {
            t.late += 1;
            return None;
        }
        if !t.over
            && t.lines < self.limits.max_lines
            && t.bytes.saturating_add(size) <= self.limits.max_bytes
        {
            t.lines += 1;
            t.bytes += size;
            return Some(Emit::Log(stream, line));
        }
        let first = !t.over;
        t.over = true;
        t.tail.push_back((stream, line));
        while t.tail.len() > self.limits.tail_lines {
            let Some((_, old)) = t.tail.pop_front() else {
                break;
            };
            t.elided_lines += 1;
            t.elided_bytes += old.len() as u64;
        }
        first.then_some(Emit::BudgetReached)
    }

    /// What could not be queued.
    fn missed(&self, emit: Emit, closed: bool) {
        let mut t = self.tally();
        match emit {
            Emit::Log(_, line) => {
                t.lines -= 1;
                t.bytes -= line.len() as u64;
                if closed {
                    t.late += 1;
                } else {
                    t.overflow += 1;
                }
            }
            Emit::BudgetReached => t.budget_notice = true,
            Emit::Progress(p) => t.progress = Some(p),
        }
    }
}

/// The handler's side: cheap to clone; [`Emitter::log`] and [`Emitter::progress`] never
/// block, [`Emitter::send`] waits for room in the queue.
#[derive(Clone, Debug)]
pub(crate) struct Emitter {
    tx: mpsc::Sender<Emit>,
    shared: Arc<Shared>,
}

impl Emitter {
    pub(crate) fn progress(&self, percent: u32, step: String, message: String) {
        let progress = proto::Progress {
            percent,
            step: self.shared.bound(&step, 0),
            message: self.shared.bound(&message, 0),
        };
        if self.shared.tally().closed {
            return;
        }
        self.try_queue(Emit::Progress(progress));
    }

    /// Queues a line if there is room; a line that finds the queue full is counted, and the
    /// count recorded at the end.
    pub(crate) fn log(&self, stream: LogStream, line: String) {
        if let Some(emit) = self.shared.admit(stream, &line, 0) {
            self.try_queue(emit);
        }
    }

    /// Queues a line, waiting while the queue is full (`cut`: bytes of it the caller has
    /// already left out).
    pub(crate) async fn send(&self, stream: LogStream, line: &str, cut: u64) {
        if let Some(emit) = self.shared.admit(stream, line, cut)
            && let Err(mpsc::error::SendError(emit)) = self.tx.send(emit).await
        {
            self.shared.missed(emit, true);
        }
    }

    /// How many bytes of a line are worth reading: `max_line`, plus room for a secret that
    /// starts before the cut to be masked whole.
    pub(crate) fn line_limit(&self) -> usize {
        let longest = self.shared.secrets.iter().map(String::len).max();
        self.shared.limits.max_line + longest.unwrap_or(0)
    }

    /// `text` masked and cut, like everything this emitter publishes (`cut`: bytes of it
    /// already left out).
    pub(crate) fn bound(&self, text: &str, cut: u64) -> String {
        self.shared.bound(text, cut)
    }

    fn try_queue(&self, emit: Emit) {
        match self.tx.try_send(emit) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(emit)) => self.shared.missed(emit, false),
            Err(mpsc::error::TrySendError::Closed(emit)) => self.shared.missed(emit, true),
        }
    }
}

/// The publisher's side: [`Flush::finish`] once the handler has ended. Dropping it without
/// finishing stops publishing at once.
#[derive(Debug)]
pub(crate) struct Flush {
    task: AbortOnDropHandle<()>,
    close: CancellationToken,
    give_up: CancellationToken,
    within: Duration,
}

impl Flush {
    /// Takes no more output, publishes what is queued and the notes about the output (lines
    /// elided, dropped), and returns when that is done, or after `output.flush_timeout`: what
    /// is left then is dropped, counted, and the drop recorded if the stream takes it.
    pub(crate) async fn finish(mut self) {
        self.close.cancel();
        if tokio::time::timeout(self.within, &mut self.task)
            .await
            .is_ok()
        {
            return;
        }
        tracing::warn!(
            within = %humantime::format_duration(self.within),
            "output not published within output.flush_timeout; dropping the rest"
        );
        self.give_up.cancel();
        // The last word is bounded by LAST_WORD; a little more for it to return.
        let _ = tokio::time::timeout(LAST_WORD * 2, &mut self.task).await;
    }
}

/// Starts publishing events like `template` (command id, operation, target, source) for
/// `tower`, masking `secrets`, within `limits`. It ends with [`Flush::finish`] (or once every
/// `Emitter` clone is dropped, having published everything).
pub(crate) fn start(
    publisher: Publisher,
    tower: Tower,
    template: proto::Event,
    secrets: Vec<String>,
    limits: &Output,
) -> (Emitter, Flush) {
    let (tx, rx) = mpsc::channel(limits.queue.max(1));
    let shared = Arc::new(Shared {
        limits: limits.clone(),
        secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
        tally: Mutex::default(),
    });
    let close = CancellationToken::new();
    let give_up = CancellationToken::new();
    let publishing = Publishing {
        publisher,
        tower,
        template,
        shared: shared.clone(),
        give_up: give_up.clone(),
        logs: 0,
        progresses: 0,
        unpublished: 0,
        last_error: None,
    };
    let task = AbortOnDropHandle::new(tokio::spawn(publishing.run(rx, close.clone())));
    let flush = Flush {
        task,
        close,
        give_up,
        within: limits.flush_timeout,
    };
    (Emitter { tx, shared }, flush)
}

/// One log event being packed.
#[derive(Debug)]
struct Pack {
    stream: LogStream,
    lines: Vec<String>,
    bytes: usize,
}

impl Pack {
    fn new(stream: LogStream, line: String) -> Self {
        Self {
            stream,
            bytes: line.len(),
            lines: vec![line],
        }
    }

    /// Adds the line if it fits; gives it back if not.
    fn add(&mut self, stream: LogStream, line: String, max: usize) -> Option<String> {
        if stream == self.stream && self.bytes + 1 + line.len() <= max {
            self.bytes += 1 + line.len();
            self.lines.push(line);
            None
        } else {
            Some(line)
        }
    }
}

/// What became of one event.
enum Sent {
    Stored,
    /// Refused for good, with the reason.
    Refused(String),
    /// The flush timed out first.
    GaveUp,
}

struct Publishing {
    publisher: Publisher,
    tower: Tower,
    template: proto::Event,
    shared: Arc<Shared>,
    give_up: CancellationToken,
    /// Events of each kind so far: their `Nats-Msg-Id` numbers.
    logs: u64,
    progresses: u64,
    /// Lines not published because the flush timed out.
    unpublished: u64,
    last_error: Option<String>,
}

impl Publishing {
    async fn run(mut self, mut rx: mpsc::Receiver<Emit>, close: CancellationToken) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let first = tokio::select! {
                // Why biased: what is queued goes out before closing is noticed (closing
                // only stops new output from coming in).
                biased;
                item = rx.recv() => item,
                _ = close.cancelled(), if !rx.is_closed() => {
                    self.shared.tally().closed = true;
                    rx.close();
                    continue;
                }
            };
            let Some(first) = first else { break };
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            self.publish_batch(batch.drain(..)).await;
            if rx.is_empty() {
                self.pending().await;
            }
        }
        self.pending().await;
        self.last_words().await;
    }

    /// Publishes in order: progress coalesced to the latest, consecutive lines of one stream
    /// packed.
    async fn publish_batch(&mut self, batch: impl ExactSizeIterator<Item = Emit>) {
        let batch: Vec<Emit> = batch.collect();
        let last_progress = batch.iter().rposition(|e| matches!(e, Emit::Progress(_)));
        let mut pack: Option<Pack> = None;
        for (i, emit) in batch.into_iter().enumerate() {
            match emit {
                Emit::Progress(_) if Some(i) != last_progress => {}
                Emit::Progress(p) => {
                    self.publish_pack(pack.take()).await;
                    self.publish_progress(p).await;
                }
                Emit::Log(stream, line) => self.pack_line(&mut pack, stream, line).await,
                Emit::BudgetReached => {
                    self.publish_pack(pack.take()).await;
                    self.budget_reached().await;
                }
            }
        }
        self.publish_pack(pack).await;
    }

    /// What missed the queue: the budget notice, the latest progress.
    async fn pending(&mut self) {
        let (budget, progress) = {
            let mut t = self.shared.tally();
            (std::mem::take(&mut t.budget_notice), t.progress.take())
        };
        if budget {
            self.budget_reached().await;
        }
        if let Some(p) = progress {
            self.publish_progress(p).await;
        }
    }

    async fn budget_reached(&mut self) {
        let limits = &self.shared.limits;
        let text = format!(
            "rct: output budget reached ({} lines or {} bytes): later lines are counted, and \
             the last {} recorded when the command ends",
            limits.max_lines, limits.max_bytes, limits.tail_lines
        );
        self.notice(text).await;
    }

    /// The end of the output: the tail of an output over budget, and what was not recorded.
    async fn last_words(&mut self) {
        let (tail, elided_lines, elided_bytes, overflow, late) = {
            let mut t = self.shared.tally();
            (
                std::mem::take(&mut t.tail),
                t.elided_lines,
                t.elided_bytes,
                t.overflow,
                t.late,
            )
        };
        if elided_lines > 0 {
            let limits = &self.shared.limits;
            self.notice(format!(
                "rct: {elided_lines} lines elided ({elided_bytes} bytes): over the output \
                 budget of {} lines or {} bytes; the last {} follow",
                limits.max_lines,
                limits.max_bytes,
                tail.len()
            ))
            .await;
        }
        let mut pack: Option<Pack> = None;
        for (stream, line) in tail {
            self.pack_line(&mut pack, stream, line).await;
        }
        self.publish_pack(pack).await;
        if overflow > 0 {
            self.notice(format!(
                "rct: {overflow} lines dropped: logged while the queue of {} was full \
                 (Context::send_log waits for room instead)",
                self.shared.limits.queue
            ))
            .await;
        }
        if late > 0 {
            self.notice(format!(
                "rct: {late} lines dropped: written after the handler ended"
            ))
            .await;
        }
        if self.unpublished > 0 {
            let text = format!(
                "rct: {} lines not published within output.flush_timeout ({}): {}",
                self.unpublished,
                humantime::format_duration(self.shared.limits.flush_timeout),
                self.last_error.as_deref().unwrap_or("no acknowledgement")
            );
            let kind = self.log_kind(LogStream::Agent, self.shared.bound(&text, 0));
            let n = self.next_log();
            // Past the deadline: this one event gets LAST_WORD, and no more.
            let event = self.event(kind);
            let _ =
                tokio::time::timeout(LAST_WORD, publish(&self.publisher, &self.tower, &event, n))
                    .await;
        }
    }

    async fn publish_progress(&mut self, p: proto::Progress) {
        self.progresses += 1;
        let n = self.progresses;
        if let Sent::Refused(reason) = self.send(Kind::Progress(p), n).await {
            self.notice(format!("rct: dropped a progress event: {reason}"))
                .await;
        }
    }

    /// Adds `line` to the event being packed; one that does not fit (another stream, or
    /// the event is full) publishes the pack and starts the next.
    async fn pack_line(&mut self, pack: &mut Option<Pack>, stream: LogStream, line: String) {
        let rest = match pack {
            Some(p) => p.add(stream, line, self.shared.limits.max_event),
            None => Some(line),
        };
        if let Some(line) = rest {
            self.publish_pack(pack.take()).await;
            *pack = Some(Pack::new(stream, line));
        }
    }

    async fn publish_pack(&mut self, pack: Option<Pack>) {
        let Some(pack) = pack else { return };
        let count = pack.lines.len() as u64;
        let kind = self.log_kind(pack.stream, pack.lines.join("\n"));
        let n = self.next_log();
        match self.send(kind, n).await {
            Sent::Stored => {}
            Sent::GaveUp => self.unpublished += count,
            // One line at a time, so that a line the stream refuses takes none of its
            // neighbours with it.
            Sent::Refused(_) if count > 1 => {
                for line in pack.lines {
                    self.publish_line(pack.stream, line).await;
                }
            }
            Sent::Refused(reason) => self.dropped(pack.bytes, &reason).await,
        }
    }

    async fn publish_line(&mut self, stream: LogStream, line: String) {
        let bytes = line.len();
        let kind = self.log_kind(stream, line);
        let n = self.next_log();
        match self.send(kind, n).await {
            Sent::Stored => {}
            Sent::GaveUp => self.unpublished += 1,
            Sent::Refused(reason) => self.dropped(bytes, &reason).await,
        }
    }

    async fn dropped(&mut self, bytes: usize, reason: &str) {
        self.notice(format!(
            "rct: dropped a log event ({bytes} bytes of lines): {reason}"
        ))
        .await;
    }

    /// A note about the output itself; one the stream refuses too is only logged here.
    async fn notice(&mut self, text: String) {
        let kind = self.log_kind(LogStream::Agent, self.shared.bound(&text, 0));
        let n = self.next_log();
        if let Sent::Refused(reason) = self.send(kind, n).await {
            tracing::warn!(command_id = %self.template.command_id, %reason, note = %text, "cannot record a note about the output");
        }
    }

    fn log_kind(&self, stream: LogStream, line: String) -> Kind {
        Kind::Log(proto::Log {
            stream: stream as i32,
            line,
            undone_by: String::new(),
        })
    }

    fn next_log(&mut self) -> u64 {
        self.logs += 1;
        self.logs
    }

    fn event(&self, kind: Kind) -> proto::Event {
        proto::Event {
            at: Some(from_datetime(OffsetDateTime::now_utc())),
            kind: Some(kind),
            ..self.template.clone()
        }
    }

    /// Publishes event `n` of its kind: stored, refused for good, or given up on once the
    /// flush timed out. Unacknowledged publishes are retried with the same id until then.
    async fn send(&mut self, kind: Kind, n: u64) -> Sent {
        let event = self.event(kind);
        loop {
            if self.give_up.is_cancelled() {
                return Sent::GaveUp;
            }
            let result = tokio::select! {
                result = self.publisher.event(&self.tower, &event, n) => result,
                _ = self.give_up.cancelled() => return Sent::GaveUp,
            };
            let error = match result {
                Ok(_) => return Sent::Stored,
                Err(e) if refused(&e) => return Sent::Refused(e.to_string()),
                Err(e) => e,
            };
            tracing::warn!(command_id = %event.command_id, kind = EventKind::of(&event).map_or("event", EventKind::as_str), %error, "cannot publish; retrying");
            self.last_error = Some(error.to_string());
            tokio::select! {
                _ = tokio::time::sleep(RETRY_PAUSE) => {}
                _ = self.give_up.cancelled() => return Sent::GaveUp,
            }
        }
    }
}

/// Whether publishing this message again can never succeed: the client or the server
/// refused it for what it is (larger than `max_payload` or the stream's `max_msg_size`, an
/// invalid subject or event), not for the state it is in. Unacknowledged publishes, no
/// stream answering, and a server short of resources or of a leader are worth retrying.
pub(crate) fn refused(error: &rct_streams::Error) -> bool {
    match error {
        rct_streams::Error::Publish { cause, .. } => match cause.kind() {
            PublishErrorKind::TimedOut
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::MaxAckPending => false,
            PublishErrorKind::Other => !std::error::Error::source(cause)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                .is_some_and(|e| {
                    matches!(
                        e.error_code(),
                        ErrorCode::INSUFFICIENT_RESOURCES
                            | ErrorCode::STREAM_STORE_FAILED
                            | ErrorCode::CLUSTER_NOT_ACTIVE
                            | ErrorCode::CLUSTER_NOT_ASSIGNED
                            | ErrorCode::CLUSTER_NOT_AVAILABLE
                            | ErrorCode::CLUSTER_NOT_LEADER
                    )
                }),
            _ => true,
        },
        rct_streams::Error::InvalidEvent { .. } => true,
        _ => false,
    }
}

/// Publishes one event, its texts bounded, until it is stored or refused for good (then it
/// is logged here and given up: retrying could never store it).
pub(crate) async fn publish(publisher: &Publisher, tower: &Tower, event: &proto::Event, n: u64) {
    let kind = EventKind::of(event).map_or("event", EventKind::as_str);
    let event = proto::Event {
        kind: event
            .kind
            .clone()
            .map(|k| bound_kind(k, &[], &Output::default())),
        ..event.clone()
    };
    loop {
        match publisher.event(tower, &event, n).await {
            Ok(_) => return,
            Err(e) if refused(&e) => {
                tracing::error!(command_id = %event.command_id, kind, error = %e, "cannot publish, ever; dropped");
                return;
            }
            Err(e) => {
                tracing::warn!(command_id = %event.command_id, kind, error = %e, "cannot publish; retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// An event body with every text masked and held to `limits.max_line`: what an outcome must
/// go through before it is published.
pub(crate) fn bound_kind(kind: Kind, secrets: &[String], limits: &Output) -> Kind {
    let b = |text: String| bound(&text, 0, secrets, limits.max_line);
    match kind {
        Kind::Progress(p) => Kind::Progress(proto::Progress {
            percent: p.percent,
            step: b(p.step),
            message: b(p.message),
        }),
        Kind::Log(l) => Kind::Log(proto::Log {
            stream: l.stream,
            line: bound(&l.line, 0, secrets, limits.max_event),
            undone_by: String::new(),
        }),
        Kind::Succeeded(s) => Kind::Succeeded(proto::Succeeded {
            summary: b(s.summary),
            outputs: s.outputs.into_iter().map(|(k, v)| (b(k), b(v))).collect(),
        }),
        Kind::Failed(f) => Kind::Failed(proto::Failed {
            code: b(f.code),
            message: b(f.message),
            approved_plan: f.approved_plan.map(|p| bound_plan(p, secrets, limits)),
            fresh_plan: f.fresh_plan.map(|p| bound_plan(p, secrets, limits)),
        }),
        Kind::Plan(p) => Kind::Plan(bound_plan(p, secrets, limits)),
        Kind::Cancelled(c) => Kind::Cancelled(proto::Cancelled {
            reason: b(c.reason),
        }),
        Kind::Unknown(u) => Kind::Unknown(proto::Unknown {
            reason: b(u.reason),
        }),
        other => other,
    }
}

/// A plan with every text masked and held to `limits.max_line`, and made printable as
/// readers make it: the plan a command carries and the one its handler makes again are
/// compared in this form.
pub(crate) fn bound_plan(plan: proto::Plan, secrets: &[String], limits: &Output) -> proto::Plan {
    let b = |text: String| bound(&text, 0, secrets, limits.max_line);
    let mut event = proto::Event {
        kind: Some(Kind::Plan(proto::Plan {
            summary: b(plan.summary),
            changes: plan
                .changes
                .into_iter()
                .map(|c| proto::Change {
                    action: b(c.action),
                    resource: b(c.resource),
                    detail: b(c.detail),
                })
                .collect(),
        })),
        ..Default::default()
    };
    rct_bus::text::make_printable(&mut event);
    match event.kind {
        Some(Kind::Plan(plan)) => plan,
        _ => unreachable!("a plan stays a plan"),
    }
}

/// `text` with secrets masked and cut to `max` bytes, ending `…truncated N bytes` when
/// anything was cut (`cut`: bytes already cut before it came here).
fn bound(text: &str, cut: u64, secrets: &[String], max: usize) -> String {
    // Mask only what can be kept, plus room for a secret that starts before the cut.
    let longest = secrets.iter().map(String::len).max().unwrap_or(0);
    let head = floor_char_boundary(text, max.saturating_add(longest));
    let masked = mask(&text[..head], secrets);
    let keep = floor_char_boundary(&masked, max);
    let cut = cut + (text.len() - head) as u64 + (masked.len() - keep) as u64;
    if cut == 0 {
        masked
    } else {
        format!("{}…truncated {cut} bytes", &masked[..keep])
    }
}

/// The largest index at most `max` that is a character boundary of `text`.
fn floor_char_boundary(text: &str, max: usize) -> usize {
    if max >= text.len() {
        return text.len();
    }
    // A character is at most 4 bytes: one of these is a boundary.
    (max.saturating_sub(3)..=max)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

/// The shortest line of a secret of several lines that is masked on its own.
const SHORTEST_LINE: usize = 4;

/// What to mask for one secret value, longest first: the value and its common encodings, and,
/// for a value of several lines (a key, a kubeconfig), which output reaches the agent line by
/// line, each of its lines of at least [`SHORTEST_LINE`] characters and their encodings. Best
/// effort on top of the encryption that keeps the value out of the streams: a script that
/// prints it some other way is not caught.
pub(crate) fn forms(value: &str) -> Vec<String> {
    let mut forms = encodings(value);
    if value.contains('\n') {
        value
            .lines()
            .map(|line| line.trim_end_matches('\r'))
            .filter(|line| line.trim().chars().count() >= SHORTEST_LINE)
            .for_each(|line| forms.extend(encodings(line)));
    }
    forms.retain(|f| !f.is_empty());
    forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    forms.dedup();
    forms
}

/// `value` and the forms scripts commonly print it in: base64 (standard and URL-safe, padded or
/// not, and as part of a longer base64 text at any alignment, as in HTTP Basic credentials),
/// percent-encoding (every common character set, upper- and lower-case hex, `+` for spaces),
/// JSON string escapes (with and without `\u` for non-ASCII), hex.
fn encodings(value: &str) -> Vec<String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    if value.is_empty() {
        return Vec::new();
    }
    // RFC 3986's unreserved characters, which most encoders keep; a path keeps `/` as well.
    const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    const PATH: &AsciiSet = &COMPONENT.remove(b'/');
    const JAVASCRIPT: &AsciiSet = &COMPONENT
        .remove(b'!')
        .remove(b'*')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')');
    let bytes = value.as_bytes();
    let mut forms = vec![value.to_owned()];
    for engine in [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
        forms.push(engine.encode(bytes));
    }
    // Inside a longer base64 text the value starts 0, 1 or 2 bytes into a group: what encodes
    // its bytes alone, without the characters shared with its neighbours.
    for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
        for offset in 0..3usize {
            let mut shifted = vec![0u8; offset];
            shifted.extend_from_slice(bytes);
            let encoded = engine.encode(&shifted);
            let skip = [0, 2, 3][offset];
            let known = shifted.len() * 8 / 6;
            if known >= skip + SHORTEST_LINE {
                forms.push(encoded[skip..known].to_owned());
            }
        }
    }
    for set in [NON_ALPHANUMERIC, COMPONENT, PATH, JAVASCRIPT] {
        let percent = utf8_percent_encode(value, set).to_string();
        forms.push(percent.replace("%20", "+"));
        forms.push(lower_hex(&percent));
        forms.push(percent);
    }
    let json = serde_json::to_string(value).expect("a string serializes");
    let json = json[1..json.len() - 1].to_owned();
    forms.push(
        json.chars()
            .flat_map(|c| {
                let mut units = [0u16; 2];
                let escaped: Vec<String> = if c.is_ascii() {
                    vec![c.to_string()]
                } else {
                    c.encode_utf16(&mut units)
                        .iter()
                        .map(|u| format!("\\u{u:04x}"))
                        .collect()
                };
                escaped
            })
            .collect(),
    );
    forms.push(json);
    forms.push(bytes.iter().map(|b| format!("{b:02x}")).collect());
    forms.push(bytes.iter().map(|b| format!("{b:02X}")).collect());
    forms
}

/// `text` with the hex digits of its `%XX` escapes in lower case.
fn lower_hex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut escape = 0;
    for c in text.chars() {
        if c == '%' {
            escape = 2;
            out.push(c);
        } else if escape > 0 {
            escape -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `text` with every secret value replaced by `***`.
pub(crate) fn mask(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_owned(), |text, secret| {
            text.replace(secret.as_str(), MASK)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_of_a_secret_are_masked_too() {
        let value = "p@ss w/rd+é\"\\1";
        let all = forms(value);
        // As Python prints them: base64.b64encode, urllib.parse.quote (keeps /) and
        // quote(safe=''), quote_plus, json.dumps (ensure_ascii) and without, bytes.hex(),
        // a lower-case escape, and HTTP Basic credentials (base64 of "user:" + value).
        let printed = [
            value,
            "cEBzcyB3L3JkK8OpIlwx",
            "p%40ss%20w/rd%2B%C3%A9%22%5C1",
            "p%40ss%20w%2Frd%2B%C3%A9%22%5C1",
            "p%40ss+w%2Frd%2B%C3%A9%22%5C1",
            "p%40ss%20w%2frd%2b%c3%a9%22%5c1",
            r#"p@ss w/rd+\u00e9\"\\1"#,
            r#"p@ss w/rd+é\"\\1"#,
            "7040737320772f72642bc3a9225c31",
        ];
        for shown in printed {
            let line = format!("token={shown};");
            assert_eq!(mask(&line, &all), "token=***;", "{shown}");
        }
        // dXNlcjpwQHNzIHcvcmQrw6kiXDE= is base64("user:" + value): the part that encodes the
        // value alone is masked, whatever precedes it.
        let basic = mask("Authorization: Basic dXNlcjpwQHNzIHcvcmQrw6kiXDE=", &all);
        assert!(!basic.contains("cEBzcyB3L3JkK8OpIlwx"), "{basic}");
        assert!(!basic.contains("wQHNzIHcvcmQrw6kiXD"), "{basic}");
        let short = forms("ab");
        assert_eq!(mask("YWI= YWI 6162", &short), "*** *** ***");
        assert!(forms("").is_empty());
    }

    /// A value of several lines reaches the agent line by line: each line is masked.
    #[test]
    fn every_line_of_a_secret_of_several_lines_is_masked() {
        let value = "-----BEGIN KEY-----\nline-two-BBB \"q\" \\ x\r\nab\n-----END KEY-----\n";
        let all = forms(value);
        for line in [
            "line-two-BBB \"q\" \\ x",
            "-----BEGIN KEY-----",
            "-----END KEY-----",
        ] {
            assert_eq!(mask(&format!("> {line} <"), &all), "> *** <", "{line}");
        }
        // Two characters mean nothing alone: not masked, so output stays readable.
        assert_eq!(mask("ab", &all), "ab");
    }

    #[test]
    fn secrets_are_masked_wherever_they_appear() {
        let secrets = vec!["hunter2".to_owned(), String::new()];
        assert_eq!(
            mask("password=hunter2 again hunter2", &secrets),
            "password=*** again ***"
        );
        assert_eq!(mask("nothing here", &secrets), "nothing here");
    }

    #[test]
    fn long_text_is_cut_with_a_marker_that_counts_what_was_cut() {
        assert_eq!(bound("short", 0, &[], 10), "short");
        assert_eq!(
            bound("0123456789abc", 0, &[], 10),
            "0123456789…truncated 3 bytes"
        );
        // Bytes a reader already left out are counted too.
        assert_eq!(bound("0123", 96, &[], 10), "0123…truncated 96 bytes");
        // Never inside a character: "é" is two bytes.
        assert_eq!(bound("aé", 0, &[], 2), "a…truncated 2 bytes");
        assert_eq!(bound("ééé", 0, &[], 0), "…truncated 6 bytes");
    }

    #[test]
    fn a_secret_across_the_cut_is_masked_before_cutting() {
        let secrets = vec!["hunter2".to_owned()];
        let cut = bound("xxxxhunter2yyyy", 0, &secrets, 6);
        assert!(!cut.contains("hun"), "{cut}");
        assert!(cut.starts_with("xxxx**"), "{cut}");
    }

    #[test]
    fn lines_pack_up_to_the_event_size_and_never_across_streams() {
        let mut pack = Pack::new(LogStream::Stdout, "aaaa".into());
        assert_eq!(pack.add(LogStream::Stdout, "bbbb".into(), 10), None);
        assert_eq!(pack.bytes, 9);
        assert_eq!(
            pack.add(LogStream::Stdout, "cc".into(), 10),
            Some("cc".into())
        );
        assert_eq!(
            pack.add(LogStream::Stderr, "c".into(), 100),
            Some("c".into())
        );
        assert_eq!(pack.lines.join("\n"), "aaaa\nbbbb");
    }

    fn shared(limits: Output) -> Shared {
        Shared {
            limits,
            secrets: Vec::new(),
            tally: Mutex::default(),
        }
    }

    #[test]
    fn the_budget_keeps_the_head_and_the_tail_and_counts_the_rest() {
        let s = shared(Output {
            max_lines: 3,
            tail_lines: 2,
            ..Output::default()
        });
        let mut queued = Vec::new();
        for i in 0..10 {
            queued.push(s.admit(LogStream::Stdout, &format!("line {i}"), 0));
        }
        let lines: Vec<String> = queued
            .iter()
            .filter_map(|e| match e {
                Some(Emit::Log(_, l)) => Some(l.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(lines, ["line 0", "line 1", "line 2"]);
        assert!(matches!(queued[3], Some(Emit::BudgetReached)));
        assert!(queued[4..].iter().all(Option::is_none));
        let t = s.tally();
        assert_eq!(t.elided_lines, 5);
        assert_eq!(t.elided_bytes, 30);
        let tail: Vec<&str> = t.tail.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(tail, ["line 8", "line 9"]);
    }

    #[test]
    fn the_byte_budget_counts_recorded_bytes() {
        let s = shared(Output {
            max_bytes: 10,
            tail_lines: 0,
            ..Output::default()
        });
        assert!(matches!(
            s.admit(LogStream::Stdout, "12345", 0),
            Some(Emit::Log(..))
        ));
        assert!(matches!(
            s.admit(LogStream::Stdout, "67890", 0),
            Some(Emit::Log(..))
        ));
        assert!(matches!(
            s.admit(LogStream::Stdout, "x", 0),
            Some(Emit::BudgetReached)
        ));
        assert_eq!(s.tally().elided_lines, 1);
    }

    #[test]
    fn outcomes_are_masked_and_bounded() {
        let limits = Output {
            max_line: 256,
            ..Output::default()
        };
        let long = format!("hunter2 {}", "z".repeat(1000));
        let Kind::Failed(f) = bound_kind(
            Kind::Failed(proto::Failed {
                code: "x".into(),
                message: long,
                ..Default::default()
            }),
            &["hunter2".to_owned()],
            &limits,
        ) else {
            unreachable!()
        };
        assert!(f.message.starts_with("*** zzz"));
        assert!(f.message.ends_with("…truncated 748 bytes"), "{}", f.message);
    }

    #[test]
    fn refusals_for_what_a_message_is_are_never_retried() {
        use async_nats::jetstream::context::PublishError;
        let publish = |kind| rct_streams::Error::Publish {
            subject: "s".into(),
            cause: PublishError::new(kind),
        };
        assert!(refused(&publish(PublishErrorKind::MaxPayloadExceeded)));
        assert!(refused(&publish(PublishErrorKind::Other)));
        assert!(!refused(&publish(PublishErrorKind::TimedOut)));
        assert!(!refused(&publish(PublishErrorKind::StreamNotFound)));
    }
}
