//! How events look: one line each for people (progress on stderr, with a bar on a terminal),
//! one JSON object each for scripts.
//!
//! Everything shown to people from the streams is made printable first
//! ([`rct_bus::text`]): a control character, an escape sequence or a bidirectional override
//! in a justification, a target, a script's output or a refusal is shown written out, never
//! acted on by the terminal. JSON output escapes control characters as JSON does.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use rct_bus::catalog::display_value;
use rct_bus::proto::{self, event::Kind};
use rct_bus::rejection_code_name;
use rct_bus::text::printable;
use rct_streams::Record;
use rct_streams::timestamp::to_datetime;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::exit::Exit;

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// One JSON object per line, for scripts.
    Json,
}

/// `2026-11-26 10:02:03Z` for seconds since the epoch.
pub fn time(seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(seconds).map_or_else(|_| seconds.to_string(), datetime)
}

/// `2026-11-26 10:02:03Z`.
pub fn datetime(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        at.year(),
        at.month() as u8,
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// How times are shown to people and read from them: local time on a terminal, UTC off one,
/// in JSON, and with `--utc`.
#[derive(Clone, Debug)]
pub enum Zone {
    /// `2026-11-26 10:02:03Z`.
    Utc,
    /// `2026-11-26 11:02:03+01:00`, in this zone.
    Local(jiff::tz::TimeZone),
}

impl Zone {
    /// The zone to show times in: local on a terminal, unless `utc` or JSON.
    pub fn for_display(utc: bool, output: Output) -> Self {
        if utc || output == Output::Json || !std::io::stdout().is_terminal() {
            Zone::Utc
        } else {
            Zone::Local(jiff::tz::TimeZone::system())
        }
    }

    /// The zone a date or time without an offset is read in: local, unless `utc`.
    pub fn for_input(utc: bool) -> Self {
        if utc {
            Zone::Utc
        } else {
            Zone::Local(jiff::tz::TimeZone::system())
        }
    }

    fn tz(&self) -> jiff::tz::TimeZone {
        match self {
            Zone::Utc => jiff::tz::TimeZone::UTC,
            Zone::Local(tz) => tz.clone(),
        }
    }

    /// `at`, for people.
    pub fn show(&self, at: OffsetDateTime) -> String {
        let local = match self {
            Zone::Utc => return datetime(at),
            Zone::Local(tz) => jiff::Timestamp::new(at.unix_timestamp(), 0).map(|t| {
                t.to_zoned(tz.clone())
                    .strftime("%Y-%m-%d %H:%M:%S%:z")
                    .to_string()
            }),
        };
        local.unwrap_or_else(|_| datetime(at))
    }

    /// An instant as people give one: a duration back from `now` (`30m`, `2h`, `7d`), an
    /// RFC 3339 time (`2026-12-01T10:00:00Z`), or a date or time without an offset
    /// (`2026-12-01`, `2026-12-01 10:00`) in this zone.
    pub fn parse(&self, text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
        let text = text.trim();
        if let Ok(back) = humantime::parse_duration(text) {
            return time::Duration::try_from(back)
                .ok()
                .and_then(|back| now.checked_sub(back))
                .ok_or_else(|| {
                    format!("{text} reaches back before any date; give a shorter duration")
                });
        }
        let instant = text
            .parse::<jiff::Timestamp>()
            .or_else(|_| {
                text.parse::<jiff::civil::DateTime>()
                    .and_then(|civil| civil.to_zoned(self.tz()))
                    .map(|zoned| zoned.timestamp())
            })
            .or_else(|_| {
                text.parse::<jiff::civil::Date>()
                    .and_then(|date| date.to_zoned(self.tz()))
                    .map(|zoned| zoned.timestamp())
            })
            .map_err(|_| {
                format!(
                    "{text:?} is not a time: give a duration back (30m, 2h, 7d), a date \
                     (2026-12-01), or a time (2026-12-01T10:00:00Z; without an offset it is \
                     {})",
                    match self {
                        Zone::Utc => "UTC",
                        Zone::Local(_) => "local time, or UTC with --utc",
                    }
                )
            })?;
        OffsetDateTime::from_unix_timestamp_nanos(instant.as_nanosecond())
            .map_err(|e| format!("{text}: {e}"))
    }
}

/// An event timestamp, for people.
pub fn at(event: &proto::Event) -> String {
    event
        .at
        .as_ref()
        .and_then(to_datetime)
        .map_or_else(String::new, datetime)
}

/// A duration, for people (`2.4s`, `3m 12s`).
pub fn duration(d: std::time::Duration) -> String {
    if d < std::time::Duration::from_secs(60) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
    }
}

