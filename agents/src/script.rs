//! The script runner: operations defined in YAML, each an executable run with an argv and an
//! environment built from the typed parameters. No shell is ever involved, the environment is
//! cleared but for an allow-list, and an item that starts with a value can only follow `--`.
//!
//! ```yaml
//! tower: workloads
//! # target: prod-1            # cluster flavour: serve this target only
//! env_allow: [PATH, LANG]     # copied from the agent's own environment
//! operations:
//!   restart:
//!     command: ../examples/restart-workload.py   # relative to this file
//!     args: ["--namespace", "{namespace}", "--strategy={strategy}", "--", "{deployment}"]
//!     env: { RESTART_REASON: "{justification}" }
//!     workdir: /tmp
//!     timeout: 10m            # the command's own timeout applies too; the shorter wins
//!     sha256: 9f86d08…        # refuse to run if the script changed
//!   set-secret:
//!     command: set-secret.py
//!     args: ["--name={name}"]
//!     env: { SECRET_VALUE: "{value}" }      # a secret in the environment, or:
//!     secret_files: { SECRET_FILE: value }  # a 0600 file, its path in SECRET_FILE
//! ```
//!
//! Secret parameters (`secret: true` in the catalog) reach a script only the way its YAML
//! says: in an environment variable, or in a file of mode 0600 in a private folder, removed
//! when the script ends. Never in argv (which `ps` shows to every user) unless the operation
//! says `secret_in_argv: true`: the agent refuses to start with such a file, and a command
//! whose catalog made a parameter of its argv secret fails `secret_in_argv` without running.
//!
//! Output: each stdout and stderr line becomes a log line (secret values masked, read as
//! bytes: anything not UTF-8 is replaced, never the end of capture; cut at the agent's
//! `output.max_line`), within the command's output budget (see [`crate::Output`]);
//! `::progress <percent> <message>` on stdout becomes a `Progress` event; while planning
//! (`plan: true`, run with `RCT_MODE=plan`), `::change <action> <resource> <detail…>`
//! describes one change of the plan; `::output <name> <value>` records one output of the
//! outcome (what an `inverse` fills `{outputs.<name>}` from: rct undo). Exit status 0 is
//! success (the last stdout line is the summary); anything else a failure carrying the last
//! lines of stderr. Cancellation and timeouts stop the whole process group: TERM, then KILL.
//! So does the script's own exit: what it left running (a daemon holding its pipes) gets
//! [`READ_GRACE`] for its output to be read, then TERM, then KILL; the outcome never waits
//! for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rct_bus::catalog::display_value;
use rct_bus::proto;
use rct_bus::template::fill;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::{Context, Failure, Outcome, Params, Tower};

/// Lines of stderr kept for a failure's message.
const STDERR_TAIL: usize = 10;
/// After TERM, how long a process group has before KILL.
const TERM_GRACE: Duration = Duration::from_secs(1);
/// Once the script has exited, how long its output may take to reach end of file (before
/// what it left running is stopped, and again after).
pub const READ_GRACE: Duration = Duration::from_secs(1);

/// A file of script-backed operations.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scripts {
    /// The tower these operations belong to.
    pub tower: String,
    /// For a cluster tower: the target this agent serves.
    #[serde(default)]
    pub target: Option<String>,
    /// Environment variables copied from the agent's environment; all others are cleared.
    #[serde(default = "default_env_allow")]
    pub env_allow: Vec<String>,
    /// Operations by name (the part after `<tower>/`).
    pub operations: BTreeMap<String, Script>,
}

fn default_env_allow() -> Vec<String> {
    vec!["PATH".into(), "LANG".into()]
}

