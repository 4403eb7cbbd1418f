//! `rct history`: one line per command, from the event stream alone.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use rct_bus::CommandId;
use rct_streams::replay::{self, Filter, Item};
use rct_streams::{CommandState, Phase};
use time::OffsetDateTime;

use crate::commands::inspect::{line, state_json};
use crate::exit::{Error, Exit, Result};
use crate::home::Home;
use crate::remote::{self, Global};
use crate::render::Output;

/// What happened, who asked, why, how it went.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How far back (e.g. 30m, 2h, 7d).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub since: Duration,
    /// Up to this long ago (e.g. 1h); default now.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub until: Option<Duration>,
    /// Only this tower.
    #[arg(long)]
    pub tower: Option<String>,
    /// Only this target.
    #[arg(long)]
    pub target: Option<String>,
    /// Only commands of this operator (email or subject).
    #[arg(long)]
    pub operator: Option<String>,
    /// Only commands in this state (succeeded, failed, rejected, running, …).
    #[arg(long)]
    pub outcome: Option<String>,
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
    let filter = Filter {
        since: Some(ago(now, "--since", args.since)?),
        until: args.until.map(|u| ago(now, "--until", u)).transpose()?,
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
        && !PHASES.contains(&outcome.as_str())
    {
        return Err(Error::usage(format!(
            "--outcome {outcome}: use one of {}",
            PHASES.join(", ")
        )));
    }
    let remote = remote::connect(home, global).await?;
    let mut states: HashMap<CommandId, CommandState> = HashMap::new();
    let mut order: Vec<CommandId> = Vec::new();
    let mut printed: std::collections::HashSet<CommandId> = Default::default();
    let mut events = replay::follow(&remote.js, &filter)
        .await
        .map_err(|e| Error::usage(format!("cannot read history: {e}")))?;
    let mut caught_up = false;
    while let Some(item) = events.next().await {
        let record = match item {
            Ok(Item::Event(record)) => record,
            Ok(Item::CaughtUp) => {
                caught_up = true;
                let mut listed: Vec<&CommandState> =
                    order.iter().filter_map(|id| states.get(id)).collect();
                listed.sort_by_key(|s| (s.decided_at.or(s.started_at), s.last_sequence));
                for state in listed {
                    if matches(state, &args) {
                        print(state, args.output);
                        printed.insert(state.command_id);
                    }
                }
                if !args.follow {
                    break;
                }
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "skipping");
                continue;
            }
        };
        let id = record.command_id;
        let state = states.entry(id).or_insert_with(|| {
            order.push(id);
            CommandState::new(id)
        });
        state.absorb(record);
        if caught_up && state.phase.is_terminal() && !printed.contains(&id) && matches(state, &args)
        {
            print(state, args.output);
            printed.insert(id);
        }
    }
    Ok(Exit::Ok)
}

/// `now - back`, or a usage error naming `flag` when that is before any representable date.
fn ago(now: OffsetDateTime, flag: &str, back: Duration) -> Result<OffsetDateTime> {
    time::Duration::try_from(back)
        .ok()
        .and_then(|back| now.checked_sub(back))
        .ok_or_else(|| {
            Error::usage(format!(
                "{flag} {}: that reaches back before any date; give a shorter duration",
                humantime::format_duration(back)
            ))
        })
}

const PHASES: [&str; 9] = [
    "pending",
    "admitted",
    "running",
    "rejected",
    "succeeded",
    "failed",
    "expired",
    "cancelled",
    "unknown",
];

fn matches(state: &CommandState, args: &Args) -> bool {
    let operator = state.operator();
    args.operator
        .as_ref()
        .is_none_or(|who| operator.is_some_and(|o| &o.email == who || &o.subject == who))
        && args
            .outcome
            .as_ref()
            .is_none_or(|phase| state.phase.as_str() == phase)
        && state.phase != Phase::Pending
}

#[allow(clippy::print_stdout)] // history is data
fn print(state: &CommandState, output: Output) {
    match output {
        Output::Json => println!("{}", state_json(state)),
        Output::Text => println!("{}", line(state)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rct history --since 100000000y` panicked on the date arithmetic.
    #[test]
    fn a_huge_since_or_until_is_a_usage_error_not_a_panic() {
        let now = OffsetDateTime::now_utc();
        for text in ["100000000y", "500000000000y"] {
            let back = humantime::parse_duration(text).unwrap();
            for flag in ["--since", "--until"] {
                let error = ago(now, flag, back).unwrap_err();
                assert!(error.to_string().contains(flag), "{error}");
            }
        }
        let day = Duration::from_secs(86_400);
        assert_eq!(ago(now, "--since", day).unwrap(), now - day);
    }
}
