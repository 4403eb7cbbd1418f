//! rct admission: the one place that decides who may do what in production.
//!
//! Admission verifies who is asking (operator certificates bound to session keys, service
//! identities), checks the operation catalog (allowed groups, typed parameters,
//! justification), records every decision as an event, and republishes approved commands,
//! signed with its own key, onto the owning tower's subjects. It fails closed: if it cannot
//! write the decision, it does not acknowledge the submission.
//!
//! - [`Config`]: settings, layered from file, environment and flags.
//! - [`catalog`]: the operation catalog loaded from YAML, problems pointed at file and line.
//! - [`identity`]: id_tokens, operator certificates, service identities, the dev issuer.
//! - [`decide`]: the decision for one submission, pure apart from the clock.
//! - [`Admission`]: the service; [`run`] serves until shutdown.
//! - [`notify`]: webhook notifications when operations start, end or are refused.
//! - [`metrics`]: decision counters and latency.

pub mod catalog;
mod config;
pub mod decide;
mod error;
pub mod identity;
pub mod metrics;
pub mod notify;
mod service;

pub use config::Config;
pub use error::Error;
pub use service::{AUTH_TOWER, Admission};

/// Connects nothing itself: serves with `client` until `shutdown` fires.
pub async fn run(
    config: Config,
    client: async_nats::Client,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), Error> {
    Admission::new(config, client)?.run(shutdown).await
}
