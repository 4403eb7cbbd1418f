//! Every message of the contract survives encode → decode unchanged, and the field numbers
//! stay where the contract put them.

use prost::Message;
use prost_types::{Duration, Timestamp};
use rct_bus::proto::{self, event::Kind, value::Kind as V};
use rct_bus::{KeyPair, Purpose, Unverified, Verifier};

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(message: M) {
    let bytes = message.encode_to_vec();
    let decoded = M::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(decoded, message);
}

fn at(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos: 7 })
}

fn params() -> std::collections::BTreeMap<String, proto::Value> {
    let value = |kind| proto::Value { kind: Some(kind) };
    [
        ("s", V::String("a b".into())),
        ("i", V::Integer(-42)),
        ("n", V::Number(0.5)),
        ("b", V::Boolean(true)),
        ("e", V::Enumeration("fast".into())),
        (
            "d",
            V::Duration(Duration {
                seconds: 90,
                nanos: 0,
            }),
        ),
        ("t", V::Target("prod-1".into())),
        ("p", V::Masked(proto::Masked {})),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), value(v)))
    .collect()
}

fn operator() -> Option<proto::Operator> {
    Some(proto::Operator {
        subject: "u-123".into(),
        email: "alice@example.com".into(),
        groups: vec!["sre_team".into(), "traffic_team".into()],
    })
}

fn submission() -> proto::Submission {
    proto::Submission {
        command_id: "01JQ0000000000000000000000".into(),
        operation: "traffic/drain-cluster".into(),
        justification: "SRE-101".into(),
        requested_at: at(1_700_000_000),
        expires_at: at(1_700_000_060),
        client: Some(proto::ClientInfo {
            agent: "rct/0.1.0".into(),
            host: "laptop".into(),
        }),
        request: Some(proto::submission::Request::Run(proto::Run {
            target: "prod-1".into(),
            params: params(),
            dry_run: true,
            break_glass: String::new(),
            plan: true,
            undo_of: String::new(),
            rollout: None,
        })),
    }
}

#[test]
fn submissions_round_trip() {
    round_trip(submission());
    round_trip(proto::Submission {
        request: Some(proto::submission::Request::Cancel(proto::Cancel {
            command_id: "01JQ0000000000000000000001".into(),
            resume: false,
        })),
        ..submission()
    });
    round_trip(proto::Submission {
        request: Some(proto::submission::Request::Run(proto::Run {
            target: "_rollout".into(),
            params: params(),
            rollout: Some(proto::Rollout {
                targets: "prod-*".into(),
                catalog_order: true,
                waves: "1,25%,100%".into(),
                max_concurrency: "2".into(),
                max_errors: "10%".into(),
                max_degraded: "1".into(),
                bake: Some(Duration {
                    seconds: 300,
                    nanos: 0,
                }),
                health: "traffic/check-health".into(),
                params_by_target: [("prod-2".to_owned(), proto::Params { values: params() })]
                    .into(),
            }),
            ..Default::default()
        })),
        ..submission()
    });
}

fn plan() -> proto::Plan {
    proto::Plan {
        summary: "promote db-2".into(),
        changes: vec![proto::Change {
            action: "promote".into(),
            resource: "db-2".into(),
            detail: "replica → primary".into(),
        }],
    }
}

