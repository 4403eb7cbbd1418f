//! `rct history`: one line per command, from the event stream alone, printed as each command
//! ends; only the commands still open are kept in memory.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use futures::StreamExt;
use rct_bus::catalog::{Served, display_value};
use rct_bus::proto::{self, event::Kind};
use rct_bus::text::printable;
use rct_streams::replay::{self, Filter, Item};
use rct_streams::{CommandState, Folded, Folder, Phase};
use serde_json::json;
use time::OffsetDateTime;

use crate::exit::{Error, Exit, Result};
use crate::home::Home;
use crate::remote::{self, Global};
use crate::render::{self, Output, Zone};

/// What happened, who asked, why, how it went.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// From when: a duration back (30m, 2h, 7d), a date (2026-12-01) or a time
    /// (2026-12-01T10:00:00Z; without an offset it is local time).
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// Up to when, in the same forms; default now.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this tower.
    #[arg(long)]
    pub tower: Option<String>,
    /// Only this target.
    #[arg(long)]
    pub target: Option<String>,
    /// Only commands of this operator (email or subject).
    #[arg(long)]
    pub operator: Option<String>,
    /// Only commands in this state (succeeded, failed, rejected, running, cancel, …).
    #[arg(long)]
    pub outcome: Option<String>,
    /// Only commands whose justification names this ticket (a whole word, any case).
    #[arg(long)]
    pub ticket: Option<String>,
    /// Only the last N commands of the range (with --follow, then every new one).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Only commands run by breaking the glass.
    #[arg(long)]
    pub break_glass: bool,
    /// With --break-glass: only those nobody has reviewed yet (rct review closes one).
    #[arg(long)]
    pub unreviewed: bool,
    /// Times in UTC, read and shown (off a terminal and in JSON they are shown in UTC anyway).
    #[arg(long)]
    pub utc: bool,
    /// Keep going: print commands as they end.
    #[arg(long)]
    pub follow: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// Runs `rct history`.
