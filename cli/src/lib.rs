//! `rct`, the operator's command line: fire an operation and watch it, look back at what
//! happened, run the whole system locally.
//!
//! Exit codes ([`exit::Exit`], docs/CLI.md): 0 the operation succeeded (or the verb did what
//! was asked); 1 it failed, was cancelled, expired, ended unknown or will not run; 2 usage,
//! configuration or infrastructure error; 3 rejected by admission; 4 not known yet (stored,
//! not decided); 130 interrupted while watching (the command goes on). Data on stdout,
//! progress on stderr.

/// One module per verb.
pub mod commands {
    pub mod approve;
    pub mod bench;
    pub mod chaos;
    pub mod context;
    pub mod dev;
    pub mod freeze;
    pub mod history;
    pub mod inspect;
    pub mod login;
    pub mod ops;
    pub mod run;
    pub mod undo;
}
pub mod exit;
pub mod home;
pub mod remote;
pub mod render;
pub mod secret;
pub mod session;
pub mod stack;

use clap::{Arg, ArgMatches, Args as _, CommandFactory, FromArgMatches, Parser, Subcommand};
use rct_bus::catalog::{Served, Type};
use rct_bus::{OpName, OperationName, Tower};

use crate::commands::{
    approve, bench, chaos, context, dev, freeze, history, inspect, login, ops, run, undo,
};
use crate::exit::{Error, Exit};
use crate::home::Home;
use crate::remote::Global;

/// rct: a control tower for production admin operations.
///
/// Every operation of the catalog is also a command: `rct <tower> <op> --<param> VALUE
/// --justification WHY` (see `rct ops`). Start locally with `rct dev` or `rct demo`.
#[derive(Debug, Parser)]
#[command(name = "rct", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Log in: exchange an id_token for an operator certificate.
    Login(login::Args),
    /// Forget this context's session (its key and certificate).
    Logout,
    /// Show who you are logged in as, and until when.
    Whoami(login::WhoamiArgs),
    /// List the operations (or describe one).
    Ops(ops::Args),
    /// Fire an operation by name: rct run traffic/drain-cluster -p cluster=prod-1 -j SRE-1.
    Run(run::Args),
    /// Plan an operation without running it: rct plan <tower> <op> --<param> VALUE -j WHY.
    /// Its agent describes what it would change (for operations with `plan: true`).
    Plan {
        /// The tower, the operation and its flags, as for rct <tower> <op>.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true,
            value_name = "TOWER OP ARGS"
        )]
        words: Vec<String>,
    },
    /// Watch a command: its history, then live, to the end.
    Watch(inspect::One),
    /// Where a command is, in one line.
    Status(inspect::One),
    /// A command's full timeline: every event, who, why, which agent, the log.
    Show(inspect::One),
    /// Ask to cancel a running command.
    Cancel(inspect::CancelArgs),
    /// Approve a request that waits for approvals (bound to its digest, shown first).
    Approve(approve::Args),
    /// Deny a request that waits for approvals: rct deny <id> -j WHY.
    Deny(approve::Args),
    /// Review a command run by breaking the glass (someone else than who broke it).
    Review(approve::Args),
    /// Freeze a tower for a while, end that freeze, or list the freezes in force.
    #[command(subcommand)]
    Freeze(freeze::Args),
    /// The live agents, per tower and target.
    Agents(inspect::AgentsArgs),
    /// The locks held now: which command holds each, who asked for it and why.
    Locks(inspect::LocksArgs),
    /// Undo a command that succeeded: fire its operation's inverse, with the parameters its
    /// record gives (shown first): rct undo <id> -j WHY.
    Undo(undo::Args),
    /// Steer a rollout: halt it (no new target starts), or resume it where it paused.
    #[command(subcommand)]
    Rollout(RolloutVerb),
    /// One line per command: what happened, who asked, why, how it went.
    History(history::Args),
    /// Manage contexts (how to reach NATS).
    #[command(subcommand)]
    Context(context::Args),
    /// Run the whole system locally in the foreground.
    Dev(dev::DevArgs),
    /// Run the demo: a local stack, a drain with live progress, its timeline, its undo, and
    /// the history.
    Demo(dev::DemoArgs),
    /// Measure rct against the bare-JetStream floor (starts its own nats-server).
    Bench(bench::Args),
    /// Inject faults into a local system under load and check that nothing was lost, decided
    /// or executed twice (starts its own nats-server and processes).
    Chaos(chaos::Args),
    /// One admission replica of `rct chaos`.
    #[command(hide = true)]
    ChaosAdmission(chaos::ProcessArgs),
    /// One agent of `rct chaos`.
    #[command(hide = true)]
    ChaosAgent(chaos::ProcessArgs),
    /// Print a shell completion script (bash, zsh, fish, …).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Parses the command line, runs the verb, and returns the exit status.
