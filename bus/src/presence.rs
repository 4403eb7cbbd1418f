//! What a live agent writes about itself in the `rct_agents` bucket (JSON), refreshed by
//! heartbeats; the entry expires with the bucket's TTL when the agent stops or dies.

use serde::{Deserialize, Serialize};

/// One live agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Presence {
    /// Its tower.
    pub tower: String,
    /// Its target (`_` for simple towers).
    pub target: String,
    /// This process's unique name (instance name plus a per-start suffix).
    pub instance: String,
    /// The machine it runs on.
    pub host: String,
    /// The agent's software version.
    pub version: String,
    /// When this process started (RFC 3339).
    pub started_at: String,
    /// The operations it serves.
    pub operations: Vec<String>,
    /// The catalog version it last validated against, if any.
    pub catalog_version: String,
}

impl Presence {
    /// The bucket key: `<tower>.<target>.<instance>`.
    pub fn key(&self) -> String {
        key(&self.tower, &self.target, &self.instance)
    }
}

/// The bucket key of an agent: `<tower>.<target>.<instance>`.
pub fn key(tower: &str, target: &str, instance: &str) -> String {
    format!("{tower}.{target}.{instance}")
}
