//! rct agents: the tower framework through which teams put their operations behind rct.
//!
//! A tower pulls admitted commands from its durable consumer (one per target for cluster
//! towers, one shared work queue for simple towers), verifies admission's signature, claims
//! the command (at most one claim per command), runs the handler with progress, logs,
//! cancellation and a timeout, and records exactly one outcome. A command whose claim exists
//! but whose agent died is recorded `Unknown` and never run again.
//!
//! - [`Tower`]: declare a tower and its operations, then `run`.
//! - [`Context`], [`Params`], [`Outcome`], [`Failure`]: what handlers get and return.
//! - [`script`]: operations backed by executables, declared in YAML (the `rct-agent` binary).
//! - [`demo`]: the demo `traffic` tower on a simulated load balancer.
//! - [`cli`]: the flags every agent binary shares.
//! - [`Config`]: settings, layered like every rct component's.

pub mod cli;
mod config;
mod context;
mod delivery;
pub mod demo;
mod emitter;
mod error;
mod metrics;
pub mod script;
mod tower;

pub use config::{Config, Output};
pub use context::{Context, Failure, Outcome, Params};
pub use error::Error;
pub use tower::Tower;

/// Makes panics log where they happened and withhold what they said: a handler's panic
/// message may hold a secret parameter in clear (the command's outcome records it, masked).
/// Call it once at start, after logging is set up; the `rct-agent` and `rct-demo-traffic`
/// binaries do.
pub fn withhold_panic_messages() {
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(ToString::to_string).unwrap_or_default();
        tracing::error!(
            at,
            "panicked; the message is withheld, as it may hold a secret (a handler's panic is \
             in its command's outcome, masked)"
        );
    }));
}
