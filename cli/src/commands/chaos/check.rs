//! The checker of a chaos run: it reads `RCT_SUBMIT`, `RCT_CMD` (verifying every command's
//! signature), `RCT_EVT` and the effect ledger, and counts what must be zero:
//!
//! - `lost`: acknowledged submissions without a decision;
//! - `decided_twice`: a submission decided more than once, a command admitted twice (both
//!   from every decision event of `RCT_EVT`, on every subject), or a command id stored more
//!   than once in `RCT_CMD`;
//! - `executed_twice`: a command whose effect ran more than once (the ledger);
//! - `unexpected`: an effect without an admission-signed command, a command whose signature
//!   does not verify, or a decision for a request nobody made;
//! - `unknown`: outcomes recorded as unknown; they must be exactly the commands a killed agent
//!   had claimed and not finished (`unknown ≠ kills` counts the difference);
//! - `unaccounted`: admitted commands without a terminal outcome;
//! - `not_as_recorded`: an effect that began for a command recorded as not run (ended
//!   without running, or expired), a command recorded succeeded whose effect never
//!   finished (no `end` line), a command with more than one outcome (on any subject), or
//!   with an event at another tower or target than its decision's (where its readers do not
//!   look), or with an event not signed by admission or an agent it certified for the
//!   command's tower and target;
//! - `failed`: admitted commands that ended failed, expired or cancelled, other than those
//!   meant to (a panicking handler's fail; an agent whose clock is past every deadline
//!   expires what it receives; an agent the run stops gracefully ends what it claimed and
//!   had not started `not_run`);
//! - faults that did not bite, or whose commands did not end as they must ([`Expect`]);
//! - a run that proves nothing: nothing attempted, acknowledged, admitted or succeeded, no
//!   fault injected when faults were asked for, or outcomes that do not add up (admitted ≠
//!   succeeded + unknown + expected failures).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use rct_bus::proto::{self, event::Kind};
use rct_bus::{CommandId, PublicKey, Purpose, Unverified, Verifier};
use rct_streams::replay::Record;
use rct_streams::timestamp::to_datetime;
use time::OffsetDateTime;

use super::fault::{World, alive};
use super::{Args, fail};
use crate::exit::{Error, Result};

/// What the checker must find for commands a fault submitted.
#[derive(Debug)]
pub(super) struct Expect {
    pub(super) fault: &'static str,
    pub(super) ids: Vec<CommandId>,
    pub(super) want: Want,
}