/// `alice@example.com` (or the subject when there is no email).
pub fn operator(operator: Option<&proto::Operator>) -> String {
    operator.map_or_else(
        || "?".to_owned(),
        |o| {
            if o.email.is_empty() {
                o.subject.clone()
            } else {
                o.email.clone()
            }
        },
    )
}

/// `cluster=prod-1 keep_percent=0`.
pub fn params(params: &BTreeMap<String, proto::Value>) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{k}={}", display_value(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `record` as it may be shown to people: every text of its event printable.
pub fn shown(mut record: Record) -> Record {
    rct_bus::text::make_printable(&mut record.event);
    record
}

/// What an event says, in one line (a log event: a line for each of its lines), every text
/// of it printable.
pub fn describe(event: &proto::Event) -> String {
    let mut event = event.clone();
    rct_bus::text::make_printable(&mut event);
    describe_printable(&event)
}

fn describe_printable(event: &proto::Event) -> String {
    let Some(kind) = &event.kind else {
        return "(empty event)".into();
    };
    match kind {
        Kind::Admitted(a) => {
            let r = a.request.as_ref();
            let what = match r {
                Some(r) if !r.cancels.is_empty() => format!("cancel of {}", r.cancels),
                Some(r) if !r.approves.is_empty() => format!(
                    "{} of {}",
                    if r.deny { "denial" } else { "approval" },
                    r.approves
                ),
                Some(r) if r.freeze.as_ref().is_some_and(|f| f.end) => {
                    format!("the end of the freeze of {}", event.target)
                }
                Some(r) if let Some(until) = r.freeze.as_ref().and_then(|f| f.until.as_ref()) => {
                    format!(
                        "a freeze of {} until {}",
                        event.target,
                        rct_bus::freeze::timestamp(until)
                            .map_or_else(|| "(no time)".to_owned(), |t| t.to_string())
                    )
                }
                Some(r) if let Some(plan) = &r.rollout => format!(
                    "{} as a rollout on {} ({} waves, {} at once, at most {} failed)",
                    event.operation,
                    plan.targets.join(", "),
                    plan.waves.len(),
                    plan.max_concurrency,
                    plan.max_errors
                ),
                Some(r) if !r.parent.is_empty() => format!(
                    "{}{}, {} of rollout {}",
                    event.operation,
                    on(&event.target),
                    if r.health { "health check" } else { "child" },
                    r.parent
                ),
                _ => format!("{}{}", event.operation, on(&event.target)),
            };
            let what = if a.approvals.is_empty() {
                what
            } else {
                format!("{what}, with {} approvals,", a.approvals.len())
            };
            format!(
                "admitted {what} for {} ({}){}{}{}{}",
                operator(r.and_then(|r| r.operator.as_ref())),
                r.map_or("", |r| r.justification.as_str()),
                if r.is_some_and(|r| r.plan) {
                    ", plan only"
                } else if r.is_some_and(|r| r.dry_run) {
                    ", dry run"
                } else {
                    ""
                },
                match r.map(|r| r.break_glass.as_str()) {
                    Some(reason) if !reason.is_empty() => {
                        format!(", BREAK-GLASS without approvals: {reason}")
                    }
                    _ => String::new(),
                },
                match r.map(|r| r.undo_of.as_str()) {
                    Some(original) if !original.is_empty() => format!(", undo of {original}"),
                    _ => String::new(),
                },
                {
                    // An undo's own lock is said already ("undo of …").
                    let undo = r.map(|r| format!("undo of {}", r.undo_of));
                    let locks: Vec<&str> = a
                        .locks
                        .iter()
                        .map(String::as_str)
                        .filter(|l| undo.as_deref() != Some(*l))
                        .collect();
                    match locks.as_slice() {
                        [] => String::new(),
                        locks => format!(", locking {}", locks.join(", ")),
                    }
                }
            )
        }
        Kind::Rejected(r) => format!("rejected ({}): {}", rejection_code_name(r.code), r.message),
        Kind::Approval(a) => format!(
            "{} by {}{}",
            if a.review {
                "break-glass run reviewed"
            } else if a.denied {
                "denied"
            } else {
                "approved"
            },
            operator(a.by.as_ref()),
            if a.comment.is_empty() {
                String::new()
            } else {
                format!(" ({})", a.comment)
            }
        ),
        Kind::Pending(p) => {
            let rule = p.rule.clone().unwrap_or_default();
            let r = p.request.as_ref();
            format!(
                "{}{} for {} ({}) waits for {} approval{} from {} until {}; {}",
                event.operation,
                on(&event.target),
                operator(r.and_then(|r| r.operator.as_ref())),
                r.map_or("", |r| r.justification.as_str()),
                rule.required,
                if rule.required == 1 { "" } else { "s" },
                rule.approver_groups.join(", "),
                p.expires_at
                    .as_ref()
                    .and_then(rct_streams::timestamp::to_datetime)
                    .map_or_else(|| "?".into(), datetime),
                if p.plan_id.is_empty() {
                    format!("digest {}", rct_bus::approval::hex(&p.digest))
                } else {
                    format!("its plan is made by command {}", p.plan_id)
                }
            )
        }
        Kind::Started(s) if s.without_running => {
            format!(
                "taken by {} on {} to end it without running",
                s.agent, s.host
            )
        }
        Kind::Started(s) if s.host.is_empty() => format!("started by {}", s.agent),
        Kind::Started(s) => format!("started by {} on {}", s.agent, s.host),
        Kind::Progress(p) => format!(
            "[{:>3}%] {}{}",
            p.percent,
            p.step,
            if p.message.is_empty() {
                String::new()
            } else {
                format!(": {}", p.message)
            }
        ),
        // One log event may pack several lines: each gets its bar.
        Kind::Log(l) => l
            .line
            .split('\n')
            .map(|line| format!("| {line}"))
            .collect::<Vec<_>>()
            .join("\n"),
        Kind::CancelRequested(c) => format!(
            "cancel requested by {} ({})",
            operator(c.by.as_ref()),
            c.justification
        ),
        Kind::Succeeded(s) => format!("succeeded: {}", s.summary),
        Kind::Failed(f) => {
            let mut text = format!("failed ({}): {}", f.code, f.message);
            for (which, plan) in [("approved", &f.approved_plan), ("now", &f.fresh_plan)] {
                if let Some(plan) = plan {
                    text.push_str(&format!("\n{which}: {}", describe_plan(plan)));
                }
            }
            text
        }
        Kind::Plan(plan) => format!("plan: {}", describe_plan(plan)),
        Kind::Expired(_) => "expired: no agent started it before its deadline".into(),
        Kind::Cancelled(c) => format!("cancelled: {}", c.reason),
        Kind::Unknown(u) => format!("outcome unknown: {}", u.reason),
    }
}