/// One script-backed operation.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// The executable; relative paths are relative to the scripts file.
    pub command: PathBuf,
    /// One argv item each; `{param}` is replaced by the parameter's value (also
    /// `{justification}`, `{command_id}`, `{operator}`, `{dry_run}`), never split or
    /// interpreted.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables, with the same placeholders.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Longest run; the command's own timeout applies too.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// SHA-256 (hex) the executable must have.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Files holding secret values: environment variable → parameter. The file (mode 0600,
    /// in a folder of mode 0700) is removed when the script ends; the variable holds its path.
    #[serde(default)]
    pub secret_files: BTreeMap<String, String>,
    /// Allow secret parameters in `args`, where every local user can read them (`ps`).
    #[serde(default)]
    pub secret_in_argv: bool,
    /// The script can plan: run with `RCT_MODE=plan` (`run` otherwise), it describes
    /// each change it would make on a `::change <action> <resource> <detail…>` line, prints
    /// the plan's summary last, and changes nothing.
    #[serde(default)]
    pub plan: bool,
}

impl Scripts {
    /// Reads and checks a scripts file; relative commands are resolved against its folder.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut scripts: Scripts =
            serde_yaml_ng::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for (name, script) in &mut scripts.operations {
            if script.command.is_relative() {
                script.command = base.join(&script.command);
            }
            script
                .check()
                .map_err(|e| format!("{}: operation {name}: {e}", path.display()))?;
        }
        Ok(scripts)
    }

    /// What in `catalog` these scripts would do wrongly: each operation that puts a secret
    /// parameter into argv without `secret_in_argv: true`. Empty when all is well.
    pub fn problems(&self, catalog: &rct_bus::catalog::Catalog) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, script) in &self.operations {
            let Some(operation) = catalog.operations.get(&format!("{}/{name}", self.tower)) else {
                continue;
            };
            let secret = operation
                .params
                .iter()
                .filter(|(_, p)| p.secret)
                .map(|(n, _)| n.as_str());
            if let Err(e) = script.secrets_stay_out_of_argv(secret) {
                problems.push(format!("operation {name}: {e}"));
            }
            for (var, param) in &script.secret_files {
                if !operation.params.contains_key(param) {
                    problems.push(format!(
                        "operation {name}: secret_files {var} names {param}, which the catalog's \
                         {}/{name} does not take",
                        self.tower
                    ));
                }
            }
        }
        problems
    }

    /// What is odd, not wrong, about these scripts under `catalog`: a script's own timeout
    /// that differs from the catalog's (the shorter one stops it), operations on one side
    /// only.
    pub fn warnings(&self, catalog: &rct_bus::catalog::Catalog) -> Vec<String> {
        let mut warnings = Vec::new();
        let prefix = format!("{}/", self.tower);
        for (name, script) in &self.operations {
            let Some(operation) = catalog.operations.get(&format!("{prefix}{name}")) else {
                warnings.push(format!(
                    "operation {name} is not in the catalog ({prefix}{name}): nothing can run it"
                ));
                continue;
            };
            if let Some(own) = script.timeout
                && own != operation.timeout
            {
                let shorter = own.min(operation.timeout);
                warnings.push(format!(
                    "operation {name}: the script's timeout ({}) and the catalog's ({}) differ; \
                     the shorter, {}, stops it",
                    humantime::format_duration(own),
                    humantime::format_duration(operation.timeout),
                    humantime::format_duration(shorter)
                ));
            }
        }
        for name in catalog.operations.keys() {
            if let Some(op) = name.strip_prefix(&prefix)
                && !self.operations.contains_key(op)
            {
                warnings.push(format!(
                    "the catalog's {name} has no script here: commands for it will fail"
                ));
            }
        }
        warnings
    }

    /// A tower serving these operations, refusing to serve a catalog [`Scripts::problems`]
    /// finds fault with, and warning of what [`Scripts::warnings`] finds.
    pub fn tower(self) -> Tower {
        let checked = self.clone();
        let warned = self.clone();
        let mut tower = Tower::new(&self.tower)
            .check_catalog(move |c| checked.problems(c))
            .check_catalog(move |c| {
                for warning in warned.warnings(c) {
                    tracing::warn!(tower = %warned.tower, "{warning}");
                }
                Vec::new()
            });
        if let Some(target) = &self.target {
            tower = tower.cluster(target);
        }
        let env_allow = Arc::new(self.env_allow);
        for (name, script) in self.operations {
            let script = Arc::new(script);
            let env_allow = env_allow.clone();
            let plans = script.plan;
            let handler = move |ctx, params| {
                let script = script.clone();
                let env_allow = env_allow.clone();
                async move { script.run(ctx, params, &env_allow).await }
            };
            tower = if plans {
                tower.planning_operation(&name, handler)
            } else {
                tower.operation(&name, handler)
            };
        }
        tower
    }
}

