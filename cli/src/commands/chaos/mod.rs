//! `rct chaos`: fault injection with a checker, on the real processes.
//!
//! Per seed: nats-server (one, or three nodes with R3 streams), two admission replicas and one
//! or two agents per target, each its own process (this binary's hidden `chaos-admission` and
//! `chaos-agent` verbs). A workload submits signed requests while a seeded schedule injects
//! faults ([`fault`]): it kills (SIGKILL) and pauses (SIGSTOP) servers, admission replicas and
//! agents, takes the catalog bucket away, and submits commands whose handler panics or whose
//! script misbehaves. Each fault must show it bit (a killed process is gone, a paused one
//! stopped making progress, a restarted one served again, a misbehaving command left the
//! trace it must); a fault that did not bite fails the run.
//!
//! The agents' handlers write an effect ledger: one `begin <id>` line before the effect and
//! `end <id>` after. Once every fault is over and everything is decided and finished (or the
//! drain time is up), the checker ([`check`]) reads the three streams and the ledger.
//!
//! It prints a table and exits 1 on any violation. docs/RELIABILITY.md records large runs.

mod check;
mod fault;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use prost::Message;
use rct_agents::script::Scripts;
use rct_agents::{Context, Failure, Outcome, Params};
use rct_bus::proto;
use rct_bus::{CommandId, KeyPair, OperationName, Purpose, Subject};
use rct_streams::replay::{self, Filter, Record};
use rct_streams::timestamp::from_datetime;
use rct_streams::{Connection, Outgoing, Publisher};
use time::OffsetDateTime;

use crate::exit::{Error, Exit, Result};
use check::{Fold, Report};
use fault::{Fault, Nats, World};

/// The fault-injection run.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seeds to run: one (`7`) or a range (`1-20`). The seed fixes the fault schedule.
    #[arg(long, default_value = "1")]
    seeds: String,
    /// Submissions per seed.
    #[arg(long, default_value_t = 300)]
    commands: usize,
    /// Targets of the chaos tower.
    #[arg(long, default_value_t = 3)]
    targets: usize,
    /// Agent processes per target (1 or 2; two share the target's consumer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    agents: u8,
    /// Faults of each kind per seed, spread over the workload.
    #[arg(long, default_value_t = 2)]
    faults: usize,
    /// The kinds of fault to inject (comma-separated); all of them by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    kinds: Vec<Fault>,
    /// Submissions per second; by default the workload is spread over the fault schedule,
    /// so that every fault happens under load.
    #[arg(long)]
    rate: Option<f64>,
    /// One nats-server, or a three-node cluster with R3 streams (both fsync every write).
    #[arg(long, value_enum, default_value_t = Topology::Single)]
    topology: Topology,
    /// The settings of streams, admission and agents: chosen so that faults bite, or the
    /// shipped defaults.
    #[arg(long, value_enum, default_value_t = Settings::Faults)]
    settings: Settings,
    /// Keep each seed's folder (process logs, the ledger) under this one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// How long to wait, after the last fault, for every request to be decided and every
    /// admitted command to finish.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    drain: Duration,
}

/// Where the streams live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Topology {
    /// One nats-server.
    Single,
    /// Three nodes, R3 streams.
    Cluster,
}

/// The settings of a run's streams, admission replicas and agents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Settings {
    /// Chosen so that faults bite: consumers redeliver after 2 s with no backoff, agents
    /// heartbeat every second with a 10 s presence TTL.
    Faults,
    /// The shipped defaults of `rct-admission` and `rct-agent` (ack wait and backoff 30 s,
    /// 1 m, 2 m, 5 m; presence TTL 30 s, heartbeat 10 s; their concurrency).
    Production,
}

impl Settings {
    fn streams(self, replicas: usize) -> rct_streams::Config {
        match self {
            Settings::Faults => {
                let consumer = rct_streams::config::Consumer {
                    ack_wait: Duration::from_secs(2),
                    max_deliver: -1,
                    backoff: Vec::new(),
                    max_ack_pending: 256,
                };
                rct_streams::Config {
                    replicas,
                    admission: consumer.clone(),
                    towers: consumer,
                    agent_ttl: Duration::from_secs(10),
                    ..rct_streams::Config::default()
                }
            }
            Settings::Production => rct_streams::Config {
                replicas,
                ..rct_streams::Config::default()
            },
        }
    }

