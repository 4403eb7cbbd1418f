//! `rct-admission`: decides who may do what. Thin: parse flags, load config, start logging,
//! connect, run until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use rct_admission::Config;
use tokio_util::sync::CancellationToken;

/// rct admission service.
#[derive(Debug, Parser)]
#[command(name = "rct-admission", version, about)]
struct Args {
    /// Configuration file (YAML or TOML).
    #[arg(long, env = "RCT_CONFIG")]
    config: Option<PathBuf>,
    /// The operation catalog (overrides the file).
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Admission's signing key, PKCS#8 PEM (overrides the file).
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// NATS server URL; repeat for several (overrides the file).
    #[arg(long = "server")]
    servers: Vec<String>,
    /// This replica's name.
    #[arg(long)]
    instance: Option<String>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rct-admission: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())
        .map_err(anyhow::Error::msg)
        .context("cannot load the configuration")?;
    if let Some(catalog) = args.catalog {
        config.catalog = catalog;
    }
    if let Some(key) = args.signing_key {
        config.signing_key = key;
    }
    if !args.servers.is_empty() {
        config.nats.servers = args.servers;
    }
    if let Some(instance) = args.instance {
        config.instance = instance;
    }
    config.validate().map_err(anyhow::Error::msg)?;
    if args.print_config {
        #[allow(clippy::print_stdout)] // the one thing asked for
        {
            println!("{config:#?}");
        }
        return Ok(());
    }
    let client = config
        .nats
        .connect(&format!("rct-admission {}", config.instance), true)
        .await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    rct_admission::run(config, client, shutdown).await?;
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

/// `RCT_LOG` filters (default `info`); `RCT_LOG_FORMAT=json` for JSON lines.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RCT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("RCT_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