#[derive(Debug)]
pub(super) enum Want {
    /// Each failed with code `panic`.
    Panicked,
    /// Each succeeded.
    Succeeded,
    /// Each succeeded, with a log line containing this (the output's cap did its work).
    Logged(&'static str),
    /// Each succeeded soon after its claim, and the child it left running (its pid in a file
    /// of this folder named by the command id) is gone.
    Orphaned(PathBuf),
    /// At least one was admitted before this moment and claimed only after it: delivered to
    /// paused agents, and held unclaimed until they resumed.
    HeldUntil(OffsetDateTime),
    /// Each was claimed only after this moment, and succeeded.
    SucceededAfter(OffsetDateTime),
    /// Each was rejected as stale, with a reason containing this.
    Stale(&'static str),
    /// Each expired (never run: the effect ledger says so apart).
    Expired,
}

/// How long a script that leaves a child holding its pipes may take to end.
const ORPHAN_WITHIN: Duration = Duration::from_secs(30);

impl Expect {
    /// What is wrong with how these commands ended, if anything.
    fn unmet(&self, records: &[Record]) -> Option<String> {
        let of = |id: &CommandId| {
            let id = id.to_string();
            records
                .iter()
                .filter(move |r| r.event.command_id == id)
                .map(|r| (&r.event.kind, r.event.at.as_ref().and_then(to_datetime)))
        };
        let outcome = |id: &CommandId| {
            of(id).find_map(|(kind, at)| match kind {
                Some(
                    k @ (Kind::Succeeded(_)
                    | Kind::Failed(_)
                    | Kind::Expired(_)
                    | Kind::Cancelled(_)
                    | Kind::Unknown(_)),
                ) => Some((k, at)),
                _ => None,
            })
        };
        let claimed = |id: &CommandId| {
            of(id).find_map(|(kind, at)| match kind {
                Some(Kind::Started(s)) if !s.without_running => at,
                _ => None,
            })
        };
        let admitted = |id: &CommandId| {
            of(id).find_map(|(kind, at)| match kind {
                Some(Kind::Admitted(_)) => at,
                _ => None,
            })
        };
        let succeeded = |id: &CommandId| match outcome(id) {
            Some((Kind::Succeeded(_), _)) => None,
            other => Some(format!(
                "{id} ended {}, not succeeded",
                describe(other.map(|o| o.0))
            )),
        };
        let problem = match &self.want {
            Want::Panicked => self.ids.iter().find_map(|id| match outcome(id) {
                Some((Kind::Failed(f), _)) if f.code == "panic" => None,
                other => Some(format!(
                    "{id} ended {}, not failed with code panic",
                    describe(other.map(|o| o.0))
                )),
            }),
            Want::Succeeded => self.ids.iter().find_map(succeeded),
            Want::Expired => self.ids.iter().find_map(|id| match outcome(id) {
                Some((Kind::Expired(_), _)) => None,
                other => Some(format!(
                    "{id} ended {}, not expired",
                    describe(other.map(|o| o.0))
                )),
            }),
            Want::Logged(needle) => self.ids.iter().find_map(|id| {
                succeeded(id).or_else(|| {
                    let logged = of(id).any(
                        |(kind, _)| matches!(kind, Some(Kind::Log(l)) if l.line.contains(needle)),
                    );
                    (!logged).then(|| format!("{id} has no log line with {needle:?}"))
                })
            }),
            Want::Orphaned(folder) => self.ids.iter().find_map(|id| {
                succeeded(id).or_else(|| {
                    let took = match (claimed(id), outcome(id).and_then(|o| o.1)) {
                        (Some(from), Some(to)) => to - from,
                        _ => return Some(format!("{id} has no claim or outcome time")),
                    };
                    if took > ORPHAN_WITHIN {
                        return Some(format!("{id} took {took} to end: the child held it"));
                    }
                    let pid = std::fs::read_to_string(folder.join(id.to_string()))
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok());
                    match pid {
                        None => Some(format!("{id}'s script recorded no child pid")),
                        Some(pid) if alive(pid) => {
                            Some(format!("{id}'s child (pid {pid}) outlived its script"))
                        }
                        Some(_) => None,
                    }
                })
            }),
            Want::Stale(needle) => self.ids.iter().find_map(|id| {
                let rejected = of(id).find_map(|(kind, _)| match kind {
                    Some(Kind::Rejected(r)) => Some(r.clone()),
                    _ => None,
                });
                match rejected {
                    Some(r)
                        if r.code == proto::RejectionCode::Stale as i32
                            && r.message.contains(needle) =>
                    {
                        None
                    }
                    Some(r) => Some(format!(
                        "{id} was rejected otherwise (code {}): {}",
                        r.code, r.message
                    )),
                    None => Some(format!(
                        "{id} was not rejected ({})",
                        describe(outcome(id).map(|o| o.0))
                    )),
                }
            }),
            Want::HeldUntil(moment) => {
                let held = self.ids.iter().any(|id| {
                    admitted(id).is_some_and(|at| at < *moment)
                        && claimed(id).is_some_and(|at| at >= *moment)
                });
                (!held).then(|| {
                    "no command was admitted while the agents were paused and claimed only after"
                        .to_owned()
                })
            }
            Want::SucceededAfter(moment) => self.ids.iter().find_map(|id| {
                succeeded(id).or_else(|| match claimed(id) {
                    Some(at) if at >= *moment => None,
                    Some(at) => Some(format!("{id} was claimed at {at}, before {moment}")),
                    None => Some(format!("{id} has no claim")),
                })
            }),
        };
        problem.map(|p| format!("{}: {p}", self.fault))
    }
}

fn describe(kind: Option<&Kind>) -> String {
    match kind {
        None => "with no outcome".into(),
        Some(Kind::Succeeded(_)) => "succeeded".into(),
        Some(Kind::Failed(f)) => format!("failed ({}: {})", f.code, f.message),
        Some(Kind::Expired(_)) => "expired".into(),
        Some(Kind::Cancelled(_)) => "cancelled".into(),
        Some(Kind::Unknown(u)) => format!("unknown ({})", u.reason),
        Some(_) => "otherwise".into(),
    }
}

/// What one seed did and what the checker found.
#[derive(Clone, Debug, Default)]
pub(super) struct Report {
    pub(super) seed: u64,
    pub(super) topology: String,
    attempted: usize,
    acked: usize,
    recovered: usize,
    admitted: usize,
    rejected: usize,
    succeeded: usize,
    pub(super) faults: BTreeMap<&'static str, usize>,
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
    /// The first few of those, each with how it ended.
    ended_otherwise: Vec<String>,
    /// Commands meant to fail (a panicking handler's) or to expire (received by an agent
    /// whose clock is past their deadline).
    expected_failures: usize,
    /// Faults that did not bite, and faults mishandled (their commands did not end as they
    /// must), each with why.
    idle: Vec<String>,
    /// Faults the schedule was asked to inject.
    pub(super) faults_asked: usize,
    pub(super) seconds: f64,
}

impl Report {
    pub(super) fn valid(&self) -> bool {
        self.lost == 0
            && self.decided_twice == 0
            && self.executed_twice == 0
            && self.unexpected == 0
            && self.unknown_not_from_kills == 0
            && self.kills_without_unknown == 0
            && self.unaccounted == 0
            && self.not_as_recorded == 0
            && self.failed == 0
            && self.idle.is_empty()
            && self.vacuous().is_none()
    }