    /// How long a consumer waits for an acknowledgement before it hands a message out again
    /// (the server takes the first backoff step for it).
    fn ack_wait(self) -> Duration {
        let towers = self.streams(1).towers;
        towers.backoff.first().copied().unwrap_or(towers.ack_wait)
    }

    /// How far a request's date may be ahead of admission's clock (`clock_skew`) and behind
    /// it (`freshness`), as this run sets admission.
    fn tolerances(self) -> (time::Duration, time::Duration) {
        let mut config = rct_admission::Config::default();
        self.admission(&mut config);
        let signed = |d: Duration| time::Duration::try_from(d).unwrap_or(time::Duration::MAX);
        (signed(config.clock_skew), signed(config.freshness))
    }

    fn agent_ttl(self) -> Duration {
        self.streams(1).agent_ttl
    }

    fn agent(self, config: &mut rct_agents::Config) {
        config.streams = self.streams(1);
        if self == Settings::Faults {
            config.heartbeat = Duration::from_secs(1);
            config.concurrency = 8;
        }
    }

    fn admission(self, config: &mut rct_admission::Config) {
        if self == Settings::Faults {
            config.freshness = Duration::from_secs(1800);
            config.concurrency = 16;
        }
    }

    /// How long an agent is paused (shortest, longest): past the ack wait (its deliveries
    /// are handed out again) where the presence TTL leaves room, always within the TTL (a
    /// paused agent is not taken for dead).
    fn agent_pauses(self) -> (Duration, Duration) {
        let (wait, ttl) = (self.ack_wait(), self.agent_ttl());
        if wait + Duration::from_secs(3) < ttl {
            (wait + Duration::from_secs(1), wait + Duration::from_secs(3))
        } else {
            (ttl / 3, ttl * 2 / 3)
        }
    }

    fn agent_pause(self, rng: &mut fastrand::Rng) -> Duration {
        let (low, high) = self.agent_pauses();
        rng_between(rng, low, high)
    }

    /// How long an admission replica is paused: past its ack wait, so the other replica gets
    /// its submissions.
    fn admission_pause(self, rng: &mut fastrand::Rng) -> Duration {
        let wait = self.ack_wait();
        rng_between(
            rng,
            wait + Duration::from_secs(1),
            wait + Duration::from_secs(3),
        )
    }
}

fn rng_between(rng: &mut fastrand::Rng, low: Duration, high: Duration) -> Duration {
    Duration::from_millis(rng.u64(low.as_millis() as u64..=high.as_millis() as u64))
}

/// A component process of a chaos run (hidden verbs).
#[derive(Debug, clap::Args)]
pub struct ProcessArgs {
    /// The run's folder (catalog, keys, ledger).
    #[arg(long)]
    dir: PathBuf,
    /// NATS server URLs.
    #[arg(long = "server", required = true)]
    servers: Vec<String>,
    /// This process's name.
    #[arg(long)]
    instance: String,
    /// The agent's target.
    #[arg(long)]
    target: Option<String>,
    /// The run's settings.
    #[arg(long, value_enum, default_value_t = Settings::Faults)]
    settings: Settings,
}

const TOWER: &str = "chaos";
/// Writes one effect to the ledger.
const EFFECT: &str = "chaos/effect";
/// Writes `begin` to the ledger, then panics.
const PANIC: &str = "chaos/panic";
/// A script whose output has wedged commands before (`mode`: flood, huge, orphan).
const SCRIPT: &str = "chaos/script";
const SERVICE_GROUP: &str = "chaos";
/// How long after admission each chaos command may start (its catalog `deadline`).
const DEADLINE_MINUTES: i64 = 30;

fn fail(what: &str, e: impl std::fmt::Display) -> Error {
    Error::usage(format!("{what}: {e}"))
}

