//! The flags every agent binary takes, and the configuration they produce.

use std::path::PathBuf;

use crate::Config;

/// Connection and identity flags shared by the agent binaries.
#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    /// Configuration file (YAML or TOML).
    #[arg(long, env = "RCT_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL; repeat for several (overrides the file).
    #[arg(long = "server")]
    pub servers: Vec<String>,
    /// Admission's public key (PEM); repeat during a key rotation (adds to the file's).
    #[arg(long = "trusted-key")]
    pub trusted_keys: Vec<PathBuf>,
    /// This agent's name.
    #[arg(long)]
    pub instance: Option<String>,
    /// Create the tower's consumer if missing (development).
    #[arg(long)]
    pub create_consumer: bool,
}

impl Common {
    /// The configuration: file and `RCT_` environment, then these flags.
    pub fn load(&self) -> Result<Config, String> {
        let mut config = Config::load(self.config.as_deref(), std::env::vars())?;
        if !self.servers.is_empty() {
            config.nats.servers = self.servers.clone();
        }
        config
            .trusted_keys
            .extend(self.trusted_keys.iter().cloned());
        if let Some(instance) = &self.instance {
            config.instance = instance.clone();
        }
        config.create_consumer |= self.create_consumer;
        config.validate()?;
        Ok(config)
    }
}
