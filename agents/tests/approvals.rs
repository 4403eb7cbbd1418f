//! An agent checks a command's approvals itself before it runs it: each approver's own
//! signature over the command's request digest, by a certificate admission issued, from
//! distinct approvers in the rule's groups, never the requester unless allowed. A command
//! admission signed whose approvals do not verify ends failed, unrun.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prost::Message as _;
use rct_agents::{Context, Outcome, Params, Tower};
use rct_bus::proto::{self, event::Kind, submission::Request};
use rct_bus::{KeyPair, Purpose, certificate};
use rct_streams::timestamp::from_datetime;
use support::{Harness, Ledger, outcome};
use time::OffsetDateTime;

fn string(s: &str) -> proto::Value {
    proto::Value {
        kind: Some(proto::value::Kind::String(s.into())),
    }
}

/// Someone who can sign approvals: a session key and a certificate for it from `issuer`.
struct Approver {
    subject: String,
    session: KeyPair,
    certificate: String,
}

fn approver(issuer: &KeyPair, subject: &str, groups: &[&str]) -> Approver {
    let session = KeyPair::generate();
    let now = OffsetDateTime::now_utc().unix_timestamp() as u64;
    let operator = proto::Operator {
        subject: subject.into(),
        email: format!("{subject}@example.com"),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    };
    let certificate = certificate::issue(issuer, &operator, session.public(), now, now, now + 600);
    Approver {
        subject: subject.into(),
        session,
        certificate,
    }
}

impl Approver {
    /// The signed approval of `command` with `digest`.
    fn approve(&self, command: &proto::Command, digest: &[u8]) -> proto::SignedEnvelope {
        let now = OffsetDateTime::now_utc();
        let submission = proto::Submission {
            command_id: rct_bus::CommandId::generate().to_string(),
            operation: command.operation.clone(),
            justification: "INC-7".into(),
            requested_at: Some(from_datetime(now)),
            expires_at: Some(from_datetime(now + time::Duration::minutes(1))),
            client: None,
            request: Some(Request::Approve(proto::Approve {
                command_id: command.command_id.clone(),
                digest: digest.to_vec(),
            })),
        };
        let mut envelope = self
            .session
            .sign(Purpose::Submission, submission.encode_to_vec());
        envelope.certificate = self.certificate.clone();
        envelope
    }
}

/// A delete of shop/cart asked by alice, with her submission inside, as admission builds it;
/// and its request digest.
fn delete(h: &Harness) -> (proto::Command, Vec<u8>) {
    asked(h, "workloads/delete")
}

/// `operation` of shop/cart asked by alice (see [`delete`]).
fn asked(h: &Harness, operation: &str) -> (proto::Command, Vec<u8>) {
    let mut command = h.command(
        operation,
        "_",
        &[
            ("namespace", string("shop")),
            ("deployment", string("cart")),
        ],
    );
    let alice = approver(&h.admission, "alice", &["sre_team"]);
    let submission = proto::Submission {
        command_id: command.command_id.clone(),
        operation: command.operation.clone(),
        justification: command.justification.clone(),
        requested_at: command.admitted_at,
        expires_at: command.deadline,
        client: None,
        request: Some(Request::Run(proto::Run {
            target: "_".into(),
            params: command.params.clone(),
            dry_run: false,
            break_glass: String::new(),
            plan: false,
            undo_of: String::new(),
            rollout: None,
        })),
    };
    let mut envelope = alice
        .session
        .sign(Purpose::Submission, submission.encode_to_vec());
    envelope.certificate = alice.certificate.clone();
    let digest = rct_bus::approval::digest(&envelope.body, &command.catalog_version, None);
    command.submission = Some(envelope);
    (command, digest.to_vec())
}

/// The approvals a case puts in a command, given the command and its digest.
type Approvals<'a> = Box<dyn Fn(&proto::Command, &[u8]) -> Vec<proto::SignedEnvelope> + 'a>;

fn delete_agent(h: &Harness, ledger: &Ledger) -> support::Running {
    let ledger = ledger.clone();
    h.run(
        Tower::new("workloads")
            .operation("delete", move |ctx: Context, _: Params| {
                let ledger = ledger.clone();
                async move {
                    ledger.record(&ctx, "a");
                    Ok(Outcome::new("deleted"))
                }
            })
            .config(h.config("a")),
    )
}

