//! Hostile input for every decoder and validator of the contract: arbitrary bytes and
//! mutations of valid messages never panic, whatever decodes re-encodes to a fixed point,
//! a signature holds if and only if the signed bytes are unmodified, and a parameter value
//! the validator accepts always honours the catalog's limits.
//!
//! Cases per property: proptest's default (256), or `PROPTEST_CASES`; docs/RELIABILITY.md
//! records the long run.

use std::collections::BTreeMap;

use proptest::prelude::*;
use prost::Message;
use rct_bus::catalog::{Flavour, Param, TowerSpec, Type};
use rct_bus::proto::{self, value::Kind as V};
use rct_bus::{KeyPair, Purpose, Subject, Unverified};

/// Decoding never panics; what decodes re-encodes to bytes that decode to the same bytes
/// again (prost's own fuzz property; NaN-safe, unlike comparing messages).
fn decodes_to_a_fixed_point<M: Message + Default>(bytes: &[u8]) {
    if let Ok(message) = M::decode(bytes) {
        let once = message.encode_to_vec();
        let again = M::decode(once.as_slice())
            .expect("re-encoded bytes decode")
            .encode_to_vec();
        assert_eq!(once, again);
    }
}

fn every_decoder(bytes: &[u8]) {
    decodes_to_a_fixed_point::<proto::SignedEnvelope>(bytes);
    decodes_to_a_fixed_point::<proto::Submission>(bytes);
    decodes_to_a_fixed_point::<proto::Command>(bytes);
    decodes_to_a_fixed_point::<proto::Event>(bytes);
    decodes_to_a_fixed_point::<proto::Value>(bytes);
    decodes_to_a_fixed_point::<proto::LoginRequest>(bytes);
    decodes_to_a_fixed_point::<proto::LoginResponse>(bytes);
    decodes_to_a_fixed_point::<proto::Certificate>(bytes);
    decodes_to_a_fixed_point::<proto::DevTokenRequest>(bytes);
    let _ = Unverified::decode(bytes);
}

/// Valid encodings to mutate, so the mutations reach past the first tag.
fn samples() -> Vec<Vec<u8>> {
    let key = KeyPair::generate();
    let submission = proto::Submission {
        command_id: "01J00000000000000000000000".into(),
        operation: "traffic/drain-cluster".into(),
        justification: "SRE-1".into(),
        request: Some(proto::submission::Request::Run(proto::Run {
            target: "prod-1".into(),
            params: [(
                "cluster".to_owned(),
                proto::Value {
                    kind: Some(V::Target("prod-1".into())),
                },
            )]
            .into(),
            dry_run: false,
            break_glass: String::new(),
            plan: false,
            undo_of: String::new(),
            rollout: None,
        })),
        ..Default::default()
    };
    let envelope = key.sign(Purpose::Submission, submission.encode_to_vec());
    vec![
        submission.encode_to_vec(),
        envelope.encode_to_vec(),
        proto::Event {
            command_id: "01J00000000000000000000000".into(),
            target: "prod-1".into(),
            kind: Some(proto::event::Kind::Progress(proto::Progress {
                percent: 50,
                step: "half".into(),
                message: "way".into(),
            })),
            ..Default::default()
        }
        .encode_to_vec(),
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match *mutation {
        Mutation::Flip(i, b) => {
            let i = i % bytes.len();
            bytes[i] ^= b;
        }
        Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
        Mutation::Delete(i) => {
            bytes.remove(i % bytes.len());
        }
        Mutation::Truncate(i) => bytes.truncate(i % bytes.len()),
    }
}

fn purpose() -> impl Strategy<Value = Purpose> {
    prop_oneof![
        Just(Purpose::Submission),
        Just(Purpose::Command),
        Just(Purpose::Unspecified),
    ]
}

fn param_type() -> impl Strategy<Value = Type> {
    prop_oneof![
        Just(Type::String),
        Just(Type::Integer),
        Just(Type::Number),
        Just(Type::Boolean),
        Just(Type::Enum),
        Just(Type::Duration),
        Just(Type::Target),
    ]
}

/// Text a person or an attacker might type: shell metacharacters, option-like values,
/// numbers in odd forms, unicode, control characters.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,40}",
        "(-|--)?[a-z0-9=]{0,12}",
        "[-+]?[0-9]{0,25}(\\.[0-9]{0,5})?(e[-+]?[0-9]{1,4})?",
        "[0-9]{1,22}(ns|us|ms|s|m|h|d|w|y)",
        "(\\$\\(|`|;|&&|\\|\\||>|<|\\*|\\n|'|\")[a-z /]{0,10}",
        Just("NaN".to_owned()),
        Just("inf".to_owned()),
        Just("-0".to_owned()),
    ]
}

