//! NATS subjects: the only place in rct where they are spelled.
//!
//! | subject                               | stream       | written by          |
//! |---------------------------------------|--------------|---------------------|
//! | `rct.submit.<tower>.<op>`             | `RCT_SUBMIT` | CLI / API clients   |
//! | `rct.cmd.<tower>.<target>.<op>`       | `RCT_CMD`    | admission           |
//! | `rct.evt.<tower>.<target>.<command_id>.<kind>` | `RCT_EVT` | admission, agents |
//! | `rct.auth.login`                      | (request/reply) | CLI → admission  |
//! | `rct.auth.dev-token`                  | (request/reply) | CLI → admission (dev only) |
//! | `rct.auth.enrol.<tower>.<target>`     | (request/reply) | agent → admission |
//!
//! [`Subject`] builds and parses concrete subjects; the functions below build the wildcard
//! filters that streams, consumers and watchers subscribe with.
//!
//! An event's subject names its command's target, so that a NATS permission can say which
//! events an identity may write: an agent of `traffic` on `prod-1` publishes only
//! `rct.evt.traffic.prod-1.*.{claim,progress,log,outcome}` ([`agent_event_grants`]); only
//! admission writes the other kinds. A command's slots are the subjects with its own target:
//! whatever another target's writer puts under the command's id is somewhere else.

use std::fmt;
use std::str::FromStr;

use crate::{CommandId, Error, EventKind, OpName, OperationName, Result, Target, Tower};

const ROOT: &str = "rct";
const SUBMIT: &str = "submit";
const CMD: &str = "cmd";
const EVT: &str = "evt";
const AUTH: &str = "auth";
const LOGIN: &str = "login";
const DEV_TOKEN: &str = "dev-token";
const ENROL: &str = "enrol";

/// A concrete rct subject.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Subject {
    /// `rct.submit.<tower>.<op>`: a signed submission.
    Submit {
        /// The operation asked for.
        operation: OperationName,
    },
    /// `rct.cmd.<tower>.<target>.<op>`: an admitted, admission-signed command.
    Command {
        /// The operation to run.
        operation: OperationName,
        /// Where to run it.
        target: Target,
    },
    /// `rct.evt.<tower>.<target>.<command_id>.<kind>`: one event of a command's history.
    Event {
        /// The tower that owns the command.
        tower: Tower,
        /// Where the command runs (`_` when it has no target, or none could be read).
        target: Target,
        /// The command.
        command_id: CommandId,
        /// The slot.
        kind: EventKind,
    },
    /// `rct.auth.login`: the login exchange (request/reply).
    Login,
    /// `rct.auth.dev-token`: the development issuer (request/reply), only where enabled.
    DevToken,
    /// `rct.auth.enrol.<tower>.<target>`: an agent's enrolment (request/reply): only that
    /// target's agent may publish here, so admission certifies the key it is sent for the
    /// tower and target (see [`crate::provenance`]).
    Enrol {
        /// The agent's tower.
        tower: Tower,
        /// Its target (`_` for a tower without targets).
        target: Target,
    },
}

impl Subject {
    /// `rct.submit.<tower>.<op>`
    pub fn submit(operation: &OperationName) -> Self {
        Subject::Submit {
            operation: operation.clone(),
        }
    }

    /// `rct.cmd.<tower>.<target>.<op>`
    pub fn command(operation: &OperationName, target: &Target) -> Self {
        Subject::Command {
            operation: operation.clone(),
            target: target.clone(),
        }
    }

    /// `rct.evt.<tower>.<target>.<command_id>.<kind>`
    pub fn event(tower: &Tower, target: &Target, command_id: CommandId, kind: EventKind) -> Self {
        Subject::Event {
            tower: tower.clone(),
            target: target.clone(),
            command_id,
            kind,
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Submit { operation } => write!(
                f,
                "{ROOT}.{SUBMIT}.{}.{}",
                operation.tower(),
                operation.op()
            ),
            Subject::Command { operation, target } => write!(
                f,
                "{ROOT}.{CMD}.{}.{target}.{}",
                operation.tower(),
                operation.op()
            ),
            Subject::Event {
                tower,
                target,
                command_id,
                kind,
            } => write!(f, "{ROOT}.{EVT}.{tower}.{target}.{command_id}.{kind}"),
            Subject::Login => write!(f, "{ROOT}.{AUTH}.{LOGIN}"),
            Subject::DevToken => write!(f, "{ROOT}.{AUTH}.{DEV_TOKEN}"),
            Subject::Enrol { tower, target } => write!(f, "{ROOT}.{AUTH}.{ENROL}.{tower}.{target}"),
        }
    }
}

impl From<Subject> for String {
    fn from(subject: Subject) -> String {
        subject.to_string()
    }
}

