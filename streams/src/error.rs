/// Result with the streams [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Infrastructure trouble talking to JetStream.
///
/// A refused single-slot publish is not an error (see [`crate::Slot::Taken`]); an error means
/// the caller should retry later or give up, never that something was decided.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The topology settings are inconsistent.
    #[error("invalid stream settings: {0}")]
    Config(String),
    /// Creating or updating a stream, bucket or consumer failed.
    #[error("cannot provision {what}: {cause}")]
    Provision {
        /// What was being provisioned.
        what: String,
        /// The server's or client's error.
        cause: async_nats::Error,
    },
    /// No acknowledgement arrived within the retry horizon. The message may or may not be
    /// stored; publishing again with the same `Nats-Msg-Id` is safe.
    #[error(
        "no acknowledgement for {subject} (msg id {msg_id}) after {attempts} attempts; \
         it may or may not be stored, and retrying with the same id is safe (last error: {cause})"
    )]
    Unacknowledged {
        /// Where it was published.
        subject: String,
        /// Its `Nats-Msg-Id`.
        msg_id: String,
        /// How many times it was sent.
        attempts: u32,
        /// The last error seen.
        cause: async_nats::jetstream::context::PublishError,
    },
    /// The server refused the publish for a reason retrying does not fix.
    #[error("publish to {subject} refused: {cause}")]
    Publish {
        /// Where it was published.
        subject: String,
        /// The server's or client's error.
        cause: async_nats::jetstream::context::PublishError,
    },
    /// The publisher signs its events and cannot now (an agent not certified yet, or whose
    /// certificate ran out): nothing is published, since it could not be verified.
    #[error("cannot sign the event for {subject}: {why}")]
    Unsigned {
        /// Where it was going.
        subject: String,
        /// Why.
        why: &'static str,
    },
    /// An event to publish has no kind, or a command id that is not a ULID.
    #[error("event for command {command_id:?} has no kind or an invalid command id")]
    InvalidEvent {
        /// The command id it carries.
        command_id: String,
    },
    /// Reading a stream failed.
    #[error("cannot read {what}: {cause}")]
    Read {
        /// What was being read.
        what: String,
        /// The server's or client's error.
        cause: async_nats::Error,
    },
    /// A stored message is not an rct event. Replay reports it and goes on.
    #[error("message {sequence} on {subject:?} is not a valid event: {reason}")]
    Malformed {
        /// Its stream sequence.
        sequence: u64,
        /// Its subject.
        subject: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    pub(crate) fn provision(what: &str, source: impl Into<async_nats::Error>) -> Self {
        Error::Provision {
            what: what.to_owned(),
            cause: source.into(),
        }
    }

    pub(crate) fn read(what: &str, source: impl Into<async_nats::Error>) -> Self {
        Error::Read {
            what: what.to_owned(),
            cause: source.into(),
        }
    }
}