fn tower() -> TowerSpec {
    TowerSpec {
        description: String::new(),
        flavour: Flavour::Cluster,
        targets: vec!["prod-1".into(), "prod-2".into()],
        recipients: Vec::new(),
        target_recipients: Default::default(),
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        every_decoder(&bytes);
    }

    #[test]
    fn mutated_valid_messages_never_panic_a_decoder(
        which in 0..3usize,
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let mut bytes = samples().swap_remove(which);
        for m in &mutations {
            apply(&mut bytes, m);
        }
        every_decoder(&bytes);
    }

    /// verify(signature, bytes) holds if and only if the bytes, the signature, the key and
    /// the purpose are the ones signed.
    #[test]
    fn a_signature_holds_only_over_the_unmodified_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..256),
        signed_for in purpose(),
        checked_for in purpose(),
        in_body in any::<bool>(),
        at in any::<usize>(),
        flip in 1..=255u8,
    ) {
        let key = KeyPair::generate();
        let envelope = key.sign(signed_for, body.clone());
        let intact = Unverified::from_proto(envelope.clone()).verify_with(key.public(), checked_for);
        prop_assert_eq!(
            intact.is_ok(),
            signed_for == checked_for && signed_for != Purpose::Unspecified
        );
        if let Ok(verified) = intact {
            prop_assert_eq!(verified.body(), body.as_slice());
        }

        if signed_for == Purpose::Unspecified {
            return Ok(());
        }
        // Another key never verifies it, even untouched.
        prop_assert!(Unverified::from_proto(envelope.clone()).verify_with(KeyPair::generate().public(), signed_for).is_err());
        let mut tampered = envelope;
        let bytes = if in_body && !tampered.body.is_empty() {
            &mut tampered.body
        } else {
            &mut tampered.signature
        };
        let i = at % bytes.len();
        bytes[i] ^= flip;
        prop_assert!(Unverified::from_proto(tampered).verify_with(key.public(), signed_for).is_err());
    }

    #[test]
    fn subjects_parse_without_panic_and_round_trip(text in prop_oneof![
        any::<String>(),
        "rct\\.(submit|cmd|evt)(\\.[a-z0-9_*>-]{0,12}){0,5}",
    ]) {
        if let Ok(subject) = text.parse::<Subject>() {
            let shown = subject.to_string();
            prop_assert_eq!(shown.parse::<Subject>().map(|s| s.to_string()).ok(), Some(shown));
        }
    }

    /// Whatever the validator accepts honours the parameter's limits.
    #[test]
    fn accepted_parameter_values_honour_the_catalog(
        kind in param_type(),
        text in hostile_text(),
        max_len in proptest::option::of(0usize..64),
        min in proptest::option::of(-1000.0f64..1000.0),
        span in 0.0f64..2000.0,
        pattern in proptest::option::of(prop_oneof![
            Just("[a-z0-9-]+".to_owned()),
            Just("[A-Z]+-[0-9]+".to_owned()),
        ]),
    ) {
        let param = Param {
            kind,
            description: String::new(),
            pattern: pattern.clone().map(Into::into),
            max_len,
            min,
            max: min.map(|m| m + span),
            values: vec!["fast".into(), "slow".into()],
            default: None,
            secret: false,
        };
        let Ok(value) = param.parse("p", &text) else { return Ok(()) };
        if param.check("p", &value, &tower()).is_err() {
            return Ok(());
        }
        match value.kind.unwrap() {
            V::String(s) => {
                if let Some(max) = max_len {
                    prop_assert!(s.chars().count() <= max);
                }
                if let Some(p) = &pattern {
                    let re = regex::Regex::new(&format!("^(?:{p})$")).unwrap();
                    prop_assert!(re.is_match(&s));
                }
            }
            V::Integer(i) => {
                if let Some(min) = min {
                    prop_assert!(i as f64 >= min && i as f64 <= min + span);
                }
            }
            V::Number(n) => {
                prop_assert!(n.is_finite());
                if let Some(min) = min {
                    prop_assert!(n >= min && n <= min + span);
                }
            }
            V::Enumeration(e) => prop_assert!(e == "fast" || e == "slow"),
            V::Target(t) => prop_assert!(t == "prod-1" || t == "prod-2"),
            V::Boolean(_) | V::Duration(_) => {}
            V::Masked(_) | V::Sealed(_) => {
                prop_assert!(false, "a parsed value is never masked or sealed")
            }
        }
    }

    /// Values arriving in a submission (not typed, so any kind for any parameter) never
    /// panic the validator, and a kind that differs from the parameter's type is refused.
    #[test]
    fn values_of_any_kind_are_checked_without_panic(
        kind in param_type(),
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let Ok(value) = proto::Value::decode(bytes.as_slice()) else { return Ok(()) };
        let param = Param {
            kind,
            description: String::new(),
            pattern: None,
            max_len: Some(16),
            min: Some(0.0),
            max: Some(100.0),
            values: vec!["fast".into()],
            default: None,
            secret: false,
        };
        let accepted = param.check("p", &value, &tower()).is_ok();
        let same_kind = matches!(
            (kind, &value.kind),
            (Type::String, Some(V::String(_)))
                | (Type::Integer, Some(V::Integer(_)))
                | (Type::Number, Some(V::Number(_)))
                | (Type::Boolean, Some(V::Boolean(_)))
                | (Type::Enum, Some(V::Enumeration(_)))
                | (Type::Duration, Some(V::Duration(_)))
                | (Type::Target, Some(V::Target(_)))
        );
        prop_assert!(!accepted || same_kind, "{kind:?} accepted {value:?}");
    }
}

#[test]
fn the_samples_are_valid() {
    let all: BTreeMap<usize, Vec<u8>> = samples().into_iter().enumerate().collect();
    assert!(proto::Submission::decode(all[&0].as_slice()).is_ok());
    assert!(Unverified::decode(&all[&1]).is_ok());
    assert!(proto::Event::decode(all[&2].as_slice()).is_ok());
}
