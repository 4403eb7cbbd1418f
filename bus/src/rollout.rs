//! Rollouts: one operation across many targets, in waves, stopping itself when things go
//! wrong. Everything here is pure: which targets a request names, its limits, and what the
//! coordinator does next given what each target's command has done so far ([`next`]). The
//! coordinator folds the stream into a [`Child`] per target and acts on the answer; folding
//! the same events always gives the same answer, so a coordinator that restarts (or another
//! replica) carries on where the last one stopped.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::proto;
use crate::{CommandId, Target};

/// The target token of a rollout's own events (its decision, progress, outcome): a rollout
/// runs on many targets, each child on one. No tower may have a target of this name.
pub const PARENT_TARGET: &str = "_rollout";

/// The longest bake a rollout may ask for.
pub const LONGEST_BAKE: Duration = Duration::from_secs(24 * 3600);

/// A limit given as a count (`3`) or a share of the targets (`25%`, rounded up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// This many.
    Count(usize),
    /// This share of the targets, in percent (1..=100).
    Percent(u8),
}

impl Limit {
    /// The count it stands for among `total` targets.
    pub fn of(self, total: usize) -> usize {
        match self {
            Self::Count(n) => n,
            Self::Percent(p) => (total * usize::from(p)).div_ceil(100),
        }
    }
}

impl FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a count (3) or a share of the targets (25%)");
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p @ 1..=100) => Ok(Self::Percent(p)),
                _ => Err(format!("{s:?}: a share is 1% to 100%")),
            },
            None => s.trim().parse().map(Self::Count).map_err(|_| bad()),
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Where each wave ends among `total` targets, from `--waves 1,25%,100%`: each wave's size
/// counted from the first target (cumulative), rising, the last one every target. Empty
/// text is one wave of everything.
pub fn wave_ends(waves: &str, total: usize) -> Result<Vec<usize>, String> {
    if waves.trim().is_empty() {
        return Ok(vec![total]);
    }
    let mut ends = Vec::new();
    for item in waves.split(',') {
        let end = item.parse::<Limit>()?.of(total).min(total);
        if end == 0 {
            return Err(format!("wave {item:?} holds no target"));
        }
        if ends.last().is_some_and(|&last| end <= last) {
            return Err(format!(
                "wave {item:?} ({end} of {total} targets) is not larger than the one before: \
                 waves count from the first target (1,25%,100%)"
            ));
        }
        ends.push(end);
    }
    if ends.last() != Some(&total) {
        return Err(format!(
            "the last wave ({}) must cover every target: end with 100%",
            waves.rsplit(',').next().unwrap_or_default().trim()
        ));
    }
    Ok(ends)
}

/// The targets `given` names among the tower's `targets` (in catalog order): names and
/// patterns with `*`, separated by commas, each naming at least one target; without repeats,
/// in the order given (a pattern's targets in catalog order) or, with `catalog_order`, in
/// the tower's.
pub fn select(targets: &[String], given: &str, catalog_order: bool) -> Result<Vec<String>, String> {
    let mut chosen: Vec<String> = Vec::new();
    for item in given.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(format!("{given:?} names an empty target"));
        }
        let matching: Vec<&String> = targets.iter().filter(|t| glob(item, t)).collect();
        if matching.is_empty() {
            return Err(format!(
                "{item} names no target; the tower's targets are: {}",
                targets.join(", ")
            ));
        }
        for target in matching {
            if !chosen.contains(target) {
                chosen.push(target.clone());
            }
        }
    }
    if catalog_order {
        chosen.sort_by_key(|t| targets.iter().position(|c| c == t));
    }
    Ok(chosen)
}

/// Whether `pattern` (`*` standing for any run of characters) matches all of `text`.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The id of the child of rollout `parent` on `target`: the same for every replica and every
/// attempt, so dispatching it again never makes a second one.
pub fn child_id(parent: CommandId, target: &Target) -> CommandId {
    CommandId::derived(
        parent.timestamp(),
        "child",
        0,
        format!("{parent}.{target}").as_bytes(),
    )
}

/// The id of the command that checks the health of `target` after its wave in rollout
/// `parent`.
pub fn health_id(parent: CommandId, target: &Target) -> CommandId {
    CommandId::derived(
        parent.timestamp(),
        "health",
        0,
        format!("{parent}.{target}").as_bytes(),
    )
}

