//! rct's JetStream layer: the topology as code and its provisioning, publishing with dedup ids
//! and single-slot subjects, replay of the audit stream, the `CommandState` projection, and
//! (feature `testkit`) real nats-server processes for tests.
//!
//! - [`Connection`]: how every component connects (servers, credentials, TLS, domain).
//! - [`Config`], [`provision`], [`topology`]: streams `RCT_SUBMIT`, `RCT_CMD`, `RCT_EVT`,
//!   buckets `rct_agents`, `rct_catalog`, `rct_locks`, and the durable consumers.
//! - [`locks`]: taking and releasing locks in `rct_locks` by compare-and-set.
//! - [`Publisher`], [`Outgoing`], [`Slot`]: acknowledged, deduplicated, retried publishes;
//!   [`Slot::Taken`] when a decision, claim or outcome already exists.
//! - [`journal`]: a command's claim and outcome read from the stream leader, and ending a
//!   command without running it.
//! - [`replay`]: a command's history, a filtered time range, or history then live.
//! - [`work`]: consuming a durable consumer with bounded concurrency until shutdown.
//! - [`runtime`]: logging and signal handling shared by the binaries.
//! - [`telemetry`]: Prometheus metrics, `/healthz` and `/readyz` on one listener.
//! - [`CommandState`], [`Phase`]: the lifecycle folded from events.

pub mod config;
pub mod connect;
pub mod direct;
mod error;
pub mod journal;
pub mod locks;
mod projection;
mod publish;
pub mod replay;
pub mod runtime;
pub mod telemetry;
pub mod timestamp;
pub mod topology;
pub mod work;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use config::Config;
pub use connect::Connection;
pub use error::{Error, Result};
pub use projection::{CommandState, Folded, Folder, Phase};
pub use publish::{Ack, Outgoing, Publisher, Retry, Slot};
pub use replay::{Filter, Item, Record};
pub use topology::{Change, Report, provision};
