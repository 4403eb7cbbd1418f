//! The login exchange against a real nats-server: good id_tokens get a certificate; every
//! bad one gets a refusal with its reason, recorded as an event.

mod support;

use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rct_bus::KeyPair;
use rct_bus::proto::{self, event::Kind, login_response::Result as R};
use rct_streams::replay::{self, Filter};
use serde_json::{Value, json};
use support::{Harness, IDP, RSA_KEY, RSA_PUB};

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    let now = unix_now();
    json!({
        "iss": IDP, "aud": "rct", "sub": "u-42", "email": "carol@example.com",
        "groups": ["sre_team"], "iat": now, "exp": now + 600,
    })
}

fn rs256(kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    let key = EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn with(change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut c = claims();
    change(c.as_object_mut().unwrap());
    c
}

#[tokio::test]
async fn a_good_id_token_gets_a_certificate_that_submits() {
    let h = Harness::start_with(support::idp).await;
    let session = KeyPair::generate();
    let response = h.login_with(&rs256("k1", &claims()), &session).await;
    let Some(R::Certificate(certificate)) = response.result else {
        panic!("refused: {response:?}");
    };
    assert!(certificate.expires_at.unwrap().seconds as u64 <= unix_now() + 600);
    let carol = support::Operator {
        session,
        certificate: certificate.token,
    };
    let sequence = h.submit(&carol, &support::drain("prod-1")).await;
    assert!(matches!(
        h.decision(sequence).await.kind,
        Some(Kind::Admitted(_))
    ));
}

#[tokio::test]
async fn bad_id_tokens_are_refused_and_recorded() {
    use base64::Engine;
    let h = Harness::start_with(support::idp).await;
    let now = unix_now();
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let hs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(RSA_PUB.as_bytes()),
    )
    .unwrap();
    let cases = [
        (
            "alg none",
            format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims())),
            "not a valid JWT",
        ),
        (
            "HS256 with the public key",
            hs256,
            "HS256, which is not allowed",
        ),
        (
            "wrong iss",
            rs256(
                "k1",
                &with(|c| {
                    c.insert("iss".into(), json!("https://evil.example"));
                }),
            ),
            "not one admission trusts",
        ),
        (
            "wrong aud",
            rs256(
                "k1",
                &with(|c| {
                    c.insert("aud".into(), json!("other"));
                }),
            ),
            "another audience",
        ),
        (
            "expired",
            rs256(
                "k1",
                &with(|c| {
                    c.insert("exp".into(), json!(now - 3600));
                }),
            ),
            "has expired",
        ),
        (
            "nbf in the future",
            rs256(
                "k1",
                &with(|c| {
                    c.insert("nbf".into(), json!(now + 3600));
                }),
            ),
            "is not valid until",
        ),
        (
            "expired 10 s ago (accepted within a 30 s leeway before)",
            rs256(
                "k1",
                &with(|c| {
                    c.insert("exp".into(), json!(now - 10));
                }),
            ),
            "has expired",
        ),
        (
            "issued in the future",
            rs256(
                "k1",
                &with(|c| {
                    c.insert("iat".into(), json!(now + 3600));
                }),
            ),
            "says it was issued",
        ),
        (
            "exp as a string",
            rs256(
                "k1",
                &with(|c| {
                    c.insert("exp".into(), json!((now + 600).to_string()));
                }),
            ),
            "no usable exp claim",
        ),
        ("unknown kid", rs256("k9", &claims()), "names key \"k9\""),
    ];
    for (name, token, needle) in &cases {
        let response = h.login_with(token, &KeyPair::generate()).await;
        match response.result {
            Some(R::Refused(refused)) => {
                assert_eq!(refused.code, "unauthenticated", "{name}");
                assert!(refused.message.contains(needle), "{name}: {refused:?}");
            }
            other => panic!("{name}: not refused: {other:?}"),
        }
    }

    let filter = Filter {
        tower: Some(rct_admission::AUTH_TOWER.parse().unwrap()),
        ..Filter::default()
    };
    let recorded: Vec<proto::Event> = replay::history(&h.js, &filter)
        .await
        .unwrap()
        .map(|r| r.unwrap().event)
        .collect()
        .await;
    // The harness's readiness probe (an empty login request) is on record first.
    assert_eq!(recorded.len(), cases.len() + 1, "{recorded:#?}");
    // Each refusal on record once: a count alone would pass one recorded twice and another
    // not at all.
    let messages: Vec<&str> = recorded[1..]
        .iter()
        .map(|e| match &e.kind {
            Some(Kind::Rejected(r)) => r.message.as_str(),
            other => panic!("not a rejection: {other:?}"),
        })
        .collect();
    for (name, _, needle) in &cases {
        let alike = cases.iter().filter(|(_, _, n)| n == needle).count();
        assert_eq!(
            messages.iter().filter(|m| m.contains(needle)).count(),
            alike,
            "{name}: {messages:#?}"
        );
    }
}

#[tokio::test]
async fn the_dev_issuer_is_off_unless_enabled() {
    let h = Harness::start_with(|config| config.dev_issuer = false).await;
    // Admission is up (the harness waited for a login answer); the dev issuer does not exist.
    let dev = h
        .client
        .request("rct.auth.dev-token", bytes::Bytes::new())
        .await;
    let error = dev.expect_err("nobody answers dev-token requests");
    assert_eq!(
        error.kind(),
        async_nats::RequestErrorKind::NoResponders,
        "{error}"
    );
    // The control: with the issuer on, the same request on the same subject is answered, so
    // the refusal above is the issuer's absence, not a wrong subject or a slow start.
    let on = Harness::start_with(|config| config.dev_issuer = true).await;
    let answer = on
        .client
        .request("rct.auth.dev-token", bytes::Bytes::new())
        .await;
    assert!(answer.is_ok(), "{answer:?}");
}