/// A plan: its summary, then a line for each change.
pub fn describe_plan(plan: &proto::Plan) -> String {
    let mut text = format!(
        "{} ({} change{})",
        plan.summary,
        plan.changes.len(),
        if plan.changes.len() == 1 { "" } else { "s" }
    );
    for change in &plan.changes {
        text.push_str(&format!(
            "\n  {} {} {}",
            change.action, change.resource, change.detail
        ));
    }
    text.trim_end().to_owned()
}

fn plan_json(plan: Option<&proto::Plan>) -> Value {
    let Some(plan) = plan else { return Value::Null };
    json!({
        "summary": plan.summary,
        "changes": plan.changes.iter().map(|c| json!({"action": c.action, "resource": c.resource, "detail": c.detail})).collect::<Vec<_>>(),
    })
}

fn on(target: &str) -> String {
    match target {
        "" | "_" => String::new(),
        t => format!(" on {t}"),
    }
}

/// The exit code an outcome or decision ends the CLI with, if it is final.
pub fn final_exit(event: &proto::Event) -> Option<Exit> {
    match event.kind.as_ref()? {
        Kind::Rejected(_) => Some(Exit::Rejected),
        Kind::Succeeded(_) => Some(Exit::Ok),
        Kind::Failed(_) | Kind::Expired(_) | Kind::Cancelled(_) | Kind::Unknown(_) => {
            Some(Exit::Failed)
        }
        _ => None,
    }
}

