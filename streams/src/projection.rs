//! `CommandState`: a command's lifecycle folded from its events. Pure, no I/O.
//!
//! Folding rule, whatever order or repetition the events come in:
//! - the phase only moves forward (pending → admitted → running → terminal), and the first
//!   terminal event (a rejection or an outcome) fixes it for good;
//! - single-slot facts (the decision, the claim, the outcome) are taken the first time they
//!   are seen and never replaced, so a duplicate changes nothing;
//! - progress is the one with the highest stream sequence, so a late or repeated progress
//!   event never hides a newer one.
//!
//! So applying a record twice, or records in another order, gives the same state.
//!
//! A command's events are those at its own tower and target (the event subject names both):
//! the decision's, and written by whoever may write them (a reader that checks signatures
//! gives each record its [`rct_bus::provenance::Provenance`]). What is written under its id elsewhere (by a writer
//! with the grants of another target or tower), unsigned or signed by someone not entitled
//! to it, is not its history: it changes nothing but `elsewhere`.
//! Before the decision is seen, the first event's place is taken; a decision at another one
//! starts the state again from the decision.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use rct_bus::proto::{self, event::Kind};
use rct_bus::{CommandId, EventKind, Target, Tower};
use time::OffsetDateTime;

use crate::replay::Record;
use crate::timestamp::to_datetime;

/// Where a command is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Events were seen, but no decision yet (it may be waiting for approvals: see
    /// [`CommandState::pending`]).
    Pending,
    /// Admission admitted it; no agent has claimed it yet.
    Admitted,
    /// An agent claimed it and is running it.
    Running,
    /// Admission refused it.
    Rejected,
    /// The handler reported success.
    Succeeded,
    /// The handler reported failure.
    Failed,
    /// No agent started it before its deadline.
    Expired,
    /// It was cancelled.
    Cancelled,
    /// The agent that started it stopped before reporting an outcome; it is never re-run.
    Unknown,
}

impl Phase {
    /// Whether nothing more will happen to the command.
    pub fn is_terminal(self) -> bool {
        self.rank() == 3
    }

    /// Whether the operation did what was asked.
    pub fn is_success(self) -> bool {
        self == Phase::Succeeded
    }

    fn rank(self) -> u8 {
        match self {
            Phase::Pending => 0,
            Phase::Admitted => 1,
            Phase::Running => 2,
            Phase::Rejected
            | Phase::Succeeded
            | Phase::Failed
            | Phase::Expired
            | Phase::Cancelled
            | Phase::Unknown => 3,
        }
    }

    fn of(kind: &Kind) -> Option<Phase> {
        Some(match kind {
            Kind::Rejected(_) => Phase::Rejected,
            Kind::Admitted(_) => Phase::Admitted,
            // Claimed only to be ended without running: its outcome follows.
            Kind::Started(s) if s.without_running => return None,
            Kind::Started(_) => Phase::Running,
            Kind::Succeeded(_) => Phase::Succeeded,
            Kind::Failed(_) => Phase::Failed,
            Kind::Expired(_) => Phase::Expired,
            Kind::Cancelled(_) => Phase::Cancelled,
            Kind::Unknown(_) => Phase::Unknown,
            Kind::Pending(_)
            | Kind::Approval(_)
            | Kind::Progress(_)
            | Kind::Log(_)
            | Kind::Plan(_)
            | Kind::CancelRequested(_) => {
                return None;
            }
        })
    }

