//! `rct undo <id> -j WHY`: fires the inverse of a succeeded command, as its operation's
//! catalog entry says (`inverse`), with the parameters its record gives: shown first, and
//! admitted only if they are what admission reads from the same record.

use rct_bus::catalog::display_value;
use rct_bus::proto::event::Kind;
use rct_bus::{CommandId, OperationName};
use rct_streams::CommandState;

use crate::commands::inspect;
use crate::commands::run::{self, Fire};
use crate::exit::{Error, Exit, Result};
use crate::home::Home;
use crate::remote::{self, Global};
use crate::render::Output;

/// The command to undo.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Its command id.
    pub id: String,
    /// Why: a ticket or incident reference (the inverse operation's rule says which form).
    #[arg(long, short = 'j')]
    pub justification: Option<String>,
    /// Do not ask for confirmation on a terminal.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Print the undo's command id, wait for its decision, and exit (as rct <tower> <op>
    /// --detach).
    #[arg(long)]
    pub detach: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// Runs `rct undo`.
pub async fn run(home: &Home, global: &Global, args: Args) -> Result {
    let id: CommandId = args.id.parse().map_err(|_| {
        Error::usage(format!(
            "{:?} is not a command id (26 characters, as rct printed it)",
            args.id
        ))
    })?;
    let remote = remote::connect(home, global).await?;
    let records = inspect::history(&remote, id).await?;
    let state = CommandState::fold(&records).expect("not empty");
    if let Some(plan) = state.request.as_ref().and_then(|r| r.rollout.clone()) {
        return Box::pin(rollout(home, &remote, id, &state, &plan, args)).await;
    }
    let cannot = |why: String| Error::usage(format!("{id} cannot be undone: {why}"));
    let not = |why: String| Err(cannot(why));
    let outputs = match &state.outcome {
        Some(Kind::Succeeded(succeeded)) => succeeded.outputs.clone(),
        _ => {
            return not(format!(
                "it is {}, and rct undo reverses a success only (rct show {id})",
                state.phase
            ));
        }
    };
    let Some(request) = state.request.as_ref() else {
        return not("its decision records no request".into());
    };
    let name: OperationName = state
        .operation
        .parse()
        .map_err(|_| Error::usage(format!("{id} names no operation")))?;
    let served = remote.catalog_or_cached(home).await?;
    let Some((_, operation)) = served.catalog.operation(&name) else {
        return not(format!("{name} is no longer in the catalog"));
    };
    let Some(inverse) = &operation.inverse else {
        return not(format!(
            "{name} has no inverse in the catalog; run the operation that reverses it yourself"
        ));
    };
    let filled = inverse.fill(&request.params, &outputs).map_err(cannot)?;
    let inverse_name: OperationName = inverse
        .operation
        .parse()
        .map_err(|e| Error::usage(format!("the catalog's inverse of {name}: {e}")))?;
    let given: Vec<String> = request
        .params
        .iter()
        .map(|(k, v)| format!("{k}={}", display_value(v)))
        .collect();
    let undo: Vec<String> = filled.iter().map(|(k, v)| format!("{k}={v}")).collect();
    eprintln!(
        "undo {id}: {name} on {} ({}), which succeeded\n  with {inverse_name} {}",
        state.target,
        given.join(" "),
        undo.join(" ")
    );
    if !crate::commands::approve::confirmed("submit the undo?", args.yes)? {
        eprintln!("not submitted: nothing was signed");
        return Ok(Exit::Failed);
    }
    let fire = Fire {
        justification: args.justification,
        detach: args.detach,
        output: args.output,
        undo_of: Some(id),
        ..Fire::default()
    };
    run::fire(
        home,
        global,
        &inverse_name,
        filled.into_iter().collect(),
        &fire,
    )
    .await
}