/// `rct chaos`.
pub async fn run(args: Args) -> Result {
    check_args(&args)?;
    let seeds = parse_seeds(&args.seeds)?;
    let mut reports = Vec::new();
    for seed in seeds {
        let report = run_seed(&args, seed).await?;
        eprintln!("{}", report.line());
        reports.push(report);
    }
    #[allow(clippy::print_stdout)] // the table is the output
    {
        println!("{}", check::table(&reports, &args));
    }
    Ok(if reports.iter().all(Report::valid) {
        Exit::Ok
    } else {
        Exit::Failed
    })
}

/// The fault kinds of a run: those asked for, or all.
fn kinds(args: &Args) -> Vec<Fault> {
    if args.kinds.is_empty() {
        Fault::ALL.to_vec()
    } else {
        let mut kinds = args.kinds.clone();
        kinds.sort();
        kinds.dedup();
        kinds
    }
}
/// Refuses flag values the run's time arithmetic cannot hold, before anything starts.
fn check_args(args: &Args) -> Result<()> {
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(Error::usage(format!(
            "--rate {rate}: give a number of submissions per second above 0"
        )));
    }
    if let Some(rate) = args.rate {
        workload_time(args.commands, rate)?;
    }
    drain_until(args.drain)?;
    Ok(())
}

/// How long `commands` submissions take at `rate` per second.
fn workload_time(commands: usize, rate: f64) -> Result<Duration> {
    if commands == 0 {
        return Ok(Duration::ZERO);
    }
    Duration::try_from_secs_f64(commands as f64 / rate).map_err(|_| {
        Error::usage(format!(
            "--commands {commands} at --rate {rate} per second would take longer than any clock holds"
        ))
    })
}

/// When a drain of `drain` from now ends.
fn drain_until(drain: Duration) -> Result<Instant> {
    Instant::now().checked_add(drain).ok_or_else(|| {
        Error::usage(format!(
            "--drain {}: too long; give a shorter duration",
            humantime::format_duration(drain)
        ))
    })
}

fn parse_seeds(text: &str) -> Result<Vec<u64>> {
    let bad = || {
        Error::usage(format!(
            "--seeds {text}: write one seed (7) or a range (1-20)"
        ))
    };
    match text.split_once('-') {
        Some((a, b)) => {
            let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if a > b {
                return Err(bad());
            }
            Ok((a..=b).collect())
        }
        None => Ok(vec![text.parse().map_err(|_| bad())?]),
    }
}

fn catalog(targets: usize) -> String {
    let targets: Vec<String> = (1..=targets).map(|i| format!("t{i}")).collect();
    let operation = |name: &str, description: &str, params: &str| {
        format!(
            "  {name}:\n    description: {description}\n    allowed_groups: [{SERVICE_GROUP}]\n    \
             params:\n      target: {{ type: target }}\n{params}    deadline: {DEADLINE_MINUTES}m\n    timeout: 5m\n"
        )
    };
    format!(
        "towers:\n  {TOWER}:\n    description: Fault injection\n    flavour: cluster\n    \
         targets: [{}]\noperations:\n{}{}{}",
        targets.join(", "),
        operation(
            EFFECT,
            "Writes one effect to the ledger",
            "      work_ms: { type: integer, min: 0, max: 10000, default: 100 }\n"
        ),
        operation(PANIC, "A handler that panics after its effect began", ""),
        operation(
            SCRIPT,
            "A script whose output has wedged commands before",
            "      mode: { type: enum, values: [flood, huge, orphan] }\n"
        ),
    )
}

/// The script of `chaos/script`, between its ledger lines: 20 MB of short lines (over the
/// output budget), one 4 MB line (over the server's max_payload), or a child left holding
/// stdout and stderr (its pid recorded, to check it was stopped).
const SCRIPT_TEXT: &str = r#"#!/bin/sh
mode=$2
echo "begin $RCT_COMMAND_ID" >> "$LEDGER"
case "$mode" in
flood) yes 'a line of flood output' | head -c 20000000 ;;
huge) head -c 4000000 /dev/zero | tr '\0' x; echo ;;
orphan) sleep 3600 & echo $! > "$ORPHANS/$RCT_COMMAND_ID" ;;
*) echo "unknown mode $mode" >&2; exit 2 ;;
esac
echo "end $RCT_COMMAND_ID" >> "$LEDGER"
echo "$mode done"
"#;

