//! Admission against a real nats-server: what it admits, everything it refuses and how, and
//! that each submission is decided exactly once.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use rct_admission::identity::{Certificates, Identity};
use rct_bus::proto::{self, RejectionCode as C, event::Kind, value::Kind as V};
use rct_bus::{CommandId, KeyPair, Purpose, Subject, Unverified, Verifier};
use rct_streams::timestamp::from_datetime;
use support::{Harness, Operator, drain, rejection, run, submission_sequence, value};
use time::OffsetDateTime;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[tokio::test]
async fn an_admitted_drain_becomes_a_verifiable_command() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let submission = drain("prod-1");
    let sequence = h.submit(&alice, &submission).await;

    let decision = h.decision(sequence).await;
    let Some(Kind::Admitted(admitted)) = &decision.kind else {
        panic!("not admitted: {decision:?}");
    };
    assert_eq!(decision.command_id, submission.command_id);
    assert_eq!(decision.operation, "traffic/drain-cluster");
    assert_eq!(decision.target, "prod-1");
    let request = admitted.request.as_ref().unwrap();
    assert_eq!(
        request.operator.as_ref().unwrap().email,
        "alice@example.com"
    );
    assert_eq!(request.justification, "SRE-101");

    let stream = h.js.get_stream("RCT_CMD").await.unwrap();
    let stored = stream
        .get_last_raw_message_by_subject("rct.cmd.traffic.prod-1.drain-cluster")
        .await
        .unwrap();
    let verified = Verifier::new([h.admission_key.clone()])
        .verify(
            Unverified::decode(&stored.payload).unwrap(),
            Purpose::Command,
        )
        .unwrap();
    let command: proto::Command = verified.decode().unwrap();
    assert_eq!(command.command_id, submission.command_id);
    assert_eq!(command.target, "prod-1");
    assert_eq!(
        command.params["keep_percent"],
        value(V::Integer(0)),
        "default applied"
    );
    assert_eq!(command.operator.unwrap().groups, ["sre_team"]);
    assert!(command.deadline.unwrap().seconds > command.admitted_at.unwrap().seconds);
    assert_eq!(command.timeout.unwrap().seconds, 15 * 60);
    // The operator's own signed submission travels inside, still verifiable.
    Unverified::from_proto(command.submission.unwrap())
        .verify_with(alice.session.public(), Purpose::Submission)
        .unwrap();
    assert_eq!(h.metrics.decisions("admitted", ""), 1);
}

