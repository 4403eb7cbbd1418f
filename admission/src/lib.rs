//! rct admission: the one place that decides who may do what in production.
//!
//! - [`catalog`]: the operation catalog loaded from YAML, problems pointed at file and line.

pub mod catalog;