/// The scripts file of the agents (each sets its own target).
fn scripts_yaml(dir: &Path) -> String {
    format!(
        "tower: {TOWER}\noperations:\n  script:\n    command: {}\n    args: [\"--\", \"{{mode}}\"]\n    \
         env:\n      LEDGER: {}\n      ORPHANS: {}\n    timeout: 5m\n",
        dir.join("chaos.sh").display(),
        dir.join("ledger").join("scripts.log").display(),
        dir.join("orphans").display(),
    )
}

// ---------------------------------------------------------------------------------------------
// The component processes.

/// `rct chaos-admission`: one admission replica of a run.
pub async fn admission(args: ProcessArgs) -> Result {
    // Its log is evidence: a restarted replica must say it is ready again.
    let _logging = rct_streams::runtime::init_logging("rct-chaos-admission");
    let service = std::fs::read_to_string(args.dir.join("service.pub"))
        .map_err(|e| fail("cannot read service.pub", e))?;
    let mut config = rct_admission::Config {
        nats: Connection {
            inbox_prefix: Some("_INBOX_admission".into()),
            ..Connection::to(args.servers)
        },
        role: rct_admission::Role::Decide,
        instance: args.instance.clone(),
        catalog: args.dir.join("catalog.yaml"),
        signing_key: args.dir.join("admission.key"),
        services: vec![rct_admission::identity::ServiceConfig {
            name: "chaos-workload".into(),
            public_key: service,
            groups: vec![SERVICE_GROUP.into()],
        }],
        // Operators log in with development tokens: half the workload is theirs.
        dev_issuer: true,
        ..rct_admission::Config::default()
    };
    args.settings.admission(&mut config);
    let client = config
        .nats
        .connect(&format!("chaos admission {}", args.instance), true)
        .await
        .map_err(|e| fail("cannot connect", e))?;
    rct_admission::run(config, client, rct_streams::runtime::shutdown_on_signal())
        .await
        .map_err(|e| fail("admission stopped", e))?;
    Ok(Exit::Ok)
}

/// `rct chaos-agent`: an agent of one target, writing the effect ledger.
pub async fn agent(args: ProcessArgs) -> Result {
    // Its log is evidence: an agent must say when it misses the catalog.
    let _logging = rct_streams::runtime::init_logging("rct-chaos-agent");
    let target = args
        .target
        .ok_or_else(|| Error::usage("chaos-agent needs --target"))?;
    let mut config = rct_agents::Config {
        nats: Connection::to(args.servers),
        instance: args.instance.clone(),
        trusted_keys: vec![args.dir.join("admission.pub")],
        ..rct_agents::Config::default()
    };
    args.settings.agent(&mut config);
    config.scope_inbox(TOWER, Some(&target));
    let ledger = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(
            args.dir
                .join("ledger")
                .join(format!("{}.log", args.instance)),
        )
        .map_err(|e| fail("cannot open the ledger", e))?;
    let ledger = Arc::new(Mutex::new(ledger));
    let mut scripts = Scripts::load(&args.dir.join("scripts.yaml")).map_err(Error::usage)?;
    scripts.target = Some(target);
    let client = config
        .nats
        .connect(&format!("chaos agent {}", args.instance), true)
        .await
        .map_err(|e| fail("cannot connect", e))?;
    let panics = ledger.clone();
    scripts
        .tower()
        .operation("effect", move |ctx, params| {
            effect(ledger.clone(), ctx, params)
        })
        .operation("panic", move |ctx, _params| {
            let ledger = panics.clone();
            async move {
                write_ledger(&ledger, format!("begin {}\n", ctx.command_id()))?;
                panic!("chaos: a handler that panics");
            }
        })
        .config(config)
        .run(client, rct_streams::runtime::shutdown_on_signal())
        .await
        .map_err(|e| fail("the agent stopped", e))?;
    Ok(Exit::Ok)
}

