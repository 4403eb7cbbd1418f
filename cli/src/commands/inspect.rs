//! After the fact: `rct watch`, `rct status`, `rct show`, `rct cancel`, `rct agents`.

use rct_bus::proto;
use rct_bus::text::printable;
use rct_bus::{CommandId, EventKind, OperationName};
use rct_streams::replay::{self, Filter};
use rct_streams::{CommandState, Record};

use crate::commands::history;
use crate::commands::run::{self, submit};
use crate::exit::{Error, Exit, Result};
use crate::home::Home;
use crate::remote::{self, Global, Remote};
use crate::render::{self, Output, Zone};
use crate::session::Session;

/// One command, by id.
#[derive(Debug, clap::Args)]
pub struct One {
    /// The command id (printed when it was submitted).
    pub id: String,
    /// Times in UTC (off a terminal and in JSON they are in UTC anyway).
    #[arg(long)]
    pub utc: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

fn parse(id: &str) -> Result<CommandId> {
    id.parse().map_err(|_| {
        Error::usage(format!(
            "{id:?} is not a command id (26 characters, as rct printed it)"
        ))
    })
}

pub(crate) async fn history(remote: &Remote, id: CommandId) -> Result<Vec<Record>> {
    let records = replay::records(&remote.js, &remote.checked(Filter::command(id)).await)
        .await
        .map_err(|e| Error::usage(format!("cannot read {id}: {e}")))?;
    if records.is_empty() {
        if time::OffsetDateTime::now_utc() > run::decided_by(id, None) {
            return Err(Error::usage(format!(
                "no such command: nothing is on record for {id}, and a request made then can \
                 no longer be decided"
            )));
        }
        return Err(Error::usage(format!(
            "nothing is on record for command {id} yet: it was never submitted, or admission \
             has not decided it (is admission down? rct history shows recent decisions)"
        )));
    }
    Ok(records)
}

/// `rct watch <id>`: its history, then live, to the end.
pub async fn watch(home: &Home, global: &Global, args: One) -> Result {
    let id = parse(&args.id)?;
    let remote = remote::connect(home, global).await?;
    run::watch(&remote, id, args.output).await
}

/// `rct status <id>`: where it is, in one line.
#[allow(clippy::print_stdout)] // the status is the result
pub async fn status(home: &Home, global: &Global, args: One) -> Result {
    let id = parse(&args.id)?;
    let remote = remote::connect(home, global).await?;
    let records = history(&remote, id).await?;
    let state = CommandState::fold(&records).expect("not empty");
    match args.output {
        Output::Json => println!("{}", history::state_json(&state)),
        Output::Text => {
            let layout = history::Layout::of(remote.catalog_or_cached(home).await.ok().as_ref());
            println!(
                "{}",
                layout.row(&state, &Zone::for_display(args.utc, args.output))
            );
        }
    }
    Ok(exit_of(&state))
}

fn exit_of(state: &CommandState) -> Exit {
    match state.phase {
        rct_streams::Phase::Admitted if state.refused_for_good => Exit::Failed,
        rct_streams::Phase::Succeeded
        | rct_streams::Phase::Pending
        | rct_streams::Phase::Admitted
        | rct_streams::Phase::Running => Exit::Ok,
        rct_streams::Phase::Rejected => Exit::Rejected,
        _ => Exit::Failed,
    }
}

/// `rct show <id>`: the whole timeline.
#[allow(clippy::print_stdout)] // the timeline is the result
pub async fn show(home: &Home, global: &Global, args: One) -> Result {
    let id = parse(&args.id)?;
    let remote = remote::connect(home, global).await?;
    let records = history(&remote, id).await?;
    let state = CommandState::fold(&records).expect("not empty");
    if args.output == Output::Json {
        for record in &records {
            let mut event = render::event_json(record);
            // Written under its id elsewhere, or by someone not entitled: not this
            // command's (see the text output).
            if let Some(why) = state.doubt(record) {
                event["unverified"] = true.into();
                event["unverified_why"] = why.into();
            }
            println!("{event}");
        }
        return Ok(exit_of(&state));
    }
    let zone = Zone::for_display(args.utc, args.output);
    let request = state.request.as_ref();
    // Each a line, whatever the record holds.
    let field = |label: &str, value: &str| println!("{label:<14}{}", printable(value));
    field("command", &id.to_string());
    field(
        "operation",
        &format!(
            "{} on {}",
            state.operation,
            if state.target.is_empty() {
                "-"
            } else {
                &state.target
            }
        ),
    );
    field(
        "requested by",
        &format!(
            "{} (groups: {})",
            render::operator(request.and_then(|r| r.operator.as_ref())),
            request
                .and_then(|r| r.operator.as_ref())
                .map(|o| o.groups.join(", "))
                .unwrap_or_default()
        ),
    );
    field("why", request.map_or("", |r| r.justification.as_str()));
    field(
        "parameters",
        &request
            .map(|r| render::params(&r.params))
            .unwrap_or_default(),
    );
    if request.is_some_and(|r| r.dry_run) {
        field("dry run", "yes");
    }
    if let Some(cancelled) = state.cancels() {
        field("cancels", cancelled);
    }
    if let Some(approved) = state.approves() {
        let denies = request.is_some_and(|r| r.deny);
        field(if denies { "denies" } else { "approves" }, approved);
    }
    if let Some(pending) = &state.pending {
        let rule = pending.rule.clone().unwrap_or_default();
        let by: Vec<String> = state
            .approved_by()
            .iter()
            .map(|o| render::operator(Some(o)))
            .collect();
        field(
            "approvals",
            &format!(
                "{} of {} from {}{}; until {}",
                by.len(),
                rule.required,
                rule.approver_groups.join(", "),
                if by.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", by.join(", "))
                },
                pending
                    .expires_at
                    .as_ref()
                    .and_then(rct_streams::timestamp::to_datetime)
                    .map_or_else(|| "?".into(), |at| zone.show(at))
            ),
        );
        field("digest", &rct_bus::approval::hex(&pending.digest));
    }
    field("state", history::word(&state));
    if let Some(reason) = &state.refused {
        field("refused", reason);
    }
    if state.elsewhere {
        field(
            "UNVERIFIED",
            "events under this id (marked below) are not this command's: at another tower or \
             target, where neither its agents nor admission write, or not signed by admission \
             or an agent certified for its target; they were ignored",
        );
    }
    if let Some(trace) = records.iter().find_map(|r| r.trace) {
        field("trace", &trace.trace_id().to_string());
    }
    println!();
    for record in &records {
        let mut who = if record.kind == EventKind::Log {
            String::new()
        } else {
            format!("  [{}]", printable(&record.event.source))
        };
        if let Some(why) = state.doubt(record) {
            who.push_str(&format!("  UNVERIFIED: {why}, ignored"));
        } else if record.provenance == rct_bus::provenance::Provenance::Legacy {
            who.push_str("  (unsigned: stored before events were signed)");
        }
        println!(
            "{}  {:<8} {}{who}",
            record
                .event
                .at
                .as_ref()
                .and_then(rct_streams::timestamp::to_datetime)
                .map_or_else(String::new, |at| zone.show(at)),
            record.kind.as_str(),
            render::describe(&record.event)
        );
    }
    Ok(exit_of(&state))
}