pub async fn main() -> std::process::ExitCode {
    exit_quietly_on_broken_pipe();
    let json = wants_json(&std::env::args().collect::<Vec<_>>());
    let home = Home::locate();
    let catalog = match catalog_for_commands(&home).await {
        Ok(catalog) => catalog,
        Err(message) => return fail(json, &Error::usage(message)),
    };
    let matches = match command(catalog.as_ref()).try_get_matches() {
        Ok(matches) => matches,
        Err(e) if !json || !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            let message = first.strip_prefix("error: ").unwrap_or(first);
            return fail(json, &Error::usage(message));
        }
    };
    match Box::pin(dispatch(&home, catalog.as_ref(), matches)).await {
        Ok(exit) => std::process::ExitCode::from(exit as u8),
        Err(e) => fail(json, &e),
    }
}

/// Whether the command line asks for `--output json` (errors are then JSON objects too).
fn wants_json(args: &[String]) -> bool {
    args.iter()
        .zip(args.iter().skip(1))
        .any(|(flag, value)| flag == "--output" && value == "json")
        || args.iter().any(|a| a == "--output=json")
}

/// Says what went wrong on stderr (`rct: …`, or `{"error": …, "exit": …}` under
/// `--output json`) and ends with its exit code.
fn fail(json: bool, e: &Error) -> std::process::ExitCode {
    let message = exit::without_repeats(&e.message);
    if message.is_empty() {
        // Already said (an interrupted watch).
    } else if json {
        eprintln!(
            "{}",
            serde_json::json!({"error": message, "exit": e.exit as u8})
        );
    } else {
        eprintln!("rct: {message}");
    }
    std::process::ExitCode::from(e.exit as u8)
}

/// `rct history | head` closes stdout early: that is the reader's choice, not an error, so
/// the write that fails ends rct quietly with 0 (println! panics on a broken pipe).
fn exit_quietly_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// The built-in verbs plus one command per tower and operation of the catalog.
fn command(catalog: Option<&Served>) -> clap::Command {
    let mut command = Cli::command();
    let Some(served) = catalog else {
        return command;
    };
    for (tower, spec) in &served.catalog.towers {
        if Verb::has_subcommand(tower) || Tower::new(tower.as_str()).is_err() {
            continue;
        }
        let mut tower_command = clap::Command::new(tower.clone())
            .about(spec.description.clone())
            .subcommand_required(true);
        for (name, op) in &served.catalog.operations {
            let Some(op_name) = name.strip_prefix(&format!("{tower}/")) else {
                continue;
            };
            let mut op_command =
                clap::Command::new(op_name.to_owned()).about(op.description.clone());
            for (param_name, param) in &op.params {
                let mut help = param.accepts(spec);
                if let Some(default) = param.default_value() {
                    help = format!(
                        "{help} [default: {}]",
                        rct_bus::catalog::display_value(&default)
                    );
                }
                if !param.description.is_empty() {
                    help = format!("{}: {help}", param.description);
                }
                if param.secret {
                    help = format!(
                        "{help} [secret: sealed to the tower; - reads it from stdin, @FILE from \
                         a file; asked for when left out on a terminal]"
                    );
                }
                // Every value reaches rct's own check (its words, for every type): clap only
                // collects them, repeats included, so a repeat is refused there too.
                let values: Vec<String> = match param.kind {
                    Type::Enum => param.values.clone(),
                    Type::Target => spec.targets.clone(),
                    _ => Vec::new(),
                };
                let arg = Arg::new(param_name.clone())
                    .long(param_name.replace('_', "-"))
                    .value_name(param.kind.to_string().to_uppercase())
                    .help(help)
                    .action(clap::ArgAction::Append)
                    .allow_negative_numbers(true)
                    .value_parser(Candidates(values));
                op_command = op_command.arg(arg);
            }
            op_command = run::Fire::augment_args(op_command)
                .about(op.description.clone())
                .long_about(None)
                .after_help(format!(
                    "Allowed groups: {}. Justification: {}.",
                    op.allowed_groups.join(", "),
                    op.justification.describe()
                ));
            tower_command = tower_command.subcommand(op_command);
        }
        command = command.subcommand(tower_command);
    }
    command
}

/// A value parser that lets any text through (rct checks it, in its own words) and offers
/// its values to help and completion.
#[derive(Clone, Debug)]
struct Candidates(Vec<String>);

impl clap::builder::TypedValueParser for Candidates {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        clap::builder::StringValueParser::new().parse_ref(cmd, arg, value)
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        if self.0.is_empty() {
            return None;
        }
        Some(Box::new(
            self.0
                .iter()
                .map(|v| clap::builder::PossibleValue::new(v.clone())),
        ))
    }
}

