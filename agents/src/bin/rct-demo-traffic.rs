//! `rct-demo-traffic`: the demo traffic tower, one cluster agent per `--target`, on a
//! simulated load balancer. For `rct dev`, `rct demo` and trying rct out.

use clap::Parser;
use rct_agents::cli::Common;
use rct_agents::demo::{LoadBalancer, traffic_tower};

/// rct demo traffic tower.
#[derive(Debug, Parser)]
#[command(name = "rct-demo-traffic", version, about)]
struct Args {
    /// A cluster to serve; repeat for several (one agent each).
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    #[command(flatten)]
    common: Common,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _logging = rct_streams::runtime::init_logging("rct-demo-traffic");
    rct_agents::withhold_panic_messages();
    rct_streams::runtime::exit("rct-demo-traffic", run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = args.common.load()?;
    // One connection serves every target: the inboxes are the tower's.
    config.scope_inbox("traffic", None);
    let client = config
        .nats
        .connect(&format!("rct-demo-traffic {}", config.instance), true)
        .await?;
    let lb = LoadBalancer::open(&config.nats.jetstream(client.clone()))
        .await
        .map_err(anyhow::Error::msg)?;
    let shutdown = rct_streams::runtime::shutdown_on_signal();
    let agents = args.targets.iter().map(|target| {
        let tower = traffic_tower(lb.clone(), target, args.targets.clone()).config(config.clone());
        tower.run(client.clone(), shutdown.clone())
    });
    for result in futures::future::join_all(agents).await {
        result?;
    }
    Ok(())
}
