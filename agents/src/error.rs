/// Why an agent cannot start or keep running. A command that fails is not an error: it is an
/// outcome event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration or the tower's declaration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// NATS refused or failed something the agent cannot work without.
    #[error("{0}")]
    Nats(String),
    /// JetStream trouble.
    #[error(transparent)]
    Streams(#[from] rct_streams::Error),
}