    /// The lowercase word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Admitted => "admitted",
            Phase::Running => "running",
            Phase::Rejected => "rejected",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Expired => "expired",
            Phase::Cancelled => "cancelled",
            Phase::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything known about one command from its events.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandState {
    /// The command.
    pub command_id: CommandId,
    /// `<tower>/<op>`, from the first event that names it.
    pub operation: String,
    /// The target, from the first event that names it.
    pub target: String,
    /// Where it is in its lifecycle.
    pub phase: Phase,
    /// The request as admission recorded it (operator, justification, masked parameters).
    pub request: Option<proto::Request>,
    /// The decision event: `Admitted` or `Rejected`.
    pub decision: Option<Kind>,
    /// When admission decided.
    pub decided_at: Option<OffsetDateTime>,
    /// The claim.
    pub started: Option<proto::Started>,
    /// When the claim was written.
    pub started_at: Option<OffsetDateTime>,
    /// The latest progress.
    pub progress: Option<proto::Progress>,
    /// Who asked to cancel it, if anyone did.
    pub cancel_requested: Option<proto::CancelRequested>,
    /// The request as it waited for approvals, when its operation needs them.
    pub pending: Option<proto::Pending>,
    /// Approvals and denials, in the order recorded.
    pub approvals: Vec<proto::Approval>,
    /// The terminal outcome event.
    pub outcome: Option<Kind>,
    /// When the outcome was written.
    pub ended_at: Option<OffsetDateTime>,
    /// Why an agent refused it (the latest refusal note on its timeline, see
    /// [`rct_bus::refusal_note`]), until it is claimed.
    pub refused: Option<String>,
    /// That refusal dropped the copy: nothing will run it, although no outcome says so (a
    /// refusal for now, of a key not trusted yet, is delivered again until the deadline).
    pub refused_for_good: bool,
    /// Something was written under its id that is not its history (at another target than
    /// its own, or not signed by its entitled writer), and not applied: readers flag it as
    /// UNVERIFIED (see [`CommandState::doubt`]).
    pub elsewhere: bool,
    /// The lowest stream sequence applied.
    pub first_sequence: u64,
    /// The highest stream sequence applied.
    pub last_sequence: u64,
    progress_sequence: u64,
    /// The tower and target its events are at, from the first one applied.
    place: Option<(Tower, Target)>,
}

impl CommandState {
    /// A command about which nothing is known yet.
    pub fn new(command_id: CommandId) -> Self {
        Self {
            command_id,
            operation: String::new(),
            target: String::new(),
            phase: Phase::Pending,
            request: None,
            decision: None,
            decided_at: None,
            started: None,
            started_at: None,
            progress: None,
            cancel_requested: None,
            pending: None,
            approvals: Vec::new(),
            outcome: None,
            ended_at: None,
            refused: None,
            refused_for_good: false,
            elsewhere: false,
            first_sequence: 0,
            last_sequence: 0,
            progress_sequence: 0,
            place: None,
        }
    }

    /// Folds `records` of one command (others are ignored); `None` if there are none.
    pub fn fold<'a>(records: impl IntoIterator<Item = &'a Record>) -> Option<Self> {
        let mut state: Option<Self> = None;
        for record in records {
            state
                .get_or_insert_with(|| Self::new(record.command_id))
                .apply(record);
        }
        state
    }

    /// Applies one event (see the module's folding rule). Events of other commands are
    /// ignored.
    pub fn apply(&mut self, record: &Record) {
        if self.disowned(record) {
            return;
        }
        self.fold_in(
            record.sequence,
            record.command_id,
            (&record.tower, &record.target),
            record.kind,
            Cow::Borrowed(&record.event),
        );
    }

    /// [`CommandState::apply`], taking the record: what the state keeps is moved, not copied
    /// (for folding long histories).
    pub fn absorb(&mut self, record: Record) {
        if self.disowned(&record) {
            return;
        }
        let place = (record.tower, record.target);
        self.fold_in(
            record.sequence,
            record.command_id,
            (&place.0, &place.1),
            record.kind,
            Cow::Owned(record.event),
        );
    }

