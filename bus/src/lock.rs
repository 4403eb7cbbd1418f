//! Locks: what keeps two changes to the same thing from running at once.
//!
//! An operation's catalog entry names its locks as templates over its parameters
//! (`locks: ["{cluster}"]`). Admission takes them when it admits a command, in the `rct_locks`
//! bucket: one key per lock, holding the commands that hold it. Two commands conflict on a
//! lock when they are of the same operation, or when either's `conflicts_with` names the
//! other's operation (`traffic/*`, `*`). A holder holds until its outcome is recorded, its
//! decision turns out a refusal, or its expiry (deadline + timeout + grace) passes: a
//! lock is never stuck. Everything here is pure; admission does the reading and writing.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalog::{Operation, display_value};
use crate::{OperationName, proto};

/// How long past its deadline and timeout a holder still holds by default (admission's
/// `lock_grace`): an agent that ran it to the end records its outcome well within this.
pub const GRACE: Duration = Duration::from_secs(60);

/// The value of a key in `rct_locks`: who holds it now (usually one command).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// What the key stands for, as the template filled it (`prod-1`).
    pub resource: String,
    /// The commands holding it.
    pub holders: Vec<Holder>,
}

/// One command holding a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Its command id.
    pub command_id: String,
    /// The sequence in `RCT_SUBMIT` of the submission it was taken for: a submission that
    /// reuses the command id is another holder, and its decision is not this one's.
    #[serde(default)]
    pub submission: u64,
    /// Its operation, `<tower>/<op>`.
    pub operation: String,
    /// Its target.
    pub target: String,
    /// Who asked for it.
    pub operator: String,
    /// Why.
    pub justification: String,
    /// The operations it conflicts with besides its own (`conflicts_with` when it was taken).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts_with: Vec<String>,
    /// When it was taken, RFC 3339 (admission's clock).
    pub taken_at: String,
    /// When it lapses at the latest, RFC 3339 ([`expiry`]).
    pub expires_at: String,
}

impl Holder {
    /// Whether `other` is this very holder: the same command, for the same submission.
    pub fn is(&self, other: &Holder) -> bool {
        self.command_id == other.command_id && self.submission == other.submission
    }

    /// Whether this holder and a command of `operation` (which conflicts with `conflicts_with`)
    /// may not hold one lock at once.
    pub fn conflicts(&self, operation: &str, conflicts_with: &[String]) -> bool {
        self.operation == operation
            || conflicts_with.iter().any(|p| matches(p, &self.operation))
            || self.conflicts_with.iter().any(|p| matches(p, operation))
    }

    /// Whether it lapsed at `now` (RFC 3339 compared as instants; one that does not read has).
    pub fn lapsed(&self, now: jiff::Timestamp) -> bool {
        self.expires_at
            .parse::<jiff::Timestamp>()
            .map_or(true, |at| at <= now)
    }

    /// Why a command cannot take the lock this holder holds, for the person who asked.
    pub fn refusal(&self, resource: &str) -> String {
        let why = match self.justification.as_str() {
            "" => String::new(),
            j => format!(": {j:?}"),
        };
        format!(
            "{resource} is locked by command {} ({} on {}, asked by {}{why}, since {}); it holds \
             the lock until it ends (at the latest {}): watch it with rct watch {}, or cancel it \
             with rct cancel {}, then ask again",
            self.command_id,
            self.operation,
            self.target,
            self.operator,
            self.taken_at,
            self.expires_at,
            self.command_id,
            self.command_id,
        )
    }
}

/// Whether `pattern` (`<tower>/<op>`, `<tower>/*` or `*`) names `operation`.
pub fn matches(pattern: &str, operation: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) if prefix.is_empty() || prefix.ends_with('/') => operation.starts_with(prefix),
        _ => pattern == operation,
    }
}

/// What is wrong with a `conflicts_with` pattern, if anything.
pub fn pattern_problem(pattern: &str) -> Option<String> {
    let name = match pattern.strip_suffix("/*") {
        Some(tower) => return crate::Tower::new(tower).err().map(|e| e.to_string()),
        None if pattern == "*" => return None,
        None => pattern,
    };
    name.parse::<OperationName>()
        .err()
        .map(|e| format!("{e}: write <tower>/<op>, <tower>/* or *"))
}

