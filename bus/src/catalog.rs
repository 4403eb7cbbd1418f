//! The operation catalog: towers, operations and their typed parameters, and the checks that
//! admission, agents and the CLI all apply, with the same words.
//!
//! The catalog is written in YAML by people (admission loads it and points at file and line
//! when something is wrong), served as JSON in the `rct_catalog` bucket, and read back by the
//! CLI and agents. Everything here is pure.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::proto::{self, value::Kind as V};
use crate::{OpName, OperationName, Target, Tower};

/// Longest string parameter accepted when the catalog sets no `max_len`.
pub const DEFAULT_MAX_LEN: usize = 1024;

/// Longest deadline or timeout an operation may have: a year. Anything longer is a typo, and
/// admission and agents add these to the current time.
pub const LONGEST_WAIT: Duration = Duration::from_secs(366 * 24 * 3600);

/// The whole catalog.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Towers by name.
    #[serde(default)]
    pub towers: BTreeMap<String, TowerSpec>,
    /// Operations by `<tower>/<op>`.
    #[serde(default)]
    pub operations: BTreeMap<String, Operation>,
    /// Windows in which the operations of their towers are refused (`frozen`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freezes: Vec<crate::freeze::Freeze>,
    /// Who may start and end freezes on record (`rct freeze start|end`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze_groups: Vec<String>,
}

/// The catalog as admission serves it in the `rct_catalog` bucket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Served {
    /// [`Catalog::version`].
    pub version: String,
    /// The catalog.
    pub catalog: Catalog,
}

/// A tower: who carries out a family of operations, and where.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TowerSpec {
    /// One line for people.
    #[serde(default)]
    pub description: String,
    /// One agent per target, or one shared work queue.
    pub flavour: Flavour,
    /// The targets of a cluster tower.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// Who can open its secret parameters: age X25519 recipients (`age1…`, printed by
    /// `rct-agent keygen`), every one a value is sealed to. List the new key beside the old
    /// one while rotating.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// Cluster towers: recipients for one target, instead of `recipients`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub target_recipients: BTreeMap<String, Vec<String>>,
}

impl TowerSpec {
    /// The recipients secret values for `target` are sealed to.
    pub fn recipients_for(&self, target: &str) -> &[String] {
        self.target_recipients
            .get(target)
            .unwrap_or(&self.recipients)
    }
}

/// How a tower's agents take their work.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// One agent per target; commands go to `rct.cmd.<tower>.<target>.<op>`.
    Cluster,
    /// One work queue shared by the tower's replicas; target `_`.
    Simple,
}

/// One operation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// One line for people.
    #[serde(default)]
    pub description: String,
    /// Members of any of these groups may run it.
    pub allowed_groups: Vec<String>,
    /// Whether a justification is needed, and its shape.
    #[serde(default)]
    pub justification: Justification,
    /// Parameters by name.
    #[serde(default)]
    pub params: BTreeMap<String, Param>,
    /// The command must start within this long of admission, or it expires.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// The command must finish within this long once started.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Running it twice has the same effect as once.
    #[serde(default)]
    pub idempotent: bool,
    /// Channels told when it starts, ends or is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<String>,
    /// Who else must sign off before it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals: Option<Approvals>,
    /// Who may run it at once, skipping approvals (and freeze windows), with a reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass: Option<BreakGlass>,
    /// Its handler can describe what it would change without changing it (`rct plan`).
    /// With approvals, the approvers approve that plan, and the command fails `stale_plan`,
    /// changing nothing, if the handler would change something else when it runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plan: bool,
    /// What its commands lock while they run, as templates over its parameters
    /// (`["{cluster}"]`): a command is refused `locked` while another command holding one of
    /// the same locks, of this operation or one it conflicts with, has not ended
    /// (see [`crate::lock`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<String>,
    /// The other operations that may not hold its locks at the same time (`traffic/*`, `*`,
    /// `<tower>/<op>`); either side naming the other is enough.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts_with: Vec<String>,
    /// The operation that undoes a succeeded command of this one (`rct undo`), its
    /// parameters filled from the command's parameters and outputs (see [`crate::undo`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inverse: Option<crate::undo::Inverse>,
    /// One request may run it on many targets of its cluster tower, as a rollout
    /// (`--cluster 'prod-*'`, see [`crate::rollout`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<FanOut>,
}

/// An operation's rule for rollouts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FanOut {
    /// The most targets one rollout may name.
    pub max_targets: usize,
}

/// An operation's break-glass rule: members of `groups` (who must also be allowed to run it)
/// may run it without its approvals, with a reason; `notify` channels are told, and the
/// command waits for someone else's review.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BreakGlass {
    /// Who may break the glass.
    pub groups: Vec<String>,
    /// Channels told when someone does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<String>,
}

/// An operation's approval rule: `required` distinct members of `approver_groups` sign off on
/// exactly the request (its digest) within `ttl` of its arrival.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Approvals {
    /// How many distinct approvers.
    pub required: u32,
    /// Members of any of these groups may approve or deny.
    pub approver_groups: Vec<String>,
    /// Channels told when a request waits for approvals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<String>,
    /// Whether the requester may be one of the approvers.
    #[serde(default)]
    pub allow_self: bool,
    /// How long the request waits for its approvals.
    #[serde(default = "default_approval_ttl", with = "humantime_serde")]
    pub ttl: Duration,
}

/// Longest an approval rule may let a request wait.
pub const LONGEST_APPROVAL_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

fn default_approval_ttl() -> Duration {
    Duration::from_secs(3600)
}

impl Approvals {
    /// The rule as events and commands record it.
    pub fn to_proto(&self) -> proto::ApprovalRule {
        proto::ApprovalRule {
            required: self.required,
            approver_groups: self.approver_groups.clone(),
            allow_self: self.allow_self,
        }
    }

    /// Whether someone in `groups` may approve.
    pub fn admits(&self, groups: &[String]) -> bool {
        self.approver_groups.iter().any(|g| groups.contains(g))
    }
}

fn default_deadline() -> Duration {
    Duration::from_secs(120)
}

fn default_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}

/// The justification rule of an operation.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Justification {
    /// A justification must be given.
    #[serde(default)]
    pub required: bool,
    /// It must match this regular expression, anchored at both ends (e.g. `[A-Z]+-[0-9]+`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<Pattern>,
}

/// A regular expression from the catalog, matched against whole values (anchored at both
/// ends, whatever the catalog wrote). Written and served as its text; compiled once, the first
/// time it is used, and the compiled form travels with every clone of the catalog.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    compiled: OnceLock<Result<Regex, regex::Error>>,
}

impl Pattern {
    /// A pattern; compiled when first used.
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            compiled: OnceLock::new(),
        }
    }

    /// The text as the catalog wrote it.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The anchored, compiled expression, or why it does not compile.
    pub fn regex(&self) -> Result<&Regex, &regex::Error> {
        self.compiled
            .get_or_init(|| anchored(&self.source))
            .as_ref()
    }

    /// Whether all of `text` matches; an error when the pattern does not compile.
    pub fn is_match(&self, text: &str) -> Result<bool, &regex::Error> {
        self.regex().map(|re| re.is_match(text))
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.source, f)
    }
}

/// Two patterns are the same when their text is: compiling changes nothing.
impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl From<&str> for Pattern {
    fn from(source: &str) -> Self {
        Self::new(source)
    }
}