    fn fold_in(
        &mut self,
        sequence: u64,
        command_id: CommandId,
        (tower, target): (&Tower, &Target),
        slot: EventKind,
        event: Cow<'_, proto::Event>,
    ) {
        if command_id != self.command_id {
            return;
        }
        if let Some((t, g)) = &self.place
            && (t != tower || g != target)
        {
            if slot != EventKind::Decision || self.decision.is_some() {
                self.elsewhere = true;
                return;
            }
            *self = Self::new(command_id);
            self.elsewhere = true;
        }
        if self.place.is_none() {
            self.place = Some((tower.clone(), target.clone()));
        }
        self.last_sequence = self.last_sequence.max(sequence);
        if self.first_sequence == 0 || sequence < self.first_sequence {
            self.first_sequence = sequence;
        }
        if self.operation.is_empty() {
            self.operation.clone_from(&event.operation);
        }
        if self.target.is_empty() {
            self.target.clone_from(&event.target);
        }
        let at = event.at.as_ref().and_then(to_datetime);
        if let Some(note) = rct_bus::refusal_note(&event)
            && self.started.is_none()
        {
            self.refused = Some(note.reason.to_owned());
            self.refused_for_good = note.dropped;
        }
        let Some(phase) = event.kind.as_ref().map(Phase::of) else {
            return;
        };
        // Only what is kept is taken out of the event (moved when owned, copied when borrowed).
        let keep = match slot {
            EventKind::Decision => self.decision.is_none(),
            EventKind::Claim => self.started.is_none(),
            EventKind::Progress => sequence > self.progress_sequence,
            EventKind::Cancel => self.cancel_requested.is_none(),
            EventKind::Pending => self.pending.is_none(),
            EventKind::Approval => true,
            EventKind::Outcome => self.outcome.is_none() && !self.phase.is_terminal(),
            _ => false,
        };
        if keep {
            let kind = match event {
                Cow::Owned(e) => e.kind,
                Cow::Borrowed(e) => e.kind.clone(),
            };
            match (slot, kind) {
                (EventKind::Decision, Some(kind)) => {
                    self.request = match &kind {
                        Kind::Admitted(a) => a.request.clone(),
                        Kind::Rejected(r) => r.request.clone(),
                        _ => None,
                    };
                    self.decision = Some(kind);
                    self.decided_at = at;
                }
                (EventKind::Claim, Some(Kind::Started(started))) => {
                    self.refused = None;
                    self.refused_for_good = false;
                    self.started = Some(started);
                    self.started_at = at;
                }
                (EventKind::Progress, Some(Kind::Progress(progress))) => {
                    self.progress = Some(progress);
                    self.progress_sequence = sequence;
                }
                (EventKind::Cancel, Some(Kind::CancelRequested(cancel))) => {
                    self.cancel_requested = Some(cancel);
                }
                (EventKind::Pending, Some(Kind::Pending(pending))) => {
                    if self.request.is_none() {
                        self.request.clone_from(&pending.request);
                    }
                    self.pending = Some(pending);
                }
                (EventKind::Approval, Some(Kind::Approval(approval))) => {
                    self.approvals.push(approval);
                }
                (EventKind::Outcome, Some(kind)) => {
                    self.outcome = Some(kind);
                    self.ended_at = at;
                }
                _ => {}
            }
        }

        if let Some(phase) = phase
            && !self.phase.is_terminal()
            && phase.rank() > self.phase.rank()
        {
            self.phase = phase;
        }
    }

    /// Marks a record of this command that does not count for who wrote it: not applied.
    fn disowned(&mut self, record: &Record) -> bool {
        let disowned = record.command_id == self.command_id && !record.provenance.counts();
        self.elsewhere |= disowned;
        disowned
    }

    /// Whether `record` is of this command's own history: at its tower and target, written
    /// by whoever may write it (see the module's folding rule).
    pub fn owns(&self, record: &Record) -> bool {
        self.doubt(record).is_none()
    }

    /// Why `record` is not of this command's own history, for people; `None` if it is.
    pub fn doubt(&self, record: &Record) -> Option<String> {
        if record.command_id != self.command_id {
            return Some(format!("of command {}", record.command_id));
        }
        if let Some((t, g)) = &self.place
            && (*t != record.tower || *g != record.target)
        {
            return Some(format!("at {} {}", record.tower, record.target));
        }
        record.provenance.doubt()
    }

    /// How long it ran, from claim to outcome.
    pub fn duration(&self) -> Option<Duration> {
        let elapsed = self.ended_at? - self.started_at?;
        elapsed.try_into().ok()
    }

