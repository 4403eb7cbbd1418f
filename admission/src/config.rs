//! Admission's settings: defaults < file (`--config` / `RCT_CONFIG`) < `RCT_` environment
//! (`__` nesting, e.g. `RCT_NATS__SERVERS`) < flags.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::{IssuerConfig, ServiceConfig};

/// What one `rct-admission` process does.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Decides, and notifies when channels are configured (development, small setups).
    #[default]
    All,
    /// Decides only; a separate process notifies.
    Decide,
    /// Notifies only, with its own NATS identity (`notifier` in ops/nats/accounts.conf): needs
    /// the catalog and the channels, no signing key, no issuers.
    Notify,
}

/// A signing key retired for good (see [`Config::retired_keys`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetiredKey {
    /// Its public key (PEM).
    pub path: PathBuf,
    /// When it was retired (RFC 3339): events stored after this, and agent certificates
    /// that begin after it, do not verify with it.
    pub retired_at: String,
}

/// Everything admission needs to start.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How to reach NATS.
    pub nats: rct_streams::Connection,
    /// Decide, notify, or both.
    pub role: Role,
    /// This replica's name, recorded as the source of its events.
    pub instance: String,
    /// The operation catalog (YAML).
    pub catalog: PathBuf,
    /// Admission's Ed25519 signing key (PKCS#8 PEM).
    pub signing_key: PathBuf,
    /// Create `signing_key` (mode 0600) when it does not exist. For development.
    pub generate_key: bool,
    /// Public keys of earlier signing keys whose operator certificates are still accepted
    /// (key rotation).
    pub previous_keys: Vec<PathBuf>,
    /// Signing keys retired for good, each with when: nothing they sign is accepted any more,
    /// and what they signed before then stays verifiable (admission publishes them with its
    /// own, for readers to check the audit trail against).
    pub retired_keys: Vec<RetiredKey>,
    /// Identity providers whose id_tokens are accepted at login.
    pub issuers: Vec<IssuerConfig>,
    /// Mint id_tokens for anyone on `rct.auth.dev-token`. Development only.
    pub dev_issuer: bool,
    /// Automation identities: public keys with groups, no login.
    pub services: Vec<ServiceConfig>,
    /// How old a submission may be when admission first sees it.
    #[serde(with = "humantime_serde")]
    pub freshness: Duration,
    /// How far ahead of admission's clock a submission may be dated.
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Largest submission accepted, in bytes.
    pub max_payload: usize,
    /// Longest life of an operator certificate (never beyond the id_token's).
    #[serde(with = "humantime_serde")]
    pub certificate_ttl: Duration,
    /// Life of an agent's certificate (its key may sign its target's events). Agents renew it
    /// half-way, so admission may be away for half of it before their events go unsigned;
    /// an agent whose NATS credentials are revoked stops being able to renew, and its last
    /// certificate runs out within this.
    #[serde(with = "humantime_serde")]
    pub agent_certificate_ttl: Duration,
    /// Submissions decided at once by this replica.
    pub concurrency: usize,
    /// How long in-flight submissions may take to finish at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Create or converge the streams, buckets and consumers at start (development; in
    /// production an administrator provisions, and admission's NATS user cannot).
    pub provision: bool,
    /// Stream settings, used when `provision` is on.
    pub streams: rct_streams::Config,
    /// Webhook channels for the catalog's `notify` lists; no channels, no notifier.
    pub notify: crate::notify::Config,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`.
    pub telemetry: rct_streams::telemetry::Config,
    /// Reload the catalog when its file changes, looking this often (e.g. `2s`); off when
    /// unset. SIGHUP reloads it either way.
    #[serde(with = "humantime_serde")]
    pub watch_catalog: Option<Duration>,
    /// How long past its deadline and timeout a command still holds its locks when no outcome
    /// of it is on record (an agent that died with it); then the next command takes them over.
    /// Also how long a lock taken for a submission whose decision was never written (admission
    /// stopped in between) holds. Longer than the agents' cancel grace and the clocks' skew.
    #[serde(with = "humantime_serde")]
    pub lock_grace: Duration,
    /// How long the replica coordinating rollouts holds the job without renewing it: when it
    /// stops, another replica takes over within this long and carries on from the stream.
    #[serde(with = "humantime_serde")]
    pub rollout_lease: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: rct_streams::Connection {
                inbox_prefix: Some(INBOX_PREFIX.into()),
                ..rct_streams::Connection::default()
            },
            role: Role::All,
            instance: format!("admission-{}", std::process::id()),
            catalog: PathBuf::from("catalog.yaml"),
            signing_key: PathBuf::from("admission.key"),
            generate_key: false,
            previous_keys: Vec::new(),
            retired_keys: Vec::new(),
            issuers: Vec::new(),
            dev_issuer: false,
            services: Vec::new(),
            freshness: Duration::from_secs(120),
            clock_skew: Duration::from_secs(30),
            max_payload: 64 * 1024,
            certificate_ttl: Duration::from_secs(12 * 3600),
            agent_certificate_ttl: Duration::from_secs(12 * 3600),
            concurrency: 64,
            shutdown_grace: Duration::from_secs(10),
            provision: false,
            streams: rct_streams::Config::default(),
            notify: crate::notify::Config::default(),
            telemetry: rct_streams::telemetry::Config::default(),
            watch_catalog: None,
            lock_grace: rct_bus::lock::GRACE,
            rollout_lease: Duration::from_secs(10),
        }
    }
}

/// Prefix of admission's reply inboxes, so NATS permissions can scope them.
const INBOX_PREFIX: &str = "_INBOX_admission";
/// The notifier's, when it runs on its own.
const NOTIFIER_INBOX_PREFIX: &str = "_INBOX_notifier";

impl Config {
    /// The configuration as a YAML file that loads as this same configuration
    /// (`--print-config`).
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a configuration serializes")
    }

    /// Layers defaults < `file` (YAML or TOML by extension) < `env` (`RCT_` variables, `__`
    /// for nesting, lists comma-separated), then validates. `env` is passed in, so tests never
    /// touch the process environment.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, String> {
        let mut config: Config = rct_streams::runtime::load_config(file, env, &["nats.servers"])?;
        // A `nats:` section replaces the whole default connection; keep the role's own inbox
        // prefix unless it was set.
        config.nats.inbox_prefix.get_or_insert_with(|| {
            match config.role {
                Role::Notify => NOTIFIER_INBOX_PREFIX,
                Role::All | Role::Decide => INBOX_PREFIX,
            }
            .to_owned()
        });
        config.validate()?;
        Ok(config)
    }

    /// The development issuer mints a token for anyone who asks: it runs only where nobody
    /// else can ask, next to no real identity provider.
    fn dev_issuer_problem(&self) -> Result<(), String> {
        if !self.issuers.is_empty() {
            return Err(
                "dev_issuer is on next to real `issuers`: the development issuer mints tokens \
                 for anyone, so it never runs where real identities do; turn it off"
                    .into(),
            );
        }
        let remote: Vec<&str> = self
            .nats
            .servers
            .iter()
            .map(String::as_str)
            .filter(|url| !crate::identity::is_loopback(&server_host(url)))
            .collect();
        if !remote.is_empty() {
            return Err(format!(
                "dev_issuer is on, but NATS server(s) {} are not on this machine's loopback: \
                 the development issuer mints tokens for anyone who can reach it, so it runs \
                 only on a local development server; turn it off",
                remote.join(", ")
            ));
        }
        Ok(())
    }

    /// Checks the settings together; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.nats.servers.is_empty() {
            return Err("nats.servers is empty: name at least one NATS server".into());
        }
        if self.role == Role::Notify {
            if self.notify.channels.is_empty() {
                return Err("role notify needs at least one channel under `notify`".into());
            }
            return Ok(());
        }
        if self.issuers.is_empty() && !self.dev_issuer && self.services.is_empty() {
            return Err(
                "no way to authenticate anyone: configure `issuers`, `services`, or (for \
                 development) `dev_issuer: true`"
                    .into(),
            );
        }
        if self.dev_issuer {
            self.dev_issuer_problem()?;
        }
        if self.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        if self.max_payload < 1024 {
            return Err("max_payload must be at least 1024 bytes".into());
        }
        // An admitted command holds the submission and its decision's parameters: about twice
        // the submission, which RCT_CMD must be able to store.
        let commands = self
            .streams
            .commands
            .max_msg_size
            .unwrap_or(rct_streams::config::MAX_MESSAGE);
        if 2 * self.max_payload + 16 * 1024 > usize::try_from(commands).unwrap_or(0) {
            return Err(format!(
                "max_payload ({} bytes) is too large for streams.commands.max_msg_size ({commands} \
                 bytes): an admitted command holds its submission and parameters, about twice \
                 max_payload; raise the one or lower the other",
                self.max_payload
            ));
        }
        if self.agent_certificate_ttl < Duration::from_secs(120)
            || self.agent_certificate_ttl > rct_bus::provenance::MAX_CERTIFICATE_LIFE
        {
            return Err(format!(
                "agent_certificate_ttl must be between 2m and {} (readers refuse a certificate \
                 that claims a longer life)",
                humantime::format_duration(rct_bus::provenance::MAX_CERTIFICATE_LIFE)
            ));
        }
        if self.lock_grace < Duration::from_secs(1) {
            return Err("lock_grace must be at least 1s".into());
        }
        if self.rollout_lease < Duration::from_secs(1) {
            return Err("rollout_lease must be at least 1s".into());
        }
        if self.freshness < Duration::from_secs(5) {
            return Err("freshness must be at least 5s".into());
        }
        for (name, value) in [
            ("freshness", self.freshness),
            ("clock_skew", self.clock_skew),
            ("certificate_ttl", self.certificate_ttl),
            ("agent_certificate_ttl", self.agent_certificate_ttl),
            ("lock_grace", self.lock_grace),
            ("rollout_lease", self.rollout_lease),
        ] {
            if value > rct_bus::catalog::LONGEST_WAIT {
                return Err(format!(
                    "{name} must be at most {}, not {}",
                    humantime::format_duration(rct_bus::catalog::LONGEST_WAIT),
                    humantime::format_duration(value)
                ));
            }
        }
        if self.provision {
            self.streams.validate()?;
        }
        Ok(())
    }
}

/// The host of a NATS server URL (`nats://h:4222`, `tls://[::1]:4222`, `h:4222`, `h`), as a
/// URL parser reads it; empty when it is not one.
fn server_host(url: &str) -> String {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("nats://{url}")
    };
    reqwest::Url::parse(&url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admission.yaml");
        std::fs::write(
            &file,
            "catalog: /etc/rct/catalog.yaml\ndev_issuer: true\nfreshness: 5m\nnats:\n  servers: [nats://a:4222]\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&file),
            env(&[
                (
                    "RCT_NATS__SERVERS",
                    "nats://localhost:4222,nats://127.0.0.1:4223",
                ),
                ("RCT_CONCURRENCY", "8"),
                ("RCT_LOG", "debug"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(config.catalog, PathBuf::from("/etc/rct/catalog.yaml"));
        assert_eq!(config.freshness, Duration::from_secs(300));
        assert_eq!(
            config.nats.servers,
            ["nats://localhost:4222", "nats://127.0.0.1:4223"]
        );
        assert_eq!(config.concurrency, 8);
        assert_eq!(
            config.nats.inbox_prefix.as_deref(),
            Some("_INBOX_admission")
        );
    }

    /// The documented example is a working configuration: every key exists and every key and
    /// issuer in it can be used.
    #[test]
    fn the_example_configuration_loads() {
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/admission.example.yaml");
        let config = Config::load(Some(&file), env(&[])).unwrap();
        assert_eq!(config.instance, "admission-1");
        assert_eq!(config.notify.channels.len(), 1);
        crate::identity::Services::new(&config.services).unwrap();
        crate::identity::IdTokens::new(&config.issuers).unwrap();
    }

    /// `--print-config` prints YAML that loads as the same configuration: every setting of
    /// the example (issuers, services, channels, streams) survives the trip.
    #[test]
    fn the_printed_configuration_loads_as_the_same_one() {
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/admission.example.yaml");
        let config = Config::load(Some(&example), env(&[("RCT_CONCURRENCY", "9")])).unwrap();
        let printed = config.to_yaml();
        assert!(
            !printed.contains("Config {"),
            "not debug output:\n{printed}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("printed.yaml");
        std::fs::write(&file, &printed).unwrap();
        let again = Config::load(Some(&file), env(&[])).unwrap();
        assert_eq!(again, config, "{printed}");
    }

    #[test]
    fn mistakes_are_named() {
        let unknown = Config::load(
            None,
            env(&[("RCT_DEV_ISSUER", "true"), ("RCT_FRESHNES", "1m")]),
        )
        .unwrap_err();
        assert!(unknown.contains("unknown field `freshnes`"), "{unknown}");
        let nobody = Config::load(None, env(&[])).unwrap_err();
        assert!(nobody.contains("no way to authenticate anyone"), "{nobody}");
    }

    /// The development issuer mints a token for anyone who asks: one environment variable
    /// used to switch it on anywhere. It is refused next to real issuers, and wherever a NATS
    /// server is not on loopback.
    #[test]
    fn the_dev_issuer_runs_only_alone_and_on_loopback() {
        let dev = |servers: &str| {
            Config::load(
                None,
                env(&[("RCT_DEV_ISSUER", "true"), ("RCT_NATS__SERVERS", servers)]),
            )
        };
        for local in [
            "nats://127.0.0.1:4222",
            "localhost:4222",
            "tls://[::1]:4222",
            "nats://u:p@127.0.0.2:4222",
        ] {
            dev(local).unwrap_or_else(|e| panic!("{local}: {e}"));
        }
        for remote in [
            "nats://nats.prod:4222",
            "nats://10.0.0.5:4222",
            "nats://127.0.0.1:4222,nats://hub-1:4222",
            "tls://[2001:db8::1]:4222",
            "nats://localhost.evil.example:4222",
            "nats://evil:4222#@127.0.0.1",
            "nats://evil:4222/@127.0.0.1",
        ] {
            let error = dev(remote).unwrap_err();
            assert!(
                error.contains("not on this machine's loopback"),
                "{remote}: {error}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admission.yaml");
        std::fs::write(
            &file,
            concat!(
                "dev_issuer: true\n",
                "nats:\n  servers: [nats://127.0.0.1:4222]\n",
                "issuers:\n",
                "  - issuer: https://idp.example.com\n",
                "    audience: [rct]\n",
                "    algorithms: [RS256]\n",
                "    jwks_url: https://idp.example.com/jwks\n",
            ),
        )
        .unwrap();
        let error = Config::load(Some(&file), env(&[])).unwrap_err();
        assert!(error.contains("next to real `issuers`"), "{error}");
    }

    /// A huge freshness or certificate lifetime overflowed the clock arithmetic.
    #[test]
    fn durations_no_clock_can_hold_are_refused() {
        for name in ["FRESHNESS", "CLOCK_SKEW", "CERTIFICATE_TTL"] {
            let error = Config::load(
                None,
                env(&[
                    ("RCT_DEV_ISSUER", "true"),
                    (&format!("RCT_{name}"), "100000000years"),
                ]),
            )
            .unwrap_err();
            assert!(error.contains(&name.to_lowercase()), "{error}");
        }
    }
}