impl Script {
    /// An item that starts with a value (`{value}`, `{value}-x`) must come after `--`, so no
    /// value is ever read as an option.
    fn check(&self) -> Result<(), String> {
        for var in self.secret_files.keys() {
            let mut chars = var.chars();
            let valid = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "secret_files: {var:?} is not an environment variable name (letters, digits \
                     and '_', not starting with a digit)"
                ));
            }
        }
        let mut after_separator = false;
        for item in &self.args {
            if item == "--" {
                after_separator = true;
            } else if starts_with_placeholder(item) && !after_separator {
                return Err(format!(
                    "argument {item} starts with a value before \"--\"; put \"--\" before \
                     positional values, or write it as --name={item}"
                ));
            }
        }
        Ok(())
    }

    /// Refuses an argv that would carry one of the `secret` parameters, unless allowed.
    fn secrets_stay_out_of_argv<'a>(
        &self,
        secret: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), String> {
        if self.secret_in_argv {
            return Ok(());
        }
        // An item that changes when only the secrets are filled in names one.
        let only_secrets: BTreeMap<String, String> = secret
            .into_iter()
            .map(|name| (name.to_owned(), String::new()))
            .collect();
        let named: Vec<&String> = self
            .args
            .iter()
            .filter(|item| fill(item, &only_secrets) != **item)
            .collect();
        if named.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{} puts a secret parameter into argv, where any local user can read it (ps); pass \
             it in `env` or `secret_files` instead, or say `secret_in_argv: true`",
            named
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ))
    }

    /// The argument list: one item per template item, whatever the values hold (no shell
    /// ever sees them).
    fn argv(&self, values: &BTreeMap<String, String>) -> Vec<String> {
        self.args.iter().map(|a| fill(a, values)).collect()
    }

    async fn run(
        &self,
        ctx: Context,
        params: Params,
        env_allow: &[String],
    ) -> Result<Outcome, Failure> {
        if let Some(expected) = &self.sha256 {
            let bytes = tokio::fs::read(&self.command).await.map_err(|e| {
                Failure::new(
                    "script_missing",
                    format!("cannot read {}: {e}", self.command.display()),
                )
            })?;
            let actual: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(Failure::new(
                    "script_changed",
                    format!(
                        "{} has SHA-256 {actual}, not the expected {expected}; not running it",
                        self.command.display()
                    ),
                ));
            }
        }
        let secret = params
            .iter()
            .map(|(n, _)| n)
            .filter(|n| params.is_secret(n));
        self.secrets_stay_out_of_argv(secret)
            .map_err(|e| Failure::new("secret_in_argv", format!("not run: {e}")))?;
        let values = placeholders(&ctx, &params);
        let args = self.argv(&values);
        // Removed when this returns, whatever happens to the script.
        let files = self.secret_files(&values)?;
        let mut command = tokio::process::Command::new(&self.command);
        command
            .args(&args)
            .env_clear()
            .envs(
                env_allow
                    .iter()
                    .filter_map(|k| std::env::var(k).ok().map(|v| (k, v))),
            )
            .envs(self.env.iter().map(|(k, v)| (k, fill(v, &values))))
            .envs(
                files
                    .iter()
                    .flat_map(|f| f.paths.iter().map(|(k, v)| (k, v))),
            )
            .env("RCT_COMMAND_ID", ctx.command_id())
            .env("RCT_DRY_RUN", if ctx.dry_run() { "1" } else { "0" })
            .env("RCT_MODE", mode(&ctx))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so cancellation reaches every child it starts.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.workdir {
            command.current_dir(dir);
        }
        let mut child = command.spawn().map_err(|e| {
            Failure::new(
                "spawn",
                format!("cannot start {}: {e}", self.command.display()),
            )
        })?;
        let pid = child.id().map(|id| Pid::from_raw(id as i32));

        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        // Readers stop at end of file, or when told to (what holds the pipes open outlived
        // every grace); either way they return what they read.
        let stop = CancellationToken::new();
        let reading_stdout =
            AbortOnDropHandle::new(tokio::spawn(read_stdout(ctx.clone(), stdout, stop.clone())));
        let reading_stderr =
            AbortOnDropHandle::new(tokio::spawn(read_stderr(ctx.clone(), stderr, stop.clone())));

        let limit = self.timeout.unwrap_or(Duration::MAX);
        let status = tokio::select! {
            status = child.wait() => Ok(status),
            _ = ctx.cancelled() => {
                stop_group(pid, &mut child).await;
                Err(Failure::new("cancelled", "stopped on request"))
            }
            _ = tokio::time::sleep(limit) => {
                stop_group(pid, &mut child).await;
                Err(Failure::new(
                    "timeout",
                    format!("did not finish within {}", humantime::format_duration(limit)),
                ))
            }
        };
        // The script is gone; what it started may not be, and may hold the pipes open.
        let mut readers = std::pin::pin!(async {
            (
                reading_stdout.await.unwrap_or_default(),
                reading_stderr.await.unwrap_or_default(),
            )
        });
        let early = tokio::time::timeout(READ_GRACE, &mut readers).await.ok();
        stop_leftovers(pid).await;
        let read = match early {
            Some(read) => read,
            None => match tokio::time::timeout(READ_GRACE, &mut readers).await {
                Ok(read) => read,
                Err(_) => {
                    // Something outside the group holds the pipes: stop reading.
                    stop.cancel();
                    readers.await
                }
            },
        };
        let (stdout, stderr_tail) = read;
        let status = status?.map_err(|e| Failure::new("wait", e.to_string()))?;
        if status.success() {
            let summary = match stdout.last {
                last if last.is_empty() => "exit 0".to_owned(),
                last => last,
            };
            let outcome = stdout
                .outputs
                .into_iter()
                .fold(Outcome::new(summary), |o, (name, value)| {
                    o.output(name, value)
                });
            Ok(outcome)
        } else {
            let how = match status.code() {
                Some(code) => format!("exited with status {code}"),
                None => "was killed by a signal".to_owned(),
            };
            Err(Failure::new(
                "exit_status",
                ctx.bound(
                    &if stderr_tail.is_empty() {
                        how
                    } else {
                        format!("{how}: {stderr_tail}")
                    },
                    0,
                ),
            ))
        }
    }
}

