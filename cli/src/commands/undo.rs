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
