//! Settings of the JetStream topology, read from the components' configuration files.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the streams, consumers and buckets are provisioned. Every field has a default fit for a
/// single server; production raises `replicas` to 3 and keeps deny-delete and deny-purge on.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Replicas of every stream and bucket (1, 3 or 5).
    pub replicas: usize,
    /// Store on disk (`file`) or, for throwaway setups, in memory (`memory`).
    pub storage: Storage,
    /// Refuse message delete and purge on the audit streams. One-way: once on, never off.
    pub deny_delete: bool,
    /// See [`Config::deny_delete`].
    pub deny_purge: bool,
    /// `RCT_SUBMIT`: what operators asked for.
    pub submit: Stream,
    /// `RCT_CMD`: the admitted commands agents consume.
    pub commands: Stream,
    /// `RCT_EVT`: the audit log of everything that happened.
    pub events: Stream,
    /// Admission's shared durable consumer on `RCT_SUBMIT`.
    pub admission: Consumer,
    /// The towers' durable consumers on `RCT_CMD`.
    pub towers: Consumer,
    /// How long an agent's presence entry in `rct_agents` outlives its last heartbeat.
    #[serde(with = "humantime_serde")]
    pub agent_ttl: Duration,
    /// Catalog versions kept in `rct_catalog`.
    pub catalog_history: i64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            replicas: 1,
            storage: Storage::File,
            deny_delete: true,
            deny_purge: true,
            submit: Stream::default(),
            commands: Stream::default(),
            events: Stream::default(),
            // Admission acknowledges every submission it can record a decision for (garbage
            // included, as a rejection); it leaves one only when it cannot write. Such a
            // submission must wait out the outage, however long: never given up.
            admission: Consumer {
                max_ack_pending: 256,
                ..Consumer::default()
            },
            // A tower never gives a command up: a command it cannot take now (no handler
            // here, the catalog unreadable) waits, and its deadline ends the wait with an
            // `Expired` outcome. A bounded max_deliver would drop it with no outcome at all.
            towers: Consumer::default(),
            agent_ttl: Duration::from_secs(30),
            catalog_history: 10,
        }
    }
}

impl Config {
    /// Checks the settings together; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if ![1, 3, 5].contains(&self.replicas) {
            return Err(format!("replicas must be 1, 3 or 5, not {}", self.replicas));
        }
        for (name, stream) in [
            ("submit", &self.submit),
            ("commands", &self.commands),
            ("events", &self.events),
        ] {
            if stream.max_msg_size.is_some_and(|n| n < 4096) {
                return Err(format!(
                    "{name}.max_msg_size must be at least 4096 bytes (or unset for the default)"
                ));
            }
            if stream.duplicate_window.is_zero() {
                return Err(format!(
                    "{name}.duplicate_window must be longer than zero: retries are deduplicated within it"
                ));
            }
            if stream.max_consumers < 1 {
                return Err(format!(
                    "{name}.max_consumers must be at least 1 (the server has no \"unlimited\")"
                ));
            }
            if !stream.max_age.is_zero() && stream.max_age < stream.duplicate_window {
                return Err(format!(
                    "{name}.max_age must be zero (keep forever) or at least duplicate_window"
                ));
            }
        }
        // RCT_EVT is the claim journal: while a command can still be delivered from RCT_CMD,
        // its claim and outcome must still be in RCT_EVT, or it would run again.
        let (commands, events) = (self.commands.max_age, self.events.max_age);
        if !events.is_zero() && (commands.is_zero() || events < commands) {
            return Err(format!(
                "events.max_age ({}) must be zero (keep forever) or at least commands.max_age ({}): \
                 RCT_EVT holds the claims that keep a command from running twice",
                humantime_serde::re::humantime::format_duration(events),
                if commands.is_zero() {
                    "forever".to_owned()
                } else {
                    humantime_serde::re::humantime::format_duration(commands).to_string()
                }
            ));
        }
        for (name, consumer) in [("admission", &self.admission), ("towers", &self.towers)] {
            if consumer.ack_wait < Duration::from_secs(1) {
                return Err(format!("{name}.ack_wait must be at least 1s"));
            }
            if consumer.max_deliver < 1 && consumer.max_deliver != -1 {
                return Err(format!(
                    "{name}.max_deliver must be -1 (never give up) or at least 1"
                ));
            }
            if consumer.max_deliver > 0 && consumer.backoff.len() as i64 > consumer.max_deliver {
                return Err(format!(
                    "{name}.backoff has more steps than max_deliver allows"
                ));
            }
        }
        if self.towers.max_deliver != -1 {
            return Err(format!(
                "towers.max_deliver must be -1, not {}: a tower never gives a command up (the \
                 server would drop it with no outcome); its deadline ends the wait",
                self.towers.max_deliver
            ));
        }
        if self.agent_ttl < Duration::from_secs(1) {
            return Err("agent_ttl must be at least 1s".into());
        }
        if self.catalog_history < 1 || self.catalog_history > 64 {
            return Err("catalog_history must be between 1 and 64".into());
        }
        Ok(())
    }
}

/// Where a stream keeps its messages.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk: the only choice for audit data.
    File,
    /// In memory: lost on restart; for benchmarks and throwaway setups.
    Memory,
}

