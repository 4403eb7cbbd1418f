//! An agent's metrics (`prometheus-client`): commands in flight, commands by outcome, handler
//! durations, heartbeats. Served with the others by [`rct_streams::telemetry`].

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Where {
    tower: String,
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Command {
    tower: String,
    target: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Finished {
    tower: String,
    target: String,
    operation: String,
    /// `succeeded`, `failed`, `cancelled`, or `refused` (not run: bad signature, expired…).
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Heartbeat {
    tower: String,
    target: String,
    /// `ok` or `failed`.
    result: String,
}

/// One tower's counters.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    tower: String,
    target: String,
    in_flight: Family<Where, Gauge>,
    finished: Family<Finished, Counter>,
    durations: Family<Command, Histogram>,
    heartbeats: Family<Heartbeat, Counter>,
    trusted_keys: Gauge,
}

impl Metrics {
    pub(crate) fn new(tower: &str, target: &str) -> Self {
        Self {
            tower: tower.to_owned(),
            target: target.to_owned(),
            in_flight: Family::default(),
            finished: Family::default(),
            // 10 ms to ~3 h.
            durations: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 4.0, 11))
            }),
            heartbeats: Family::default(),
            trusted_keys: Gauge::default(),
        }
    }

    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "rct_agent_commands_in_flight",
            "Commands this agent is running now",
            self.in_flight.clone(),
        );
        registry.register(
            "rct_agent_commands",
            "Commands this agent ended, by operation and outcome",
            self.finished.clone(),
        );
        registry.register(
            "rct_agent_handler_seconds",
            "How long handlers ran, from claim to outcome",
            self.durations.clone(),
        );
        registry.register(
            "rct_agent_trusted_keys",
            "Admission keys this agent trusts now (two during a key rotation)",
            self.trusted_keys.clone(),
        );
        registry.register(
            "rct_agent_heartbeats",
            "Presence heartbeats written (ok) or not (failed)",
            self.heartbeats.clone(),
        );
    }

    fn place(&self) -> Where {
        Where {
            tower: self.tower.clone(),
            target: self.target.clone(),
        }
    }

    pub(crate) fn started(&self) {
        self.in_flight.get_or_create(&self.place()).inc();
    }

    /// A command this agent ran ended with `outcome` after `took`.
    pub(crate) fn ended(&self, operation: &str, outcome: &str, took: Duration) {
        self.in_flight.get_or_create(&self.place()).dec();
        self.durations
            .get_or_create(&Command {
                tower: self.tower.clone(),
                target: self.target.clone(),
                operation: operation.to_owned(),
            })
            .observe(took.as_secs_f64());
        self.count(operation, outcome);
    }

    /// A command ended without running (`refused`, `expired`).
    pub(crate) fn count(&self, operation: &str, outcome: &str) {
        self.finished
            .get_or_create(&Finished {
                tower: self.tower.clone(),
                target: self.target.clone(),
                operation: operation.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub(crate) fn trusted_keys(&self, count: usize) {
        self.trusted_keys.set(count as i64);
    }

    pub(crate) fn heartbeat(&self, ok: bool) {
        self.heartbeats
            .get_or_create(&Heartbeat {
                tower: self.tower.clone(),
                target: self.target.clone(),
                result: if ok { "ok" } else { "failed" }.into(),
            })
            .inc();
    }
}
