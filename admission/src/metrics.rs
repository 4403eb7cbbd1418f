//! Decision counters and latency, kept in atomics so the service never waits on them; the
//! operations side exposes them (Prometheus) from [`Metrics::snapshot`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the decision-latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Counts of decisions by outcome, and how long they took.
#[derive(Debug, Default)]
pub struct Metrics {
    // A mutex, not atomics per key: one short critical section per decision, and the set of
    // keys (rejection codes) is open.
    inner: Mutex<Snapshot>,
}

/// A copy of the counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Decisions by outcome: `admitted`, `cancel`, or `rejected:<code>`.
    pub decisions: BTreeMap<String, u64>,
    /// Decision latency histogram: counts per bucket of [`LATENCY_BUCKETS`] (cumulative
    /// counts are derived when exposed), plus the overflow bucket.
    pub latency_buckets: [u64; 11],
    /// Sum of all decision latencies, seconds.
    pub latency_sum: f64,
    /// Submissions that could not be recorded (not acknowledged, will come back).
    pub failures: u64,
}

impl Metrics {
    /// Counts one recorded decision.
    pub fn decided(&self, outcome: &str, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|upper| seconds <= *upper)
            .unwrap_or(LATENCY_BUCKETS.len());
        // The lock is never held across an await or a panic point.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *inner.decisions.entry(outcome.to_owned()).or_default() += 1;
        inner.latency_buckets[bucket] += 1;
        inner.latency_sum += seconds;
    }

    /// Counts a submission that could not be recorded.
    pub fn failed(&self) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failures += 1;
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> Snapshot {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_counted_by_outcome_and_bucket() {
        let metrics = Metrics::default();
        metrics.decided("admitted", Duration::from_micros(800));
        metrics.decided("rejected:forbidden", Duration::from_millis(30));
        metrics.decided("admitted", Duration::from_secs(3));
        let s = metrics.snapshot();
        assert_eq!(s.decisions["admitted"], 2);
        assert_eq!(s.decisions["rejected:forbidden"], 1);
        assert_eq!(s.latency_buckets[0], 1);
        assert_eq!(s.latency_buckets[5], 1);
        assert_eq!(s.latency_buckets[10], 1);
        assert!((s.latency_sum - 3.0308).abs() < 1e-9);
    }
}