    /// Why the run proves nothing, if it does not: a checker that passes an empty run, or
    /// one whose faults never happened, cannot say no.
    fn vacuous(&self) -> Option<String> {
        let ended = self.succeeded + self.unknown + self.expected_failures;
        if self.attempted == 0 {
            Some("nothing was attempted".into())
        } else if self.acked == 0 {
            Some("nothing was acknowledged".into())
        } else if self.admitted == 0 {
            Some("nothing was admitted".into())
        } else if self.succeeded == 0 {
            Some("nothing succeeded".into())
        } else if self.faults_asked > 0 && self.faults.values().sum::<usize>() == 0 {
            Some("no fault was injected".into())
        } else if self.admitted != ended {
            Some(format!(
                "outcomes do not add up: {} admitted, {} succeeded + {} unknown + {} expected \
                 failures, and {} ended otherwise",
                self.admitted, self.succeeded, self.unknown, self.expected_failures, self.failed
            ))
        } else {
            None
        }
    }

    pub(super) fn line(&self) -> String {
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
                (false, Some(why)) => format!(
                    "VIOLATION: the run proves nothing ({why}){}",
                    self.ended_otherwise
                        .iter()
                        .map(|e| format!("; {e}"))
                        .collect::<String>()
                ),
                (false, None) => format!(
                    "VIOLATION{}{}{}",
                    if self.not_as_recorded > 0 {
                        format!(", not as recorded {}", self.not_as_recorded)
                    } else {
                        String::new()
                    },
                    if self.failed > 0 {
                        format!(", failed {}", self.failed)
                    } else {
                        String::new()
                    },
                    self.idle
                        .iter()
                        .chain(&self.ended_otherwise)
                        .map(|why| format!("; {why}"))
                        .collect::<String>()
                ),
            }
        )
    }
}