/// `rct cancel <id>`: ask admission to cancel a command; the agent stops it.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The command id.
    pub id: String,
    /// Why.
    #[arg(long, short = 'j')]
    pub justification: Option<String>,
    /// Do not wait for the command to end.
    #[arg(long)]
    pub detach: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    /// Resume the rollout instead (rct rollout resume).
    #[arg(skip)]
    pub resume: bool,
}

/// Runs `rct cancel` (and `rct rollout halt|resume`).
pub async fn cancel(home: &Home, global: &Global, args: CancelArgs) -> Result {
    let id = parse(&args.id)?;
    let remote = remote::connect(home, global).await?;
    let session = Session::load(home, &remote.context)?;
    let records = history(&remote, id).await?;
    let state = CommandState::fold(&records).expect("not empty");
    if state.phase.is_terminal() {
        eprintln!(
            "{id} was not cancelled: it has already ended {}",
            state.phase
        );
        return Ok(Exit::Failed);
    }
    let name: OperationName = state
        .operation
        .parse()
        .map_err(|_| Error::usage(format!("{id} names no operation")))?;
    // The operation's justification rule applies to stopping it, checked here with
    // admission's words before anything is sent.
    let justification = args.justification.as_deref().unwrap_or_default();
    if let Ok(served) = remote.catalog_or_cached(home).await
        && let Some((_, operation)) = served.catalog.operation(&name)
        && let Err(message) = operation
            .justification
            .check(&name.to_string(), justification)
    {
        return Err(Error::usage(format!(
            "not submitted: {message} to cancel it too (rct cancel {id} -j …)"
        )));
    }
    let request = proto::submission::Request::Cancel(proto::Cancel {
        command_id: id.to_string(),
        resume: args.resume,
    });
    let stored = submit(
        &remote,
        &session,
        CommandId::generate(),
        &name,
        justification,
        request,
    )
    .await?;
    // The cancel request's own decision first (refused, or not decided: said, and done).
    let decided = run::decision(&remote, &stored).await?;
    if decided != Exit::Ok {
        return Ok(decided);
    }
    let verb = if args.resume { "resume" } else { "cancel" };
    eprintln!("{verb} of {id} requested");
    if args.detach {
        return Ok(Exit::Ok);
    }
    if args.resume {
        return run::watch(&remote, id, args.output).await;
    }
    // Done when the command ended cancelled; it may have ended otherwise first, or watching
    // may have stopped without an end (which it said).
    let watched = run::watch(&remote, id, args.output).await?;
    let state = CommandState::fold(&history(&remote, id).await?).expect("not empty");
    match state.phase {
        rct_streams::Phase::Cancelled => {
            eprintln!("{id} is cancelled");
            Ok(Exit::Ok)
        }
        // Cancelled while it waited for approvals: refused, withdrawn, never run.
        rct_streams::Phase::Rejected
            if matches!(&state.decision, Some(proto::event::Kind::Rejected(r))
                if r.code == proto::RejectionCode::Withdrawn as i32) =>
        {
            eprintln!("{id} is withdrawn: it waited for approvals and will not run");
            Ok(Exit::Ok)
        }
        phase if phase.is_terminal() => {
            eprintln!("{id} was not cancelled: it ended {phase} first");
            Ok(Exit::Failed)
        }
        _ => Ok(watched),
    }
}

