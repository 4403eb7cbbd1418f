//! Validated names that become subject tokens.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// Longest token accepted; subjects stay short and readable.
const MAX_TOKEN_LEN: usize = 64;

/// One subject token: `[A-Za-z0-9_-]+`, at most 64 bytes. No `.`, `*`, `>` or white space can
/// ever reach a subject through a `Token`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(String);

impl Token {
    /// Checks `value` and wraps it; `what` names the value in the error ("tower", "target", …).
    pub fn new(what: &'static str, value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        let reason = if value.is_empty() {
            Some("must not be empty")
        } else if value.len() > MAX_TOKEN_LEN {
            Some("must be at most 64 characters")
        } else if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            Some("may only contain letters, digits, '_' and '-'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidName {
                what,
                value,
                reason,
            }),
            None => Ok(Self(value)),
        }
    }

    /// The token as it appears in a subject.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Declares a validated newtype over [`Token`].
macro_rules! token_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Token);

        impl $name {
            #[doc = concat!("Checks `value` as a ", $what, " name.")]
            pub fn new(value: impl Into<String>) -> Result<Self> {
                Token::new($what, value).map(Self)
            }

            /// The name as it appears in a subject.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.as_str(), f)
            }
        }
    };
}

token_newtype!(
    /// A tower: the team-owned unit that carries out a family of operations (`traffic`).
    Tower,
    "tower"
);
token_newtype!(
    /// The cluster (or other unit) an operation acts on; [`Target::none`] for towers without
    /// targets.
    Target,
    "target"
);
token_newtype!(
    /// An operation's name within its tower (`drain-cluster`).
    OpName,
    "operation"
);

impl Target {
    /// The token used for towers that have no targets.
    pub const NONE: &'static str = "_";

    /// The target of commands for towers without targets (`_`).
    pub fn none() -> Self {
        Self(Token(Self::NONE.to_owned()))
    }

    /// The target an event's subject names: the event's own, or `_` when that is not a
    /// token (a refused request's target, recorded as given).
    pub fn of_event(target: &str) -> Self {
        Self::new(target).unwrap_or_else(|_| Self::none())
    }

    /// Whether this is the "no target" token.
    pub fn is_none(&self) -> bool {
        self.as_str() == Self::NONE
    }
}

/// A fully named operation, `<tower>/<op>` (`traffic/drain-cluster`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OperationName {
    tower: Tower,
    op: OpName,
}

impl OperationName {
    /// Joins a tower and an operation name.
    pub fn new(tower: Tower, op: OpName) -> Self {
        Self { tower, op }
    }

    /// The tower that owns the operation.
    pub fn tower(&self) -> &Tower {
        &self.tower
    }

    /// The operation's name within its tower.
    pub fn op(&self) -> &OpName {
        &self.op
    }
}

impl FromStr for OperationName {
    type Err = Error;

    /// Parses `<tower>/<op>`.
    fn from_str(s: &str) -> Result<Self> {
        let (tower, op) = s.split_once('/').ok_or_else(|| Error::InvalidName {
            what: "operation",
            value: s.to_owned(),
            reason: "must be <tower>/<op>",
        })?;
        Ok(Self::new(Tower::new(tower)?, OpName::new(op)?))
    }
}

impl fmt::Display for OperationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tower, self.op)
    }
}

impl fmt::Debug for OperationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_refuse_subject_syntax_and_blanks() {
        for bad in [
            "", "a.b", "a*", "*", ">", "a>", "a b", " a", "a\t", "ü", "a/b", "a\nb",
        ] {
            let err = Tower::new(bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidName { what: "tower", .. }),
                "{bad:?} gave {err}"
            );
        }
        assert!(Target::new("x".repeat(65)).is_err());
    }

    #[test]
    fn tokens_accept_the_documented_alphabet() {
        for good in ["traffic", "prod-1", "_", "A_b-9", &"x".repeat(64)] {
            assert_eq!(Target::new(good).unwrap().as_str(), good);
        }
        assert!(Target::none().is_none());
    }

    #[test]
    fn operation_names_round_trip() {
        let name: OperationName = "traffic/drain-cluster".parse().unwrap();
        assert_eq!(name.tower().as_str(), "traffic");
        assert_eq!(name.op().as_str(), "drain-cluster");
        assert_eq!(name.to_string(), "traffic/drain-cluster");
        for bad in ["traffic", "traffic/", "/op", "a/b/c", "a.b/c"] {
            assert!(bad.parse::<OperationName>().is_err(), "{bad:?} accepted");
        }
    }
}