/// What the event stream says, per command.
#[derive(Debug, Default)]
pub(super) struct Fold {
    pub(super) decided: BTreeSet<CommandId>,
    /// Decisions by submission sequence, and whether the decision admits a plan only: a request that
    /// waits for approvals of an operation that plans has both a plan-only decision (under
    /// the id derived from its own) and its own decision.
    decisions: BTreeMap<(u64, bool), usize>,
    /// Admissions per command.
    pub(super) admitted: BTreeMap<CommandId, usize>,
    rejected: BTreeSet<CommandId>,
    /// Who claimed it (the agent incarnation of each start).
    claims: BTreeMap<CommandId, Vec<String>>,
    /// Its terminal outcome and who wrote it.
    pub(super) outcome: BTreeMap<CommandId, (&'static str, String)>,
    /// Claimed only to be ended without running, or ended `not_run`.
    unrun: BTreeSet<CommandId>,
    /// Terminal events per command, on every subject (one is the only right number).
    outcomes: BTreeMap<CommandId, usize>,
    /// Where each command's decision is: its tower and target.
    place: BTreeMap<CommandId, (rct_bus::Tower, rct_bus::Target)>,
    /// Commands with an event elsewhere than their decision.
    misplaced: BTreeSet<CommandId>,
    /// Commands with an event not signed by its entitled writer (not folded in).
    unverified: BTreeSet<CommandId>,
}

impl Fold {
    pub(super) fn of(records: &[Record]) -> Self {
        let mut fold = Fold::default();
        for record in records {
            let Ok(id) = record.event.command_id.parse::<CommandId>() else {
                continue;
            };
            if !record.provenance.counts() {
                fold.unverified.insert(id);
                continue;
            }
            let here = (record.tower.clone(), record.target.clone());
            if record.kind == rct_bus::EventKind::Decision {
                fold.place.entry(id).or_insert_with(|| here.clone());
            }
            if fold.place.get(&id).is_some_and(|place| *place != here) {
                fold.misplaced.insert(id);
            }
            let terminal = |name: &'static str| Some((name, record.event.source.clone()));
            let outcome = match &record.event.kind {
                Some(Kind::Admitted(a)) => {
                    fold.decided.insert(id);
                    *fold.admitted.entry(id).or_default() += 1;
                    let key = a
                        .request
                        .as_ref()
                        .map_or((0, false), |r| (r.submission_sequence, r.plan));
                    *fold.decisions.entry(key).or_default() += 1;
                    None
                }
                Some(Kind::Rejected(r)) => {
                    fold.decided.insert(id);
                    fold.rejected.insert(id);
                    let key = r
                        .request
                        .as_ref()
                        .map_or((0, false), |r| (r.submission_sequence, r.plan));
                    *fold.decisions.entry(key).or_default() += 1;
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
                Some(Kind::Failed(f)) => {
                    // Ended by a stop that had claimed it and never started it.
                    if f.code == "not_run" {
                        fold.unrun.insert(id);
                    }
                    terminal("failed")
                }
                Some(Kind::Expired(_)) => terminal("expired"),
                Some(Kind::Cancelled(_)) => terminal("cancelled"),
                Some(Kind::Unknown(_)) => terminal("unknown"),
                _ => None,
            };
            if let Some(outcome) = outcome {
                *fold.outcomes.entry(id).or_default() += 1;
                fold.outcome.insert(id, outcome);
            }
        }
        fold
    }
}

/// `read` again, up to a minute, while it fails: right after a fault a read can time out.
pub(super) async fn settled<T, E, F, Fut>(read: F) -> std::result::Result<T, E>
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

pub(super) async fn check(
    js: &jetstream::Context,
    dir: &Path,
    admission: &PublicKey,
    records: &[Record],
    outcomes: &HashMap<CommandId, bool>,
    world: &World,
) -> Result<Report> {
    let killed = &world.killed;
    let fold = Fold::of(records);
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

    let meant = meant(&fold, &world.expects, &world.expiring, &world.stopped);
    let as_meant = |id: &CommandId, kind: &str| meant.get(id) == Some(&kind);
    let ended_otherwise: Vec<CommandId> = fold
        .outcome
        .iter()
        .filter(|(id, (kind, _))| {
            matches!(*kind, "failed" | "expired" | "cancelled") && !as_meant(id, kind)
        })
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
            + fold.admitted.values().filter(|n| **n > 1).count()
            + signed_commands.values().filter(|n| **n > 1).count(),
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
                .count()
            + fold.outcomes.values().filter(|n| **n > 1).count()
            + fold.misplaced.len()
            + fold.unverified.len(),
        failed: ended_otherwise.len(),
        ended_otherwise: ended_otherwise
            .iter()
            .take(5)
            .map(|id| {
                let outcome = records.iter().rev().find_map(|r| {
                    (r.event.command_id == id.to_string() && r.kind == rct_bus::EventKind::Outcome)
                        .then_some(r.event.kind.as_ref())
                        .flatten()
                });
                format!("{id} ended {}", describe(outcome))
            })
            .collect(),
        expected_failures: fold
            .outcome
            .iter()
            .filter(|(id, (kind, _))| as_meant(id, kind))
            .count(),
        idle: world
            .idle
            .iter()
            .map(|why| format!("did not bite: {why}"))
            .chain(
                world
                    .expects
                    .iter()
                    .filter_map(|e| e.unmet(records))
                    .map(|why| format!("mishandled: {why}")),
            )
            .collect(),
        ..Report::default()
    })
}