#[tokio::test]
async fn a_command_runs_only_with_approvals_that_verify() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let agent = delete_agent(&h, &ledger);
    let bob = approver(&h.admission, "bob", &["sre_leads"]);
    let carol = approver(&h.admission, "carol", &["app_leads"]);
    let forger = KeyPair::generate();
    let mallory = approver(&forger, "mallory", &["sre_leads"]);
    let dave = approver(&h.admission, "dave", &["sre_team"]);
    let alice = approver(&h.admission, "alice", &["sre_leads"]);

    // Each case: the approvals a command carries, and whether it runs.
    let cases: Vec<(&str, Approvals<'_>, bool)> = vec![
        (
            "two good approvals",
            Box::new(|c, d| vec![bob.approve(c, d), carol.approve(c, d)]),
            true,
        ),
        ("none", Box::new(|_, _| Vec::new()), false),
        (
            "one of two",
            Box::new(|c, d| vec![bob.approve(c, d)]),
            false,
        ),
        (
            "the same approver twice",
            Box::new(|c, d| vec![bob.approve(c, d), bob.approve(c, d)]),
            false,
        ),
        (
            "a certificate admission did not issue",
            Box::new(|c, d| vec![bob.approve(c, d), mallory.approve(c, d)]),
            false,
        ),
        (
            "an approver outside the groups",
            Box::new(|c, d| vec![bob.approve(c, d), dave.approve(c, d)]),
            false,
        ),
        (
            "another digest",
            Box::new(|c, d| {
                let mut other = d.to_vec();
                other[0] ^= 1;
                vec![bob.approve(c, d), carol.approve(c, &other)]
            }),
            false,
        ),
        (
            "an approval of another command",
            Box::new(|c, d| {
                let mut other = c.clone();
                other.command_id = rct_bus::CommandId::generate().to_string();
                vec![bob.approve(c, d), carol.approve(&other, d)]
            }),
            false,
        ),
        (
            "a signature changed after signing",
            Box::new(|c, d| {
                let mut tampered = carol.approve(c, d);
                tampered.signature[0] ^= 1;
                vec![bob.approve(c, d), tampered]
            }),
            false,
        ),
    ];
    for (case, approvals, runs) in &cases {
        let (mut command, digest) = delete(&h);
        command.approvals = approvals(&command, &digest);
        // Admitted once the approvals are in.
        command.admitted_at = Some(from_datetime(OffsetDateTime::now_utc()));
        h.publish(&command).await;
        let records = h.finished(&command.command_id).await;
        let ran = ledger.executions(&command.command_id);
        match outcome(&records) {
            Kind::Succeeded(_) => assert!(*runs, "{case}: ran"),
            Kind::Failed(f) => {
                assert!(!*runs, "{case}: {f:?}");
                assert_eq!(f.code, "approvals_invalid", "{case}");
                assert!(
                    f.message.contains("needs 2 approvals"),
                    "{case}: {}",
                    f.message
                );
            }
            other => panic!("{case}: {other:?}"),
        }
        assert_eq!(ran, usize::from(*runs), "{case}");
    }

    // Good approvals, of a request other than the command: what runs is what was approved.
    type Change = fn(&mut proto::Command);
    let changes: [(&str, Change); 5] = [
        ("other parameters", |c| {
            c.params.insert("deployment".into(), string("web"));
        }),
        ("a dry run turned real", |c| {
            c.dry_run = !c.dry_run;
        }),
        ("another justification", |c| {
            c.justification = "INC-8".into();
        }),
        ("another requester", |c| {
            c.operator.as_mut().unwrap().subject = "zed".into();
        }),
        ("approvals made after it was admitted", |c| {
            c.admitted_at.as_mut().unwrap().seconds -= 60;
        }),
    ];
    for (case, change) in changes {
        let (mut command, digest) = delete(&h);
        command.approvals = vec![
            bob.approve(&command, &digest),
            carol.approve(&command, &digest),
        ];
        command.admitted_at = Some(from_datetime(OffsetDateTime::now_utc()));
        change(&mut command);
        h.publish(&command).await;
        let records = h.finished(&command.command_id).await;
        let Kind::Failed(f) = outcome(&records) else {
            panic!("{case}: {records:?}");
        };
        assert_eq!(f.code, "approvals_invalid", "{case}");
        assert_eq!(ledger.executions(&command.command_id), 0, "{case}");
    }

    // The requester approving their own request does not count either.
    let (mut command, digest) = delete(&h);
    command.approvals = vec![
        bob.approve(&command, &digest),
        alice.approve(&command, &digest),
    ];
    command.admitted_at = Some(from_datetime(OffsetDateTime::now_utc()));
    h.publish(&command).await;
    let records = h.finished(&command.command_id).await;
    let Kind::Failed(f) = outcome(&records) else {
        panic!("{records:?}");
    };
    assert!(f.message.contains("who asked for it"), "{}", f.message);
    agent.stop().await;
}

