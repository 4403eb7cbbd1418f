//! `rct dev` and `rct demo`.

use std::path::PathBuf;

use rct_bus::OperationName;

use crate::commands::{approve, history, inspect, login, run, undo};
use crate::exit::{Error, Exit, Result};
use crate::home::{Contexts, Home};
use crate::remote::Global;
use crate::render::Output;
use crate::session::Session;
use crate::stack::{Own, Stack};

/// Run the whole system locally, in the foreground, until Ctrl-C.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where the stack keeps its state (JetStream, keys, scripts).
    #[arg(long, default_value = ".rct/dev")]
    pub dir: PathBuf,
    /// The NATS port.
    #[arg(long, default_value_t = 4222)]
    pub port: u16,
    /// Serve this catalog instead of the demo's (reloaded when it changes; the demo towers
    /// run for those of its towers they are).
    #[arg(long, value_name = "FILE")]
    pub catalog: Option<PathBuf>,
    /// Run an agent for this scripts file (see docs/TOWERS.md), restarted when it changes;
    /// repeat for several.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub scripts: Vec<PathBuf>,
}

/// Runs `rct dev`.
pub async fn dev(home: &Home, args: DevArgs) -> Result {
    // Listening from the start: a signal while starting stops what was started.
    let mut stop = Box::pin(stop_signal()?);
    // Warnings of the in-process services (a script's timeout that differs from the
    // catalog's, an agent's refusal) reach the terminal; RCT_LOG says more.
    // (Admission's warnings are about being a dev stack, and a refused reload is said below.)
    let _logging = rct_streams::runtime::init_logging_at("rct-dev", "warn,rct_admission=error");
    let own = Own {
        catalog: args.catalog.clone(),
        scripts: args.scripts.clone(),
    };
    let mut stack = tokio::select! {
        stack = Stack::start_with(&args.dir, args.port, &own) => stack?,
        signal = &mut stop => {
            say(&format!("{signal} while starting: stopped"));
            return Ok(Exit::Ok);
        }
    };
    use_context(home, "dev", &stack.url)?;
    crate::commands::context::pin(home, "dev", &stack.dir.join("admission.pub"))?;
    let towers = match &args.catalog {
        None => "traffic agents for prod-1..4, workloads".to_owned(),
        Some(catalog) => format!(
            "the catalog {} (reloaded when it changes){}",
            catalog.display(),
            if args.scripts.is_empty() {
                String::new()
            } else {
                format!(
                    ", agents for {} (restarted when they change)",
                    args.scripts
                        .iter()
                        .map(|s| s.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ),
    };
    let first = match &args.catalog {
        None => "rct traffic drain-cluster --cluster prod-1 --justification SRE-101",
        Some(_) => "rct <tower> <operation> --help",
    };
    eprintln!(
        "rct dev is running: NATS at {url}, admission (dev issuer on), {towers}.\n\
         State in {dir}; admission's public key in {dir}/admission.pub. Context \"dev\" is now \
         current; in another terminal:\n\n  \
         rct login --dev --user alice --groups sre_team\n  \
         rct ops\n  \
         {first}\n\n\
         Ctrl-C stops everything.",
        url = stack.url,
        dir = stack.dir.display()
    );
    let signal = loop {
        tokio::select! {
            signal = &mut stop => break signal,
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                for line in stack.reload().await.said {
                    say(&format!("rct dev: {line}"));
                }
            }
        }
    };
    say(&format!(
        "{signal}: stopping the agents, then admission, then nats-server…"
    ));
    stack.stop().await;
    say("stopped");
    Ok(Exit::Ok)
}

/// A line on stderr, which may be gone (the terminal hung up): never a panic.
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Resolves at SIGINT, SIGTERM or SIGHUP with its name; listening starts at once.
fn stop_signal() -> Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let listen =
        |kind| signal(kind).map_err(|e| Error::usage(format!("cannot listen for signals: {e}")));
    let (mut int, mut term, mut hup) = (
        listen(SignalKind::interrupt())?,
        listen(SignalKind::terminate())?,
        listen(SignalKind::hangup())?,
    );
    Ok(async move {
        tokio::select! {
            _ = int.recv() => "interrupted",
            _ = term.recv() => "terminated",
            _ = hup.recv() => "hung up",
        }
    })
}

fn use_context(home: &Home, name: &str, url: &str) -> Result<()> {
    let mut contexts: Contexts = home.contexts()?;
    contexts.contexts.insert(
        name.to_owned(),
        rct_streams::Connection::to([url.to_owned()]),
    );
    contexts.current = Some(name.to_owned());
    home.save_contexts(&contexts)
}

/// The demo: a local stack, a drain with live progress, the timeline and history, and a refused
/// attempt by someone outside the allowed groups. Cleans up after itself.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The NATS port (default: a free one).
    #[arg(long)]
    pub port: Option<u16>,
}

