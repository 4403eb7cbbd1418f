//! `rct chaos`: fault injection with a checker, on the real processes.
//!
//! Per seed: nats-server (one, or three nodes with R3 streams), two admission replicas and one
//! agent per target, each its own process (this binary's hidden `chaos-admission` and
//! `chaos-agent` verbs). A workload submits signed requests while a seeded schedule kills
//! (SIGKILL) and pauses (SIGSTOP past the ack wait) servers, admission replicas and agents.
//! The agents' handler writes an effect ledger: one `begin <id>` line before its effect and
//! `end <id>` after. Once every fault is over and everything is decided and finished (or the
//! drain time is up), the checker reads the three streams and the ledger:
//!
//! - `lost`: acknowledged submissions without a decision;
//! - `decided_twice`: a submission decided more than once, or a command admitted twice;
//! - `executed_twice`: a command whose effect ran more than once (the ledger);
//! - `unexpected`: an effect without an admission-signed command, a command whose signature
//!   does not verify, or a decision for a request nobody made;
//! - `unknown`: outcomes recorded as unknown; they must be exactly the commands a killed agent
//!   had claimed and not finished (`unknown ≠ kills` counts the difference);
//! - `unaccounted`: admitted commands without a terminal outcome;
//! - `not_as_recorded`: an effect that began for a command recorded as not run (ended
//!   without running, or expired), or a command recorded succeeded whose effect never
//!   finished (no `end` line);
//! - `failed`: admitted commands that ended failed, expired or cancelled (the workload's
//!   handler always succeeds, so each is a command the faults cost);
//! - a run that proves nothing is a violation too: nothing attempted, acknowledged, admitted
//!   or succeeded, or no fault injected when faults were asked for.
//!
//! It prints a table and exits 1 on any violation. docs/RELIABILITY.md records large runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use prost::Message;
use rct_agents::{Context, Failure, Outcome, Params, Tower};
use rct_bus::proto::{self, event::Kind};
use rct_bus::{
    CommandId, KeyPair, OperationName, PublicKey, Purpose, Subject, Unverified, Verifier,
};
use rct_streams::replay::{self, Filter, Record};
use rct_streams::testkit::{Cluster, Server, Setup};
use rct_streams::timestamp::from_datetime;
use rct_streams::{Connection, Outgoing, Publisher};
use time::OffsetDateTime;

use crate::exit::{Error, Exit, Result};

/// The fault-injection run.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seeds to run: one (`7`) or a range (`1-20`). The seed fixes the fault schedule.
    #[arg(long, default_value = "1")]
    seeds: String,
    /// Submissions per seed.
    #[arg(long, default_value_t = 300)]
    commands: usize,
    /// Targets of the chaos tower; one agent process each.
    #[arg(long, default_value_t = 3)]
    targets: usize,
    /// Faults of each kind per seed, spread over the workload.
    #[arg(long, default_value_t = 2)]
    faults: usize,
    /// Submissions per second; by default the workload is spread over the fault schedule
    /// (one fault every 6 s), so that every fault happens under load.
    #[arg(long)]
    rate: Option<f64>,
    /// One nats-server, or a three-node cluster with R3 streams (both fsync every write).
    #[arg(long, value_enum, default_value_t = Topology::Single)]
    topology: Topology,
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
}

const TOWER: &str = "chaos";
const OPERATION: &str = "chaos/effect";
const SERVICE_GROUP: &str = "chaos";
/// Longer than every pause, so a paused agent is never taken for dead.
const AGENT_TTL: Duration = Duration::from_secs(10);
/// Shorter than every pause, so pauses cause redeliveries.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// Time per fault in the schedule: the longest fault (a 5 s pause) fits.
const FAULT_SLOT: Duration = Duration::from_secs(6);

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
        println!("{}", table(&reports, &args));
    }
    Ok(if reports.iter().all(Report::valid) {
        Exit::Ok
    } else {
        Exit::Failed
    })
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
    format!(
        "towers:\n  {TOWER}:\n    description: Fault injection\n    flavour: cluster\n    \
         targets: [{}]\noperations:\n  {OPERATION}:\n    description: Writes one effect to the \
         ledger\n    allowed_groups: [{SERVICE_GROUP}]\n    params:\n      target: {{ type: target }}\n      \
         work_ms: {{ type: integer, min: 0, max: 10000, default: 100 }}\n    deadline: 30m\n    \
         timeout: 5m\n",
        targets.join(", ")
    )
}

