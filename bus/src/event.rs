//! Event kinds: the last token of `rct.evt.<tower>.<target>.<command_id>.<kind>`.

use std::fmt;
use std::str::FromStr;

use crate::proto::event::Kind;
use crate::{Error, Result, proto};

/// Which slot of a command's history an event goes to.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum EventKind {
    /// Admission's verdict: `Admitted` or `Rejected`. One per command.
    Decision,
    /// A verified request waiting for approvals. One per command.
    Pending,
    /// A sign-off (or a denial) by an approver.
    Approval,
    /// An agent's `Started`. One per command: whoever writes it runs the command.
    Claim,
    /// `Progress` from the running handler.
    Progress,
    /// A `Log` line from the running handler.
    Log,
    /// A `CancelRequested` recorded by admission.
    Cancel,
    /// The terminal event: succeeded, failed, expired, cancelled or unknown. One per command.
    Outcome,
    /// What a plan-only command's handler would change. One per command.
    Plan,
}

impl EventKind {
    /// Every kind, in lifecycle order.
    pub const ALL: [EventKind; 9] = [
        EventKind::Decision,
        EventKind::Pending,
        EventKind::Approval,
        EventKind::Claim,
        EventKind::Progress,
        EventKind::Log,
        EventKind::Cancel,
        EventKind::Plan,
        EventKind::Outcome,
    ];

    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Decision => "decision",
            EventKind::Pending => "pending",
            EventKind::Approval => "approval",
            EventKind::Claim => "claim",
            EventKind::Progress => "progress",
            EventKind::Log => "log",
            EventKind::Cancel => "cancel",
            EventKind::Outcome => "outcome",
            EventKind::Plan => "plan",
        }
    }

    /// Whether the subject holds at most one message per command, enforced by the server with
    /// `Nats-Expected-Last-Subject-Sequence: 0`.
    pub fn is_single_slot(self) -> bool {
        matches!(
            self,
            EventKind::Decision
                | EventKind::Pending
                | EventKind::Claim
                | EventKind::Outcome
                | EventKind::Plan
        )
    }

    /// Whether agents write this kind (their NATS permissions allow exactly these, for their
    /// own target): a claim, progress, a log line, a plan, an outcome. Decisions, approvals and cancel
    /// requests are admission's alone (admission may also write a claim and an outcome, to end
    /// a command unrun).
    pub fn is_written_by_agents(self) -> bool {
        matches!(
            self,
            EventKind::Claim
                | EventKind::Progress
                | EventKind::Log
                | EventKind::Plan
                | EventKind::Outcome
        )
    }

    /// The kind an event body belongs to, or `None` if it has no body.
    pub fn of(event: &proto::Event) -> Option<EventKind> {
        Some(match event.kind.as_ref()? {
            Kind::Rejected(_) | Kind::Admitted(_) => EventKind::Decision,
            Kind::Pending(_) => EventKind::Pending,
            Kind::Approval(_) => EventKind::Approval,
            Kind::Started(_) => EventKind::Claim,
            Kind::Progress(_) => EventKind::Progress,
            Kind::Log(_) => EventKind::Log,
            Kind::CancelRequested(_) => EventKind::Cancel,
            Kind::Plan(_) => EventKind::Plan,
            Kind::Succeeded(_)
            | Kind::Failed(_)
            | Kind::Expired(_)
            | Kind::Cancelled(_)
            | Kind::Unknown(_) => EventKind::Outcome,
        })
    }
}

impl FromStr for EventKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::InvalidName {
                what: "event kind",
                value: s.to_owned(),
                reason: "must be one of decision, pending, approval, claim, progress, log, cancel, plan, outcome",
            })
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an agent's note that it refused a copy of a command for good starts (a `Log` on
/// stream `AGENT` in that command's timeline: never a slot, so a forged copy cannot end a real
/// command).
pub const REFUSAL_NOTE: &str = "refused:";

/// How an agent's note starts when it refused a copy for now (a key it does not trust yet):
/// the copy is delivered again until its deadline, to this agent or another.
pub const REFUSAL_NOTE_FOR_NOW: &str = "refused for now:";

/// An agent's refusal note (see [`REFUSAL_NOTE`], [`REFUSAL_NOTE_FOR_NOW`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusalNote<'a> {
    /// What the agent said.
    pub reason: &'a str,
    /// The copy was dropped: nothing will run it.
    pub dropped: bool,
}

/// The refusal in a note written by an agent, if `event` is one.
pub fn refusal_note(event: &proto::Event) -> Option<RefusalNote<'_>> {
    match event.kind.as_ref()? {
        proto::event::Kind::Log(log) if log.stream == proto::LogStream::Agent as i32 => {
            if let Some(reason) = log.line.strip_prefix(REFUSAL_NOTE_FOR_NOW) {
                return Some(RefusalNote {
                    reason: reason.trim_start(),
                    dropped: false,
                });
            }
            log.line
                .strip_prefix(REFUSAL_NOTE)
                .map(|reason| RefusalNote {
                    reason: reason.trim_start(),
                    dropped: true,
                })
        }
        _ => None,
    }
}