#[test]
fn commands_round_trip_with_the_operators_envelope_inside() {
    let session = KeyPair::generate();
    let admission = KeyPair::generate();
    let envelope = session.sign(Purpose::Submission, submission().encode_to_vec());
    let command = proto::Command {
        command_id: "01JQ0000000000000000000000".into(),
        operation: "traffic/drain-cluster".into(),
        target: "prod-1".into(),
        params: params(),
        justification: "SRE-101".into(),
        dry_run: false,
        operator: operator(),
        admitted_at: at(1_700_000_001),
        deadline: at(1_700_000_121),
        timeout: Some(Duration {
            seconds: 900,
            nanos: 0,
        }),
        catalog_version: "v7".into(),
        submission: Some(envelope.clone()),
        approvals: vec![envelope.clone()],
        break_glass: "INC-9 the database is down".into(),
        plan: false,
        approved_plan: Some(plan()),
        parent: "01JQ0000000000000000000009".into(),
    };
    round_trip(command.clone());

    // Through two envelopes and back: both signatures still verify over the received bytes.
    let wire = admission
        .sign(Purpose::Command, command.encode_to_vec())
        .encode_to_vec();
    let verified = Verifier::new([admission.public().clone()])
        .verify(Unverified::decode(&wire).unwrap(), Purpose::Command)
        .unwrap();
    let inner: proto::Command = verified.decode().unwrap();
    assert_eq!(inner, command);
    Unverified::from_proto(inner.submission.unwrap())
        .verify_with(session.public(), Purpose::Submission)
        .unwrap();
}

#[test]
fn every_event_kind_round_trips() {
    let request = Some(proto::Request {
        operator: operator(),
        justification: "SRE-101".into(),
        params: params(),
        dry_run: false,
        requested_at: at(1),
        cancels: String::new(),
        submission_sequence: 42,
        key_id: "ed25519:0011223344556677".into(),
        approves: String::new(),
        deny: false,
        review: false,
        break_glass: String::new(),
        freeze: Some(proto::FreezeRecord {
            until: at(3),
            end: false,
        }),
        plan: true,
        undo_of: String::new(),
        rollout: Some(proto::RolloutPlan {
            targets: vec!["prod-1".into(), "prod-2".into()],
            waves: vec![1, 2],
            max_concurrency: 1,
            max_errors: 0,
            max_degraded: 0,
            bake: None,
            health: String::new(),
            target_param: "cluster".into(),
            params_by_target: [("prod-1".to_owned(), proto::Params { values: params() })].into(),
        }),
        parent: "01JQ0000000000000000000009".into(),
        health: true,
        resume: true,
    });
    let kinds = vec![
        Kind::Rejected(proto::Rejected {
            code: proto::RejectionCode::Forbidden as i32,
            message: "alice is not in sre_team".into(),
            request: request.clone(),
        }),
        Kind::Admitted(proto::Admitted {
            request: request.clone(),
            deadline: at(2),
            timeout: Some(Duration {
                seconds: 60,
                nanos: 0,
            }),
            catalog_version: "v1".into(),
            approvals: vec![7, 9],
            plan: 8,
            locks: vec!["prod-1".into()],
        }),
        Kind::Pending(proto::Pending {
            request: request.clone(),
            rule: Some(proto::ApprovalRule {
                required: 2,
                approver_groups: vec!["dba_leads".into()],
                allow_self: false,
            }),
            expires_at: at(4),
            digest: vec![1; 32],
            catalog_version: "v1".into(),
            fingerprint: "00aa".into(),
            submission: None,
            plan_id: "01JQ0000000000000000000002".into(),
        }),
        Kind::Approval(proto::Approval {
            by: operator(),
            comment: "ok".into(),
            digest: vec![1; 32],
            submission: None,
            denied: false,
            approval_id: "01JQ0000000000000000000001".into(),
            review: true,
        }),
        Kind::Started(proto::Started {
            agent: "agent/traffic/prod-1/a".into(),
            host: "h".into(),
            target: "prod-1".into(),
            without_running: true,
        }),
        Kind::Progress(proto::Progress {
            percent: 40,
            step: "drain".into(),
            message: "2 of 5".into(),
        }),
        Kind::Log(proto::Log {
            stream: proto::LogStream::Stderr as i32,
            line: "warning".into(),
            undone_by: String::new(),
        }),
        Kind::CancelRequested(proto::CancelRequested {
            by: operator(),
            justification: "SRE-102".into(),
            resume: true,
        }),
        Kind::Succeeded(proto::Succeeded {
            summary: "drained".into(),
            outputs: [("moved".to_owned(), "12".to_owned())].into(),
        }),
        Kind::Failed(proto::Failed {
            code: "timeout".into(),
            message: "took too long".into(),
            approved_plan: Some(plan()),
            fresh_plan: Some(proto::Plan::default()),
        }),
        Kind::Plan(plan()),
        Kind::Expired(proto::Expired { deadline: at(3) }),
        Kind::Cancelled(proto::Cancelled {
            reason: "asked".into(),
        }),
        Kind::Unknown(proto::Unknown {
            reason: "agent stopped".into(),
        }),
    ];
    // One case per oneof arm: a new arm breaks this match (no wildcard) until it has a case.
    let mut arms = std::collections::BTreeSet::new();
    for kind in &kinds {
        arms.insert(match kind {
            Kind::Rejected(_) => "rejected",
            Kind::Admitted(_) => "admitted",
            Kind::Approval(_) => "approval",
            Kind::Pending(_) => "pending",
            Kind::Started(_) => "started",
            Kind::Progress(_) => "progress",
            Kind::Log(_) => "log",
            Kind::CancelRequested(_) => "cancel requested",
            Kind::Succeeded(_) => "succeeded",
            Kind::Failed(_) => "failed",
            Kind::Expired(_) => "expired",
            Kind::Cancelled(_) => "cancelled",
            Kind::Unknown(_) => "unknown",
            Kind::Plan(_) => "plan",
        });
    }
    assert_eq!(arms.len(), kinds.len(), "one case per oneof arm: {arms:?}");
    for kind in kinds {
        round_trip(proto::Event {
            command_id: "01JQ0000000000000000000000".into(),
            at: at(5),
            source: "admission/a1".into(),
            operation: "traffic/drain-cluster".into(),
            target: "prod-1".into(),
            kind: Some(kind),
        });
    }
}