/// The `Nats-Msg-Id` of the command a rollout sends to `target` (`health`: its health
/// check): the same for every replica and attempt.
pub fn msg_id(parent: CommandId, target: &Target, health: bool) -> String {
    match health {
        false => format!("{parent}.{target}"),
        true => format!("{parent}.{target}.health"),
    }
}

/// Resolves what a rollout asks for against the tower's `targets` (catalog order), for an
/// operation whose target parameter is `target_param` and which allows `max_targets`.
/// The error says what is wrong, for people. The health operation is checked by the caller,
/// which knows the catalog.
pub fn resolve(
    targets: &[String],
    target_param: &str,
    max_targets: usize,
    asked: &proto::Rollout,
) -> Result<proto::RolloutPlan, String> {
    let chosen = select(targets, &asked.targets, asked.catalog_order)?;
    if let Some(stray) = asked.params_by_target.keys().find(|t| !chosen.contains(t)) {
        return Err(format!(
            "parameters are given for {stray}, which is not one of the rollout's targets"
        ));
    }
    if chosen.len() > max_targets {
        return Err(format!(
            "{} names {} targets, and the operation allows at most {max_targets} in one rollout",
            asked.targets,
            chosen.len()
        ));
    }
    let total = chosen.len();
    let limit = |what: &str, given: &str, default: usize| -> Result<usize, String> {
        match given.trim() {
            "" => Ok(default),
            given => given
                .parse::<Limit>()
                .map(|l| l.of(total))
                .map_err(|e| format!("{what}: {e}")),
        }
    };
    let max_concurrency = limit("max concurrency", &asked.max_concurrency, 1)?;
    if max_concurrency == 0 {
        return Err("max concurrency must be at least 1".into());
    }
    let max_errors = limit("max errors", &asked.max_errors, 0)?;
    // Without one, failures are held to max_errors (which waits for the targets in
    // flight and says the overshoot), and unhealthy targets halt their wave.
    let max_degraded = limit("max degraded", &asked.max_degraded, total)?;
    let waves = wave_ends(&asked.waves, total)?;
    let bake = match &asked.bake {
        None => Duration::ZERO,
        Some(d) => u64::try_from(d.seconds)
            .ok()
            .filter(|s| *s <= LONGEST_BAKE.as_secs() && d.nanos >= 0)
            .map(|s| Duration::new(s, d.nanos.unsigned_abs()))
            .ok_or_else(|| {
                format!(
                    "the bake must be at most {}",
                    humantime::format_duration(LONGEST_BAKE)
                )
            })?,
    };
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Ok(proto::RolloutPlan {
        targets: chosen,
        waves: waves.into_iter().map(count).collect(),
        max_concurrency: count(max_concurrency),
        max_errors: count(max_errors),
        max_degraded: count(max_degraded),
        bake: Some(prost_types::Duration {
            seconds: i64::try_from(bake.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(bake.subsec_nanos()).unwrap_or(0),
        }),
        health: asked.health.clone(),
        target_param: target_param.to_owned(),
        params_by_target: asked.params_by_target.clone(),
    })
}

/// What a rollout asks for, resolved against its targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// Its targets, in dispatch order.
    pub targets: Vec<String>,
    /// Where each wave ends ([`wave_ends`]).
    pub waves: Vec<usize>,
    /// The most children running at once.
    pub max_concurrency: usize,
    /// The most children that may fail before no new one is dispatched.
    pub max_errors: usize,
    /// The most targets that may be failed or unhealthy at once, across all waves.
    pub max_degraded: usize,
    /// How long after a wave's last child ended its health is checked.
    pub bake: Duration,
    /// Whether a health operation checks each wave's targets.
    pub health: bool,
}

impl Spec {
    /// The spec a recorded rollout plan gives.
    pub fn of(plan: &proto::RolloutPlan) -> Self {
        let count = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
        let bake = plan.bake.as_ref().map_or(Duration::ZERO, |d| {
            Duration::new(
                u64::try_from(d.seconds).unwrap_or(0),
                d.nanos.unsigned_abs(),
            )
        });
        Self {
            targets: plan.targets.clone(),
            waves: plan.waves.iter().map(|n| count(*n)).collect(),
            max_concurrency: count(plan.max_concurrency),
            max_errors: count(plan.max_errors),
            max_degraded: count(plan.max_degraded),
            bake,
            health: !plan.health.is_empty(),
        }
    }

    /// Which wave (from 1) the target at `index` is in.
    pub fn wave_of(&self, index: usize) -> usize {
        self.waves.iter().take_while(|end| **end <= index).count() + 1
    }
}