pub async fn run(home: &Home, global: &Global, args: Args) -> Result {
    let now = OffsetDateTime::now_utc();
    let input = Zone::for_input(args.utc);
    let when = |flag: &str, text: &str| {
        input
            .parse(text, now)
            .map_err(|e| Error::usage(format!("{flag}: {e}")))
    };
    let since = when("--since", &args.since)?;
    let until = args
        .until
        .as_deref()
        .map(|u| when("--until", u))
        .transpose()?;
    let zone = Zone::for_display(args.utc, args.output);
    if let Some(until) = until
        && until <= since
    {
        return Err(Error::usage(format!(
            "the range is empty: --until {} is not after --since {}",
            zone.show(until),
            zone.show(since)
        )));
    }
    let filter = Filter {
        since: Some(since),
        until,
        tower: args
            .tower
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| Error::usage(format!("{e}")))?,
        target: args
            .target
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| Error::usage(format!("{e}")))?,
        ..Filter::default()
    };
    if let Some(outcome) = &args.outcome
        && !WORDS.contains(&outcome.as_str())
    {
        return Err(Error::usage(format!(
            "--outcome {outcome}: use one of {}",
            WORDS.join(", ")
        )));
    }
    if args.limit == Some(0) {
        return Err(Error::usage("--limit 0 would show nothing: give 1 or more"));
    }
    if args.follow
        && let Some(open) = args.outcome.as_deref().filter(|o| OPEN.contains(o))
    {
        return Err(Error::usage(format!(
            "--follow prints commands as they end, so --outcome {open} would print nothing: \
             without --follow, rct history lists what is {open} at the end of the range"
        )));
    }
    let remote = remote::connect(home, global).await?;
    // A progress event only sets an open row's percentage; every other event is checked.
    let filter = Filter {
        progress_unchecked: true,
        ..remote.checked(filter).await
    };
    let layout = Layout::of(remote.catalog_or_cached(home).await.ok().as_ref());
    let mut rows = Rows::new(&args, zone.clone(), layout);
    let mut folder = Folder::new();
    let mut events = replay::follow_reconnecting(&remote.js, &filter, remote.connected.clone())
        .await
        .map_err(|e| Error::usage(format!("cannot read history: {e}")))?;
    let _connection = crate::commands::run::say_connection(remote.connected.clone(), None);
    let mut lookup_failed = false;
    let mut not_here = std::collections::HashSet::new();
    let mut pruned = std::time::Instant::now();
    while let Some(item) = events.next().await {
        // Admitted, never started, past its deadline: nothing will take it (only an agent
        // writes `expired`); said once and not held any longer.
        if args.follow && pruned.elapsed() > PRUNE_EVERY {
            pruned = std::time::Instant::now();
            for state in folder.take_where(|s| nothing_took_it(s, OffsetDateTime::now_utc())) {
                push(&mut rows, &remote, &state).await;
            }
        }
        let record = match item {
            Ok(Item::Event(record)) => record,
            Ok(Item::CaughtUp) if args.follow => {
                rows.live();
                continue;
            }
            Ok(Item::CaughtUp) => break,
            Err(e) => {
                tracing::debug!(error = %e, "skipping");
                continue;
            }
        };
        let folded = match folder.absorb(record) {
            // Decided before the window: its decision says who asked and why, its claim who
            // runs it.
            Folded::Unseen(record)
                if not_here.contains(&(
                    record.command_id,
                    record.tower.clone(),
                    record.target.clone(),
                )) =>
            {
                Folded::Late
            }
            Folded::Unseen(record) => {
                match before_the_window(&remote.js, &record, since, filter.trust.as_ref()).await {
                    Ok(Some(earlier)) => {
                        for slot in earlier {
                            folder.begin_or_absorb(slot);
                        }
                        folder.absorb(*record)
                    }
                    // Decided within the window and already over, or over before this
                    // record.
                    Ok(None) => {
                        folder.ignore(record.command_id);
                        Folded::Late
                    }
                    // No decision at this record's tower and target: not the command's (a
                    // writer of another target under its id), or never decided. Only this
                    // record is dropped; the command's own records still count.
                    Err(Lookup::NotHere) => {
                        // Looked up once per place: a writer's many records under one id
                        // cost one lookup.
                        if not_here.len() >= NOT_HERE_REMEMBERED {
                            not_here.clear();
                        }
                        not_here.insert((record.command_id, record.tower, record.target));
                        Folded::Late
                    }
                    Err(Lookup::Failed(e)) => {
                        if !lookup_failed {
                            eprintln!(
                                "rct: cannot read the decisions of commands decided before \
                                 --since ({e}); they show without who asked and why"
                            );
                            lookup_failed = true;
                        }
                        folder.begin(*record)
                    }
                }
            }
            folded => folded,
        };
        if let Folded::Ended(state) = folded {
            push(&mut rows, &remote, &state).await;
        }
    }
    // Still open at the end of the range (or when the follow ended).
    for state in folder.into_open() {
        push(&mut rows, &remote, &state).await;
    }
    if rows.finish() == 0 {
        eprintln!(
            "no commands{} {}{}",
            if args.tower.is_some()
                || args.target.is_some()
                || args.operator.is_some()
                || args.outcome.is_some()
                || args.ticket.is_some()
                || args.break_glass
                || args.unreviewed
            {
                " matching the filters"
            } else {
                ""
            },
            match until {
                Some(until) => format!("between {} and {}", zone.show(since), zone.show(until)),
                None => format!("since {}", zone.show(since)),
            },
            if args.follow {
                " (following ended)"
            } else {
                ""
            }
        );
    }
    Ok(Exit::Ok)
}

/// Whether a command was admitted, never started, and its deadline (and a minute of grace)
/// has passed.
fn nothing_took_it(state: &CommandState, now: OffsetDateTime) -> bool {
    state.phase == Phase::Admitted
        && state.started.is_none()
        && state
            .deadline()
            .is_some_and(|deadline| deadline + time::Duration::minutes(1) < now)
}

/// Places (command, tower, target) found with no decision, remembered at most.
const NOT_HERE_REMEMBERED: usize = 10_000;

