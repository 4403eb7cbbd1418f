//! Fire an operation and watch it to the end.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use prost::Message as _;
use rct_bus::catalog::{Secrets, Served};
use rct_bus::proto::{self, event::Kind};
use rct_bus::text::printable;
use rct_bus::trace::{TRACEPARENT, TraceContext};
use rct_bus::{CommandId, OperationName, Subject};
use rct_streams::Record;
use rct_streams::replay::{self, Filter, Item};
use rct_streams::timestamp::{from_datetime, to_datetime};
use rct_streams::{Outgoing, Publisher};
use time::OffsetDateTime;

use crate::exit::{Error, Exit, Result};
use crate::home::Home;
use crate::remote::{self, Global, Remote};
use crate::render::{self, Live, Output};
use crate::session::Session;

/// `rct run <tower>/<op> -p name=value …`: the generic form of `rct <tower> <op> --name value`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The operation, `<tower>/<op>` (rct ops lists them).
    pub operation: String,
    /// A parameter, `name=value`; repeat for each. A secret one takes `name=-` (read from
    /// stdin) or `name=@FILE`, and is asked for (not echoed) when left out on a terminal.
    #[arg(short = 'p', long = "param", value_parser = parse_pair)]
    pub params: Vec<(String, String)>,
    /// How to fire and what to show.
    #[command(flatten)]
    pub fire: Fire,
}

/// How to fire and what to show.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Fire {
    /// Why: a ticket or incident reference (the operation's rule says which form).
    #[arg(long, short = 'j')]
    pub justification: Option<String>,
    /// Ask the agent to change nothing and say what it would do.
    #[arg(long)]
    pub dry_run: bool,
    /// Plan only (also rct plan <tower> <op> …): the agent describes what it would change,
    /// as a plan, and changes nothing. For operations with `plan: true`.
    #[arg(long, conflicts_with = "break_glass")]
    pub plan: bool,
    /// Run now without the operation's approvals, for this reason (only for its break-glass
    /// groups): flagged everywhere, announced, and open until someone else reviews it.
    #[arg(long, value_name = "REASON")]
    pub break_glass: Option<String>,
    /// Print the command id, wait for admission's decision (at most $RCT_DECISION_WAIT), and
    /// exit: 0 admitted, 3 rejected, 4 not decided yet. Watch later with rct watch.
    #[arg(long)]
    pub detach: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    /// The command this one undoes (set by rct undo).
    #[arg(skip)]
    pub undo_of: Option<CommandId>,
    /// How to go through many targets at once.
    #[command(flatten)]
    pub fan: Fan,
}

/// A rollout: the operation on many targets (`--cluster prod-1,prod-2`, `--cluster 'prod-*'`
/// or `--all-targets`), for operations whose catalog entry has `fan_out`.
#[derive(Clone, Debug, Default, clap::Args)]
#[command(next_help_heading = "Rollout (many targets)")]
pub struct Fan {
    /// Run on every target of the tower.
    #[arg(long)]
    pub all_targets: bool,
    /// The most targets running at once: a count, or a share of the targets (25%).
    /// Default 1.
    #[arg(long, value_name = "N|N%")]
    pub max_concurrency: Option<String>,
    /// How many targets may fail before no new one starts (the ones running then end as
    /// they will). Default 0.
    #[arg(long, value_name = "N|N%")]
    pub max_errors: Option<String>,
    /// How many targets may be failed or unhealthy at once, across all waves, before the
    /// rollout halts. Default: no such budget.
    #[arg(long, value_name = "N|N%")]
    pub max_degraded: Option<String>,
    /// Go through the targets in the order given, or in the tower's catalog order.
    #[arg(long, value_enum, default_value_t)]
    pub order: Order,
    /// Where each wave ends, counted from the first target: 1,25%,100%. Default: one wave.
    #[arg(long, value_name = "N|N%,…")]
    pub waves: Option<String>,
    /// How long after a wave's last success its health is checked (or the next wave
    /// starts): 5m.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub bake: Option<Duration>,
    /// The operation that checks each target's health after its wave (its success says
    /// healthy=true or healthy=false): unhealthy halts the rollout, anything else pauses it.
    #[arg(long, value_name = "TOWER/OP")]
    pub health: Option<String>,
}

/// The order a rollout goes through its targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Order {
    /// As given (a pattern's targets in catalog order).
    #[default]
    Given,
    /// The tower's catalog order.
    Catalog,
}

impl Fan {
    /// Whether any rollout option is given besides the targets.
    fn any(&self) -> bool {
        self.all_targets
            || self.max_concurrency.is_some()
            || self.max_errors.is_some()
            || self.max_degraded.is_some()
            || self.order != Order::Given
            || self.waves.is_some()
            || self.bake.is_some()
            || self.health.is_some()
    }

    /// The rollout asked for, of `targets` (names and patterns).
    pub fn rollout(&self, targets: String) -> proto::Rollout {
        proto::Rollout {
            targets,
            catalog_order: self.order == Order::Catalog,
            waves: self.waves.clone().unwrap_or_default(),
            max_concurrency: self.max_concurrency.clone().unwrap_or_default(),
            max_errors: self.max_errors.clone().unwrap_or_default(),
            max_degraded: self.max_degraded.clone().unwrap_or_default(),
            bake: self
                .bake
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
            health: self.health.clone().unwrap_or_default(),
            params_by_target: Default::default(),
        }
    }
}

