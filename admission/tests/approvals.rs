//! Approvals bound to exactly what runs, against a real nats-server: a request that needs
//! them waits on record, each approval is a signed submission carrying the request's digest,
//! every bad approval is refused with its own code and counts for nothing, and the command
//! admitted at the threshold carries the approvers' signatures for agents to check.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use prost::Message;
use rct_bus::proto::{self, RejectionCode as C, event::Kind};
use rct_bus::{CommandId, EventKind, Target, Tower, Unverified, Verifier};
use rct_streams::replay;
use support::{Harness, Operator, drain, rejection, workloads_pending as pending};

const DELETE: &str = "workloads/delete";

fn delete(deployment: &str) -> proto::Submission {
    support::workload(DELETE, deployment, "INC-7")
}

/// An approval (or denial) of `id` with `digest`, justified by `why`.
fn approval(id: &str, digest: &[u8], deny: bool, why: &str) -> proto::Submission {
    support::approval(DELETE, id, digest, deny, why)
}

/// The example catalog with `workloads/delete`'s approvals lasting `ttl` instead, in a file
/// of its own under `dir`.
fn catalog_with_ttl(dir: &std::path::Path, ttl: &str) -> PathBuf {
    support::catalog_with(
        dir,
        "allow_self: false, ttl: 30m",
        &format!("allow_self: false, ttl: {ttl}"),
    )
}

/// Every approval event of `id`.
async fn approvals(h: &Harness, id: &str) -> Vec<proto::Approval> {
    replay::command_history(&h.js, id.parse().unwrap())
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event.kind {
            Some(Kind::Approval(a)) => Some(a),
            _ => None,
        })
        .collect()
}

/// Submits an approval by `who` and returns its own decision.
async fn approve(h: &Harness, who: &Operator, id: &str, digest: &[u8], deny: bool) -> proto::Event {
    let sequence = h.submit(who, &approval(id, digest, deny, "INC-7")).await;
    h.decision(sequence).await
}

fn code(event: &proto::Event) -> Option<C> {
    rejection(event).map(|(code, _)| code)
}

#[tokio::test]
async fn a_request_waits_for_two_others_and_runs_with_their_signatures() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team", "sre_leads"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let carol = h.operator("carol", &["app_leads"]).await;
    let request = delete("cart");
    let id = request.command_id.clone();
    let sequence = h.submit(&alice, &request).await;

    // Parked: a pending event with the rule and a digest over the bytes as received; no
    // decision, no command.
    let p = pending(&h, &id).await;
    let rule = p.rule.clone().unwrap();
    assert_eq!((rule.required, rule.allow_self), (2, false));
    assert_eq!(rule.approver_groups, ["sre_leads", "app_leads"]);
    let (_, stored) = h.stored_submission(sequence).await;
    let envelope = proto::SignedEnvelope::decode(stored).unwrap();
    assert_eq!(p.submission.as_ref().unwrap().body, envelope.body);
    assert_eq!(
        p.digest,
        rct_bus::approval::digest(&envelope.body, &p.catalog_version, None).to_vec()
    );
    assert_eq!(
        rct_bus::approval::recompute(&p, None).unwrap().to_vec(),
        p.digest
    );

    // One approval is not enough.
    let first = approve(&h, &bob, &id, &p.digest, false).await;
    assert!(matches!(first.kind, Some(Kind::Admitted(_))), "{first:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.commands().await, 0, "a command after one approval of two");
    assert!(
        replay::slot(
            &h.js,
            &Tower::new("workloads").unwrap(),
            &Target::none(),
            id.parse().unwrap(),
            EventKind::Decision
        )
        .await
        .unwrap()
        .is_none()
    );

    // The second one admits it, listing both approval events.
    approve(&h, &carol, &id, &p.digest, false).await;
    let decision = h.decision(sequence).await;
    let Some(Kind::Admitted(admitted)) = &decision.kind else {
        panic!("not admitted: {decision:?}");
    };
    assert_eq!(admitted.approvals.len(), 2);
    assert_eq!(admitted.catalog_version, p.catalog_version);
    let recorded = approvals(&h, &id).await;
    let by: Vec<&str> = recorded
        .iter()
        .map(|a| a.by.as_ref().unwrap().subject.as_str())
        .collect();
    assert_eq!(by, ["bob", "carol"]);

    // The command carries both signed approvals; they verify with admission's key alone.
    let stored = h.command_on("rct.cmd.workloads._.delete").await;
    let command: proto::Command = Verifier::new([h.admission_key.clone()])
        .verify(
            Unverified::decode(&stored.payload).unwrap(),
            rct_bus::Purpose::Command,
        )
        .unwrap()
        .decode()
        .unwrap();
    assert_eq!(command.command_id, id);
    assert_eq!(command.approvals.len(), 2);
    let catalog = rct_admission::catalog::load(&support::catalog_path()).unwrap();
    let operation = &catalog.operations[DELETE];
    let rule = operation.approvals.clone().unwrap();
    let trusted = Verifier::new([h.admission_key.clone()]);
    let requester =
        rct_bus::approval::requested(&command, &catalog.towers["workloads"], operation, &trusted)
            .unwrap();
    assert_eq!(requester.operator.subject, "alice");
    let approvers = rct_bus::approval::verify(&command, &requester, &rule, &trusted).unwrap();
    assert_eq!(approvers.len(), 2);
    // One approval fewer, and it does not verify.
    let mut short = command.clone();
    short.approvals.pop();
    assert!(rct_bus::approval::verify(&short, &requester, &rule, &trusted).is_err());
    assert_eq!(h.commands().await, 1);
}