    /// The operator's identity, if the decision recorded it.
    pub fn operator(&self) -> Option<&proto::Operator> {
        self.request.as_ref()?.operator.as_ref()
    }

    /// By when an agent had to start it, as admission decided.
    pub fn deadline(&self) -> Option<OffsetDateTime> {
        match &self.decision {
            Some(Kind::Admitted(a)) => a.deadline.as_ref().and_then(to_datetime),
            _ => None,
        }
    }

    /// The command this one asks to cancel, when it is a cancel request.
    pub fn cancels(&self) -> Option<&str> {
        Some(self.request.as_ref()?.cancels.as_str()).filter(|c| !c.is_empty())
    }

    /// The command this one approves or denies, when it is an approval or a denial.
    pub fn approves(&self) -> Option<&str> {
        Some(self.request.as_ref()?.approves.as_str()).filter(|c| !c.is_empty())
    }

    /// The break-glass reason, when it was run by breaking the glass.
    pub fn break_glass(&self) -> Option<&str> {
        Some(self.request.as_ref()?.break_glass.as_str()).filter(|r| !r.is_empty())
    }

    /// Who reviewed it after the fact (a break-glass command), in order.
    pub fn reviewed_by(&self) -> Vec<&proto::Operator> {
        self.approvals
            .iter()
            .filter(|a| a.review)
            .filter_map(|a| a.by.as_ref())
            .collect()
    }

    /// Who approved the request as it waits (distinct approvers, of its digest), in the order
    /// they did.
    pub fn approved_by(&self) -> Vec<&proto::Operator> {
        let Some(pending) = &self.pending else {
            return Vec::new();
        };
        let mut seen = HashSet::new();
        self.approvals
            .iter()
            // A request that plans has its digest over the plan, which admission checked
            // each approval on record against.
            .filter(|a| !a.denied && !a.review)
            .filter(|a| !pending.plan_id.is_empty() || a.digest == pending.digest)
            .filter_map(|a| a.by.as_ref())
            .filter(|by| seen.insert(by.subject.clone()))
            .collect()
    }

    /// Whether the request asked for a dry run.
    pub fn dry_run(&self) -> bool {
        self.request.as_ref().is_some_and(|r| r.dry_run)
    }

    /// Whether nothing more will happen to it: it reached a terminal phase, or it is a cancel
    /// request, an approval or a denial that was admitted (its effect is recorded on the
    /// command it names), or a freeze started or ended (its decision is all of it).
    pub fn is_over(&self) -> bool {
        self.phase.is_terminal()
            || (self.phase == Phase::Admitted
                && (self.cancels().is_some()
                    || self.approves().is_some()
                    || self.request.as_ref().is_some_and(|r| r.freeze.is_some())))
    }
}

/// What [`Folder::absorb`] made of a record.
#[derive(Debug)]
pub enum Folded {
    /// Its command is still open.
    Open,
    /// Its command is over: the final state, no longer kept.
    Ended(Box<CommandState>),
    /// The first record seen of a command whose decision came before the window: give the
    /// decision to [`Folder::begin`], then the record again, to follow it.
    Unseen(Box<Record>),
    /// A record of a command that is already over, of one no decision names, or one its
    /// entitled writer did not sign for a command not followed: ignored.
    Late,
}

/// Folds a window of the event stream into commands, keeping state only for the open ones:
/// each command is handed back the moment it is over, so memory follows the commands in
/// flight, not the length of the window.
#[derive(Debug, Default)]
pub struct Folder {
    open: HashMap<CommandId, CommandState>,
    /// Commands recently over (bounded), so their late records are known as late.
    over: HashSet<CommandId>,
    over_order: VecDeque<CommandId>,
}

/// How many ended commands [`Folder`] remembers to recognise late records.
const REMEMBERED: usize = 65_536;