impl FromStr for Subject {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason| Error::InvalidSubject {
            subject: s.to_owned(),
            reason,
        };
        let tokens: Vec<&str> = s.split('.').collect();
        let op = |tower: &str, op: &str| -> Result<OperationName> {
            Ok(OperationName::new(Tower::new(tower)?, OpName::new(op)?))
        };
        match tokens.as_slice() {
            [ROOT, SUBMIT, tower, name] => Ok(Subject::Submit {
                operation: op(tower, name)?,
            }),
            [ROOT, CMD, tower, target, name] => Ok(Subject::Command {
                operation: op(tower, name)?,
                target: Target::new(*target)?,
            }),
            [ROOT, EVT, tower, target, id, kind] => Ok(Subject::Event {
                tower: Tower::new(*tower)?,
                target: Target::new(*target)?,
                command_id: id.parse()?,
                kind: kind.parse()?,
            }),
            [ROOT, AUTH, LOGIN] => Ok(Subject::Login),
            [ROOT, AUTH, DEV_TOKEN] => Ok(Subject::DevToken),
            [ROOT, AUTH, ENROL, tower, target] => Ok(Subject::Enrol {
                tower: Tower::new(*tower)?,
                target: Target::new(*target)?,
            }),
            [ROOT, ..] => Err(invalid("not a known rct subject shape")),
            _ => Err(invalid("does not start with \"rct.\"")),
        }
    }
}

/// The tower, command and kind of an event stored before event subjects named their target
/// (`rct.evt.<tower>.<command_id>.<kind>`), so that history written then stays readable.
/// Nobody may write such a subject any more: the shipped permissions grant only the
/// six-token form.
pub fn legacy_event(subject: &str) -> Option<(Tower, CommandId, EventKind)> {
    match subject.split('.').collect::<Vec<_>>().as_slice() {
        [ROOT, EVT, tower, id, kind] => Some((
            Tower::new(*tower).ok()?,
            id.parse().ok()?,
            kind.parse().ok()?,
        )),
        _ => None,
    }
}

/// `rct.submit.>`: every submission (the `RCT_SUBMIT` stream).
pub fn all_submissions() -> String {
    format!("{ROOT}.{SUBMIT}.>")
}

/// `rct.cmd.>`: every admitted command (the `RCT_CMD` stream).
pub fn all_commands() -> String {
    format!("{ROOT}.{CMD}.>")
}

/// `rct.auth.enrol.>`: every agent's enrolment (admission answers them).
pub fn enrolments() -> String {
    format!("{ROOT}.{AUTH}.{ENROL}.>")
}

/// `rct.evt.>`: every event (the `RCT_EVT` stream).
pub fn all_events() -> String {
    format!("{ROOT}.{EVT}.>")
}

/// `rct.cmd.<tower>.>`: the work queue of a simple tower.
pub fn commands_for_tower(tower: &Tower) -> String {
    format!("{ROOT}.{CMD}.{tower}.>")
}

/// `rct.cmd.<tower>.<target>.>`: the commands of one cluster agent.
pub fn commands_for_target(tower: &Tower, target: &Target) -> String {
    format!("{ROOT}.{CMD}.{tower}.{target}.>")
}

/// `rct.evt.<tower>.>`: the history of every command of a tower.
pub fn events_for_tower(tower: &Tower) -> String {
    format!("{ROOT}.{EVT}.{tower}.>")
}

/// `rct.evt.<tower>.*.*.<kind>`: one kind of event of every command of a tower.
pub fn events_of_tower_kind(tower: &Tower, kind: EventKind) -> String {
    format!("{ROOT}.{EVT}.{tower}.*.*.{kind}")
}

/// `rct.evt.*.*.<command_id>.>`: everything written under one command's id, at any target
/// (readers keep what is at the command's own target).
pub fn events_for_command(command_id: CommandId) -> String {
    format!("{ROOT}.{EVT}.*.*.{command_id}.>")
}

/// `rct.evt.*.*.<command_id>.<kind>`: one kind of event written under one command's id, at
/// any target.
pub fn events_of_kind(command_id: CommandId, kind: EventKind) -> String {
    format!("{ROOT}.{EVT}.*.*.{command_id}.{kind}")
}

/// `rct.evt.*._rollout.*.decision`: the decision of every rollout.
pub fn rollout_decisions() -> String {
    format!(
        "{ROOT}.{EVT}.*.{}.*.{}",
        crate::rollout::PARENT_TARGET,
        EventKind::Decision
    )
}

/// `rct.evt.*.*.*.<kind>`: one kind of event of every command.
pub fn events_of_every_command(kind: EventKind) -> String {
    format!("{ROOT}.{EVT}.*.*.*.{kind}")
}

/// `rct.evt.<tower>.*.<command_id>.<kind>`: one kind of event written under one command's id
/// in its tower, at any target.
pub fn events_of_tower_command(tower: &Tower, command_id: CommandId, kind: EventKind) -> String {
    format!("{ROOT}.{EVT}.{tower}.*.{command_id}.{kind}")
}