#[tokio::test]
async fn every_bad_approval_is_refused_with_its_code_and_counts_for_nothing() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team", "sre_leads"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let dave = h.operator("dave", &["sre_team"]).await;
    let request = delete("cart");
    let id = request.command_id.clone();
    h.submit(&alice, &request).await;
    let p = pending(&h, &id).await;

    // The requester, with the right digest: not unless the rule allows it.
    let refused = approve(&h, &alice, &id, &p.digest, false).await;
    assert_eq!(code(&refused), Some(C::SelfApproval), "{refused:?}");
    // Someone outside the approver groups.
    let refused = approve(&h, &dave, &id, &p.digest, false).await;
    assert_eq!(code(&refused), Some(C::Forbidden), "{refused:?}");
    // Another digest (a changed request, a stale look).
    let mut wrong = p.digest.clone();
    wrong[0] ^= 1;
    let refused = approve(&h, &bob, &id, &wrong, false).await;
    assert_eq!(code(&refused), Some(C::DigestMismatch), "{refused:?}");
    let (_, message) = rejection(&refused).unwrap();
    assert!(
        message.contains(&rct_bus::approval::hex(&p.digest)),
        "{message}"
    );
    // A command that does not exist, and one whose operation needs no approvals.
    let refused = approve(
        &h,
        &bob,
        &CommandId::generate().to_string(),
        &p.digest,
        false,
    )
    .await;
    assert_eq!(code(&refused), Some(C::UnknownCommand), "{refused:?}");
    let drained = drain("prod-1");
    let sre = h.operator("erin", &["sre_team"]).await;
    h.submit(&sre, &drained).await;
    let mut not_needed = approval(&drained.command_id, &p.digest, false, "INC-7");
    not_needed.operation = "traffic/drain-cluster".into();
    let sequence = h.submit(&bob, &not_needed).await;
    assert_eq!(code(&h.decision(sequence).await), Some(C::NotPending));

    // Bob's good approval counts once; a second one is refused.
    let ok = approve(&h, &bob, &id, &p.digest, false).await;
    assert!(matches!(ok.kind, Some(Kind::Admitted(_))), "{ok:?}");
    let refused = approve(&h, &bob, &id, &p.digest, false).await;
    assert_eq!(code(&refused), Some(C::AlreadyApproved), "{refused:?}");

    // Only bob's approval is on the request's timeline, and nothing was admitted.
    let recorded = approvals(&h, &id).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.commands().await, 1, "only the drain is a command");

    // Each refusal is recorded under the approval's own id, naming the request.
    for event in h.decisions().await {
        if let Some(Kind::Rejected(r)) = &event.kind {
            let request = r.request.as_ref().unwrap();
            assert!(!request.approves.is_empty(), "{event:?}");
            assert!(!r.message.is_empty());
        }
    }
}