impl Folder {
    /// An empty folder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one record in.
    pub fn absorb(&mut self, record: Record) -> Folded {
        let id = record.command_id;
        let Some(state) = self.open.get_mut(&id) else {
            // What does not count starts nothing, and looks nothing up.
            if self.over.contains(&id) || !record.provenance.counts() {
                return Folded::Late;
            }
            // A request starts with its decision, or waits for approvals first.
            if !matches!(record.kind, EventKind::Decision | EventKind::Pending) {
                return Folded::Unseen(Box::new(record));
            }
            let mut state = CommandState::new(id);
            state.absorb(record);
            return self.keep_or_end(state);
        };
        state.absorb(record);
        if state.is_over() {
            let state = self.open.remove(&id).expect("just seen");
            return self.end(state);
        }
        Folded::Open
    }

    /// Starts following a command from its decision, read from before the window.
    pub fn begin(&mut self, decision: Record) -> Folded {
        let mut state = CommandState::new(decision.command_id);
        state.absorb(decision);
        self.keep_or_end(state)
    }

    /// [`Folder::begin`] for the first record of a command, [`Folder::absorb`] after.
    pub fn begin_or_absorb(&mut self, record: Record) -> Folded {
        if self.open.contains_key(&record.command_id) {
            self.absorb(record)
        } else {
            self.begin(record)
        }
    }