/// The files of `secret_files`, in a private folder removed on drop.
struct SecretFiles {
    _dir: tempfile::TempDir,
    paths: Vec<(String, PathBuf)>,
}

impl Script {
    fn secret_files(
        &self,
        values: &BTreeMap<String, String>,
    ) -> Result<Option<SecretFiles>, Failure> {
        use std::os::unix::fs::OpenOptionsExt as _;
        if self.secret_files.is_empty() {
            return Ok(None);
        }
        let fail = |e: std::io::Error| {
            Failure::new(
                "secret_file",
                format!("cannot write a secret file for the script: {e}"),
            )
        };
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::Builder::new()
            .prefix("rct-secrets-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .map_err(fail)?;
        let mut paths = Vec::new();
        for (var, param) in &self.secret_files {
            let value = values.get(param).ok_or_else(|| {
                Failure::new(
                    "secret_file",
                    format!("secret_files names {param}, which this operation does not take"),
                )
            })?;
            let path = dir.path().join(var);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(fail)?;
            std::io::Write::write_all(&mut file, value.as_bytes()).map_err(fail)?;
            paths.push((var.clone(), path));
        }
        Ok(Some(SecretFiles { _dir: dir, paths }))
    }
}

/// The most outputs (`::output` lines) one command records; later ones are logged.
const MAX_OUTPUTS: usize = 64;

/// What a script's stdout gave besides its log: its last line (the summary) and its
/// outputs.
#[derive(Debug, Default)]
struct Stdout {
    last: String,
    outputs: BTreeMap<String, String>,
}

/// Logs stdout (progress lines become progress, output lines outputs) and returns what the
/// outcome takes from it.
async fn read_stdout(
    ctx: Context,
    stdout: tokio::process::ChildStdout,
    stop: CancellationToken,
) -> Stdout {
    let mut lines = Lines::new(BufReader::new(stdout), ctx.line_limit());
    let mut read = Stdout::default();
    let reading = async {
        while let Some((line, cut)) = lines.next().await {
            if let Some((action, resource, detail)) = change_line(&line)
                && ctx.planning()
            {
                ctx.change(action, resource, detail);
                continue;
            }
            if let Some((name, value)) = output_line(&line)
                && (read.outputs.len() < MAX_OUTPUTS || read.outputs.contains_key(name))
            {
                read.outputs.insert(name.to_owned(), value.to_owned());
                continue;
            }
            match progress_line(&line) {
                Some((percent, message)) => ctx.progress(percent, message, ""),
                None => {
                    ctx.send_cut(proto::LogStream::Stdout, &line, cut).await;
                    read.last = ctx.bound(&line, cut);
                }
            }
        }
    };
    tokio::select! {
        () = reading => {}
        () = stop.cancelled() => {}
    }
    read
}

/// Logs stderr and returns its last lines, for a failure's message.
async fn read_stderr(
    ctx: Context,
    stderr: tokio::process::ChildStderr,
    stop: CancellationToken,
) -> String {
    let mut lines = Lines::new(BufReader::new(stderr), ctx.line_limit());
    let mut tail = std::collections::VecDeque::new();
    let read = async {
        while let Some((line, cut)) = lines.next().await {
            ctx.send_cut(proto::LogStream::Stderr, &line, cut).await;
            tail.push_back(ctx.bound(&line, cut));
            if tail.len() > STDERR_TAIL {
                tail.pop_front();
            }
        }
    };
    tokio::select! {
        () = read => {}
        () = stop.cancelled() => {}
    }
    tail.into_iter().collect::<Vec<_>>().join("\n")
}

/// Lines read as bytes, each at most `limit` bytes kept (the rest of it counted, not
/// held), converted lossily: no line is too long and no byte invalid enough to end the
/// reading, so the pipe is always drained.
struct Lines<R> {
    reader: R,
    limit: usize,
    line: Vec<u8>,
}

impl<R: AsyncBufRead + Unpin> Lines<R> {
    fn new(reader: R, limit: usize) -> Self {
        Self {
            reader,
            limit,
            line: Vec::new(),
        }
    }

