//! The demo `traffic` tower: a cluster tower acting on a simulated load balancer, whose
//! weights live in the `rct_demo_lb` bucket (one key per cluster, 0..=100, 100 when unset).
//! It drains gradually with progress, honours cancellation and dry runs, and ends with the
//! weight table. `rct dev` and `rct demo` run one per target.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};

use crate::{Context, Failure, Outcome, Params, Tower};

/// The simulated load balancer's bucket.
pub const LB_BUCKET: &str = "rct_demo_lb";

/// How long each step of a gradual change takes.
const STEP: Duration = Duration::from_millis(400);
/// Steps in a gradual change.
const STEPS: u32 = 5;

/// The simulated load balancer.
#[derive(Clone, Debug)]
pub struct LoadBalancer {
    bucket: kv::Store,
}

impl LoadBalancer {
    /// Opens (creating if needed) the simulated load balancer.
    pub async fn open(js: &jetstream::Context) -> Result<Self, String> {
        let bucket = js
            .create_or_update_key_value(kv::Config {
                bucket: LB_BUCKET.into(),
                description: "rct demo: simulated load-balancer weights".into(),
                history: 5,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot open {LB_BUCKET}: {e}"))?;
        Ok(Self { bucket })
    }

    /// A cluster's weight (100 when never set).
    pub async fn weight(&self, cluster: &str) -> Result<u32, Failure> {
        let value = self.bucket.get(cluster).await.map_err(|e| {
            Failure::new(
                "unreachable",
                format!("the load balancer did not answer: {e}"),
            )
        })?;
        Ok(value
            .and_then(|v| String::from_utf8_lossy(&v).trim().parse().ok())
            .unwrap_or(100))
    }

    async fn set(&self, cluster: &str, weight: u32) -> Result<(), Failure> {
        self.bucket
            .put(cluster, weight.to_string().into())
            .await
            .map(|_| ())
            .map_err(|e| {
                Failure::new(
                    "unreachable",
                    format!("the load balancer did not answer: {e}"),
                )
            })
    }

    /// What the simulated health probe of `cluster` says: key `health-<cluster>` holds
    /// `unhealthy` or `unreachable` to make it say so (healthy when unset).
    pub async fn health(&self, cluster: &str) -> Result<bool, Failure> {
        let value = self
            .bucket
            .get(format!("health-{cluster}"))
            .await
            .map_err(|e| {
                Failure::new(
                    "unreachable",
                    format!("the load balancer did not answer: {e}"),
                )
            })?;
        match value.as_deref().map(String::from_utf8_lossy).as_deref() {
            Some("unhealthy") => Ok(false),
            Some("unreachable") => Err(Failure::new(
                "unreachable",
                format!("the health probe of {cluster} did not answer"),
            )),
            _ => Ok(true),
        }
    }

    /// Sets what the simulated health probe of `cluster` says (see [`Self::health`]):
    /// `healthy`, `unhealthy` or `unreachable`.
    pub async fn set_health(&self, cluster: &str, health: &str) -> Result<(), String> {
        self.bucket
            .put(format!("health-{cluster}"), health.to_owned().into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Every cluster's weight among `clusters`.
    pub async fn table(&self, clusters: &[String]) -> Result<BTreeMap<String, u32>, Failure> {
        let mut table = BTreeMap::new();
        for cluster in clusters {
            table.insert(cluster.clone(), self.weight(cluster).await?);
        }
        Ok(table)
    }

    /// Moves `cluster` from its weight to `to` in steps, reporting progress; stops early when
    /// cancelled (leaving the weight where it got to).
    async fn ramp(
        &self,
        ctx: &Context,
        cluster: &str,
        to: u32,
        step_time: Duration,
    ) -> Result<u32, Failure> {
        let from = self.weight(cluster).await?;
        ctx.log(format!(
            "{cluster}: weight {from} -> {to}{}",
            if ctx.dry_run() {
                " (dry run: nothing changes)"
            } else {
                ""
            }
        ));
        for step in 1..=STEPS {
            let weight =
                (from as i64 + (to as i64 - from as i64) * step as i64 / STEPS as i64) as u32;
            tokio::select! {
                _ = ctx.cancelled() => {
                    ctx.log(format!("{cluster}: stopped at weight {}", self.weight(cluster).await?));
                    return Err(Failure::new("cancelled", "stopped on request"));
                }
                _ = tokio::time::sleep(step_time) => {}
            }
            if !ctx.dry_run() {
                self.set(cluster, weight).await?;
            }
            ctx.progress(
                step * 100 / STEPS,
                format!("step {step}/{STEPS}"),
                format!("{cluster} at weight {weight}"),
            );
        }
        Ok(if ctx.dry_run() { from } else { to })
    }
}

/// Runs the demo traffic tower for one target.
pub fn traffic_tower(lb: LoadBalancer, target: &str, clusters: Vec<String>) -> Tower {
    // Every cluster's weight, and the one this command started from (`previous_weight`,
    // which the catalog's inverse sets back: rct undo).
    let outcome = |lb: LoadBalancer, clusters: Vec<String>, summary: String, previous: u32| async move {
        let table = lb.table(&clusters).await?;
        let mut outcome = Outcome::new(summary).output("previous_weight", previous.to_string());
        for (cluster, weight) in table {
            outcome = outcome.output(cluster, weight.to_string());
        }
        Ok::<_, Failure>(outcome)
    };
    let drain_lb = lb.clone();
    let drain_clusters = clusters.clone();
    let weights_lb = lb.clone();
    let weights_clusters = clusters.clone();
    let undrain_lb = lb.clone();
    let undrain_clusters = clusters;
    let health_lb = lb;
    Tower::new("traffic")
        .cluster(target)
        .operation("drain-cluster", move |ctx: Context, params: Params| {
            let (lb, clusters) = (drain_lb.clone(), drain_clusters.clone());
            async move {
                let cluster = params.str("cluster").unwrap_or(ctx.target()).to_owned();
                let keep = params.i64("keep_percent").unwrap_or(0).clamp(0, 100) as u32;
                let previous = lb.weight(&cluster).await?;
                let weight = lb.ramp(&ctx, &cluster, keep, STEP).await?;
                outcome(
                    lb,
                    clusters,
                    format!("{cluster} drained to weight {weight}"),
                    previous,
                )
                .await
            }
        })
        .operation("set-weights", move |ctx: Context, params: Params| {
            let (lb, clusters) = (weights_lb.clone(), weights_clusters.clone());
            async move {
                let cluster = params.str("cluster").unwrap_or(ctx.target()).to_owned();
                let to = params.i64("weight").unwrap_or(100).clamp(0, 100) as u32;
                let previous = lb.weight(&cluster).await?;
                let weight = lb.ramp(&ctx, &cluster, to, STEP / 4).await?;
                let summary = format!("{cluster} at weight {weight}");
                outcome(lb, clusters, summary, previous).await
            }
        })
        .operation("undrain-cluster", move |ctx: Context, params: Params| {
            let (lb, clusters) = (undrain_lb.clone(), undrain_clusters.clone());
            async move {
                let cluster = params.str("cluster").unwrap_or(ctx.target()).to_owned();
                let ramp = params.duration("ramp").unwrap_or(Duration::from_secs(5));
                // The demo compresses the ramp: a tenth of the asked time, at most 5 s.
                let step = (ramp / 10 / STEPS).min(Duration::from_secs(1));
                let previous = lb.weight(&cluster).await?;
                let weight = lb.ramp(&ctx, &cluster, 100, step).await?;
                let summary = format!("{cluster} back at weight {weight}");
                outcome(lb, clusters, summary, previous).await
            }
        })
        .operation("check-health", move |ctx: Context, params: Params| {
            let lb = health_lb.clone();
            async move {
                let cluster = params.str("cluster").unwrap_or(ctx.target()).to_owned();
                let healthy = lb.health(&cluster).await?;
                let word = if healthy { "healthy" } else { "unhealthy" };
                Ok::<_, Failure>(
                    Outcome::new(format!("{cluster} is {word}"))
                        .output("healthy", healthy.to_string()),
                )
            }
        })
}
