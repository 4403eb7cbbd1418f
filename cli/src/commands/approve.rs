//! `rct approve <id>` and `rct deny <id> -j WHY`: an approver's word on one request waiting
//! for approvals, bound to its digest, which is recomputed here from the stored bytes and
//! shown before anything is signed. `rct review <id> -j WHY`: someone else's look, after the
//! fact, at a command run by breaking the glass.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use rct_bus::text::printable;
use rct_bus::{CommandId, OperationName, approval};
use rct_streams::CommandState;

use crate::commands::inspect;
use crate::commands::run::{self, submit};
use crate::exit::{Error, Exit, Result};
use crate::home::Home;
use crate::remote::{self, Global};
use crate::render;
use crate::session::Session;

/// One request, approved or denied.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The command id of the request (printed when it was submitted, and in its watch).
    pub id: String,
    /// Why (a denial needs one; the operation's justification rule applies to it).
    #[arg(long, short = 'j')]
    pub justification: Option<String>,
    /// Do not ask for confirmation on a terminal.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Runs `rct approve` (`deny` false) or `rct deny`.
pub async fn run(home: &Home, global: &Global, args: Args, deny: bool) -> Result {
    let verb = if deny { "deny" } else { "approve" };
    let id: CommandId = args.id.parse().map_err(|_| {
        Error::usage(format!(
            "{:?} is not a command id (26 characters, as rct printed it)",
            args.id
        ))
    })?;
    let justification = args.justification.unwrap_or_default();
    if deny && justification.trim().is_empty() {
        return Err(Error::usage(format!(
            "a denial says why: rct deny {id} -j WHY"
        )));
    }
    let remote = remote::connect(home, global).await?;
    let session = Session::load(home, &remote.context)?;
    let records = inspect::history(&remote, id).await?;
    let state = CommandState::fold(&records).expect("not empty");
    let Some(pending) = state.pending.clone() else {
        return Err(Error::usage(format!(
            "{id} does not wait for approvals (it is {}); there is nothing to {verb}",
            state.phase
        )));
    };
    if state.decision.is_some() {
        return Err(Error::usage(format!(
            "{id} was already decided ({}); there is nothing to {verb}",
            state.phase
        )));
    }
    // What is signed is what the stored bytes say, never the event's word for it.
    let recomputed = approval::recompute(&pending, None);
    if recomputed.as_ref().map(|d| d.as_slice()) != Some(pending.digest.as_slice()) {
        return Err(Error::usage(format!(
            "not signed: the digest {id}'s pending event states ({}) is not the one its stored \
             request gives ({}); the record is not what it claims: report it",
            approval::hex(&pending.digest),
            recomputed.map_or_else(|| "none".into(), |d| approval::hex(&d))
        )));
    }
    show(&state, &pending);
    if !args.yes && std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        eprint!("{verb} {id}? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|e| Error::usage(format!("cannot read the answer: {e}")))?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("not sent: nothing was signed");
            return Ok(Exit::Failed);
        }
    }
    let name: OperationName = state
        .operation
        .parse()
        .map_err(|_| Error::usage(format!("{id} names no operation")))?;
    let request = approval::request(&id.to_string(), &pending.digest, deny);
    let stored = submit(
        &remote,
        &session,
        CommandId::generate(),
        &name,
        &justification,
        request,
    )
    .await?;
    let decided = run::decision(&remote, &stored).await?;
    if decided == Exit::Ok {
        eprintln!("watch {id}: rct watch {id}");
    }
    Ok(decided)
}

/// Runs `rct review`: closes the review a break-glass command opened.
pub async fn review(home: &Home, global: &Global, args: Args) -> Result {
    let id: CommandId = args.id.parse().map_err(|_| {
        Error::usage(format!(
            "{:?} is not a command id (26 characters, as rct printed it)",
            args.id
        ))
    })?;
    let remote = remote::connect(home, global).await?;
    let session = Session::load(home, &remote.context)?;
    let records = inspect::history(&remote, id).await?;
    let state = CommandState::fold(&records).expect("not empty");
    let Some(reason) = state.break_glass() else {
        return Err(Error::usage(format!(
            "{id} was not run by breaking the glass; there is nothing to review"
        )));
    };
    if let Some(by) = state.reviewed_by().first() {
        eprintln!(
            "{id} was reviewed already by {}; this review is recorded too",
            render::operator(Some(by))
        );
    }
    eprintln!(
        "review {id}: {} {} by {}, breaking the glass: {}",
        state.operation,
        state.target,
        render::operator(state.operator()),
        printable(reason)
    );
    let name: OperationName = state
        .operation
        .parse()
        .map_err(|_| Error::usage(format!("{id} names no operation")))?;
    let request = rct_bus::proto::submission::Request::Review(rct_bus::proto::Review {
        command_id: id.to_string(),
    });
    let justification = args.justification.unwrap_or_default();
    let stored = submit(
        &remote,
        &session,
        CommandId::generate(),
        &name,
        &justification,
        request,
    )
    .await?;
    run::decision(&remote, &stored).await
}

/// The request as the approver signs it: what, where, who, why, the parameters, the rule,
/// who approved so far, and the digest.
fn show(state: &CommandState, pending: &rct_bus::proto::Pending) {
    let request = pending.request.as_ref();
    let rule = pending.rule.clone().unwrap_or_default();
    let field = |name: &str, value: &str| eprintln!("  {name:<14} {}", printable(value));
    eprintln!("request {}", state.command_id);
    field("operation", &state.operation);
    field("target", &state.target);
    field(
        "requested by",
        &render::operator(request.and_then(|r| r.operator.as_ref())),
    );
    field(
        "justification",
        request.map_or("", |r| r.justification.as_str()),
    );
    if let Some(r) = request {
        for (name, value) in &r.params {
            field(
                &format!("--{name}"),
                &rct_bus::catalog::display_value(value),
            );
        }
        if r.dry_run {
            field("dry run", "yes");
        }
    }
    let approved: Vec<String> = state
        .approved_by()
        .iter()
        .map(|o| render::operator(Some(o)))
        .collect();
    field(
        "needs",
        &format!(
            "{} of {} ({}){}",
            rule.required,
            rule.approver_groups.join(", "),
            if approved.is_empty() {
                "none yet".to_owned()
            } else {
                format!("so far: {}", approved.join(", "))
            },
            if rule.allow_self {
                ""
            } else {
                "; not by the requester"
            }
        ),
    );
    field(
        "until",
        &pending
            .expires_at
            .as_ref()
            .and_then(rct_streams::timestamp::to_datetime)
            .map_or_else(|| "?".into(), render::datetime),
    );
    field("catalog", &pending.catalog_version);
    field(
        "digest",
        &format!(
            "{} (recomputed: it matches)",
            approval::hex(&pending.digest)
        ),
    );
}