#[tokio::test]
async fn a_denial_ends_the_request_with_its_reason() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let carol = h.operator("carol", &["app_leads"]).await;
    let request = delete("cart");
    let id = request.command_id.clone();
    let sequence = h.submit(&alice, &request).await;
    let p = pending(&h, &id).await;

    // A denial says why.
    let mut unjustified = approval(&id, &p.digest, true, "");
    unjustified.justification = String::new();
    let refused = h.decision(h.submit(&carol, &unjustified).await).await;
    assert_eq!(code(&refused), Some(C::JustificationRequired));

    approve(&h, &bob, &id, &p.digest, false).await;
    let sequence_of_denial = h
        .submit(&carol, &approval(&id, &p.digest, true, "INC-8"))
        .await;
    assert!(matches!(
        h.decision(sequence_of_denial).await.kind,
        Some(Kind::Admitted(_))
    ));
    let decision = h.decision(sequence).await;
    let (code, message) = rejection(&decision).unwrap();
    assert_eq!(code, C::Denied);
    assert!(
        message.contains("carol") && message.contains("INC-8"),
        "{message}"
    );
    // Too late now, however many approve.
    let late = approve(
        &h,
        &h.operator("frank", &["app_leads"]).await,
        &id,
        &p.digest,
        false,
    )
    .await;
    assert_eq!(self::code(&late), Some(C::NotPending));
    assert_eq!(h.commands().await, 0);
}

#[tokio::test]
async fn a_request_nobody_approves_in_time_is_refused_and_later_approvals_too() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_ttl(dir.path(), "2s");
    let h = Harness::start_with(move |c| c.catalog = catalog.clone()).await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let request = delete("cart");
    let id = request.command_id.clone();
    let sequence = h.submit(&alice, &request).await;
    let p = pending(&h, &id).await;
    approve(&h, &bob, &id, &p.digest, false).await;

    // Nobody else: admission refuses it once the time is up, with who did approve.
    let decision = h.decision(sequence).await;
    let (code, message) = rejection(&decision).unwrap();
    assert_eq!(code, C::ApprovalExpired, "{message}");
    assert!(
        message.contains("got 1") && message.contains("bob"),
        "{message}"
    );
    let carol = h.operator("carol", &["app_leads"]).await;
    let late = approve(&h, &carol, &id, &p.digest, false).await;
    assert_eq!(self::code(&late), Some(C::NotPending));
    assert_eq!(h.commands().await, 0);
}

#[tokio::test]
async fn a_catalog_change_to_the_operation_ends_its_waiting_requests() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_ttl(dir.path(), "20m");
    let file = catalog.clone();
    let h = Harness::start_with(move |c| {
        c.catalog = catalog.clone();
        c.watch_catalog = Some(Duration::from_millis(100));
    })
    .await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let request = delete("cart");
    let id = request.command_id.clone();
    let sequence = h.submit(&alice, &request).await;
    let p = pending(&h, &id).await;
    approve(&h, &bob, &id, &p.digest, false).await;

    // One approver is enough now: the request was asked under the rule of two, and ends.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("required: 2", "required: 1")).unwrap();
    let decision = h.decision(sequence).await;
    let (code, message) = rejection(&decision).unwrap();
    assert_eq!(code, C::CatalogChanged, "{message}");
    assert_eq!(h.commands().await, 0);
}

