//! A minimal Rust tower: copy this file to start your team's own.
//!
//! The catalog must have the operation (`hello/greet` here, a simple tower):
//!
//! ```yaml
//! towers:
//!   hello: { description: Says hello, flavour: simple }
//! operations:
//!   hello/greet:
//!     allowed_groups: [sre_team]
//!     params:
//!       name: { type: string, max_len: 64, default: world }
//! ```
//!
//! Run it against a NATS server where admission runs:
//!
//! ```sh
//! cargo run -p rct-agents --example minimal_tower -- \
//!     --server nats://127.0.0.1:4222 --trusted-key admission.pub --create-consumer
//! ```

use clap::Parser;
use rct_agents::cli::Common;
use rct_agents::{Context, Failure, Outcome, Params, Tower};

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
}

/// The handler: typed parameters in, an outcome or a failure out. Report progress and logs
/// through the context, stop when it is cancelled, change nothing on a dry run.
async fn greet(ctx: Context, params: Params) -> Result<Outcome, Failure> {
    let name = params.str("name").unwrap_or("world").to_owned();
    ctx.log(format!(
        "greeting {name} for {}",
        ctx.operator().map_or("?", |o| o.email.as_str())
    ));
    for step in 1..=3u32 {
        tokio::select! {
            _ = ctx.cancelled() => return Err(Failure::new("cancelled", "stopped on request")),
            _ = tokio::time::sleep(std::time::Duration::from_millis(300)) => {}
        }
        ctx.progress(step * 33, format!("step {step}"), "warming up");
    }
    if ctx.dry_run() {
        return Ok(Outcome::new(format!("would greet {name}")));
    }
    Ok(Outcome::new(format!("hello, {name}")).output("greeted", name))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _logging = rct_streams::runtime::init_logging("hello-tower");
    let config = args.common.load()?;
    let client = config.nats.connect("hello tower", true).await?;
    Tower::new("hello")
        .operation("greet", greet)
        .config(config)
        .run(client, rct_streams::runtime::shutdown_on_signal())
        .await?;
    Ok(())
}