/// An event as JSON.
pub fn event_json(record: &Record) -> Value {
    let e = &record.event;
    let mut out = json!({
        "sequence": record.sequence,
        "stored": datetime(record.published),
        "command_id": e.command_id,
        "kind": record.kind.as_str(),
        "at": at(e),
        "source": e.source,
        "operation": e.operation,
        "target": e.target,
        "trace_id": record.trace.map(|t| t.trace_id()),
    });
    let body = match e.kind.as_ref() {
        Some(Kind::Admitted(a)) => {
            json!({"type": "admitted", "request": request_json(a.request.as_ref()), "catalog_version": a.catalog_version, "approvals": a.approvals, "plan": a.plan, "locks": a.locks})
        }
        Some(Kind::Rejected(r)) => {
            json!({"type": "rejected", "code": rejection_code_name(r.code), "message": r.message, "request": request_json(r.request.as_ref())})
        }
        Some(Kind::Approval(a)) => {
            json!({"type": if a.review { "review" } else if a.denied { "denial" } else { "approval" }, "by": operator(a.by.as_ref()), "comment": a.comment, "digest": rct_bus::approval::hex(&a.digest), "approval_id": a.approval_id})
        }
        Some(Kind::Pending(p)) => {
            let rule = p.rule.clone().unwrap_or_default();
            json!({"type": "pending", "request": request_json(p.request.as_ref()), "required": rule.required, "approver_groups": rule.approver_groups, "allow_self": rule.allow_self, "expires_at": p.expires_at.as_ref().and_then(rct_streams::timestamp::to_datetime).map(datetime), "digest": rct_bus::approval::hex(&p.digest), "catalog_version": p.catalog_version, "plan_id": p.plan_id})
        }
        Some(Kind::Started(s)) => {
            json!({"type": "started", "agent": s.agent, "host": s.host, "without_running": s.without_running})
        }
        Some(Kind::Progress(p)) => {
            json!({"type": "progress", "percent": p.percent, "step": p.step, "message": p.message})
        }
        Some(Kind::Log(l)) => {
            json!({"type": "log", "stream": proto::LogStream::try_from(l.stream).map_or("", |s| s.as_str_name()), "line": l.line, "lines": l.line.split('\n').collect::<Vec<_>>(), "undone_by": l.undone_by})
        }
        Some(Kind::CancelRequested(c)) => {
            json!({"type": "cancel_requested", "by": operator(c.by.as_ref()), "justification": c.justification})
        }
        Some(Kind::Succeeded(s)) => {
            json!({"type": "succeeded", "summary": s.summary, "outputs": s.outputs})
        }
        Some(Kind::Failed(f)) => {
            json!({"type": "failed", "code": f.code, "message": f.message, "approved_plan": plan_json(f.approved_plan.as_ref()), "fresh_plan": plan_json(f.fresh_plan.as_ref())})
        }
        Some(Kind::Plan(plan)) => {
            let mut body = plan_json(Some(plan));
            body["type"] = json!("plan");
            body
        }
        Some(Kind::Expired(_)) => json!({"type": "expired"}),
        Some(Kind::Cancelled(c)) => json!({"type": "cancelled", "reason": c.reason}),
        Some(Kind::Unknown(u)) => json!({"type": "unknown", "reason": u.reason}),
        None => Value::Null,
    };
    out["event"] = body;
    out
}

