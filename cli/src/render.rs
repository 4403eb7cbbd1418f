//! How events look: one line each for people (progress on stderr, with a bar on a terminal),
//! one JSON object each for scripts.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use rct_bus::catalog::display_value;
use rct_bus::proto::{self, event::Kind};
use rct_bus::rejection_code_name;
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

/// What an event says, in one line.
pub fn describe(event: &proto::Event) -> String {
    let Some(kind) = &event.kind else {
        return "(empty event)".into();
    };
    match kind {
        Kind::Admitted(a) => {
            let r = a.request.as_ref();
            let what = match r.map(|r| r.cancels.as_str()) {
                Some(cancels) if !cancels.is_empty() => format!("cancel of {cancels}"),
                _ => format!("{}{}", event.operation, on(&event.target)),
            };
            format!(
                "admitted {what} for {} ({}){}",
                operator(r.and_then(|r| r.operator.as_ref())),
                r.map_or("", |r| r.justification.as_str()),
                if r.is_some_and(|r| r.dry_run) {
                    ", dry run"
                } else {
                    ""
                }
            )
        }
        Kind::Rejected(r) => format!("rejected ({}): {}", rejection_code_name(r.code), r.message),
        Kind::Approval(a) => format!("approved by {}", operator(a.by.as_ref())),
        Kind::Started(s) if s.without_running => {
            format!(
                "taken by {} on {} to end it without running",
                s.agent, s.host
            )
        }
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
        Kind::Failed(f) => format!("failed ({}): {}", f.code, f.message),
        Kind::Expired(_) => "expired: no agent started it before its deadline".into(),
        Kind::Cancelled(c) => format!("cancelled: {}", c.reason),
        Kind::Unknown(u) => format!("outcome unknown: {}", u.reason),
    }
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
            json!({"type": "admitted", "request": request_json(a.request.as_ref()), "catalog_version": a.catalog_version})
        }
        Some(Kind::Rejected(r)) => {
            json!({"type": "rejected", "code": rejection_code_name(r.code), "message": r.message, "request": request_json(r.request.as_ref())})
        }
        Some(Kind::Approval(a)) => {
            json!({"type": "approval", "by": operator(a.by.as_ref()), "comment": a.comment})
        }
        Some(Kind::Started(s)) => {
            json!({"type": "started", "agent": s.agent, "host": s.host, "without_running": s.without_running})
        }
        Some(Kind::Progress(p)) => {
            json!({"type": "progress", "percent": p.percent, "step": p.step, "message": p.message})
        }
        Some(Kind::Log(l)) => {
            json!({"type": "log", "stream": proto::LogStream::try_from(l.stream).map_or("", |s| s.as_str_name()), "line": l.line, "lines": l.line.split('\n').collect::<Vec<_>>()})
        }
        Some(Kind::CancelRequested(c)) => {
            json!({"type": "cancel_requested", "by": operator(c.by.as_ref()), "justification": c.justification})
        }
        Some(Kind::Succeeded(s)) => {
            json!({"type": "succeeded", "summary": s.summary, "outputs": s.outputs})
        }
        Some(Kind::Failed(f)) => json!({"type": "failed", "code": f.code, "message": f.message}),
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
        "cancels": r.cancels,
    })
}

/// Shows a command's events as they come: a progress bar on a terminal, plain lines
/// otherwise, JSON lines with `--output json`.
#[derive(Debug)]
pub struct Live {
    output: Output,
    bar: Option<ProgressBar>,
    started: Option<OffsetDateTime>,
}

impl Live {
    /// A fresh display.
    pub fn new(output: Output) -> Self {
        Self {
            output,
            bar: None,
            started: None,
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
                        p.step.clone()
                    } else {
                        format!("{}: {}", p.step, p.message)
                    });
                }
                None => self.line(&describe(event)),
            },
            Kind::Log(l) => {
                for line in l.line.split('\n') {
                    self.line(&format!("  {line}"));
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
                println!("{} succeeded{took}: {}", event.command_id, s.summary);
                for (k, v) in &s.outputs {
                    println!("  {k}: {v}");
                }
            }
            _ => println!("{} {}{took}", event.command_id, describe(event)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_event_packing_several_lines_shows_each() {
        let event = proto::Event {
            kind: Some(Kind::Log(proto::Log {
                stream: proto::LogStream::Stdout as i32,
                line: "one\ntwo".into(),
            })),
            ..Default::default()
        };
        assert_eq!(describe(&event), "| one\n| two");
    }
}