/// Each bad submission ends in exactly one `Rejected` event with its code, and nothing
/// reaches RCT_CMD.
#[tokio::test]
async fn every_bad_submission_is_refused_with_its_code_and_a_sentence() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let bob = h.operator("bob", &["app_oncall"]).await;
    let scale = |extra: Vec<(&'static str, proto::Value)>| {
        let mut s = run(
            "workloads/scale",
            "_",
            [
                ("namespace", value(V::String("shop".into()))),
                ("deployment", value(V::String("cart".into()))),
                ("replicas", value(V::Integer(3))),
            ],
            "SRE-7",
        );
        if let Some(proto::submission::Request::Run(r)) = s.request.as_mut() {
            for (k, v) in extra {
                r.params.insert(k.into(), v);
            }
        }
        s
    };
    let with_params = |params: Vec<(&'static str, proto::Value)>| {
        let mut s = drain("prod-1");
        if let Some(proto::submission::Request::Run(r)) = s.request.as_mut() {
            for (k, v) in params {
                r.params.insert(k.into(), v);
            }
        }
        s
    };

    let mut cases: Vec<(&str, u64, C, String)> = Vec::new();
    macro_rules! case {
        ($name:expr, $seq:expr, $code:expr, $needle:expr) => {
            cases.push(($name, $seq, $code, $needle.to_string()))
        };
    }

    // Identity.
    let stranger = Certificates::new(&KeyPair::generate(), &[], Duration::from_secs(60));
    let identity = Identity {
        subject: "alice".into(),
        email: "alice@example.com".into(),
        groups: vec!["sre_team".into()],
    };
    let foreign = Operator {
        session: KeyPair::generate(),
        certificate: String::new(),
    };
    let foreign = Operator {
        certificate: stranger
            .issue(&identity, foreign.session.public(), u64::MAX)
            .0,
        ..foreign
    };
    case!(
        "certificate from another signer",
        h.submit(&foreign, &drain("prod-1")).await,
        C::Unauthenticated,
        "not issued by this admission"
    );

    let ours = Certificates::new(&h.admission_keypair(), &[], Duration::from_secs(60));
    let session = KeyPair::generate();
    let expired = Operator {
        certificate: ours.issue(&identity, session.public(), 1_000).0,
        session,
    };
    case!(
        "expired certificate",
        h.submit(&expired, &drain("prod-1")).await,
        C::Unauthenticated,
        "expired; log in again"
    );

    let s = drain("prod-1");
    let mut envelope = KeyPair::generate().sign(Purpose::Submission, s.encode_to_vec());
    envelope.certificate = alice.certificate.clone();
    case!(
        "signed by a key other than the certificate's",
        h.publish_envelope(&s, envelope).await,
        C::BadSignature,
        "but the certificate binds key"
    );

    let s = drain("prod-1");
    let mut envelope = alice.sign(&s);
    let last = envelope.body.len() - 1;
    envelope.body[last] ^= 0x01;
    case!(
        "tampered body byte",
        h.publish_envelope(&s, envelope).await,
        C::BadSignature,
        "changed after signing"
    );

    let s = drain("prod-1");
    let mut envelope = alice.session.sign(Purpose::Command, s.encode_to_vec());
    envelope.certificate = alice.certificate.clone();
    case!(
        "signed as a command",
        h.publish_envelope(&s, envelope).await,
        C::BadSignature,
        "signed for command"
    );

    let s = drain("prod-1");
    let envelope = KeyPair::generate().sign(Purpose::Submission, s.encode_to_vec());
    case!(
        "no certificate, unknown key",
        h.publish_envelope(&s, envelope).await,
        C::Unauthenticated,
        "run rct login"
    );

    // Freshness.
    let mut s = drain("prod-1");
    s.requested_at = Some(from_datetime(now() - time::Duration::minutes(10)));
    case!(
        "requested_at too old",
        h.submit(&alice, &s).await,
        C::Stale,
        "submit it again"
    );
    let mut s = drain("prod-1");
    s.requested_at = Some(from_datetime(now() + time::Duration::minutes(10)));
    case!(
        "requested_at in the future",
        h.submit(&alice, &s).await,
        C::Stale,
        "check this machine's clock"
    );
    let mut s = drain("prod-1");
    s.expires_at = Some(from_datetime(now() - time::Duration::seconds(1)));
    case!(
        "expired submission",
        h.submit(&alice, &s).await,
        C::Expired,
        "expired at"
    );

    // Catalog and policy.
    let mut s = drain("prod-1");
    s.operation = "traffic/drian-cluster".into();
    case!(
        "unknown operation",
        h.submit(&alice, &s).await,
        C::UnknownOperation,
        "traffic has: check-health, drain-cluster, set-weights, undrain-cluster"
    );
    case!(
        "forbidden group",
        h.submit(&bob, &drain("prod-1")).await,
        C::Forbidden,
        "bob@example.com is not in any of the groups allowed to run traffic/drain-cluster: sre_team, traffic_team"
    );
    case!(
        "integer out of range",
        h.submit(
            &alice,
            &with_params(vec![("keep_percent", value(V::Integer(150)))])
        )
        .await,
        C::InvalidParams,
        "keep_percent must be an integer from 0 to 100, got 150"
    );
    case!(
        "integer of the wrong type",
        h.submit(
            &alice,
            &with_params(vec![("keep_percent", value(V::String("10".into())))])
        )
        .await,
        C::InvalidParams,
        "keep_percent must be an integer from 0 to 100"
    );
    let mut s = drain("prod-9");
    if let Some(proto::submission::Request::Run(r)) = s.request.as_mut() {
        r.params
            .insert("cluster".into(), value(V::Target("prod-9".into())));
    }
    case!(
        "target not of the tower",
        h.submit(&alice, &s).await,
        C::InvalidParams,
        "cluster must be one of prod-1, prod-2, prod-3, prod-4"
    );
    case!(
        "string pattern",
        h.submit(
            &alice,
            &scale(vec![("namespace", value(V::String("Shop!".into())))])
        )
        .await,
        C::InvalidParams,
        "namespace must match"
    );
    case!(
        "string too long",
        h.submit(
            &alice,
            &scale(vec![("deployment", value(V::String("a".repeat(64))))])
        )
        .await,
        C::InvalidParams,
        "deployment must be at most 63 characters long"
    );
    case!(
        "unknown parameter",
        h.submit(&alice, &scale(vec![("force", value(V::Boolean(true)))]))
            .await,
        C::InvalidParams,
        "unknown parameter force"
    );
    let restart = run(
        "workloads/restart",
        "_",
        [
            ("namespace", value(V::String("shop".into()))),
            ("deployment", value(V::String("cart".into()))),
            ("strategy", value(V::Enumeration("yolo".into()))),
        ],
        "because",
    );
    case!(
        "enum value",
        h.submit(&alice, &restart).await,
        C::InvalidParams,
        "strategy must be one of rolling, all-at-once"
    );
    let missing = run(
        "workloads/scale",
        "_",
        [("namespace", value(V::String("shop".into())))],
        "SRE-7",
    );
    case!(
        "missing parameter",
        h.submit(&alice, &missing).await,
        C::InvalidParams,
        "missing parameter deployment"
    );
    let undrain = run(
        "traffic/undrain-cluster",
        "prod-1",
        [
            ("cluster", value(V::Target("prod-1".into()))),
            ("ramp", value(V::Integer(5))),
        ],
        "SRE-1",
    );
    case!(
        "duration of the wrong type",
        h.submit(&alice, &undrain).await,
        C::InvalidParams,
        "ramp must be a duration"
    );
    let mut s = drain("prod-1");
    if let Some(proto::submission::Request::Run(r)) = s.request.as_mut() {
        r.target = "prod-2".into();
    }
    case!(
        "target disagrees with the parameter",
        h.submit(&alice, &s).await,
        C::UnknownTarget,
        "its parameters say cluster=prod-1"
    );
    let mut s = drain("prod-1");
    s.justification = String::new();
    case!(
        "missing justification",
        h.submit(&alice, &s).await,
        C::JustificationRequired,
        "needs a justification matching [A-Z]+-[0-9]+"
    );
    let mut s = drain("prod-1");
    s.justification = "see SRE-101".into();
    case!(
        "malformed justification",
        h.submit(&alice, &s).await,
        C::JustificationRequired,
        "does not match [A-Z]+-[0-9]+"
    );

    // Bytes and subjects.
    let id = CommandId::generate().to_string();
    case!(
        "garbage bytes",
        h.publish_raw(
            "rct.submit.traffic.drain-cluster",
            &id,
            b"\xff\x00garbage".to_vec()
        )
        .await,
        C::Malformed,
        "not a signed envelope"
    );
    let id = CommandId::generate().to_string();
    case!(
        "oversized payload",
        h.publish_raw(
            "rct.submit.traffic.drain-cluster",
            &id,
            vec![0u8; 70 * 1024]
        )
        .await,
        C::TooLarge,
        "the limit is 65536 bytes"
    );
    let id = CommandId::generate().to_string();
    case!(
        "subject of the wrong shape",
        h.publish_raw(
            "rct.submit.traffic.drain.cluster",
            &id,
            alice.sign(&drain("prod-1")).encode_to_vec()
        )
        .await,
        C::Malformed,
        "not such a subject"
    );
    let s = drain("prod-1");
    case!(
        "published for another operation",
        h.publish_raw(
            "rct.submit.workloads.restart",
            &s.command_id,
            alice.sign(&s).encode_to_vec()
        )
        .await,
        C::Malformed,
        "names traffic/drain-cluster but was published for workloads/restart"
    );
    let mut s = drain("prod-1");
    s.command_id = "not-a-ulid".into();
    case!(
        "command id not a ULID",
        h.submit(&alice, &s).await,
        C::Malformed,
        "is not a ULID"
    );

    // Replay: the same signed bytes again, under a new message id.
    let original = drain("prod-1");
    let envelope = alice.sign(&original);
    let first = h.publish_envelope(&original, envelope.clone()).await;
    assert!(matches!(
        h.decision(first).await.kind,
        Some(Kind::Admitted(_))
    ));
    let replay = h
        .publish_raw(
            "rct.submit.traffic.drain-cluster",
            "replay-1",
            envelope.encode_to_vec(),
        )
        .await;
    case!(
        "replayed command id",
        replay,
        C::Duplicate,
        "already used by another submission"
    );

    let mut failures = Vec::new();
    for (name, sequence, code, needle) in &cases {
        let decision = h.decision(*sequence).await;
        match rejection(&decision) {
            Some((got, message)) if got == *code && message.contains(needle.as_str()) => {}
            other => failures.push(format!(
                "{name}: expected {code:?} with {needle:?}, got {other:?}"
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // A certificate without the matching signature names nobody: certificates are public.
    let (_, forged, ..) = cases
        .iter()
        .find(|c| c.0 == "signed by a key other than the certificate's")
        .unwrap();
    let Some(Kind::Rejected(forged)) = h.decision(*forged).await.kind else {
        unreachable!("checked above");
    };
    assert_eq!(forged.request.unwrap().operator, None);

    // Exactly one decision per submission; the replay was recorded under a fresh id.
    // Refused logins (tower _auth) are decisions too, but about no submission.
    let decisions: Vec<_> = h
        .decisions()
        .await
        .into_iter()
        .filter(|d| !d.operation.starts_with("_auth/"))
        .collect();
    let mut per_submission: HashMap<u64, usize> = HashMap::new();
    for d in &decisions {
        *per_submission
            .entry(submission_sequence(d).unwrap_or_else(|| panic!("{d:?}")))
            .or_default() += 1;
    }
    for (name, sequence, ..) in &cases {
        assert_eq!(per_submission.get(sequence), Some(&1), "{name}");
    }
    let replayed = decisions
        .iter()
        .find(|d| submission_sequence(d) == Some(replay))
        .unwrap();
    assert_ne!(replayed.command_id, original.command_id);
    assert_eq!(
        h.commands().await,
        1,
        "only the original drain reached RCT_CMD"
    );
}

#[tokio::test]
async fn service_identities_need_no_login() {
    let h = Harness::start().await;
    let s = drain("prod-2");
    let envelope = h.service.sign(Purpose::Submission, s.encode_to_vec());
    let sequence = h.publish_envelope(&s, envelope).await;
    let decision = h.decision(sequence).await;
    let Some(Kind::Admitted(admitted)) = decision.kind else {
        panic!("not admitted: {decision:?}");
    };
    let operator = admitted.request.unwrap().operator.unwrap();
    assert_eq!(operator.subject, "service:deployer");
}

/// A replica that recorded the decision and died before publishing the command: the
/// redelivered submission is completed with the command, and decided only once.
#[tokio::test]
async fn a_redelivered_submission_gets_its_command_and_no_second_decision() {
    let mut h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    h.stop_admission().await;

    let submission = drain("prod-3");
    let sequence = h.submit(&alice, &submission).await;
    // What the dead replica managed to write: the decision only.
    h.decide_and_die(sequence).await;

    h.start_admission().await;
    let command = h.command_on("rct.cmd.traffic.prod-3.drain-cluster").await;
    let verified = Verifier::new([h.admission_key.clone()])
        .verify(
            Unverified::decode(&command.payload).unwrap(),
            Purpose::Command,
        )
        .unwrap();
    assert_eq!(
        verified.decode::<proto::Command>().unwrap().command_id,
        submission.command_id
    );

    // Once admission has acknowledged the redelivery: one decision about the submission,
    // whatever id it was recorded under (a second one, such as a `duplicate` refusal, goes
    // under an id of admission's choosing).
    h.submissions_settled().await;
    let decisions: Vec<_> = h
        .decisions()
        .await
        .into_iter()
        .filter(|d| submission_sequence(d) == Some(sequence))
        .collect();
    assert_eq!(decisions.len(), 1, "{decisions:#?}");
    assert_eq!(decisions[0].source, "admission/dead");
    assert_eq!(decisions[0].command_id, submission.command_id);
}

/// A decision in a submission's slot that admission did not sign (written by anyone who can
/// write the stream, unsigned or with another key) is not taken for admission's own: the
/// redelivered submission gets no command from it, and its refusal is recorded. Before
/// events were signed, admission finished it as admitted and signed a command from it.
#[tokio::test]
async fn a_decision_admission_did_not_sign_is_never_finished_as_admitted() {
    let mut h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    h.stop_admission().await;
    let unsigned = h.submit(&alice, &drain("prod-3")).await;
    h.decide_signed_as(unsigned, None).await;
    let impostor = h.submit(&alice, &drain("prod-4")).await;
    h.decide_signed_as(impostor, Some(KeyPair::generate()))
        .await;

    h.start_admission().await;
    h.submissions_settled().await;
    assert_eq!(
        h.commands().await,
        0,
        "a command was published from a forged decision"
    );
    let decisions = h.decisions().await;
    for sequence in [unsigned, impostor] {
        let refused = decisions
            .iter()
            .filter(|d| submission_sequence(d) == Some(sequence))
            .filter_map(rejection)
            .collect::<Vec<_>>();
        assert_eq!(refused.len(), 1, "{sequence}: {decisions:#?}");
        assert_eq!(refused[0].0, proto::RejectionCode::Duplicate, "{refused:?}");
        assert!(refused[0].1.contains("did not sign"), "{refused:?}");
    }
}

#[tokio::test]
async fn cancel_requests_are_recorded_against_admitted_commands() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let target = drain("prod-4");
    let sequence = h.submit(&alice, &target).await;
    assert!(matches!(
        h.decision(sequence).await.kind,
        Some(Kind::Admitted(_))
    ));

    let cancel = |command_id: &str| {
        let mut c = drain("prod-4");
        c.justification = "SRE-102".into();
        c.request = Some(proto::submission::Request::Cancel(proto::Cancel {
            command_id: command_id.into(),
            resume: false,
        }));
        c
    };
    let request = cancel(&target.command_id);
    let sequence = h.submit(&alice, &request).await;
    let decision = h.decision(sequence).await;
    let Some(Kind::Admitted(admitted)) = &decision.kind else {
        panic!("cancel not admitted: {decision:?}");
    };
    assert_eq!(
        admitted.request.as_ref().unwrap().cancels,
        target.command_id
    );

    let history = rct_streams::replay::command_history(&h.js, target.command_id.parse().unwrap())
        .await
        .unwrap();
    let cancels: Vec<_> = history
        .iter()
        .filter_map(|r| match &r.event.kind {
            Some(Kind::CancelRequested(c)) => Some(c.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].by.as_ref().unwrap().email, "alice@example.com");
    assert_eq!(cancels[0].justification, "SRE-102");

    let unknown = h
        .submit(&alice, &cancel(&CommandId::generate().to_string()))
        .await;
    let (code, message) = rejection(&h.decision(unknown).await).unwrap();
    assert_eq!(code, C::UnknownCommand);
    assert!(message.contains("there is no command"), "{message}");
}

#[tokio::test]
async fn the_catalog_is_served_for_discovery() {
    let h = Harness::start().await;
    let bucket = h.js.get_key_value("rct_catalog").await.unwrap();
    let served: rct_bus::catalog::Served =
        serde_json::from_slice(&bucket.get("catalog").await.unwrap().unwrap()).unwrap();
    assert!(
        served
            .catalog
            .operations
            .contains_key("traffic/drain-cluster")
    );
    assert_eq!(served.version, served.catalog.version());
    let _ = Subject::Login;
}

/// A `secret: true` value arrives sealed to the tower; admission checks that it is, records it
/// masked, and passes the ciphertext on: no stream holds it in clear. A client that sends it
/// in clear is refused, and says why.
#[tokio::test]
async fn secret_values_are_sealed_end_to_end_and_masked_in_every_event() {
    let h = Harness::start().await;
    let alice = h.operator("alice", &["sre_team"]).await;
    let secret = "hunter2-do-not-log";
    let mut submission = run(
        "workloads/set-secret",
        "_",
        [
            ("namespace", value(V::String("shop".into()))),
            ("name", value(V::String("db".into()))),
            ("key", value(V::String("password".into()))),
        ],
        "SEC-9",
    );
    let example_key = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/examples/workloads.agekey"),
    )
    .unwrap();
    let keys = rct_bus::sealed::Keys::parse(&example_key).unwrap();
    let Some(proto::submission::Request::Run(given)) = &submission.request else {
        unreachable!()
    };
    let binding = rct_bus::sealed::Binding {
        command_id: submission.command_id.clone(),
        operation: "workloads/set-secret".into(),
        target: "_".into(),
        param: "value".into(),
        operator: "alice".into(),
        params: rct_bus::sealed::params_digest(&given.params, |n| n == "value"),
    };
    let sealed = rct_bus::sealed::seal(
        &keys.recipients(),
        &binding,
        &value(V::String(secret.into())),
    )
    .unwrap();
    let Some(proto::submission::Request::Run(request)) = &mut submission.request else {
        unreachable!()
    };
    request.params.insert("value".into(), sealed.clone());
    let admitted = h.submit(&alice, &submission).await;
    let Some(Kind::Admitted(decision)) = h.decision(admitted).await.kind else {
        panic!("not admitted");
    };
    let params = decision.request.unwrap().params;
    assert_eq!(params["value"], value(V::Masked(proto::Masked {})));
    assert_eq!(params["key"], value(V::String("password".into())));
    // The agent gets the ciphertext as it was sealed, and can open it.
    let stream = h.js.get_stream("RCT_CMD").await.unwrap();
    let stored = stream.get_raw_message(1).await.unwrap();
    let envelope =
        <rct_bus::proto::SignedEnvelope as prost::Message>::decode(stored.payload).unwrap();
    let command = <proto::Command as prost::Message>::decode(envelope.body.as_slice()).unwrap();
    assert_eq!(command.params["value"], sealed);
    let Some(V::Sealed(inner)) = &command.params["value"].kind else {
        unreachable!()
    };
    assert_eq!(
        keys.open(inner, &binding).unwrap(),
        value(V::String(secret.into()))
    );

    // Refused with a bad value elsewhere: still masked.
    let mut refused = submission.clone();
    refused.command_id = CommandId::generate().to_string();
    refused.justification = String::new();
    let refused = h.submit(&alice, &refused).await;
    assert!(rejection(&h.decision(refused).await).is_some());

    for name in ["RCT_SUBMIT", "RCT_CMD", "RCT_EVT"] {
        let mut stream = h.js.get_stream(name).await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        for sequence in 1..=last {
            let message = stream.get_raw_message(sequence).await.unwrap();
            let raw = String::from_utf8_lossy(&message.payload);
            assert!(!raw.contains(secret), "{name} {sequence} holds the secret");
        }
    }

    // An out-of-date client that sends it in clear is refused, with the reason.
    let mut clear = submission.clone();
    clear.command_id = CommandId::generate().to_string();
    let Some(proto::submission::Request::Run(request)) = &mut clear.request else {
        unreachable!()
    };
    request
        .params
        .insert("value".into(), value(V::String("plain-text-value".into())));
    let decision = h.decision(h.submit(&alice, &clear).await).await;
    let (code, message) = rejection(&decision).expect("refused");
    assert_eq!(code, proto::RejectionCode::InvalidParams);
    assert!(
        message.contains("value is secret and must arrive sealed"),
        "{message}"
    );
    assert!(!message.contains("plain-text-value"), "{message}");
}