/// The global flags and the first word, read before the command is built: the dynamic
/// commands come from the catalog of the context (and servers) the command line names.
fn early(args: &[String]) -> (Global, Vec<String>) {
    let mut global = Global::default();
    let mut words = Vec::new();
    let mut planning = false;
    let mut args = args.iter().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        match flag {
            "--context" | "--server" => {
                let Some(value) = inline.or_else(|| args.next().cloned()) else {
                    break;
                };
                if flag == "--context" {
                    global.context = Some(value);
                } else {
                    global.servers.push(value);
                }
            }
            // rct plan <tower> <op> builds the same command as rct <tower> <op>.
            "plan" if words.is_empty() && !planning => planning = true,
            // The verb or tower, then (after a tower) the operation.
            _ if words.is_empty() || (words.len() == 1 && !arg.starts_with('-')) => {
                words.push(arg.clone());
            }
            _ => {}
        }
    }
    (global, words)
}

/// The catalog the dynamic commands are built from: the cached one of the context the command
/// line names, fetched again when the first word is neither a verb nor a tower the cache knows
/// (or `--server` points elsewhere than the cache came from). When that fetch fails, the word
/// cannot be understood: say why (not "unrecognized subcommand").
async fn catalog_for_commands(home: &Home) -> Result<Option<Served>, String> {
    let args: Vec<String> = std::env::args().collect();
    let (global, words) = early(&args);
    let is_verb =
        |word: &str| word.starts_with('-') || Verb::has_subcommand(word) || word == "help";
    let (context, _) = match remote::resolve(home, &global) {
        Ok(resolved) => resolved,
        // A verb says so itself; a tower's command cannot be built without the context.
        Err(_) if words.first().is_none_or(|w| is_verb(w)) => return Ok(None),
        Err(e) => return Err(e.message),
    };
    // With --server the cache may describe another system: it only serves when nothing
    // else can be read.
    let cached = remote::cached_catalog(home, &context);
    let Some(first) = words.first().cloned() else {
        return Ok(cached);
    };
    let is_verb = is_verb(&first);
    // A tower the cache knows, and an operation of it (or none yet, or help).
    let known = cached.as_ref().is_some_and(|s| {
        s.catalog.towers.contains_key(&first)
            && words.get(1).is_none_or(|op| {
                op == "help" || s.catalog.operations.contains_key(&format!("{first}/{op}"))
            })
    });
    if is_verb || (known && global.servers.is_empty()) {
        return Ok(cached);
    }
    // An unknown first word: maybe a tower the cache does not know yet.
    let fetched = match remote::connect(home, &global).await {
        Ok(remote) => remote.catalog(home).await.map_err(|e| e.message),
        Err(e) => Err(e.message),
    };
    match fetched {
        Ok(served) => Ok(Some(served)),
        Err(e) => Err(format!(
            "{first:?} is not a verb, and the catalog that names the towers cannot be read: {e}"
        )),
    }
}