/// One `write` per line, appended.
fn write_ledger(ledger: &Mutex<std::fs::File>, line: String) -> std::result::Result<(), Failure> {
    let mut file = ledger.lock().unwrap_or_else(|p| p.into_inner());
    file.write_all(line.as_bytes())
        .map_err(|e| Failure::new("ledger", e.to_string()))
}

/// The effect: a ledger line before and after some work.
async fn effect(
    ledger: Arc<Mutex<std::fs::File>>,
    ctx: Context,
    params: Params,
) -> std::result::Result<Outcome, Failure> {
    write_ledger(&ledger, format!("begin {}\n", ctx.command_id()))?;
    let work = Duration::from_millis(params.i64("work_ms").unwrap_or(100).max(0) as u64);
    tokio::select! {
        _ = ctx.cancelled() => return Err(Failure::new("cancelled", "stopped on request")),
        _ = tokio::time::sleep(work) => {}
    }
    write_ledger(&ledger, format!("end {}\n", ctx.command_id()))?;
    Ok(Outcome::new("effect written"))
}

// ---------------------------------------------------------------------------------------------
// One seed.

async fn run_seed(args: &Args, seed: u64) -> Result<Report> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);
    let (temp, dir) = match &args.dir {
        Some(root) => (None, root.join(format!("seed-{seed}"))),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("rct-chaos-")
                .tempdir()
                .map_err(|e| fail("cannot create a folder", e))?;
            let dir = temp.path().to_owned();
            (Some(temp), dir)
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["ledger", "logs", "orphans"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| fail("cannot create a folder", e))?;
    }
    let admission_key = KeyPair::generate();
    let service = KeyPair::generate();
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).map_err(|e| fail(&format!("cannot write {name}"), e))
    };
    write("catalog.yaml", catalog(args.targets))?;
    write("admission.key", admission_key.to_pem())?;
    write("admission.pub", admission_key.public().to_pem())?;
    write("service.pub", service.public().to_pem())?;
    write("chaos.sh", SCRIPT_TEXT.into())?;
    write("scripts.yaml", scripts_yaml(&dir))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("chaos.sh"), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| fail("cannot make chaos.sh executable", e))?;
    }

    let nats = Nats::start(args.topology).await;
    let urls = nats.urls();
    let connection = Connection {
        timeout: Duration::from_secs(5),
        ..Connection::to(urls.clone())
    };
    let client = connection
        .connect("chaos workload", true)
        .await
        .map_err(|e| fail("cannot connect", e))?;
    let js = connection.jetstream(client);
    let config = rct_admission::Config {
        catalog: dir.join("catalog.yaml"),
        streams: args.settings.streams(nats.replicas()),
        ..rct_admission::Config::default()
    };
    rct_admission::provision(&js, &config)
        .await
        .map_err(|e| fail("cannot provision", e))?;

    let targets: Vec<String> = (1..=args.targets).map(|i| format!("t{i}")).collect();
    let mut submitter = Submitter {
        publisher: Publisher::new(js.clone()),
        service: Arc::new(service),
        operator: None,
        count: Arc::default(),
        outcomes: Arc::default(),
        sending: Arc::default(),
    };
    let mut world = World::start(
        nats,
        js.clone(),
        dir.clone(),
        args.settings,
        &targets,
        args.agents.into(),
        submitter.clone(),
    )?;
    crate::stack::wait_for_agents(
        &js,
        targets.len() * usize::from(args.agents),
        "",
        Duration::from_secs(60),
    )
    .await?;
    let token =
        crate::commands::login::dev_token(&js.client(), "chaos-operator", &[SERVICE_GROUP.into()])
            .await?;
    submitter.operator = Some(Arc::new(
        crate::commands::login::exchange(&js.client(), &token).await?,
    ));
    world.submitter = submitter.clone();

    // The workload runs while the faults happen, spread over the whole schedule.
    let schedule = fault::schedule(&kinds(args), args.faults, args.settings, &mut rng);
    let span: Duration = schedule.iter().map(|(_, slot)| *slot).sum();
    let rate = args
        .rate
        .unwrap_or_else(|| args.commands as f64 / span.as_secs_f64().max(1.0));
    let workload_time = workload_time(args.commands, rate)?;
    let workload = tokio::spawn(workload(
        submitter.clone(),
        targets.clone(),
        (args.commands, rate),
        seed,
    ));
    // Each fault at a seeded moment of its slot; the slots fill the workload's time.
    let faults_started = Instant::now();
    let scale = workload_time.as_secs_f64() / span.as_secs_f64().max(f64::MIN_POSITIVE);
    let mut at = Duration::ZERO;
    let mut faults: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (fault, slot) in schedule {
        let start = at + slot.mul_f64(rng.f64() * 0.2);
        at += slot;
        tokio::time::sleep_until((faults_started + start.mul_f64(scale)).into()).await;
        *faults.entry(fault.name()).or_default() += 1;
        if let Err(why) = world.inject(fault, &mut rng).await? {
            world.idle.push(format!("{}: {why}", fault.name()));
        }
    }
    workload.await.map_err(|e| fail("the workload failed", e))?;
    submitter.settle(Duration::from_secs(300)).await;

    // Drain: every acknowledged request decided, every admitted command finished.
    let acked = submitter.acked();
    let drain_until = drain_until(args.drain)?;
    let mut records;
    // Who wrote each event is checked: admission's key, or agents it certified.
    let checked = Filter::default().trusting(Some(std::sync::Arc::new(
        rct_bus::provenance::Trust::new(rct_bus::Verifier::new([admission_key.public().clone()])),
    )));
    loop {
        // A node that was just restarted or paused may time a read out: read again.
        records = check::settled(|| async {
            replay::history(&js, &checked)
                .await?
                .try_collect::<Vec<Record>>()
                .await
        })
        .await
        .map_err(|e| fail("cannot read the events", e))?;
        let state = Fold::of(&records);
        let undecided = acked
            .iter()
            .filter(|id| !state.decided.contains(*id))
            .count();
        let unfinished = state
            .admitted
            .keys()
            .filter(|id| !state.outcome.contains_key(*id))
            .count();
        if (undecided == 0 && unfinished == 0) || Instant::now() > drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let outcomes = submitter.outcomes();
    let mut report = check::check(
        &js,
        &dir,
        admission_key.public(),
        &records,
        &outcomes,
        &world,
    )
    .await?;
    report.seed = seed;
    report.topology = format!("{:?}", args.topology).to_lowercase();
    report.faults = faults;
    report.faults_asked = args.faults;
    report.seconds = started.elapsed().as_secs_f64();
    world.stop().await;
    // A seed that failed keeps what it left: its processes' logs, the ledger, the scripts.
    if !report.valid()
        && let Some(temp) = temp
    {
        eprintln!(
            "seed {seed}: its logs, ledger and files are kept in {}",
            temp.keep().display()
        );
    }
    Ok(report)
}