/// How often `--follow` lets go of commands nothing took.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Why [`before_the_window`] has nothing to fold.
enum Lookup {
    /// No decision at the record's tower and target.
    NotHere,
    /// The stream could not be read.
    Failed(rct_streams::Error),
}

/// For the first record seen of a command whose decision may be older than the window
/// (`since`): its decision and, when earlier than `record`, its claim, at the record's own
/// tower and target. `None` when it was decided within the window (so it is already over) or
/// ended before this record (a late event).
async fn before_the_window(
    js: &async_nats::jetstream::Context,
    record: &rct_streams::Record,
    since: OffsetDateTime,
    trust: Option<&std::sync::Arc<rct_bus::provenance::Trust>>,
) -> std::result::Result<Option<Vec<rct_streams::Record>>, Lookup> {
    use rct_bus::EventKind;
    let slot = |kind| async move {
        // Only what its entitled writer signed: a forged slot is no decision or claim.
        replay::slot_trusting(
            js,
            &record.tower,
            &record.target,
            record.command_id,
            kind,
            trust,
        )
        .await
        .map(|found| found.filter(|r| r.provenance.counts()))
        .map_err(Lookup::Failed)
    };
    // Its decision, or, for a request still waiting for approvals, its pending event.
    let decision = match slot(EventKind::Decision).await? {
        Some(decision) => decision,
        None => slot(EventKind::Pending).await?.ok_or(Lookup::NotHere)?,
    };
    if decision.published >= since {
        return Ok(None);
    }
    if slot(EventKind::Outcome)
        .await?
        .is_some_and(|outcome| outcome.sequence < record.sequence)
    {
        return Ok(None);
    }
    let mut earlier = vec![decision];
    if let Some(claim) = slot(EventKind::Claim).await?
        && claim.sequence < record.sequence
    {
        earlier.push(claim);
    }
    Ok(Some(earlier))
}

/// The states `--outcome` takes: the phases, and `cancel` for cancel requests.
const WORDS: [&str; 9] = [
    "admitted",
    "running",
    "rejected",
    "succeeded",
    "failed",
    "expired",
    "cancelled",
    "unknown",
    "cancel",
];

/// The states a command is in before it ends.
const OPEN: [&str; 2] = ["admitted", "running"];

/// The word for where a command is: its phase, or `cancel` for a cancel request.
pub fn word(state: &CommandState) -> &'static str {
    if state.cancels().is_some() && state.phase == Phase::Admitted {
        "cancel"
    } else if state.approves().is_some() && state.phase == Phase::Admitted {
        if state.request.as_ref().is_some_and(|r| r.deny) {
            "denial"
        } else {
            "approval"
        }
    } else if let Some(freeze) = state.request.as_ref().and_then(|r| r.freeze.as_ref())
        && state.phase == Phase::Admitted
    {
        if freeze.end { "unfreeze" } else { "freeze" }
    } else if state.pending.is_some() && state.phase == Phase::Pending {
        "awaiting approval"
    } else {
        state.phase.as_str()
    }
}

/// Whether `justification` names `ticket` as a whole word, in any case.
fn names_ticket(justification: &str, ticket: &str) -> bool {
    justification
        .split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_' || c == '#'))
        .any(|word| word.eq_ignore_ascii_case(ticket))
}

/// The rows of one `rct history`: filtered, limited, with a header on a terminal.
struct Rows<'a> {
    args: &'a Args,
    zone: Zone,
    layout: Layout,
    header: bool,
    /// The `--limit` most recently decided rows, held until the stored range is read.
    held: Option<BTreeMap<(Option<OffsetDateTime>, u64), String>>,
    printed: usize,
}

impl<'a> Rows<'a> {
    fn new(args: &'a Args, zone: Zone, layout: Layout) -> Self {
        Self {
            args,
            zone,
            layout,
            header: args.output == Output::Text && std::io::stdout().is_terminal(),
            held: args.limit.map(|_| BTreeMap::new()),
            printed: 0,
        }
    }