/// A delete run by breaking the glass, asked for by `requester` (their signed submission
/// inside, with their certificate), the command giving `reason`.
fn broken_glass(h: &Harness, requester: &Approver, asked: &str, reason: &str) -> proto::Command {
    let (mut command, _) = delete(h);
    let submission = proto::Submission {
        command_id: command.command_id.clone(),
        operation: command.operation.clone(),
        justification: command.justification.clone(),
        requested_at: command.admitted_at,
        expires_at: command.deadline,
        client: None,
        request: Some(Request::Run(proto::Run {
            target: "_".into(),
            params: command.params.clone(),
            dry_run: false,
            break_glass: asked.into(),
            plan: false,
            undo_of: String::new(),
            rollout: None,
        })),
    };
    let mut envelope = requester
        .session
        .sign(Purpose::Submission, submission.encode_to_vec());
    envelope.certificate = requester.certificate.clone();
    command.submission = Some(envelope);
    command.break_glass = reason.into();
    command
        .operator
        .as_mut()
        .unwrap()
        .subject
        .clone_from(&requester.subject);
    command
}

#[tokio::test]
async fn a_break_glass_command_runs_only_for_a_requester_the_rule_names() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let agent = delete_agent(&h, &ledger);
    let olga = approver(&h.admission, "olga", &["sre_team", "sre_oncall"]);
    let dave = approver(&h.admission, "dave", &["sre_team"]);
    let forged = approver(&KeyPair::generate(), "olga", &["sre_oncall"]);
    let cases = [
        (
            "an on-call requester",
            broken_glass(&h, &olga, "INC-9", "INC-9"),
            true,
        ),
        (
            "a requester outside the groups",
            broken_glass(&h, &dave, "INC-9", "INC-9"),
            false,
        ),
        (
            "a certificate admission did not issue",
            broken_glass(&h, &forged, "INC-9", "INC-9"),
            false,
        ),
        (
            "a request that did not break the glass",
            broken_glass(&h, &olga, "", "INC-9"),
            false,
        ),
    ];
    for (case, command, runs) in &cases {
        h.publish(command).await;
        let records = h.finished(&command.command_id).await;
        match outcome(&records) {
            Kind::Succeeded(_) => assert!(*runs, "{case}: ran"),
            Kind::Failed(f) => {
                assert!(!*runs, "{case}: {f:?}");
                assert_eq!(f.code, "approvals_invalid", "{case}");
            }
            other => panic!("{case}: {other:?}"),
        }
        assert_eq!(
            ledger.executions(&command.command_id),
            usize::from(*runs),
            "{case}"
        );
    }
    agent.stop().await;
}

/// A failover handler that plans: it would promote whichever of cart-a and cart-b is not
/// primary (`flipped`: cart-b is).
fn failover_agent(h: &Harness, ledger: &Ledger, flipped: Arc<AtomicBool>) -> support::Running {
    let ledger = ledger.clone();
    h.run(
        Tower::new("workloads")
            .planning_operation("failover", move |ctx: Context, _: Params| {
                let ledger = ledger.clone();
                let flipped = flipped.clone();
                async move {
                    let (from, to) = if flipped.load(Ordering::SeqCst) {
                        ("cart-b", "cart-a")
                    } else {
                        ("cart-a", "cart-b")
                    };
                    if ctx.planning() {
                        ctx.change("promote", to, "replica → primary");
                        ctx.change("demote", from, "primary → replica");
                        return Ok(Outcome::new(format!("fail over from {from} to {to}")));
                    }
                    ledger.record(&ctx, "a");
                    flipped.store(!flipped.load(Ordering::SeqCst), Ordering::SeqCst);
                    Ok(Outcome::new(format!("{to} is primary")))
                }
            })
            .config(h.config("a")),
    )
}

fn cart_plan(from: &str, to: &str) -> proto::Plan {
    let change = |action: &str, resource: &str, detail: &str| proto::Change {
        action: action.into(),
        resource: resource.into(),
        detail: detail.into(),
    };
    proto::Plan {
        summary: format!("fail over from {from} to {to}"),
        changes: vec![
            change("promote", to, "replica → primary"),
            change("demote", from, "primary → replica"),
        ],
    }
}

