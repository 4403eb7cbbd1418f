//! Plans, against a real nats-server: a request of an operation that plans waits for the
//! plan its plan-only command makes, approvals count only for the digest over that plan, and
//! the admitted command carries the plan its approvers approved. The test plays the agent.

mod support;

use std::time::Duration;

use rct_bus::proto::{self, RejectionCode as C, event::Kind};
use rct_bus::{CommandId, Tower, Unverified, Verifier};
use rct_streams::Publisher;
use rct_streams::timestamp::from_datetime;
use support::{Harness, Operator, rejection, workloads_pending as pending, workloads_slot as slot};
use time::OffsetDateTime;

const FAILOVER: &str = "workloads/failover";
const COMMANDS: &str = "rct.cmd.workloads._.failover";

fn failover(deployment: &str) -> proto::Submission {
    support::workload(FAILOVER, deployment, "INC-8")
}

async fn approve(h: &Harness, who: &Operator, id: &str, digest: &[u8]) -> proto::Event {
    let submission = support::approval(FAILOVER, id, digest, false, "INC-8");
    h.decision(h.submit(who, &submission).await).await
}

/// Writes as the workloads agent would, with a key the harness's admission certified.
fn as_agent(h: &Harness) -> Publisher {
    support::as_agent_of(h, &Tower::new("workloads").unwrap(), "_")
}

fn event(id: &str, kind: Kind) -> proto::Event {
    proto::Event {
        command_id: id.into(),
        at: Some(from_datetime(OffsetDateTime::now_utc())),
        source: "agent/workloads/_/agent-1".into(),
        operation: FAILOVER.into(),
        target: "_".into(),
        kind: Some(kind),
    }
}

fn plan() -> proto::Plan {
    proto::Plan {
        summary: "fail shop/cart over from cart-a to cart-b".into(),
        changes: vec![proto::Change {
            action: "promote".into(),
            resource: "cart-b".into(),
            detail: "replica → primary".into(),
        }],
    }
}

async fn command(h: &Harness, id: &str) -> proto::Command {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let stored = h.command_on(COMMANDS).await;
            let command: proto::Command = Verifier::new([h.admission_key.clone()])
                .verify(
                    Unverified::decode(&stored.payload).unwrap(),
                    rct_bus::Purpose::Command,
                )
                .unwrap()
                .decode()
                .unwrap();
            if command.command_id == id {
                return command;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no command {id}"))
}

/// The decision about command `id` (the plan-only command's decision names the same
/// submission, so it is read by id, not by submission).
async fn decision(h: &Harness, id: &str) -> proto::Event {
    slot(h, id, rct_bus::EventKind::Decision).await
}

#[tokio::test]
async fn approvals_count_only_for_the_plan_and_the_command_carries_it() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let carol = h.operator("carol", &["app_leads"]).await;
    let request = failover("cart");
    let id = request.command_id.clone();
    h.submit(&alice, &request).await;

    // Waiting, with no digest of its own yet: the plan-only command is sent to describe it.
    let p = pending(&h, &id).await;
    let plan_id = id.parse::<CommandId>().unwrap().plan().to_string();
    assert_eq!(p.plan_id, plan_id);
    assert!(p.digest.is_empty());
    let planning = command(&h, &plan_id).await;
    assert!(planning.plan, "{planning:?}");
    assert!(planning.approved_plan.is_none() && planning.approvals.is_empty());
    let catalog = rct_admission::catalog::load(&support::catalog_path()).unwrap();
    let operation = &catalog.operations[FAILOVER];
    let trusted = Verifier::new([h.admission_key.clone()]);
    let tower = &catalog.towers["workloads"];
    // Agents take it for the requester's: its id is the one derived from the request's.
    rct_bus::approval::requested(&planning, tower, operation, &trusted).unwrap();
    let mut renamed = planning.clone();
    renamed.command_id = CommandId::generate().to_string();
    assert!(rct_bus::approval::requested(&renamed, tower, operation, &trusted).is_err());

    // Before the plan, nothing can be approved.
    let without = rct_bus::approval::recompute(&p, None).unwrap();
    let early = approve(&h, &bob, &id, &without).await;
    let (code, message) = rejection(&early).expect("refused");
    assert_eq!(code, C::DigestMismatch, "{message}");
    assert!(message.contains("not made yet"), "{message}");

    // A plan another tower's agent writes under that id is not this request's.
    let traffic = Tower::new("traffic").unwrap();
    let elsewhere = proto::Event {
        target: "prod-1".into(),
        ..event(&plan_id, Kind::Plan(plan()))
    };
    support::as_agent_of(&h, &traffic, "prod-1")
        .event(&traffic, &elsewhere, "agent-2")
        .await
        .unwrap();
    let with = rct_bus::approval::recompute(&p, Some(&plan())).unwrap();
    let refused = approve(&h, &bob, &id, &with).await;
    let (code, message) = rejection(&refused).expect("refused");
    assert_eq!(code, C::DigestMismatch, "{message}");
    assert!(message.contains("not made yet"), "{message}");

    let workloads = Tower::new("workloads").unwrap();
    as_agent(&h)
        .event(&workloads, &event(&plan_id, Kind::Plan(plan())), "agent-1")
        .await
        .unwrap();
    for digest in [
        without,
        rct_bus::approval::recompute(&p, Some(&proto::Plan::default())).unwrap(),
    ] {
        let refused = approve(&h, &bob, &id, &digest).await;
        assert_eq!(
            rejection(&refused).map(|(c, _)| c),
            Some(C::DigestMismatch),
            "{refused:?}"
        );
    }
    let first = approve(&h, &bob, &id, &with).await;
    assert!(matches!(first.kind, Some(Kind::Admitted(_))), "{first:?}");
    approve(&h, &carol, &id, &with).await;

    // The command carries the approved plan; its approvals verify over it, and over no other.
    let approved = command(&h, &id).await;
    assert!(!approved.plan);
    assert_eq!(approved.approved_plan, Some(plan()));
    let requester = rct_bus::approval::requested(&approved, tower, operation, &trusted).unwrap();
    let rule = operation.approvals.clone().unwrap();
    assert_eq!(
        rct_bus::approval::verify(&approved, &requester, &rule, &trusted)
            .unwrap()
            .len(),
        2
    );
    let mut swapped = approved.clone();
    swapped.approved_plan.as_mut().unwrap().changes[0].resource = "cart-a".into();
    assert!(rct_bus::approval::verify(&swapped, &requester, &rule, &trusted).is_err());
    let mut dropped = approved.clone();
    dropped.approved_plan = None;
    assert!(rct_bus::approval::verify(&dropped, &requester, &rule, &trusted).is_err());
}

