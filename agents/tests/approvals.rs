//! An agent checks a command's approvals itself before it runs it: each approver's own
//! signature over the command's request digest, by a certificate admission issued, from
//! distinct approvers in the rule's groups, never the requester unless allowed. A command
//! admission signed whose approvals do not verify ends failed, unrun.

mod support;

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
    let mut command = h.command(
        "workloads/delete",
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