    fn matches(&self, state: &CommandState) -> bool {
        let args = self.args;
        let operator = state.operator();
        state.phase != Phase::Pending
            && args
                .operator
                .as_ref()
                .is_none_or(|who| operator.is_some_and(|o| &o.email == who || &o.subject == who))
            && args.outcome.as_ref().is_none_or(|w| word(state) == w)
            && (!(args.break_glass || args.unreviewed) || state.break_glass().is_some())
            && args.ticket.as_ref().is_none_or(|t| {
                state
                    .request
                    .as_ref()
                    .is_some_and(|r| names_ticket(&r.justification, t))
            })
    }

    fn push(&mut self, state: &CommandState) {
        if !self.matches(state) {
            return;
        }
        let line = match self.args.output {
            Output::Json => state_json(state).to_string(),
            Output::Text => self.layout.row(state, &self.zone),
        };
        match (&mut self.held, self.args.limit) {
            (Some(held), Some(limit)) => {
                held.insert(
                    (state.decided_at.or(state.started_at), state.first_sequence),
                    line,
                );
                if held.len() > limit {
                    held.pop_first();
                }
            }
            _ => self.print(&line),
        }
    }

    /// The stored range is read: print what was held; from now on rows print as they come.
    fn live(&mut self) {
        for line in self.held.take().unwrap_or_default().into_values() {
            self.print(&line);
        }
    }

    /// Prints what is held; how many rows were printed.
    fn finish(mut self) -> usize {
        self.live();
        self.printed
    }

    #[allow(clippy::print_stdout)] // history is data
    fn print(&mut self, line: &str) {
        if self.header {
            println!("{}", self.layout.header(&self.zone));
            self.header = false;
        }
        println!("{line}");
        self.printed += 1;
    }
}

/// Column widths for text rows, from the catalog's names, so rows align while streaming.
#[derive(Debug)]
pub struct Layout {
    operation: usize,
    target: usize,
}

const OPERATOR: usize = 24;
const STATE: usize = 9;
const TOOK: usize = 8;

impl Layout {
    /// Wide enough for every operation and target `catalog` names.
    pub fn of(catalog: Option<&Served>) -> Self {
        let (mut operation, mut target) = ("OPERATION".len(), "TARGET".len());
        if let Some(served) = catalog {
            let catalog = &served.catalog;
            for name in catalog.operations.keys() {
                operation = operation.max(name.chars().count());
            }
            for spec in catalog.towers.values() {
                for t in &spec.targets {
                    target = target.max(t.chars().count());
                }
            }
        }
        Self {
            operation: operation.min(48),
            target: target.min(32),
        }
    }

    fn header(&self, zone: &Zone) -> String {
        let time = zone.show(OffsetDateTime::UNIX_EPOCH).chars().count();
        format!(
            "{:<time$}  {:<26}  {:<op$}  {:<tg$}  {:<STATE$}  {:>TOOK$}  {:<OPERATOR$}  \
             JUSTIFICATION",
            "TIME",
            "COMMAND",
            "OPERATION",
            "TARGET",
            "STATE",
            "TOOK",
            "OPERATOR",
            op = self.operation,
            tg = self.target,
        )
    }

    /// One command in one line: when it was decided, what, where, how it went, how long it
    /// ran, who asked, then why and what else is worth knowing. Printable: nothing on record
    /// can make it two lines or move the cursor.
    pub fn row(&self, state: &CommandState, zone: &Zone) -> String {
        let when = state.decided_at.or(state.started_at);
        let time = when.map_or_else(
            || "-".repeat(zone.show(OffsetDateTime::UNIX_EPOCH).chars().count()),
            |at| zone.show(at),
        );
        let request = state.request.as_ref();
        let took = state.duration().map_or_else(String::new, render::duration);
        let operator = request
            .and_then(|r| r.operator.as_ref())
            .map_or_else(|| "-".to_owned(), |o| render::operator(Some(o)));
        let mut why = request.map_or_else(String::new, |r| r.justification.clone());
        if why.is_empty() {
            why.push('-');
        }
        // Each field printable before it is padded, so the columns stay aligned.
        let shown = |text: &str| printable(text).into_owned();
        format!(
            "{time}  {}  {:<op$}  {:<tg$}  {:<STATE$}  {took:>TOOK$}  {:<OPERATOR$}  {}{}",
            state.command_id,
            shown(or_dash(&state.operation)),
            shown(or_dash(state.target.as_str())),
            word(state),
            shown(&operator),
            shown(&why),
            shown(&notes(state)),
            op = self.operation,
            tg = self.target,
        )
    }
}

