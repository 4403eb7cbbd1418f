//! What a handler gets and returns.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rct_bus::proto::{self, value::Kind as V};
use time::OffsetDateTime;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::emitter::Emitter;

/// A running command, as its handler sees it: who asked and why, how long it has, and the
/// means to report progress and log lines (published as events, never blocking for long).
#[derive(Clone, Debug)]
pub struct Context {
    command: std::sync::Arc<proto::Command>,
    deadline: OffsetDateTime,
    token: CancellationToken,
    emitter: Emitter,
    /// While planning: the changes described so far.
    plan: Option<std::sync::Arc<std::sync::Mutex<Vec<proto::Change>>>>,
}

impl Context {
    pub(crate) fn new(
        command: std::sync::Arc<proto::Command>,
        deadline: OffsetDateTime,
        token: CancellationToken,
        emitter: Emitter,
    ) -> Self {
        Self {
            command,
            deadline,
            token,
            emitter,
            plan: None,
        }
    }

    /// The same command, planning: [`Context::planning`] is true, and the changes described
    /// through [`Context::change`] are collected in what is returned.
    pub(crate) fn for_plan(&self) -> (Self, std::sync::Arc<std::sync::Mutex<Vec<proto::Change>>>) {
        let changes = std::sync::Arc::default();
        let ctx = Self {
            plan: Some(std::sync::Arc::clone(&changes)),
            ..self.clone()
        };
        (ctx, changes)
    }

    /// The handler must describe what it would change ([`Context::change`], and the
    /// outcome's summary as the plan's summary), and change nothing. Only handlers that
    /// plan ([`crate::Tower::planning_operation`]) are asked to: for a plan-only command
    /// (`rct plan`, or the plan approvers approve), and before running a command whose
    /// approved plan it carries, to check that the plan still holds.
    pub fn planning(&self) -> bool {
        self.plan.is_some()
    }

    /// While planning, describes one change: what happens (`create`, `update`, `delete`,
    /// `promote`, …), to what, and how (from → to). Ignored when not planning. Describe the
    /// same situation with the same changes in the same order: a plan made again that
    /// differs in anything fails the command `stale_plan`.
    pub fn change(
        &self,
        action: impl Into<String>,
        resource: impl Into<String>,
        detail: impl Into<String>,
    ) {
        if let Some(plan) = &self.plan {
            plan.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(proto::Change {
                    action: action.into(),
                    resource: resource.into(),
                    detail: detail.into(),
                });
        }
    }

    /// The command's id.
    pub fn command_id(&self) -> &str {
        &self.command.command_id
    }

    /// `<tower>/<op>`.
    pub fn operation(&self) -> &str {
        &self.command.operation
    }

    /// The target (`_` on simple towers).
    pub fn target(&self) -> &str {
        &self.command.target
    }

    /// Who asked, as admission established it.
    pub fn operator(&self) -> Option<&proto::Operator> {
        self.command.operator.as_ref()
    }

    /// Why.
    pub fn justification(&self) -> &str {
        &self.command.justification
    }

    /// The handler must not change anything: a dry run, or planning (see
    /// [`Context::planning`]), so that a handler that honours dry runs changes nothing
    /// while it plans.
    pub fn dry_run(&self) -> bool {
        self.command.dry_run || self.planning()
    }

    /// When the command must be finished by.
    pub fn deadline(&self) -> OffsetDateTime {
        self.deadline
    }

    /// Reports progress (0..=100); fast successive calls are coalesced. Never blocks.
    pub fn progress(&self, percent: u32, step: impl Into<String>, message: impl Into<String>) {
        self.emitter
            .progress(percent.min(100), step.into(), message.into());
    }

    /// Writes a line to the command's log. Never blocks: a line that finds the agent's queue
    /// of unpublished output full is dropped and counted (the count is recorded when the
    /// command ends); [`Context::send_log`] waits for room instead.
    ///
    /// Every line is masked, cut to the agent's `output.max_line` and counted against the
    /// command's output budget (`output.max_lines`, `output.max_bytes`).
    pub fn log(&self, line: impl Into<String>) {
        self.emitter.log(proto::LogStream::Handler, line.into());
    }

    /// Writes a line of a child process's output to the command's log, like
    /// [`Context::log`].
    pub fn log_stream(&self, stream: proto::LogStream, line: impl Into<String>) {
        self.emitter.log(stream, line.into());
    }

    /// Writes a line to the command's log, waiting while the agent's queue of unpublished
    /// output is full: for output that can be slowed down (a pipe being read), so that none
    /// of it is dropped for want of room.
    pub async fn send_log(&self, stream: proto::LogStream, line: impl Into<String>) {
        self.emitter.send(stream, &line.into(), 0).await;
    }