/// A waiting request's id is public: a submission that reuses it, admissible or not, must
/// not take the decision slot the approvals will fill, nor may a request wait under the id of
/// a command decided already.
#[tokio::test]
async fn a_waiting_request_keeps_its_id_whatever_else_claims_it() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let carol = h.operator("carol", &["app_leads"]).await;
    let erin = h.operator("erin", &["sre_team"]).await;
    let request = delete("cart");
    let id = request.command_id.clone();
    let sequence = h.submit(&alice, &request).await;
    let p = pending(&h, &id).await;

    // An admissible drain and a malformed one, both under the waiting request's id.
    let mut admissible = drain("prod-1");
    admissible.command_id.clone_from(&id);
    let mut malformed = drain("prod-1");
    malformed.command_id.clone_from(&id);
    malformed.justification = String::new();
    // Submissions are deduplicated by id for a while; after that, or from a client that
    // sets another message id, they come through.
    let again = async |claim: &proto::Submission, n: usize| {
        let subject = rct_bus::Subject::submit(&claim.operation.parse().unwrap()).to_string();
        let msg_id = format!("{}.again.{n}", claim.command_id);
        h.publish_raw(&subject, &msg_id, erin.sign(claim).encode_to_vec())
            .await
    };
    let claims = [
        (admissible, C::Duplicate),
        (malformed, C::JustificationRequired),
    ];
    for (n, (claim, expected)) in claims.iter().enumerate() {
        let refused = h.decision(again(claim, n).await).await;
        assert_ne!(refused.command_id, id, "it took the slot: {refused:?}");
        assert_eq!(code(&refused), Some(*expected), "{refused:?}");
    }
    assert_eq!(h.commands().await, 0, "the drain ran under a waiting id");

    // The approvals still admit the request.
    approve(&h, &bob, &id, &p.digest, false).await;
    approve(&h, &carol, &id, &p.digest, false).await;
    let decision = h.decision(sequence).await;
    assert!(
        matches!(decision.kind, Some(Kind::Admitted(_))),
        "{decision:?}"
    );
    h.command_on("rct.cmd.workloads._.delete").await;
    assert_eq!(h.commands().await, 1);

    // The other way round: a request that would wait, under a decided command's id.
    let drained = drain("prod-2");
    h.decision(h.submit(&erin, &drained).await).await;
    let mut reuse = delete("web");
    reuse.command_id.clone_from(&drained.command_id);
    let refused = h.decision(again(&reuse, 2).await).await;
    assert_eq!(code(&refused), Some(C::Duplicate), "{refused:?}");
    let waiting = replay::slot(
        &h.js,
        &Tower::new("workloads").unwrap(),
        &Target::none(),
        drained.command_id.parse().unwrap(),
        EventKind::Pending,
    )
    .await
    .unwrap();
    assert!(waiting.is_none(), "{waiting:?}");
}

/// Cancelling a request that waits for approvals withdraws it: it is refused on record,
/// naming who cancelled it and why, and approvals after that count for nothing.
#[tokio::test]
async fn a_waiting_request_cancelled_is_withdrawn_and_never_runs() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let carol = h.operator("carol", &["app_leads"]).await;
    let request = delete("cart");
    let id = request.command_id.clone();
    let sequence = h.submit(&alice, &request).await;
    let p = pending(&h, &id).await;
    approve(&h, &bob, &id, &p.digest, false).await;

    let mut cancel = approval(&id, &[], false, "INC-77");
    cancel.request = Some(proto::submission::Request::Cancel(proto::Cancel {
        command_id: id.clone(),
        resume: false,
    }));
    let cancelled = h.decision(h.submit(&alice, &cancel).await).await;
    assert!(
        matches!(cancelled.kind, Some(Kind::Admitted(_))),
        "{cancelled:?}"
    );
    let decision = h.decision(sequence).await;
    let (code, message) = rejection(&decision).unwrap();
    assert_eq!(code, C::Withdrawn, "{message}");
    assert!(
        message.contains("alice") && message.contains("INC-77"),
        "{message}"
    );
    let late = approve(&h, &carol, &id, &p.digest, false).await;
    assert_eq!(self::code(&late), Some(C::NotPending));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.commands().await, 0);
}

/// Whether a handler changes nothing in a dry run is its own word: a dry run waits too.
#[tokio::test]
async fn a_dry_run_waits_for_approvals_too() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let mut request = delete("cart");
    if let Some(proto::submission::Request::Run(run)) = &mut request.request {
        run.dry_run = true;
    }
    h.submit(&alice, &request).await;
    let p = pending(&h, &request.command_id).await;
    assert!(p.request.unwrap().dry_run);
    assert_eq!(h.commands().await, 0);
}

