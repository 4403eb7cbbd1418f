//! `rct-agent`: runs script-backed operations (YAML) as a tower. Thin: parse flags, load
//! config and scripts, start logging, connect, run until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use rct_agents::Config;
use rct_agents::script::Scripts;

/// rct script-runner agent.
#[derive(Debug, Parser)]
#[command(name = "rct-agent", version, about)]
struct Args {
    /// The operations: a scripts file (see `rct_agents::script`).
    #[arg(long)]
    scripts: PathBuf,
    /// Configuration file (YAML or TOML).
    #[arg(long, env = "RCT_CONFIG")]
    config: Option<PathBuf>,
    /// Serve this target only (cluster flavour; overrides the scripts file).
    #[arg(long)]
    target: Option<String>,
    /// NATS server URL; repeat for several (overrides the file).
    #[arg(long = "server")]
    servers: Vec<String>,
    /// Admission's public key (PEM); repeat during a key rotation (adds to the file's).
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<PathBuf>,
    /// This agent's name.
    #[arg(long)]
    instance: Option<String>,
    /// Create the tower's consumer if missing (development).
    #[arg(long)]
    create_consumer: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    rct_streams::runtime::init_logging();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rct-agent: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())
        .map_err(anyhow::Error::msg)
        .context("cannot load the configuration")?;
    if !args.servers.is_empty() {
        config.nats.servers = args.servers;
    }
    config.trusted_keys.extend(args.trusted_keys);
    if let Some(instance) = args.instance {
        config.instance = instance;
    }
    config.create_consumer |= args.create_consumer;
    config.validate().map_err(anyhow::Error::msg)?;
    let mut scripts = Scripts::load(&args.scripts).map_err(anyhow::Error::msg)?;
    if args.target.is_some() {
        scripts.target = args.target;
    }
    let client = config
        .nats
        .connect(
            &format!("rct-agent {} {}", scripts.tower, config.instance),
            true,
        )
        .await?;
    let shutdown = rct_streams::runtime::shutdown_on_signal();
    scripts.tower().config(config).run(client, shutdown).await?;
    Ok(())
}