    /// [`Context::send_log`] for a line of which `cut` bytes were already left out.
    pub(crate) async fn send_cut(&self, stream: proto::LogStream, line: &str, cut: u64) {
        self.emitter.send(stream, line, cut).await;
    }

    /// How many bytes of one line are worth reading: the rest is cut anyway.
    pub(crate) fn line_limit(&self) -> usize {
        self.emitter.line_limit()
    }

    /// `text` masked and cut, as the command's events hold it (`cut`: bytes of it already
    /// left out).
    pub(crate) fn bound(&self, text: &str, cut: u64) -> String {
        self.emitter.bound(text, cut)
    }

    /// Resolves when the command is cancelled or runs out of time: stop, and return.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// Whether the command was cancelled or ran out of time.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The cancellation token itself, to hand to child tasks.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

/// The command's parameters, validated against the catalog, with defaults applied; secret
/// ones opened (in clear: hand them on only as the catalog's owner meant; [`Params::is_secret`]
/// says which they are, and `Debug` shows them as `***`).
#[derive(Clone, Default, PartialEq)]
pub struct Params {
    values: BTreeMap<String, proto::Value>,
    secret: BTreeSet<String>,
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masked = proto::Value {
            kind: Some(V::Masked(proto::Masked {})),
        };
        f.debug_map()
            .entries(
                self.values.iter().map(|(name, value)| {
                    (name, if self.is_secret(name) { &masked } else { value })
                }),
            )
            .finish()
    }
}

impl Params {
    pub(crate) fn new(values: BTreeMap<String, proto::Value>) -> Self {
        Self {
            values,
            secret: BTreeSet::new(),
        }
    }

    /// Marks these parameters secret.
    pub(crate) fn with_secrets(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.secret.extend(names);
        self
    }

    /// Whether the catalog marks `name` secret.
    pub fn is_secret(&self, name: &str) -> bool {
        self.secret.contains(name)
    }

    /// The raw value.
    pub fn get(&self, name: &str) -> Option<&proto::Value> {
        self.values.get(name)
    }

    /// A string, enum or target value.
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.get(name)?.kind.as_ref()? {
            V::String(s) | V::Enumeration(s) | V::Target(s) => Some(s),
            _ => None,
        }
    }

    /// An integer value.
    pub fn i64(&self, name: &str) -> Option<i64> {
        match self.get(name)?.kind.as_ref()? {
            V::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// A number (or integer) value.
    pub fn f64(&self, name: &str) -> Option<f64> {
        match self.get(name)?.kind.as_ref()? {
            V::Number(n) => Some(*n),
            V::Integer(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// A boolean value.
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.get(name)?.kind.as_ref()? {
            V::Boolean(b) => Some(*b),
            _ => None,
        }
    }

    /// A duration value.
    pub fn duration(&self, name: &str) -> Option<Duration> {
        match self.get(name)?.kind.as_ref()? {
            V::Duration(d) => Some(Duration::new(
                d.seconds.max(0) as u64,
                d.nanos.max(0) as u32,
            )),
            _ => None,
        }
    }

    /// Every parameter, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &proto::Value)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// What a handler reports when it succeeds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// One line for people.
    pub summary: String,
    /// Named results (shown in the CLI's summary).
    pub outputs: BTreeMap<String, String>,
}

impl Outcome {
    /// A success with a summary.
    pub fn new(summary: impl Into<String>) -> Self {
        Self {
            summary: summary.into(),
            outputs: BTreeMap::new(),
        }
    }

    /// Adds a named result.
    pub fn output(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.outputs.insert(name.into(), value.into());
        self
    }
}

/// What a handler reports when it fails.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Failure {
    /// A short, stable code (`unreachable`, `exit_status`, …).
    pub code: String,
    /// What happened, for people.
    pub message: String,
}

impl Failure {
    /// A failure with a code and a message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_params_are_known_and_never_shown_by_debug() {
        let text = |s: &str| proto::Value {
            kind: Some(V::String(s.into())),
        };
        let params = Params::new(
            [
                ("name".to_owned(), text("db")),
                ("value".to_owned(), text("hunter2")),
            ]
            .into(),
        )
        .with_secrets(["value".to_owned()]);
        assert!(params.is_secret("value") && !params.is_secret("name"));
        assert_eq!(params.str("value"), Some("hunter2"));
        let shown = format!("{params:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("db"),
            "{shown}"
        );
    }
}
