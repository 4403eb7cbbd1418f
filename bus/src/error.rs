use crate::envelope::Purpose;

/// Result with the bus [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while naming, encoding, signing or verifying.
///
/// Kinds are matchable: a caller that must tell "forged" from "garbled" branches on the
/// variant, never on the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name that must be a subject token is not one.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// Which kind of name ("tower", "target", …).
        what: &'static str,
        /// The rejected input.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A command id is not a ULID.
    #[error("invalid command id {value:?}: expected a 26-character ULID")]
    InvalidCommandId {
        /// The rejected input.
        value: String,
    },
    /// A subject does not have the shape of any rct subject.
    #[error("invalid subject {subject:?}: {reason}")]
    InvalidSubject {
        /// The rejected subject.
        subject: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Bytes do not decode as the expected message.
    #[error("cannot decode {what}")]
    Decode {
        /// The message that was expected.
        what: &'static str,
        /// What prost said.
        #[source]
        source: prost::DecodeError,
    },
    /// The signature does not verify over the body with the named key.
    #[error("signature does not verify for key {key_id}")]
    BadSignature {
        /// The key the envelope names.
        key_id: String,
    },
    /// The envelope names a key that is not among the trusted ones.
    #[error("key {key_id:?} is not trusted")]
    UntrustedKey {
        /// The key the envelope names.
        key_id: String,
    },
    /// The envelope was signed for another purpose than the one expected.
    #[error("envelope is signed for {found}, expected {expected}")]
    WrongPurpose {
        /// What the reader expected.
        expected: Purpose,
        /// What the envelope says.
        found: Purpose,
    },
    /// Key material could not be read.
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// What was wrong with it.
        reason: String,
    },
}