impl From<String> for Pattern {
    fn from(source: String) -> Self {
        Self::new(source)
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

/// A parameter's type.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    /// Text; `pattern` and `max_len` apply.
    String,
    /// A whole number; `min` and `max` apply.
    Integer,
    /// A number; `min` and `max` apply.
    Number,
    /// `true` or `false`.
    Boolean,
    /// One of `values`.
    Enum,
    /// A duration such as `90s` or `15m`.
    Duration,
    /// One of the tower's targets; it is the command's target.
    Target,
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::String => "string",
            Type::Integer => "integer",
            Type::Number => "number",
            Type::Boolean => "boolean",
            Type::Enum => "enum",
            Type::Duration => "duration",
            Type::Target => "target",
        })
    }
}

/// A default value as written in the catalog.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Scalar {
    /// `true` / `false`
    Bool(bool),
    /// A whole number.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// Anything written as text.
    Text(String),
}

/// One typed parameter.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Param {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: Type,
    /// One line for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Strings: a regular expression the whole value must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<Pattern>,
    /// Strings: the longest value, in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    /// Numbers: the smallest value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Numbers: the largest value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Enums: the allowed values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// The value when none is given; without one, the parameter is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Scalar>,
    /// Sealed to the tower's recipients by the CLI, opened only by its agents, and masked
    /// in everything they publish.
    #[serde(default)]
    pub secret: bool,
}

/// How the secret values of a request arrive at a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secrets {
    /// Sealed, as admission sees them: only presence and size can be checked.
    Sealed,
    /// In clear: in the CLI before sealing, in the agent once opened. Every check applies.
    Open,
}

/// Something wrong in a catalog, at a path of keys (`["operations", "a/b", "params", "x"]`)
/// that the loader turns into a file line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Keys from the document root to the offending entry.
    pub path: Vec<String>,
    /// What is wrong and what to do.
    pub message: String,
}

/// A parameter that does not pass its check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamError {
    /// The parameter's name.
    pub param: String,
    /// A sentence a person can act on.
    pub message: String,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Parameters after their checks: defaults applied, and the command's target.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    /// Every parameter of the operation with its value.
    pub params: BTreeMap<String, proto::Value>,
    /// Where the command runs: the `target` parameter, or `_` on a simple tower.
    pub target: Target,
}

