//! The flags of the agent binaries, and the configuration they produce. (Here rather than
//! in the binaries, so deployment files can be checked against them.)

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
    /// This agent's secret key file (age identities, from `rct-agent keygen`); repeat during
    /// a rotation (adds to the file's).
    #[arg(long = "secret-key")]
    pub secret_keys: Vec<PathBuf>,
    /// This agent's name.
    #[arg(long)]
    pub instance: Option<String>,
    /// Create the tower's consumer if missing (development).
    #[arg(long)]
    pub create_consumer: bool,
}

/// `rct-agent`: runs script-backed operations (YAML) as a tower.
#[derive(Debug, clap::Parser)]
#[command(
    name = "rct-agent",
    version,
    about = "rct script-runner agent",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct ScriptAgent {
    /// Something else than serving.
    #[command(subcommand)]
    pub task: Option<Task>,
    /// The operations: a scripts file (see docs/TOWERS.md).
    #[arg(long, required = true)]
    pub scripts: Option<PathBuf>,
    /// Serve this target only (cluster flavour; overrides the scripts file).
    #[arg(long)]
    pub target: Option<String>,
    /// Flags every agent takes.
    #[command(flatten)]
    pub common: Common,
}

/// What `rct-agent` does instead of serving.
#[derive(Debug, clap::Subcommand)]
pub enum Task {
    /// Make a secret key (an age X25519 identity) for secret parameters: writes it to a new
    /// file of mode 0600 and prints its public half, the recipient to list in the catalog.
    Keygen {
        /// The file to create (it must not exist).
        #[arg(long)]
        out: PathBuf,
    },
}

impl Task {
    /// Carries it out; what to print on stdout.
    pub fn run(&self) -> anyhow::Result<String> {
        use anyhow::Context as _;
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        match self {
            Task::Keygen { out } => {
                let keys = rct_bus::sealed::Keys::generate();
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(out)
                    .with_context(|| format!("cannot create {}", out.display()))?;
                file.write_all(keys.to_file_text().as_bytes())
                    .and_then(|()| file.sync_all())
                    .with_context(|| format!("cannot write {}", out.display()))?;
                Ok(keys.recipients().join("\n"))
            }
        }
    }
}

impl Common {
    /// The configuration: file and `RCT_` environment, then these flags; an error says it
    /// is the configuration that could not be loaded.
    pub fn load(&self) -> anyhow::Result<Config> {
        use anyhow::Context as _;
        self.layered()
            .map_err(anyhow::Error::msg)
            .context("cannot load the configuration")
    }

    fn layered(&self) -> Result<Config, String> {
        let mut config = Config::load(self.config.as_deref(), std::env::vars())?;
        if !self.servers.is_empty() {
            config.nats.servers = self.servers.clone();
        }
        config
            .trusted_keys
            .extend(self.trusted_keys.iter().cloned());
        config.secret_keys.extend(self.secret_keys.iter().cloned());
        if let Some(instance) = &self.instance {
            config.instance = instance.clone();
        }
        config.create_consumer |= self.create_consumer;
        config.validate()?;
        Ok(config)
    }
}
