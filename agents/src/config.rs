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
    /// How often `trusted_keys` are read again, so a rotation needs no restart (zero: never).
    /// A file that cannot be read keeps the keys trusted so far.
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: rct_streams::Connection::default(),
            instance: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "agent".into()),
            trusted_keys: Vec::new(),
            trust_reload: Duration::from_secs(30),
            concurrency: 4,
            shutdown_grace: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(10),
            heartbeat: Duration::from_secs(10),
            create_consumer: false,
            streams: rct_streams::Config::default(),
            telemetry: rct_streams::telemetry::Config::default(),
        }
    }
}

impl Config {
    /// Layers defaults < `file` < `env` (`RCT_` variables, `__` nesting), then validates.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, String> {
        let config: Config =
            rct_streams::runtime::load_config(file, env, &["nats.servers", "trusted_keys"])?;
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
        if self.heartbeat < Duration::from_secs(1) {
            return Err("heartbeat must be at least 1s".into());
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
