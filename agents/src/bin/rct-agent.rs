//! `rct-agent`: runs script-backed operations (YAML) as a tower. Thin: parse flags, load
//! config and scripts, start logging, connect, run until SIGINT or SIGTERM.

use clap::Parser;
use rct_agents::cli::ScriptAgent as Args;
use rct_agents::script::Scripts;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _logging = rct_streams::runtime::init_logging("rct-agent");
    rct_agents::withhold_panic_messages();
    rct_streams::runtime::exit("rct-agent", run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(task) = &args.task {
        #[allow(clippy::print_stdout)] // the recipient is the result
        {
            println!("{}", task.run()?);
        }
        return Ok(());
    }
    let mut config = args.common.load()?;
    let path = args.scripts.as_deref().expect("clap requires --scripts");
    let mut scripts = Scripts::load(path).map_err(anyhow::Error::msg)?;
    if args.target.is_some() {
        scripts.target = args.target;
    }
    config.scope_inbox(&scripts.tower, scripts.target.as_deref());
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