/// The locks a command of `operation` with `params` takes: each template filled in, with
/// its key in `rct_locks`, sorted by key and without repeats (taken in this order, two
/// commands never each wait on the other).
pub fn locks(
    operation: &Operation,
    params: &BTreeMap<String, proto::Value>,
) -> Vec<(String, String)> {
    let values: BTreeMap<String, String> = params
        .iter()
        .map(|(name, value)| (name.clone(), display_value(value)))
        .collect();
    let mut locks: Vec<(String, String)> = operation
        .locks
        .iter()
        .map(|template| {
            let resource = crate::template::fill(template, &values);
            (key(&resource), resource)
        })
        .collect();
    locks.sort();
    locks.dedup();
    locks
}

/// How every lock's key in `rct_locks` starts (the bucket also holds leases).
pub const PREFIX: &str = "lock.";

/// The `rct_locks` key of `resource`: `lock.` and the resource, every byte outside
/// `[A-Za-z0-9_-]` written `=XX` (so any resource names one key, and no two the same).
pub fn key(resource: &str) -> String {
    let mut key = String::from(PREFIX);
    for byte in resource.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            key.push(byte as char);
        } else {
            key.push_str(&format!("={byte:02X}"));
        }
    }
    key
}

/// When a holder lapses at the latest: `grace` after the end of its timeout, counted from
/// its deadline (the latest it can start).
pub fn expiry(deadline: jiff::Timestamp, timeout: Duration, grace: Duration) -> jiff::Timestamp {
    jiff::SignedDuration::try_from(timeout.saturating_add(grace))
        .ok()
        .and_then(|d| deadline.checked_add(d).ok())
        .unwrap_or(jiff::Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(operation: &str, conflicts_with: &[&str]) -> Holder {
        Holder {
            command_id: "01J".into(),
            submission: 1,
            operation: operation.into(),
            target: "prod-1".into(),
            operator: "alice@example.com".into(),
            justification: "SRE-1".into(),
            conflicts_with: conflicts_with.iter().map(|s| s.to_string()).collect(),
            taken_at: "2026-01-01T00:00:00Z".into(),
            expires_at: "2026-01-01T01:00:00Z".into(),
        }
    }

    #[test]
    fn the_same_operation_conflicts_and_others_only_when_either_names_the_other() {
        let none: &[String] = &[];
        let drain = holder("traffic/drain-cluster", &[]);
        assert!(drain.conflicts("traffic/drain-cluster", none));
        assert!(!drain.conflicts("traffic/set-weight", none));
        assert!(drain.conflicts("traffic/set-weight", &["traffic/*".into()]));
        assert!(drain.conflicts("db/failover", &["*".into()]));
        assert!(!drain.conflicts("db/failover", &["db/*".into()]));
        let broad = holder("traffic/drain-cluster", &["workloads/restart"]);
        assert!(broad.conflicts("workloads/restart", none));
        assert!(!broad.conflicts("workloads/resize", none));
    }

    #[test]
    fn patterns_name_an_operation_a_tower_or_everything() {
        assert!(matches("traffic/*", "traffic/drain"));
        assert!(!matches("traffic/*", "trafficx/drain"));
        assert!(!matches("traf*", "traffic/drain"));
        assert!(matches("*", "db/failover"));
        assert_eq!(pattern_problem("traffic/*"), None);
        assert_eq!(pattern_problem("traffic/drain"), None);
        assert_eq!(pattern_problem("*"), None);
        assert!(pattern_problem("traf*").is_some());
        assert!(pattern_problem("traffic").is_some());
    }

    #[test]
    fn every_resource_has_its_own_key() {
        assert_eq!(key("prod-1"), "lock.prod-1");
        assert_eq!(key("a.b"), "lock.a=2Eb");
        assert_ne!(key("a.b"), key("a=2Eb"));
        assert_eq!(key("a b/*>"), "lock.a=20b=2F=2A=3E");
    }

    #[test]
    fn a_holder_lapses_at_its_expiry() {
        let h = holder("traffic/drain-cluster", &[]);
        assert!(!h.lapsed("2026-01-01T00:59:59Z".parse().unwrap()));
        assert!(h.lapsed("2026-01-01T01:00:00Z".parse().unwrap()));
        let unreadable = Holder {
            expires_at: "soon".into(),
            ..h
        };
        assert!(unreadable.lapsed("2000-01-01T00:00:00Z".parse().unwrap()));
    }
}