#[tokio::test]
async fn a_request_whose_plan_fails_is_refused_plan_failed() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["sre_leads"]).await;
    let request = failover("orders");
    let id = request.command_id.clone();
    h.submit(&alice, &request).await;
    let p = pending(&h, &id).await;
    let failed = Kind::Failed(proto::Failed {
        code: "unreachable".into(),
        message: "the database does not answer".into(),
        ..Default::default()
    });
    as_agent(&h)
        .event(
            &Tower::new("workloads").unwrap(),
            &event(&p.plan_id, failed),
            "agent-1",
        )
        .await
        .unwrap();

    // The sweep ends it; later approvals count for nothing.
    let decision = decision(&h, &id).await;
    let (code, message) = rejection(&decision).expect("refused");
    assert_eq!(code, C::PlanFailed, "{message}");
    assert!(
        message.contains("the database does not answer"),
        "{message}"
    );
    let late = approve(
        &h,
        &bob,
        &id,
        &rct_bus::approval::recompute(&p, None).unwrap(),
    )
    .await;
    assert_eq!(
        rejection(&late).map(|(c, _)| c),
        Some(C::NotPending),
        "{late:?}"
    );
}

#[tokio::test]
async fn a_plan_changes_nothing_so_it_needs_no_approvals_and_only_operations_that_plan_make_one() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let mut request = failover("cart");
    if let Some(proto::submission::Request::Run(run)) = &mut request.request {
        run.plan = true;
    }
    let decision = h.decision(h.submit(&alice, &request).await).await;
    let Some(Kind::Admitted(admitted)) = &decision.kind else {
        panic!("not admitted: {decision:?}");
    };
    assert!(admitted.request.as_ref().unwrap().plan);
    let sent = command(&h, &request.command_id).await;
    assert!(sent.plan && sent.approvals.is_empty());

    let mut drain = support::drain("prod-1");
    if let Some(proto::submission::Request::Run(run)) = &mut drain.request {
        run.plan = true;
    }
    let refused = h.decision(h.submit(&alice, &drain).await).await;
    let (code, message) = rejection(&refused).expect("refused");
    assert_eq!(code, C::InvalidParams, "{message}");
    assert!(message.contains("plan: true"), "{message}");
}

/// A replica that parked the request and stopped before sending its plan: the redelivered
/// submission sends it.
#[tokio::test]
async fn a_redelivered_request_sends_the_plan_its_replica_did_not() {
    let mut h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    h.stop_admission().await;
    let request = failover("cart");
    let sequence = h.submit(&alice, &request).await;
    let rct_admission::decide::Verdict::Park(_) = h.decide_and_die(sequence).await else {
        panic!("the dead replica did not park it");
    };
    h.start_admission().await;
    let plan_id = request
        .command_id
        .parse::<CommandId>()
        .unwrap()
        .plan()
        .to_string();
    let sent = command(&h, &plan_id).await;
    assert!(sent.plan, "{sent:?}");
}

/// The id a request's plan-only command would have, taken before the request came: no plan
/// made for another request (or for nothing) is ever this one's.
#[tokio::test]
async fn a_plan_id_someone_else_holds_makes_no_plan_for_the_request() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let request = failover("cart");
    let plan_id = request
        .command_id
        .parse::<CommandId>()
        .unwrap()
        .plan()
        .to_string();
    // A plan-only request of its own, for harmless parameters, under that id.
    let mut squatter = failover("basket");
    squatter.command_id.clone_from(&plan_id);
    if let Some(proto::submission::Request::Run(run)) = &mut squatter.request {
        run.plan = true;
    }
    let held = h.decision(h.submit(&alice, &squatter).await).await;
    assert!(matches!(held.kind, Some(Kind::Admitted(_))), "{held:?}");
    as_agent(&h)
        .event(
            &Tower::new("workloads").unwrap(),
            &event(&plan_id, Kind::Plan(plan())),
            "agent-1",
        )
        .await
        .unwrap();

    let id = request.command_id.clone();
    h.submit(&alice, &request).await;
    let refused = decision(&h, &id).await;
    let (code, message) = rejection(&refused).expect("refused");
    assert_eq!(code, C::PlanFailed, "{message}");
    assert!(message.contains("another command"), "{message}");
}