    /// The next line (without its `\n` or `\r\n`) and how many of its bytes were left out;
    /// `None` at end of file. A read error ends the output like end of file (and is logged).
    async fn next(&mut self) -> Option<(String, u64)> {
        self.line.clear();
        let mut cut = 0u64;
        let mut any = false;
        loop {
            let available = match self.reader.fill_buf().await {
                Ok(available) => available,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the script's output");
                    break;
                }
            };
            if available.is_empty() {
                break;
            }
            any = true;
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            let room = self.limit.saturating_sub(self.line.len());
            let take = chunk.len().min(room);
            self.line.extend_from_slice(&chunk[..take]);
            cut += (chunk.len() - take) as u64;
            let used = newline.map_or(available.len(), |i| i + 1);
            self.reader.consume(used);
            if newline.is_some() {
                if cut == 0 && self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                break;
            }
        }
        if !any {
            return None;
        }
        // A character the cut split in two is cut whole.
        if cut > 0 {
            let partial = incomplete_tail(&self.line);
            self.line.truncate(self.line.len() - partial);
            cut += partial as u64;
        }
        Some((String::from_utf8_lossy(&self.line).into_owned(), cut))
    }
}

/// How many bytes at the end of `bytes` are an unfinished UTF-8 sequence.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue;
        }
        let needs = match b {
            0xF0..=0xF7 => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

/// What a script left running once it exited: TERM to its group, then KILL if it has not
/// gone within [`TERM_GRACE`].
async fn stop_leftovers(pid: Option<Pid>) {
    let Some(pid) = pid else { return };
    if killpg(pid, Signal::SIGTERM).is_err() {
        // No such group: nothing was left.
        return;
    }
    let until = tokio::time::Instant::now() + TERM_GRACE;
    while tokio::time::Instant::now() < until {
        if killpg(pid, None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = killpg(pid, Signal::SIGKILL);
}

/// TERM to the whole process group, then KILL after a grace period.
async fn stop_group(pid: Option<Pid>, child: &mut tokio::process::Child) {
    if let Some(pid) = pid {
        let _ = killpg(pid, Signal::SIGTERM);
        if tokio::time::timeout(TERM_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = killpg(pid, Signal::SIGKILL);
        }
        // Children that ignored TERM while their parent exited get KILL too.
        let _ = killpg(pid, Signal::SIGKILL);
    }
    let _ = child.wait().await;
}

/// Whether the item's first character comes from a value: a value there could start with
/// `-` and be read as an option.
fn starts_with_placeholder(item: &str) -> bool {
    item.starts_with('{') && item[1..].contains('}')
}

/// `::change <action> <resource> <detail…>`
fn change_line(line: &str) -> Option<(&str, &str, &str)> {
    let mut rest = line
        .strip_prefix("::change ")?
        .trim()
        .splitn(3, char::is_whitespace);
    let action = rest.next().filter(|a| !a.is_empty())?;
    let resource = rest.next().unwrap_or_default();
    Some((action, resource, rest.next().unwrap_or_default().trim()))
}

/// `::output <name> <value>`: one output of the outcome (a name of letters, digits, `_`
/// and `-`; the value may be empty).
fn output_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("::output ")?.trim_start();
    let (name, value) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let named = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    named.then_some((name, value.trim()))
}

/// `RCT_MODE`: `plan` while planning, `run` otherwise.
fn mode(ctx: &Context) -> &'static str {
    if ctx.planning() { "plan" } else { "run" }
}

/// `::progress <percent> <message>`
fn progress_line(line: &str) -> Option<(u32, String)> {
    let rest = line.strip_prefix("::progress ")?;
    let (percent, message) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((percent.trim().parse().ok()?, message.trim().to_owned()))
}

fn placeholders(ctx: &Context, params: &Params) -> BTreeMap<String, String> {
    let mut values: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| (k.to_owned(), display_value(v)))
        .collect();
    values.insert("justification".into(), ctx.justification().to_owned());
    values.insert("command_id".into(), ctx.command_id().to_owned());
    values.insert("dry_run".into(), ctx.dry_run().to_string());
    values.insert(
        "operator".into(),
        ctx.operator().map(|o| o.email.clone()).unwrap_or_default(),
    );
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_that_differs_from_the_catalogs_and_one_sided_operations_are_warned_of() {
        let catalog: rct_bus::catalog::Catalog = serde_yaml_ng::from_str(
            "towers: { w: { flavour: simple } }
operations:
  w/restart: { allowed_groups: [sre], timeout: 10m }
  w/scale: { allowed_groups: [sre], timeout: 2m }
  w/resize: { allowed_groups: [sre] }
",
        )
        .unwrap();
        let scripts: Scripts = serde_yaml_ng::from_str(
            "tower: w
operations:
  restart: { command: /bin/true, timeout: 5m }
  scale: { command: /bin/true, timeout: 2m }
  resize: { command: /bin/true }
  typo: { command: /bin/true }
",
        )
        .unwrap();
        let warnings = scripts.warnings(&catalog);
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
        assert!(
            warnings[0]
                .contains("restart: the script's timeout (5m) and the catalog's (10m) differ")
                && warnings[0].contains("the shorter, 5m, stops it"),
            "{warnings:#?}"
        );
        assert!(
            warnings[1].contains("operation typo is not in the catalog"),
            "{warnings:#?}"
        );
        let mut fewer = scripts.clone();
        fewer.operations.remove("resize");
        assert!(
            fewer
                .warnings(&catalog)
                .iter()
                .any(|w| w.contains("w/resize has no script here")),
            "{:#?}",
            fewer.warnings(&catalog)
        );
    }

    #[test]
    fn bare_values_must_follow_the_separator() {
        let script = |args: &[&str]| script(args.iter().map(|s| s.to_string()).collect());
        assert!(script(&["{name}"]).check().is_err());
        assert!(script(&["--name={name}"]).check().is_ok());
        assert!(script(&["--flag", "--", "{name}"]).check().is_ok());
        assert!(script(&["{name}-suffix"]).check().is_err());
        assert!(script(&["{a}{b}", "--"]).check().is_err());
        assert!(script(&["--", "{a}{b}"]).check().is_ok());
    }

    async fn read_all(input: &[u8], limit: usize) -> Vec<(String, u64)> {
        // A tiny buffer, so that lines span many reads.
        let mut lines = Lines::new(BufReader::with_capacity(3, input), limit);
        let mut out = Vec::new();
        while let Some(line) = lines.next().await {
            out.push(line);
        }
        out
    }

    #[tokio::test]
    async fn output_is_read_as_bytes_in_bounded_lines() {
        let read = read_all(b"one\r\nbad \xff byte\n\nlong line here\nlast", 8).await;
        assert_eq!(
            read,
            [
                ("one".into(), 0),
                ("bad \u{FFFD} by".into(), 2),
                (String::new(), 0),
                ("long lin".into(), 6),
                ("last".into(), 0),
            ]
        );
        // A character split by the cut is cut whole.
        assert_eq!(
            read_all("abcdeéf\n".as_bytes(), 6).await,
            [("abcde".into(), 3)]
        );
        assert!(read_all(b"", 8).await.is_empty());
    }

    #[test]
    fn unfinished_characters_are_found_at_the_end() {
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail("é".as_bytes()), 0);
        assert_eq!(incomplete_tail(&"é".as_bytes()[..1]), 1);
        assert_eq!(incomplete_tail(&"€".as_bytes()[..2]), 2);
        assert_eq!(incomplete_tail(&"😀".as_bytes()[..3]), 3);
        assert_eq!(incomplete_tail(b"\xff"), 0);
    }

    #[test]
    fn progress_lines_are_recognised() {
        assert_eq!(
            progress_line("::progress 40 half way"),
            Some((40, "half way".into()))
        );
        assert_eq!(progress_line("::progress 100"), Some((100, String::new())));
        assert_eq!(progress_line("::progress lots"), None);
        assert_eq!(progress_line("progress 40"), None);
    }

    #[test]
    fn output_lines_are_recognised() {
        assert_eq!(
            output_line("::output previous_weight 60"),
            Some(("previous_weight", "60"))
        );
        assert_eq!(
            output_line("::output note two words "),
            Some(("note", "two words"))
        );
        assert_eq!(output_line("::output empty"), Some(("empty", "")));
        assert_eq!(output_line("::output "), None);
        assert_eq!(output_line("::output a.b 1"), None);
        assert_eq!(output_line("output a 1"), None);
    }

    #[test]
    fn change_lines_are_recognised() {
        assert_eq!(
            change_line("::change promote db-2 replica → primary"),
            Some(("promote", "db-2", "replica → primary"))
        );
        assert_eq!(
            change_line("::change delete cart"),
            Some(("delete", "cart", ""))
        );
        assert_eq!(change_line("::change "), None);
        assert_eq!(change_line("change delete cart"), None);
    }

    fn script(args: Vec<String>) -> Script {
        Script {
            command: "x".into(),
            args,
            env: BTreeMap::new(),
            workdir: None,
            timeout: None,
            sha256: None,
            secret_files: BTreeMap::new(),
            secret_in_argv: false,
            plan: false,
        }
    }

    #[test]
    fn secrets_stay_out_of_argv_unless_allowed() {
        let mut s = script(vec!["--name={name}".into(), "--token={token}".into()]);
        let e = s.secrets_stay_out_of_argv(["token"]).unwrap_err();
        assert!(e.starts_with("--token={token} puts a secret"), "{e}");
        assert!(s.secrets_stay_out_of_argv(["other"]).is_ok());
        assert!(s.secrets_stay_out_of_argv([]).is_ok());
        s.secret_in_argv = true;
        assert!(s.secrets_stay_out_of_argv(["token"]).is_ok());
    }

    /// Any item a template may hold.
    fn template_item() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            option_item(),
            Just("--".to_owned()),
            Just("{a}".to_owned()),
            Just("{a}{b}".to_owned()),
            Just("{a}-suffix".to_owned()),
            Just("{unknown}".to_owned()),
        ]
    }

    /// Items that do not start with a value.
    fn option_item() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("--force".to_owned()),
            Just("-n".to_owned()),
            Just("plain".to_owned()),
            Just("--name={a}".to_owned()),
            Just("prefix-{b}".to_owned()),
        ]
    }

    /// Templates: mostly well-formed ones (options, `--`, then anything), and some arbitrary
    /// ones, which `check` must refuse unless they are safe.
    fn template() -> impl proptest::strategy::Strategy<Value = Vec<String>> {
        use proptest::collection::vec;
        use proptest::prelude::*;
        prop_oneof![
            3 => (vec(option_item(), 0..4), vec(template_item(), 0..4)).prop_map(|(a, b)| {
                let mut t = a;
                t.push("--".to_owned());
                t.extend(b);
                t
            }),
            1 => vec(template_item(), 0..8),
        ]
    }

    proptest::proptest! {
        /// Whatever operators put in parameters (shell metacharacters, spaces, newlines,
        /// option-like values, braces), a script gets exactly its template's argument
        /// count, and before `--` no value can make an item an option.
        #[test]
        fn values_never_change_the_argument_count_nor_add_options(
            template in template(),
            a in proptest::prelude::any::<String>(),
            b in "(-|--|;|\\$\\(|`|\\{a\\}| |\n)[ -~]{0,12}",
        ) {
            let script = script(template.clone());
            if script.check().is_err() {
                // Refused at load: it never runs.
                return Ok(());
            }
            let values: BTreeMap<String, String> =
                [("a".to_owned(), a.clone()), ("b".to_owned(), b.clone())].into();
            let argv = script.argv(&values);
            proptest::prop_assert_eq!(argv.len(), template.len());
            let separator = template.iter().position(|t| t == "--").unwrap_or(template.len());
            for (item, filled) in template.iter().zip(&argv).take(separator) {
                if filled.starts_with('-') {
                    proptest::prop_assert!(
                        item.starts_with('-'),
                        "{item:?} became the option {filled:?}"
                    );
                }
            }
            for (item, filled) in template.iter().zip(&argv) {
                if item == "{a}" {
                    proptest::prop_assert_eq!(filled, &a);
                }
            }
        }
    }
}
