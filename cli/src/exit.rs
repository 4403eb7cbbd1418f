//! The CLI's documented exit codes and the error type that carries them.

use std::fmt;

/// How `rct` ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The operation succeeded (or the command did what was asked).
    Ok = 0,
    /// The operation failed, was cancelled, expired or ended unknown.
    Failed = 1,
    /// Usage, configuration or infrastructure error.
    Usage = 2,
    /// Rejected by admission.
    Rejected = 3,
    /// Not known yet: the request is stored but not decided (it may still be admitted and
    /// run). Do not fire it again; `rct watch <id>` follows it.
    NotKnown = 4,
    /// Ctrl-C while watching: detached, the command goes on.
    Interrupted = 130,
}

/// An error with the exit code it maps to; printed as `rct: <message>`.
#[derive(Debug)]
pub struct Error {
    /// The exit code.
    pub exit: Exit,
    /// What to tell the person.
    pub message: String,
}

impl Error {
    /// A usage, configuration or infrastructure error (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Usage,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Self::usage(format!("{e:#}"))
    }
}

/// `message` without a word repeated across a `: ` join, as error chains say them ("no
/// responders: no responders" is said once).
pub fn without_repeats(message: &str) -> String {
    let parts: Vec<&str> = message.split(": ").collect();
    let mut kept: Vec<&str> = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let repeated = parts.get(i + 1).is_some_and(|next| {
            next.eq_ignore_ascii_case(part)
                || (next.len() > part.len()
                    && next.is_char_boundary(part.len())
                    && next[..part.len()].eq_ignore_ascii_case(part)
                    && next[part.len()..].starts_with([';', ',', ' ', '(', ')']))
        });
        if !repeated {
            kept.push(part);
        }
    }
    kept.join(": ")
}

/// Result of a verb: the exit code to end with, or an error.
pub type Result<T = Exit> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_cause_is_said_once() {
        assert_eq!(
            without_repeats(
                "admission did not answer on rct.auth.dev-token: no responders: no responders; \
                 is it running?"
            ),
            "admission did not answer on rct.auth.dev-token: no responders; is it running?"
        );
        assert_eq!(without_repeats("timed out: Timed out"), "Timed out");
        assert_eq!(
            without_repeats("cannot connect: IO error: Connection refused"),
            "cannot connect: IO error: Connection refused"
        );
        assert_eq!(
            without_repeats("no stream: no streamer found"),
            "no stream: no streamer found",
            "a longer word is another word"
        );
        assert_eq!(
            without_repeats("prod: prod-1 unreachable"),
            "prod: prod-1 unreachable",
            "a name that starts another is not repeated"
        );
    }
}