fn parse_pair(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not name=value"))
}

/// Runs `rct run`.
pub async fn run(home: &Home, global: &Global, args: Args) -> Result {
    let name: OperationName = args
        .operation
        .parse()
        .map_err(|e| Error::usage(format!("{e}; rct ops lists the operations")))?;
    fire(home, global, &name, args.params, &args.fire).await
}

/// Checks the parameters against the catalog, signs, submits, and (unless detached) watches.
pub async fn fire(
    home: &Home,
    global: &Global,
    name: &OperationName,
    raw: Vec<(String, String)>,
    fire: &Fire,
) -> Result {
    fire_with_id(home, global, name, raw, fire)
        .await
        .map(|(exit, _)| exit)
}

/// [`fire`], also giving the command's id.
pub async fn fire_with_id(
    home: &Home,
    global: &Global,
    name: &OperationName,
    raw: Vec<(String, String)>,
    fire: &Fire,
) -> Result<(Exit, CommandId)> {
    let remote = remote::connect(home, global).await?;
    let session = Session::load(home, &remote.context)?;
    let served = remote.catalog_or_cached(home).await?;
    // Chosen first: secrets are sealed for this command and no other.
    let command_id = CommandId::generate();
    let sealed_for = Sealing {
        command_id,
        operator: session.identity.subject.clone(),
    };
    let (run, justification) = request(&served, name, raw, fire, &sealed_for)?;
    submit_and_watch(
        &remote,
        &session,
        command_id,
        name,
        &justification,
        run,
        fire,
    )
    .await
}

/// Submits `run` (built and checked already) as command `command_id`, then watches it as
/// `fire` says.
pub async fn submit_and_watch(
    remote: &Remote,
    session: &Session,
    command_id: CommandId,
    name: &OperationName,
    justification: &str,
    run: proto::Run,
    fire: &Fire,
) -> Result<(Exit, CommandId)> {
    let stored = submit(
        remote,
        session,
        command_id,
        name,
        justification,
        proto::submission::Request::Run(run),
    )
    .await?;
    if fire.output == Output::Text {
        eprintln!("submitted {name} as {command_id}");
    }
    if fire.detach {
        #[allow(clippy::print_stdout)] // the id is the result
        {
            println!("{command_id}");
        }
        let exit = decision(remote, &stored).await?;
        return Ok((exit, command_id));
    }
    let exit = watch_submitted(remote, command_id, Some(&stored), fire.output).await?;
    Ok((exit, command_id))
}

/// What secret values are sealed for besides their parameter: the command and who asks.
#[derive(Debug)]
struct Sealing {
    command_id: CommandId,
    /// The operator's subject, as the certificate says (and admission records).
    operator: String,
}