fn or_dash(text: &str) -> &str {
    match text {
        "" | "_" => "-",
        text => text,
    }
}

/// Shows `state` if it matches, with who reviewed it if it broke the glass, and, with
/// `--unreviewed`, only if nobody has: reviews come after the run, often after the range
/// (and after its row is made), so they are read from its own history.
async fn push(rows: &mut Rows<'_>, remote: &crate::remote::Remote, state: &CommandState) {
    let glass = rows.args.break_glass || rows.args.unreviewed;
    if !(glass && state.break_glass().is_some() && rows.matches(state)) {
        rows.push(state);
        return;
    }
    let filter = Filter {
        command: Some(state.command_id),
        kind: Some(rct_bus::EventKind::Approval),
        ..Filter::default()
    };
    let filter = remote.checked(filter).await;
    let mut reviewed = state.clone();
    if let Ok(records) = replay::records(&remote.js, &filter).await {
        for record in records.iter().filter(|r| state.owns(r)) {
            if let Some(Kind::Approval(a)) = &record.event.kind
                && a.review
                && !reviewed.approvals.contains(a)
            {
                reviewed.approvals.push(a.clone());
            }
        }
    }
    // A refused attempt ran nothing: there is nothing to review.
    let refused = matches!(state.decision, Some(Kind::Rejected(_)));
    if rows.args.unreviewed && (refused || !reviewed.reviewed_by().is_empty()) {
        return;
    }
    rows.push(&reviewed);
}

/// What else the row should say: dry run, what it cancels or undoes, why it failed or was
/// refused (with the refused request's parameters), how far it got.
fn notes(state: &CommandState) -> String {
    let mut notes: Vec<String> = Vec::new();
    if state.request.as_ref().is_some_and(|r| r.plan) {
        notes.push("plan only".into());
    } else if state.dry_run() {
        notes.push("dry run".into());
    }
    if let Some(cancelled) = state.cancels() {
        notes.push(format!("cancels {cancelled}"));
    }
    if let Some(original) = state.request.as_ref().map(|r| r.undo_of.as_str())
        && !original.is_empty()
    {
        notes.push(format!("undo of {original}"));
    }
    if let Some(request) = state.request.as_ref() {
        if let Some(plan) = &request.rollout {
            notes.push(format!("rollout to {} targets", plan.targets.len()));
        } else if !request.parent.is_empty() {
            let what = if request.health {
                "health check"
            } else {
                "child"
            };
            notes.push(format!("{what} of rollout {}", request.parent));
        }
    }
    if state.break_glass().is_some() {
        let reviewed: Vec<String> = state
            .reviewed_by()
            .iter()
            .map(|o| render::operator(Some(o)))
            .collect();
        notes.push(if reviewed.is_empty() {
            "BREAK-GLASS".into()
        } else {
            format!("BREAK-GLASS, reviewed by {}", reviewed.join(", "))
        });
    }
    match (&state.outcome, &state.decision) {
        (Some(Kind::Failed(f)), _) => notes.push(f.code.clone()),
        (Some(Kind::Unknown(_)), _) => notes.push("agent died".into()),
        (Some(_), _) => {}
        (None, Some(Kind::Rejected(r))) => {
            notes.push(rct_bus::rejection_code_name(r.code).to_owned());
            if let Some(request) = &r.request
                && !request.params.is_empty()
            {
                notes.push(render::params(&request.params));
            }
        }
        _ if state.refused_for_good => notes.push("refused by its agent: will not run".into()),
        _ if nothing_took_it(state, OffsetDateTime::now_utc()) => {
            notes.push("deadline passed: nothing took it".into());
        }
        _ if state.refused.is_some() => {
            notes.push("refused by its agent for now: see rct show".into());
        }
        _ => {
            if let Some(p) = &state.progress {
                notes.push(format!("{}%", p.percent));
            }
        }
    }
    if state.elsewhere {
        notes.push("UNVERIFIED events under its id: see rct show".into());
    }
    if notes.is_empty() {
        String::new()
    } else {
        format!("  ({})", notes.join("; "))
    }
}