/// Signs and submits requests as the workload's service identity, each retried with its id
/// until the server acknowledges it (or the publisher gives up: then it counts as not
/// acknowledged).
#[derive(Clone)]
pub(crate) struct Submitter {
    publisher: Publisher,
    service: Arc<KeyPair>,
    /// An operator's session (from a development token): every other request is signed
    /// with it, the rest with the service identity.
    operator: Option<Arc<crate::session::Session>>,
    /// Requests submitted so far.
    count: Arc<std::sync::atomic::AtomicUsize>,
    /// Per request: whether it was acknowledged (absent while it is being sent).
    outcomes: Arc<Mutex<HashMap<CommandId, bool>>>,
    /// Submissions still being sent.
    sending: Arc<std::sync::atomic::AtomicUsize>,
}

impl Submitter {
    /// Submits `operation` for `target` in the background; returns its command id.
    pub(crate) fn submit(
        &self,
        operation: &str,
        target: &str,
        params: Vec<(&str, proto::value::Kind)>,
    ) -> CommandId {
        self.submit_skewed(operation, target, params, time::Duration::ZERO)
    }

    /// [`Submitter::submit`], dated by a clock `skew` ahead of this one (behind if negative).
    pub(crate) fn submit_skewed(
        &self,
        operation: &str,
        target: &str,
        params: Vec<(&str, proto::value::Kind)>,
        skew: time::Duration,
    ) -> CommandId {
        let id = CommandId::generate();
        let now = OffsetDateTime::now_utc() + skew;
        let value = |kind| proto::Value { kind: Some(kind) };
        let mut all = BTreeMap::from([(
            "target".to_owned(),
            value(proto::value::Kind::Target(target.to_owned())),
        )]);
        all.extend(params.into_iter().map(|(k, v)| (k.to_owned(), value(v))));
        let submission = proto::Submission {
            command_id: id.to_string(),
            operation: operation.into(),
            justification: String::new(),
            requested_at: Some(from_datetime(now)),
            expires_at: Some(from_datetime(now + time::Duration::minutes(30))),
            client: None,
            request: Some(proto::submission::Request::Run(proto::Run {
                target: target.to_owned(),
                params: all,
                dry_run: false,
                break_glass: String::new(),
                plan: false,
                undo_of: String::new(),
                rollout: None,
            })),
        };
        let envelope = match &self.operator {
            Some(session) if self.count.fetch_add(1, SeqCst) % 2 == 1 => session.sign(&submission),
            _ => self
                .service
                .sign(Purpose::Submission, submission.encode_to_vec()),
        };
        let name: OperationName = operation.parse().expect("a valid operation name");
        let outgoing = Outgoing::new(
            Subject::submit(&name),
            id.msg_id(),
            Bytes::from(envelope.encode_to_vec()),
        );
        let publisher = self.publisher.clone();
        let outcomes = self.outcomes.clone();
        self.lock().insert(id, false);
        let sending = self.sending.clone();
        sending.fetch_add(1, SeqCst);
        tokio::spawn(async move {
            let sent = publisher.send(outgoing).await;
            outcomes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, sent.is_ok());
            sending.fetch_sub(1, SeqCst);
        });
        id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CommandId, bool>> {
        self.outcomes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every submission has its answer (the publisher's retries are bounded;
    /// past `within`, what is still unanswered counts as not acknowledged).
    async fn settle(&self, within: Duration) {
        let until = Instant::now() + within;
        while self.sending.load(SeqCst) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn outcomes(&self) -> HashMap<CommandId, bool> {
        self.lock().clone()
    }

    fn acked(&self) -> std::collections::BTreeSet<CommandId> {
        self.lock()
            .iter()
            .filter(|(_, ok)| **ok)
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Submits `count` effects at `rate` a second, round-robin over the targets.
async fn workload(
    submitter: Submitter,
    targets: Vec<String>,
    (count, rate): (usize, f64),
    seed: u64,
) {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    for i in 0..count {
        pace.tick().await;
        submitter.submit(
            EFFECT,
            &targets[i % targets.len()],
            vec![("work_ms", proto::value::Kind::Integer(rng.i64(20..400)))],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(flags: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("chaos").chain(flags.iter().copied()))
            .unwrap()
            .args
    }

    /// `--rate 0` panicked in `Duration::from_secs_f64`, a huge `--drain` in `Instant + _`.
    #[test]
    fn flags_the_clock_cannot_hold_are_usage_errors_not_panics() {
        for (flags, expected) in [
            (&["--rate", "0"][..], "--rate 0"),
            (&["--rate=-1"], "--rate -1"),
            (&["--rate", "NaN"], "--rate NaN"),
            (&["--rate", "1e-300"], "longer than any clock"),
            (&["--drain", "500000000000y"], "--drain"),
        ] {
            let error = check_args(&args(flags)).unwrap_err();
            assert_eq!(error.exit, Exit::Usage);
            assert!(error.message.contains(expected), "{flags:?}: {error}");
        }
        check_args(&args(&[])).unwrap();
        check_args(&args(&["--commands", "0"])).unwrap();
        assert_eq!(workload_time(0, 0.0).unwrap(), Duration::ZERO);
    }
}
