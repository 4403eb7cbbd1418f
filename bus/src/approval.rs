//! Approvals bound to exactly what runs: the request digest approvers sign, and the check an
//! agent makes of the approvals a command carries before it runs it.
//!
//! The digest is SHA-256 over a fixed label and, each preceded by its length, the submission
//! envelope's body bytes as admission received them, the catalog version it was checked
//! against, and, when the operation plans, the plan its handler made: the protobuf encoding
//! of the `Plan` its plan event holds (prost's encoding of a message without maps is
//! deterministic, so every reader of that event gets the same bytes, and the plan a command
//! carries gives them too). Anyone holding the stored bytes recomputes it.

use std::collections::BTreeSet;

use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::catalog::{Approvals, BreakGlass, Operation, Secrets, TowerSpec};
use crate::proto::{self, submission::Request};
use crate::{Purpose, Unverified, Verifier, certificate};

/// What the digest starts with: a digest made for anything else never matches.
const LABEL: &[u8] = b"rct/v1/request-digest\n";

/// The request digest of a submission body checked against `catalog_version`, with the plan
/// the approvers saw, if any.
pub fn digest(
    submission_body: &[u8],
    catalog_version: &str,
    plan: Option<&proto::Plan>,
) -> [u8; 32] {
    // A plan, even one that changes nothing, is never taken for no plan at all.
    let plan = plan.map_or_else(Vec::new, |plan| {
        let mut bytes = vec![1];
        plan.encode(&mut bytes).expect("a Vec grows");
        bytes
    });
    let mut hash = Sha256::new();
    hash.update(LABEL);
    for part in [submission_body, catalog_version.as_bytes(), &plan] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

/// A digest as people compare it: lowercase hex.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// One approval, checked: who signed it, and when they said they did.
#[derive(Clone, Debug)]
pub struct Approver {
    /// As the approver's certificate names them.
    pub operator: proto::Operator,
    /// The approval's `requested_at`, seconds since the epoch.
    pub at: u64,
}

/// A signed submission from an operator, checked: its certificate is admission's (by a key
/// of `trusted`), the signature is by the key the certificate binds, and the certificate held
/// when the submission says it was made. `what` names it in errors ("it", "its request").
fn signed(
    envelope: &proto::SignedEnvelope,
    trusted: &Verifier,
    what: &str,
) -> Result<(Approver, proto::Submission), String> {
    let unverified = Unverified::from_proto(envelope.clone());
    let certified = certificate::verify(unverified.certificate(), trusted)
        .map_err(|e| format!("{what}: its certificate does not verify: {e}"))?;
    if unverified.key_id() != certified.session_key.id().as_str() {
        return Err(format!(
            "{what} is not signed by the key its certificate binds"
        ));
    }
    let submission: proto::Submission = unverified
        .verify_with(&certified.session_key, Purpose::Submission)
        .map_err(|_| format!("{what}: its signature does not verify"))?
        .decode()
        .map_err(|_| format!("{what} is not a submission"))?;
    let at = submission
        .requested_at
        .map(|t| u64::try_from(t.seconds).unwrap_or(0))
        .ok_or_else(|| format!("{what} carries no time"))?;
    certified
        .holds_at(at)
        .map_err(|e| format!("when {what} was made, {e}"))?;
    Ok((
        Approver {
            operator: certified.operator,
            at,
        },
        submission,
    ))
}

/// Checks one signed approval (see [`signed`]): it approves `command_id` of `operation` with
/// `digest`. Returns the approver; the error says what is wrong, for people.
pub fn verify_one(
    envelope: &proto::SignedEnvelope,
    operation: &str,
    command_id: &str,
    digest: &[u8],
    trusted: &Verifier,
) -> Result<Approver, String> {
    let (approver, submission) = signed(envelope, trusted, "it")?;
    let Some(Request::Approve(approve)) = &submission.request else {
        return Err("it is not an approval".into());
    };
    if approve.command_id != command_id || submission.operation != operation {
        return Err(format!(
            "it approves {} of {}, not this command",
            approve.command_id, submission.operation
        ));
    }
    if approve.digest != digest {
        return Err(format!(
            "it approves digest {}, not this request's {}",
            hex(&approve.digest),
            hex(digest)
        ));
    }
    Ok(approver)
}

/// Checks that `command` is what its requester signed: the submission it carries verifies
/// (see [`signed`]), names the command's id (or, for the plan-only command that describes a
/// request, the id [`crate::CommandId::plan`] derives from it), operation, justification, dry
/// run, plan-only flag and break-glass reason, its parameters checked against `operation` give the command's
/// parameters and target, and its requester is the command's. What approvers approved is
/// that submission, so a command that differs from it in anything that runs is refused.
/// Returns the requester.
pub fn requested(
    command: &proto::Command,
    tower: &TowerSpec,
    operation: &Operation,
    trusted: &Verifier,
) -> Result<Approver, String> {
    let envelope = command
        .submission
        .as_ref()
        .ok_or("the command carries no request to check it against")?;
    let (requester, submission) = signed(envelope, trusted, "its request")?;
    let Some(Request::Run(run)) = &submission.request else {
        return Err("its request runs nothing".into());
    };
    let differs = |what: &str| Err(format!("its {what} is not the one its requester signed"));
    // A plan-only command admission sent to describe a request waiting for approvals has an
    // id of its own, derived from the request's; anything else has the request's id.
    let asked: Option<crate::CommandId> = submission.command_id.parse().ok();
    let id = if command.plan && !run.plan {
        asked.map(|id| id.plan().to_string())
    } else {
        asked.map(|id| id.to_string())
    };
    if id.as_deref() != Some(command.command_id.as_str()) {
        return differs("id");
    }
    if run.plan && !command.plan {
        return differs("plan-only flag");
    }
    if submission.operation != command.operation {
        return differs("operation");
    }
    if submission.justification != command.justification {
        return differs("justification");
    }
    if run.dry_run != command.dry_run {
        return differs("dry-run flag");
    }
    if run.break_glass != command.break_glass {
        return differs("break-glass reason");
    }
    if command.operator.as_ref().map(|o| &o.subject) != Some(&requester.operator.subject) {
        return differs("requester");
    }
    let checked = operation
        .check(tower, &run.params, Secrets::Sealed)
        .map_err(|_| "its requester's parameters do not check against the catalog".to_owned())?;
    if checked.params != command.params {
        return differs("parameters");
    }
    if checked.target.as_str() != command.target {
        return differs("target");
    }
    Ok(requester)
}

/// Checks that `command`, asked for by `requester` (see [`requested`]), carries what `rule`
/// asks: `required` approvals by distinct members of the approver groups, each verified by
/// [`verify_one`] against the command's own request digest (recomputed from the submission it
/// carries, and the plan it carries when the operation plans), none by the requester unless
/// the rule allows it, none made after the command was admitted. Returns the approvers.
pub fn verify(
    command: &proto::Command,
    requester: &Approver,
    rule: &Approvals,
    trusted: &Verifier,
) -> Result<Vec<Approver>, String> {
    let submission = command
        .submission
        .as_ref()
        .ok_or("the command carries no submission to recompute its digest from")?;
    let digest = digest(
        &submission.body,
        &command.catalog_version,
        command.approved_plan.as_ref(),
    );
    let admitted_at = command
        .admitted_at
        .map_or(0, |t| u64::try_from(t.seconds).unwrap_or(0));
    let mut seen = BTreeSet::new();
    let mut approvers = Vec::new();
    for (n, envelope) in command.approvals.iter().enumerate() {
        let approver = verify_one(
            envelope,
            &command.operation,
            &command.command_id,
            &digest,
            trusted,
        )
        .map_err(|e| format!("approval {} of {}: {e}", n + 1, command.approvals.len()))?;
        let name = &approver.operator.subject;
        if !rule.admits(&approver.operator.groups) {
            return Err(format!(
                "approval {} is by {name}, who is in none of the approver groups ({})",
                n + 1,
                rule.approver_groups.join(", ")
            ));
        }
        if !rule.allow_self && requester.operator.subject == *name {
            return Err(format!("approval {} is by {name}, who asked for it", n + 1));
        }
        // Seconds, as signed: a second's grace for the clocks of approver and admission.
        if approver.at > admitted_at + 1 {
            return Err(format!(
                "approval {} by {name} is dated after the command was admitted",
                n + 1
            ));
        }
        if seen.insert(name.clone()) {
            approvers.push(approver);
        }
    }
    if approvers.len() < rule.required as usize {
        return Err(format!(
            "it carries {} distinct approvals; the operation needs {}",
            approvers.len(),
            rule.required
        ));
    }
    Ok(approvers)
}

/// Checks that a command run by breaking the glass was asked for, by `requester` (see
/// [`requested`]), a member of the operation's break-glass groups.
pub fn verify_break_glass(requester: &Approver, rule: &BreakGlass) -> Result<(), String> {
    if !rule
        .groups
        .iter()
        .any(|g| requester.operator.groups.contains(g))
    {
        return Err(format!(
            "it broke the glass for {}, who is in none of the break-glass groups ({})",
            requester.operator.subject,
            rule.groups.join(", ")
        ));
    }
    Ok(())
}

/// The signed approval an approver sends for `command_id` of `operation` (the body of an
/// envelope they sign as a submission).
pub fn request(command_id: &str, digest: &[u8], deny: bool) -> Request {
    if deny {
        Request::Deny(proto::Deny {
            command_id: command_id.to_owned(),
            digest: digest.to_vec(),
        })
    } else {
        Request::Approve(proto::Approve {
            command_id: command_id.to_owned(),
            digest: digest.to_vec(),
        })
    }
}

/// The digest a `pending` event's stored bytes give, recomputed (what an approver's client
/// compares with the digest the event states before signing).
pub fn recompute(pending: &proto::Pending, plan: Option<&proto::Plan>) -> Option<[u8; 32]> {
    let submission = pending.submission.as_ref()?;
    // The body must be a submission: a digest over anything else approves nothing.
    proto::Submission::decode(submission.body.as_slice()).ok()?;
    Some(digest(&submission.body, &pending.catalog_version, plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_binds_every_part_and_where_one_ends() {
        let base = digest(b"body", "v1", None);
        assert_ne!(base, digest(b"body!", "v1", None));
        assert_ne!(base, digest(b"body", "v2", None));
        let plan = proto::Plan {
            summary: "promote db-2".into(),
            changes: Vec::new(),
        };
        assert_ne!(base, digest(b"body", "v1", Some(&plan)));
        // Bytes moved from one part to the next make another digest.
        assert_ne!(digest(b"bodyv", "1", None), base);
        // A plan that changes nothing is still a plan.
        assert_ne!(base, digest(b"body", "v1", Some(&proto::Plan::default())));
        let mut other = plan.clone();
        other.changes.push(proto::Change {
            action: "promote".into(),
            resource: "db-2".into(),
            detail: String::new(),
        });
        assert_ne!(
            digest(b"body", "v1", Some(&plan)),
            digest(b"body", "v1", Some(&other))
        );
    }

    #[test]
    fn a_pending_event_whose_bytes_are_no_submission_gives_no_digest() {
        let mut pending = proto::Pending {
            submission: Some(proto::SignedEnvelope {
                body: vec![0xff, 0xff, 0xff],
                ..Default::default()
            }),
            catalog_version: "v1".into(),
            ..Default::default()
        };
        assert_eq!(recompute(&pending, None), None);
        let body = proto::Submission::default().encode_to_vec();
        pending.submission.as_mut().unwrap().body.clone_from(&body);
        assert_eq!(recompute(&pending, None), Some(digest(&body, "v1", None)));
    }
}
