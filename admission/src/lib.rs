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
//! - [`provision`]: the whole topology, including every tower's consumer, for an administrator.

pub mod catalog;
pub mod cli;
mod config;
pub mod decide;
mod error;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod refusals;
mod service;

pub use config::{Config, Role};
pub use error::Error;
pub use service::{AUTH_TOWER, Admission, CATALOG_TOWER, Reload, public_key_pem};

/// Connects nothing itself: serves with `client` in the configured role until `shutdown`
/// fires.
pub async fn run(
    config: Config,
    client: async_nats::Client,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), Error> {
    match config.role {
        Role::Notify => {
            let catalog = std::sync::Arc::new(catalog::load(&config.catalog)?);
            if let Some(listen) = config.telemetry.listen {
                let readiness = rct_streams::telemetry::Readiness::default();
                rct_streams::telemetry::serve(
                    listen,
                    Default::default(),
                    readiness,
                    client.clone(),
                )
                .map_err(|e| Error::Config(format!("cannot serve telemetry on {listen}: {e}")))?;
            }
            let js = config.nats.jetstream(client);
            let trust = std::sync::Arc::new(notify::trust_published(&js, &shutdown).await);
            tracing::info!(instance = %config.instance, "notifier ready");
            let (_, catalog) = tokio::sync::watch::channel(catalog);
            notify::Notifier::new(js, catalog, &config.notify, trust)
                .run(shutdown)
                .await;
            Ok(())
        }
        Role::All | Role::Decide => Admission::new(config, client)?.run(shutdown).await,
    }
}

/// Converges the server to the topology `config` describes: the streams and buckets,
/// admission's and the notifier's consumers, and one consumer per tower (per target of a
/// cluster tower) in the catalog. Run by an administrator's identity: admission's own NATS
/// user cannot create streams in production.
pub async fn provision(
    js: &async_nats::jetstream::Context,
    config: &Config,
) -> Result<rct_streams::topology::Report, Error> {
    use rct_bus::catalog::Flavour;
    use rct_streams::topology::{COMMAND_STREAM, ensure_consumer, tower_consumer};

    let catalog = catalog::load(&config.catalog)?;
    let mut report = rct_streams::provision(js, &config.streams).await?;
    for (name, spec) in &catalog.towers {
        let tower = rct_bus::Tower::new(name).map_err(|e| Error::Config(e.to_string()))?;
        let targets = match spec.flavour {
            Flavour::Cluster => spec
                .targets
                .iter()
                .map(|t| rct_bus::Target::new(t).map(Some))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Config(e.to_string()))?,
            Flavour::Simple => vec![None],
        };
        for target in targets {
            let desired = tower_consumer(&config.streams, &tower, target.as_ref());
            report
                .items
                .push(ensure_consumer(js, COMMAND_STREAM, desired).await?);
        }
    }
    Ok(report)
}