/// What an agent of `tower` on `target` may publish: `rct.evt.<tower>.<target>.*.<kind>` for
/// each kind only agents write ([`EventKind::is_written_by_agents`]). NATS permissions
/// (`ops/nats/accounts.conf`) spell exactly these.
pub fn agent_event_grants(tower: &Tower, target: &Target) -> Vec<String> {
    EventKind::ALL
        .into_iter()
        .filter(|k| k.is_written_by_agents())
        .map(|kind| format!("{ROOT}.{EVT}.{tower}.{target}.*.{kind}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain() -> OperationName {
        "traffic/drain-cluster".parse().unwrap()
    }

    #[test]
    fn subjects_are_spelled_as_the_contract_says() {
        let id: CommandId = "01JQ0000000000000000000000".parse().unwrap();
        let target = Target::new("prod-1").unwrap();
        let tower = Tower::new("traffic").unwrap();
        let cases = [
            (
                Subject::submit(&drain()),
                "rct.submit.traffic.drain-cluster",
            ),
            (
                Subject::command(&drain(), &target),
                "rct.cmd.traffic.prod-1.drain-cluster",
            ),
            (
                Subject::event(&tower, &target, id, EventKind::Claim),
                "rct.evt.traffic.prod-1.01JQ0000000000000000000000.claim",
            ),
            (Subject::Login, "rct.auth.login"),
            (Subject::DevToken, "rct.auth.dev-token"),
            (
                Subject::Enrol {
                    tower: Tower::new("traffic").unwrap(),
                    target: Target::new("prod-1").unwrap(),
                },
                "rct.auth.enrol.traffic.prod-1",
            ),
        ];
        for (subject, spelled) in cases {
            assert_eq!(subject.to_string(), spelled);
            assert_eq!(spelled.parse::<Subject>().unwrap(), subject);
        }
    }

    #[test]
    fn filters_are_spelled_as_the_contract_says() {
        let id: CommandId = "01JQ0000000000000000000000".parse().unwrap();
        let tower = Tower::new("traffic").unwrap();
        let target = Target::new("prod-1").unwrap();
        assert_eq!(all_submissions(), "rct.submit.>");
        assert_eq!(all_commands(), "rct.cmd.>");
        assert_eq!(all_events(), "rct.evt.>");
        assert_eq!(commands_for_tower(&tower), "rct.cmd.traffic.>");
        assert_eq!(
            commands_for_target(&tower, &target),
            "rct.cmd.traffic.prod-1.>"
        );
        assert_eq!(events_for_tower(&tower), "rct.evt.traffic.>");
        assert_eq!(
            events_for_command(id),
            "rct.evt.*.*.01JQ0000000000000000000000.>"
        );
        assert_eq!(
            events_of_kind(id, EventKind::Cancel),
            "rct.evt.*.*.01JQ0000000000000000000000.cancel"
        );
        assert_eq!(
            events_of_tower_command(&tower, id, EventKind::Decision),
            "rct.evt.traffic.*.01JQ0000000000000000000000.decision"
        );
        assert_eq!(
            agent_event_grants(&tower, &target),
            [
                "rct.evt.traffic.prod-1.*.claim",
                "rct.evt.traffic.prod-1.*.progress",
                "rct.evt.traffic.prod-1.*.log",
                "rct.evt.traffic.prod-1.*.plan",
                "rct.evt.traffic.prod-1.*.outcome",
            ]
        );
    }

    #[test]
    fn events_stored_before_subjects_named_their_target_are_read() {
        let id: CommandId = "01JQ0000000000000000000000".parse().unwrap();
        let (tower, command, kind) =
            legacy_event("rct.evt.traffic.01JQ0000000000000000000000.claim").unwrap();
        assert_eq!(
            (tower.as_str(), command, kind),
            ("traffic", id, EventKind::Claim)
        );
        for other in [
            "rct.evt.traffic.prod-1.01JQ0000000000000000000000.claim",
            "rct.evt.traffic.not-an-id.claim",
            "rct.evt.traffic.01JQ0000000000000000000000.claimed",
        ] {
            assert!(legacy_event(other).is_none(), "{other}");
        }
    }

    #[test]
    fn parsing_refuses_what_no_builder_makes() {
        for bad in [
            "",
            "rct",
            "nats.submit.a.b",
            "rct.submit.a",
            "rct.submit.a.b.c",
            "rct.submit.a*.b",
            "rct.cmd.a.>.b",
            "rct.evt.a.b.not-an-id.claim",
            "rct.evt.a.b.01JQ0000000000000000000000.claimed",
            "rct.evt.a.01JQ0000000000000000000000.claim",
            "rct.evt.a.b*.01JQ0000000000000000000000.claim",
            "rct.submit..b",
            "rct.submit.a b.c",
        ] {
            assert!(bad.parse::<Subject>().is_err(), "{bad:?} parsed");
        }
    }
}