/// The commands meant to end as they did: a panicking handler's command fails; whatever an
/// agent whose clock is past every deadline (`expiring`) ends, it expires; a command an agent
/// the run stopped gracefully (`stopped`) had claimed and not started, that agent ends
/// `not_run` on its way out.
fn meant(
    fold: &Fold,
    expects: &[Expect],
    expiring: &BTreeSet<String>,
    stopped: &BTreeSet<String>,
) -> BTreeMap<CommandId, &'static str> {
    // The agent instances are named `<name>-<incarnation>`, last in an event's source.
    let by = |names: &BTreeSet<String>, source: &str| {
        let incarnation = source.rsplit('/').next().unwrap_or_default();
        names
            .iter()
            .any(|name| incarnation.starts_with(&format!("{name}-")))
    };
    let panicked = expects
        .iter()
        .filter(|e| matches!(e.want, Want::Panicked))
        .flat_map(|e| e.ids.iter().map(|id| (*id, "failed")));
    let expired = fold
        .outcome
        .iter()
        .filter(|(_, (_, source))| by(expiring, source))
        .map(|(id, _)| (*id, "expired"));
    let unrun = fold
        .outcome
        .iter()
        .filter(|(id, (kind, source))| {
            *kind == "failed" && fold.unrun.contains(*id) && by(stopped, source)
        })
        .map(|(id, _)| (*id, "failed"));
    panicked.chain(expired).chain(unrun).collect()
}

pub(super) fn table(reports: &[Report], args: &Args) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| seed | topology | attempted | acked | recovered | admitted | rejected | succeeded | faults | lost | \
         decided twice | executed twice | unexpected | unknown (= killed agents' running commands) | \
         unaccounted | not as recorded | failed | expected failures | faults that did not bite or were mishandled | seconds |"
    );
    let _ = writeln!(out, "|{}", "---|".repeat(20));
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
        "\nfaults: {}; {} commands and {} faults of each kind per seed, {} targets, {} agent(s) \
         per target, {:?} settings",
        faults.join(", "),
        args.commands,
        args.faults,
        args.targets,
        args.agents,
        args.settings
    );
    for why in &total.idle {
        let _ = writeln!(out, "- {why}");
    }
    out
}