/// Runs `rct demo`.
pub async fn demo(args: DemoArgs) -> Result {
    let scratch = tempfile::Builder::new()
        .prefix("rct-demo-")
        .tempdir()
        .map_err(|e| Error::usage(format!("cannot make a scratch folder: {e}")))?;
    let port = match args.port {
        Some(port) => port,
        None => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| Error::usage(format!("no free port: {e}")))?,
    };
    step("starting nats-server, admission and the demo towers (traffic prod-1..4, workloads)");
    let stack = Stack::start(&scratch.path().join("stack"), port).await?;
    let home = Home::at(&scratch.path().join("home"));
    use_context(&home, "demo", &stack.url)?;
    crate::commands::context::pin(&home, "demo", &stack.dir.join("admission.pub"))?;
    let result = Box::pin(script(&home)).await;
    step("stopping the stack");
    stack.stop().await;
    result
}

/// Logs the demo's home in as `user` of `group`, with the development issuer.
async fn log_in(
    home: &Home,
    remote: &crate::remote::Remote,
    user: &str,
    group: &str,
) -> Result<()> {
    let token = login::dev_token(&remote.client, user, &[group.into()]).await?;
    login::exchange(&remote.client, &token)
        .await?
        .save(home, "demo")?;
    Ok(())
}