/// `rct agents`: the live agents.
#[derive(Debug, clap::Args)]
pub struct AgentsArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// Runs `rct agents`.
#[allow(clippy::print_stdout)] // the listing is the result
pub async fn agents(home: &Home, global: &Global, args: AgentsArgs) -> Result {
    let remote = remote::connect(home, global).await?;
    let mut agents: Vec<rct_bus::presence::Presence> = rct_streams::journal::presences(&remote.js)
        .await
        .map_err(|e| Error::usage(format!("cannot read live agents: {e}")))?
        .into_iter()
        .filter_map(|(_, value)| serde_json::from_slice(&value).ok())
        .collect();
    agents.sort_by(|a, b| {
        (&a.tower, &a.target, &a.instance).cmp(&(&b.tower, &b.target, &b.instance))
    });
    // Every place the catalog says an agent should serve, and none does.
    let mut missing: Vec<(String, String)> = Vec::new();
    if let Ok(served) = remote.catalog_or_cached(home).await {
        for (tower, spec) in &served.catalog.towers {
            let targets = match spec.flavour {
                rct_bus::catalog::Flavour::Cluster => spec.targets.clone(),
                rct_bus::catalog::Flavour::Simple => vec![rct_bus::Target::NONE.to_owned()],
            };
            for target in targets {
                if !agents
                    .iter()
                    .any(|a| &a.tower == tower && a.target == target)
                {
                    missing.push((tower.clone(), target));
                }
            }
        }
    }
    let since = |at: &str| {
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .map_or_else(|_| at.to_owned(), render::datetime)
    };
    if args.output == Output::Json {
        for a in &agents {
            let mut value = serde_json::to_value(a).expect("presence serializes");
            value["live"] = true.into();
            value["started_at"] = since(&a.started_at).into();
            println!("{value}");
        }
        for (tower, target) in &missing {
            println!(
                "{}",
                serde_json::json!({ "tower": tower, "target": target, "live": false })
            );
        }
        return Ok(Exit::Ok);
    }
    if agents.is_empty() && missing.is_empty() {
        eprintln!("no live agents");
        return Ok(Exit::Ok);
    }
    let mut rows = vec![[
        "TOWER".to_owned(),
        "TARGET".to_owned(),
        "INSTANCE".to_owned(),
        "HOST".to_owned(),
        "SINCE".to_owned(),
        "OPERATIONS".to_owned(),
    ]];
    for a in agents {
        rows.push([
            a.tower,
            a.target,
            a.instance,
            a.host,
            since(&a.started_at),
            a.operations.join(","),
        ]);
    }
    for (tower, target) in missing {
        rows.push([
            tower,
            target,
            "no agent".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    crate::commands::ops::print_table(&rows);
    Ok(Exit::Ok)
}

/// `rct locks`: the locks held now, and by which command.
#[derive(Debug, clap::Args)]
pub struct LocksArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// Runs `rct locks`: every lock whose holder has not ended (a holder whose outcome is on
/// record, whose decision is a refusal, or whose expiry passed no longer holds, and the next
/// command to take the lock drops it).
#[allow(clippy::print_stdout)] // the listing is the result
pub async fn locks(home: &Home, global: &Global, args: LocksArgs) -> Result {
    let remote = remote::connect(home, global).await?;
    let locks = rct_streams::locks::list(&remote.js)
        .await
        .map_err(|e| Error::usage(format!("cannot read the locks: {e}")))?;
    let now = jiff::Timestamp::now();
    let mut held = Vec::new();
    for (key, lock) in locks {
        for holder in lock.holders {
            if holder.lapsed(now) || ended(&remote, &holder.command_id).await {
                continue;
            }
            held.push((key.clone(), lock.resource.clone(), holder));
        }
    }
    if args.output == Output::Json {
        for (key, resource, holder) in &held {
            let mut value = serde_json::to_value(holder).expect("a holder serializes");
            value["key"] = key.as_str().into();
            value["resource"] = resource.as_str().into();
            println!("{value}");
        }
        return Ok(Exit::Ok);
    }
    if held.is_empty() {
        eprintln!("no locks are held");
        return Ok(Exit::Ok);
    }
    let at = |t: &str| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .map_or_else(|_| t.to_owned(), render::datetime)
    };
    let mut rows = vec![[
        "LOCK".to_owned(),
        "COMMAND".to_owned(),
        "OPERATION".to_owned(),
        "TARGET".to_owned(),
        "OPERATOR".to_owned(),
        "SINCE".to_owned(),
        "AT THE LATEST UNTIL".to_owned(),
        "JUSTIFICATION".to_owned(),
    ]];
    for (_, resource, h) in held {
        rows.push([
            rct_bus::text::printable(&resource).into_owned(),
            h.command_id,
            h.operation,
            h.target,
            h.operator,
            at(&h.taken_at),
            at(&h.expires_at),
            rct_bus::text::printable(&h.justification).into_owned(),
        ]);
    }
    crate::commands::ops::print_table(&rows);
    Ok(Exit::Ok)
}

/// Whether the command `id` ended as admission counts it for its locks: an outcome or a
/// refusal on record, but not `unknown` (what its agent started may still run: it holds to
/// its expiry). A command that cannot be read is taken as not ended (its lock is shown).
async fn ended(remote: &Remote, id: &str) -> bool {
    let Ok(id) = id.parse::<CommandId>() else {
        return true;
    };
    let Ok(records) = replay::records(&remote.js, &remote.checked(Filter::command(id)).await).await
    else {
        return false;
    };
    CommandState::fold(&records).is_some_and(|state| {
        state.phase.is_terminal() && state.phase != rct_streams::Phase::Unknown
    })
}
