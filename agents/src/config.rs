//! An agent's settings: defaults < file < `RCT_` environment < flags, like admission's.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// What every tower needs to run.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How to reach NATS (agents connect outbound only; `domain` when behind a leaf node).
    pub nats: rct_streams::Connection,
    /// This agent's name; each process adds a unique suffix, so a restarted agent is told
    /// apart from the one that died.
    pub instance: String,
    /// Admission's public keys: PEM files, each holding one or more keys (a bundle during a
    /// key rotation). Commands signed by anything else are refused.
    pub trusted_keys: Vec<PathBuf>,
    /// This agent's secret keys: age identity files (`rct-agent keygen` writes one), each
    /// holding one or more `AGE-SECRET-KEY-1…` lines. Secret parameters sealed to their public
    /// halves (the tower's `recipients` in the catalog) are opened with them. Keep the old key
    /// beside the new one while rotating; removing it makes what was sealed to it unreadable.
    pub secret_keys: Vec<PathBuf>,
    /// How often `trusted_keys` and `secret_keys` are read again, so a rotation needs no
    /// restart (zero: never). A file that cannot be read keeps the keys loaded so far.
    #[serde(with = "humantime_serde")]
    pub trust_reload: Duration,
    /// Commands run at once.
    pub concurrency: usize,
    /// How long running commands may take to finish at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// After a cancel request or a timeout, how long the handler has to stop before its
    /// outcome is recorded without it.
    #[serde(with = "humantime_serde")]
    pub cancel_grace: Duration,
    /// How long a command that cannot be taken now (no handler here, the catalog or the
    /// journal unreadable, another live agent holds it) waits before it is delivered again.
    /// It is never given up: its deadline ends the wait with `Expired`.
    #[serde(with = "humantime_serde")]
    pub retry_pause: Duration,
    /// How often presence is refreshed in `rct_agents` (its TTL is the bucket's).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Create or converge the tower's consumer at start (development; in production an
    /// administrator creates it and agents may only bind).
    pub create_consumer: bool,
    /// Consumer settings, used with `create_consumer`.
    pub streams: rct_streams::Config,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`.
    pub telemetry: rct_streams::telemetry::Config,
    /// How much of a command's output (log lines, progress) reaches the event stream.
    pub output: Output,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: rct_streams::Connection::default(),
            instance: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .map_or_else(|| "agent".into(), |host| instance_name(&host)),
            trusted_keys: Vec::new(),
            secret_keys: Vec::new(),
            trust_reload: Duration::from_secs(30),
            concurrency: 4,
            shutdown_grace: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(10),
            heartbeat: Duration::from_secs(10),
            retry_pause: Duration::from_secs(5),
            create_consumer: false,
            streams: rct_streams::Config::default(),
            telemetry: rct_streams::telemetry::Config::default(),
            output: Output::default(),
        }
    }
}

/// Bounds on what one command's output puts in `RCT_EVT` (which keeps everything) and holds
/// in the agent's memory. Lines past a limit are cut or counted, never allowed to stall the
/// command: its outcome always comes.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Output {
    /// Longest line kept, in bytes; the rest is cut and the line ends `…truncated N bytes`.
    /// Every other text an event carries (progress, summary, failure message) is held to it
    /// too.
    pub max_line: usize,
    /// Largest log event, in bytes of lines: lines that come faster than they are published
    /// are packed, several to an event (joined with `\n`), up to this size.
    pub max_event: usize,
    /// Lines recorded per command. Past this (or `max_bytes`) the output is counted, not
    /// published, but for its last `tail_lines`; one event says how many lines were elided.
    pub max_lines: u64,
    /// Bytes of lines recorded per command (see `max_lines`).
    pub max_bytes: u64,
    /// Lines kept from the end of an output that went over its budget, recorded at the end.
    pub tail_lines: usize,
    /// Lines and progress updates waiting to be published, per command. When it is full a
    /// script's output waits (the script blocks on its pipe until there is room), and a line
    /// a handler logs is dropped and counted.
    pub queue: usize,
    /// After the handler ends, how long what it queued may take to publish before the rest
    /// is dropped (counted, and the drop recorded if possible) and the outcome is written.
    #[serde(with = "humantime_serde")]
    pub flush_timeout: Duration,
}

impl Default for Output {
    fn default() -> Self {
        Self {
            max_line: 4 * 1024,
            max_event: 16 * 1024,
            max_lines: 10_000,
            max_bytes: 1024 * 1024,
            tail_lines: 20,
            queue: 256,
            flush_timeout: Duration::from_secs(10),
        }
    }
}

impl Output {
    /// Checks the limits together.
    pub fn validate(&self) -> Result<(), String> {
        if !(256..=256 * 1024).contains(&self.max_line) {
            return Err("output.max_line must be between 256 bytes and 256 KiB".into());
        }
        if self.max_event < self.max_line || self.max_event > 512 * 1024 {
            return Err(
                "output.max_event must be at least output.max_line and at most 512 KiB".into(),
            );
        }
        if self.queue == 0 {
            return Err("output.queue must be at least 1".into());
        }
        if self.flush_timeout.is_zero() {
            return Err("output.flush_timeout must be more than zero".into());
        }
        Ok(())
    }
}

impl Config {
    /// Layers defaults < `file` < `env` (`RCT_` variables, `__` nesting), then validates.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, String> {
        let config: Config = rct_streams::runtime::load_config(
            file,
            env,
            &["nats.servers", "trusted_keys", "secret_keys"],
        )?;
        config.validate()?;
        Ok(config)
    }

    /// Scopes the reply inboxes to one tower and target (`_INBOX_agent.<tower>.<target>`,
    /// `_` for a simple tower) unless the configuration names a prefix: NATS permissions
    /// then keep every agent from reading another's replies, pulled commands included.
    pub fn scope_inbox(&mut self, tower: &str, target: Option<&str>) {
        self.nats
            .inbox_prefix
            .get_or_insert_with(|| format!("_INBOX_agent.{tower}.{}", target.unwrap_or("_")));
    }

    /// Checks the settings together.
    pub fn validate(&self) -> Result<(), String> {
        if self.nats.servers.is_empty() {
            return Err("nats.servers is empty: name at least one NATS server".into());
        }
        if self.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        if self.retry_pause < Duration::from_millis(100)
            || self.retry_pause > Duration::from_secs(60)
        {
            return Err("retry_pause must be between 100ms and 1m".into());
        }
        self.output.validate()?;
        if self.heartbeat < Duration::from_secs(1) {
            return Err("heartbeat must be at least 1s".into());
        }
        if self.heartbeat * 2 > self.streams.agent_ttl {
            return Err(format!(
                "heartbeat ({}) must be at most half of streams.agent_ttl ({}): an agent whose \
                 presence may lapse between heartbeats starts nothing",
                humantime::format_duration(self.heartbeat),
                humantime::format_duration(self.streams.agent_ttl)
            ));
        }
        if rct_bus::Token::new("instance", self.instance.clone()).is_err() {
            return Err(format!(
                "instance {:?} may only contain letters, digits, '_' and '-'",
                self.instance
            ));
        }
        Ok(())
    }
}

/// An instance name from a host name: every character a subject token may not hold (the dots
/// of a fully qualified name) becomes `-`.
fn instance_name(host: &str) -> String {
    let name: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() {
        "agent".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_name_with_dots_makes_a_valid_instance() {
        for host in ["node-1.prod.example.com", "höst.local", "", "plain"] {
            let config = Config {
                instance: instance_name(host),
                ..Config::default()
            };
            config
                .validate()
                .unwrap_or_else(|e| panic!("{host:?}: {e}"));
        }
        assert_eq!(
            instance_name("node-1.prod.example.com"),
            "node-1-prod-example-com"
        );
    }
}