/// Retention of one stream.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Stream {
    /// How long messages are kept; zero keeps them forever (the audit default).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Publishes with the same `Nats-Msg-Id` within this window are stored once; it must
    /// exceed every publisher's retry horizon.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Consumers at once. Every watcher, replay and running command's cancel watch is an
    /// (ephemeral) consumer that lingers a few seconds after use; nats-server 2.15 otherwise
    /// caps a stream at 1000.
    pub max_consumers: i32,
    /// Largest message the stream stores, in bytes: the server refuses a larger one, and the
    /// publisher is told so. Unset: [`MAX_SUBMISSION`] for submissions (admission refuses
    /// what is over its `max_payload`, 64 KiB by default, and records the refusal),
    /// [`MAX_MESSAGE`] for commands and events.
    pub max_msg_size: Option<i32>,
}

/// The largest submission `RCT_SUBMIT` stores unless told otherwise.
pub const MAX_SUBMISSION: i32 = 128 * 1024;
/// The largest command or event `RCT_CMD` and `RCT_EVT` store unless told otherwise.
pub const MAX_MESSAGE: i32 = 256 * 1024;

impl Default for Stream {
    fn default() -> Self {
        Self {
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(10 * 60),
            max_consumers: 100_000,
            max_msg_size: None,
        }
    }
}

/// Delivery settings of a durable work consumer.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Consumer {
    /// Redelivery after this long without an ack or in-progress ack. With a `backoff`, the
    /// server takes the first backoff step instead.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries before a message is given up; -1 never gives up.
    pub max_deliver: i64,
    /// Waits between redeliveries; the last step repeats.
    #[serde(deserialize_with = "durations", serialize_with = "durations_out")]
    pub backoff: Vec<Duration>,
    /// Messages delivered but not yet acknowledged, at most.
    pub max_ack_pending: i64,
}

impl Default for Consumer {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            backoff: [30, 60, 120, 300].map(Duration::from_secs).to_vec(),
            max_ack_pending: 64,
        }
    }
}

/// A list of human-readable durations (`[30s, 1m]`).
fn durations_out<S: serde::Serializer>(list: &[Duration], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(list.len()))?;
    for d in list {
        seq.serialize_element(&humantime_serde::Serde::from(*d))?;
    }
    seq.end()
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let list: Vec<humantime_serde::Serde<Duration>> = Deserialize::deserialize(d)?;
    Ok(list.into_iter().map(|d| d.into_inner()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    fn parse(yaml: &str) -> Result<Config, config::ConfigError> {
        config::Config::builder()
            .add_source(config::File::from_str(yaml, config::FileFormat::Yaml))
            .build()?
            .try_deserialize()
    }

    #[test]
    fn settings_read_from_yaml_with_defaults_for_the_rest() {
        let config =
            parse(
            "replicas: 3\ncommands:\n  max_age: 30days\nevents:\n  max_age: 400days\ntowers:\n  backoff: [10s, 1m]\n",
        )
        .unwrap();
        assert_eq!(config.replicas, 3);
        assert_eq!(config.events.max_age, Duration::from_secs(400 * 86_400));
        assert_eq!(config.events.duplicate_window, Duration::from_secs(600));
        assert_eq!(
            config.towers.backoff,
            [Duration::from_secs(10), Duration::from_secs(60)]
        );
        assert_eq!(config.submit, Stream::default());
        config.validate().unwrap();
    }

    #[test]
    fn unknown_settings_are_refused() {
        let error = parse("replica: 3\n").unwrap_err().to_string();
        assert!(error.contains("unknown field `replica`"), "{error}");
    }

    #[test]
    fn bad_settings_say_what_to_change() {
        type Change = fn(&mut Config);
        let cases: [(Change, &str); 5] = [
            (|c| c.replicas = 2, "replicas must be 1, 3 or 5"),
            (
                |c| c.events.duplicate_window = Duration::ZERO,
                "events.duplicate_window",
            ),
            (|c| c.towers.max_deliver = 2, "towers.backoff"),
            (
                |c| c.towers.max_deliver = 10,
                "towers.max_deliver must be -1",
            ),
            (|c| c.catalog_history = 0, "catalog_history"),
        ];
        for (change, expected) in cases {
            let mut config = Config::default();
            change(&mut config);
            let message = config.validate().unwrap_err();
            assert!(message.contains(expected), "{message}");
        }
    }

    /// RCT_EVT is the claim journal: a command still in RCT_CMD whose claim and outcome were
    /// aged out of RCT_EVT would look unclaimed and run again.
    #[test]
    fn events_are_kept_at_least_as_long_as_commands() {
        let day = Duration::from_secs(86_400);
        let with = |commands: Duration, events: Duration| {
            let mut config = Config::default();
            config.commands.max_age = commands;
            config.events.max_age = events;
            config.validate()
        };
        for (commands, events) in [
            (Duration::ZERO, Duration::ZERO),
            (30 * day, Duration::ZERO),
            (30 * day, 30 * day),
            (30 * day, 400 * day),
        ] {
            with(commands, events).unwrap();
        }
        for (commands, events) in [(Duration::ZERO, 400 * day), (30 * day, 29 * day)] {
            let message = with(commands, events).unwrap_err();
            assert!(
                message.contains("events.max_age") && message.contains("commands.max_age"),
                "{message}"
            );
        }
    }
}