/// The streams for a run: short ack waits so pauses cause redeliveries, a short agent TTL so
/// a killed agent's claims are found out quickly, nothing ever given up.
fn streams(replicas: usize) -> rct_streams::Config {
    let consumer = rct_streams::config::Consumer {
        ack_wait: ACK_WAIT,
        max_deliver: -1,
        backoff: Vec::new(),
        max_ack_pending: 256,
    };
    rct_streams::Config {
        replicas,
        admission: consumer.clone(),
        towers: consumer,
        agent_ttl: AGENT_TTL,
        ..rct_streams::Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The component processes.

/// `rct chaos-admission`: one admission replica of a run.
pub async fn admission(args: ProcessArgs) -> Result {
    let service = std::fs::read_to_string(args.dir.join("service.pub"))
        .map_err(|e| fail("cannot read service.pub", e))?;
    let config = rct_admission::Config {
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
        freshness: Duration::from_secs(1800),
        concurrency: 16,
        ..rct_admission::Config::default()
    };
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

/// `rct chaos-agent`: the agent of one target, writing the effect ledger.
pub async fn agent(args: ProcessArgs) -> Result {
    let target = args
        .target
        .ok_or_else(|| Error::usage("chaos-agent needs --target"))?;
    let mut config = rct_agents::Config {
        nats: Connection::to(args.servers),
        instance: args.instance.clone(),
        trusted_keys: vec![args.dir.join("admission.pub")],
        heartbeat: Duration::from_secs(1),
        concurrency: 8,
        ..rct_agents::Config::default()
    };
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
    let client = config
        .nats
        .connect(&format!("chaos agent {}", args.instance), true)
        .await
        .map_err(|e| fail("cannot connect", e))?;
    Tower::new(TOWER)
        .cluster(&target)
        .operation("effect", move |ctx, params| {
            effect(ledger.clone(), ctx, params)
        })
        .config(config)
        .run(client, rct_streams::runtime::shutdown_on_signal())
        .await
        .map_err(|e| fail("the agent stopped", e))?;
    Ok(Exit::Ok)
}

/// The effect: a ledger line before and after some work. One `write` per line, appended.
async fn effect(
    ledger: Arc<Mutex<std::fs::File>>,
    ctx: Context,
    params: Params,
) -> std::result::Result<Outcome, Failure> {
    let write = |line: String| {
        let mut file = ledger.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(line.as_bytes())
            .map_err(|e| Failure::new("ledger", e.to_string()))
    };
    write(format!("begin {}\n", ctx.command_id()))?;
    let work = Duration::from_millis(params.i64("work_ms").unwrap_or(100).max(0) as u64);
    tokio::select! {
        _ = ctx.cancelled() => return Err(Failure::new("cancelled", "stopped on request")),
        _ = tokio::time::sleep(work) => {}
    }
    write(format!("end {}\n", ctx.command_id()))?;
    Ok(Outcome::new("effect written"))
}

// ---------------------------------------------------------------------------------------------
// Processes and servers under fault.

/// A child process of this binary that can be killed, paused and started again.
#[derive(Debug)]
struct Proc {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(args: Vec<String>, log: PathBuf) -> Result<Self> {
        let mut proc = Self {
            args,
            log,
            child: None,
        };
        proc.start()?;
        Ok(proc)
    }

    fn start(&mut self) -> Result<()> {
        let exe = std::env::current_exe().map_err(|e| fail("cannot find rct itself", e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| fail("cannot open a process log", e))?;
        let child = Command::new(exe)
            .args(&self.args)
            .env("RCT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| fail("cannot start a chaos process", e))?;
        self.child = Some(child);
        Ok(())
    }

    fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL after a grace period.
    async fn stop(&mut self) {
        self.signal(Signal::SIGCONT);
        self.signal(Signal::SIGTERM);
        let started = Instant::now();
        while let Some(child) = &mut self.child {
            if matches!(child.try_wait(), Ok(Some(_)))
                || started.elapsed() > Duration::from_secs(15)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill9();
    }
}

/// A run that ends early (an error) leaves no process behind.
impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        self.kill9();
    }
}

/// The NATS side of a run.
enum Nats {
    Single(Server),
    Cluster(Cluster),
}

impl Nats {
    async fn start(topology: Topology) -> Self {
        let setup = Setup {
            sync_always: true,
            ..Setup::default()
        };
        match topology {
            Topology::Single => Nats::Single(Server::start_with(setup).await),
            Topology::Cluster => Nats::Cluster(Cluster::start_with(setup).await),
        }
    }

    fn urls(&self) -> Vec<String> {
        match self {
            Nats::Single(s) => vec![s.url()],
            Nats::Cluster(c) => c.urls(),
        }
    }

    fn replicas(&self) -> usize {
        match self {
            Nats::Single(_) => 1,
            Nats::Cluster(_) => 3,
        }
    }

    fn node(&mut self, rng: &mut fastrand::Rng) -> &mut Server {
        match self {
            Nats::Single(s) => s,
            Nats::Cluster(c) => c.node(rng.usize(0..3)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One seed.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillNats,
    PauseNats,
    KillAdmission,
    PauseAdmission,
    KillAgent,
    PauseAgent,
}

const FAULTS: [Fault; 6] = [
    Fault::KillNats,
    Fault::PauseNats,
    Fault::KillAdmission,
    Fault::PauseAdmission,
    Fault::KillAgent,
    Fault::PauseAgent,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillNats => "kill nats",
            Fault::PauseNats => "pause nats",
            Fault::KillAdmission => "kill admission",
            Fault::PauseAdmission => "pause admission",
            Fault::KillAgent => "kill agent",
            Fault::PauseAgent => "pause agent",
        }
    }
}

/// What one seed did and what the checker found.
#[derive(Clone, Debug, Default)]
struct Report {
    seed: u64,
    topology: String,
    attempted: usize,
    acked: usize,
    recovered: usize,
    admitted: usize,
    rejected: usize,
    succeeded: usize,
    faults: BTreeMap<&'static str, usize>,
    lost: usize,
    decided_twice: usize,
    executed_twice: usize,
    unexpected: usize,
    unknown: usize,
    unknown_not_from_kills: usize,
    kills_without_unknown: usize,
    unaccounted: usize,
    not_as_recorded: usize,
    failed: usize,
    /// Faults the schedule was asked to inject.
    faults_asked: usize,
    seconds: f64,
}

impl Report {
    fn valid(&self) -> bool {
        self.lost == 0
            && self.decided_twice == 0
            && self.executed_twice == 0
            && self.unexpected == 0
            && self.unknown_not_from_kills == 0
            && self.kills_without_unknown == 0
            && self.unaccounted == 0
            && self.not_as_recorded == 0
            && self.failed == 0
            && self.vacuous().is_none()
    }

    /// Why the run proves nothing, if it does not: a checker that passes an empty run, or
    /// one whose faults never happened, cannot say no.
    fn vacuous(&self) -> Option<&'static str> {
        if self.attempted == 0 {
            Some("nothing was attempted")
        } else if self.acked == 0 {
            Some("nothing was acknowledged")
        } else if self.admitted == 0 {
            Some("nothing was admitted")
        } else if self.succeeded == 0 {
            Some("nothing succeeded")
        } else if self.faults_asked > 0 && self.faults.values().sum::<usize>() == 0 {
            Some("no fault was injected")
        } else {
            None
        }
    }

    fn line(&self) -> String {
        format!(
            "seed {} ({}): {} acked of {}, {} admitted, {} succeeded, {} unknown; lost {}, \
             decided twice {}, executed twice {}, unexpected {}, unaccounted {}, unknown≠kills {} \
             — {}",
            self.seed,
            self.topology,
            self.acked,
            self.attempted,
            self.admitted,
            self.succeeded,
            self.unknown,
            self.lost,
            self.decided_twice,
            self.executed_twice,
            self.unexpected,
            self.unaccounted,
            self.unknown_not_from_kills + self.kills_without_unknown,
            match (self.valid(), self.vacuous()) {
                (true, _) => "ok".to_owned(),
                (false, Some(why)) => format!("VIOLATION: the run proves nothing ({why})"),
                (false, None) => format!(
                    "VIOLATION{}{}",
                    if self.not_as_recorded > 0 {
                        format!(", not as recorded {}", self.not_as_recorded)
                    } else {
                        String::new()
                    },
                    if self.failed > 0 {
                        format!(", failed {}", self.failed)
                    } else {
                        String::new()
                    }
                ),
            }
        )
    }
}

async fn run_seed(args: &Args, seed: u64) -> Result<Report> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);
    let (_temp, dir) = match &args.dir {
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
    for sub in ["ledger", "logs"] {
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

    let mut nats = Nats::start(args.topology).await;
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
        streams: streams(nats.replicas()),
        ..rct_admission::Config::default()
    };
    rct_admission::provision(&js, &config)
        .await
        .map_err(|e| fail("cannot provision", e))?;

    let process = |verb: &str, instance: &str, target: Option<&str>| {
        let mut a = vec![
            verb.to_owned(),
            "--dir".into(),
            dir.display().to_string(),
            "--instance".into(),
            instance.to_owned(),
        ];
        for url in &urls {
            a.extend(["--server".to_owned(), url.clone()]);
        }
        if let Some(t) = target {
            a.extend(["--target".to_owned(), t.to_owned()]);
        }
        Proc::spawn(a, dir.join("logs").join(format!("{instance}.log")))
    };
    let mut admissions = [
        process("chaos-admission", "a1", None)?,
        process("chaos-admission", "a2", None)?,
    ];
    let targets: Vec<String> = (1..=args.targets).map(|i| format!("t{i}")).collect();
    let mut generations = vec![1usize; targets.len()];
    let mut agents = targets
        .iter()
        .map(|t| process("chaos-agent", &format!("{t}-g1"), Some(t)))
        .collect::<Result<Vec<_>>>()?;
    crate::stack::wait_for_agents(&js, targets.len(), "", Duration::from_secs(60)).await?;

    // The workload runs while the faults happen.
    let outcomes: Arc<Mutex<HashMap<CommandId, bool>>> = Arc::default();
    let mut schedule: Vec<Fault> = FAULTS
        .iter()
        .flat_map(|f| std::iter::repeat_n(*f, args.faults))
        .collect();
    rng.shuffle(&mut schedule);
    let rate = args.rate.unwrap_or_else(|| {
        args.commands as f64 / (FAULT_SLOT.as_secs_f64() * schedule.len().max(1) as f64)
    });
    let workload_time = workload_time(args.commands, rate)?;
    let workload = tokio::spawn(workload(
        js.clone(),
        service,
        targets.clone(),
        (args.commands, rate),
        seed,
        outcomes.clone(),
    ));
    let faults_started = Instant::now();

    let mut killed_agents: BTreeSet<String> = BTreeSet::new();
    let mut faults: BTreeMap<&'static str, usize> = BTreeMap::new();
    let count = schedule.len().max(1) as f64;
    for (k, fault) in schedule.into_iter().enumerate() {
        // Spread over the workload: fault k at a seeded moment of its k-th slice (later if
        // the previous fault is still going on).
        let at = workload_time.mul_f64((k as f64 + rng.f64()) / count);
        tokio::time::sleep_until((faults_started + at).into()).await;
        *faults.entry(fault.name()).or_default() += 1;
        let down = Duration::from_millis(rng.u64(500..2000));
        let pause = ACK_WAIT + Duration::from_millis(rng.u64(1000..3000));
        match fault {
            Fault::KillNats => {
                let node = nats.node(&mut rng);
                node.kill();
                tokio::time::sleep(down).await;
                node.start_again().await;
            }
            Fault::PauseNats => {
                let node = nats.node(&mut rng);
                node.pause();
                tokio::time::sleep(down).await;
                node.resume();
            }
            Fault::KillAdmission => {
                let replica = &mut admissions[rng.usize(0..2)];
                replica.kill9();
                tokio::time::sleep(down).await;
                replica.start()?;
            }
            Fault::PauseAdmission => {
                let replica = &admissions[rng.usize(0..2)];
                replica.signal(Signal::SIGSTOP);
                tokio::time::sleep(pause).await;
                replica.signal(Signal::SIGCONT);
            }
            Fault::KillAgent => {
                let i = rng.usize(0..targets.len());
                agents[i].kill9();
                killed_agents.insert(format!("{}-g{}", targets[i], generations[i]));
                tokio::time::sleep(down).await;
                generations[i] += 1;
                agents[i] = process(
                    "chaos-agent",
                    &format!("{}-g{}", targets[i], generations[i]),
                    Some(&targets[i]),
                )?;
            }
            Fault::PauseAgent => {
                let agent = &agents[rng.usize(0..targets.len())];
                agent.signal(Signal::SIGSTOP);
                tokio::time::sleep(pause).await;
                agent.signal(Signal::SIGCONT);
            }
        }
    }
    workload.await.map_err(|e| fail("the workload failed", e))?;

    // Drain: every acknowledged request decided, every admitted command finished.
    let acked: BTreeSet<CommandId> = outcomes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, ok)| **ok)
        .map(|(id, _)| *id)
        .collect();
    let drain_until = drain_until(args.drain)?;
    let mut records;
    loop {
        // A node that was just restarted or paused may time a read out: read again.
        records = settled(|| async {
            replay::history(&js, &Filter::default())
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

    let mut report = check(
        &js,
        &dir,
        &admission_key.public().clone(),
        &records,
        &outcomes,
        &killed_agents,
    )
    .await?;
    report.seed = seed;
    report.topology = format!("{:?}", args.topology).to_lowercase();
    report.faults = faults;
    report.faults_asked = args.faults;
    report.seconds = started.elapsed().as_secs_f64();

    for proc in admissions.iter_mut().chain(agents.iter_mut()) {
        proc.stop().await;
    }
    drop(nats);
    Ok(report)
}

/// Submits `count` signed requests at `rate` a second, each retried with its id until the
/// server acknowledges it (or the publisher gives up: then it counts as not acknowledged).
async fn workload(
    js: jetstream::Context,
    service: KeyPair,
    targets: Vec<String>,
    (count, rate): (usize, f64),
    seed: u64,
    outcomes: Arc<Mutex<HashMap<CommandId, bool>>>,
) {
    let operation: OperationName = OPERATION.parse().expect("a valid operation name");
    let publisher = Publisher::new(js);
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    let mut sending = tokio::task::JoinSet::new();
    for i in 0..count {
        pace.tick().await;
        let id = CommandId::generate();
        let now = OffsetDateTime::now_utc();
        let target = &targets[i % targets.len()];
        let value = |kind| proto::Value { kind: Some(kind) };
        let submission = proto::Submission {
            command_id: id.to_string(),
            operation: OPERATION.into(),
            justification: String::new(),
            requested_at: Some(from_datetime(now)),
            expires_at: Some(from_datetime(now + time::Duration::minutes(30))),
            client: None,
            request: Some(proto::submission::Request::Run(proto::Run {
                target: target.clone(),
                params: BTreeMap::from([
                    (
                        "target".to_owned(),
                        value(proto::value::Kind::Target(target.clone())),
                    ),
                    (
                        "work_ms".to_owned(),
                        value(proto::value::Kind::Integer(rng.i64(20..400))),
                    ),
                ]),
                dry_run: false,
            })),
        };
        let envelope = service.sign(Purpose::Submission, submission.encode_to_vec());
        let outgoing = Outgoing::new(
            Subject::submit(&operation),
            id.msg_id(),
            Bytes::from(envelope.encode_to_vec()),
        );
        let publisher = publisher.clone();
        let outcomes = outcomes.clone();
        sending.spawn(async move {
            let sent = publisher.send(outgoing).await;
            outcomes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, sent.is_ok());
        });
    }
    sending.join_all().await;
}

// ---------------------------------------------------------------------------------------------
// The checker.

/// What the event stream says, per command.
#[derive(Debug, Default)]
struct Fold {
    decided: BTreeSet<CommandId>,
    /// Decisions per submission sequence.
    decisions: BTreeMap<u64, usize>,
    /// Admissions per command.
    admitted: BTreeMap<CommandId, usize>,
    rejected: BTreeSet<CommandId>,
    /// Who claimed it (the agent incarnation of each start).
    claims: BTreeMap<CommandId, Vec<String>>,
    /// Its terminal outcome and who wrote it.
    outcome: BTreeMap<CommandId, (&'static str, String)>,
    /// Claimed only to be ended without running.
    unrun: BTreeSet<CommandId>,
}

impl Fold {
    fn of(records: &[Record]) -> Self {
        let mut fold = Fold::default();
        for record in records {
            let Ok(id) = record.event.command_id.parse::<CommandId>() else {
                continue;
            };
            let terminal = |name: &'static str| Some((name, record.event.source.clone()));
            let outcome = match &record.event.kind {
                Some(Kind::Admitted(a)) => {
                    fold.decided.insert(id);
                    *fold.admitted.entry(id).or_default() += 1;
                    let seq = a.request.as_ref().map_or(0, |r| r.submission_sequence);
                    *fold.decisions.entry(seq).or_default() += 1;
                    None
                }
                Some(Kind::Rejected(r)) => {
                    fold.decided.insert(id);
                    fold.rejected.insert(id);
                    let seq = r.request.as_ref().map_or(0, |r| r.submission_sequence);
                    *fold.decisions.entry(seq).or_default() += 1;
                    None
                }
                Some(Kind::Started(s)) if !s.without_running => {
                    fold.claims.entry(id).or_default().push(s.agent.clone());
                    None
                }
                Some(Kind::Started(_)) => {
                    fold.unrun.insert(id);
                    None
                }
                Some(Kind::Succeeded(_)) => terminal("succeeded"),
                Some(Kind::Failed(_)) => terminal("failed"),
                Some(Kind::Expired(_)) => terminal("expired"),
                Some(Kind::Cancelled(_)) => terminal("cancelled"),
                Some(Kind::Unknown(_)) => terminal("unknown"),
                _ => None,
            };
            if let Some(outcome) = outcome {
                fold.outcome.insert(id, outcome);
            }
        }
        fold
    }
}

/// `read` again, up to a minute, while it fails: right after a fault a read can time out.
async fn settled<T, E, F, Fut>(read: F) -> std::result::Result<T, E>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match read().await {
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            result => return result,
        }
    }
}

/// Every message of a stream, in order (read again while a fault's after-effects last).
async fn read_all(js: &jetstream::Context, name: &str) -> Result<Vec<Bytes>> {
    settled(|| read_all_once(js, name)).await
}

async fn read_all_once(js: &jetstream::Context, name: &str) -> Result<Vec<Bytes>> {
    let mut stream = js
        .get_stream(name)
        .await
        .map_err(|e| fail(&format!("cannot read {name}"), e))?;
    let total = stream
        .info()
        .await
        .map_err(|e| fail(&format!("cannot read {name}"), e))?
        .state
        .messages as usize;
    let consumer = stream
        .create_consumer(pull::OrderedConfig::default())
        .await
        .map_err(|e| fail(&format!("cannot read {name}"), e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| fail(&format!("cannot read {name}"), e))?;
    let mut all = Vec::with_capacity(total);
    while all.len() < total {
        match tokio::time::timeout(Duration::from_secs(30), messages.next()).await {
            Ok(Some(Ok(message))) => all.push(message.payload.clone()),
            Ok(Some(Err(e))) => return Err(fail(&format!("cannot read {name}"), e)),
            Ok(None) | Err(_) => return Err(Error::usage(format!("{name} ended early"))),
        }
    }
    Ok(all)
}

async fn check(
    js: &jetstream::Context,
    dir: &Path,
    admission: &PublicKey,
    records: &[Record],
    outcomes: &Mutex<HashMap<CommandId, bool>>,
    killed: &BTreeSet<String>,
) -> Result<Report> {
    let fold = Fold::of(records);
    let outcomes = outcomes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let attempted: BTreeSet<CommandId> = outcomes.keys().copied().collect();
    let acked: BTreeSet<CommandId> = outcomes
        .iter()
        .filter(|(_, ok)| **ok)
        .map(|(id, _)| *id)
        .collect();

    let mut submitted = BTreeSet::new();
    for bytes in read_all(js, rct_streams::topology::SUBMIT_STREAM).await? {
        if let Ok(envelope) = proto::SignedEnvelope::decode(bytes)
            && let Ok(s) = proto::Submission::decode(envelope.body.as_slice())
            && let Ok(id) = s.command_id.parse::<CommandId>()
        {
            submitted.insert(id);
        }
    }
    let verifier = Verifier::new([admission.clone()]);
    let mut signed_commands: BTreeMap<CommandId, usize> = BTreeMap::new();
    let mut badly_signed = 0;
    for bytes in read_all(js, rct_streams::topology::COMMAND_STREAM).await? {
        let command = Unverified::decode(&bytes)
            .and_then(|u| verifier.verify(u, Purpose::Command))
            .and_then(|v| v.decode::<proto::Command>());
        match command
            .ok()
            .and_then(|c| c.command_id.parse::<CommandId>().ok())
        {
            Some(id) => *signed_commands.entry(id).or_default() += 1,
            None => badly_signed += 1,
        }
    }

    let mut effects: BTreeMap<CommandId, usize> = BTreeMap::new();
    let mut finished: BTreeSet<CommandId> = BTreeSet::new();
    let mut ledger_garbage = 0;
    for entry in
        std::fs::read_dir(dir.join("ledger")).map_err(|e| fail("cannot read the ledger", e))?
    {
        let path = entry.map_err(|e| fail("cannot read the ledger", e))?.path();
        let text = std::fs::read_to_string(&path).map_err(|e| fail("cannot read the ledger", e))?;
        for line in text.lines() {
            if let Some(end) = line.strip_prefix("end ") {
                match end.parse::<CommandId>() {
                    Ok(id) => {
                        finished.insert(id);
                    }
                    Err(_) => ledger_garbage += 1,
                }
                continue;
            }
            match line.strip_prefix("begin ").map(str::parse::<CommandId>) {
                Some(Ok(id)) => *effects.entry(id).or_default() += 1,
                Some(Err(_)) => ledger_garbage += 1,
                None => {}
            }
        }
    }

    // Commands a killed agent had claimed and not finished itself: each must be unknown.
    let from_killed = |agent: &str| killed.iter().any(|k| agent.starts_with(&format!("{k}-")));
    let hits: BTreeSet<CommandId> = fold
        .claims
        .iter()
        .filter(|(id, agents)| {
            let killed_claims: Vec<&String> = agents.iter().filter(|a| from_killed(a)).collect();
            !killed_claims.is_empty()
                && fold.outcome.get(*id).is_none_or(|(kind, source)| {
                    *kind == "unknown" || !killed_claims.iter().any(|a| source.contains(a.as_str()))
                })
        })
        .map(|(id, _)| *id)
        .collect();
    let unknown: BTreeSet<CommandId> = fold
        .outcome
        .iter()
        .filter(|(_, (kind, _))| *kind == "unknown")
        .map(|(id, _)| *id)
        .collect();

    let never_asked = fold
        .decided
        .iter()
        .filter(|id| !attempted.contains(*id))
        .count();
    Ok(Report {
        attempted: attempted.len(),
        acked: acked.len(),
        recovered: submitted.iter().filter(|id| !acked.contains(*id)).count(),
        admitted: fold.admitted.len(),
        rejected: fold.rejected.len(),
        succeeded: fold
            .outcome
            .values()
            .filter(|(kind, _)| *kind == "succeeded")
            .count(),
        lost: acked
            .iter()
            .filter(|id| !fold.decided.contains(*id))
            .count(),
        decided_twice: fold.decisions.values().filter(|n| **n > 1).count()
            + fold.admitted.values().filter(|n| **n > 1).count(),
        executed_twice: effects.values().filter(|n| **n > 1).count(),
        unexpected: effects
            .keys()
            .filter(|id| !signed_commands.contains_key(*id))
            .count()
            + badly_signed
            + ledger_garbage
            + never_asked,
        unknown: unknown.len(),
        unknown_not_from_kills: unknown.difference(&hits).count(),
        kills_without_unknown: hits.difference(&unknown).count(),
        unaccounted: fold
            .admitted
            .keys()
            .filter(|id| !fold.outcome.contains_key(*id))
            .count(),
        // The outcome and the effect ledger must tell the same story.
        not_as_recorded: effects
            .keys()
            .filter(|id| {
                fold.unrun.contains(*id)
                    || fold
                        .outcome
                        .get(*id)
                        .is_some_and(|(kind, _)| *kind == "expired")
            })
            .count()
            + fold
                .outcome
                .iter()
                .filter(|(id, (kind, _))| *kind == "succeeded" && !finished.contains(*id))
                .count(),
        failed: fold
            .outcome
            .values()
            .filter(|(kind, _)| matches!(*kind, "failed" | "expired" | "cancelled"))
            .count(),
        ..Report::default()
    })
}

fn table(reports: &[Report], args: &Args) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| seed | topology | attempted | acked | recovered | admitted | rejected | succeeded | faults | lost | \
         decided twice | executed twice | unexpected | unknown (= killed agents' running commands) | \
         unaccounted | not as recorded | failed | seconds |"
    );
    let _ = writeln!(out, "|{}", "---|".repeat(18));
    let mut total = Report::default();
    for r in reports {
        let _ = writeln!(out, "{}", r.row(&r.seed.to_string()));
        total.absorb(r);
    }
    if reports.len() > 1 {
        let _ = writeln!(out, "{}", total.row(&format!("all {}", reports.len())));
    }
    let faults: Vec<String> = total
        .faults
        .iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect();
    let _ = writeln!(
        out,
        "\nfaults: {}; {} commands and {} faults of each kind per seed, {} targets",
        faults.join(", "),
        args.commands,
        args.faults,
        args.targets
    );
    out
}

impl Report {
    /// One line of the table, labelled `label` in the seed column.
    fn row(&self, label: &str) -> String {
        let mismatch = self.unknown_not_from_kills + self.kills_without_unknown;
        format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {:.0} |",
            self.topology,
            self.attempted,
            self.acked,
            self.recovered,
            self.admitted,
            self.rejected,
            self.succeeded,
            self.faults.values().sum::<usize>(),
            self.lost,
            self.decided_twice,
            self.executed_twice,
            self.unexpected,
            self.unknown,
            if mismatch == 0 {
                String::new()
            } else {
                format!(
                    " (≠ kills: {} extra, {} missing)",
                    self.unknown_not_from_kills, self.kills_without_unknown
                )
            },
            self.unaccounted,
            self.not_as_recorded,
            self.failed,
            self.seconds
        )
    }

    /// Adds another seed's counts to these.
    fn absorb(&mut self, other: &Report) {
        self.attempted += other.attempted;
        self.acked += other.acked;
        self.recovered += other.recovered;
        self.admitted += other.admitted;
        self.rejected += other.rejected;
        self.succeeded += other.succeeded;
        self.lost += other.lost;
        self.decided_twice += other.decided_twice;
        self.executed_twice += other.executed_twice;
        self.unexpected += other.unexpected;
        self.unknown += other.unknown;
        self.unknown_not_from_kills += other.unknown_not_from_kills;
        self.kills_without_unknown += other.kills_without_unknown;
        self.unaccounted += other.unaccounted;
        self.not_as_recorded += other.not_as_recorded;
        self.failed += other.failed;
        self.faults_asked = self.faults_asked.max(other.faults_asked);
        self.seconds += other.seconds;
        for (k, v) in &other.faults {
            *self.faults.entry(k).or_default() += v;
        }
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

    /// A checker that passes an empty run, an all-failed run or a run whose faults never
    /// happened cannot say no; nor one that ignores the effect ledger.
    #[test]
    fn a_run_that_proves_nothing_or_whose_outcomes_lie_is_a_violation() {
        let good = Report {
            attempted: 10,
            acked: 10,
            admitted: 10,
            succeeded: 10,
            faults_asked: 1,
            faults: [("kill agent", 1)].into(),
            ..Report::default()
        };
        assert!(good.valid(), "{}", good.line());
        for (bad, why) in [
            (Report::default(), "nothing was attempted"),
            (
                Report {
                    succeeded: 0,
                    failed: 10,
                    ..good.clone()
                },
                "nothing succeeded",
            ),
            (
                Report {
                    faults: BTreeMap::new(),
                    ..good.clone()
                },
                "no fault was injected",
            ),
        ] {
            assert!(!bad.valid(), "{why}");
            assert!(bad.line().contains(why), "{}", bad.line());
        }
        for bad in [
            Report {
                not_as_recorded: 1,
                ..good.clone()
            },
            Report {
                failed: 1,
                succeeded: 9,
                ..good.clone()
            },
        ] {
            assert!(!bad.valid(), "{}", bad.line());
            assert!(bad.line().contains("VIOLATION"), "{}", bad.line());
        }
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
