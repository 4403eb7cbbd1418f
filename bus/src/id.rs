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

    /// The id a record about a stored message is made under when the message has no id of
    /// its own to use (a refused submission or command): the same for every reader of that
    /// message, so a record made twice lands on the same slots. It sorts by `stored` (when the
    /// stream stored the message); its random part is a digest of `scope` (the stream), the
    /// sequence and the bytes, so nobody can take it in advance without sending those bytes.
    pub fn derived(stored: SystemTime, scope: &str, sequence: u64, payload: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        let ms = stored
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let digest = Sha256::new()
            .chain_update(b"rct/v1/derived-id\n")
            .chain_update(scope.as_bytes())
            .chain_update(b"\n")
            .chain_update(sequence.to_be_bytes())
            .chain_update(payload)
            .finalize();
        let mut random = [0u8; 16];
        random[6..].copy_from_slice(&digest[..10]);
        Self(Ulid::from_parts(ms, u128::from_be_bytes(random)))
    }

    /// The id of the plan-only command admission sends to describe this request (it waits
    /// for approvals of an operation that plans): the same for every replica and redelivery,
    /// dated like the request.
    pub fn plan(&self) -> Self {
        Self::derived(self.timestamp(), "plan", 0, self.to_string().as_bytes())
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
    fn derived_ids_are_the_same_for_the_same_message_and_differ_otherwise() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let id = |scope, n, bytes: &[u8]| CommandId::derived(at, scope, n, bytes);
        assert_eq!(id("RCT_CMD", 42, b"x"), id("RCT_CMD", 42, b"x"));
        assert_ne!(id("RCT_CMD", 42, b"x"), id("RCT_SUBMIT", 42, b"x"));
        assert_ne!(id("RCT_CMD", 42, b"x"), id("RCT_CMD", 43, b"x"));
        assert_ne!(id("RCT_CMD", 42, b"x"), id("RCT_CMD", 42, b"y"));
        let later = at + std::time::Duration::from_secs(1);
        assert!(id("RCT_CMD", 42, b"x") < CommandId::derived(later, "RCT_CMD", 0, b""));
    }

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
        // Ordered by time: one made later sorts after, as text too.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = CommandId::generate();
        assert!(a < b && a.to_string() < b.to_string(), "{a} {b}");
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
