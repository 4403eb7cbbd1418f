//! The faults of a chaos run, and the evidence that each one bit.
//!
//! Every fault checks, from outside, that it took effect: a killed process is gone (reaped,
//! ended by SIGKILL); a paused one stayed stopped (`/proc` state `T`) and used no CPU while
//! paused; a restarted server answered JetStream again, a restarted admission replica said it
//! was ready, a restarted agent was present again, a restarted agent's shifted clock shows
//! in its presence. A pause of nats-server past the clients' timeout shows a client's request
//! timing out. The catalog outage shows the catalog could
//! not be read, and that an agent missed it. Commands a fault submits (a panicking handler,
//! misbehaving scripts, a burst for paused agents) leave an [`Expect`] the checker holds
//! the streams to. A fault that did not bite fails the run.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rct_bus::proto;
use rct_streams::testkit::{Cluster, Server, Setup};
use time::OffsetDateTime;

use super::check::{Expect, Want, settled};
use super::{DEADLINE_MINUTES, EFFECT, PANIC, SCRIPT, Settings, Submitter, TOWER, Topology, fail};
use crate::exit::Result;

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(super) enum Fault {
    /// SIGKILL one nats-server (a random node of a cluster), start it again 0.5–2 s later.
    KillNats,
    /// SIGSTOP one nats-server for 0.5–2 s.
    PauseNats,
    /// SIGSTOP one nats-server past the clients' request timeout (5 s): PubAcks of claims
    /// and outcomes are lost.
    PauseNatsLong,
    /// SIGKILL one admission replica, start it again 0.5–2 s later.
    KillAdmission,
    /// SIGSTOP one admission replica past its ack wait.
    PauseAdmission,
    /// SIGKILL one agent mid-run, start a new incarnation 0.5–2 s later.
    KillAgent,
    /// SIGSTOP one agent (past the ack wait where the presence TTL allows).
    PauseAgent,
    /// SIGSTOP every agent of one target, then submit commands for it: they are delivered
    /// while its agents are paused before they claim.
    PauseBeforeClaim,
    /// The catalog bucket is gone for a minute; an agent restarted meanwhile must wait for it.
    CatalogOutage,
    /// A command whose handler panics.
    Panic,
    /// A script printing 20 MB of short lines.
    Flood,
    /// A script printing one 4 MB line.
    HugeLine,
    /// A script that leaves a child holding its stdout and stderr.
    Orphan,
    /// Requests dated by clocks ahead of and behind admission's: within its tolerance
    /// (`clock_skew`, `freshness`) they run, beyond it they are refused as stale.
    ClockSkew,
    /// Every agent of one target restarted with its wall clock off admission's (a shared
    /// library shifts it): half the start window ahead and an hour behind, its commands run;
    /// past the start window ahead, every command it receives is past its deadline by its
    /// clock, and it expires them unrun.
    AgentClockSkew,
}

impl Fault {
    pub(super) const ALL: [Fault; 15] = [
        Fault::KillNats,
        Fault::PauseNats,
        Fault::PauseNatsLong,
        Fault::KillAdmission,
        Fault::PauseAdmission,
        Fault::KillAgent,
        Fault::PauseAgent,
        Fault::PauseBeforeClaim,
        Fault::CatalogOutage,
        Fault::Panic,
        Fault::Flood,
        Fault::HugeLine,
        Fault::Orphan,
        Fault::ClockSkew,
        Fault::AgentClockSkew,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Fault::KillNats => "kill nats",
            Fault::PauseNats => "pause nats",
            Fault::PauseNatsLong => "pause nats past timeouts",
            Fault::KillAdmission => "kill admission",
            Fault::PauseAdmission => "pause admission",
            Fault::KillAgent => "kill agent",
            Fault::PauseAgent => "pause agent",
            Fault::PauseBeforeClaim => "pause agents before claim",
            Fault::CatalogOutage => "catalog outage",
            Fault::Panic => "panicking handler",
            Fault::Flood => "output flood",
            Fault::HugeLine => "huge line",
            Fault::Orphan => "child holding pipes",
            Fault::ClockSkew => "clock skew",
            Fault::AgentClockSkew => "agent clock skew",
        }
    }

    /// The time this fault takes in the schedule (its longest run, and its evidence).
    fn slot(self, settings: Settings) -> Duration {
        let s = Duration::from_secs;
        match self {
            Fault::KillNats | Fault::KillAdmission | Fault::KillAgent => s(6),
            Fault::PauseNats => s(4),
            Fault::PauseNatsLong => client_timeout() + s(5),
            Fault::PauseAdmission => settings.ack_wait() + s(5),
            Fault::PauseAgent | Fault::PauseBeforeClaim => settings.agent_pauses().1 + s(4),
            Fault::CatalogOutage => OUTAGE + s(15),
            Fault::AgentClockSkew => s(40),
            Fault::Panic | Fault::Flood | Fault::HugeLine | Fault::Orphan | Fault::ClockSkew => {
                s(3)
            }
        }
    }
}