async fn dispatch(home: &Home, catalog: Option<&Served>, matches: ArgMatches) -> exit::Result {
    let global = Global::from_arg_matches(&matches).map_err(|e| Error::usage(e.to_string()))?;
    if let Some((tower, tower_matches)) = matches.subcommand()
        && !Verb::has_subcommand(tower)
        && let Some(served) = catalog
        && let Some((op, op_matches)) = tower_matches.subcommand()
    {
        let name = OperationName::new(
            Tower::new(tower).map_err(|e| Error::usage(e.to_string()))?,
            OpName::new(op).map_err(|e| Error::usage(e.to_string()))?,
        );
        let spec = served.catalog.operations.get(&name.to_string());
        let params: Vec<(String, String)> = spec
            .map(|op| {
                op.params
                    .keys()
                    .flat_map(|p| {
                        op_matches
                            .get_many::<String>(p)
                            .into_iter()
                            .flatten()
                            .map(|v| (p.clone(), v.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let fire =
            run::Fire::from_arg_matches(op_matches).map_err(|e| Error::usage(e.to_string()))?;
        return run::fire(home, &global, &name, params, &fire).await;
    }
    let cli = Cli::from_arg_matches(&matches).map_err(|e| Error::usage(e.to_string()))?;
    match cli.verb {
        Verb::Login(args) => login::run(home, &global, args).await,
        Verb::Logout => login::logout(home, &global),
        Verb::Whoami(args) => login::whoami(home, &global, args),
        Verb::Ops(args) => ops::run(home, &global, args).await,
        Verb::Run(args) => run::run(home, &global, args).await,
        Verb::Plan { .. } => {
            // rct plan <tower> <op> … is rct <tower> <op> … --plan.
            let mut args: Vec<String> = std::env::args().collect();
            let verb = (1..args.len()).find(|&i| {
                args[i] == "plan" && !matches!(args[i - 1].as_str(), "--context" | "--server")
            });
            if let Some(at) = verb {
                args.remove(at);
            }
            args.push("--plan".into());
            let matches = command(catalog)
                .try_get_matches_from(args)
                .map_err(|e| Error::usage(e.render().to_string().trim().to_owned()))?;
            Box::pin(dispatch(home, catalog, matches)).await
        }
        Verb::Watch(args) => inspect::watch(home, &global, args).await,
        Verb::Status(args) => inspect::status(home, &global, args).await,
        Verb::Show(args) => inspect::show(home, &global, args).await,
        Verb::Cancel(args) => inspect::cancel(home, &global, args).await,
        Verb::Approve(args) => approve::run(home, &global, args, false).await,
        Verb::Deny(args) => approve::run(home, &global, args, true).await,
        Verb::Review(args) => approve::review(home, &global, args).await,
        Verb::Freeze(args) => Box::pin(freeze::run(home, &global, args)).await,
        Verb::Agents(args) => inspect::agents(home, &global, args).await,
        Verb::Locks(args) => inspect::locks(home, &global, args).await,
        Verb::Undo(args) => undo::run(home, &global, args).await,
        Verb::Rollout(RolloutVerb::Halt(args)) => inspect::cancel(home, &global, args).await,
        Verb::Rollout(RolloutVerb::Resume(mut args)) => {
            args.resume = true;
            inspect::cancel(home, &global, args).await
        }
        Verb::History(args) => Box::pin(history::run(home, &global, args)).await,
        Verb::Context(args) => context::run(home, args),
        Verb::Dev(args) => dev::dev(home, args).await,
        Verb::Demo(args) => Box::pin(dev::demo(args)).await,
        Verb::Bench(args) => bench::run(args).await,
        Verb::Chaos(args) => Box::pin(chaos::run(args)).await,
        Verb::ChaosAdmission(args) => chaos::admission(args).await,
        Verb::ChaosAgent(args) => chaos::agent(args).await,
        Verb::Completion { shell } => {
            let mut command = completable(command(catalog), catalog);
            clap_complete::generate(shell, &mut command, "rct", &mut std::io::stdout());
            Ok(Exit::Ok)
        }
    }
}

/// `command`, with the catalog's operations and towers as the values of `rct run`,
/// `rct ops describe` and `rct ops`, for completion only (rct checks those names itself, and
/// suggests the nearest when one is wrong).
fn completable(command: clap::Command, catalog: Option<&Served>) -> clap::Command {
    let Some(served) = catalog else {
        return command;
    };
    let operations = Candidates(served.catalog.operations.keys().cloned().collect());
    let towers = Candidates(served.catalog.towers.keys().cloned().collect());
    command
        .mut_subcommand("run", |run| {
            run.mut_arg("operation", |a| a.value_parser(operations.clone()))
        })
        .mut_subcommand("ops", |ops| {
            ops.mut_arg("tower", |a| a.value_parser(towers.clone()))
                .mut_arg("tower_flag", |a| a.value_parser(towers))
                .mut_subcommand("describe", |d| {
                    d.mut_arg("operation", |a| a.value_parser(operations))
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_and_servers_are_found_wherever_they_are_given() {
        let args = |line: &str| -> Vec<String> {
            std::iter::once("rct")
                .chain(line.split_whitespace())
                .map(str::to_owned)
                .collect()
        };
        let (global, words) = early(&args("--context prod traffic drain-cluster --cluster a"));
        assert_eq!(global.context.as_deref(), Some("prod"));
        assert_eq!(words, ["traffic", "drain-cluster"]);
        let (global, words) = early(&args(
            "traffic drain-cluster --server=nats://a:4222 --server nats://b:4222 --context=x",
        ));
        assert_eq!(global.servers, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(global.context.as_deref(), Some("x"));
        assert_eq!(words, ["traffic", "drain-cluster"]);
        let (global, words) = early(&args("history -- --context y"));
        assert_eq!(global.context, None);
        assert_eq!(words, ["history"]);
        let (_, words) = early(&args("traffic --help"));
        assert_eq!(words, ["traffic"]);
        // rct plan <tower> <op> needs the tower's command.
        let (_, words) = early(&args("--context plan plan traffic drain-cluster -j X"));
        assert_eq!(words, ["traffic", "drain-cluster"]);
    }
}

/// `rct rollout halt|resume <id> -j WHY`.
#[derive(Debug, clap::Subcommand)]
pub enum RolloutVerb {
    /// Halt a rollout: no new target starts; the ones running end as they will, then the
    /// rollout ends cancelled.
    Halt(inspect::CancelArgs),
    /// Resume a rollout that paused for a person (a health check that could not say):
    /// the targets it paused on are accepted, and it goes on.
    Resume(inspect::CancelArgs),
}