    /// Takes out the open commands `over` says are over (as if they had ended).
    pub fn take_where(&mut self, over: impl Fn(&CommandState) -> bool) -> Vec<CommandState> {
        let ids: Vec<CommandId> = self
            .open
            .values()
            .filter(|s| over(s))
            .map(|s| s.command_id)
            .collect();
        let mut taken = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(state) = self.open.remove(&id) {
                self.remember(id);
                taken.push(state);
            }
        }
        taken.sort_by_key(|s| s.first_sequence);
        taken
    }

    /// Marks a command as over without a state (its records are ignored from now on).
    pub fn ignore(&mut self, id: CommandId) {
        self.remember(id);
    }

    fn keep_or_end(&mut self, state: CommandState) -> Folded {
        if state.is_over() {
            return self.end(state);
        }
        self.open.insert(state.command_id, state);
        Folded::Open
    }

    fn end(&mut self, state: CommandState) -> Folded {
        self.remember(state.command_id);
        Folded::Ended(Box::new(state))
    }

    fn remember(&mut self, id: CommandId) {
        if self.over.insert(id) {
            self.over_order.push_back(id);
        }
        if self.over_order.len() > REMEMBERED
            && let Some(oldest) = self.over_order.pop_front()
        {
            self.over.remove(&oldest);
        }
    }

    /// How many commands are open.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// The commands still open, in the order they were first seen.
    pub fn into_open(self) -> Vec<CommandState> {
        let mut open: Vec<CommandState> = self.open.into_values().collect();
        open.sort_by_key(|s| s.first_sequence);
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timestamp::from_datetime;

    const ID: &str = "01JQ0000000000000000000000";

    fn record(sequence: u64, kind: Kind) -> Record {
        let command_id: CommandId = ID.parse().unwrap();
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000 + sequence as i64).unwrap();
        let event = proto::Event {
            command_id: ID.into(),
            at: Some(from_datetime(at)),
            source: "test".into(),
            operation: "traffic/drain-cluster".into(),
            target: "prod-1".into(),
            kind: Some(kind),
        };
        Record {
            sequence,
            published: at,
            tower: "traffic".parse().unwrap(),
            target: Target::of_event(&event.target),
            command_id,
            kind: EventKind::of(&event).unwrap(),
            event,
            trace: None,
            provenance: Default::default(),
        }
    }

    fn admitted() -> Kind {
        Kind::Admitted(proto::Admitted {
            request: Some(proto::Request {
                justification: "SRE-101".into(),
                operator: Some(proto::Operator {
                    subject: "alice".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn started() -> Kind {
        Kind::Started(proto::Started {
            agent: "a1".into(),
            host: "h".into(),
            target: "prod-1".into(),
            without_running: false,
        })
    }

    fn progress(percent: u32) -> Kind {
        Kind::Progress(proto::Progress {
            percent,
            step: format!("step {percent}"),
            message: String::new(),
        })
    }

    fn fold(records: &[Record]) -> CommandState {
        CommandState::fold(records).unwrap()
    }

    /// The same record, written at another target.
    fn at(target: &str, mut record: Record) -> Record {
        record.event.target = target.into();
        record.target = Target::of_event(target);
        record
    }

    /// What is written under a command's id at another target (another target's agent
    /// claiming it, ending it, asking to cancel it) is not its history.
    #[test]
    fn events_at_another_target_than_the_decisions_are_not_the_commands() {
        let state = fold(&[
            record(1, admitted()),
            at("prod-2", record(2, started())),
            at("prod-2", record(3, Kind::Succeeded(Default::default()))),
            at(
                "prod-2",
                record(4, Kind::CancelRequested(Default::default())),
            ),
            record(5, started()),
        ]);
        assert_eq!(state.phase, Phase::Running);
        assert_eq!(state.target, "prod-1");
        assert!(state.elsewhere);
        assert_eq!(state.started.as_ref().unwrap().agent, "a1");
        assert!(state.cancel_requested.is_none() && state.outcome.is_none());
        assert_eq!((state.first_sequence, state.last_sequence), (1, 5));
        assert!(!fold(&[record(1, admitted()), record(2, started())]).elsewhere);

        // Another tower's writer, on the same target.
        let mut dns = record(3, Kind::Succeeded(Default::default()));
        dns.tower = "dns".parse().unwrap();
        let state = fold(&[record(1, admitted()), record(2, started()), dns.clone()]);
        assert_eq!(state.phase, Phase::Running);
        assert!(state.elsewhere && !state.owns(&dns) && state.owns(&record(4, started())));

        // Written before the decision, at another target: dropped when the decision comes.
        let state = fold(&[
            at("prod-2", record(1, started())),
            at("prod-2", record(2, Kind::Failed(Default::default()))),
            record(3, admitted()),
        ]);
        assert_eq!(state.phase, Phase::Admitted);
        assert_eq!(state.target, "prod-1");
        assert!(state.elsewhere);
        assert!(state.started.is_none());
    }

    #[test]
    fn the_happy_path_ends_succeeded_with_a_duration() {
        let state = fold(&[
            record(1, admitted()),
            record(2, started()),
            record(3, progress(50)),
            record(5, Kind::Succeeded(Default::default())),
        ]);
        assert_eq!(state.phase, Phase::Succeeded);
        assert_eq!(state.operator().unwrap().subject, "alice");
        assert_eq!(state.started.as_ref().unwrap().agent, "a1");
        assert_eq!(state.progress.as_ref().unwrap().percent, 50);
        assert_eq!(state.duration(), Some(Duration::from_secs(3)));
        assert_eq!(state.operation, "traffic/drain-cluster");
        assert_eq!(state.target, "prod-1");
    }

    #[test]
    fn every_terminal_path_is_reached() {
        let reject = Kind::Rejected(proto::Rejected {
            code: proto::RejectionCode::Forbidden as i32,
            ..Default::default()
        });
        let cases = [
            (vec![record(1, reject)], Phase::Rejected),
            (
                vec![
                    record(1, admitted()),
                    record(2, Kind::Expired(Default::default())),
                ],
                Phase::Expired,
            ),
            (
                vec![
                    record(1, admitted()),
                    record(2, started()),
                    record(3, Kind::Failed(Default::default())),
                ],
                Phase::Failed,
            ),
            (
                vec![
                    record(1, admitted()),
                    record(2, started()),
                    record(3, Kind::CancelRequested(Default::default())),
                    record(4, Kind::Cancelled(Default::default())),
                ],
                Phase::Cancelled,
            ),
            (
                vec![
                    record(1, admitted()),
                    record(2, started()),
                    record(
                        3,
                        Kind::Unknown(proto::Unknown {
                            reason: "agent stopped".into(),
                        }),
                    ),
                ],
                Phase::Unknown,
            ),
            (vec![record(1, admitted())], Phase::Admitted),
            (
                vec![record(1, admitted()), record(2, started())],
                Phase::Running,
            ),
            (vec![record(1, progress(10))], Phase::Pending),
        ];
        for (records, phase) in cases {
            let state = fold(&records);
            assert_eq!(state.phase, phase, "{records:?}");
            assert_eq!(state.phase.is_terminal(), phase.rank() == 3);
        }
    }

    #[test]
    fn cancel_requests_are_remembered_even_if_it_succeeds() {
        let state = fold(&[
            record(1, admitted()),
            record(2, started()),
            record(3, Kind::CancelRequested(Default::default())),
            record(4, Kind::Succeeded(Default::default())),
        ]);
        assert_eq!(state.phase, Phase::Succeeded);
        assert!(state.cancel_requested.is_some());
    }

    #[test]
    fn duplicates_change_nothing() {
        let records = [
            record(1, admitted()),
            record(2, started()),
            record(3, progress(40)),
            record(4, Kind::Unknown(Default::default())),
        ];
        let once = fold(&records);
        let twice: Vec<Record> = records
            .iter()
            .flat_map(|r| [r.clone(), r.clone()])
            .collect();
        assert_eq!(fold(&twice), once);
        let mut again = once.clone();
        for r in &records {
            again.apply(r);
        }
        assert_eq!(again, once);
    }

    #[test]
    fn out_of_order_events_never_move_the_phase_back() {
        let in_order = fold(&[
            record(1, admitted()),
            record(2, started()),
            record(3, progress(30)),
            record(4, progress(60)),
            record(5, Kind::Succeeded(Default::default())),
        ]);
        let shuffled = fold(&[
            record(5, Kind::Succeeded(Default::default())),
            record(4, progress(60)),
            record(2, started()),
            record(3, progress(30)),
            record(1, admitted()),
        ]);
        assert_eq!(shuffled, in_order);
        assert_eq!(shuffled.progress.unwrap().percent, 60);
    }

    #[test]
    fn the_first_outcome_wins() {
        let state = fold(&[
            record(1, admitted()),
            record(2, started()),
            record(3, Kind::Unknown(Default::default())),
            record(4, Kind::Succeeded(Default::default())),
        ]);
        assert_eq!(state.phase, Phase::Unknown);
        assert!(matches!(state.outcome, Some(Kind::Unknown(_))));
    }

    #[test]
    fn absorbing_owned_records_gives_the_same_state() {
        let records = [
            record(1, admitted()),
            record(2, started()),
            record(3, progress(30)),
            record(4, Kind::CancelRequested(Default::default())),
            record(5, progress(60)),
            record(6, Kind::Succeeded(Default::default())),
        ];
        let borrowed = fold(&records);
        let mut owned = CommandState::new(ID.parse().unwrap());
        for r in records {
            owned.absorb(r);
        }
        assert_eq!(owned, borrowed);
    }

    #[test]
    fn an_agents_refusal_is_remembered_until_a_claim() {
        let note = |sequence| {
            record(
                sequence,
                Kind::Log(proto::Log {
                    stream: proto::LogStream::Agent as i32,
                    line: format!(
                        "{} agent x refused a copy: untrusted key",
                        rct_bus::REFUSAL_NOTE
                    ),
                    undone_by: String::new(),
                }),
            )
        };
        let state = fold(&[record(1, admitted()), note(2)]);
        assert_eq!(state.phase, Phase::Admitted);
        assert_eq!(
            state.refused.as_deref(),
            Some("agent x refused a copy: untrusted key")
        );
        assert!(state.refused_for_good);
        let plain = record(
            3,
            Kind::Log(proto::Log {
                stream: proto::LogStream::Stdout as i32,
                line: format!("{} not from the agent", rct_bus::REFUSAL_NOTE),
                undone_by: String::new(),
            }),
        );
        assert_eq!(fold(&[record(1, admitted()), plain]).refused, None);
        let claimed = fold(&[record(1, admitted()), note(2), record(3, started())]);
        assert_eq!(claimed.refused, None);
        assert!(!claimed.refused_for_good);
        let for_now = record(
            4,
            Kind::Log(proto::Log {
                stream: proto::LogStream::Agent as i32,
                line: format!(
                    "{} agent y: key not trusted yet",
                    rct_bus::REFUSAL_NOTE_FOR_NOW
                ),
                undone_by: String::new(),
            }),
        );
        let waiting = fold(&[record(1, admitted()), for_now]);
        assert_eq!(
            waiting.refused.as_deref(),
            Some("agent y: key not trusted yet")
        );
        assert!(!waiting.refused_for_good);
    }

    fn of(id: &str, mut record: Record) -> Record {
        record.command_id = id.parse().unwrap();
        record.event.command_id = id.into();
        record
    }

    #[test]
    fn the_folder_keeps_only_open_commands_and_hands_each_back_once_over() {
        const B: &str = "01JQ0000000000000000000002";
        const C: &str = "01JQ0000000000000000000003";
        let mut folder = Folder::new();
        assert!(matches!(folder.absorb(record(1, admitted())), Folded::Open));
        assert!(matches!(
            folder.absorb(of(B, record(2, admitted()))),
            Folded::Open
        ));
        assert!(matches!(folder.absorb(record(3, started())), Folded::Open));
        assert_eq!(folder.open(), 2);
        let Folded::Ended(state) = folder.absorb(record(4, Kind::Succeeded(Default::default())))
        else {
            panic!("over with its outcome");
        };
        assert_eq!((state.phase, state.first_sequence), (Phase::Succeeded, 1));
        assert_eq!(folder.open(), 1, "no state kept for what is over");
        // A duplicate after the end is late, not a new command.
        assert!(matches!(
            folder.absorb(record(5, Kind::Succeeded(Default::default()))),
            Folded::Late
        ));
        // A command first seen after its decision: the caller must supply the decision.
        let Folded::Unseen(progress) = folder.absorb(of(C, record(6, progress(40)))) else {
            panic!("a command without its decision is unseen");
        };
        assert!(matches!(
            folder.begin(of(C, record(1, admitted()))),
            Folded::Open
        ));
        assert!(matches!(folder.absorb(*progress), Folded::Open));
        let open = folder.into_open();
        let ids: Vec<String> = open.iter().map(|s| s.command_id.to_string()).collect();
        assert_eq!(ids, [C, B], "in the order first seen");
        assert_eq!(open[0].progress.as_ref().unwrap().percent, 40);
    }

    #[test]
    fn commands_taken_out_as_over_are_not_held_and_their_late_records_are_late() {
        const B: &str = "01JQ0000000000000000000002";
        let mut folder = Folder::new();
        folder.absorb(record(1, admitted()));
        folder.absorb(of(B, record(2, admitted())));
        folder.absorb(of(B, record(3, started())));
        let taken = folder.take_where(|s| s.started.is_none());
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].command_id.to_string(), ID);
        assert_eq!(folder.open(), 1);
        assert!(matches!(
            folder.absorb(record(4, Kind::Expired(Default::default()))),
            Folded::Late
        ));
    }

    #[test]
    fn a_cancel_request_is_over_once_admitted() {
        let cancel = Kind::Admitted(proto::Admitted {
            request: Some(proto::Request {
                cancels: "01JQ0000000000000000000009".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let mut folder = Folder::new();
        let Folded::Ended(state) = folder.absorb(record(1, cancel)) else {
            panic!("a cancel request has no outcome of its own");
        };
        assert_eq!(state.cancels(), Some("01JQ0000000000000000000009"));
        assert_eq!(folder.open(), 0);
    }

    #[test]
    fn other_commands_are_ignored() {
        let mut state = CommandState::new(ID.parse().unwrap());
        let mut other = record(1, admitted());
        other.command_id = "01JQ0000000000000000000001".parse().unwrap();
        state.apply(&other);
        assert_eq!(state, CommandState::new(ID.parse().unwrap()));
    }
}