/// The checked request: the same checks and words as admission's (and the agent's, for
/// secrets, which are checked in clear here and then sealed to the tower's recipients).
fn request(
    served: &Served,
    name: &OperationName,
    raw: Vec<(String, String)>,
    fire: &Fire,
    sealing: &Sealing,
) -> Result<(proto::Run, String)> {
    let (tower, operation) = served
        .catalog
        .operation(name)
        .ok_or_else(|| Error::usage(served.catalog.unknown_operation(name)))?;
    if fire.plan && !operation.plan {
        return Err(not_submitted(
            name,
            &[format!(
                "{name} cannot describe what it would change: its catalog entry does not say \
                 `plan: true`"
            )],
        ));
    }
    let mut params = BTreeMap::new();
    let mut problems = Vec::new();
    let mut secrets = crate::secret::Input::default();
    let mut raw: Vec<(String, Option<String>)> = raw
        .into_iter()
        .map(|(k, v)| (k.replace('-', "_"), Some(v)))
        .collect();
    // Many targets (a list, a pattern, or all of them): a rollout, whose children each get
    // one target.
    let target_param = operation
        .params
        .iter()
        .find(|(_, p)| p.kind == rct_bus::catalog::Type::Target)
        .map(|(n, _)| n.clone());
    let many = |v: &Option<String>| v.as_deref().is_some_and(|v| v.contains([',', '*']));
    if let Some(param) = &target_param
        && fire.fan.all_targets
        && raw.iter().any(|(k, _)| k == param)
    {
        return Err(not_submitted(
            name,
            &[format!(
                "--all-targets names every target: leave out --{param}"
            )],
        ));
    }
    let fanned = target_param.as_ref().and_then(|param| {
        let given = raw.iter().find(|(k, v)| k == param && many(v));
        match given {
            Some((_, value)) => Some((param.clone(), value.clone().unwrap_or_default())),
            None if fire.fan.all_targets => Some((param.clone(), "*".to_owned())),
            None => None,
        }
    });
    let rollout = match fanned {
        Some((param, targets)) => {
            raw.retain(|(k, _)| *k != param);
            Some(rollout_request(
                &served.catalog,
                tower,
                operation,
                name,
                &param,
                targets,
                fire,
            )?)
        }
        None if fire.fan.any() => {
            return Err(not_submitted(
                name,
                &[
                    "the rollout options need many targets: a list (prod-1,prod-2), a pattern \
                   ('prod-*') or --all-targets"
                        .to_owned(),
                ],
            ));
        }
        None => None,
    };
    // Secrets left out are asked for.
    let asked: Vec<(String, Option<String>)> = operation
        .params
        .iter()
        .filter(|(n, p)| p.secret && !raw.iter().any(|(k, _)| k == *n))
        .map(|(n, _)| (n.clone(), None))
        .collect();
    // A parameter given twice is refused: taking either one silently could run what was
    // not meant.
    let twice: std::collections::BTreeSet<&String> = raw
        .iter()
        .enumerate()
        .filter(|(i, (key, _))| raw[..*i].iter().any(|(k, _)| k == key))
        .map(|(_, (key, _))| key)
        .collect();
    for key in &twice {
        let secret = operation.params.get(*key).is_some_and(|p| p.secret);
        let values: Vec<&str> = raw
            .iter()
            .filter(|(k, _)| k == *key)
            .map(|(_, v)| match v {
                _ if secret => "***",
                v => v.as_deref().unwrap_or_default(),
            })
            .collect();
        problems.push(format!(
            "{key} is given {} times ({}): give it once",
            values.len(),
            values.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(not_submitted(name, &problems));
    }
    for (key, given) in raw.into_iter().chain(asked) {
        let text = match operation.params.get(&key) {
            Some(param) if param.secret => match secrets.read(&key, given.as_deref()) {
                Ok(text) => text,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            },
            _ => given.unwrap_or_default(),
        };
        match operation.params.get(&key) {
            Some(param) => match param.parse(&key, &text) {
                Ok(value) => {
                    params.insert(key, value);
                }
                Err(e) => problems.push(e.message),
            },
            None => problems.push(format!(
                "unknown parameter {key}; {name} takes: {}",
                operation
                    .params
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
    // A rollout's parameters are checked for each of its targets.
    let checked_for: Vec<String> = match &rollout {
        Some((_, plan)) => plan.targets.clone(),
        None => vec![String::new()],
    };
    for target in &checked_for {
        if !problems.is_empty() {
            break;
        }
        let with_target = with_target(&params, rollout.as_ref().map(|(p, _)| p.as_str()), target);
        if let Err(errors) = operation.check(tower, &with_target, Secrets::Open) {
            problems.extend(errors.into_iter().map(|e| e.message));
        }
    }
    let justification = fire.justification.clone().unwrap_or_default();
    let break_glass = fire.break_glass.clone().unwrap_or_default();
    if fire.break_glass.is_some() && break_glass.trim().is_empty() {
        problems.push("--break-glass needs a reason".into());
    }
    if let Some(problem) = rct_bus::text::line_problem("the break-glass reason", &break_glass) {
        problems.push(problem);
    }
    if let Err(message) = operation
        .justification
        .check(&name.to_string(), &justification)
    {
        problems.push(message);
    }
    if !problems.is_empty() {
        return Err(not_submitted(name, &problems));
    }
    if let Some((_, plan)) = rollout {
        // No secrets: the catalog refuses `fan_out` for an operation that takes one.
        return Ok((
            proto::Run {
                target: rct_bus::rollout::PARENT_TARGET.to_owned(),
                params,
                dry_run: fire.dry_run,
                break_glass,
                plan: fire.plan,
                undo_of: fire.undo_of.map(|id| id.to_string()).unwrap_or_default(),
                rollout: Some(fire.fan.rollout(plan.targets.join(","))),
            },
            justification,
        ));
    }
    let checked = operation
        .check(tower, &params, Secrets::Open)
        .expect("checked above");
    let recipients = tower.recipients_for(checked.target.as_str());
    let secret = |n: &str| operation.params.get(n).is_some_and(|p| p.secret);
    // Bound to the parameters as admission will complete them (defaults applied).
    let others = rct_bus::sealed::params_digest(&checked.params, secret);
    for (param_name, value) in params.iter_mut() {
        if !secret(param_name) {
            continue;
        }
        let binding = rct_bus::sealed::Binding {
            command_id: sealing.command_id.to_string(),
            operation: name.to_string(),
            target: checked.target.to_string(),
            param: param_name.clone(),
            operator: sealing.operator.clone(),
            params: others.clone(),
        };
        *value = rct_bus::sealed::seal(recipients, &binding, value).map_err(|e| {
            Error::usage(format!(
                "not submitted: cannot seal secret parameter {param_name}: {e}"
            ))
        })?;
    }
    Ok((
        proto::Run {
            target: checked.target.to_string(),
            params,
            dry_run: fire.dry_run,
            break_glass,
            plan: fire.plan,
            undo_of: fire.undo_of.map(|id| id.to_string()).unwrap_or_default(),
            rollout: None,
        },
        justification,
    ))
}

/// The rollout asked for, checked with admission's words before anything is sent: its
/// targets resolved (names and patterns, in order) and its limits read.
fn rollout_request(
    catalog: &rct_bus::catalog::Catalog,
    tower: &rct_bus::catalog::TowerSpec,
    operation: &rct_bus::catalog::Operation,
    name: &OperationName,
    param: &str,
    targets: String,
    fire: &Fire,
) -> Result<(String, proto::RolloutPlan)> {
    let Some(fan_out) = &operation.fan_out else {
        return Err(not_submitted(
            name,
            &[format!(
                "{name} runs on one target at a time (its catalog entry has no `fan_out`): give \
                 one {param}"
            )],
        ));
    };
    if fire.plan || fire.break_glass.is_some() || fire.undo_of.is_some() {
        return Err(not_submitted(
            name,
            &[
                "a rollout cannot be a plan, break the glass or undo a command: run those one \
               target at a time"
                    .to_owned(),
            ],
        ));
    }
    let plan = rct_bus::rollout::resolve(
        &tower.targets,
        param,
        fan_out.max_targets,
        &fire.fan.rollout(targets),
    )
    .map_err(|e| not_submitted(name, &[e]))?;
    if let Some(health) = &fire.fan.health {
        let named = health
            .parse::<OperationName>()
            .ok()
            .filter(|h| h.tower() == name.tower());
        let takes_target = |op: &rct_bus::catalog::Operation| {
            op.params
                .values()
                .any(|p| p.kind == rct_bus::catalog::Type::Target)
        };
        if !named
            .as_ref()
            .and_then(|h| catalog.operation(h).map(|(_, op)| op))
            .is_some_and(takes_target)
        {
            return Err(not_submitted(
                name,
                &[format!(
                    "the health check {health} must be an operation of tower {} that takes a \
                     target (rct ops {} lists them)",
                    name.tower(),
                    name.tower()
                )],
            ));
        }
    }
    Ok((param.to_owned(), plan))
}

/// `params` with `param` (when a rollout's) set to `target`.
fn with_target(
    params: &BTreeMap<String, proto::Value>,
    param: Option<&str>,
    target: &str,
) -> BTreeMap<String, proto::Value> {
    let mut params = params.clone();
    if let Some(param) = param {
        params.insert(
            param.to_owned(),
            proto::Value {
                kind: Some(proto::value::Kind::Target(target.to_owned())),
            },
        );
    }
    params
}

fn not_submitted(name: &OperationName, problems: &[String]) -> Error {
    Error::usage(format!(
        "not submitted:\n  {}\n(rct ops describe {name} shows the parameters)",
        problems.join("\n  ")
    ))
}

/// A submission as `RCT_SUBMIT` stored it.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The command id it asks for.
    pub id: CommandId,
    /// Its tower (where admission records a refusal it cannot put under `id`).
    pub tower: rct_bus::Tower,
    /// Its sequence in `RCT_SUBMIT`.
    pub sequence: u64,
    /// About when it was stored.
    pub at: OffsetDateTime,
    /// Its `expires_at`: admission refuses it after this.
    pub expires_at: OffsetDateTime,
    /// `RCT_EVT`'s next sequence just before it was stored (decisions about it come at or
    /// after it), if the stream's state could be read.
    pub events_from: Option<u64>,
}

/// Signs and publishes a submission as `command_id`.
pub async fn submit(
    remote: &Remote,
    session: &Session,
    command_id: CommandId,
    name: &OperationName,
    justification: &str,
    request: proto::submission::Request,
) -> Result<Stored> {
    // Decisions about it are stored after this; where it cannot be read, by time.
    let events_from = match remote
        .js
        .get_stream(rct_streams::topology::EVENT_STREAM)
        .await
    {
        Ok(stream) => Some(stream.cached_info().state.last_sequence + 1),
        Err(_) => None,
    };
    let now = OffsetDateTime::now_utc();
    let expires_at = now + request_ttl();
    let submission = proto::Submission {
        command_id: command_id.to_string(),
        operation: name.to_string(),
        justification: justification.to_owned(),
        requested_at: Some(from_datetime(now)),
        expires_at: Some(from_datetime(expires_at)),
        client: Some(proto::ClientInfo {
            agent: format!("rct/{}", env!("CARGO_PKG_VERSION")),
            host: nix_hostname(),
        }),
        request: Some(request),
    };
    let envelope = session.sign(&submission);
    // The operation's trace starts here; admission and the agent continue it.
    let outgoing = Outgoing::new(
        Subject::submit(name),
        command_id.msg_id(),
        envelope.encode_to_vec().into(),
    )
    .header(TRACEPARENT, &TraceContext::root().to_string());
    let slot = Publisher::new(remote.js.clone())
        .send(outgoing)
        .await
        .map_err(|e| match e {
            // Sent, never acknowledged: it may be on record. Firing again would be another
            // command, so say how to find out first.
            rct_streams::Error::Unacknowledged {
                attempts, cause, ..
            } => Error::usage(format!(
                "cannot submit {name}: NATS did not acknowledge command {command_id} after \
                 {attempts} tries ({cause}). It may or may not be on record: check with \
                 `rct status {command_id}` before firing again (a new rct call is a new command)"
            )),
            rct_streams::Error::Publish { cause, .. }
                if cause.kind()
                    == async_nats::jetstream::context::PublishErrorKind::StreamNotFound =>
            {
                Error::usage(format!(
                    "cannot submit {name}: no stream took it, so nothing was stored and nothing \
                     will run. RCT_SUBMIT is unavailable: its NATS servers lost their quorum, or \
                     it was never provisioned. Fire again once NATS is healthy"
                ))
            }
            e => Error::usage(format!("cannot submit {name} (nothing was stored): {e}")),
        })?;
    let sequence = match slot {
        rct_streams::Slot::Written(ack) => ack.sequence,
        rct_streams::Slot::Taken { sequence } => sequence,
    };
    Ok(Stored {
        id: command_id,
        tower: name.tower().clone(),
        sequence,
        at: now,
        expires_at,
        events_from,
    })
}

fn nix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// How long to wait for admission's decision before saying it has none yet;
/// `RCT_DECISION_WAIT` (e.g. `10s`) changes it.
const DECISION_WAIT: Duration = Duration::from_secs(30);

/// How long a request may wait for admission (its `expires_at`: admission refuses it after);
/// `RCT_REQUEST_TTL` changes it.
const REQUEST_TTL: Duration = Duration::from_secs(60);

/// How far behind admission's clock may be (admission's default `clock_skew`): once a
/// request's `expires_at` is this far past, no admission admits it any more.
const CLOCK_SKEW: time::Duration = time::Duration::seconds(30);

fn decision_wait() -> Duration {
    duration_from_env(rct_streams::runtime::ENV_DECISION_WAIT).unwrap_or(DECISION_WAIT)
}

fn request_ttl() -> time::Duration {
    let ttl = duration_from_env(rct_streams::runtime::ENV_REQUEST_TTL).unwrap_or(REQUEST_TTL);
    time::Duration::try_from(ttl).unwrap_or(time::Duration::MINUTE)
}

fn duration_from_env(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
}

/// The latest a request can still be admitted: its expiry plus [`CLOCK_SKEW`] for
/// admission's clock. For a request this rct stored, its own `expires_at`; for any other id,
/// a horizon no request outlives ([`ANY_REQUEST`] after the id was made).
pub(crate) fn decided_by(id: CommandId, stored: Option<&Stored>) -> OffsetDateTime {
    match stored {
        Some(stored) => stored.expires_at + CLOCK_SKEW,
        None => OffsetDateTime::from(id.timestamp()) + ANY_REQUEST,
    }
}

/// Longer than any request waits for admission (admission refuses requests older than its
/// `freshness`, at most a year but 2 minutes by default): an id with nothing on record after
/// this long names no command.
const ANY_REQUEST: time::Duration = time::Duration::hours(1);

/// Whether a live agent of `tower` serves `target` now (`rct_agents`); `None` when the
/// bucket cannot be read.
async fn agent_serves(remote: &Remote, operation: &str, target: &str) -> Option<bool> {
    let tower = operation.split('/').next()?;
    let prefix = format!("{tower}.{target}.");
    let live = rct_streams::journal::presences(&remote.js).await.ok()?;
    Some(live.iter().any(|(key, _)| key.starts_with(&prefix)))
}

/// `id`'s events, checked: history, then live, resuming as the connection comes back.
async fn follow_command(
    remote: &Remote,
    id: CommandId,
) -> Result<impl futures::Stream<Item = rct_streams::Result<Item>> + Unpin + use<>> {
    replay::follow_reconnecting(
        &remote.js,
        &remote.checked(Filter::command(id)).await,
        remote.connected.clone(),
    )
    .await
    .map_err(|e| Error::usage(format!("cannot watch {id}: {e}")))
}

/// Waits (at most the decision wait) for `id`'s decision and says what it was: exit 0 when
/// admitted, 3 when refused, 4 when not decided yet.
pub async fn decision(remote: &Remote, stored: &Stored) -> Result {
    let id = stored.id;
    let mut events = follow_command(remote, id).await?;
    let wait = decision_wait();
    let own = async {
        while let Some(item) = events.next().await {
            // A request waiting for approvals is answered for now: it waits.
            if let Ok(Item::Event(record)) = item
                && matches!(
                    record.kind,
                    rct_bus::EventKind::Decision | rct_bus::EventKind::Pending
                )
                && record.provenance.counts()
            {
                return Some(render::shown(record));
            }
        }
        None
    };
    let elsewhere = Box::pin(refused_elsewhere(remote, stored));
    let either = async {
        tokio::select! {
            record = own => record.map(|r| (r, false)),
            Some(record) = elsewhere => Some((record, true)),
        }
    };
    let decided = tokio::time::timeout(wait, either).await;
    match decided {
        Ok(Some((record, elsewhere))) => {
            if elsewhere {
                eprintln!(
                    "{}: admission recorded it as {}, as it cannot be recorded under {id}",
                    render::describe(&record.event),
                    record.event.command_id
                );
            } else {
                eprintln!(
                    "{}; watch with: rct watch {id}",
                    render::describe(&record.event)
                );
            }
            Ok(match record.event.kind {
                Some(Kind::Rejected(_)) => Exit::Rejected,
                _ => Exit::Ok,
            })
        }
        Ok(None) => Err(Error::usage("the event stream ended")),
        Err(_) if OffsetDateTime::now_utc() > decided_by(id, Some(stored)) => {
            eprintln!(
                "{id} was not decided by {}: it will not run (admission refuses a request once \
                 it has expired)",
                render::datetime(decided_by(id, Some(stored)))
            );
            Ok(Exit::Failed)
        }
        Err(_) => {
            eprintln!(
                "{id} is stored, and not decided after {}s: admission may be down. If admission \
                 returns before {} at the latest, it decides it then; after that it refuses it \
                 as expired, and it never runs. Do not fire it again. Watch with: rct watch {id}",
                wait.as_secs(),
                render::datetime(decided_by(id, Some(stored)))
            );
            Ok(Exit::NotKnown)
        }
    }
}

/// `admitted` (operation, target), when no live agent serves it: said, with the deadline.
async fn missing_agent(
    remote: &Remote,
    admitted: &(String, String),
    deadline: Option<OffsetDateTime>,
) -> Option<(String, String)> {
    let (operation, target) = admitted;
    // A rollout is run by admission's coordinator; its children by agents.
    if target == rct_bus::rollout::PARENT_TARGET
        || agent_serves(remote, operation, target).await != Some(false)
    {
        return None;
    }
    eprintln!(
        "no live agent serves {operation} on {target} now (rct agents): it waits for one until \
         its deadline, {}",
        deadline.map_or_else(|| "?".to_owned(), render::datetime)
    );
    Some(admitted.clone())
}

/// A last look before saying a command will not run: whether anything is on record for it
/// after all (a decision stored but not delivered yet).
async fn decided_late(remote: &Remote, id: CommandId) -> bool {
    replay::records(&remote.js, &remote.checked(Filter::command(id)).await)
        .await
        .is_ok_and(|history| history.iter().any(|r| r.provenance.counts()))
}

/// How long past a request's approval expiry watching waits for admission to refuse it
/// (admission looks over waiting requests every few seconds).
const APPROVAL_GRACE: time::Duration = time::Duration::seconds(60);

/// While no agent serves an admitted command, how often watching says so.
const NO_AGENT_REMINDER: Duration = Duration::from_secs(15);

/// Shows a command's events from the start until its outcome; the exit code follows it.
pub async fn watch(remote: &Remote, id: CommandId, output: Output) -> Result {
    watch_submitted(remote, id, None, output).await
}

/// While a watch runs: says when the connection to NATS is lost and when it is back. The
/// watch itself resumes where it was (it reads on from the last event it delivered), so
/// nothing is missed or shown twice. Stops when dropped.
pub(crate) fn say_connection(
    mut connected: tokio::sync::watch::Receiver<bool>,
    id: Option<CommandId>,
) -> tokio_util::task::AbortOnDropHandle<()> {
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let mut up = *connected.borrow_and_update();
        while connected.changed().await.is_ok() {
            match (*connected.borrow_and_update(), up) {
                (false, true) => eprintln!(
                    "NATS connection lost: reconnecting… (commands go on; reading resumes \
                     without missing an event)"
                ),
                (true, false) => match id {
                    Some(id) => {
                        eprintln!("reconnected to NATS: watching {id} again, from where it was");
                    }
                    None => eprintln!("reconnected to NATS: reading on from where it was"),
                },
                _ => {}
            }
            up = *connected.borrow();
        }
    }))
}

/// A refusal admission recorded under an id of its own for the submission `stored` (it could
/// not put it under the id the submission asked for: an unverifiable certificate, a taken
/// id): its tower's decisions are followed for one that names the submission's sequence.
async fn refused_elsewhere(remote: &Remote, stored: &Stored) -> Option<Record> {
    let filter = Filter {
        tower: Some(stored.tower.clone()),
        kind: Some(rct_bus::EventKind::Decision),
        from_sequence: stored.events_from,
        since: stored
            .events_from
            .is_none()
            .then(|| stored.at - time::Duration::seconds(30)),
        ..Filter::default()
    };
    let mut decisions = replay::follow(&remote.js, &remote.checked(filter).await)
        .await
        .ok()?;
    while let Some(item) = decisions.next().await {
        let Ok(Item::Event(record)) = item else {
            continue;
        };
        if !record.provenance.counts() {
            continue;
        }
        let Some(Kind::Rejected(rejected)) = &record.event.kind else {
            continue;
        };
        let ours = rejected
            .request
            .as_ref()
            .is_some_and(|r| r.submission_sequence == stored.sequence);
        if ours && record.event.command_id != stored.id.to_string() {
            return Some(render::shown(record));
        }
    }
    None
}

/// [`watch`], for a submission this rct just stored: a refusal recorded under another id is
/// reported too, as soon as it is recorded.
pub async fn watch_submitted(
    remote: &Remote,
    id: CommandId,
    stored: Option<&Stored>,
    output: Output,
) -> Result {
    let mut events = follow_command(remote, id).await?;
    // Fused: once it has answered (or given up), it never answers again. On the heap: it
    // holds a follow of its own.
    let mut elsewhere = Box::pin(futures::FutureExt::fuse(async {
        match stored {
            Some(stored) => refused_elsewhere(remote, stored).await,
            None => std::future::pending().await,
        }
    }));
    let _connection = say_connection(remote.connected.clone(), Some(id));
    let mut live = Live::new(output);
    let mut decided = false;
    let mut started = false;
    let mut deadline: Option<OffsetDateTime> = None;
    let mut refused: Option<String> = None;
    let decision_wait = decision_wait();
    let decided_by = decided_by(id, stored);
    // Agents are looked for once the history is read: a replayed admission may have been
    // followed by its start long ago.
    let mut caught_up = false;
    let mut look_for_agent = false;
    let mut record_of_admission = (String::new(), String::new());
    let mut told_undecided = false;
    // While the request waits for approvals: until when.
    let mut awaiting: Option<OffsetDateTime> = None;
    // While admitted and not started: (operation, target) whose agent is missing, and when
    // that was last said.
    let mut no_agent: Option<(String, String)> = None;
    // The command's tower and target, from its decision: what is written under its id
    // anywhere else is not its history (see `rct_streams::projection`).
    let mut own: Option<(rct_bus::Tower, rct_bus::Target)> = None;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let until = |at: OffsetDateTime| -> Duration {
            (at - OffsetDateTime::now_utc())
                .try_into()
                .unwrap_or(Duration::ZERO)
        };
        let wait = if let (false, Some(at)) = (decided, awaiting) {
            until(at + APPROVAL_GRACE)
        } else if !decided && !told_undecided {
            decision_wait
        } else if !decided {
            until(decided_by)
        } else if !started {
            let to_deadline = deadline
                .map(|d| until(d + time::Duration::seconds(5)))
                .unwrap_or(Duration::from_secs(5));
            // With no agent, a line every so often says so, and how long is left.
            if no_agent.is_some() {
                to_deadline.min(NO_AGENT_REMINDER)
            } else {
                to_deadline
            }
        } else {
            Duration::MAX
        };
        let item = tokio::select! {
            Some(record) = &mut elsewhere, if !decided => {
                eprintln!(
                    "{}: admission recorded it as {}, as it cannot be recorded under {id}",
                    render::describe(&record.event),
                    record.event.command_id
                );
                return Ok(Exit::Rejected);
            }
            _ = &mut interrupted => {
                eprintln!("\ndetached; {id} goes on. Reattach: rct watch {id}   Cancel: rct cancel {id}");
                return Err(Error { exit: Exit::Interrupted, message: String::new() });
            }
            item = tokio::time::timeout(wait, events.next()) => item,
        };
        let record = match item {
            Err(_) if !decided && awaiting.is_some() => {
                eprintln!(
                    "{id} waited for approvals until {}, and no decision is on record since: \
                     admission may be down. When it is back it decides it: refused as expired, \
                     or admitted if its approvals were all in before then. Watch with: rct \
                     watch {id}",
                    awaiting.map_or_else(|| "?".into(), render::datetime)
                );
                return Ok(Exit::NotKnown);
            }
            Err(_) if !decided && !told_undecided && OffsetDateTime::now_utc() < decided_by => {
                told_undecided = true;
                let what = match stored {
                    Some(stored) => format!(
                        "{id} is stored (RCT_SUBMIT {}), and not decided after {}s",
                        stored.sequence,
                        decision_wait.as_secs()
                    ),
                    None => format!(
                        "nothing is on record for {id} after {}s; if it was submitted, it is not \
                         decided yet",
                        decision_wait.as_secs()
                    ),
                };
                eprintln!(
                    "{what}: admission may be down. If admission returns before {} at the \
                     latest, it decides it then; after that it refuses it as expired, and it \
                     never runs. Do not fire it again: that would be a second command. Still \
                     watching (Ctrl-C detaches; rct watch {id} reattaches)",
                    render::datetime(decided_by)
                );
                continue;
            }
            Err(_) if !decided && !decided_late(remote, id).await => {
                eprintln!(
                    "{id} was not decided by {}: it will not run (admission refuses a request \
                     once it has expired). Fire it again if it is still needed",
                    render::datetime(decided_by)
                );
                return Ok(Exit::Failed);
            }
            // Decided meanwhile: the follow delivers it.
            Err(_) if !decided => continue,
            Err(_)
                if !started
                    && no_agent.is_some()
                    && deadline.is_some_and(|d| OffsetDateTime::now_utc() < d) =>
            {
                let (operation, target) = no_agent.clone().unwrap_or_default();
                let left = deadline.map(until).unwrap_or_default();
                match agent_serves(remote, &operation, &target).await {
                    Some(true) => {
                        eprintln!("an agent for {operation} on {target} is live now");
                        no_agent = None;
                    }
                    // Absent, or the bucket unreadable: nothing new to say but the time left.
                    _ => eprintln!(
                        "still no live agent for {operation} on {target}; {}s left before its \
                         deadline",
                        left.as_secs()
                    ),
                }
                continue;
            }
            Err(_) => {
                match &refused {
                    Some(reason) => eprintln!(
                        "{id} was not started before its deadline: its agent refused it ({reason})"
                    ),
                    None => eprintln!(
                        "{id} was not started before its deadline: no agent took it (rct agents \
                         shows who is running)"
                    ),
                }
                return Ok(Exit::Failed);
            }
            Ok(None) => return Err(Error::usage("the event stream ended")),
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "while watching");
                continue;
            }
            Ok(Some(Ok(Item::CaughtUp))) => {
                if !decided
                    && awaiting.is_none()
                    && stored.is_none()
                    && OffsetDateTime::now_utc() >= decided_by
                {
                    return Err(Error::usage(format!(
                        "no such command: nothing is on record for {id}, and a request made \
                         then can no longer be decided"
                    )));
                }
                caught_up = true;
                if look_for_agent && !started {
                    no_agent = missing_agent(remote, &record_of_admission, deadline).await;
                }
                continue;
            }
            Ok(Some(Ok(Item::Event(record)))) => record,
        };
        if let Some(why) = record.provenance.doubt() {
            eprintln!(
                "UNVERIFIED: a {} event under {id}, not this command's ({why}): ignored",
                record.kind
            );
            continue;
        }
        let decision = matches!(
            record.kind,
            rct_bus::EventKind::Decision | rct_bus::EventKind::Pending
        );
        if own.is_none() && decision {
            own = Some((record.tower.clone(), record.target.clone()));
        }
        if own
            .as_ref()
            .is_none_or(|(t, g)| *t != record.tower || *g != record.target)
        {
            eprintln!(
                "UNVERIFIED: a {} event under {id} at {} {}, not this command's: ignored",
                record.kind, record.tower, record.target
            );
            continue;
        }
        match &record.event.kind {
            Some(Kind::Admitted(a)) => {
                decided = true;
                deadline = a.deadline.as_ref().and_then(to_datetime);
                record_of_admission = (record.event.operation.clone(), record.event.target.clone());
                if caught_up {
                    no_agent = missing_agent(remote, &record_of_admission, deadline).await;
                } else {
                    look_for_agent = true;
                }
            }
            Some(Kind::Rejected(_)) => decided = true,
            Some(Kind::Pending(p)) => {
                awaiting = p
                    .expires_at
                    .as_ref()
                    .and_then(to_datetime)
                    .or(Some(OffsetDateTime::now_utc()));
            }
            // Approvals come before the decision.
            Some(Kind::Approval(_)) => {}
            Some(Kind::Started(_)) => {
                decided = true;
                started = true;
                no_agent = None;
            }
            Some(_) => decided = true,
            None => {}
        }
        if let Some(exit) = live.show(&record) {
            return Ok(exit);
        }
        // An agent refused it: for good (nothing will run it, so nothing to wait for), or
        // for now (it is delivered again until its deadline: say why while waiting).
        if !started && let Some(note) = rct_bus::refusal_note(&record.event) {
            if note.dropped {
                eprintln!(
                    "{id} will not run: {}. Fix the agent (rct agents), then submit it again",
                    printable(note.reason)
                );
                return Ok(Exit::Failed);
            }
            eprintln!(
                "{id} is not started yet: {}. Waiting until its deadline",
                printable(note.reason)
            );
            refused = Some(printable(note.reason).into_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served() -> Served {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/catalog.example.yaml");
        let catalog: rct_bus::catalog::Catalog =
            serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        Served {
            version: catalog.version(),
            catalog,
        }
    }

    fn sealing(command_id: CommandId) -> Sealing {
        Sealing {
            command_id,
            operator: "alice".into(),
        }
    }

    fn fire(justification: &str) -> Fire {
        Fire {
            justification: Some(justification.into()),
            ..Fire::default()
        }
    }

    #[test]
    fn parameters_are_checked_with_admissions_words_before_submitting() {
        let name: OperationName = "traffic/drain-cluster".parse().unwrap();
        let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let (run, _) = request(
            &served(),
            &name,
            pairs(&[("cluster", "prod-2"), ("keep-percent", "5")]),
            &fire("SRE-1"),
            &sealing(CommandId::generate()),
        )
        .unwrap();
        assert_eq!(run.target, "prod-2");
        assert_eq!(run.params.len(), 2);

        let error = request(
            &served(),
            &name,
            pairs(&[("cluster", "prod-9"), ("keep_percent", "150")]),
            &fire("SRE-1"),
            &sealing(CommandId::generate()),
        )
        .unwrap_err();
        assert!(
            error
                .message
                .contains("cluster must be one of prod-1, prod-2, prod-3, prod-4"),
            "{error}"
        );
        let error = request(
            &served(),
            &name,
            pairs(&[("cluster", "prod-1"), ("keep_percent", "150")]),
            &fire("SRE-1"),
            &sealing(CommandId::generate()),
        )
        .unwrap_err();
        assert!(
            error
                .message
                .contains("keep_percent must be an integer from 0 to 100, got 150"),
            "{error}"
        );
        let error = request(
            &served(),
            &name,
            pairs(&[("cluster", "prod-1")]),
            &fire(""),
            &sealing(CommandId::generate()),
        )
        .unwrap_err();
        assert!(
            error
                .message
                .contains("needs a justification matching [A-Z]+-[0-9]+"),
            "{error}"
        );
        assert_eq!(error.exit, Exit::Usage);
    }

    /// A secret is checked in clear, then sealed for this command: only the tower's key opens
    /// it, and nothing of the clear value is in the request.
    #[test]
    fn secrets_are_checked_then_sealed_for_this_command() {
        let name: OperationName = "workloads/set-secret".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("value");
        std::fs::write(&file, "hunter2\n").unwrap();
        let raw = |value: &str| {
            [
                ("namespace", "shop"),
                ("name", "db"),
                ("key", "password"),
                ("value", value),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
        };
        let id = CommandId::generate();
        let at = format!("@{}", file.display());
        let (run, _) = request(&served(), &name, raw(&at), &fire("SEC-1"), &sealing(id)).unwrap();
        let Some(proto::value::Kind::Sealed(sealed)) = &run.params["value"].kind else {
            panic!("not sealed: {:?}", run.params["value"]);
        };
        assert!(!format!("{run:?}").contains("hunter2"));
        let keys = rct_bus::sealed::Keys::parse(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../ops/examples/workloads.agekey"
            ))
            .unwrap(),
        )
        .unwrap();
        let others = rct_bus::sealed::params_digest(&run.params, |n| n == "value");
        let binding = |command_id: CommandId| rct_bus::sealed::Binding {
            command_id: command_id.to_string(),
            operation: name.to_string(),
            target: "_".into(),
            param: "value".into(),
            operator: "alice".into(),
            params: others.clone(),
        };
        let opened = keys.open(sealed, &binding(id)).unwrap();
        assert_eq!(
            opened.kind,
            Some(proto::value::Kind::String("hunter2".into()))
        );
        assert!(keys.open(sealed, &binding(CommandId::generate())).is_err());

        // Too long for the catalog: refused here, in clear words, without the value.
        let long = "x".repeat(5000);
        let error =
            request(&served(), &name, raw(&long), &fire("SEC-1"), &sealing(id)).unwrap_err();
        assert!(
            error.message.contains("value must be at most 4096"),
            "{error}"
        );
        assert!(!error.message.contains("xxxx"), "{error}");
    }
}
