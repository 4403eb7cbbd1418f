//! `rct-admission`: decides who may do what. Thin: parse flags, load config, start logging,
//! connect, run until SIGINT or SIGTERM.

use anyhow::Context as _;
use clap::Parser;
use rct_admission::Config;
use rct_admission::cli::Args;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _logging = rct_streams::runtime::init_logging("rct-admission");
    rct_streams::runtime::exit("rct-admission", run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Listened for from the start: a SIGHUP while connecting must not end the process.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
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
    if args.print_public_key {
        #[allow(clippy::print_stdout)] // the one thing asked for
        {
            print!("{}", rct_admission::public_key_pem(&config)?);
        }
        return Ok(());
    }
    if args.print_config {
        #[allow(clippy::print_stdout)] // the one thing asked for
        {
            print!("{}", config.to_yaml());
        }
        return Ok(());
    }
    let client = config
        .nats
        .connect(&format!("rct-admission {}", config.instance), true)
        .await?;
    if args.provision {
        let js = config.nats.jetstream(client);
        let report = rct_admission::provision(&js, &config).await?;
        #[allow(clippy::print_stdout)] // the report is the output
        {
            print!("{report}");
        }
        return Ok(());
    }
    let shutdown = rct_streams::runtime::shutdown_on_signal();
    if config.role == rct_admission::Role::Notify {
        tokio::spawn(reload_on_hangup(hangups, None));
        rct_admission::run(config, client, shutdown).await?;
        return Ok(());
    }
    let admission = rct_admission::Admission::new(config, client)?;
    tokio::spawn(reload_on_hangup(hangups, Some(admission.clone())));
    admission.run(shutdown).await?;
    Ok(())
}

/// SIGHUP reloads the catalog (checked first; the one in force stays when it is not sound).
/// The notifier alone reads its catalog at start only, and says so.
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    admission: Option<rct_admission::Admission>,
) {
    while hangups.recv().await.is_some() {
        match &admission {
            Some(admission) => {
                admission.reload("SIGHUP").await;
            }
            None => tracing::warn!(
                "SIGHUP: the notifier reads the catalog at start only; restart it to use a new one"
            ),
        }
    }
}