impl Catalog {
    /// A short, stable version: the first 12 hex digits of SHA-256 over the catalog's JSON.
    pub fn version(&self) -> String {
        let json = serde_json::to_vec(self).expect("a catalog always serializes");
        Sha256::digest(&json)[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// What a request for `name` was checked against, as a short digest of the tower's and
    /// the operation's JSON: two catalogs with the same fingerprint for an operation check its
    /// requests alike (a request waiting for approvals ends when it changes). `None` when
    /// there is no such operation.
    pub fn fingerprint(&self, name: &OperationName) -> Option<String> {
        let (tower, operation) = self.operation(name)?;
        let json = serde_json::to_vec(&(tower, operation)).expect("a catalog always serializes");
        Some(
            Sha256::digest(&json)[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }

    /// The tower and operation named `name`.
    pub fn operation(&self, name: &OperationName) -> Option<(&TowerSpec, &Operation)> {
        let operation = self.operations.get(&name.to_string())?;
        let tower = self.towers.get(name.tower().as_str())?;
        Some((tower, operation))
    }

    /// Why `name` names no operation, with the nearest names that do: the one sentence
    /// admission and the CLI both say.
    pub fn unknown_operation(&self, name: &OperationName) -> String {
        let tower = name.tower().as_str();
        let prefix = format!("{tower}/");
        let siblings: Vec<&str> = self
            .operations
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .collect();
        let asked = name.to_string();
        let hint = nearest(&asked, self.operations.keys().map(String::as_str))
            .map(|n| format!(" (did you mean {n}?)"))
            .unwrap_or_default();
        if siblings.is_empty() {
            format!(
                "unknown operation {name}: there is no tower {tower}{hint}; rct ops lists the \
                 operations"
            )
        } else {
            format!(
                "unknown operation {name}{hint}; {tower} has: {}",
                siblings.join(", ")
            )
        }
    }

    /// Why `tower` names no tower, with the nearest that does.
    pub fn unknown_tower(&self, tower: &str) -> String {
        let hint = nearest(tower, self.towers.keys().map(String::as_str))
            .map(|n| format!(" (did you mean {n}?)"))
            .unwrap_or_default();
        format!(
            "there is no tower {tower}{hint}; the towers are: {}",
            self.towers.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    }

    /// Everything wrong with the catalog; empty when it is sound.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |path: &[&str], message: String| {
            problems.push(Problem {
                path: path.iter().map(|s| s.to_string()).collect(),
                message,
            })
        };
        for (n, freeze) in self.freezes.iter().enumerate() {
            let n = n.to_string();
            if let Some(message) = freeze.problem() {
                problem(&["freezes", n.as_str()], message);
            }
            for tower in freeze
                .towers
                .iter()
                .filter(|t| !self.towers.contains_key(*t))
            {
                problem(
                    &["freezes", n.as_str()],
                    format!(
                        "freeze {} names tower {tower}, which is not in the catalog",
                        freeze.name
                    ),
                );
            }
        }
        for (name, tower) in &self.towers {
            let at = ["towers", name.as_str()];
            if let Err(e) = Tower::new(name.as_str()) {
                problem(&at, e.to_string());
            } else if name.starts_with('_') {
                problem(
                    &at,
                    format!(
                        "tower {name}: names starting with _ are rct's own records (_auth, \
                         _catalog); choose another name"
                    ),
                );
            }
            match tower.flavour {
                Flavour::Cluster if tower.targets.is_empty() => problem(
                    &at,
                    format!("cluster tower {name} needs `targets` (the clusters it runs in)"),
                ),
                Flavour::Simple if !tower.targets.is_empty() => problem(
                    &at,
                    format!(
                        "simple tower {name} has no targets; remove `targets` or use `flavour: cluster`"
                    ),
                ),
                _ => {}
            }
            for target in &tower.targets {
                if let Err(e) = Target::new(target.as_str()) {
                    problem(&[&at[..], &["targets"]].concat(), e.to_string());
                } else if target.starts_with('_') {
                    problem(
                        &[&at[..], &["targets"]].concat(),
                        format!("{target}: names starting with _ are rct's own (_rollout)"),
                    );
                }
            }
            for recipient in &tower.recipients {
                if let Err(e) = crate::sealed::check_recipient(recipient) {
                    problem(&[&at[..], &["recipients"]].concat(), e);
                }
            }
            for (target, recipients) in &tower.target_recipients {
                let at = [&at[..], &["target_recipients", target.as_str()]].concat();
                if !tower.targets.contains(target) {
                    problem(&at, format!("{target} is not one of the tower's targets"));
                }
                for recipient in recipients {
                    if let Err(e) = crate::sealed::check_recipient(recipient) {
                        problem(&at, e);
                    }
                }
            }
        }
        for (name, operation) in &self.operations {
            let at = ["operations", name.as_str()];
            let parsed: Result<OperationName, _> = name.parse();
            let tower = match &parsed {
                Err(e) => {
                    problem(&at, format!("{e}; operations are named <tower>/<op>"));
                    None
                }
                Ok(parsed) => match self.towers.get(parsed.tower().as_str()) {
                    None => {
                        let known: Vec<&str> = self.towers.keys().map(String::as_str).collect();
                        problem(
                            &at,
                            format!(
                                "unknown tower {}; the catalog's towers are: {}",
                                parsed.tower(),
                                known.join(", ")
                            ),
                        );
                        None
                    }
                    Some(tower) => Some(tower),
                },
            };
            if operation.allowed_groups.is_empty() {
                problem(
                    &[&at[..], &["allowed_groups"]].concat(),
                    "allowed_groups is empty: nobody could run this operation".into(),
                );
            }
            if let Some(pattern) = &operation.justification.pattern
                && let Err(e) = pattern.regex()
            {
                problem(
                    &[&at[..], &["justification", "pattern"]].concat(),
                    format!("bad regular expression: {e}"),
                );
            }
            if let Some(rule) = &operation.approvals {
                let at = [&at[..], &["approvals"]].concat();
                if rule.required == 0 {
                    problem(
                        &at,
                        "required is 0: remove `approvals` for an operation that needs none".into(),
                    );
                }
                if rule.approver_groups.is_empty() {
                    problem(
                        &at,
                        "approver_groups is empty: nobody could approve this operation".into(),
                    );
                }
                if rule.ttl.is_zero() || rule.ttl > LONGEST_APPROVAL_WAIT {
                    problem(
                        &at,
                        format!(
                            "ttl {} must be longer than zero and at most {}",
                            humantime::format_duration(rule.ttl),
                            humantime::format_duration(LONGEST_APPROVAL_WAIT)
                        ),
                    );
                }
            }
            if let Some(rule) = &operation.break_glass
                && rule.groups.is_empty()
            {
                problem(
                    &[&at[..], &["break_glass"]].concat(),
                    "groups is empty: nobody could break the glass; remove `break_glass`".into(),
                );
            }
            for template in &operation.locks {
                let at = [&at[..], &["locks"]].concat();
                if template.trim().is_empty() {
                    problem(
                        &at,
                        "a lock needs a name: write a template such as \"{cluster}\"".into(),
                    );
                }
                for name in crate::template::names(template) {
                    match operation.params.get(name) {
                        None => problem(
                            &at,
                            format!(
                                "lock {template:?} uses {{{name}}}, which is not one of the \
                                 operation's parameters ({})",
                                operation.param_list()
                            ),
                        ),
                        Some(param) if param.secret => problem(
                            &at,
                            format!(
                                "lock {template:?} uses the secret parameter {name}: lock keys \
                                 are stored in the clear; lock on a parameter that is not secret"
                            ),
                        ),
                        Some(_) => {}
                    }
                }
            }
            for pattern in &operation.conflicts_with {
                if let Some(why) = crate::lock::pattern_problem(pattern) {
                    problem(
                        &[&at[..], &["conflicts_with"]].concat(),
                        format!("{pattern:?}: {why}"),
                    );
                }
            }
            if !operation.conflicts_with.is_empty() && operation.locks.is_empty() {
                problem(
                    &[&at[..], &["conflicts_with"]].concat(),
                    "conflicts_with needs locks: name what the operation locks (locks: \
                     [\"{cluster}\"])"
                        .into(),
                );
            }
            if let Some(inverse) = &operation.inverse {
                for message in inverse.problems(self, operation) {
                    problem(&[&at[..], &["inverse"]].concat(), message);
                }
            }
            if let Some(fan_out) = &operation.fan_out {
                let at = [&at[..], &["fan_out"]].concat();
                if fan_out.max_targets < 2 {
                    problem(
                        &at,
                        "max_targets must be at least 2: a rollout runs on many targets".into(),
                    );
                }
                if tower.is_some_and(|t| t.flavour != Flavour::Cluster) {
                    problem(
                        &at,
                        "a rollout goes through a tower's targets, and only a cluster tower has \
                         them"
                            .into(),
                    );
                }
                if operation.params.values().any(|p| p.secret) {
                    problem(
                        &at,
                        "an operation with a secret parameter cannot fan out: a secret is \
                         sealed for one command on one target"
                            .into(),
                    );
                }
                if operation.approvals.is_some() {
                    problem(
                        &at,
                        "an operation that needs approvals cannot fan out yet: approvals bind \
                         one command"
                            .into(),
                    );
                }
            }
            if operation.deadline.is_zero() || operation.timeout.is_zero() {
                problem(&at, "deadline and timeout must be longer than zero".into());
            }
            for (field, value) in [
                ("deadline", operation.deadline),
                ("timeout", operation.timeout),
            ] {
                if value > LONGEST_WAIT {
                    problem(
                        &[&at[..], &[field]].concat(),
                        format!(
                            "{field} {} is longer than {}, the longest rct accepts",
                            humantime::format_duration(value),
                            humantime::format_duration(LONGEST_WAIT)
                        ),
                    );
                }
            }
            let targets = operation
                .params
                .values()
                .filter(|p| p.kind == Type::Target)
                .count();
            if let Some(tower) = tower {
                match tower.flavour {
                    Flavour::Simple if targets > 0 => problem(
                        &[&at[..], &["params"]].concat(),
                        format!(
                            "a target parameter needs a cluster tower, and {} is simple",
                            parsed.as_ref().map(|p| p.tower().to_string()).unwrap_or_default()
                        ),
                    ),
                    Flavour::Cluster if targets != 1 => problem(
                        &[&at[..], &["params"]].concat(),
                        "an operation of a cluster tower needs exactly one parameter of type target"
                            .into(),
                    ),
                    _ => {}
                }
            }
            for (param_name, param) in &operation.params {
                let at = [&at[..], &["params", param_name.as_str()]].concat();
                for message in param.problems(param_name, tower) {
                    problem(&at, message);
                }
                let Some(tower) = tower.filter(|_| param.secret) else {
                    continue;
                };
                let targets: Vec<&str> = match tower.flavour {
                    Flavour::Cluster => tower.targets.iter().map(String::as_str).collect(),
                    Flavour::Simple => vec![Target::NONE],
                };
                let without: Vec<&str> = targets
                    .into_iter()
                    .filter(|t| tower.recipients_for(t).is_empty())
                    .collect();
                if !without.is_empty() {
                    let tower_name = parsed.as_ref().map(|p| p.tower().to_string());
                    let tower_name = tower_name.unwrap_or_default();
                    let which = match tower.flavour {
                        Flavour::Cluster => format!(" for {}", without.join(", ")),
                        Flavour::Simple => String::new(),
                    };
                    problem(
                        &at,
                        format!(
                            "{param_name} is secret, but tower {tower_name} has no recipients \
                             to seal it to{which}: add its agents' public keys (rct-agent keygen \
                             prints one) to the tower's `recipients`"
                        ),
                    );
                }
            }
        }
        problems
    }
}

impl Operation {
    /// Checks `given` parameters: unknown names refused, types and limits checked, defaults
    /// applied, required ones present. All problems are reported at once. Secret values must
    /// arrive as `secrets` says: sealed ones are checked for presence and size only.
    pub fn check(
        &self,
        tower: &TowerSpec,
        given: &BTreeMap<String, proto::Value>,
        secrets: Secrets,
    ) -> Result<Checked, Vec<ParamError>> {
        let mut errors = Vec::new();
        for name in given.keys() {
            if !self.params.contains_key(name) {
                errors.push(ParamError {
                    param: name.clone(),
                    message: format!(
                        "unknown parameter {name}; this operation takes: {}",
                        self.param_list()
                    ),
                });
            }
        }
        let mut params = BTreeMap::new();
        let mut target = Target::none();
        for (name, param) in &self.params {
            let value = match given.get(name) {
                Some(value) => value.clone(),
                None => match param.default_value() {
                    Some(value) => value,
                    None => {
                        errors.push(ParamError {
                            param: name.clone(),
                            message: format!("missing parameter {name} ({})", param.describe()),
                        });
                        continue;
                    }
                },
            };
            let checked = if param.secret && secrets == Secrets::Sealed {
                param.check_sealed(name, &value)
            } else {
                param.check(name, &value, tower)
            };
            match checked {
                Ok(()) => {
                    if let Some(V::Target(t)) = &value.kind
                        && let Ok(t) = Target::new(t.as_str())
                    {
                        target = t;
                    }
                    params.insert(name.clone(), value);
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(Checked { params, target })
        } else {
            Err(errors)
        }
    }

    /// `params` with every secret value replaced by [`proto::Masked`].
    pub fn mask(&self, params: &BTreeMap<String, proto::Value>) -> BTreeMap<String, proto::Value> {
        params
            .iter()
            .map(|(name, value)| {
                let secret = self.params.get(name).is_none_or(|p| p.secret);
                let value = if secret {
                    proto::Value {
                        kind: Some(V::Masked(proto::Masked {})),
                    }
                } else {
                    value.clone()
                };
                (name.clone(), value)
            })
            .collect()
    }

    fn param_list(&self) -> String {
        if self.params.is_empty() {
            "no parameters".into()
        } else {
            self.params.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }
}

impl Justification {
    /// The rule in words: `required, matching [A-Z]+-[0-9]+` or `optional`.
    pub fn describe(&self) -> String {
        format!(
            "{}{}",
            if self.required {
                "required"
            } else {
                "optional"
            },
            self.pattern
                .as_ref()
                .map(|p| format!(", matching {p}"))
                .unwrap_or_default()
        )
    }

    /// Checks a justification against the rule (and against what any justification may
    /// hold: [`crate::text::justification_problem`]); the error is a sentence for the operator.
    pub fn check(&self, operation: &str, text: &str) -> Result<(), String> {
        if let Some(problem) = crate::text::justification_problem(text) {
            return Err(problem);
        }
        let text = text.trim();
        if text.is_empty() {
            return if self.required {
                Err(format!(
                    "{operation} needs a justification{}",
                    self.pattern
                        .as_ref()
                        .map(|p| format!(" matching {p} (a ticket or incident reference)"))
                        .unwrap_or_default()
                ))
            } else {
                Ok(())
            };
        }
        if let Some(pattern) = &self.pattern {
            let matches = pattern
                .is_match(text)
                .map_err(|e| format!("the catalog's pattern is broken: {e}"))?;
            if !matches {
                return Err(format!(
                    "justification {text:?} does not match {pattern}, which {operation} requires"
                ));
            }
        }
        Ok(())
    }
}

impl Param {
    /// A sealed value, as admission sees it: present, and not too large.
    fn check_sealed(&self, name: &str, value: &proto::Value) -> Result<(), ParamError> {
        let error = |message: String| {
            Err(ParamError {
                param: name.to_owned(),
                message,
            })
        };
        match &value.kind {
            Some(V::Sealed(sealed)) if sealed.age.len() <= crate::sealed::MAX_SEALED => Ok(()),
            Some(V::Sealed(sealed)) => error(format!(
                "{name} is {} bytes sealed; at most {} are accepted",
                sealed.age.len(),
                crate::sealed::MAX_SEALED
            )),
            _ => error(format!(
                "{name} is secret and must arrive sealed to the tower's recipients (rct \
                 encrypts it; a client that sends it in clear is out of date)"
            )),
        }
    }

    /// Reads a value typed on a command line, by this parameter's type.
    pub fn parse(&self, name: &str, text: &str) -> Result<proto::Value, ParamError> {
        let error = |what: &str| ParamError {
            param: name.to_owned(),
            message: if self.secret {
                format!("{name} must be {what}")
            } else {
                format!("{name} must be {what}, got {text:?}")
            },
        };
        let kind = match self.kind {
            Type::String => V::String(text.to_owned()),
            Type::Enum => V::Enumeration(text.to_owned()),
            Type::Target => V::Target(text.to_owned()),
            Type::Integer => V::Integer(text.trim().parse().map_err(|_| error("a whole number"))?),
            Type::Number => V::Number(text.trim().parse().map_err(|_| error("a number"))?),
            Type::Boolean => V::Boolean(match text.trim() {
                "true" | "yes" | "1" => true,
                "false" | "no" | "0" => false,
                _ => return Err(error("true or false")),
            }),
            Type::Duration => V::Duration(
                humantime::parse_duration(text.trim())
                    .ok()
                    .and_then(proto_duration)
                    .ok_or_else(|| error("a duration such as 90s or 15m"))?,
            ),
        };
        Ok(proto::Value { kind: Some(kind) })
    }

    /// Checks a value against the type and limits.
    pub fn check(
        &self,
        name: &str,
        value: &proto::Value,
        tower: &TowerSpec,
    ) -> Result<(), ParamError> {
        let error = |message: String| {
            Err(ParamError {
                param: name.to_owned(),
                message,
            })
        };
        // What a message may say of the value: nothing, when it is secret.
        let got = |shown: String| {
            if self.secret {
                String::new()
            } else {
                format!(", got {shown}")
            }
        };
        match (self.kind, value.kind.as_ref()) {
            (Type::String, Some(V::String(s))) => {
                let max = self.max_len.unwrap_or(DEFAULT_MAX_LEN);
                if s.chars().count() > max {
                    return error(format!("{name} must be at most {max} characters long"));
                }
                if let Some(pattern) = &self.pattern {
                    let matches = pattern.is_match(s).map_err(|e| ParamError {
                        param: name.to_owned(),
                        message: format!("the catalog's pattern for {name} is broken: {e}"),
                    })?;
                    if !matches {
                        let shown = if self.secret {
                            "the value".to_owned()
                        } else {
                            format!("{s:?}")
                        };
                        return error(format!("{name} must match {pattern}, and {shown} does not"));
                    }
                }
                Ok(())
            }
            (Type::Integer, Some(V::Integer(i))) => {
                self.check_range(name, *i as f64, &got(i.to_string()))
            }
            (Type::Number, Some(V::Number(n))) if n.is_finite() => {
                self.check_range(name, *n, &got(n.to_string()))
            }
            (Type::Boolean, Some(V::Boolean(_))) => Ok(()),
            (Type::Enum, Some(V::Enumeration(v))) => {
                if self.values.contains(v) {
                    Ok(())
                } else {
                    error(format!(
                        "{name} must be one of {}{}",
                        self.values.join(", "),
                        got(format!("{v:?}"))
                    ))
                }
            }
            (Type::Duration, Some(V::Duration(d))) if d.seconds >= 0 && d.nanos >= 0 => Ok(()),
            (Type::Target, Some(V::Target(t))) => {
                if tower.targets.contains(t) {
                    Ok(())
                } else {
                    error(format!(
                        "{name} must be one of {}{}",
                        tower.targets.join(", "),
                        got(format!("{t:?}"))
                    ))
                }
            }
            _ => error(format!("{name} must be {}", self.describe())),
        }
    }

    fn check_range(&self, name: &str, n: f64, got: &str) -> Result<(), ParamError> {
        let below = self.min.is_some_and(|min| n < min);
        let above = self.max.is_some_and(|max| n > max);
        if below || above {
            return Err(ParamError {
                param: name.to_owned(),
                message: format!("{name} must be {}{got}", self.describe()),
            });
        }
        Ok(())
    }

    /// The value used when none is given.
    pub fn default_value(&self) -> Option<proto::Value> {
        let kind = match (self.kind, self.default.as_ref()?) {
            (Type::String, Scalar::Text(s)) => V::String(s.clone()),
            (Type::Enum, Scalar::Text(s)) => V::Enumeration(s.clone()),
            (Type::Target, Scalar::Text(s)) => V::Target(s.clone()),
            (Type::Integer, Scalar::Int(i)) => V::Integer(*i),
            (Type::Number, Scalar::Int(i)) => V::Number(*i as f64),
            (Type::Number, Scalar::Float(f)) => V::Number(*f),
            (Type::Boolean, Scalar::Bool(b)) => V::Boolean(*b),
            (Type::Duration, Scalar::Text(s)) => {
                V::Duration(proto_duration(humantime::parse_duration(s).ok()?)?)
            }
            _ => return None,
        };
        Some(proto::Value { kind: Some(kind) })
    }

    /// What the parameter accepts on `tower`, naming the targets for a target parameter.
    pub fn accepts(&self, tower: &TowerSpec) -> String {
        match self.kind {
            Type::Target => format!("one of {}", tower.targets.join(", ")),
            _ => self.describe(),
        }
    }

    /// What the parameter accepts, in words: "an integer from 0 to 100".
    pub fn describe(&self) -> String {
        let range = |what: &str| match (self.min, self.max) {
            (Some(min), Some(max)) => format!("{what} from {min} to {max}"),
            (Some(min), None) => format!("{what} of at least {min}"),
            (None, Some(max)) => format!("{what} of at most {max}"),
            (None, None) => what.to_owned(),
        };
        match self.kind {
            Type::String => match &self.pattern {
                Some(p) => format!("a string matching {p}"),
                None => "a string".into(),
            },
            Type::Integer => range("an integer"),
            Type::Number => range("a number"),
            Type::Boolean => "true or false".into(),
            Type::Enum => format!("one of {}", self.values.join(", ")),
            Type::Duration => "a duration such as 90s or 15m".into(),
            Type::Target => "one of the tower's targets".into(),
        }
    }

    fn problems(&self, name: &str, tower: Option<&TowerSpec>) -> Vec<String> {
        let mut problems = Vec::new();
        if OpName::new(name).is_err() {
            problems.push(format!(
                "parameter name {name:?} may only contain letters, digits, '_' and '-'"
            ));
        }
        let only = |field: &str, set: bool, kinds: &str| {
            set.then(|| format!("`{field}` only applies to {kinds} parameters"))
        };
        let numeric = matches!(self.kind, Type::Integer | Type::Number);
        problems.extend(only(
            "pattern",
            self.pattern.is_some() && self.kind != Type::String,
            "string",
        ));
        problems.extend(only(
            "max_len",
            self.max_len.is_some() && self.kind != Type::String,
            "string",
        ));
        problems.extend(only(
            "min",
            self.min.is_some() && !numeric,
            "integer and number",
        ));
        problems.extend(only(
            "max",
            self.max.is_some() && !numeric,
            "integer and number",
        ));
        problems.extend(only(
            "values",
            !self.values.is_empty() && self.kind != Type::Enum,
            "enum",
        ));
        if self.kind == Type::Enum && self.values.is_empty() {
            problems.push("an enum parameter needs `values`".into());
        }
        if let (Some(min), Some(max)) = (self.min, self.max)
            && min > max
        {
            problems.push(format!("min ({min}) is larger than max ({max})"));
        }
        if let Some(pattern) = &self.pattern
            && let Err(e) = pattern.regex()
        {
            problems.push(format!("bad regular expression: {e}"));
        }
        match self.kind {
            Type::Target if self.secret => problems.push(
                "a target cannot be secret: it names where the command runs, in its subject".into(),
            ),
            Type::Boolean | Type::Enum if self.secret => problems.push(format!(
                "{} {} parameter cannot be secret: its possible values are in the catalog for \
                 everyone to read, and masking them would show which one was given",
                if self.kind == Type::Enum { "an" } else { "a" },
                self.kind
            )),
            _ => {}
        }
        if self.secret && self.default.is_some() {
            problems.push(
                "a secret parameter cannot have a default: the catalog is readable by every \
                 operator, so the value would be no secret; remove `default`"
                    .into(),
            );
        } else if self.default.is_some() {
            match (self.default_value(), tower) {
                (None, _) => problems.push(format!("default is not {}", self.describe())),
                (Some(value), Some(tower)) => {
                    if let Err(e) = self.check(name, &value, tower) {
                        problems.push(format!("default does not pass its own check: {e}"));
                    }
                }
                (Some(_), None) => {}
            }
        }
        problems
    }
}

/// A pattern anchored at both ends, whatever the catalog wrote.
fn anchored(pattern: &str) -> Result<Regex, regex::Error> {
    #[cfg(test)]
    tests::COMPILED.with(|c| c.set(c.get() + 1));
    Regex::new(&format!("^(?:{pattern})$"))
}

/// `d` as a protobuf duration; `None` beyond its range (about 292 billion years).
pub fn proto_duration(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).ok()?,
        // Below 1e9, so it always fits.
        nanos: i32::try_from(d.subsec_nanos()).ok()?,
    })
}

/// `params` with every value masked: for requests whose operation is unknown, so nothing says
/// which values are secret.
pub fn mask_all(params: &BTreeMap<String, proto::Value>) -> BTreeMap<String, proto::Value> {
    let masked = proto::Value {
        kind: Some(V::Masked(proto::Masked {})),
    };
    params
        .keys()
        .map(|name| (name.clone(), masked.clone()))
        .collect()
}

/// The name in `names` closest to `word`, when one is close enough to be what was meant
/// (a typo, a missing letter, words swapped around a dash).
pub fn nearest<'a>(word: &str, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names
        .into_iter()
        .filter(|n| *n != word)
        .map(|n| (strsim::jaro_winkler(word, n), n))
        .filter(|(score, _)| *score >= 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| n)
}

/// A parameter value as people read it (`prod-1`, `40`, `90s`, `***`).
pub fn display_value(value: &proto::Value) -> String {
    match &value.kind {
        Some(V::String(s) | V::Enumeration(s) | V::Target(s)) => s.clone(),
        Some(V::Integer(i)) => i.to_string(),
        Some(V::Number(n)) => n.to_string(),
        Some(V::Boolean(b)) => b.to_string(),
        Some(V::Duration(d)) => humantime::format_duration(Duration::new(
            d.seconds.max(0) as u64,
            d.nanos.max(0) as u32,
        ))
        .to_string(),
        Some(V::Masked(_) | V::Sealed(_)) => "***".into(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Regular expressions compiled on this thread (each test runs on its own).
        pub(super) static COMPILED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn compiled() -> usize {
        COMPILED.with(|c| c.get())
    }

    /// Every check used to compile its parameter's and the justification's regex again.
    #[test]
    fn towers_named_like_rcts_own_records_are_refused() {
        let catalog: Catalog =
            serde_yaml_ng::from_str("towers: { _catalog: { flavour: simple } }\noperations: {}\n")
                .unwrap();
        let problems = catalog.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("rct's own records")),
            "{problems:?}"
        );
    }

    /// Each problem of `catalog` as `path: message`.
    fn problem_lines(catalog: &Catalog) -> Vec<String> {
        catalog
            .problems()
            .into_iter()
            .map(|p| format!("{}: {}", p.path.join("."), p.message))
            .collect()
    }

    #[test]
    fn locks_name_parameters_that_are_not_secret_and_conflicts_need_locks() {
        let catalog: Catalog = serde_yaml_ng::from_str(
            "towers: { w: { flavour: simple, recipients: [age1h8w2m3amcn8m9r4m4g9cdnhch3d74rtutexzgxjjtz08t9rk0dgsmwq8e5] } }\n\
             operations:\n  \
               w/good: { allowed_groups: [g], params: { ns: { type: string } }, locks: [\"ns-{ns}\"], conflicts_with: [\"w/*\", \"*\", w/other] }\n  \
               w/unknown: { allowed_groups: [g], locks: [\"{nope}\"] }\n  \
               w/secret: { allowed_groups: [g], params: { pw: { type: string, secret: true } }, locks: [\"{pw}\"] }\n  \
               w/pattern: { allowed_groups: [g], locks: [all], conflicts_with: [\"w*\"] }\n  \
               w/bare: { allowed_groups: [g], conflicts_with: [\"w/*\"] }\n",
        )
        .unwrap();
        let problems: Vec<String> = problem_lines(&catalog);
        let about = |op: &str| {
            problems
                .iter()
                .filter(|p| p.contains(&format!("w/{op}.")))
                .count()
        };
        assert_eq!(about("good"), 0, "{problems:#?}");
        for op in ["unknown", "secret", "pattern", "bare"] {
            assert_eq!(about(op), 1, "{op}: {problems:#?}");
        }
        assert_eq!(problems.len(), 4, "{problems:#?}");
    }

    #[test]
    fn only_a_cluster_operation_without_secrets_or_approvals_fans_out() {
        let catalog: Catalog = serde_yaml_ng::from_str(
            "towers:\n  \
               c: { flavour: cluster, targets: [a, b, _rollout], recipients: [age1h8w2m3amcn8m9r4m4g9cdnhch3d74rtutexzgxjjtz08t9rk0dgsmwq8e5] }\n  \
               w: { flavour: simple }\n\
             operations:\n  \
               c/good: { allowed_groups: [g], params: { t: { type: target } }, fan_out: { max_targets: 2 } }\n  \
               c/one: { allowed_groups: [g], params: { t: { type: target } }, fan_out: { max_targets: 1 } }\n  \
               c/sealed: { allowed_groups: [g], params: { t: { type: target }, pw: { type: string, secret: true } }, fan_out: { max_targets: 2 } }\n  \
               c/approved: { allowed_groups: [g], params: { t: { type: target } }, approvals: { required: 1, approver_groups: [h] }, fan_out: { max_targets: 2 } }\n  \
               w/simple: { allowed_groups: [g], fan_out: { max_targets: 2 } }\n",
        )
        .unwrap();
        let problems: Vec<String> = problem_lines(&catalog);
        let about = |op: &str| {
            problems
                .iter()
                .filter(|p| p.contains(&format!("{op}.fan_out")))
                .count()
        };
        assert_eq!(about("c/good"), 0, "{problems:#?}");
        for op in ["c/one", "c/sealed", "c/approved", "w/simple"] {
            assert_eq!(about(op), 1, "{op}: {problems:#?}");
        }
        // A target may not take the name of a rollout's own events.
        assert!(
            problems
                .iter()
                .any(|p| p.contains("_rollout: names starting with _ are rct's own")),
            "{problems:#?}"
        );
        assert_eq!(problems.len(), 5, "{problems:#?}");
    }

    #[test]
    fn an_inverse_names_an_operation_and_fills_what_it_needs_from_the_record() {
        let catalog: Catalog = serde_yaml_ng::from_str(
            "towers: { w: { flavour: simple, recipients: [age1h8w2m3amcn8m9r4m4g9cdnhch3d74rtutexzgxjjtz08t9rk0dgsmwq8e5] } }\n\
             operations:\n  \
               w/set: { allowed_groups: [g], params: { ns: { type: string }, n: { type: integer }, ramp: { type: duration, default: 1m } } }\n  \
               w/seal: { allowed_groups: [g], params: { pw: { type: string, secret: true } } }\n  \
               w/good: { allowed_groups: [g], params: { ns: { type: string } }, inverse: { operation: w/set, params: { ns: \"{ns}\", n: \"{outputs.before}\" } } }\n  \
               w/gone: { allowed_groups: [g], inverse: { operation: w/nope } }\n  \
               w/short: { allowed_groups: [g], params: { ns: { type: string } }, inverse: { operation: w/set, params: { ns: \"{ns}\" } } }\n  \
               w/extra: { allowed_groups: [g], params: { ns: { type: string } }, inverse: { operation: w/set, params: { ns: \"{ns}\", n: \"1\", x: \"1\" } } }\n  \
               w/sealed: { allowed_groups: [g], params: { ns: { type: string } }, inverse: { operation: w/seal, params: { pw: \"x\" } } }\n  \
               w/unknown: { allowed_groups: [g], params: { ns: { type: string } }, inverse: { operation: w/set, params: { ns: \"{nope}\", n: \"{outputs.}\" } } }\n  \
               w/secret: { allowed_groups: [g], params: { ns: { type: string, secret: true } }, inverse: { operation: w/set, params: { ns: \"{ns}\", n: \"1\" } } }\n",
        )
        .unwrap();
        let problems: Vec<String> = problem_lines(&catalog);
        let about = |op: &str| {
            problems
                .iter()
                .filter(|p| p.contains(&format!("w/{op}.inverse")))
                .count()
        };
        for (op, count) in [
            ("good", 0),
            ("gone", 1),
            ("short", 1),
            ("extra", 1),
            ("sealed", 1),
            ("unknown", 2),
            ("secret", 1),
        ] {
            assert_eq!(about(op), count, "{op}: {problems:#?}");
        }
        // The secret parameter of w/seal has no recipients problem: the tower has them.
        assert_eq!(problems.len(), 7, "{problems:#?}");
    }

    #[test]
    fn the_nearest_name_is_suggested_only_when_close() {
        let names = [
            "traffic/drain-cluster",
            "traffic/undrain-cluster",
            "workloads/restart",
        ];
        assert_eq!(
            nearest("traffic/drian-cluster", names),
            Some("traffic/drain-cluster")
        );
        assert_eq!(
            nearest("trafic/drain-cluster", names),
            Some("traffic/drain-cluster")
        );
        assert_eq!(
            nearest("workload/restart", names),
            Some("workloads/restart")
        );
        assert_eq!(nearest("database/failover", names), None);
        assert_eq!(
            nearest("traffic", ["traffic", "workloads"]),
            None,
            "not itself"
        );
        assert_eq!(nearest("trafic", ["traffic", "workloads"]), Some("traffic"));
    }

    #[test]
    fn patterns_are_compiled_once_per_catalog_load() {
        // As agents and the CLI read it: the served JSON.
        let json = serde_json::to_string(&example()).unwrap();
        let catalog: Catalog = serde_json::from_str(&json).unwrap();
        let (tower, scale) = catalog
            .operation(&"workloads/scale".parse().unwrap())
            .unwrap();
        let params = given(&[
            ("namespace", V::String("shop".into())),
            ("deployment", V::String("cart".into())),
            ("replicas", V::Integer(3)),
        ]);
        let patterns = scale
            .params
            .values()
            .filter(|p| p.pattern.is_some())
            .count();
        assert!(patterns >= 1);
        let before = compiled();
        for _ in 0..100 {
            scale.check(tower, &params, Secrets::Open).unwrap();
            scale
                .justification
                .check("workloads/scale", "SRE-1")
                .unwrap();
        }
        let justification = usize::from(scale.justification.pattern.is_some());
        assert_eq!(compiled() - before, patterns + justification);
    }

    fn example() -> Catalog {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/catalog.example.yaml");
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn op(catalog: &Catalog, name: &str) -> (TowerSpec, Operation) {
        let (t, o) = catalog.operation(&name.parse().unwrap()).unwrap();
        (t.clone(), o.clone())
    }

    fn value(kind: V) -> proto::Value {
        proto::Value { kind: Some(kind) }
    }

    fn given(pairs: &[(&str, V)]) -> BTreeMap<String, proto::Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), value(v.clone())))
            .collect()
    }

    #[test]
    fn the_example_catalog_is_sound_and_versioned() {
        let catalog = example();
        assert_eq!(catalog.problems(), []);
        assert_eq!(catalog.version().len(), 12);
        assert_eq!(catalog.version(), example().version());
        let json = serde_json::to_string(&catalog).unwrap();
        let back: Catalog = serde_json::from_str(&json).unwrap();
        assert_eq!(back, catalog);
    }

    #[test]
    fn defaults_are_applied_and_the_target_found() {
        let (tower, drain) = op(&example(), "traffic/drain-cluster");
        let checked = drain
            .check(
                &tower,
                &given(&[("cluster", V::Target("prod-2".into()))]),
                Secrets::Open,
            )
            .unwrap();
        assert_eq!(checked.target.as_str(), "prod-2");
        assert_eq!(checked.params["keep_percent"], value(V::Integer(0)));

        let (tower, restart) = op(&example(), "workloads/restart");
        let checked = restart
            .check(
                &tower,
                &given(&[
                    ("namespace", V::String("shop".into())),
                    ("deployment", V::String("cart".into())),
                ]),
                Secrets::Open,
            )
            .unwrap();
        assert!(checked.target.is_none());
        assert_eq!(
            checked.params["strategy"],
            value(V::Enumeration("rolling".into()))
        );
    }

    #[test]
    fn every_violation_is_named_in_words() {
        let catalog = example();
        let (traffic, drain) = op(&catalog, "traffic/drain-cluster");
        let (workloads, scale) = op(&catalog, "workloads/scale");
        let (_, restart) = op(&catalog, "workloads/restart");
        let (_, secret) = op(&catalog, "workloads/set-secret");
        let ok_scale = |extra: &[(&str, V)]| {
            let mut p = given(&[
                ("namespace", V::String("shop".into())),
                ("deployment", V::String("cart".into())),
                ("replicas", V::Integer(3)),
            ]);
            p.extend(given(extra));
            p
        };
        let cases: Vec<(&Operation, &TowerSpec, BTreeMap<String, proto::Value>, &str)> = vec![
            (&drain, &traffic, given(&[]), "missing parameter cluster"),
            (
                &drain,
                &traffic,
                given(&[("cluster", V::Target("prod-9".into()))]),
                "cluster must be one of prod-1, prod-2, prod-3, prod-4, got \"prod-9\"",
            ),
            (
                &drain,
                &traffic,
                given(&[
                    ("cluster", V::Target("prod-1".into())),
                    ("keep_percent", V::Integer(150)),
                ]),
                "keep_percent must be an integer from 0 to 100, got 150",
            ),
            (
                &drain,
                &traffic,
                given(&[
                    ("cluster", V::Target("prod-1".into())),
                    ("keep_percent", V::String("10".into())),
                ]),
                "keep_percent must be an integer from 0 to 100",
            ),
            (
                &scale,
                &workloads,
                ok_scale(&[("namespace", V::String("Shop!".into()))]),
                "namespace must match",
            ),
            (
                &scale,
                &workloads,
                ok_scale(&[("namespace", V::String("a".repeat(64)))]),
                "namespace must be at most 63 characters long",
            ),
            (
                &scale,
                &workloads,
                ok_scale(&[("force", V::Boolean(true))]),
                "unknown parameter force; this operation takes: deployment, namespace, replicas",
            ),
            (
                &restart,
                &workloads,
                given(&[
                    ("namespace", V::String("shop".into())),
                    ("deployment", V::String("cart".into())),
                    ("strategy", V::Enumeration("yolo".into())),
                ]),
                "strategy must be one of rolling, all-at-once, got \"yolo\"",
            ),
        ];
        for (operation, tower, params, expected) in cases {
            let errors = operation.check(tower, &params, Secrets::Open).unwrap_err();
            assert!(
                errors.iter().any(|e| e.message.contains(expected)),
                "expected {expected:?} in {errors:?}"
            );
        }

        // A secret that fails its pattern is not echoed back.
        let mut bad = secret.clone();
        bad.params.get_mut("value").unwrap().pattern = Some("[0-9]+".into());
        let errors = bad
            .check(
                &workloads,
                &given(&[
                    ("namespace", V::String("shop".into())),
                    ("name", V::String("db".into())),
                    ("key", V::String("password".into())),
                    ("value", V::String("hunter2".into())),
                ]),
                Secrets::Open,
            )
            .unwrap_err();
        assert!(!errors[0].message.contains("hunter2"), "{errors:?}");
        // So is one that is not even of the right type, on the command line or the wire.
        let mut number = secret.params["value"].clone();
        number.kind = Type::Integer;
        let e = number.parse("value", "hunter2").unwrap_err();
        assert!(!e.message.contains("hunter2"), "{e}");
        number.max = Some(1.0);
        let e = number
            .check("value", &value(V::Integer(12345)), &workloads)
            .unwrap_err();
        assert!(!e.message.contains("12345"), "{e}");
    }

    /// Admission sees secrets sealed: it checks that they are, and their size, nothing else.
    #[test]
    fn admission_takes_secrets_sealed_only() {
        let (workloads, secret) = op(&example(), "workloads/set-secret");
        let with = |value: V| {
            given(&[
                ("namespace", V::String("shop".into())),
                ("name", V::String("db".into())),
                ("key", V::String("password".into())),
                ("value", value),
            ])
        };
        let sealed = |n: usize| V::Sealed(proto::Sealed { age: vec![0; n] });
        secret
            .check(&workloads, &with(sealed(100)), Secrets::Sealed)
            .unwrap();
        let cases = [
            (V::String("hunter2".into()), "must arrive sealed"),
            (V::Masked(proto::Masked {}), "must arrive sealed"),
            (sealed(crate::sealed::MAX_SEALED + 1), "at most"),
        ];
        for (value, expected) in cases {
            let errors = secret
                .check(&workloads, &with(value), Secrets::Sealed)
                .unwrap_err();
            assert!(errors[0].message.contains(expected), "{errors:?}");
            assert!(!errors[0].message.contains("hunter2"), "{errors:?}");
        }
        // The agent, once it opened them, checks them like any other value.
        let errors = secret
            .check(&workloads, &with(sealed(100)), Secrets::Open)
            .unwrap_err();
        assert!(errors[0].message.contains("value must be"), "{errors:?}");
        // A sealed value where none is secret is refused.
        let (_, scale) = op(&example(), "workloads/scale");
        let errors = scale
            .check(
                &workloads,
                &given(&[
                    ("namespace", V::String("shop".into())),
                    ("deployment", sealed(10)),
                    ("replicas", V::Integer(1)),
                ]),
                Secrets::Sealed,
            )
            .unwrap_err();
        assert!(
            errors[0].message.contains("deployment must be"),
            "{errors:?}"
        );
    }

    #[test]
    fn secrets_need_recipients_and_no_default() {
        let mut catalog = example();
        let keys = crate::sealed::Keys::generate();
        catalog
            .towers
            .get_mut("workloads")
            .unwrap()
            .recipients
            .clear();
        let secret = catalog
            .operations
            .get_mut("workloads/set-secret")
            .unwrap()
            .params
            .get_mut("value")
            .unwrap();
        secret.default = Some(Scalar::Text("hunter2".into()));
        // A secret on a cluster tower: every target needs recipients.
        let mut traffic_secret = secret.clone();
        traffic_secret.default = None;
        catalog
            .operations
            .get_mut("traffic/undrain-cluster")
            .unwrap()
            .params
            .get_mut("cluster")
            .unwrap()
            .secret = true;
        catalog
            .operations
            .get_mut("workloads/restart")
            .unwrap()
            .params
            .get_mut("strategy")
            .unwrap()
            .secret = true;
        catalog
            .operations
            .get_mut("traffic/set-weights")
            .unwrap()
            .params
            .insert("token".into(), traffic_secret);
        let traffic = catalog.towers.get_mut("traffic").unwrap();
        for target in ["prod-1", "prod-2", "prod-3"] {
            traffic
                .target_recipients
                .insert(target.into(), keys.recipients());
        }
        traffic
            .target_recipients
            .insert("prod-9".into(), vec!["age1nope".into()]);
        let messages: Vec<String> = problem_lines(&catalog);
        let expect = [
            "operations.workloads/set-secret.params.value: value is secret, but tower workloads \
             has no recipients",
            "operations.workloads/set-secret.params.value: a secret parameter cannot have a default",
            "operations.traffic/set-weights.params.token: token is secret, but tower traffic has \
             no recipients to seal it to for prod-4:",
            "towers.traffic.target_recipients.prod-9: prod-9 is not one of the tower's targets",
            "operations.traffic/undrain-cluster.params.cluster: a target cannot be secret",
            "operations.workloads/restart.params.strategy: an enum parameter cannot be secret",
            "operations.workloads/restart.params.strategy: a secret parameter cannot have a default",
            "operations.workloads/restart.params.strategy: strategy is secret, but tower \
             workloads has no recipients",
            "operations.traffic/undrain-cluster.params.cluster: cluster is secret, but tower \
             traffic has no recipients to seal it to for prod-4:",
            "towers.traffic.target_recipients.prod-9: \"age1nope\" is not an age X25519 recipient",
            "operations.traffic/undrain-cluster.locks: lock \"{cluster}\" uses the secret parameter \
             cluster",
            // The inverse of all three is set-weights, which now needs a secret no record holds.
            "operations.traffic/drain-cluster.inverse: traffic/set-weights needs token",
            "operations.traffic/set-weights.inverse: traffic/set-weights needs token",
            "operations.traffic/undrain-cluster.inverse: traffic/set-weights needs token",
            "operations.traffic/undrain-cluster.inverse: cluster: \"{cluster}\" uses the secret \
             parameter cluster",
            // Both fan out, and a secret is sealed for one command.
            "operations.traffic/set-weights.fan_out: an operation with a secret parameter cannot \
             fan out",
            "operations.traffic/undrain-cluster.fan_out: an operation with a secret parameter \
             cannot fan out",
        ];
        for expected in expect {
            assert!(
                messages.iter().any(|m| m.starts_with(expected)),
                "expected {expected:?} in {messages:#?}"
            );
        }
        assert_eq!(messages.len(), expect.len(), "{messages:#?}");
        let traffic = &catalog.towers["traffic"];
        assert_eq!(traffic.recipients_for("prod-1"), keys.recipients());
        assert!(traffic.recipients_for("prod-4").is_empty());
    }

    #[test]
    fn command_line_values_parse_by_type() {
        let catalog = example();
        let (_, undrain) = op(&catalog, "traffic/undrain-cluster");
        let (_, drain) = op(&catalog, "traffic/drain-cluster");
        let ramp = &undrain.params["ramp"];
        assert_eq!(
            ramp.parse("ramp", "90s").unwrap(),
            value(V::Duration(prost_types::Duration {
                seconds: 90,
                nanos: 0
            }))
        );
        let keep = &drain.params["keep_percent"];
        assert_eq!(
            keep.parse("keep_percent", "40").unwrap(),
            value(V::Integer(40))
        );
        let error = keep.parse("keep_percent", "forty").unwrap_err();
        assert_eq!(
            error.message,
            "keep_percent must be a whole number, got \"forty\""
        );
        assert_eq!(display_value(&ramp.parse("ramp", "15m").unwrap()), "15m");
        // Past the protobuf range: refused, not wrapped into a negative duration.
        let error = ramp.parse("ramp", "500000000000years").unwrap_err();
        assert!(error.message.contains("a duration"), "{error}");
    }

    #[test]
    fn secrets_are_masked() {
        let (_, secret) = op(&example(), "workloads/set-secret");
        let masked = secret.mask(&given(&[
            ("key", V::String("password".into())),
            ("value", V::String("hunter2".into())),
        ]));
        assert_eq!(masked["key"], value(V::String("password".into())));
        assert_eq!(masked["value"], value(V::Masked(proto::Masked {})));
    }

    #[test]
    fn justifications_follow_the_rule() {
        let (_, drain) = op(&example(), "traffic/drain-cluster");
        let rule = &drain.justification;
        rule.check("traffic/drain-cluster", "SRE-101").unwrap();
        let missing = rule.check("traffic/drain-cluster", "  ").unwrap_err();
        assert!(
            missing.contains("needs a justification matching [A-Z]+-[0-9]+"),
            "{missing}"
        );
        // Anchored: a matching substring is not enough.
        let loose = rule
            .check("traffic/drain-cluster", "see SRE-101 please")
            .unwrap_err();
        assert!(loose.contains("does not match"), "{loose}");
        Justification::default().check("x/y", "").unwrap();
    }

    #[test]
    fn unsound_catalogs_are_explained_with_paths() {
        let mut catalog = example();
        catalog.towers.get_mut("workloads").unwrap().targets = vec!["x".into()];
        catalog
            .operations
            .get_mut("traffic/drain-cluster")
            .unwrap()
            .params
            .get_mut("keep_percent")
            .unwrap()
            .default = Some(Scalar::Int(500));
        let mut orphan = catalog.operations["workloads/scale"].clone();
        orphan.justification.pattern = Some("([".into());
        catalog.operations.insert("db/failover".into(), orphan);
        let problems = catalog.problems();
        let find = |needle: &str| {
            problems
                .iter()
                .find(|p| p.message.contains(needle))
                .unwrap_or_else(|| panic!("no problem says {needle:?}: {problems:?}"))
        };
        assert_eq!(
            find("simple tower workloads has no targets").path,
            ["towers", "workloads"]
        );
        assert_eq!(
            find("default does not pass its own check").path,
            [
                "operations",
                "traffic/drain-cluster",
                "params",
                "keep_percent"
            ]
        );
        assert!(
            find("unknown tower db")
                .message
                .contains("traffic, workloads")
        );
        assert_eq!(
            find("bad regular expression").path,
            ["operations", "db/failover", "justification", "pattern"]
        );
    }
}
