//! Command ids.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use ulid::Ulid;

use crate::{Error, EventKind, Result};

/// A command's id: a ULID chosen by the client, so it sorts by submission time and is unique
/// without coordination. It names the command everywhere: subjects, `Nats-Msg-Id`, the CLI.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommandId(Ulid);

impl CommandId {
    /// A fresh id for a command submitted now.
    pub fn generate() -> Self {
        Self(Ulid::new())
    }

    /// When the id was generated (millisecond precision).
    pub fn timestamp(&self) -> SystemTime {
        self.0.datetime()
    }

    /// The `Nats-Msg-Id` of a submission or command: the id itself.
    pub fn msg_id(&self) -> String {
        self.to_string()
    }

    /// The `Nats-Msg-Id` of event `n` of `kind` for this command: `<id>.<kind>.<n>`, where `n`
    /// is a counter of the writer's or, for events caused by another command (a cancel
    /// request), that command's id.
    pub fn event_msg_id(&self, kind: EventKind, n: impl fmt::Display) -> String {
        format!("{self}.{kind}.{n}")
    }
}

impl FromStr for CommandId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ulid::from_string(s)
            .map(Self)
            .map_err(|_| Error::InvalidCommandId {
                value: s.to_owned(),
            })
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommandId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_order_by_time() {
        let a = CommandId::generate();
        let parsed: CommandId = a.to_string().parse().unwrap();
        assert_eq!(a, parsed);
        assert_eq!(a.to_string().len(), 26);
        assert!(matches!(
            "not-a-ulid".parse::<CommandId>(),
            Err(Error::InvalidCommandId { .. })
        ));
    }

    #[test]
    fn msg_ids_follow_the_contract() {
        let id: CommandId = "01JQ0000000000000000000000".parse().unwrap();
        assert_eq!(id.msg_id(), "01JQ0000000000000000000000");
        assert_eq!(
            id.event_msg_id(EventKind::Progress, 3),
            "01JQ0000000000000000000000.progress.3"
        );
    }
}