/// The stable, lowercase name of a rejection code (`forbidden`, `invalid_params`, …), as shown
/// to people and used in metrics.
pub fn rejection_code_name(code: i32) -> &'static str {
    REJECTION_CODE_NAMES
        .iter()
        .find(|(c, _)| *c as i32 == code)
        .map_or("unspecified", |(_, name)| name)
}

const REJECTION_CODE_NAMES: [(proto::RejectionCode, &str); 26] = [
    (proto::RejectionCode::Malformed, "malformed"),
    (proto::RejectionCode::Unauthenticated, "unauthenticated"),
    (proto::RejectionCode::BadSignature, "bad_signature"),
    (proto::RejectionCode::Expired, "expired"),
    (proto::RejectionCode::Stale, "stale"),
    (proto::RejectionCode::Duplicate, "duplicate"),
    (proto::RejectionCode::UnknownOperation, "unknown_operation"),
    (proto::RejectionCode::Forbidden, "forbidden"),
    (proto::RejectionCode::InvalidParams, "invalid_params"),
    (
        proto::RejectionCode::JustificationRequired,
        "justification_required",
    ),
    (proto::RejectionCode::UnknownTarget, "unknown_target"),
    (proto::RejectionCode::UnknownCommand, "unknown_command"),
    (proto::RejectionCode::TooLarge, "too_large"),
    (proto::RejectionCode::TooMany, "too_many"),
    (proto::RejectionCode::Denied, "denied"),
    (proto::RejectionCode::ApprovalExpired, "approval_expired"),
    (proto::RejectionCode::CatalogChanged, "catalog_changed"),
    (proto::RejectionCode::NotPending, "not_pending"),
    (proto::RejectionCode::DigestMismatch, "digest_mismatch"),
    (proto::RejectionCode::AlreadyApproved, "already_approved"),
    (proto::RejectionCode::SelfApproval, "self_approval"),
    (proto::RejectionCode::Frozen, "frozen"),
    (proto::RejectionCode::Withdrawn, "withdrawn"),
    (proto::RejectionCode::PlanFailed, "plan_failed"),
    (proto::RejectionCode::Locked, "locked"),
    (proto::RejectionCode::NotUndoable, "not_undoable"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_tokens() {
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>().unwrap(), kind);
        }
        assert!("decided".parse::<EventKind>().is_err());
    }

    #[test]
    fn only_decision_pending_claim_plan_and_outcome_are_single_slot() {
        let single: Vec<_> = EventKind::ALL
            .into_iter()
            .filter(|k| k.is_single_slot())
            .collect();
        assert_eq!(
            single,
            [
                EventKind::Decision,
                EventKind::Pending,
                EventKind::Claim,
                EventKind::Plan,
                EventKind::Outcome
            ]
        );
    }

    #[test]
    fn every_rejection_code_has_its_protocol_name_in_lowercase() {
        let mut named = 0;
        for code in 1..1000 {
            let Ok(known) = proto::RejectionCode::try_from(code) else {
                continue;
            };
            let wanted = known
                .as_str_name()
                .strip_prefix("REJECTION_CODE_")
                .unwrap()
                .to_lowercase();
            assert_eq!(rejection_code_name(code), wanted);
            named += 1;
        }
        assert_eq!(named, REJECTION_CODE_NAMES.len());
    }

    #[test]
    fn rejection_codes_have_lowercase_names() {
        assert_eq!(
            rejection_code_name(proto::RejectionCode::Forbidden as i32),
            "forbidden"
        );
        assert_eq!(
            rejection_code_name(proto::RejectionCode::TooLarge as i32),
            "too_large"
        );
        assert_eq!(rejection_code_name(0), "unspecified");
        assert_eq!(rejection_code_name(999), "unspecified");
    }

    #[test]
    fn bodies_map_to_their_slots() {
        let event = |kind| proto::Event {
            kind: Some(kind),
            ..Default::default()
        };
        let cases = [
            (Kind::Admitted(Default::default()), EventKind::Decision),
            (Kind::Rejected(Default::default()), EventKind::Decision),
            (Kind::Started(Default::default()), EventKind::Claim),
            (Kind::Unknown(Default::default()), EventKind::Outcome),
            (Kind::Expired(Default::default()), EventKind::Outcome),
            (Kind::CancelRequested(Default::default()), EventKind::Cancel),
        ];
        for (kind, slot) in cases {
            assert_eq!(EventKind::of(&event(kind)), Some(slot));
        }
        assert_eq!(EventKind::of(&proto::Event::default()), None);
    }
}
