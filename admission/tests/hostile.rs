//! Hostile submissions against the decision itself (pure, no server): arbitrary bytes on
//! arbitrary subjects never panic and are refused; a valid signed submission is admitted,
//! and any change to its bytes is not (or is refused outright).
//!
//! Cases per property: proptest's default (256), or `PROPTEST_CASES`.

use std::time::Duration;

mod support;

use proptest::prelude::*;
use prost::Message;
use rct_admission::decide::{Policy, Submitted, Verdict};
use rct_admission::identity::{Certificates, ServiceConfig, Services};
use rct_bus::{KeyPair, Purpose};
use time::OffsetDateTime;

fn policy(service: &KeyPair) -> Policy {
    let catalog = rct_admission::catalog::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ops/catalog.example.yaml"
    )))
    .unwrap();
    let key = KeyPair::generate();
    Policy {
        catalog_version: catalog.version(),
        catalog,
        certificates: Certificates::new(&key, &[], Duration::from_secs(3600)),
        services: Services::new(&[ServiceConfig {
            name: "deployer".into(),
            public_key: service.public().to_pem(),
            groups: vec!["sre_team".into()],
        }])
        .unwrap(),
        key,
        freshness: Duration::from_secs(120),
        clock_skew: Duration::from_secs(30),
        max_payload: 64 * 1024,
        source: "admission/hostile".into(),
    }
}

/// A drain of prod-1 signed by the registered service, as the wire carries it.
fn valid_submission(service: &KeyPair) -> Vec<u8> {
    service
        .sign(
            Purpose::Submission,
            support::drain("prod-1").encode_to_vec(),
        )
        .encode_to_vec()
}

const SUBJECT: &str = "rct.submit.traffic.drain-cluster";

fn decide(policy: &Policy, subject: &str, payload: &[u8], now: OffsetDateTime) -> Verdict {
    policy.decide(Submitted {
        subject,
        payload,
        sequence: 7,
        now,
    })
}

#[test]
fn the_valid_submission_is_admitted() {
    let service = KeyPair::generate();
    let now = OffsetDateTime::now_utc();
    let verdict = decide(&policy(&service), SUBJECT, &valid_submission(&service), now);
    assert!(matches!(verdict, Verdict::Admit(_)), "{verdict:?}");
}

proptest! {
    #[test]
    fn arbitrary_bytes_on_any_subject_are_refused_without_panic(
        subject in prop_oneof![
            Just(SUBJECT.to_owned()),
            any::<String>(),
            "rct\\.submit(\\.[a-z0-9_*>-]{0,12}){0,4}",
        ],
        payload in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let service = KeyPair::generate();
        let now = OffsetDateTime::now_utc();
        let verdict = decide(&policy(&service), &subject, &payload, now);
        prop_assert!(matches!(verdict, Verdict::Reject(_)), "{verdict:?}");
    }

    /// One to four byte changes to a valid submission: never admitted unless the bytes are
    /// the original ones again.
    #[test]
    fn a_changed_submission_is_never_admitted(
        changes in proptest::collection::vec((any::<usize>(), 1..=255u8), 1..5),
    ) {
        let service = KeyPair::generate();
        let now = OffsetDateTime::now_utc();
        let policy = policy(&service);
        let original = valid_submission(&service);
        let mut bytes = original.clone();
        for (at, flip) in &changes {
            let i = at % bytes.len();
            bytes[i] ^= flip;
        }
        let verdict = decide(&policy, SUBJECT, &bytes, now);
        if bytes != original {
            prop_assert!(!matches!(verdict, Verdict::Admit(_)), "admitted after {changes:?}");
        }
    }

    /// The same valid submission on another subject (another operation's, another tower's)
    /// is refused: the subject and the signed body must agree.
    #[test]
    fn a_valid_submission_on_another_subject_is_refused(
        subject in prop_oneof![
            // The catalog's other operations: only the subject check can refuse these.
            Just("rct.submit.traffic.undrain-cluster".to_owned()),
            Just("rct.submit.traffic.set-weights".to_owned()),
            Just("rct.submit.workloads.restart".to_owned()),
            Just("rct.submit.workloads.scale".to_owned()),
            "rct\\.submit\\.(traffic|workloads|db)\\.[a-z-]{1,16}",
        ],
    ) {
        prop_assume!(subject != SUBJECT);
        let service = KeyPair::generate();
        let now = OffsetDateTime::now_utc();
        let verdict = decide(&policy(&service), &subject, &valid_submission(&service), now);
        let Verdict::Reject(reject) = &verdict else {
            return Err(TestCaseError::fail(format!("{verdict:?}")));
        };
        let Some(rct_bus::proto::event::Kind::Rejected(rejected)) = &reject.decision.kind else {
            return Err(TestCaseError::fail(format!("{reject:?}")));
        };
        prop_assert_eq!(rejected.code, rct_bus::proto::RejectionCode::Malformed as i32);
        prop_assert!(rejected.message.contains("but was published for"), "{}", rejected.message);
    }
}