fn request_json(request: Option<&proto::Request>) -> Value {
    let Some(r) = request else { return Value::Null };
    let params: BTreeMap<&String, String> = r
        .params
        .iter()
        .map(|(k, v)| (k, display_value(v)))
        .collect();
    json!({
        "operator": operator(r.operator.as_ref()),
        "groups": r.operator.as_ref().map(|o| o.groups.clone()).unwrap_or_default(),
        "justification": r.justification,
        "params": params,
        "dry_run": r.dry_run,
        "plan": r.plan,
        "cancels": r.cancels,
        "approves": r.approves,
        "deny": r.deny,
        "review": r.review,
        "break_glass": r.break_glass,
        "undo_of": r.undo_of,
    })
}

/// Shows a command's events as they come: a progress bar on a terminal, plain lines
/// otherwise, JSON lines with `--output json`.
#[derive(Debug)]
pub struct Live {
    output: Output,
    bar: Option<ProgressBar>,
    started: Option<OffsetDateTime>,
    /// While the request waits for approvals: its rule and digest, and who approved so far.
    waiting: Option<(proto::Pending, Vec<String>)>,
}

impl Live {
    /// A fresh display.
    pub fn new(output: Output) -> Self {
        Self {
            output,
            bar: None,
            started: None,
            waiting: None,
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Shows one event; the exit code once the command is over.
    pub fn show(&mut self, record: &Record) -> Option<Exit> {
        let event = &record.event;
        if self.output == Output::Json {
            #[allow(clippy::print_stdout)] // data for scripts
            {
                println!("{}", event_json(record));
            }
            return final_exit(event);
        }
        match event.kind.as_ref()? {
            Kind::Started(s) if s.without_running => self.line(&describe(event)),
            Kind::Started(_) => {
                self.started = event.at.as_ref().and_then(to_datetime);
                self.line(&describe(event));
                if std::io::stderr().is_terminal() {
                    let bar = ProgressBar::new(100);
                    bar.set_style(
                        ProgressStyle::with_template("{bar:30.cyan/blue} {pos:>3}% {msg}")
                            .expect("a valid template"),
                    );
                    self.bar = Some(bar);
                }
            }
            Kind::Progress(p) => match &self.bar {
                Some(bar) => {
                    bar.set_position(u64::from(p.percent));
                    bar.set_message(if p.message.is_empty() {
                        printable(&p.step).into_owned()
                    } else {
                        printable(&format!("{}: {}", p.step, p.message)).into_owned()
                    });
                }
                None => self.line(&describe(event)),
            },
            Kind::Pending(p) => {
                self.line(&describe(event));
                self.line(&format!(
                    "approvers: rct approve {id}   (or rct deny {id} -j WHY)",
                    id = printable(&event.command_id)
                ));
                self.waiting = Some((p.clone(), Vec::new()));
            }
            Kind::Approval(a) => {
                let by = operator(a.by.as_ref());
                let line = match &mut self.waiting {
                    Some(_) if a.denied => describe(event),
                    Some((p, approvers)) if a.digest == p.digest => {
                        if !approvers.contains(&by) {
                            approvers.push(by.clone());
                        }
                        let required = p.rule.as_ref().map_or(0, |r| r.required);
                        format!(
                            "{} of {required}: {} approved",
                            approvers.len(),
                            printable(&by)
                        )
                    }
                    _ => describe(event),
                };
                self.line(&line);
            }
            Kind::Log(l) => {
                for line in l.line.split('\n') {
                    self.line(&format!("  {}", printable(line)));
                }
            }
            kind => {
                let exit = final_exit(event);
                if exit.is_some() {
                    if let Some(bar) = self.bar.take() {
                        bar.finish_and_clear();
                    }
                    self.summary(event, kind);
                } else {
                    self.line(&describe(event));
                }
                return exit;
            }
        }
        None
    }

    /// The final lines: the outcome and its outputs, on stdout.
    #[allow(clippy::print_stdout)] // the result is data
    fn summary(&self, event: &proto::Event, kind: &Kind) {
        let took = match (self.started, event.at.as_ref().and_then(to_datetime)) {
            (Some(start), Some(end)) => (end - start)
                .try_into()
                .map(|d| format!(" in {}", duration(d)))
                .unwrap_or_default(),
            _ => String::new(),
        };
        match kind {
            Kind::Rejected(_) => eprintln!("{}", describe(event)),
            Kind::Succeeded(s) => {
                println!(
                    "{} succeeded{took}: {}",
                    printable(&event.command_id),
                    printable(&s.summary)
                );
                for (k, v) in &s.outputs {
                    println!("  {}: {}", printable(k), printable(v));
                }
            }
            _ => println!("{} {}{took}", printable(&event.command_id), describe(event)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_in_every_form_people_give_them() {
        let now = OffsetDateTime::from_unix_timestamp(1_764_590_400).unwrap(); // 2025-12-01T12:00Z
        let plus_one = Zone::Local(jiff::tz::TimeZone::fixed(jiff::tz::offset(1)));
        let at = |zone: &Zone, text| zone.parse(text, now).map(datetime);
        for zone in [&Zone::Utc, &plus_one] {
            assert_eq!(at(zone, "2h").unwrap(), "2025-12-01 10:00:00Z");
            assert_eq!(
                at(zone, "2025-12-01T09:30:00Z").unwrap(),
                "2025-12-01 09:30:00Z"
            );
            assert_eq!(
                zone.parse("2025-12-01T09:30:00.25Z", now)
                    .unwrap()
                    .nanosecond(),
                250_000_000
            );
            assert_eq!(
                at(zone, "2025-12-01T09:30:00+02:00").unwrap(),
                "2025-12-01 07:30:00Z"
            );
            assert!(
                at(zone, "yesterday-ish")
                    .unwrap_err()
                    .contains("not a time")
            );
            assert!(
                at(zone, "100000000y")
                    .unwrap_err()
                    .contains("shorter duration")
            );
        }
        // Without an offset: the zone's own time.
        assert_eq!(
            at(&Zone::Utc, "2025-12-01").unwrap(),
            "2025-12-01 00:00:00Z"
        );
        assert_eq!(at(&plus_one, "2025-12-01").unwrap(), "2025-11-30 23:00:00Z");
        assert_eq!(
            at(&plus_one, "2025-12-01 10:00").unwrap(),
            "2025-12-01 09:00:00Z"
        );
        assert_eq!(
            at(&plus_one, "2025-12-01T10:00:00").unwrap(),
            "2025-12-01 09:00:00Z"
        );
    }

    #[test]
    fn local_time_shows_its_offset_and_utc_its_z() {
        let at = OffsetDateTime::from_unix_timestamp(1_764_590_400).unwrap();
        let plus_one = Zone::Local(jiff::tz::TimeZone::fixed(jiff::tz::offset(1)));
        assert_eq!(plus_one.show(at), "2025-12-01 13:00:00+01:00");
        assert_eq!(Zone::Utc.show(at), "2025-12-01 12:00:00Z");
    }

    #[test]
    fn a_log_event_packing_several_lines_shows_each() {
        let event = proto::Event {
            kind: Some(Kind::Log(proto::Log {
                stream: proto::LogStream::Stdout as i32,
                line: "one\ntwo".into(),
                undone_by: String::new(),
            })),
            ..Default::default()
        };
        assert_eq!(describe(&event), "| one\n| two");
    }
}
