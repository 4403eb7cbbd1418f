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
    let plan = plan_of(&remote, &state, &pending).await?;
    let digest = approval::recompute(&pending, plan.as_ref()).ok_or_else(|| {
        Error::usage(format!(
            "not signed: the request {id}'s pending event holds is not a submission; the \
             record is not what it claims: report it"
        ))
    })?;
    if plan.is_none() && digest.as_slice() != pending.digest.as_slice() {
        return Err(Error::usage(format!(
            "not signed: the digest {id}'s pending event states ({}) is not the one its stored \
             request gives ({}); the record is not what it claims: report it",
            approval::hex(&pending.digest),
            approval::hex(&digest)
        )));
    }
    show(&state, &pending, plan.as_ref(), &digest);
    if !confirmed(&format!("{verb} {id}?"), args.yes)? {
        eprintln!("not sent: nothing was signed");
        return Ok(Exit::Failed);
    }
    let name: OperationName = state
        .operation
        .parse()
        .map_err(|_| Error::usage(format!("{id} names no operation")))?;
    let request = approval::request(&id.to_string(), &digest, deny);
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

/// Whether the person at the terminal answers yes to `question` (always, with `yes` or off
/// a terminal: a script asks by running it).
pub(crate) fn confirmed(question: &str, yes: bool) -> Result<bool> {
    if yes || !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return Ok(true);
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Error::usage(format!("cannot read the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
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
/// The plan approvers of `id` approve, when its operation plans: the first plan event an
/// agent of its tower and target wrote for its plan-only command. An error when it is not
/// made (yet, or at all).
async fn plan_of(
    remote: &remote::Remote,
    state: &CommandState,
    pending: &rct_bus::proto::Pending,
) -> Result<Option<rct_bus::proto::Plan>> {
    let id = state.command_id;
    use rct_bus::proto::event::Kind;
    use rct_bus::provenance::{Author, Provenance};
    if pending.plan_id.is_empty() {
        return Ok(None);
    }
    let plan_id: CommandId = pending.plan_id.parse().map_err(|_| {
        Error::usage(format!(
            "{id} names plan-only command {:?}, which is not a command id",
            pending.plan_id
        ))
    })?;
    let not_yet = || {
        Error::usage(format!(
            "not signed: the plan of {id} is not made yet (its agent describes it as command \
             {plan_id}: rct watch {plan_id}); decide on it once it is there"
        ))
    };
    let records = match inspect::history(remote, plan_id).await {
        Ok(records) => records,
        Err(_) => return Err(not_yet()),
    };
    // Written where the request's agents write (its tower and target, from the subject,
    // which the writer's certificate must name), by whom it counts.
    let ours: Vec<&rct_streams::Record> = records
        .iter()
        .filter(|r| {
            r.tower.as_str() == state.operation.split('/').next().unwrap_or_default()
                && r.target == rct_bus::Target::of_event(&state.target)
        })
        .collect();
    if let Some(Kind::Plan(plan)) = ours
        .iter()
        .filter(|r| matches!(r.provenance, Provenance::Verified(Author::Agent(_))))
        .find(|r| r.kind == rct_bus::EventKind::Plan)
        .and_then(|r| r.event.kind.clone())
    {
        return Ok(Some(plan));
    }
    match ours
        .iter()
        .filter(|r| r.provenance.counts())
        .find(|r| r.kind == rct_bus::EventKind::Outcome)
    {
        Some(ended) => Err(Error::usage(format!(
            "not signed: the plan of {id} was not made: command {plan_id} {}; the request \
             cannot be approved",
            render::describe(&ended.event)
        ))),
        None => Err(not_yet()),
    }
}

fn show(
    state: &CommandState,
    pending: &rct_bus::proto::Pending,
    plan: Option<&rct_bus::proto::Plan>,
    digest: &[u8],
) {
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
    if let Some(plan) = plan {
        // Made printable as every event shown is.
        let event = rct_bus::proto::Event {
            kind: Some(rct_bus::proto::event::Kind::Plan(plan.clone())),
            ..Default::default()
        };
        let shown = render::describe(&event);
        eprintln!(
            "  {:<14} {}\n                 (made by command {})",
            "plan",
            shown
                .strip_prefix("plan: ")
                .unwrap_or(&shown)
                .replace('\n', "\n                 "),
            printable(&pending.plan_id)
        );
    }
    field(
        "digest",
        &format!(
            "{} ({})",
            approval::hex(digest),
            if plan.is_some() {
                "computed from the stored request and this plan"
            } else {
                "recomputed: it matches"
            }
        ),
    );
}
