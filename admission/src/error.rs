use std::path::PathBuf;

/// Why admission cannot start or keep running. Refused submissions are not errors: they are
/// recorded as `Rejected` events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The catalog cannot be used.
    #[error(transparent)]
    Catalog(#[from] crate::catalog::Error),
    /// A key file cannot be used.
    #[error("key {}: {reason}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// NATS refused or failed something admission cannot work without.
    #[error("{0}")]
    Nats(String),
    /// JetStream trouble.
    #[error(transparent)]
    Streams(#[from] rct_streams::Error),
}
