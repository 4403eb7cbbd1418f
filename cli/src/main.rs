//! `rct`, the operator's command line: fire an operation, watch it, replay what happened.
//!
//! Today the binary answers `--help` and `--version`; the verbs (login, ops, fire-and-watch,
//! history, dev, demo) arrive with the CLI issue.

use clap::Parser;

/// rct: a control tower for production admin operations.
#[derive(Debug, Parser)]
#[command(name = "rct", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
