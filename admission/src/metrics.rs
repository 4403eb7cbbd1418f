//! Admission's metrics (`prometheus-client`): decisions by outcome and rejection code,
//! decision latency, writes that failed, and submissions waiting. Served with the others by
//! [`rct_streams::telemetry`].

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One decision's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Decision {
    /// `admitted`, `rejected` or `cancel`.
    outcome: String,
    /// The rejection code (`forbidden`, `stale`, …), empty otherwise.
    code: String,
}

/// Admission's counters; cheap to update from any task.
#[derive(Clone, Debug)]
pub struct Metrics {
    decisions: Family<Decision, Counter>,
    latency: Histogram,
    failures: Counter,
    pending: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            decisions: Family::default(),
            // 1 ms to ~4 s.
            latency: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
            failures: Counter::default(),
            pending: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Adds these metrics to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "rct_admission_decisions",
            "Submissions decided, by outcome and rejection code",
            self.decisions.clone(),
        );
        registry.register(
            "rct_admission_decision_seconds",
            "Time from delivery of a submission to its recorded decision",
            self.latency.clone(),
        );
        registry.register(
            "rct_admission_write_failures",
            "Submissions whose decision or command could not be written (they come back)",
            self.failures.clone(),
        );
        registry.register(
            "rct_admission_submissions_pending",
            "Submissions stored but not yet decided (consumer lag, including in flight)",
            self.pending.clone(),
        );
    }

    /// Counts one recorded decision: `outcome` is `admitted`, `cancel` or `rejected:<code>`.
    pub fn decided(&self, outcome: &str, latency: Duration) {
        let (outcome, code) = outcome.split_once(':').unwrap_or((outcome, ""));
        self.decisions
            .get_or_create(&Decision {
                outcome: outcome.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.latency.observe(latency.as_secs_f64());
    }

    /// Counts a submission that could not be recorded.
    pub fn failed(&self) {
        self.failures.inc();
    }

    /// Sets how many submissions wait.
    pub fn pending(&self, count: u64) {
        self.pending.set(count.min(i64::MAX as u64) as i64);
    }

    /// Decisions so far with this outcome and code.
    pub fn decisions(&self, outcome: &str, code: &str) -> u64 {
        self.decisions
            .get_or_create(&Decision {
                outcome: outcome.to_owned(),
                code: code.to_owned(),
            })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_exposed_by_outcome_code_and_latency() {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.decided("admitted", Duration::from_micros(800));
        metrics.decided("rejected:forbidden", Duration::from_millis(30));
        metrics.decided("admitted", Duration::from_secs(3));
        assert_eq!(metrics.decisions("admitted", ""), 2);
        assert_eq!(metrics.decisions("rejected", "forbidden"), 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"rct_admission_decisions_total{outcome="rejected",code="forbidden"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("rct_admission_decision_seconds_count 3"),
            "{text}"
        );
        assert!(
            text.contains(r#"rct_admission_decision_seconds_bucket{le="0.001"} 1"#),
            "{text}"
        );
    }
}