#[test]
fn login_messages_round_trip() {
    round_trip(proto::LoginRequest {
        id_token: "eyJ...".into(),
        session_public_key: KeyPair::generate().public().to_bytes().to_vec(),
        client: None,
    });
    round_trip(proto::LoginResponse {
        result: Some(proto::login_response::Result::Certificate(
            proto::Certificate {
                token: "eyJ...".into(),
                expires_at: at(9),
            },
        )),
    });
    round_trip(proto::DevTokenRequest {
        user: "alice".into(),
        email: "alice@example.com".into(),
        groups: vec!["sre_team".into()],
    });
    round_trip(proto::DevTokenResponse {
        result: Some(proto::dev_token_response::Result::IdToken("eyJ...".into())),
    });
    round_trip(proto::LoginResponse {
        result: Some(proto::login_response::Result::Refused(
            proto::LoginRefused {
                code: "expired".into(),
                message: "the id_token expired".into(),
            },
        )),
    });
}

/// Field numbers are the contract: these bytes were written by the first version and must
/// keep decoding to the same values.
#[test]
fn field_numbers_do_not_move() {
    let envelope = proto::SignedEnvelope {
        body: vec![0xAA],
        key_id: "k".into(),
        signature: vec![0xBB],
        purpose: proto::Purpose::Command as i32,
        certificate: "c".into(),
    };
    assert_eq!(
        envelope.encode_to_vec(),
        [
            0x0A, 0x01, 0xAA, // 1: body
            0x12, 0x01, b'k', // 2: key_id
            0x1A, 0x01, 0xBB, // 3: signature
            0x20, 0x02, // 4: purpose = COMMAND
            0x2A, 0x01, b'c', // 5: certificate
        ]
    );
    let event = proto::Event {
        command_id: "i".into(),
        kind: Some(Kind::Unknown(proto::Unknown { reason: "r".into() })),
        ..Default::default()
    };
    // 1: command_id, 21: unknown { 1: reason }
    assert_eq!(
        event.encode_to_vec(),
        [0x0A, 0x01, b'i', 0xAA, 0x01, 0x03, 0x0A, 0x01, b'r']
    );
}
