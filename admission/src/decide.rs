//! The decision: one submission in, a verdict out. Pure apart from the clock it is given, so
//! every refusal can be tested without a server.
//!
//! Order: size → subject → envelope → identity (certificate or service key) → signature →
//! body (its justification one printable line) → freshness → operation → groups →
//! parameters → justification rule. The first failure
//! decides, with a stable code and a sentence the operator can act on.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use rct_bus::catalog::{Catalog, Operation, Secrets, TowerSpec, display_value};
use rct_bus::proto::{self, RejectionCode, event::Kind, submission::Request};
use rct_bus::{CommandId, KeyPair, OperationName, Purpose, Subject, Tower, Unverified, rollout};
use rct_streams::timestamp::{from_datetime, to_datetime};
use time::OffsetDateTime;

use crate::identity::{Certificates, Identity, Services};

/// Tower token used for events about submissions whose subject names no valid tower.
pub const UNKNOWN_TOWER: &str = "_unknown";

/// The longest text a refusal quotes from what it refuses (a target, a parameter, a key id, a
/// token's issuer), in bytes once made printable: a refusal can never be too large to record.
pub const QUOTED_MAX: usize = 1024;

/// What admission needs to decide: fixed for the life of the process.
#[derive(Debug)]
pub struct Policy {
    /// The operation catalog.
    pub catalog: Catalog,
    /// Its version, recorded in every admitted command.
    pub catalog_version: String,
    /// Operator certificates.
    pub certificates: Certificates,
    /// Registered service identities.
    pub services: Services,
    /// Admission's command-signing key.
    pub key: KeyPair,
    /// How old a submission may be when admission first sees it.
    pub freshness: Duration,
    /// How far ahead of admission's clock a submission's time may be.
    pub clock_skew: Duration,
    /// Largest submission accepted, in bytes.
    pub max_payload: usize,
    /// Written as the source of every event (`admission/<instance>`).
    pub source: String,
}

/// One submission as delivered.
#[derive(Clone, Copy, Debug)]
pub struct Submitted<'a> {
    /// The subject it was published on.
    pub subject: &'a str,
    /// Its bytes.
    pub payload: &'a [u8],
    /// Its sequence in `RCT_SUBMIT`.
    pub sequence: u64,
    /// Admission's clock.
    pub now: OffsetDateTime,
}

/// What to record and publish for a submission.
// One verdict per submission, moved a couple of times: boxing would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Verdict {
    /// Run it.
    Admit(Admit),
    /// Record a cancellation request against another command.
    Cancel(Cancel),
    /// Refuse it.
    Reject(Reject),
    /// Park it: it waits for approvals.
    Park(Park),
    /// Record an approval or a denial of another command (checked against that command's
    /// pending request by the service, which reads it).
    Approve(Approve),
    /// Record the decision, and nothing more: a freeze started or ended.
    Record(Record),
}

/// A decision that is the whole of what its submission asked for.
#[derive(Clone, Debug)]
pub struct Record {
    /// The tower it is recorded under.
    pub tower: Tower,
    /// The submission's command id.
    pub command_id: CommandId,
    /// The `Admitted` decision.
    pub decision: proto::Event,
}

impl Verdict {
    /// The tower it is recorded under, the submission's own command id (when it has a valid
    /// one), and the event that goes into that id's first slot: the decision, or the pending
    /// request.
    pub fn parts(&self) -> (&Tower, Option<CommandId>, &proto::Event) {
        match self {
            Verdict::Admit(a) => (&a.tower, Some(a.command_id), &a.decision),
            Verdict::Cancel(c) => (&c.tower, Some(c.command_id), &c.decision),
            Verdict::Reject(r) => (&r.tower, r.command_id, &r.decision),
            Verdict::Park(p) => (&p.tower, Some(p.command_id), &p.pending),
            Verdict::Approve(a) => (&a.tower, Some(a.command_id), &a.decision),
            Verdict::Record(r) => (&r.tower, Some(r.command_id), &r.decision),
        }
    }
}

/// A verified request that waits for approvals.
#[derive(Clone, Debug)]
pub struct Park {
    /// The owning tower.
    pub tower: Tower,
    /// The command.
    pub command_id: CommandId,
    /// The `Pending` event.
    pub pending: proto::Event,
}

/// An approver's word on another command, verified and from an approver group.
#[derive(Clone, Debug)]
pub struct Approve {
    /// The owning tower.
    pub tower: Tower,
    /// The approval's own id.
    pub command_id: CommandId,
    /// The command approved or denied.
    pub target: CommandId,
    /// The digest the approver signed.
    pub digest: Vec<u8>,
    /// A denial.
    pub deny: bool,
    /// A review of a break-glass command (no digest: it ran already).
    pub review: bool,
    /// The approval request's own `Admitted` decision (its target is set to the command
    /// approved once that command is found).
    pub decision: proto::Event,
}

/// An admitted operation.
#[derive(Clone, Debug)]
pub struct Admit {
    /// The owning tower.
    pub tower: Tower,
    /// The command.
    pub command_id: CommandId,
    /// The `Admitted` decision event.
    pub decision: proto::Event,
    /// Where the command goes.
    pub subject: Subject,
    /// The admission-signed `Command` envelope, encoded.
    pub command: Bytes,
}

/// An authorized cancellation request.
#[derive(Clone, Debug)]
pub struct Cancel {
    /// The owning tower.
    pub tower: Tower,
    /// The cancellation request's own id.
    pub command_id: CommandId,
    /// The command to cancel.
    pub target: CommandId,
    /// The `Admitted` decision for the request itself.
    pub decision: proto::Event,
    /// The `CancelRequested` event for the target command.
    pub cancel: proto::Event,
}

/// A refused submission.
#[derive(Clone, Debug)]
pub struct Reject {
    /// The tower from the subject, or [`UNKNOWN_TOWER`].
    pub tower: Tower,
    /// The submission's own command id, when it has a valid one.
    pub command_id: Option<CommandId>,
    /// The `Rejected` decision event (its `command_id` is set by whoever records it when the
    /// submission had none).
    pub decision: proto::Event,
}

impl Reject {
    /// The rejection code.
    pub fn code(&self) -> RejectionCode {
        match &self.decision.kind {
            Some(Kind::Rejected(r)) => {
                RejectionCode::try_from(r.code).unwrap_or(RejectionCode::Unspecified)
            }
            _ => RejectionCode::Unspecified,
        }
    }

    /// The sentence for the operator.
    pub fn message(&self) -> &str {
        match &self.decision.kind {
            Some(Kind::Rejected(r)) => &r.message,
            _ => "",
        }
    }
}

/// What is known about a submission while it is being decided; fills the rejection event.
struct Draft {
    tower: Tower,
    operation: String,
    target: String,
    command_id: Option<CommandId>,
    request: proto::Request,
}

impl Policy {
    /// Decides one submission.
    pub fn decide(&self, input: Submitted<'_>) -> Verdict {
        let mut draft = Draft {
            tower: Tower::new(UNKNOWN_TOWER).expect("a valid token"),
            operation: String::new(),
            target: String::new(),
            command_id: None,
            request: proto::Request {
                submission_sequence: input.sequence,
                ..Default::default()
            },
        };
        match self.check(input, &mut draft) {
            Ok(verdict) => verdict,
            Err((code, message)) => Verdict::Reject(self.reject(draft, input.now, code, message)),
        }
    }

