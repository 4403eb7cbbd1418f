//! rct's wire protocol, with no I/O: the protobuf messages every part exchanges, the validated
//! names they carry, the NATS subjects they travel on, and the signed envelopes that make a
//! submission or a command verifiable by anyone, at any time later.
//!
//! - [`proto`]: the generated messages (`bus/proto/rct/v1/*.proto` is the contract).
//! - [`CommandId`], [`Tower`], [`Target`], [`OpName`], [`OperationName`]: validated names.
//! - [`Subject`] and [`subject`]: the only place subjects are spelled.
//! - [`KeyPair`], [`PublicKey`], [`Unverified`] → [`Verified`], [`Verifier`]: Ed25519 signing.
//! - [`catalog`]: towers, operations, typed parameters and their checks.
//! - [`certificate`]: operator certificates, the JWTs admission binds session keys with.
//! - [`approval`]: the request digest approvers sign, and the check agents make of approvals.
//! - [`provenance`]: who wrote a stored event: admission, or an agent admission certified.
//! - [`sealed`]: secret parameter values, encrypted to a tower's recipients.
//! - [`lock`]: which commands may not run at once, and who holds a lock.
//! - [`presence`]: what live agents write in the `rct_agents` bucket.
//! - [`EventKind`]: the last token of an event subject, and which events hold one slot.
//! - [`trace`]: W3C `traceparent`, carried from the CLI to every event of an operation.
//! - [`template`]: `{name}` placeholders in script arguments and lock keys.
//! - [`text`]: text on record made safe to show, and what a justification may hold.

pub mod approval;
pub mod catalog;
pub mod certificate;
mod envelope;
mod error;
mod event;
pub mod freeze;
mod id;
mod key;
pub mod lock;
mod name;
pub mod presence;
pub mod provenance;
pub mod rollout;
pub mod sealed;
pub mod subject;
pub mod template;
pub mod text;
pub mod trace;
pub mod undo;

/// Generated protobuf messages (package `rct.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/rct.v1.rs"));
}

pub use envelope::{Purpose, Unverified, Verified, Verifier};
pub use error::{Error, Result};
pub use event::{
    EventKind, REFUSAL_NOTE, REFUSAL_NOTE_FOR_NOW, RefusalNote, refusal_note, rejection_code_name,
};
pub use id::CommandId;
pub use key::{KeyId, KeyPair, PublicKey};
pub use name::{OpName, OperationName, Target, Token, Tower};
pub use subject::Subject;