/// A failover that needs two approvers, who approve the plan its agent made.
async fn failover(home: &Home, remote: &crate::remote::Remote) -> Result {
    let global = Global::default();
    let name: OperationName = "workloads/failover".parse().expect("a valid name");
    let params = || {
        vec![
            ("namespace".into(), "shop".into()),
            ("deployment".into(), "cart".into()),
        ]
    };
    step("$ rct plan workloads failover --namespace shop --deployment cart -j DEMO-3");
    let fire = run::Fire {
        justification: Some("DEMO-3".into()),
        plan: true,
        ..run::Fire::default()
    };
    let (planned, _) = run::fire_with_id(home, &global, &name, params(), &fire).await?;
    if planned != Exit::Ok {
        return Err(Error::usage(format!("the demo plan ended {planned:?}")));
    }
    step(
        "$ rct workloads failover --namespace shop --deployment cart -j DEMO-3 --detach   \
         # two others must approve its plan",
    );
    let fire = run::Fire {
        justification: Some("DEMO-3".into()),
        detach: true,
        ..run::Fire::default()
    };
    let (_, id) = run::fire_with_id(home, &global, &name, params(), &fire).await?;
    for (user, group) in [("bob", "sre_leads"), ("carol", "app_leads")] {
        step(&format!("$ rct login --dev --user {user} --groups {group}"));
        log_in(home, remote, user, group).await?;
        step(&format!("$ rct approve {id} --yes"));
        // Its agent makes the plan in a moment: until then there is nothing to sign.
        let started = std::time::Instant::now();
        loop {
            let args = approve::Args {
                id: id.to_string(),
                justification: None,
                yes: true,
            };
            match approve::run(home, &global, args, false).await {
                Ok(Exit::Ok) => break,
                Ok(other) => {
                    return Err(Error::usage(format!("{user}'s approval ended {other:?}")));
                }
                Err(e)
                    if e.message.contains("not made yet")
                        && started.elapsed() < std::time::Duration::from_secs(30) =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    step(&format!("$ rct watch {id}"));
    let ran = inspect::watch(home, &global, shown(id)).await?;
    if ran != Exit::Ok {
        return Err(Error::usage(format!("the demo failover ended {ran:?}")));
    }
    Ok(Exit::Ok)
}

/// `rct watch|show <id>` as the demo types it.
fn shown(id: rct_bus::CommandId) -> inspect::One {
    inspect::One {
        id: id.to_string(),
        utc: false,
        output: Output::Text,
    }
}

fn step(text: &str) {
    if rct_streams::runtime::colours(&std::io::stderr()) {
        eprintln!("\n\x1b[1m==> {text}\x1b[0m");
    } else {
        eprintln!("\n==> {text}");
    }
}

async fn script(home: &Home) -> Result {
    let global = Global::default();
    let remote = crate::remote::connect(home, &global).await?;

    step("$ rct login --dev --user alice --groups sre_team");
    log_in(home, &remote, "alice", "sre_team").await?;
    eprintln!("logged in as alice@example.com (groups: sre_team)");

    step("$ rct traffic drain-cluster --cluster prod-1 --justification DEMO-1");
    let drain: OperationName = "traffic/drain-cluster".parse().expect("a valid name");
    let fire = run::Fire {
        justification: Some("DEMO-1".into()),
        ..run::Fire::default()
    };
    let (exit, id) = run::fire_with_id(
        home,
        &global,
        &drain,
        vec![("cluster".into(), "prod-1".into())],
        &fire,
    )
    .await?;
    if exit != Exit::Ok {
        return Err(Error::usage(format!("the demo drain ended {exit:?}")));
    }

    step(&format!("$ rct show {id}"));
    inspect::show(home, &global, shown(id)).await?;

    step(&format!(
        "$ rct undo {id} -j DEMO-1 --yes   # back to the weight it had before the drain"
    ));
    let args = undo::Args {
        id: id.to_string(),
        justification: Some("DEMO-1".into()),
        yes: true,
        detach: false,
        output: Output::Text,
    };
    let undone = Box::pin(undo::run(home, &global, args)).await?;
    if undone != Exit::Ok {
        return Err(Error::usage(format!("the demo undo ended {undone:?}")));
    }

    step(
        "$ rct traffic drain-cluster --cluster 'prod-*' --keep-percent 50 --waves 1,50%,100% \
         --max-concurrency 2 --bake 1s --health traffic/check-health -j DEMO-4   # a rollout",
    );
    let fire = run::Fire {
        justification: Some("DEMO-4".into()),
        fan: run::Fan {
            waves: Some("1,50%,100%".into()),
            max_concurrency: Some("2".into()),
            bake: Some(std::time::Duration::from_secs(1)),
            health: Some("traffic/check-health".into()),
            ..run::Fan::default()
        },
        ..run::Fire::default()
    };
    let params = vec![
        ("cluster".into(), "prod-*".into()),
        ("keep_percent".into(), "50".into()),
    ];
    let (rolled, _) = Box::pin(run::fire_with_id(home, &global, &drain, params, &fire)).await?;
    if rolled != Exit::Ok {
        return Err(Error::usage(format!("the demo rollout ended {rolled:?}")));
    }

    Box::pin(failover(home, &remote)).await?;

    step("$ rct login --dev --user bob --groups app_oncall   # bob is not allowed to drain");
    log_in(home, &remote, "bob", "app_oncall").await?;
    step("$ rct traffic drain-cluster --cluster prod-2 --justification DEMO-2");
    let (refused, _) = run::fire_with_id(
        home,
        &global,
        &drain,
        vec![("cluster".into(), "prod-2".into())],
        &run::Fire {
            justification: Some("DEMO-2".into()),
            ..run::Fire::default()
        },
    )
    .await?;
    if refused != Exit::Rejected {
        return Err(Error::usage(format!(
            "bob's drain was not refused: {refused:?}"
        )));
    }
    eprintln!("(refused: exit code 3)");

    step("$ rct history --since 10m");
    Box::pin(history::run(
        home,
        &global,
        history::Args {
            since: "10m".into(),
            until: None,
            tower: None,
            target: None,
            operator: None,
            outcome: None,
            ticket: None,
            limit: None,
            break_glass: false,
            unreviewed: false,
            utc: false,
            follow: false,
            output: Output::Text,
        },
    ))
    .await?;
    let _ = Session::load(home, "demo");
    eprintln!(
        "\nThat was rct: a typed, permissioned operation, watched live, with every step on record."
    );
    Ok(Exit::Ok)
}