/// Where one target's child stands, as the stream says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Child {
    /// Not dispatched yet.
    Waiting,
    /// Dispatched, not ended.
    Running,
    /// Succeeded; its health not checked yet.
    Succeeded {
        /// When, counted from the rollout's start.
        at: Duration,
    },
    /// Failed (or expired, was cancelled, ended unknown).
    Failed,
    /// Its health check runs.
    Checking,
    /// Its health check said healthy.
    Healthy,
    /// Its health check said unhealthy.
    Unhealthy,
    /// Its health check could not say (it failed or timed out).
    Inconclusive,
    /// Inconclusive, and a person resumed the rollout over it.
    Accepted,
}

impl Child {
    fn ended(self) -> bool {
        !matches!(self, Self::Waiting | Self::Running)
    }

    fn degraded(self) -> bool {
        matches!(self, Self::Failed | Self::Unhealthy)
    }
}

/// What the coordinator does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Dispatch the children of these targets.
    Dispatch(Vec<String>),
    /// Check the health of these targets.
    Check(Vec<String>),
    /// Nothing until something ends, or until this long into the rollout (a bake).
    Wait(Option<Duration>),
    /// A person decides: resume, or halt.
    Pause(String),
    /// Stop for good, for this reason.
    Halt(String),
    /// Every wave is through.
    Done,
}

/// What the coordinator does next for `spec`, given each target's child (in `spec`'s
/// order) and `now` (how long into the rollout). Checked in this order: the degradation
/// budget, the error limit (no new child; halted once none runs, saying how many failed past
/// the limit while running), then the current wave: dispatch within the concurrency limit,
/// bake, check health, pause on an inconclusive check, halt on an unhealthy one.
pub fn next(spec: &Spec, children: &[Child], now: Duration) -> Next {
    let count = |f: fn(Child) -> bool| children.iter().filter(|c| f(**c)).count();
    let degraded = count(Child::degraded);
    if degraded > spec.max_degraded {
        return Next::Halt(format!(
            "{}: {degraded} targets failed or unhealthy, more than the {} the rollout allows",
            which(spec, children, Child::degraded),
            spec.max_degraded
        ));
    }
    let running = count(|c| matches!(c, Child::Running | Child::Checking));
    let failed = count(|c| c == Child::Failed);
    if failed > spec.max_errors {
        if running > 0 {
            return Next::Wait(None);
        }
        // Dispatch stopped at the first failure past the limit; the rest failed while
        // already running.
        let overshoot = failed - spec.max_errors - 1;
        return Next::Halt(format!(
            "{}: {failed} targets failed, more than the {} allowed{}",
            which(spec, children, |c| c == Child::Failed),
            spec.max_errors,
            match overshoot {
                0 => String::new(),
                n => format!(" ({n} of them already running when the limit was passed)"),
            }
        ));
    }
    let mut start = 0;
    for &end in &spec.waves {
        let wave = &children[start..end.min(children.len())];
        let targets = &spec.targets[start..end.min(spec.targets.len())];
        let waiting: Vec<String> = wave
            .iter()
            .zip(targets)
            .filter(|(c, _)| **c == Child::Waiting)
            .map(|(_, t)| t.clone())
            .collect();
        if !waiting.is_empty() {
            let room = spec.max_concurrency.saturating_sub(running);
            return match room {
                0 => Next::Wait(None),
                room => Next::Dispatch(waiting.into_iter().take(room).collect()),
            };
        }
        if !wave.iter().all(|c| c.ended()) {
            return Next::Wait(None);
        }
        if spec.health {
            if let Some(at) = unbaked(wave, spec.bake, now) {
                return Next::Wait(Some(at));
            }
            let unchecked: Vec<String> = wave
                .iter()
                .zip(targets)
                .filter(|(c, _)| matches!(c, Child::Succeeded { .. }))
                .map(|(_, t)| t.clone())
                .collect();
            if !unchecked.is_empty() {
                // A check is a command on the target too: within the concurrency.
                let room = spec.max_concurrency.saturating_sub(running);
                return match room {
                    0 => Next::Wait(None),
                    room => Next::Check(unchecked.into_iter().take(room).collect()),
                };
            }
            if wave.contains(&Child::Checking) {
                return Next::Wait(None);
            }
            let with = |state: Child| -> Vec<&str> {
                wave.iter()
                    .zip(targets)
                    .filter(|(c, _)| **c == state)
                    .map(|(_, t)| t.as_str())
                    .collect()
            };
            let unhealthy = with(Child::Unhealthy);
            if !unhealthy.is_empty() {
                return Next::Halt(format!(
                    "unhealthy after the wave: {}",
                    unhealthy.join(", ")
                ));
            }
            let inconclusive = with(Child::Inconclusive);
            if !inconclusive.is_empty() {
                return Next::Pause(format!(
                    "the health of {} could not be checked: look, then resume or halt",
                    inconclusive.join(", ")
                ));
            }
        } else if end < spec.targets.len()
            && let Some(at) = unbaked(wave, spec.bake, now)
        {
            return Next::Wait(Some(at));
        }
        start = end;
    }
    Next::Done
}

