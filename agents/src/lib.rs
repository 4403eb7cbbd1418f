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