/// `rct undo <rollout>`: a rollout of the inverse over the original's targets whose child
/// succeeded, in reverse order, each with the parameters its child's record gives; its
/// limits those of the original (one wave, no health check).
async fn rollout(
    home: &Home,
    remote: &crate::remote::Remote,
    id: CommandId,
    state: &CommandState,
    plan: &rct_bus::proto::RolloutPlan,
    args: Args,
) -> Result {
    let cannot = |why: String| Error::usage(format!("rollout {id} cannot be undone: {why}"));
    if !state.phase.is_terminal() {
        return Err(cannot(format!(
            "it is {}: undo it once it has ended (rct rollout halt {id} -j … stops it)",
            state.phase
        )));
    }
    let name: OperationName = state
        .operation
        .parse()
        .map_err(|_| Error::usage(format!("{id} names no operation")))?;
    let served = remote.catalog_or_cached(home).await?;
    let inverse = served
        .catalog
        .operation(&name)
        .and_then(|(_, op)| op.inverse.clone())
        .ok_or_else(|| cannot(format!("{name} has no inverse in the catalog")))?;
    let inverse_name: OperationName = inverse
        .operation
        .parse()
        .map_err(|e| Error::usage(format!("the catalog's inverse of {name}: {e}")))?;
    let Some((_, undoing)) = served.catalog.operation(&inverse_name) else {
        return Err(cannot(format!("{inverse_name} is not in the catalog")));
    };
    let mut by_target = std::collections::BTreeMap::new();
    let mut lines = Vec::new();
    let mut skipped = Vec::new();
    for target in plan.targets.iter().rev() {
        let child = rct_bus::rollout::child_id(
            id,
            &rct_bus::Target::new(target.as_str()).map_err(|e| cannot(e.to_string()))?,
        );
        // Never decided (it did not start): nothing is on record for it. A read that fails
        // stops the undo, rather than leaving a target that succeeded as it is.
        let filter = remote
            .checked(rct_streams::replay::Filter::command(child))
            .await;
        let records = rct_streams::replay::records(&remote.js, &filter)
            .await
            .map_err(|e| Error::usage(format!("cannot read {child}, {target}'s child: {e}")))?;
        let child_state = CommandState::fold(&records);
        // Its child, and nothing someone else submitted under its id.
        let request = child_state
            .as_ref()
            .and_then(|s| s.request.clone())
            .filter(|r| r.parent == id.to_string() && !r.health);
        let (Some(Kind::Succeeded(succeeded)), Some(request)) = (
            child_state.as_ref().and_then(|s| s.outcome.clone()),
            request,
        ) else {
            skipped.push(target.clone());
            continue;
        };
        let filled = inverse
            .fill(&request.params, &succeeded.outputs)
            .map_err(|e| cannot(format!("{target}: {e}")))?;
        let mut values = std::collections::BTreeMap::new();
        for (key, text) in &filled {
            let Some(param) = undoing.params.get(key) else {
                continue;
            };
            if param.kind == rct_bus::catalog::Type::Target {
                continue;
            }
            let value = param.parse(key, text).map_err(|e| cannot(e.message))?;
            values.insert(key.clone(), value);
        }
        let shown: Vec<String> = filled.iter().map(|(k, v)| format!("{k}={v}")).collect();
        lines.push(format!("  {target}: {inverse_name} {}", shown.join(" ")));
        by_target.insert(target.clone(), rct_bus::proto::Params { values });
    }
    if by_target.is_empty() {
        return Err(cannot(
            "none of its targets succeeded: there is nothing to take back".into(),
        ));
    }
    eprintln!(
        "undo rollout {id}: {name} on {} targets, {} of which succeeded; taken back in reverse \
         order, as a rollout{}:\n{}",
        plan.targets.len(),
        by_target.len(),
        match skipped.as_slice() {
            [] => String::new(),
            s => format!(" (left alone, as they did not succeed: {})", s.join(", ")),
        },
        lines.join("\n")
    );
    if !crate::commands::approve::confirmed("submit the undo?", args.yes)? {
        eprintln!("not submitted: nothing was signed");
        return Ok(Exit::Failed);
    }
    let order: Vec<String> = plan
        .targets
        .iter()
        .rev()
        .filter(|t| by_target.contains_key(*t))
        .cloned()
        .collect();
    let fire = Fire {
        justification: args.justification,
        detach: args.detach,
        output: args.output,
        undo_of: Some(id),
        fan: run::Fan {
            max_concurrency: Some(plan.max_concurrency.max(1).to_string()),
            max_errors: Some(plan.max_errors.to_string()),
            ..run::Fan::default()
        },
        ..Fire::default()
    };
    let justification = fire.justification.clone().unwrap_or_default();
    if let Err(message) = undoing
        .justification
        .check(&inverse_name.to_string(), &justification)
    {
        return Err(Error::usage(format!("not submitted: {message}")));
    }
    let mut asked = fire.fan.rollout(order.join(","));
    asked.params_by_target = by_target;
    let run = rct_bus::proto::Run {
        target: rct_bus::rollout::PARENT_TARGET.to_owned(),
        undo_of: id.to_string(),
        rollout: Some(asked),
        ..Default::default()
    };
    let session = crate::session::Session::load(home, &remote.context)?;
    let (exit, _) = run::submit_and_watch(
        remote,
        &session,
        CommandId::generate(),
        &inverse_name,
        &justification,
        run,
        &fire,
    )
    .await?;
    Ok(exit)
}