/// How long the catalog bucket is gone.
const OUTAGE: Duration = Duration::from_secs(60);
/// Commands submitted for the paused agents of one target.
const BURST: usize = 4;
/// How long a restarted process has to show it serves again.
const SERVE_AGAIN: Duration = Duration::from_secs(60);

/// The clock shift (`cli/clock-shift`), loaded into agents with `LD_PRELOAD`.
const CLOCK_SHIFT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/librct_clock_shift.so"));

/// How long the commands of one phase of a clock shift have to end.
const PHASE_WITHIN: Duration = Duration::from_secs(60);

/// The request timeout of the shipped connection settings.
fn client_timeout() -> Duration {
    rct_streams::Connection::default().timeout
}

/// `per_kind` faults of each of `kinds`, shuffled, each with its slot.
pub(super) fn schedule(
    kinds: &[Fault],
    per_kind: usize,
    settings: Settings,
    rng: &mut fastrand::Rng,
) -> Vec<(Fault, Duration)> {
    let mut schedule: Vec<(Fault, Duration)> = kinds
        .iter()
        .flat_map(|f| std::iter::repeat_n((*f, f.slot(settings)), per_kind))
        .collect();
    rng.shuffle(&mut schedule);
    schedule
}

/// A process's scheduler state and CPU time in ticks (`/proc/<pid>/stat`); `None` once it
/// is gone.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // utime and stime: fields 14 and 15 of stat, 11 and 12 after the state.
    let cpu = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((state, cpu))
}

/// Whether every thread of `pid` is stopped (`/proc/<pid>/task/*/stat` state `T`).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|t| {
                let after = &t[t.rfind(')')? + 1..];
                after
                    .split_whitespace()
                    .next()
                    .map(|s| s == "T" || s == "t")
            })
            .unwrap_or(true)
    })
}

/// Whether `pid` is a live process (a zombie is not).
pub(super) fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// Processes held with SIGSTOP, and their CPU time when they stopped.
struct Held {
    pids: Vec<(u32, u64)>,
}

impl Held {
    /// SIGSTOP each of `pids` and wait until the kernel shows each stopped.
    async fn stop(pids: &[u32]) -> std::result::Result<Held, String> {
        let mut held = Held { pids: Vec::new() };
        for &pid in pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
            let until = Instant::now() + Duration::from_secs(2);
            loop {
                match stat(pid) {
                    // Every thread, so that none adds CPU time while it finishes stopping.
                    Some(('T', cpu)) if all_stopped(pid) => {
                        held.pids.push((pid, cpu));
                        break;
                    }
                    Some((state, _)) if Instant::now() < until => {
                        let _ = state;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    other => {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
                        return Err(format!(
                            "pid {pid} did not stop on SIGSTOP (state {:?})",
                            other.map(|(s, _)| s)
                        ));
                    }
                }
            }
        }
        Ok(held)
    }

    /// SIGCONT each; the pause bit if each was still stopped and used no CPU meanwhile.
    fn resume(mut self) -> std::result::Result<(), String> {
        let mut why = None;
        for (pid, cpu) in std::mem::take(&mut self.pids) {
            match stat(pid) {
                Some(('T', now)) if now == cpu => {}
                Some((state, now)) => {
                    why = Some(format!(
                        "pid {pid} ran while paused (state {state}, CPU ticks {cpu} → {now})"
                    ));
                }
                None => why = Some(format!("pid {pid} was gone before the pause ended")),
            }
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
        }
        why.map_or(Ok(()), Err)
    }
}

/// A run that ends early leaves nothing stopped.
impl Drop for Held {
    fn drop(&mut self) {
        for (pid, _) in &self.pids {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGCONT);
        }
    }
}

