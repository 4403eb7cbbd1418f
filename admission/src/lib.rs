//! rct admission: the one place that decides who may do what in production.
//!
//! - [`identity`]: id_tokens, operator certificates, service identities, the dev issuer.
//! - [`catalog`]: the operation catalog loaded from YAML, problems pointed at file and line.

pub mod catalog;
pub mod identity;