    fn check(
        &self,
        input: Submitted<'_>,
        draft: &mut Draft,
    ) -> Result<Verdict, (RejectionCode, String)> {
        use RejectionCode as C;

        // The subject names the tower, so even garbage is recorded under the right tower.
        let subject_op = match input.subject.parse::<Subject>() {
            Ok(Subject::Submit { operation }) => {
                draft.tower = operation.tower().clone();
                draft.operation = operation.to_string();
                Some(operation)
            }
            _ => None,
        };
        if input.payload.len() > self.max_payload {
            return Err((
                C::TooLarge,
                format!(
                    "the submission is {} bytes; the limit is {} bytes",
                    input.payload.len(),
                    self.max_payload
                ),
            ));
        }
        let Some(subject_op) = subject_op else {
            return Err((
                C::Malformed,
                format!(
                    "submissions go to rct.submit.<tower>.<op>, and {:?} is not such a subject",
                    input.subject
                ),
            ));
        };
        let envelope = Unverified::decode(input.payload).map_err(|_| {
            (
                C::Malformed,
                "the submission is not a signed envelope; submit with rct or the rct-bus library"
                    .to_owned(),
            )
        })?;
        // The sender's word, before anything is verified: recorded and quoted only when it
        // has the form of a key id.
        let well_formed = rct_bus::KeyId::is_well_formed(envelope.key_id());
        let key_id = if well_formed {
            envelope.key_id()
        } else {
            "(not a key id)"
        };
        if well_formed {
            draft.request.key_id = key_id.to_owned();
        }
        if envelope.purpose() != Purpose::Submission {
            return Err((
                C::BadSignature,
                format!(
                    "the envelope is signed for {}, not as a submission",
                    envelope.purpose()
                ),
            ));
        }

        // A service signs with its registered key alone; agents, which check requesters and
        // approvers themselves, know only certificates.
        let service = envelope.certificate().is_empty();
        let (identity, key) = if service {
            let (key, identity) = self.services.get(envelope.key_id()).ok_or_else(|| {
                (
                    C::Unauthenticated,
                    format!(
                        "the submission carries no operator certificate, and its key {key_id} is \
                         not a registered service; run rct login"
                    ),
                )
            })?;
            (identity.clone(), key.clone())
        } else {
            let certificate = self
                .certificates
                .verify(envelope.certificate())
                .map_err(|r| (r.code, r.message))?;
            (certificate.identity, certificate.session_key)
        };
        // The operator is recorded only once the signature proves it: certificates are not
        // secret (they travel in the streams), so a certificate alone names nobody.
        if envelope.key_id() != key.id().as_str() {
            return Err((
                C::BadSignature,
                format!(
                    "the submission is signed by key {key_id}, but the certificate binds key {}",
                    key.id()
                ),
            ));
        }
        let verified = envelope
            .verify_with(&key, Purpose::Submission)
            .map_err(|_| {
                (
                    C::BadSignature,
                    "the submission's signature does not verify: it was changed after signing"
                        .to_owned(),
                )
            })?;
        draft.request.operator = Some(identity.to_proto());
        let submission: proto::Submission = verified.decode().map_err(|_| {
            (
                C::Malformed,
                "the signed body is not a submission".to_owned(),
            )
        })?;

        let command_id: CommandId = submission.command_id.parse().map_err(|_| {
            (
                C::Malformed,
                format!("command id {:?} is not a ULID", submission.command_id),
            )
        })?;
        draft.command_id = Some(command_id);
        // Before any other check, so that no refusal records it: a justification is one line
        // of printable text, of bounded length.
        if let Some(problem) = rct_bus::text::justification_problem(&submission.justification) {
            return Err((C::Malformed, problem));
        }
        draft.request.justification = submission.justification.clone();
        if let Some(Request::Run(run)) = &submission.request {
            // Known from here on, so every later refusal says what was asked for; parameters
            // stay masked until the catalog says which are not secret.
            draft.target = run.target.clone();
            if run.rollout.is_some() {
                draft.target = rollout::PARENT_TARGET.to_owned();
            }
            draft.request.dry_run = run.dry_run;
            draft.request.plan = run.plan;
            draft.request.params = rct_bus::catalog::mask_all(&run.params);
            if !run.undo_of.is_empty() {
                if run.undo_of.parse::<CommandId>().is_err() {
                    return Err((
                        C::Malformed,
                        format!(
                            "the command to undo, {:?}, is not a command id",
                            run.undo_of
                        ),
                    ));
                }
                draft.request.undo_of = run.undo_of.clone();
            }
            // Held to what a justification is, before any refusal records it.
            if !run.break_glass.is_empty() {
                if let Some(problem) =
                    rct_bus::text::line_problem("the break-glass reason", &run.break_glass)
                {
                    return Err((C::Malformed, problem));
                }
                draft.request.break_glass = run.break_glass.clone();
            }
        }
        if submission.operation != draft.operation {
            return Err((
                C::Malformed,
                format!(
                    "the submission names {} but was published for {}",
                    submission.operation, draft.operation
                ),
            ));
        }

        let requested_at = submission
            .requested_at
            .as_ref()
            .and_then(to_datetime)
            .ok_or_else(|| {
                (
                    C::Malformed,
                    "the submission has no requested_at".to_owned(),
                )
            })?;
        draft.request.requested_at = submission.requested_at;
        if earlier(input.now, self.freshness).is_some_and(|oldest| requested_at < oldest) {
            return Err((
                C::Stale,
                format!(
                    "the submission was made at {requested_at}, more than {} before admission \
                     saw it; submit it again",
                    humantime::format_duration(self.freshness)
                ),
            ));
        }
        if later(input.now, self.clock_skew).is_some_and(|latest| requested_at > latest) {
            return Err((
                C::Stale,
                format!(
                    "the submission is dated {requested_at}, ahead of admission's clock; check \
                     this machine's clock"
                ),
            ));
        }
        if let Some(expires_at) = submission.expires_at.as_ref().and_then(to_datetime)
            && expires_at < input.now
        {
            return Err((
                C::Expired,
                format!(
                    "the submission expired at {expires_at}, before admission saw it; submit it \
                     again"
                ),
            ));
        }

        if subject_op.tower().as_str() == rct_bus::freeze::TOWER {
            return self.freeze(
                input.now,
                draft,
                &subject_op,
                &identity,
                command_id,
                submission,
            );
        }
        let (tower_spec, operation) = self.catalog.operation(&subject_op).ok_or_else(|| {
            (
                C::UnknownOperation,
                self.catalog.unknown_operation(&subject_op),
            )
        })?;
        if let Some(Request::Run(run)) = &submission.request {
            // The operation says which parameters are secret: the others are on record, in
            // clear, from here on (a refusal says what was asked for).
            draft.request.params = operation.mask(&run.params);
        }
        let approving = matches!(
            submission.request,
            Some(Request::Approve(_) | Request::Deny(_) | Request::Review(_))
        );
        let deny = matches!(submission.request, Some(Request::Deny(_)));
        let allowed = operation
            .allowed_groups
            .iter()
            .any(|g| identity.groups.contains(g));
        if !allowed && !approving {
            return Err((
                C::Forbidden,
                format!(
                    "{} is not in any of the groups allowed to run {}: {}",
                    identity.name(),
                    subject_op,
                    operation.allowed_groups.join(", ")
                ),
            ));
        }

        if service {
            let what = match &submission.request {
                Some(Request::Approve(_)) => Some("approve"),
                Some(Request::Deny(_)) => Some("deny"),
                Some(Request::Review(_)) => Some("review"),
                Some(Request::Run(run)) if !run.break_glass.is_empty() => {
                    Some("break the glass of")
                }
                Some(Request::Run(run)) if operation.approvals.is_some() && !run.plan => {
                    Some("request")
                }
                _ => None,
            };
            if let Some(what) = what {
                return Err((
                    C::Forbidden,
                    format!(
                        "{} signs as a registered service, and only an operator may {what} \
                         {subject_op}: agents check the requester's and approvers' certificates \
                         themselves; sign in with rct login",
                        identity.name()
                    ),
                ));
            }
        }
        match submission.request {
            Some(Request::Run(run)) => self.admit(
                input,
                draft,
                &subject_op,
                tower_spec,
                operation,
                identity,
                command_id,
                &submission.justification,
                run,
                verified,
            ),
            Some(Request::Cancel(cancel)) => {
                let target: CommandId = cancel.command_id.parse().map_err(|_| {
                    (
                        C::Malformed,
                        format!(
                            "cancel names command {:?}, which is not a ULID",
                            cancel.command_id
                        ),
                    )
                })?;
                draft.request.cancels = target.to_string();
                draft.request.resume = cancel.resume;
                // Stopping it is changing production too: the operation's rule applies.
                operation
                    .justification
                    .check(&subject_op.to_string(), &submission.justification)
                    .map_err(|message| (C::JustificationRequired, message))?;
                Ok(Verdict::Cancel(self.cancel(
                    input.now,
                    draft,
                    command_id,
                    target,
                    &identity,
                    &submission.justification,
                )))
            }
            Some(Request::Approve(proto::Approve {
                command_id: id,
                digest,
            }))
            | Some(Request::Deny(proto::Deny {
                command_id: id,
                digest,
            })) => {
                let verb = if deny { "deny" } else { "approve" };
                let target: CommandId = id.parse().map_err(|_| {
                    (
                        C::Malformed,
                        format!("{verb} names command {id:?}, which is not a ULID"),
                    )
                })?;
                // Known from here on: every refusal says which request it was about.
                draft.request.approves = target.to_string();
                draft.request.deny = deny;
                let Some(rule) = &operation.approvals else {
                    return Err((
                        C::NotPending,
                        format!("{subject_op} needs no approvals; there is nothing to {verb}"),
                    ));
                };
                if !rule.admits(&identity.groups) {
                    return Err((
                        C::Forbidden,
                        format!(
                            "{} is not in any of the groups that approve {}: {}",
                            identity.name(),
                            subject_op,
                            rule.approver_groups.join(", ")
                        ),
                    ));
                }
                if deny {
                    // A denial says why: the operation's rule for a justification applies.
                    operation
                        .justification
                        .check(&subject_op.to_string(), &submission.justification)
                        .map_err(|message| (C::JustificationRequired, message))?;
                }
                let decision = self.event(
                    &command_id.to_string(),
                    &draft.operation,
                    "",
                    input.now,
                    Kind::Admitted(proto::Admitted {
                        request: Some(draft.request.clone()),
                        catalog_version: self.catalog_version.clone(),
                        ..Default::default()
                    }),
                );
                Ok(Verdict::Approve(Approve {
                    tower: draft.tower.clone(),
                    command_id,
                    target,
                    digest,
                    deny,
                    review: false,
                    decision,
                }))
            }
            Some(Request::Review(proto::Review { command_id: id })) => {
                let target: CommandId = id.parse().map_err(|_| {
                    (
                        C::Malformed,
                        format!("review names command {id:?}, which is not a ULID"),
                    )
                })?;
                draft.request.approves = target.to_string();
                draft.request.review = true;
                // Whoever may run it, approve it or break its glass may review it (never the
                // requester: the service checks that against the command).
                let groups = operation
                    .allowed_groups
                    .iter()
                    .chain(operation.approvals.iter().flat_map(|a| &a.approver_groups))
                    .chain(operation.break_glass.iter().flat_map(|b| &b.groups));
                let may: Vec<&String> = groups.collect();
                if !may.iter().any(|g| identity.groups.contains(g)) {
                    return Err((
                        C::Forbidden,
                        format!(
                            "{} is not in any of the groups that may review {}: {}",
                            identity.name(),
                            subject_op,
                            may.iter()
                                .map(|g| g.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                operation
                    .justification
                    .check(&subject_op.to_string(), &submission.justification)
                    .map_err(|message| (C::JustificationRequired, message))?;
                let decision = self.event(
                    &command_id.to_string(),
                    &draft.operation,
                    "",
                    input.now,
                    Kind::Admitted(proto::Admitted {
                        request: Some(draft.request.clone()),
                        catalog_version: self.catalog_version.clone(),
                        ..Default::default()
                    }),
                );
                Ok(Verdict::Approve(Approve {
                    tower: draft.tower.clone(),
                    command_id,
                    target,
                    digest: Vec::new(),
                    deny: false,
                    review: true,
                    decision,
                }))
            }
            Some(Request::Freeze(_)) => Err((
                C::Malformed,
                format!(
                    "a freeze request goes to {}/{}, not to an operation",
                    rct_bus::freeze::TOWER,
                    subject_op.tower()
                ),
            )),
            None => Err((
                C::Malformed,
                "the submission asks for nothing (neither run, cancel, approve, deny nor review)"
                    .to_owned(),
            )),
        }
    }

    /// `rct freeze start|end`: from a member of the catalog's `freeze_groups`, for a tower of
    /// the catalog, justified, for at most [`rct_bus::freeze::LONGEST_FREEZE`]. Recorded with
    /// the frozen tower as its target, so a tower's freezes are read from one subject.
    fn freeze(
        &self,
        now: OffsetDateTime,
        draft: &mut Draft,
        name: &OperationName,
        identity: &Identity,
        command_id: CommandId,
        submission: proto::Submission,
    ) -> Result<Verdict, (RejectionCode, String)> {
        use RejectionCode as C;
        let frozen = name.op().as_str();
        draft.target = frozen.to_owned();
        let Some(Request::Freeze(freeze)) = submission.request else {
            return Err((
                C::Malformed,
                format!("{name} takes only freeze requests (rct freeze start|end)"),
            ));
        };
        if !self.catalog.towers.contains_key(frozen) {
            return Err((
                C::UnknownOperation,
                format!("there is no tower {frozen} to freeze"),
            ));
        }
        if !self
            .catalog
            .freeze_groups
            .iter()
            .any(|g| identity.groups.contains(g))
        {
            return Err((
                C::Forbidden,
                format!(
                    "{} is not in any of the groups that may freeze towers: {}",
                    identity.name(),
                    if self.catalog.freeze_groups.is_empty() {
                        "none (the catalog names no freeze_groups)".to_owned()
                    } else {
                        self.catalog.freeze_groups.join(", ")
                    }
                ),
            ));
        }
        rct_bus::catalog::Justification {
            required: true,
            pattern: None,
        }
        .check(&name.to_string(), &submission.justification)
        .map_err(|message| (C::JustificationRequired, message))?;
        let until = if freeze.end {
            None
        } else {
            let longest = rct_bus::freeze::LONGEST_FREEZE;
            let duration = freeze
                .duration
                .and_then(|d| std::time::Duration::try_from(d).ok())
                .filter(|d| !d.is_zero() && *d <= longest)
                .ok_or_else(|| {
                    (
                        C::InvalidParams,
                        format!(
                            "a freeze lasts longer than zero and at most {} (rct freeze start \
                             --for 2h)",
                            humantime::format_duration(longest)
                        ),
                    )
                })?;
            Some(from_datetime(now + duration))
        };
        draft.request.freeze = Some(proto::FreezeRecord {
            until,
            end: freeze.end,
        });
        let decision = self.event(
            &command_id.to_string(),
            &draft.operation,
            frozen,
            now,
            Kind::Admitted(proto::Admitted {
                request: Some(draft.request.clone()),
                catalog_version: self.catalog_version.clone(),
                ..Default::default()
            }),
        );
        Ok(Verdict::Record(Record {
            tower: draft.tower.clone(),
            command_id,
            decision,
        }))
    }

    /// The freeze in force for `tower` at `now`, if any: the catalog's windows and `recorded`
    /// (the freezes started on record), the one that ends last.
    pub fn frozen(
        &self,
        tower: &Tower,
        now: OffsetDateTime,
        recorded: &[rct_bus::freeze::Active],
    ) -> Option<rct_bus::freeze::Active> {
        let now = jiff::Timestamp::from_nanosecond(now.unix_timestamp_nanos()).ok()?;
        rct_bus::freeze::active(&self.catalog.freezes, tower.as_str(), now)
            .into_iter()
            .chain(recorded.iter().filter(|a| now < a.until).cloned())
            .max_by_key(|a| a.until)
    }

    #[allow(clippy::too_many_arguments)]
    fn admit(
        &self,
        input: Submitted<'_>,
        draft: &mut Draft,
        name: &OperationName,
        tower_spec: &TowerSpec,
        operation: &Operation,
        identity: Identity,
        command_id: CommandId,
        justification: &str,
        run: proto::Run,
        verified: rct_bus::Verified,
    ) -> Result<Verdict, (RejectionCode, String)> {
        use RejectionCode as C;
        if let Some(asked) = &run.rollout {
            return self.admit_rollout(
                input.now,
                draft,
                name,
                tower_spec,
                operation,
                command_id,
                justification,
                &run,
                asked,
            );
        }
        let checked = operation
            .check(tower_spec, &run.params, Secrets::Sealed)
            .map_err(|errors| {
                let messages: Vec<String> = errors.into_iter().map(|e| e.message).collect();
                (C::InvalidParams, messages.join("; "))
            })?;
        draft.request.params = operation.mask(&checked.params);
        if run.target != checked.target.as_str() {
            return Err((
                C::UnknownTarget,
                format!(
                    "the submission is for target {:?}, but its parameters say {}",
                    run.target,
                    target_param(operation, &checked.params)
                        .unwrap_or_else(|| checked.target.to_string())
                ),
            ));
        }
        operation
            .justification
            .check(&name.to_string(), justification)
            .map_err(|message| (C::JustificationRequired, message))?;

        // The loader refuses waits longer than a year; a catalog built otherwise is refused
        // here rather than overflowing the clock.
        let beyond = |field: &str, value: Duration| {
            (
                C::Unspecified,
                format!(
                    "the catalog gives {name} a {field} of {}, which no clock can hold; the \
                     catalog needs fixing",
                    humantime::format_duration(value)
                ),
            )
        };
        if !run.break_glass.is_empty() {
            let Some(rule) = &operation.break_glass else {
                return Err((
                    C::Forbidden,
                    format!(
                        "{name} has no break-glass rule: it cannot be run by breaking the glass; \
                         ask for its approvals instead"
                    ),
                ));
            };
            if !rule.groups.iter().any(|g| identity.groups.contains(g)) {
                return Err((
                    C::Forbidden,
                    format!(
                        "{} is not in any of the groups that may break the glass for {name}: {}",
                        identity.name(),
                        rule.groups.join(", ")
                    ),
                ));
            }
        }
        if run.plan {
            if !operation.plan {
                return Err((
                    C::InvalidParams,
                    format!(
                        "{name} cannot describe what it would change: its catalog entry does \
                         not say `plan: true`"
                    ),
                ));
            }
            if !run.break_glass.is_empty() {
                return Err((
                    C::Malformed,
                    "a plan changes nothing, and breaking the glass for one means nothing"
                        .to_owned(),
                ));
            }
        }
        // Breaking the glass skips them, and a plan needs none: it changes nothing (the
        // handler's word, as the catalog's `plan: true` says). A dry run does not skip them:
        // whether a handler changes nothing is not something admission or the agent can check
        // for an operation that does not plan.
        if let Some(rule) = operation
            .approvals
            .as_ref()
            .filter(|_| run.break_glass.is_empty() && !run.plan)
        {
            let expires_at = later(input.now, rule.ttl).ok_or_else(|| beyond("ttl", rule.ttl))?;
            let submission = verified.into_proto();
            // With a plan, the digest covers it too: readers compute it once it is recorded.
            let (digest, plan_id) = if operation.plan {
                (Vec::new(), command_id.plan().to_string())
            } else {
                let digest =
                    rct_bus::approval::digest(&submission.body, &self.catalog_version, None);
                (digest.to_vec(), String::new())
            };
            let pending = self.event(
                &command_id.to_string(),
                &name.to_string(),
                checked.target.as_str(),
                input.now,
                Kind::Pending(proto::Pending {
                    request: Some(draft.request.clone()),
                    rule: Some(rule.to_proto()),
                    expires_at: Some(from_datetime(expires_at)),
                    digest,
                    catalog_version: self.catalog_version.clone(),
                    fingerprint: self.catalog.fingerprint(name).unwrap_or_default(),
                    submission: Some(submission),
                    plan_id,
                }),
            );
            return Ok(Verdict::Park(Park {
                tower: name.tower().clone(),
                command_id,
                pending,
            }));
        }
        let deadline = later(input.now, operation.deadline)
            .ok_or_else(|| beyond("deadline", operation.deadline))?;
        let timeout = rct_bus::catalog::proto_duration(operation.timeout)
            .ok_or_else(|| beyond("timeout", operation.timeout))?;
        let command = proto::Command {
            command_id: command_id.to_string(),
            operation: name.to_string(),
            target: checked.target.to_string(),
            params: checked.params,
            justification: justification.to_owned(),
            dry_run: run.dry_run,
            operator: Some(identity.to_proto()),
            admitted_at: Some(from_datetime(input.now)),
            deadline: Some(from_datetime(deadline)),
            timeout: Some(timeout),
            catalog_version: self.catalog_version.clone(),
            submission: Some(verified.into_proto()),
            approvals: Vec::new(),
            break_glass: run.break_glass.clone(),
            plan: run.plan,
            approved_plan: None,
            parent: String::new(),
        };
        let signed = self
            .key
            .sign(Purpose::Command, command.encode_to_vec())
            .encode_to_vec();
        let decision = self.event(
            &command_id.to_string(),
            &name.to_string(),
            checked.target.as_str(),
            input.now,
            Kind::Admitted(proto::Admitted {
                request: Some(draft.request.clone()),
                deadline: command.deadline,
                timeout: command.timeout,
                catalog_version: self.catalog_version.clone(),
                approvals: Vec::new(),
                plan: 0,
                locks: Vec::new(),
            }),
        );
        Ok(Verdict::Admit(Admit {
            tower: name.tower().clone(),
            command_id,
            decision,
            subject: Subject::command(name, &checked.target),
            command: signed.into(),
        }))
    }

    /// A rollout (`run.rollout`): one decision for the whole, recorded with the targets and
    /// limits resolved; the coordinator sends its children. Every child's parameters are
    /// checked now, so a rollout admitted is one whose every child would be.
    #[allow(clippy::too_many_arguments)]
    fn admit_rollout(
        &self,
        now: OffsetDateTime,
        draft: &mut Draft,
        name: &OperationName,
        tower_spec: &TowerSpec,
        operation: &Operation,
        command_id: CommandId,
        justification: &str,
        run: &proto::Run,
        asked: &proto::Rollout,
    ) -> Result<Verdict, (RejectionCode, String)> {
        use RejectionCode as C;
        let param = target_name(operation);
        let Some((fan_out, param)) = operation.fan_out.as_ref().zip(param) else {
            return Err((
                C::InvalidParams,
                format!(
                    "{name} runs on one target at a time (its catalog entry has no `fan_out`): \
                     name one target"
                ),
            ));
        };
        if run.target != rollout::PARENT_TARGET {
            return Err((
                C::Malformed,
                format!(
                    "a rollout's target is {}, not {:?}",
                    rollout::PARENT_TARGET,
                    run.target
                ),
            ));
        }
        if run.plan || !run.break_glass.is_empty() {
            return Err((
                C::InvalidParams,
                "a rollout cannot be a plan or break the glass: run those one target at a time"
                    .into(),
            ));
        }
        if let Some(target) = asked
            .params_by_target
            .iter()
            .find(|(_, p)| p.values.contains_key(param))
            .map(|(t, _)| t)
        {
            return Err((
                C::InvalidParams,
                format!("the parameters given for {target} name its {param}: leave it out"),
            ));
        }
        // One value per child: a parameter is shared, or given per target, never both.
        if let Some((target, name)) = asked.params_by_target.iter().find_map(|(t, p)| {
            p.values
                .keys()
                .find(|k| run.params.contains_key(*k))
                .map(|k| (t, k))
        }) {
            return Err((
                C::InvalidParams,
                format!(
                    "{name} is given for every target and again for {target}: give it once, \
                     for all or per target"
                ),
            ));
        }
        if run.params.contains_key(param) {
            return Err((
                C::InvalidParams,
                format!("a rollout names its targets as the rollout's, not in {param}"),
            ));
        }
        // The loader refuses these; a catalog built otherwise is refused here.
        if operation.approvals.is_some() || operation.params.values().any(|p| p.secret) {
            return Err((
                C::InvalidParams,
                format!(
                    "{name} needs approvals or takes a secret: a rollout cannot carry them; \
                     run it one target at a time"
                ),
            ));
        }
        let plan = rollout::resolve(&tower_spec.targets, param, fan_out.max_targets, asked)
            .map_err(|e| (C::InvalidParams, e))?;
        let mut recorded = None;
        for target in &plan.targets {
            let given = child_params(&run.params, &plan.params_by_target, param, target);
            let checked = operation
                .check(tower_spec, &given, Secrets::Sealed)
                .map_err(|errors| {
                    let messages: Vec<String> = errors.into_iter().map(|e| e.message).collect();
                    (
                        C::InvalidParams,
                        format!("{target}: {}", messages.join("; ")),
                    )
                })?;
            recorded.get_or_insert(checked.params);
        }
        // What every child shares: the target's own and per-target values left out.
        let mut params = recorded.unwrap_or_default();
        params.retain(|k, _| {
            k != param
                && !plan
                    .params_by_target
                    .values()
                    .any(|p| p.values.contains_key(k))
        });
        draft.request.params = operation.mask(&params);
        if !plan.health.is_empty() {
            let problem = |why: String| {
                (
                    C::InvalidParams,
                    format!("the health check {}: {why}", plan.health),
                )
            };
            let health: OperationName = plan.health.parse().map_err(|e| problem(format!("{e}")))?;
            if health.tower() != name.tower() {
                return Err(problem(format!(
                    "must be an operation of tower {}",
                    name.tower()
                )));
            }
            let (_, check) = self
                .catalog
                .operation(&health)
                .ok_or_else(|| problem(self.catalog.unknown_operation(&health)))?;
            let health_param =
                target_name(check).ok_or_else(|| problem("takes no target".into()))?;
            if check.approvals.is_some() || check.params.values().any(|p| p.secret) {
                return Err(problem("needs approvals or takes a secret".into()));
            }
            check
                .justification
                .check(&health.to_string(), justification)
                .map_err(|message| (C::JustificationRequired, message))?;
            let groups = draft
                .request
                .operator
                .as_ref()
                .map(|o| o.groups.clone())
                .unwrap_or_default();
            if !check.allowed_groups.iter().any(|g| groups.contains(g)) {
                return Err((
                    C::Forbidden,
                    format!(
                        "the health check {health} runs as you, and you are in none of the \
                         groups allowed to run it: {}",
                        check.allowed_groups.join(", ")
                    ),
                ));
            }
            for target in &plan.targets {
                let given = child_params(&BTreeMap::new(), &BTreeMap::new(), health_param, target);
                check
                    .check(tower_spec, &given, Secrets::Sealed)
                    .map_err(|errors| {
                        let messages: Vec<String> = errors.into_iter().map(|e| e.message).collect();
                        problem(format!(
                            "needs more than its target: {}",
                            messages.join("; ")
                        ))
                    })?;
            }
        }
        operation
            .justification
            .check(&name.to_string(), justification)
            .map_err(|message| (C::JustificationRequired, message))?;
        let mut request = draft.request.clone();
        request.rollout = Some(plan);
        // The coordinator starts it at once; its children have deadlines of their own.
        let deadline = later(now, operation.deadline).ok_or_else(|| {
            (
                C::Unspecified,
                format!("the catalog gives {name} a deadline no clock can hold"),
            )
        })?;
        let decision = self.event(
            &command_id.to_string(),
            &name.to_string(),
            rollout::PARENT_TARGET,
            now,
            Kind::Admitted(proto::Admitted {
                request: Some(request),
                deadline: Some(from_datetime(deadline)),
                catalog_version: self.catalog_version.clone(),
                ..Default::default()
            }),
        );
        Ok(Verdict::Record(Record {
            tower: name.tower().clone(),
            command_id,
            decision,
        }))
    }

    /// The decision admitting the child of rollout `parent` (its recorded decision) on
    /// `target`, made `now`: its own id, the rollout's request with the target filled in,
    /// its operation's deadline and timeout from now. `health`: the child that checks the
    /// target's health after its wave, running the rollout's health operation.
    pub fn child(
        &self,
        parent: &proto::Event,
        target: &str,
        health: bool,
        now: OffsetDateTime,
    ) -> Result<proto::Event, String> {
        let missing = |what: &str| format!("the rollout's decision has no {what}");
        let Some(Kind::Admitted(admitted)) = &parent.kind else {
            return Err("the rollout was not admitted".into());
        };
        let request = admitted
            .request
            .as_ref()
            .ok_or_else(|| missing("request"))?;
        let plan = request.rollout.as_ref().ok_or_else(|| missing("plan"))?;
        let parent_id: CommandId = parent
            .command_id
            .parse()
            .map_err(|_| missing("command id"))?;
        let target_token = rct_bus::Target::new(target).map_err(|e| e.to_string())?;
        let (name, id): (OperationName, CommandId) = match health {
            false => (
                parent.operation.parse().map_err(|_| missing("operation"))?,
                rollout::child_id(parent_id, &target_token),
            ),
            true => (
                plan.health.parse().map_err(|_| missing("health check"))?,
                rollout::health_id(parent_id, &target_token),
            ),
        };
        let (tower_spec, operation) = self.catalog.operation(&name).ok_or_else(|| {
            format!("{name} is no longer in the catalog: the rollout cannot go on")
        })?;
        // The catalog as it is now: it may have changed since the rollout was admitted.
        let groups = request
            .operator
            .as_ref()
            .map(|o| o.groups.as_slice())
            .unwrap_or_default();
        if !operation.allowed_groups.iter().any(|g| groups.contains(g)) {
            return Err(format!(
                "its requester is in none of the groups now allowed to run {name}: {}",
                operation.allowed_groups.join(", ")
            ));
        }
        if !health && operation.fan_out.is_none() {
            return Err(format!(
                "{name} no longer fans out (its catalog entry has no `fan_out`)"
            ));
        }
        if operation.approvals.is_some() {
            return Err(format!(
                "{name} now needs approvals, which a rollout cannot carry"
            ));
        }
        operation
            .justification
            .check(&name.to_string(), &request.justification)?;
        let param = target_name(operation).ok_or_else(|| format!("{name} takes no target"))?;
        let given = match health {
            false => child_params(&request.params, &plan.params_by_target, param, target),
            true => child_params(&BTreeMap::new(), &BTreeMap::new(), param, target),
        };
        // A child of an undo of a rollout undoes that rollout's child on its target.
        let undo_of = match request.undo_of.parse::<CommandId>() {
            Ok(original) if !health => rollout::child_id(original, &target_token).to_string(),
            _ => String::new(),
        };
        let checked = operation
            .check(tower_spec, &given, Secrets::Sealed)
            .map_err(|errors| {
                let messages: Vec<String> = errors.into_iter().map(|e| e.message).collect();
                format!(
                    "its parameters no longer check against the catalog: {}",
                    messages.join("; ")
                )
            })?;
        let deadline = later(now, operation.deadline).ok_or_else(|| missing("deadline"))?;
        let timeout = rct_bus::catalog::proto_duration(operation.timeout)
            .ok_or_else(|| missing("timeout"))?;
        let child_request = proto::Request {
            params: operation.mask(&checked.params),
            rollout: None,
            parent: parent.command_id.clone(),
            health,
            undo_of,
            ..request.clone()
        };
        Ok(self.event(
            &id.to_string(),
            &name.to_string(),
            target,
            now,
            Kind::Admitted(proto::Admitted {
                request: Some(child_request),
                deadline: Some(from_datetime(deadline)),
                timeout: Some(timeout),
                catalog_version: self.catalog_version.clone(),
                ..Default::default()
            }),
        ))
    }

    /// The command an `Admitted` decision admitted, rebuilt from the decision and the
    /// submission it names (`payload`, its bytes in RCT_SUBMIT), never decided again: what was
    /// admitted stays admitted whatever changed since (the clock, the operator's certificate,
    /// the catalog, admission's key). Signed with the current key; with the same key the bytes
    /// are those first published (signatures and encoding are deterministic), so the
    /// command's `Nats-Msg-Id` dedups a copy that did reach RCT_CMD.
    ///
    /// The submission is not verified again: the decision says it was, and the bytes at its
    /// sequence cannot change. The error says why the command cannot be rebuilt.
    ///
    /// A decision under the id [`CommandId::plan`] derives from the submission's admits the
    /// plan-only command that describes a request waiting for approvals (see
    /// [`Policy::plan_decision`]); `approved_plan` is the plan the approvers approved.
    pub fn recorded_command(
        &self,
        decision: &proto::Event,
        payload: &[u8],
        approvals: Vec<proto::SignedEnvelope>,
        approved_plan: Option<proto::Plan>,
    ) -> Result<(Subject, Bytes), String> {
        let Some(Kind::Admitted(admitted)) = &decision.kind else {
            return Err("the decision is not an admission".into());
        };
        let missing = |what: &str| format!("the recorded decision has no {what}");
        let request = admitted
            .request
            .as_ref()
            .ok_or_else(|| missing("request"))?;
        let name: OperationName = decision
            .operation
            .parse()
            .map_err(|e| format!("the recorded operation: {e}"))?;
        let target = rct_bus::Target::new(decision.target.as_str())
            .map_err(|e| format!("the recorded target: {e}"))?;
        let envelope = proto::SignedEnvelope::decode(payload)
            .map_err(|e| format!("the stored submission is not an envelope: {e}"))?;
        let submission = proto::Submission::decode(envelope.body.as_slice())
            .map_err(|e| format!("the stored submission does not decode: {e}"))?;
        let describes = request.plan
            && submission
                .command_id
                .parse::<CommandId>()
                .is_ok_and(|id| id.plan().to_string() == decision.command_id);
        // A rollout's child: its id derives from the rollout's (the submission's) and its
        // target; its parameters are all on record (a rollout takes no secret).
        let child = !request.parent.is_empty() && request.parent == submission.command_id && {
            let parent: Option<CommandId> = request.parent.parse().ok();
            parent.is_some_and(|p| {
                let id = match request.health {
                    false => rollout::child_id(p, &target),
                    true => rollout::health_id(p, &target),
                };
                id.to_string() == decision.command_id
            })
        };
        if request.rollout.is_some() {
            return Err("a rollout is not a command: its children are".into());
        }
        if submission.command_id != decision.command_id && !describes && !child {
            return Err(format!(
                "the stored submission is for command {}, the decision for {}",
                submission.command_id, decision.command_id
            ));
        }
        let Some(Request::Run(run)) = &submission.request else {
            return Err("the stored submission asks to run nothing".into());
        };
        // The decision holds the effective parameters, secrets masked; the submission holds
        // the values given, as they were checked (checking never rewrites a value, and a
        // secret has no default, so every masked value was given, sealed).
        let params = request
            .params
            .iter()
            .map(|(name_of, recorded)| {
                let value = match child {
                    true => recorded,
                    false => run.params.get(name_of).unwrap_or(recorded),
                };
                (name_of.clone(), value.clone())
            })
            .collect();
        let command = proto::Command {
            command_id: decision.command_id.clone(),
            operation: decision.operation.clone(),
            target: decision.target.clone(),
            params,
            justification: submission.justification.clone(),
            dry_run: run.dry_run,
            operator: Some(
                request
                    .operator
                    .clone()
                    .ok_or_else(|| missing("operator"))?,
            ),
            admitted_at: Some(decision.at.ok_or_else(|| missing("time"))?),
            deadline: Some(admitted.deadline.ok_or_else(|| missing("deadline"))?),
            timeout: Some(admitted.timeout.ok_or_else(|| missing("timeout"))?),
            catalog_version: admitted.catalog_version.clone(),
            submission: Some(envelope),
            approvals,
            break_glass: request.break_glass.clone(),
            plan: run.plan || describes,
            approved_plan,
            parent: request.parent.clone(),
        };
        let signed = self
            .key
            .sign(Purpose::Command, command.encode_to_vec())
            .encode_to_vec();
        Ok((Subject::command(&name, &target), signed.into()))
    }

    /// Where the request `pending` (its `Pending` event) stands, given its request digest
    /// (`None` while its plan is not made: nothing counts), the approval events admission
    /// recorded for it (their sequences and bodies, in stream order) and the clock. A catalog
    /// that changed the operation ends it first; then a denial; then the threshold; then the
    /// clock.
    pub fn tally(
        &self,
        pending: &proto::Event,
        digest: Option<&[u8]>,
        approvals: &[(u64, proto::Approval)],
        now: OffsetDateTime,
    ) -> Tally {
        let Some(Kind::Pending(p)) = &pending.kind else {
            return Tally::Waiting { have: Vec::new() };
        };
        let fingerprint = pending
            .operation
            .parse::<OperationName>()
            .ok()
            .and_then(|name| self.catalog.fingerprint(&name));
        if fingerprint.as_deref() != Some(p.fingerprint.as_str()) {
            return Tally::CatalogChanged(format!(
                "catalog version {} {} {} while the request waited for approvals; submit it \
                 again to have it checked against the catalog in force",
                self.catalog_version,
                if fingerprint.is_some() {
                    "changed"
                } else {
                    "no longer has"
                },
                pending.operation
            ));
        }
        let rule = p.rule.clone().unwrap_or_default();
        let mut seen = std::collections::BTreeSet::new();
        let mut have = Vec::new();
        for (sequence, approval) in approvals {
            if Some(approval.digest.as_slice()) != digest {
                continue;
            }
            let Some(by) = &approval.by else { continue };
            if approval.denied {
                let why = if approval.comment.is_empty() {
                    String::new()
                } else {
                    format!(": {}", approval.comment)
                };
                return Tally::Denied(format!(
                    "{} denied it{why}",
                    if by.email.is_empty() {
                        &by.subject
                    } else {
                        &by.email
                    }
                ));
            }
            if seen.insert(by.subject.clone()) {
                have.push((*sequence, by.clone()));
            }
        }
        if have.len() >= rule.required as usize {
            return Tally::Approved(have.into_iter().map(|(s, _)| s).collect());
        }
        let expires_at = p.expires_at.as_ref().and_then(to_datetime);
        if expires_at.is_none_or(|at| now > at) {
            let names: Vec<String> = have.iter().map(|(_, by)| by.email.clone()).collect();
            return Tally::Expired(format!(
                "it waited for {} approvals from {} until {} and got {}{}; submit it again",
                rule.required,
                rule.approver_groups.join(", "),
                expires_at.map_or_else(|| "?".into(), |at| at.to_string()),
                have.len(),
                if names.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", names.join(", "))
                }
            ));
        }
        Tally::Waiting {
            have: have.into_iter().map(|(_, by)| by).collect(),
        }
    }

    /// The `Admitted` decision for the request `pending` once `approvals` (sequences of its
    /// approval events) met the threshold for the plan event at sequence `plan` (0: none):
    /// its deadline runs from `now`, under the catalog version its digest covers.
    pub fn approved(
        &self,
        pending: &proto::Event,
        approvals: Vec<u64>,
        plan: u64,
        now: OffsetDateTime,
    ) -> Result<proto::Event, String> {
        let Some(Kind::Pending(p)) = &pending.kind else {
            return Err("the pending event holds no request".into());
        };
        let admitted = proto::Admitted {
            request: p.request.clone(),
            catalog_version: p.catalog_version.clone(),
            approvals,
            plan,
            ..Default::default()
        };
        self.waited(pending, &pending.command_id, now, admitted)
    }

    /// The decision `admitted` under `id` about the request `pending` stands for, dated
    /// `at`, its deadline running from then and its timeout the operation's.
    fn waited(
        &self,
        pending: &proto::Event,
        id: &str,
        at: OffsetDateTime,
        admitted: proto::Admitted,
    ) -> Result<proto::Event, String> {
        let name: OperationName = pending
            .operation
            .parse()
            .map_err(|e| format!("the recorded operation: {e}"))?;
        let (_, operation) = self
            .catalog
            .operation(&name)
            .ok_or_else(|| self.catalog.unknown_operation(&name))?;
        let deadline = later(at, operation.deadline).ok_or("the deadline is past any date")?;
        let timeout =
            rct_bus::catalog::proto_duration(operation.timeout).ok_or("the timeout is too long")?;
        Ok(self.event(
            id,
            &pending.operation,
            &pending.target,
            at,
            Kind::Admitted(proto::Admitted {
                deadline: Some(from_datetime(deadline)),
                timeout: Some(timeout),
                ..admitted
            }),
        ))
    }

    /// The decision that admits the plan-only command describing the request `pending`
    /// (which waits for approvals of an operation that plans): under the request's
    /// [`CommandId::plan`], dated like the pending event, so that every replica and
    /// redelivery makes the same one. [`Policy::recorded_command`] builds its command.
    pub fn plan_decision(&self, pending: &proto::Event) -> Result<proto::Event, String> {
        let Some(Kind::Pending(p)) = &pending.kind else {
            return Err("the pending event holds no request".into());
        };
        let at = pending
            .at
            .as_ref()
            .and_then(to_datetime)
            .ok_or("the pending event has no time")?;
        let mut request = p
            .request
            .clone()
            .ok_or("the pending event holds no request")?;
        request.plan = true;
        let admitted = proto::Admitted {
            request: Some(request),
            catalog_version: p.catalog_version.clone(),
            ..Default::default()
        };
        self.waited(pending, &p.plan_id, at, admitted)
    }

    /// The `Approval` event an `Admitted` approval (or denial) recorded in `decision` makes
    /// on the command it names, rebuilt from the decision and the approver's submission as
    /// stored (`payload`), which it carries.
    pub fn recorded_approval(decision: &proto::Event, payload: &[u8]) -> Option<proto::Event> {
        let Some(Kind::Admitted(admitted)) = &decision.kind else {
            return None;
        };
        let request = admitted.request.as_ref()?;
        let envelope = proto::SignedEnvelope::decode(payload).ok()?;
        let submission = proto::Submission::decode(envelope.body.as_slice()).ok()?;
        let (command_id, digest) = match submission.request {
            Some(Request::Approve(proto::Approve { command_id, digest }))
            | Some(Request::Deny(proto::Deny { command_id, digest })) => (command_id, digest),
            Some(Request::Review(proto::Review { command_id })) => (command_id, Vec::new()),
            _ => return None,
        };
        if command_id != request.approves || submission.command_id != decision.command_id {
            return None;
        }
        Some(proto::Event {
            command_id,
            kind: Some(Kind::Approval(proto::Approval {
                by: request.operator.clone(),
                comment: request.justification.clone(),
                digest,
                submission: Some(envelope),
                denied: request.deny,
                approval_id: decision.command_id.clone(),
                review: request.review,
            })),
            ..decision.clone()
        })
    }

    /// The `CancelRequested` event an `Admitted` cancel request recorded in `decision` asked
    /// for, rebuilt from the decision alone.
    pub fn recorded_cancel(decision: &proto::Event) -> Option<(CommandId, proto::Event)> {
        let Some(Kind::Admitted(admitted)) = &decision.kind else {
            return None;
        };
        let request = admitted.request.as_ref()?;
        let target: CommandId = request.cancels.parse().ok()?;
        let cancel = proto::Event {
            command_id: target.to_string(),
            at: decision.at,
            source: decision.source.clone(),
            // The cancelled command's target, which admission put on the decision once it
            // found that command (`Service::check_cancel_target`): its agents watch there.
            operation: decision.operation.clone(),
            target: decision.target.clone(),
            kind: Some(Kind::CancelRequested(proto::CancelRequested {
                by: request.operator.clone(),
                justification: request.justification.clone(),
                resume: request.resume,
            })),
        };
        Some((target, cancel))
    }

    fn cancel(
        &self,
        now: OffsetDateTime,
        draft: &mut Draft,
        command_id: CommandId,
        target: CommandId,
        identity: &Identity,
        justification: &str,
    ) -> Cancel {
        let resume = draft.request.resume;
        let decision = self.event(
            &command_id.to_string(),
            &draft.operation,
            "",
            now,
            Kind::Admitted(proto::Admitted {
                request: Some(draft.request.clone()),
                catalog_version: self.catalog_version.clone(),
                ..Default::default()
            }),
        );
        let cancel = self.event(
            &target.to_string(),
            &draft.operation,
            "",
            now,
            Kind::CancelRequested(proto::CancelRequested {
                by: Some(identity.to_proto()),
                justification: justification.to_owned(),
                resume,
            }),
        );
        Cancel {
            tower: draft.tower.clone(),
            command_id,
            target,
            decision,
            cancel,
        }
    }

    /// The refusal on record. What it holds came from the submission unchecked (a key id,
    /// a target, parameter names, the operator's own words in a message): all of it is made
    /// printable, so no refusal shows as anything but what it is.
    fn reject(
        &self,
        draft: Draft,
        now: OffsetDateTime,
        code: RejectionCode,
        message: String,
    ) -> Reject {
        let mut decision = self.event(
            &draft
                .command_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            &draft.operation,
            &draft.target,
            now,
            Kind::Rejected(proto::Rejected {
                code: code as i32,
                message,
                request: Some(draft.request),
            }),
        );
        rct_bus::text::make_printable_within(&mut decision, crate::decide::QUOTED_MAX);
        Reject {
            tower: draft.tower,
            command_id: draft.command_id,
            decision,
        }
    }

    fn event(
        &self,
        command_id: &str,
        operation: &str,
        target: &str,
        at: OffsetDateTime,
        kind: Kind,
    ) -> proto::Event {
        proto::Event {
            command_id: command_id.to_owned(),
            at: Some(from_datetime(at)),
            source: self.source.clone(),
            operation: operation.to_owned(),
            target: target.to_owned(),
            kind: Some(kind),
        }
    }
}

/// Where a request waiting for approvals stands (see [`Policy::tally`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Tally {
    /// Not enough approvals yet: who approved so far.
    Waiting {
        /// Distinct approvers so far.
        have: Vec<proto::Operator>,
    },
    /// Enough: the sequences of the approval events that count.
    Approved(Vec<u64>),
    /// An approver denied it: the sentence for the record.
    Denied(String),
    /// Its time ran out first.
    Expired(String),
    /// The catalog changed its operation while it waited.
    CatalogChanged(String),
    /// It was cancelled while it waited.
    Withdrawn(String),
}

/// `cluster=prod-1`: the target parameter and its value.
fn target_param(operation: &Operation, params: &BTreeMap<String, proto::Value>) -> Option<String> {
    operation
        .params
        .iter()
        .find(|(_, p)| p.kind == rct_bus::catalog::Type::Target)
        .and_then(|(name, _)| {
            params
                .get(name)
                .map(|v| format!("{name}={}", display_value(v)))
        })
}

/// The name of the operation's target parameter.
fn target_name(operation: &Operation) -> Option<&str> {
    operation
        .params
        .iter()
        .find(|(_, p)| p.kind == rct_bus::catalog::Type::Target)
        .map(|(name, _)| name.as_str())
}

/// A rollout child's parameters: `params`, those `by_target` gives its target, and the
/// target parameter `param` set to `target`.
fn child_params(
    params: &BTreeMap<String, proto::Value>,
    by_target: &BTreeMap<String, proto::Params>,
    param: &str,
    target: &str,
) -> BTreeMap<String, proto::Value> {
    let mut params = params.clone();
    if let Some(own) = by_target.get(target) {
        params.extend(own.values.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    params.insert(
        param.to_owned(),
        proto::Value {
            kind: Some(proto::value::Kind::Target(target.to_owned())),
        },
    );
    params
}

/// `at + d`, or `None` past the last representable date.
fn later(at: OffsetDateTime, d: Duration) -> Option<OffsetDateTime> {
    at.checked_add(time::Duration::try_from(d).ok()?)
}

/// `at - d`, or `None` before the first representable date.
fn earlier(at: OffsetDateTime, d: Duration) -> Option<OffsetDateTime> {
    at.checked_sub(time::Duration::try_from(d).ok()?)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn example() -> Catalog {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/catalog.example.yaml");
        crate::catalog::load(&path).unwrap()
    }

    fn policy(catalog: Catalog) -> Policy {
        let key = KeyPair::generate();
        Policy {
            catalog_version: catalog.version(),
            catalog,
            certificates: Certificates::new(&key, &[], Duration::from_secs(3600)),
            services: Services::new(&[]).unwrap(),
            key,
            freshness: Duration::from_secs(120),
            clock_skew: Duration::from_secs(30),
            max_payload: 64 * 1024,
            source: "admission/test".into(),
        }
    }

    /// An operator's signed submission, as it arrives in RCT_SUBMIT.
    fn signed(policy: &Policy, submission: &proto::Submission) -> Vec<u8> {
        let session = KeyPair::generate();
        let identity = Identity {
            subject: "alice".into(),
            email: "alice@example.com".into(),
            groups: vec!["sre_team".into()],
        };
        let (certificate, _) = policy
            .certificates
            .issue(&identity, session.public(), u64::MAX);
        let mut envelope = session.sign(Purpose::Submission, submission.encode_to_vec());
        envelope.certificate = certificate;
        envelope.encode_to_vec()
    }

    fn run(
        operation: &str,
        target: &str,
        params: &[(&str, proto::value::Kind)],
        now: OffsetDateTime,
    ) -> proto::Submission {
        proto::Submission {
            command_id: CommandId::generate().to_string(),
            operation: operation.into(),
            justification: "SRE-101".into(),
            requested_at: Some(from_datetime(now)),
            expires_at: Some(from_datetime(now + time::Duration::minutes(1))),
            client: None,
            request: Some(Request::Run(proto::Run {
                target: target.into(),
                params: params
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            proto::Value {
                                kind: Some(v.clone()),
                            },
                        )
                    })
                    .collect(),
                dry_run: false,
                break_glass: String::new(),
                plan: false,
                undo_of: String::new(),
                rollout: None,
            })),
        }
    }

    fn drain(now: OffsetDateTime) -> proto::Submission {
        run(
            "traffic/drain-cluster",
            "prod-1",
            &[("cluster", proto::value::Kind::Target("prod-1".into()))],
            now,
        )
    }

    fn decide(policy: &Policy, payload: &[u8], now: OffsetDateTime) -> Verdict {
        policy.decide(Submitted {
            subject: "rct.submit.traffic.drain-cluster",
            payload,
            sequence: 7,
            now,
        })
    }

    /// A deadline no date can hold panicked in `now + deadline`; the catalog loader refuses
    /// one, and a catalog built any other way still gets a refusal, not a crash.
    #[test]
    fn a_deadline_past_any_date_is_refused_not_a_panic() {
        let now = OffsetDateTime::now_utc();
        for deadline in [Duration::MAX, Duration::from_secs(400_000 * 365 * 86_400)] {
            let mut catalog = example();
            catalog
                .operations
                .get_mut("traffic/drain-cluster")
                .unwrap()
                .deadline = deadline;
            let policy = policy(catalog);
            let payload = signed(&policy, &drain(now));
            let Verdict::Reject(reject) = decide(&policy, &payload, now) else {
                panic!("admitted with a deadline of {deadline:?}");
            };
            assert!(
                reject.message().contains("deadline"),
                "{}",
                reject.message()
            );
        }
    }

    fn admitted(verdict: Verdict) -> Admit {
        match verdict {
            Verdict::Admit(a) => a,
            other => panic!("not admitted: {other:?}"),
        }
    }

    fn command(signed: &[u8], key: &KeyPair) -> proto::Command {
        rct_bus::Unverified::decode(signed)
            .unwrap()
            .verify_with(key.public(), Purpose::Command)
            .unwrap()
            .decode()
            .unwrap()
    }

    /// The command rebuilt from the recorded decision is the one admitted: the same bytes
    /// under the same key, whatever the clock, catalog and key say when it is rebuilt.
    #[test]
    fn the_recorded_decision_rebuilds_the_admitted_command() {
        let now = OffsetDateTime::now_utc();
        let policy = policy(example());
        let secret = run(
            "workloads/set-secret",
            "_",
            &[
                ("namespace", proto::value::Kind::String("shop".into())),
                ("name", proto::value::Kind::String("db".into())),
                ("key", proto::value::Kind::String("password".into())),
                (
                    "value",
                    proto::value::Kind::Sealed(proto::Sealed {
                        age: b"sealed to the tower".to_vec(),
                    }),
                ),
            ],
            now,
        );
        for (subject, submission) in [
            ("rct.submit.traffic.drain-cluster", drain(now)),
            ("rct.submit.workloads.set-secret", secret),
        ] {
            let payload = signed(&policy, &submission);
            let admit = admitted(policy.decide(Submitted {
                subject,
                payload: &payload,
                sequence: 7,
                now,
            }));
            let (to, bytes) = policy
                .recorded_command(&admit.decision, &payload, Vec::new(), None)
                .unwrap();
            assert_eq!(to, admit.subject);
            assert_eq!(bytes, admit.command, "{subject}: the same bytes");

            // Later: another catalog (another default and timeout) and another key.
            let mut catalog = example();
            for operation in catalog.operations.values_mut() {
                operation.timeout = Duration::from_secs(7);
            }
            let later = Policy {
                key: KeyPair::generate(),
                ..super::tests::policy(catalog)
            };
            let (_, bytes) = later
                .recorded_command(&admit.decision, &payload, Vec::new(), None)
                .unwrap();
            assert_eq!(
                command(&bytes, &later.key),
                command(&admit.command, &policy.key),
                "{subject}: the same command"
            );
        }
    }

    fn recorded_request(reject: &Reject) -> &proto::Request {
        match &reject.decision.kind {
            Some(Kind::Rejected(r)) => r.request.as_ref().expect("a request on record"),
            other => panic!("not a refusal: {other:?}"),
        }
    }

    /// A justification that could pass for something else on a terminal (a line feed, a
    /// carriage return, an escape sequence, a bidirectional override) or is too long is
    /// refused before any other check, so that no refusal records it: not the forbidden one
    /// nor the stale one it would otherwise be.
    #[test]
    fn a_justification_that_is_not_one_printable_line_is_refused_first_and_not_recorded() {
        let now = OffsetDateTime::now_utc();
        let mut forbidding = example();
        forbidding
            .operations
            .get_mut("traffic/drain-cluster")
            .unwrap()
            .allowed_groups = vec!["dba".into()];
        let long = format!("SRE-1 {}", "x".repeat(rct_bus::text::JUSTIFICATION_MAX));
        for (policy, requested_at) in [
            (policy(example()), now),
            (policy(forbidding), now),
            (policy(example()), now - time::Duration::hours(1)),
        ] {
            for bad in [
                "SRE-1\n\u{1b}[2Kceo@example.com drained prod-1",
                "SRE-1\rceo@example.com drained prod-1",
                "SRE-1 \u{202e}1-ERS",
                long.as_str(),
            ] {
                let mut submission = drain(requested_at);
                submission.justification = bad.into();
                let Verdict::Reject(reject) = decide(&policy, &signed(&policy, &submission), now)
                else {
                    panic!("admitted with justification {bad:?}");
                };
                assert_eq!(
                    reject.code(),
                    RejectionCode::Malformed,
                    "{}",
                    reject.message()
                );
                assert!(
                    reject.message().contains("justification"),
                    "{}",
                    reject.message()
                );
                assert_eq!(recorded_request(&reject).justification, "", "{bad:?}");
            }
        }
    }

    /// A refusal records what the submission gave unchecked (a target, parameter names and
    /// values, the key id) with everything a terminal would act on written out.
    #[test]
    fn a_refusal_records_nothing_a_terminal_would_act_on() {
        let now = OffsetDateTime::now_utc();
        let policy = policy(example());
        let esc = "\u{1b}[2K\r";
        let submission = run(
            "traffic/drain-cluster",
            &format!("prod-1{esc}"),
            &[(
                &format!("cluster{esc}"),
                proto::value::Kind::Target(format!("prod-1{esc}")),
            )],
            now,
        );
        let Verdict::Reject(reject) = decide(&policy, &signed(&policy, &submission), now) else {
            panic!("admitted");
        };
        let request = recorded_request(&reject);
        let mut texts = vec![reject.decision.target.clone(), reject.message().to_owned()];
        for (name, value) in &request.params {
            texts.push(name.clone());
            texts.push(display_value(value));
        }
        for text in &texts {
            assert!(!text.chars().any(char::is_control), "{text:?}");
        }
        assert!(
            texts.iter().any(|t| t.contains("\\u{1b}[2K\\r")),
            "{texts:?}"
        );
    }

    /// A refusal quoting what nobody checked stays small enough to record: a 20 KiB target of
    /// control characters (each written out in five bytes), quoted as the target and as a
    /// parameter, used to make a refusal of about 200 KiB.
    #[test]
    fn a_refusal_quoting_a_huge_garbled_target_stays_small() {
        let now = OffsetDateTime::now_utc();
        let policy = policy(example());
        let garbled = "\u{1}".repeat(20 * 1024);
        let submission = run(
            "traffic/drain-cluster",
            &garbled,
            &[("cluster", proto::value::Kind::Target(garbled.clone()))],
            now,
        );
        let Verdict::Reject(reject) = decide(&policy, &signed(&policy, &submission), now) else {
            panic!("admitted");
        };
        assert_ne!(
            reject.code(),
            RejectionCode::TooLarge,
            "{}",
            reject.message()
        );
        let size = reject.decision.encode_to_vec().len();
        assert!(size < 16 * 1024, "a refusal of {size} bytes");
        assert!(
            reject.decision.target.contains("…(cut: "),
            "{}",
            reject.decision.target
        );
    }

    /// The key id an envelope claims is the sender's word before anything is verified: a
    /// refusal records and quotes it only when it has the form of a key id.
    #[test]
    fn a_key_id_that_is_not_one_is_neither_recorded_nor_quoted() {
        let now = OffsetDateTime::now_utc();
        let policy = policy(example());
        let session = KeyPair::generate();
        for (claimed, kept) in [
            ("\u{1b}[2K\rceo@example.com drained prod-1", false),
            ("ed25519:0123456789abcdef", true),
        ] {
            let mut envelope = session.sign(Purpose::Submission, drain(now).encode_to_vec());
            envelope.key_id = claimed.into();
            let Verdict::Reject(reject) = decide(&policy, &envelope.encode_to_vec(), now) else {
                panic!("admitted");
            };
            assert_eq!(reject.code(), RejectionCode::Unauthenticated);
            let recorded = &recorded_request(&reject).key_id;
            assert_eq!(recorded == claimed, kept, "{recorded:?}");
            assert_eq!(
                reject.message().contains(claimed),
                kept,
                "{}",
                reject.message()
            );
            if !kept {
                assert!(recorded.is_empty() && reject.message().contains("(not a key id)"));
            }
        }
    }

    /// A cancel follows the operation's justification rule, and its event records the reason.
    #[test]
    fn a_cancel_needs_the_justification_its_operation_needs() {
        let now = OffsetDateTime::now_utc();
        let policy = policy(example());
        let cancel = |justification: &str| {
            let mut submission = drain(now);
            submission.justification = justification.into();
            submission.request = Some(Request::Cancel(proto::Cancel {
                command_id: CommandId::generate().to_string(),
                resume: false,
            }));
            decide(&policy, &signed(&policy, &submission), now)
        };
        for refused in ["", "because"] {
            let Verdict::Reject(reject) = cancel(refused) else {
                panic!("a cancel justified by {refused:?} was admitted");
            };
            assert!(
                reject.message().contains("justification"),
                "{}",
                reject.message()
            );
        }
        let Verdict::Cancel(admitted) = cancel("SRE-9") else {
            panic!("a justified cancel was refused");
        };
        let Some(Kind::CancelRequested(requested)) = admitted.cancel.kind else {
            panic!("no cancel event");
        };
        assert_eq!(requested.justification, "SRE-9");
    }

    /// A refused request records what it asked for: its parameters in clear, except those
    /// the operation says are secret (and any the operation does not know).
    #[test]
    fn a_refusal_records_the_parameters_that_are_not_secret() {
        let now = OffsetDateTime::now_utc();
        let policy = policy(example());
        let submission = run(
            "workloads/set-secret",
            "_",
            &[
                ("namespace", proto::value::Kind::String("shop".into())),
                ("name", proto::value::Kind::String("db".into())),
                ("bogus", proto::value::Kind::String("what is this".into())),
                (
                    "value",
                    proto::value::Kind::Sealed(proto::Sealed {
                        age: b"sealed to the tower".to_vec(),
                    }),
                ),
            ],
            now,
        );
        let Verdict::Reject(reject) = policy.decide(Submitted {
            subject: "rct.submit.workloads.set-secret",
            payload: &signed(&policy, &submission),
            sequence: 7,
            now,
        }) else {
            panic!("an unknown parameter was admitted");
        };
        assert_eq!(reject.code(), RejectionCode::InvalidParams);
        let Some(Kind::Rejected(rejected)) = &reject.decision.kind else {
            panic!("not a rejection");
        };
        let shown: BTreeMap<&str, String> = rejected
            .request
            .as_ref()
            .unwrap()
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), rct_bus::catalog::display_value(v)))
            .collect();
        assert_eq!(shown["namespace"], "shop");
        assert_eq!(shown["name"], "db");
        assert_eq!(shown["value"], "***", "secret");
        assert_eq!(shown["bogus"], "***", "not in the catalog: may be anything");
    }

    /// A cancel request's recorded decision rebuilds its `CancelRequested` event.
    #[test]
    fn the_recorded_decision_rebuilds_the_cancel_request() {
        let now = OffsetDateTime::now_utc();
        let policy = policy(example());
        let target = CommandId::generate();
        let mut submission = drain(now);
        submission.request = Some(Request::Cancel(proto::Cancel {
            command_id: target.to_string(),
            resume: false,
        }));
        let payload = signed(&policy, &submission);
        let Verdict::Cancel(cancel) = decide(&policy, &payload, now) else {
            panic!("not a cancel");
        };
        assert_eq!(
            Policy::recorded_cancel(&cancel.decision),
            Some((target, cancel.cancel))
        );
    }
}