/// A command's state as JSON.
pub fn state_json(state: &CommandState) -> serde_json::Value {
    let request = state.request.as_ref();
    let params = request.map(|r| {
        r.params
            .iter()
            .map(|(k, v)| (k.clone(), display_value(v).into()))
            .collect::<serde_json::Map<String, serde_json::Value>>()
    });
    json!({
        "command_id": state.command_id.to_string(),
        "operation": state.operation,
        "target": state.target,
        "phase": state.phase.as_str(),
        "operator": request.and_then(|r| r.operator.as_ref()).map(|o| render::operator(Some(o))),
        "justification": request.map(|r| r.justification.clone()),
        "params": params,
        "dry_run": state.dry_run(),
        "cancels": state.cancels(),
        "decided_at": state.decided_at.map(render::datetime),
        "started_at": state.started_at.map(render::datetime),
        "ended_at": state.ended_at.map(render::datetime),
        "duration_seconds": state.duration().map(|d| d.as_secs_f64()),
        "agent": state.started.as_ref().map(|s| s.agent.clone()),
        "refused": state.refused,
        "refused_for_good": state.refused_for_good,
        "unverified_elsewhere": state.elsewhere,
        "outcome": state.outcome.as_ref().map(|k| render::describe(&proto::Event { kind: Some(k.clone()), ..Default::default() })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_matched_as_a_whole_word_in_any_case() {
        assert!(names_ticket("SRE-101 drain for maintenance", "sre-101"));
        assert!(names_ticket("for (SRE-101), see #42", "SRE-101"));
        assert!(names_ticket("see #42", "#42"));
        assert!(!names_ticket("SRE-1011", "SRE-101"));
        assert!(!names_ticket("SRE-10", "SRE-101"));
    }

    fn state(justification: &str, operator: &str) -> CommandState {
        let id = rct_bus::CommandId::generate();
        let event = proto::Event {
            command_id: id.to_string(),
            at: Some(rct_streams::timestamp::from_datetime(
                OffsetDateTime::UNIX_EPOCH,
            )),
            operation: "traffic/drain-cluster".into(),
            target: "prod-1".into(),
            kind: Some(Kind::Admitted(proto::Admitted {
                request: Some(proto::Request {
                    justification: justification.into(),
                    operator: Some(proto::Operator {
                        email: operator.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let record = rct_streams::Record {
            sequence: 1,
            published: OffsetDateTime::UNIX_EPOCH,
            tower: "traffic".parse().unwrap(),
            target: "prod-1".parse().unwrap(),
            command_id: id,
            kind: rct_bus::EventKind::Decision,
            event,
            trace: None,
            provenance: Default::default(),
        };
        CommandState::fold([&record]).unwrap()
    }

    /// Every column before the justification starts at the same place, whatever the
    /// justification or the operator's length, and the header names them there.
    #[test]
    fn rows_align_under_the_header_whatever_their_lengths() {
        let layout = Layout {
            operation: 21,
            target: 6,
        };
        let zone = Zone::Utc;
        let header = layout.header(&zone);
        let column = header.find("JUSTIFICATION").unwrap();
        for (why, who) in [
            ("x", "a@b.c"),
            (
                "a very long justification that goes on and on, SRE-1",
                "alice@example.com",
            ),
            ("", "bob@example.com"),
        ] {
            let row = layout.row(&state(why, who), &zone);
            let expected = if why.is_empty() { "-" } else { why };
            assert!(
                row.get(column..).is_some_and(|r| r.starts_with(expected)),
                "{header}\n{row}"
            );
            assert_eq!(row.find(who), header.find("OPERATOR"), "{header}\n{row}");
            assert_eq!(
                row.find("admitted"),
                header.find("STATE"),
                "{header}\n{row}"
            );
        }
    }
}