/// Two replicas, each taking one of the two last approvals at the same moment: whichever
/// reads last sees both, so every request is decided, once, with one command.
#[tokio::test]
async fn two_replicas_racing_on_the_final_approval_decide_each_request_once() {
    let h = Harness::start().await;
    let second = h.second_replica();
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let carol = h.operator("carol", &["app_leads"]).await;

    const REQUESTS: usize = 12;
    let mut requests = Vec::new();
    for n in 0..REQUESTS {
        let request = delete(&format!("app-{n}"));
        let sequence = h.submit(&alice, &request).await;
        requests.push((request.command_id, sequence));
    }
    for (id, _) in &requests {
        let p = pending(&h, id).await;
        let (first, second) = (
            approval(id, &p.digest, false, "INC-7"),
            approval(id, &p.digest, false, "INC-7"),
        );
        tokio::join!(h.submit(&bob, &first), h.submit(&carol, &second));
    }
    for (id, sequence) in &requests {
        let decision = h.decision(*sequence).await;
        assert!(
            matches!(decision.kind, Some(Kind::Admitted(_))),
            "{id}: {decision:?}"
        );
    }
    h.submissions_settled().await;
    let decisions = h.decisions().await;
    for (id, _) in &requests {
        let of_it = decisions.iter().filter(|d| &d.command_id == id).count();
        assert_eq!(of_it, 1, "{id} decided {of_it} times");
    }
    let mut stream = h.js.get_stream("RCT_CMD").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, REQUESTS as u64);
    second.stop().await;
}

fn broken_glass(deployment: &str, reason: &str) -> proto::Submission {
    let mut request = delete(deployment);
    if let Some(proto::submission::Request::Run(run)) = &mut request.request {
        run.break_glass = reason.into();
    }
    request
}

fn review(id: &str) -> proto::Submission {
    let mut submission = approval(id, &[], false, "INC-9");
    submission.request = Some(proto::submission::Request::Review(proto::Review {
        command_id: id.into(),
    }));
    submission
}