/// The targets whose child is `such`, each with its state, for people (the first ten).
fn which(spec: &Spec, children: &[Child], such: fn(Child) -> bool) -> String {
    let named: Vec<String> = children
        .iter()
        .zip(&spec.targets)
        .filter(|(c, _)| such(**c))
        .map(|(c, t)| match c {
            Child::Unhealthy => format!("{t} unhealthy"),
            _ => format!("{t} failed"),
        })
        .collect();
    match named.len() {
        0..=10 => named.join(", "),
        n => format!("{}, and {} more", named[..10].join(", "), n - 10),
    }
}

/// When the bake after `wave` ends, if it has not yet at `now`: `bake` after its last
/// success.
fn unbaked(wave: &[Child], bake: Duration, now: Duration) -> Option<Duration> {
    let last = wave
        .iter()
        .filter_map(|c| match c {
            Child::Succeeded { at } => Some(*at),
            _ => None,
        })
        .max()?;
    let until = last.saturating_add(bake);
    (now < until).then_some(until)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: usize, waves: &str) -> Spec {
        Spec {
            targets: (1..=n).map(|i| format!("prod-{i}")).collect(),
            waves: wave_ends(waves, n).unwrap(),
            max_concurrency: 2,
            max_errors: 0,
            max_degraded: n,
            bake: Duration::from_secs(60),
            health: true,
        }
    }

    fn names(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
        range.map(|i| format!("prod-{i}")).collect()
    }

    const DONE: Child = Child::Succeeded {
        at: Duration::from_secs(10),
    };

    #[test]
    fn limits_and_waves_read_counts_and_shares() {
        assert_eq!("3".parse::<Limit>().unwrap().of(200), 3);
        assert_eq!("25%".parse::<Limit>().unwrap().of(10), 3);
        assert!("0%".parse::<Limit>().is_err());
        assert!("101%".parse::<Limit>().is_err());
        assert!("lots".parse::<Limit>().is_err());
        assert_eq!(wave_ends("1,25%,100%", 200).unwrap(), [1, 50, 200]);
        assert_eq!(wave_ends("", 4).unwrap(), [4]);
        assert!(wave_ends("50%,25%,100%", 8).is_err());
        assert!(wave_ends("1,50%", 8).unwrap_err().contains("100%"));
    }

    #[test]
    fn targets_are_named_or_matched_once_each() {
        let tower: Vec<String> = ["prod-1", "prod-2", "prod-3", "staging-1"]
            .map(String::from)
            .into();
        assert_eq!(
            select(&tower, "prod-3,prod-*", false).unwrap(),
            ["prod-3", "prod-1", "prod-2"]
        );
        assert_eq!(
            select(&tower, "prod-3,prod-1", true).unwrap(),
            ["prod-1", "prod-3"]
        );
        assert_eq!(
            select(&tower, "*-1", false).unwrap(),
            ["prod-1", "staging-1"]
        );
        assert_eq!(select(&tower, "*", false).unwrap(), tower);
        assert!(
            select(&tower, "prod-9", false)
                .unwrap_err()
                .contains("prod-9 names no target")
        );
        assert!(select(&tower, "prod-1,", false).is_err());
        assert!(!glob("prod-*-x", "prod-x"));
        assert!(glob("p*d*1", "prod-1"));
    }

    #[test]
    fn a_child_has_one_id_per_parent_and_target() {
        let parent = CommandId::generate();
        let one = Target::new("prod-1").unwrap();
        assert_eq!(child_id(parent, &one), child_id(parent, &one));
        assert_ne!(
            child_id(parent, &one),
            child_id(parent, &Target::new("prod-2").unwrap())
        );
        assert_ne!(
            child_id(parent, &one),
            child_id(CommandId::generate(), &one)
        );
    }

    #[test]
    fn a_wave_dispatches_within_the_concurrency_then_bakes_then_checks() {
        let spec = spec(4, "1,100%");
        let mut children = vec![Child::Waiting; 4];
        assert_eq!(
            next(&spec, &children, Duration::ZERO),
            Next::Dispatch(names(1..=1))
        );
        children[0] = Child::Running;
        assert_eq!(next(&spec, &children, Duration::ZERO), Next::Wait(None));
        children[0] = DONE;
        // Baked for 60 s after its success at 10 s, then checked.
        assert_eq!(
            next(&spec, &children, Duration::from_secs(30)),
            Next::Wait(Some(Duration::from_secs(70)))
        );
        assert_eq!(
            next(&spec, &children, Duration::from_secs(70)),
            Next::Check(names(1..=1))
        );
        // The next wave waits for the check.
        children[0] = Child::Checking;
        assert_eq!(
            next(&spec, &children, Duration::from_secs(70)),
            Next::Wait(None)
        );
        children[0] = Child::Healthy;
        assert_eq!(
            next(&spec, &children, Duration::from_secs(70)),
            Next::Dispatch(names(2..=3))
        );
        children[1] = Child::Running;
        children[2] = Child::Running;
        assert_eq!(
            next(&spec, &children, Duration::from_secs(70)),
            Next::Wait(None)
        );
        children[1] = DONE;
        assert_eq!(
            next(&spec, &children, Duration::from_secs(70)),
            Next::Dispatch(names(4..=4))
        );
    }

    #[test]
    fn an_unhealthy_target_halts_and_an_inconclusive_one_pauses() {
        let spec = spec(2, "1,100%");
        let unhealthy = next(&spec, &[Child::Unhealthy, Child::Waiting], Duration::ZERO);
        assert!(
            matches!(unhealthy, Next::Halt(ref why) if why.contains("prod-1")),
            "{unhealthy:?}"
        );
        let unsure = next(
            &spec,
            &[Child::Inconclusive, Child::Waiting],
            Duration::ZERO,
        );
        assert!(
            matches!(unsure, Next::Pause(ref why) if why.contains("prod-1")),
            "{unsure:?}"
        );
        assert_eq!(
            next(&spec, &[Child::Accepted, Child::Waiting], Duration::ZERO),
            Next::Dispatch(names(2..=2))
        );
        assert_eq!(
            next(&spec, &[Child::Healthy, Child::Healthy], Duration::ZERO),
            Next::Done
        );
    }

    #[test]
    fn past_the_error_limit_nothing_is_dispatched_and_the_overshoot_is_said() {
        let spec = Spec {
            max_concurrency: 3,
            max_errors: 1,
            health: false,
            ..spec(6, "100%")
        };
        use Child::{Failed, Running, Waiting};
        // One failure is allowed: dispatch goes on.
        assert_eq!(
            next(
                &spec,
                &[Failed, Running, Running, Waiting, Waiting, Waiting],
                Duration::ZERO
            ),
            Next::Dispatch(names(4..=4))
        );
        // Two: no new child while two still run; then halted, one failure past the limit
        // being of a child already running.
        assert_eq!(
            next(
                &spec,
                &[Failed, Failed, Running, Running, Waiting, Waiting],
                Duration::ZERO
            ),
            Next::Wait(None)
        );
        let halted = next(
            &spec,
            &[Failed, Failed, Failed, DONE, Waiting, Waiting],
            Duration::ZERO,
        );
        assert!(
            matches!(halted, Next::Halt(ref why) if why.contains("prod-1 failed, prod-2 failed, prod-3 failed: 3 targets failed") && why.contains("1 of them already running")),
            "{halted:?}"
        );
    }

    #[test]
    fn the_degradation_budget_counts_across_waves() {
        // Each wave on its own is within the error limit; together they are over budget.
        let spec = Spec {
            max_errors: 5,
            max_degraded: 1,
            ..spec(4, "2,100%")
        };
        let over = next(
            &spec,
            &[
                Child::Failed,
                Child::Healthy,
                Child::Unhealthy,
                Child::Running,
            ],
            Duration::ZERO,
        );
        assert!(
            matches!(over, Next::Halt(ref why) if why.contains("prod-1 failed, prod-3 unhealthy: 2 targets failed or unhealthy")),
            "{over:?}"
        );
    }
}