impl Report {
    /// One line of the table, labelled `label` in the seed column.
    fn row(&self, label: &str) -> String {
        let mismatch = self.unknown_not_from_kills + self.kills_without_unknown;
        format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {} | {:.0} |",
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
            self.expected_failures,
            self.idle.len(),
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
        self.expected_failures += other.expected_failures;
        self.idle.extend(other.idle.iter().cloned());
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
            (
                Report {
                    succeeded: 8,
                    ..good.clone()
                },
                "outcomes do not add up",
            ),
        ] {
            assert!(!bad.valid(), "{why}");
            assert!(bad.line().contains(why), "{}", bad.line());
        }
        // A command that ended otherwise is named, with how it ended, whichever way it fails.
        for succeeded in [9, 10] {
            let named = Report {
                failed: 1,
                succeeded,
                ended_otherwise: vec!["01X ended failed (not_run: stopped)".into()],
                ..good.clone()
            };
            assert!(!named.valid());
            assert!(
                named.line().contains("01X ended failed (not_run"),
                "{}",
                named.line()
            );
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
            Report {
                idle: vec!["pause agent: pid 7 ran while paused".into()],
                ..good.clone()
            },
            Report {
                decided_twice: 1,
                ..good.clone()
            },
        ] {
            assert!(!bad.valid(), "{}", bad.line());
            assert!(bad.line().contains("VIOLATION"), "{}", bad.line());
        }
    }

    fn record(id: CommandId, kind: Kind, at: OffsetDateTime) -> Record {
        Record {
            sequence: 1,
            published: at,
            tower: "chaos".parse().unwrap(),
            target: rct_bus::Target::none(),
            command_id: id,
            kind: rct_bus::EventKind::Outcome,
            event: proto::Event {
                command_id: id.to_string(),
                at: Some(rct_streams::timestamp::from_datetime(at)),
                kind: Some(kind),
                ..proto::Event::default()
            },
            trace: None,
            provenance: Default::default(),
        }
    }

    /// A command whose outcome says it was not run, under a claim to run it, is one the
    /// effect ledger can contradict.
    #[test]
    fn an_outcome_saying_not_run_counts_as_not_run() {
        let id = CommandId::generate();
        let failed = |code: &str| {
            Kind::Failed(proto::Failed {
                code: code.into(),
                ..proto::Failed::default()
            })
        };
        let now = OffsetDateTime::now_utc();
        assert!(
            Fold::of(&[record(id, failed("not_run"), now)])
                .unrun
                .contains(&id)
        );
        assert!(
            !Fold::of(&[record(id, failed("timeout"), now)])
                .unrun
                .contains(&id)
        );
    }

    /// An event of a command at another target than its decision's is where no reader of the
    /// command looks: the checker counts it (a writer that puts an outcome there leaves the
    /// command open for ever, as far as `rct show` can tell).
    #[test]
    fn an_event_elsewhere_than_its_decision_is_counted() {
        let id = CommandId::generate();
        let now = OffsetDateTime::now_utc();
        let mut decision = record(id, Kind::Admitted(proto::Admitted::default()), now);
        decision.kind = rct_bus::EventKind::Decision;
        let here = record(id, Kind::Succeeded(proto::Succeeded::default()), now);
        let mut there = here.clone();
        there.target = "elsewhere".parse().unwrap();
        assert!(
            Fold::of(&[decision.clone(), here.clone()])
                .misplaced
                .is_empty()
        );
        assert!(Fold::of(&[decision.clone(), there]).misplaced.contains(&id));
        // Nor is an event its entitled writer did not sign: counted, not folded in.
        let mut unsigned = here;
        unsigned.provenance = rct_bus::provenance::Provenance::Unsigned;
        let fold = Fold::of(&[decision, unsigned]);
        assert!(fold.unverified.contains(&id) && !fold.outcome.contains_key(&id));
    }

    /// An agent the run stopped gracefully ends what it claimed and had not started
    /// `not_run`: meant so, when that agent wrote it. Any other not_run, or a stopped agent's
    /// other failure, is not.
    #[test]
    fn a_not_run_from_an_agent_the_run_stopped_is_meant() {
        let now = OffsetDateTime::now_utc();
        let failed = |code: &str| {
            Kind::Failed(proto::Failed {
                code: code.into(),
                ..proto::Failed::default()
            })
        };
        let by = |id, kind, agent: &str| {
            let mut r = record(id, kind, now);
            r.event.source = format!("agent/chaos/t1/{agent}-01M8T8QFBRK72FY1WV6DBK86BQ");
            r
        };
        let [mine, other, timeout] = [(); 3].map(|()| CommandId::generate());
        let fold = Fold::of(&[
            by(mine, failed("not_run"), "t1-a1-g2"),
            by(other, failed("not_run"), "t1-a2-g1"),
            by(timeout, failed("timeout"), "t1-a1-g2"),
        ]);
        let stopped: BTreeSet<String> = ["t1-a1-g2".to_owned()].into();
        let excused = meant(&fold, &[], &BTreeSet::new(), &stopped);
        assert_eq!(excused.get(&mine), Some(&"failed"));
        assert_eq!(excused.get(&other), None, "not stopped by the run");
        assert_eq!(excused.get(&timeout), None, "failed otherwise");
        // Nor an incarnation whose name merely begins like a stopped one's.
        let fold = Fold::of(&[by(mine, failed("not_run"), "t1-a1-g20")]);
        assert!(meant(&fold, &[], &BTreeSet::new(), &stopped).is_empty());
    }

    /// Each expectation says no when the command ended otherwise.
    #[test]
    fn commands_of_faults_must_end_as_the_fault_requires() {
        let id = CommandId::generate();
        let now = OffsetDateTime::now_utc();
        let failed = |code: &str| {
            Kind::Failed(proto::Failed {
                code: code.into(),
                ..proto::Failed::default()
            })
        };
        let started = Kind::Started(proto::Started::default());
        let succeeded = Kind::Succeeded(proto::Succeeded::default());
        let log = |line: &str| {
            Kind::Log(proto::Log {
                line: line.into(),
                ..proto::Log::default()
            })
        };
        let expect = |want| Expect {
            fault: "f",
            ids: vec![id],
            want,
        };
        let unmet = |want, kinds: Vec<(Kind, OffsetDateTime)>| {
            let records: Vec<Record> = kinds.into_iter().map(|(k, at)| record(id, k, at)).collect();
            expect(want).unmet(&records)
        };
        assert_eq!(unmet(Want::Panicked, vec![(failed("panic"), now)]), None);
        assert!(
            unmet(Want::Panicked, vec![(failed("boom"), now)])
                .unwrap()
                .contains("boom")
        );
        assert!(
            unmet(Want::Panicked, vec![])
                .unwrap()
                .contains("no outcome")
        );
        assert_eq!(unmet(Want::Succeeded, vec![(succeeded.clone(), now)]), None);
        assert!(unmet(Want::Succeeded, vec![(failed("x"), now)]).is_some());
        let logged = vec![(log("rct: 5 lines elided"), now), (succeeded.clone(), now)];
        assert_eq!(unmet(Want::Logged("lines elided"), logged.clone()), None);
        assert!(unmet(Want::Logged("…truncated "), logged).is_some());
        let later = now + time::Duration::seconds(1);
        let admitted = Kind::Admitted(proto::Admitted::default());
        let held = vec![
            (admitted.clone(), now - time::Duration::seconds(1)),
            (started.clone(), later),
            (succeeded.clone(), later),
        ];
        assert_eq!(unmet(Want::HeldUntil(now), held.clone()), None);
        // Claimed before the resume, or admitted only after it: not held by paused agents.
        let after = later + time::Duration::seconds(1);
        assert!(unmet(Want::HeldUntil(after), held.clone()).is_some());
        let admitted_late = vec![(admitted, later), (started.clone(), later)];
        assert!(unmet(Want::HeldUntil(now), admitted_late).is_some());
        assert_eq!(unmet(Want::SucceededAfter(now), held.clone()), None);
        assert!(
            unmet(Want::SucceededAfter(after), held)
                .unwrap()
                .contains("before")
        );

        let rejected = |code: proto::RejectionCode, message: &str| {
            Kind::Rejected(proto::Rejected {
                code: code as i32,
                message: message.into(),
                ..proto::Rejected::default()
            })
        };
        let stale = proto::RejectionCode::Stale;
        let ahead = || Want::Stale("ahead of admission's clock");
        let dated = "dated …, ahead of admission's clock";
        assert_eq!(unmet(ahead(), vec![(rejected(stale, dated), now)]), None);
        assert!(unmet(ahead(), vec![(rejected(stale, "not in the catalog"), now)]).is_some());
        let other = proto::RejectionCode::Expired;
        assert!(unmet(ahead(), vec![(rejected(other, dated), now)]).is_some());
        let ran = unmet(ahead(), vec![(succeeded.clone(), now)]).unwrap();
        assert!(ran.contains("not rejected"), "{ran}");

        let folder = tempfile::tempdir().unwrap();
        let orphaned = || Want::Orphaned(folder.path().to_owned());
        let quick = vec![(started.clone(), now), (succeeded.clone(), later)];
        assert!(
            unmet(orphaned(), quick.clone())
                .unwrap()
                .contains("no child pid")
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(folder.path().join(id.to_string()), child.id().to_string()).unwrap();
        assert!(
            unmet(orphaned(), quick.clone())
                .unwrap()
                .contains("outlived")
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(unmet(orphaned(), quick), None);
        let slow = vec![
            (started, now),
            (succeeded, now + time::Duration::minutes(2)),
        ];
        assert!(unmet(orphaned(), slow).unwrap().contains("held it"));
    }
}