#[tokio::test]
async fn a_plan_only_command_records_the_handlers_plan_and_changes_nothing() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let _agent = failover_agent(&h, &ledger, Arc::default());
    // As admission sends it to describe a waiting request: under the id derived from it.
    let (mut command, _) = asked(&h, "workloads/failover");
    let id: rct_bus::CommandId = command.command_id.parse().unwrap();
    command.command_id = id.plan().to_string();
    command.plan = true;
    h.publish(&command).await;
    let records = h.finished(&command.command_id).await;
    match outcome(&records) {
        Kind::Succeeded(s) => assert_eq!(
            s.summary,
            "planned 2 changes: fail over from cart-a to cart-b"
        ),
        other => panic!("{other:?}"),
    }
    let plans: Vec<&proto::Plan> = records
        .iter()
        .filter_map(|r| match &r.event.kind {
            Some(Kind::Plan(p)) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(plans, [&cart_plan("cart-a", "cart-b")]);
    assert_eq!(ledger.executions(&command.command_id), 0, "a plan ran it");

    // Under any other id it is not what the requester asked for.
    let (mut other, _) = asked(&h, "workloads/failover");
    other.command_id = rct_bus::CommandId::generate().to_string();
    other.plan = true;
    h.publish(&other).await;
    let records = h.finished(&other.command_id).await;
    assert!(
        matches!(outcome(&records), Kind::Failed(f) if f.code == "approvals_invalid"),
        "{:?}",
        outcome(&records)
    );
}

#[tokio::test]
async fn an_approved_plan_runs_while_it_holds_and_fails_stale_once_it_changed() {
    let h = Harness::start().await;
    let ledger = Ledger::default();
    let flipped = Arc::new(AtomicBool::new(false));
    let _agent = failover_agent(&h, &ledger, flipped.clone());
    let bob = approver(&h.admission, "bob", &["sre_leads"]);
    let carol = approver(&h.admission, "carol", &["app_leads"]);
    let approved = |plan: Option<proto::Plan>| {
        let (mut command, _) = asked(&h, "workloads/failover");
        let body = &command.submission.as_ref().unwrap().body;
        let digest = rct_bus::approval::digest(body, &command.catalog_version, plan.as_ref());
        command.approvals = vec![
            bob.approve(&command, &digest),
            carol.approve(&command, &digest),
        ];
        command.approved_plan = plan;
        command.admitted_at = Some(from_datetime(OffsetDateTime::now_utc()));
        command
    };

    // Approved without a plan, for an operation that plans: refused.
    let command = approved(None);
    h.publish(&command).await;
    let records = h.finished(&command.command_id).await;
    assert!(
        matches!(outcome(&records), Kind::Failed(f) if f.code == "approvals_invalid"),
        "{:?}",
        outcome(&records)
    );

    // The plan holds: it runs.
    let first = approved(Some(cart_plan("cart-a", "cart-b")));
    let second = approved(Some(cart_plan("cart-a", "cart-b")));
    h.publish(&first).await;
    let records = h.finished(&first.command_id).await;
    assert!(
        matches!(outcome(&records), Kind::Succeeded(_)),
        "{:?}",
        outcome(&records)
    );
    assert_eq!(ledger.executions(&first.command_id), 1);

    // The same plan, approved before the first ran: cart-b is primary now.
    h.publish(&second).await;
    let records = h.finished(&second.command_id).await;
    let Kind::Failed(f) = outcome(&records) else {
        panic!("{:?}", outcome(&records));
    };
    assert_eq!(f.code, "stale_plan", "{f:?}");
    assert_eq!(f.approved_plan, Some(cart_plan("cart-a", "cart-b")));
    assert_eq!(f.fresh_plan, Some(cart_plan("cart-b", "cart-a")));
    assert!(f.message.contains("promote cart-a"), "{}", f.message);
    assert_eq!(ledger.executions(&second.command_id), 0, "a stale plan ran");
    assert!(flipped.load(Ordering::SeqCst), "it changed something");
}

#[tokio::test]
async fn an_agent_whose_handler_cannot_plan_does_not_serve_an_operation_that_plans() {
    let h = Harness::start().await;
    let running = h.run(
        Tower::new("workloads")
            .operation("failover", |_: Context, _: Params| async {
                Ok(Outcome::new("done"))
            })
            .config(h.config("a")),
    );
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), running.task)
        .await
        .expect("it serves");
    let error = ended.unwrap().expect_err("it serves").to_string();
    assert!(error.contains("planning_operation"), "{error}");
}