#[tokio::test]
async fn breaking_the_glass_skips_approvals_for_its_groups_only_and_opens_a_review() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team", "sre_oncall"]).await;
    let dave = h.operator("dave", &["sre_team"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;

    // Not in the break-glass groups: refused, the attempt and its reason on record.
    let refused = h
        .decision(
            h.submit(&dave, &broken_glass("cart", "INC-9 db down"))
                .await,
        )
        .await;
    let (refusal, message) = rejection(&refused).unwrap();
    assert_eq!(refusal, C::Forbidden, "{message}");
    assert!(message.contains("sre_oncall"), "{message}");
    let Some(Kind::Rejected(r)) = &refused.kind else {
        unreachable!()
    };
    assert_eq!(r.request.as_ref().unwrap().break_glass, "INC-9 db down");
    // An operation with no break-glass rule.
    let mut drain = drain("prod-1");
    if let Some(proto::submission::Request::Run(run)) = &mut drain.request {
        run.break_glass = "INC-9".into();
    }
    let oncall = h.operator("olga", &["sre_team", "sre_oncall"]).await;
    let refused = h.decision(h.submit(&oncall, &drain).await).await;
    assert_eq!(code(&refused), Some(C::Forbidden));
    // A reason that is not one printable line.
    let refused = h
        .decision(
            h.submit(&alice, &broken_glass("cart", "INC-9\u{1b}[2J"))
                .await,
        )
        .await;
    assert_eq!(code(&refused), Some(C::Malformed));
    assert_eq!(h.commands().await, 0);

    // In the groups: admitted at once, flagged, the command carrying the reason.
    let request = broken_glass("cart", "INC-9 db down");
    let id = request.command_id.clone();
    let decision = h.decision(h.submit(&alice, &request).await).await;
    let Some(Kind::Admitted(admitted)) = &decision.kind else {
        panic!("{decision:?}");
    };
    assert_eq!(
        admitted.request.as_ref().unwrap().break_glass,
        "INC-9 db down"
    );
    assert!(admitted.approvals.is_empty());
    let stored = h.command_on("rct.cmd.workloads._.delete").await;
    let command: proto::Command = Verifier::new([h.admission_key.clone()])
        .verify(
            Unverified::decode(&stored.payload).unwrap(),
            rct_bus::Purpose::Command,
        )
        .unwrap()
        .decode()
        .unwrap();
    assert_eq!(command.break_glass, "INC-9 db down");
    let catalog = rct_admission::catalog::load(&support::catalog_path()).unwrap();
    let operation = &catalog.operations[DELETE];
    let glass = operation.break_glass.clone().unwrap();
    let requester = rct_bus::approval::requested(
        &command,
        &catalog.towers["workloads"],
        operation,
        &Verifier::new([h.admission_key.clone()]),
    )
    .unwrap();
    rct_bus::approval::verify_break_glass(&requester, &glass).unwrap();
    assert_eq!(requester.operator.subject, "alice");

    // The review: not by who broke the glass, once by someone else, and only of such a run.
    let refused = h.decision(h.submit(&alice, &review(&id)).await).await;
    assert_eq!(code(&refused), Some(C::SelfApproval), "{refused:?}");
    let reviewed = h.decision(h.submit(&bob, &review(&id)).await).await;
    assert!(
        matches!(reviewed.kind, Some(Kind::Admitted(_))),
        "{reviewed:?}"
    );
    let again = h.decision(h.submit(&bob, &review(&id)).await).await;
    assert_eq!(code(&again), Some(C::AlreadyApproved), "{again:?}");
    let outsider = h.operator("zed", &["app_oncall"]).await;
    let refused = h.decision(h.submit(&outsider, &review(&id)).await).await;
    assert_eq!(code(&refused), Some(C::Forbidden), "{refused:?}");
    let ordinary = delete("other");
    h.submit(&alice, &ordinary).await;
    pending(&h, &ordinary.command_id).await;
    let refused = h
        .decision(h.submit(&bob, &review(&ordinary.command_id)).await)
        .await;
    assert_eq!(code(&refused), Some(C::NotPending), "{refused:?}");
    let reviews: Vec<_> = approvals(&h, &id).await;
    assert_eq!(reviews.len(), 1);
    assert!(reviews[0].review);
    assert_eq!(reviews[0].by.as_ref().unwrap().subject, "bob");
}

/// Submits `s` signed by the harness's registered service; returns its decision.
async fn as_service(h: &Harness, s: &proto::Submission) -> proto::Event {
    let envelope = h
        .service
        .sign(rct_bus::Purpose::Submission, s.encode_to_vec());
    h.decision(h.publish_envelope(s, envelope).await).await
}

#[tokio::test]
async fn a_service_may_not_approve_review_break_glass_or_request_what_needs_approvals() {
    // A service in every group concerned: only its lack of a certificate stands in the way.
    let h = Harness::start_with(|c| {
        c.services[0].groups = vec!["sre_team".into(), "sre_leads".into(), "sre_oncall".into()];
    })
    .await;
    let alice = h.operator("alice", &["sre_team", "sre_oncall"]).await;
    let waiting = delete("cart");
    let id = waiting.command_id.clone();
    h.submit(&alice, &waiting).await;
    let digest = pending(&h, &id).await.digest;
    let glass = broken_glass("orders", "INC-9 db down");
    let glass_id = glass.command_id.clone();
    h.decision(h.submit(&alice, &glass).await).await;

    for (what, submission) in [
        ("a request", delete("basket")),
        ("a break-glass run", broken_glass("basket", "INC-9 db down")),
        ("an approval", approval(&id, &digest, false, "INC-7")),
        ("a denial", approval(&id, &digest, true, "INC-7")),
        ("a review", review(&glass_id)),
    ] {
        let refused = as_service(&h, &submission).await;
        let (refusal, message) =
            rejection(&refused).unwrap_or_else(|| panic!("{what}: {refused:?}"));
        assert_eq!(refusal, C::Forbidden, "{what}: {message}");
        assert!(
            message.contains("deployer signs as a registered service"),
            "{what}: {message}"
        );
    }
    assert!(approvals(&h, &id).await.is_empty(), "no approval on record");
    assert!(
        approvals(&h, &glass_id).await.is_empty(),
        "no review on record"
    );
    // What needs no certificate still runs.
    let drained = as_service(&h, &drain("prod-2")).await;
    assert!(
        matches!(drained.kind, Some(Kind::Admitted(_))),
        "{drained:?}"
    );
}
