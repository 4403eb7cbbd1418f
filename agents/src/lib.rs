//! rct agents: the tower framework through which teams put their operations behind rct.
//!
//! A tower pulls admitted commands from its durable consumer (one per target for cluster
//! towers, one shared work queue for simple towers), verifies admission's signature, claims
//! the command (at most one claim per command), runs the handler with progress, logs and
//! cancellation, and records exactly one outcome.
//!
//! This crate holds the contract's entry points only for now; the framework arrives with the
//! agents issue and builds on `rct-bus` and `rct-streams`.