/// Whether a SIGKILL is what ended a process.
fn killed(status: Option<std::process::ExitStatus>) -> std::result::Result<(), String> {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) if s.signal() == Some(Signal::SIGKILL as i32) => Ok(()),
        Some(s) => Err(format!("it had already ended ({s}) before the kill")),
        None => Err("there was no process to kill".into()),
    }
}

/// Whether the server at `url` answers a JetStream request, within [`SERVE_AGAIN`].
async fn served(url: &str) -> std::result::Result<(), String> {
    let until = Instant::now() + SERVE_AGAIN;
    loop {
        let attempt = async {
            let client = async_nats::connect(url).await?;
            jetstream::new(client).query_account().await?;
            Ok::<(), async_nats::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(())) => return Ok(()),
            result if Instant::now() > until => {
                return Err(format!(
                    "{url} did not answer JetStream within {SERVE_AGAIN:?} of its restart ({})",
                    match result {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    }
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// How often `needle` occurs in the log at `path`.
fn log_count(path: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches(needle).count())
        .unwrap_or(0)
}

/// One agent process of a target, its incarnation count, and how far its wall clock is
/// shifted.
#[derive(Debug)]
pub(super) struct Agent {
    target: String,
    slot: usize,
    generation: usize,
    shift: time::Duration,
    proc: Proc,
}

impl Agent {
    /// Its instance name: target, slot, incarnation (the agent adds a unique suffix).
    fn instance(&self) -> String {
        instance(&self.target, self.slot, self.generation)
    }
}

fn instance(target: &str, slot: usize, generation: usize) -> String {
    format!("{target}-a{slot}-g{generation}")
}

/// The processes of a run under fault, and what the faults found.
pub(super) struct World {
    nats: Nats,
    admissions: [Proc; 2],
    agents: Vec<Agent>,
    js: jetstream::Context,
    dir: PathBuf,
    urls: Vec<String>,
    settings: Settings,
    pub(super) submitter: Submitter,
    /// Agent instances killed (SIGKILL, or a stop that had to end in one).
    pub(super) killed: BTreeSet<String>,
    /// What the checker must find for commands the faults submitted.
    pub(super) expects: Vec<Expect>,
    /// Faults that did not bite, and why.
    pub(super) idle: Vec<String>,
    /// Agent instances whose clock was past every command's deadline: what they expire
    /// was meant to expire.
    pub(super) expiring: BTreeSet<String>,
    /// Agent instances the run stopped gracefully: what they claimed and had not started,
    /// they end `not_run` on their way out.
    pub(super) stopped: BTreeSet<String>,
}

impl World {
    pub(super) fn start(
        nats: Nats,
        js: jetstream::Context,
        dir: PathBuf,
        settings: Settings,
        targets: &[String],
        per_target: usize,
        submitter: Submitter,
    ) -> Result<World> {
        let urls = nats.urls();
        let mut world = World {
            nats,
            admissions: [Proc::idle(), Proc::idle()],
            agents: Vec::new(),
            js,
            dir,
            urls,
            settings,
            submitter,
            killed: BTreeSet::new(),
            expects: Vec::new(),
            idle: Vec::new(),
            expiring: BTreeSet::new(),
            stopped: BTreeSet::new(),
        };
        std::fs::write(world.clock_shift(), CLOCK_SHIFT)
            .map_err(|e| fail("cannot write the clock shift library", e))?;
        world.admissions = [world.admission("a1")?, world.admission("a2")?];
        for target in targets {
            for slot in 1..=per_target {
                let proc = world.agent_proc(&instance(target, slot, 1), target, None)?;
                world.agents.push(Agent {
                    target: target.clone(),
                    slot,
                    generation: 1,
                    shift: time::Duration::ZERO,
                    proc,
                });
            }
        }
        Ok(world)
    }

    fn process(
        &self,
        verb: &str,
        instance: &str,
        target: Option<&str>,
        env: Vec<(String, String)>,
    ) -> Result<Proc> {
        let mut a = vec![
            verb.to_owned(),
            "--dir".into(),
            self.dir.display().to_string(),
            "--instance".into(),
            instance.to_owned(),
            "--settings".into(),
            format!("{:?}", self.settings).to_lowercase(),
        ];
        for url in &self.urls {
            a.extend(["--server".to_owned(), url.clone()]);
        }
        if let Some(t) = target {
            a.extend(["--target".to_owned(), t.to_owned()]);
        }
        Proc::spawn(a, env, self.log(instance))
    }

    fn clock_shift(&self) -> PathBuf {
        self.dir.join("librct_clock_shift.so")
    }

    fn log(&self, instance: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{instance}.log"))
    }

    fn admission(&self, instance: &str) -> Result<Proc> {
        self.process("chaos-admission", instance, None, Vec::new())
    }

    /// An agent process, its wall clock shifted by `shift` if given.
    fn agent_proc(
        &self,
        instance: &str,
        target: &str,
        shift: Option<time::Duration>,
    ) -> Result<Proc> {
        let env = match shift {
            Some(shift) => vec![
                (
                    "LD_PRELOAD".into(),
                    self.clock_shift().display().to_string(),
                ),
                (
                    "RCT_CLOCK_SHIFT_MS".into(),
                    (shift.whole_milliseconds() as i64).to_string(),
                ),
            ],
            None => Vec::new(),
        };
        self.process("chaos-agent", instance, Some(target), env)
    }

    /// Starts the next incarnation of agent `i` and waits until it is present.
    async fn next_agent(&mut self, i: usize) -> Result<std::result::Result<(), String>> {
        let agent = &mut self.agents[i];
        agent.generation += 1;
        let (name, target) = (agent.instance(), agent.target.clone());
        let shift = (!agent.shift.is_zero()).then_some(agent.shift);
        self.agents[i].proc = self.agent_proc(&name, &target, shift)?;
        Ok(
            crate::stack::wait_for_agents(&self.js, 1, &format!(".{name}-"), SERVE_AGAIN)
                .await
                .map_err(|e| format!("the new agent {name} was not present: {e}")),
        )
    }

    /// Injects `fault`; `Ok(Err(why))` when it did not bite.
    pub(super) async fn inject(
        &mut self,
        fault: Fault,
        rng: &mut fastrand::Rng,
    ) -> Result<std::result::Result<(), String>> {
        let down = Duration::from_millis(rng.u64(500..2000));
        let targets: Vec<String> = {
            let mut t: Vec<String> = self.agents.iter().map(|a| a.target.clone()).collect();
            t.dedup();
            t
        };
        let target = targets[rng.usize(0..targets.len())].clone();
        Ok(match fault {
            Fault::KillNats => {
                let node = self.nats.node(rng);
                let url = node.url();
                if let Err(why) = killed(node.kill()) {
                    return Ok(Err(format!("{url}: {why}")));
                }
                tokio::time::sleep(down).await;
                node.start_again().await;
                served(&url).await
            }
            Fault::PauseNats | Fault::PauseNatsLong => {
                let node = self.nats.node(rng);
                let url = node.url();
                let Some(pid) = node.pid() else {
                    return Ok(Err(format!("{url} was not running")));
                };
                // A client of this node only, to show a request timing out meanwhile.
                let probe = if fault == Fault::PauseNatsLong {
                    Some(
                        rct_streams::Connection::to(vec![url.clone()])
                            .connect("chaos probe", false)
                            .await
                            .map_err(|e| fail("cannot connect the probe", e))?,
                    )
                } else {
                    None
                };
                let held = match Held::stop(&[pid]).await {
                    Ok(held) => held,
                    Err(why) => return Ok(Err(why)),
                };
                let timed_out = match probe {
                    Some(client) => {
                        let begun = Instant::now();
                        let js = rct_streams::Connection::default().jetstream(client);
                        let answer = js.query_account().await;
                        let waited = begun.elapsed();
                        let pause = client_timeout() + Duration::from_millis(rng.u64(1000..3000));
                        tokio::time::sleep(pause.saturating_sub(waited)).await;
                        match answer {
                            Err(_) if waited >= client_timeout() => Ok(()),
                            Err(e) => {
                                Err(format!("the probe failed early ({e}), not by timing out"))
                            }
                            Ok(_) => Err(format!("{url} answered while paused")),
                        }
                    }
                    None => {
                        tokio::time::sleep(down).await;
                        Ok(())
                    }
                };
                held.resume().and(timed_out)
            }
            Fault::KillAdmission => {
                let i = rng.usize(0..2);
                let name = format!("a{}", i + 1);
                let log = self.log(&name);
                let ready = log_count(&log, "admission ready");
                if let Err(why) = killed(self.admissions[i].kill9()) {
                    return Ok(Err(why));
                }
                tokio::time::sleep(down).await;
                self.admissions[i] = self.admission(&name)?;
                let until = Instant::now() + SERVE_AGAIN;
                while log_count(&log, "admission ready") <= ready {
                    if Instant::now() > until {
                        return Ok(Err(format!(
                            "admission {name} was not ready again within {SERVE_AGAIN:?}"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(())
            }
            Fault::PauseAdmission => {
                let Some(pid) = self.admissions[rng.usize(0..2)].pid() else {
                    return Ok(Err("the admission replica was not running".into()));
                };
                let pause = self.settings.admission_pause(rng);
                pause_for(&[pid], pause).await
            }
            Fault::KillAgent => {
                let i = rng.usize(0..self.agents.len());
                let name = self.agents[i].instance();
                if let Err(why) = killed(self.agents[i].proc.kill9()) {
                    return Ok(Err(why));
                }
                self.killed.insert(name);
                tokio::time::sleep(down).await;
                self.next_agent(i).await?
            }
            Fault::PauseAgent => {
                let i = rng.usize(0..self.agents.len());
                let Some(pid) = self.agents[i].proc.pid() else {
                    return Ok(Err("the agent was not running".into()));
                };
                let pause = self.settings.agent_pause(rng);
                pause_for(&[pid], pause).await
            }
            Fault::PauseBeforeClaim => {
                let pids: Vec<u32> = self
                    .agents
                    .iter()
                    .filter(|a| a.target == target)
                    .filter_map(|a| a.proc.pid())
                    .collect();
                let pause = self.settings.agent_pause(rng);
                let held = match Held::stop(&pids).await {
                    Ok(held) => held,
                    Err(why) => return Ok(Err(why)),
                };
                let ids = self.effects(&target, BURST);
                tokio::time::sleep(pause).await;
                let resumed = OffsetDateTime::now_utc();
                self.expects.push(Expect {
                    fault: fault.name(),
                    ids,
                    want: Want::HeldUntil(resumed),
                });
                held.resume()
            }
            Fault::CatalogOutage => self.catalog_outage(&target).await?,
            Fault::AgentClockSkew => self.agent_clock_skew(&target).await?,
            Fault::ClockSkew => {
                // Admission's tolerances, as the run set them.
                let (ahead, behind) = self.settings.tolerances();
                let effect = || vec![("work_ms", proto::value::Kind::Integer(50))];
                let skewed = |skew: time::Duration| {
                    self.submitter
                        .submit_skewed(EFFECT, &target, effect(), skew)
                };
                // Behind by a quarter of freshness: room for a backlog before admission
                // sees it.
                let within = vec![skewed(ahead / 2_i32), skewed(-(behind / 4_i32))];
                let ahead_beyond = vec![skewed(ahead + time::Duration::minutes(4))];
                let behind_beyond = vec![skewed(-(behind + time::Duration::minutes(4)))];
                self.expects.push(Expect {
                    fault: fault.name(),
                    ids: within,
                    want: Want::Succeeded,
                });
                self.expects.push(Expect {
                    fault: fault.name(),
                    ids: ahead_beyond,
                    want: Want::Stale("ahead of admission's clock"),
                });
                self.expects.push(Expect {
                    fault: fault.name(),
                    ids: behind_beyond,
                    want: Want::Stale("before admission saw it"),
                });
                Ok(())
            }
            Fault::Panic => {
                let id = self.submitter.submit(PANIC, &target, Vec::new());
                self.expect(fault, id, Want::Panicked);
                Ok(())
            }
            Fault::Flood | Fault::HugeLine | Fault::Orphan => {
                let (mode, want) = match fault {
                    Fault::Flood => ("flood", Want::Logged("lines elided")),
                    Fault::HugeLine => ("huge", Want::Logged("…truncated ")),
                    _ => ("orphan", Want::Orphaned(self.dir.join("orphans"))),
                };
                let id = self.submitter.submit(
                    SCRIPT,
                    &target,
                    vec![("mode", proto::value::Kind::Enumeration(mode.into()))],
                );
                self.expect(fault, id, want);
                Ok(())
            }
        })
    }

    /// Submits `n` short effects for `target`.
    fn effects(&self, target: &str, n: usize) -> Vec<rct_bus::CommandId> {
        (0..n)
            .map(|_| {
                self.submitter.submit(
                    EFFECT,
                    target,
                    vec![("work_ms", proto::value::Kind::Integer(50))],
                )
            })
            .collect()
    }

    fn expect(&mut self, fault: Fault, id: rct_bus::CommandId, want: Want) {
        self.expects.push(Expect {
            fault: fault.name(),
            ids: vec![id],
            want,
        });
    }

    /// The catalog bucket is deleted for [`OUTAGE`], then made again with its configuration
    /// and the served catalog (its earlier revisions are gone: a run serves one). Every agent
    /// of `target` is restarted (gracefully) at its start, so none has the catalog cached, and
    /// commands for `target` are submitted: they must be claimed only once the bucket is back,
    /// and succeed.
    async fn catalog_outage(&mut self, target: &str) -> Result<std::result::Result<(), String>> {
        use rct_streams::topology::{CATALOG_BUCKET, CATALOG_KEY};
        let name = format!("KV_{CATALOG_BUCKET}");
        // Each call is tried again while it fails (up to a minute): the fault before this one
        // may have left the cluster electing a meta leader.
        let js = &self.js;
        let (config, served) = settled(|| async {
            let config = js.get_stream(&name).await?.info().await?.config.clone();
            let served = js
                .get_key_value(CATALOG_BUCKET)
                .await?
                .get(CATALOG_KEY)
                .await?;
            Ok::<_, async_nats::Error>((config, served))
        })
        .await
        .map_err(|e| fail("cannot read the catalog bucket", e))?;
        let served =
            served.ok_or_else(|| fail("cannot read the catalog bucket", "no catalog is served"))?;
        settled(|| async {
            use async_nats::jetstream::{ErrorCode, context::GetStreamErrorKind};
            let Err(e) = js.delete_stream(&name).await else {
                return Ok(());
            };
            // An earlier attempt may have deleted it and lost the answer.
            match js.get_stream(&name).await.map(|_| ()) {
                Err(gone)
                    if matches!(gone.kind(), GetStreamErrorKind::JetStream(j)
                        if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
                {
                    Ok(())
                }
                _ => Err(e),
            }
        })
        .await
        .map_err(|e| fail("cannot delete the catalog bucket", e))?;
        let began = Instant::now();
        let mut bit = match rct_streams::topology::served_catalog(&self.js).await {
            Ok(Some(_)) => Err("the catalog could still be read".to_owned()),
            _ => Ok(()),
        };
        // Every agent of `target` starts again with no catalog cached: its commands must wait.
        let (restarted, present) = self.restart(target, time::Duration::ZERO).await?;
        bit = bit.and(present);
        let ids = self.effects(target, 2);
        tokio::time::sleep(OUTAGE.saturating_sub(began.elapsed())).await;
        let missed = restarted
            .iter()
            .any(|(name, _)| log_count(&self.log(name), "the catalog is not available") > 0);
        if !missed {
            bit = bit.and(Err(format!(
                "no restarted agent of {target} missed the catalog"
            )));
        }
        let js = &self.js;
        settled(|| js.create_stream(config.clone()))
            .await
            .map_err(|e| fail("cannot restore the catalog bucket", e))?;
        settled(|| async {
            js.get_key_value(CATALOG_BUCKET)
                .await?
                .put(CATALOG_KEY, served.clone())
                .await?;
            Ok::<_, async_nats::Error>(())
        })
        .await
        .map_err(|e| fail("cannot restore the catalog", e))?;
        self.expects.push(Expect {
            fault: Fault::CatalogOutage.name(),
            ids,
            want: Want::SucceededAfter(OffsetDateTime::now_utc()),
        });
        Ok(bit)
    }

    /// Every agent of `target` is restarted (gracefully) with its wall clock shifted, phase
    /// by phase, and two commands submitted for it in each: half the start window ahead and
    /// an hour behind, they must succeed; the start window and 4 minutes ahead, the agent
    /// finds every command past its deadline and must expire them unrun (as every other
    /// command it receives meanwhile). Then the agents start again on the true clock. The
    /// skew bit if each new incarnation's presence shows its start time shifted.
    async fn agent_clock_skew(&mut self, target: &str) -> Result<std::result::Result<(), String>> {
        let window = time::Duration::minutes(DEADLINE_MINUTES);
        let phases = [
            (window / 2, false),
            (-time::Duration::hours(1), false),
            (window + time::Duration::minutes(4), true),
        ];
        let mut bit = Ok(());
        for (shift, beyond) in phases {
            let (restarted, present) = self.restart(target, shift).await?;
            bit = bit.and(present);
            for (name, spawned) in &restarted {
                if beyond {
                    self.expiring.insert(name.clone());
                }
                if let Err(why) = self.shown_shifted(name, shift, *spawned).await {
                    bit = bit.and(Err(why));
                }
            }
            let ids = self.effects(target, 2);
            // Ended while the agents' clocks are shifted; the checker says how.
            for id in &ids {
                self.ended(target, *id).await;
            }
            self.expects.push(Expect {
                fault: Fault::AgentClockSkew.name(),
                ids,
                want: if beyond {
                    Want::Expired
                } else {
                    Want::Succeeded
                },
            });
        }
        let (_, present) = self.restart(target, time::Duration::ZERO).await?;
        Ok(bit.and(present))
    }

    /// Restarts every agent of `target` gracefully, its clock shifted by `shift`: the names
    /// of the new incarnations and when each was started, and `Err` if one was not present
    /// again.
    async fn restart(
        &mut self,
        target: &str,
        shift: time::Duration,
    ) -> Result<(
        Vec<(String, OffsetDateTime)>,
        std::result::Result<(), String>,
    )> {
        let of_target: Vec<usize> = (0..self.agents.len())
            .filter(|i| self.agents[*i].target == target)
            .collect();
        let (mut names, mut present) = (Vec::new(), Ok(()));
        for i in of_target {
            let old = self.agents[i].instance();
            if self.agents[i].proc.stop().await {
                self.stopped.insert(old);
            } else {
                self.killed.insert(old);
            }
            self.agents[i].shift = shift;
            let spawned = OffsetDateTime::now_utc();
            if let Err(why) = self.next_agent(i).await? {
                present = present.and(Err(why));
            }
            names.push((self.agents[i].instance(), spawned));
        }
        Ok((names, present))
    }

    /// Whether agent `name`'s presence shows a start time `shift` off `spawned`, when it was
    /// started by this clock.
    async fn shown_shifted(
        &self,
        name: &str,
        shift: time::Duration,
        spawned: OffsetDateTime,
    ) -> std::result::Result<(), String> {
        let live = rct_streams::journal::presences(&self.js)
            .await
            .map_err(|e| format!("cannot read presence: {e}"))?;
        let prefix = format!(".{name}-");
        for (key, value) in live {
            if !key.contains(&prefix) {
                continue;
            }
            let presence: rct_bus::presence::Presence = serde_json::from_slice(&value)
                .map_err(|e| format!("{name}'s presence does not read: {e}"))?;
            let started = OffsetDateTime::parse(
                &presence.started_at,
                &time::format_description::well_known::Rfc3339,
            )
            .map_err(|e| format!("{name}'s start time does not read: {e}"))?;
            let off = started - spawned;
            // It read its clock moments after it was started: what remains is the shift.
            return if (off - shift).abs() < time::Duration::seconds(30) {
                Ok(())
            } else {
                Err(format!(
                    "{name} started {off} off this clock, not shifted by {shift}"
                ))
            };
        }
        Err(format!("{name} has no presence"))
    }

    /// Waits up to [`PHASE_WITHIN`] for command `id`'s outcome.
    async fn ended(&self, target: &str, id: rct_bus::CommandId) {
        let tower = rct_bus::Tower::new(TOWER).expect("a valid tower name");
        let target = rct_bus::Target::of_event(target);
        let until = Instant::now() + PHASE_WITHIN;
        while Instant::now() < until {
            let outcome = rct_bus::EventKind::Outcome;
            let slot = rct_streams::journal::slot(&self.js, &tower, &target, id, outcome);
            if let Ok(Some(_)) = slot.await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every process, then the servers.
    pub(super) async fn stop(mut self) {
        for proc in self
            .admissions
            .iter_mut()
            .chain(self.agents.iter_mut().map(|a| &mut a.proc))
        {
            proc.stop().await;
        }
    }
}

/// Holds `pids` stopped for `pause`.
async fn pause_for(pids: &[u32], pause: Duration) -> std::result::Result<(), String> {
    let held = match Held::stop(pids).await {
        Ok(held) => held,
        Err(why) => return Err(why),
    };
    tokio::time::sleep(pause).await;
    held.resume()
}

/// A child process of this binary that can be killed, paused and started again.
#[derive(Debug)]
pub(super) struct Proc {
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// A process not started yet.
    fn idle() -> Self {
        Self {
            args: Vec::new(),
            env: Vec::new(),
            log: PathBuf::new(),
            child: None,
        }
    }

    fn spawn(args: Vec<String>, env: Vec<(String, String)>, log: PathBuf) -> Result<Self> {
        let mut proc = Self {
            args,
            env,
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
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap: the status says whether the kill is what ended it.
    fn kill9(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGTERM, then SIGKILL after a grace period: whether it stopped on its own.
    async fn stop(&mut self) -> bool {
        self.signal(Signal::SIGCONT);
        self.signal(Signal::SIGTERM);
        let started = Instant::now();
        while let Some(child) = &mut self.child {
            if matches!(child.try_wait(), Ok(Some(_))) {
                self.child = None;
                return true;
            }
            if started.elapsed() > Duration::from_secs(15) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill9();
        false
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
pub(super) enum Nats {
    Single(Server),
    Cluster(Cluster),
}

impl Nats {
    pub(super) async fn start(topology: Topology) -> Self {
        let setup = Setup {
            sync_always: true,
            ..Setup::default()
        };
        match topology {
            Topology::Single => Nats::Single(Server::start_with(setup).await),
            Topology::Cluster => Nats::Cluster(Cluster::start_with(setup).await),
        }
    }

    pub(super) fn urls(&self) -> Vec<String> {
        match self {
            Nats::Single(s) => vec![s.url()],
            Nats::Cluster(c) => c.urls(),
        }
    }

    pub(super) fn replicas(&self) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().unwrap()
    }

    /// A pause bites when the process stays stopped; one let go meanwhile, or gone, did not.
    #[tokio::test]
    async fn a_pause_that_did_not_hold_is_found_out() {
        let mut child = sleeper();
        let pid = child.id();
        assert!(alive(pid));
        let held = Held::stop(&[pid]).await.unwrap();
        assert_eq!(stat(pid).unwrap().0, 'T');
        held.resume().unwrap();

        let held = Held::stop(&[pid]).await.unwrap();
        kill(Pid::from_raw(pid as i32), Signal::SIGCONT).unwrap();
        let why = held.resume().unwrap_err();
        assert!(why.contains("ran while paused"), "{why}");

        let held = Held::stop(&[pid]).await.unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!alive(pid));
        let why = held.resume().unwrap_err();
        assert!(why.contains("gone"), "{why}");
    }

    /// A kill bites when SIGKILL is what ended the process.
    #[test]
    fn a_kill_of_a_process_already_gone_did_not_bite() {
        let mut child = sleeper();
        child.kill().unwrap();
        killed(child.wait().ok()).unwrap();
        let mut done = Command::new("true").spawn().unwrap();
        let why = killed(done.wait().ok()).unwrap_err();
        assert!(why.contains("already ended"), "{why}");
        assert!(killed(None).is_err());
    }

    /// The schedule holds `per_kind` of each kind asked for, and a pause slot holds the
    /// longest pause of its settings.
    #[test]
    fn the_schedule_has_every_kind_and_slots_that_fit() {
        let schedule = schedule(
            &Fault::ALL,
            2,
            Settings::Faults,
            &mut fastrand::Rng::with_seed(1),
        );
        assert_eq!(schedule.len(), 2 * Fault::ALL.len());
        for kind in Fault::ALL {
            assert_eq!(schedule.iter().filter(|(f, _)| *f == kind).count(), 2);
        }
        for settings in [Settings::Faults, Settings::Production] {
            let (low, high) = settings.agent_pauses();
            assert!(
                low > Duration::ZERO && high < settings.agent_ttl(),
                "{settings:?}"
            );
            assert!(Fault::PauseAgent.slot(settings) > high);
            assert!(Fault::PauseAdmission.slot(settings) > settings.ack_wait());
        }
        assert!(Settings::Faults.agent_pauses().0 > Settings::Faults.ack_wait());
    }
}
