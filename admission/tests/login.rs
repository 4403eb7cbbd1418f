//! The login exchange against a real nats-server: good id_tokens get a certificate; every
//! bad one gets a refusal with its reason, recorded as an event.

mod support;

use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prost::Message as _;
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
        // Each from a connection of its own: one source has only so many refusals recorded
        // one by one (see `a_flood_of_bad_logins_is_recorded_within_a_budget_and_counted`).
        let response = h.login_from_new_connection(token).await;
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

/// Anyone who can reach `rct.auth.login` can send refusals, and each on record is permanent: a
/// flood of 300 bad logins from one connection puts its budget on record one by one, and the
/// rest as one count when admission stops (or the minute is over). Before, 300 bad logins
/// wrote 300 permanent events.
#[tokio::test]
async fn a_flood_of_bad_logins_is_recorded_within_a_budget_and_counted() {
    use rct_admission::refusals::PER_SOURCE;
    let mut h = Harness::start_with(support::idp).await;
    let flood = 300;
    let attacker = async_nats::connect(h.server.url()).await.unwrap();
    let request = proto::LoginRequest {
        id_token: "not a token".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let answers = futures::future::join_all((0..flood).map(|_| {
        let attacker = attacker.clone();
        let request = request.clone();
        async move {
            let reply = attacker
                .request(rct_bus::Subject::Login.to_string(), request.into())
                .await
                .unwrap();
            proto::LoginResponse::decode(reply.payload).unwrap()
        }
    }))
    .await;
    // Every one is answered with its reason.
    for answer in &answers {
        let Some(R::Refused(refused)) = &answer.result else {
            panic!("not refused: {answer:?}");
        };
        assert!(refused.message.contains("not a valid JWT"), "{refused:?}");
    }
    h.stop_admission().await;

    let filter = Filter {
        tower: Some(rct_admission::AUTH_TOWER.parse().unwrap()),
        ..Filter::default()
    };
    let recorded: Vec<proto::Rejected> = replay::history(&h.js, &filter)
        .await
        .unwrap()
        .map(|r| match r.unwrap().event.kind {
            Some(Kind::Rejected(r)) => r,
            other => panic!("not a rejection: {other:?}"),
        })
        .collect()
        .await;
    // The harness's readiness probe (its own connection), this connection's budget, the count.
    let one_by_one = recorded
        .iter()
        .filter(|r| r.message.contains("not a valid JWT"))
        .count();
    assert_eq!(one_by_one, 1 + PER_SOURCE as usize, "{recorded:#?}");
    let counted: Vec<&proto::Rejected> = recorded
        .iter()
        .filter(|r| r.code == proto::RejectionCode::TooMany as i32)
        .collect();
    assert_eq!(counted.len(), 1, "{recorded:#?}");
    let unrecorded = flood - PER_SOURCE as usize;
    assert!(
        counted[0]
            .message
            .starts_with(&format!("{unrecorded} refused login(s) from 1 source(s)")),
        "{:?}",
        counted[0].message
    );
    assert_eq!(recorded.len(), one_by_one + 1);
}

/// A login waiting for its identity provider's keys holds up no other: logins are answered
/// at once, not one after another. A provider whose key set is slow to come (here, held until
/// the test lets it go) used to stall every login behind it.
#[tokio::test]
async fn a_login_waiting_for_its_providers_keys_holds_up_no_other() {
    use rct_admission::identity::IssuerConfig;
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", server.server_addr().to_ip().unwrap());
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (asked, asked_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut asked = Some(asked);
        for request in server.incoming_requests() {
            if let Some(asked) = asked.take() {
                let _ = asked.send(());
            }
            let _ = held.recv();
            let _ = request.respond(tiny_http::Response::from_string(r#"{"keys":[]}"#));
        }
    });
    let slow = "https://slow.example.com";
    let h = Harness::start_with(move |config| {
        support::idp(config);
        config.issuers.push(IssuerConfig {
            jwks_url: Some(url.clone()),
            ..IssuerConfig::new(slow, "rct", Algorithm::RS256)
        });
    })
    .await;
    let waiting = {
        let token = rs256(
            "k1",
            &with(|c| {
                c.insert("iss".into(), json!(slow));
            }),
        );
        let client = h.client.clone();
        tokio::spawn(async move {
            let request = proto::LoginRequest {
                id_token: token,
                session_public_key: KeyPair::generate().public().to_bytes().to_vec(),
                client: None,
            };
            let reply = client
                .request(
                    rct_bus::Subject::Login.to_string(),
                    request.encode_to_vec().into(),
                )
                .await
                .unwrap();
            proto::LoginResponse::decode(reply.payload).unwrap()
        })
    };
    asked_rx
        .await
        .expect("the slow provider was asked for its keys");
    // While that login waits, another is answered.
    let response = h
        .login_with(&rs256("k1", &claims()), &KeyPair::generate())
        .await;
    assert!(
        matches!(response.result, Some(R::Certificate(_))),
        "{response:?}"
    );
    assert!(
        !waiting.is_finished(),
        "the slow provider's login did not wait"
    );
    release.send(()).unwrap();
    let answer = waiting.await.unwrap();
    assert!(matches!(answer.result, Some(R::Refused(_))), "{answer:?}");
}

/// An agent's enrolment on `rct.auth.enrol.<tower>.<target>` gets its key certified for
/// exactly that tower and target (what it signs then verifies as that agent's, and only
/// there); an enrolment for a target or tower the catalog does not know, or one that does
/// not read, is refused with a reason and recorded. Events admission writes are signed with
/// its own key.
#[tokio::test]
async fn enrolment_certifies_a_key_for_its_subjects_target_and_refuses_the_rest() {
    use rct_bus::proto::enrol_response::Result as E;
    use rct_bus::provenance::{Author, Provenance, Signer, Trust};
    use rct_bus::{EventKind, Subject, Target, Tower, Verifier};
    let h = Harness::start().await;
    let admission = h.admission_keypair();
    let trust = Trust::new(Verifier::new([admission.public().clone()]));
    let enrol = |tower: &str, target: &str| Subject::Enrol {
        tower: Tower::new(tower).unwrap(),
        target: Target::new(target).unwrap(),
    };
    let request = |key: &KeyPair| {
        proto::EnrolRequest {
            public_key: key.public().to_bytes().to_vec(),
            agent: "prod-1-a1-01abc".into(),
        }
        .encode_to_vec()
    };

    let key = KeyPair::generate();
    let answer: proto::EnrolResponse = h.request(enrol("traffic", "prod-1"), request(&key)).await;
    let Some(E::Certificate(certificate)) = answer.result else {
        panic!("not certified: {answer:?}");
    };
    let signer = Signer::agent(key, certificate);
    let (traffic, prod1) = (
        Tower::new("traffic").unwrap(),
        Target::new("prod-1").unwrap(),
    );
    let subject = "rct.evt.traffic.prod-1.01JQ0000000000000000000000.outcome";
    let signature = signer.sign(subject, b"event").unwrap();
    let now = std::time::SystemTime::now();
    let check = |target: &Target, kind| {
        trust.check(
            (&traffic, target, kind),
            subject,
            b"event",
            Some(&signature),
            now,
        )
    };
    assert_eq!(
        check(&prod1, EventKind::Outcome),
        Provenance::Verified(Author::Agent("prod-1-a1-01abc".into()))
    );
    // Not another target's, nor a kind agents do not write.
    let prod2 = Target::new("prod-2").unwrap();
    assert!(!check(&prod2, EventKind::Outcome).counts());
    assert!(!check(&prod1, EventKind::Decision).counts());
    // Good for about agent_certificate_ttl (12 h by default), not more.
    let hours = |h: u64| std::time::Duration::from_secs(h * 3600);
    let later = |at| {
        trust.check(
            (&traffic, &prod1, EventKind::Outcome),
            subject,
            b"event",
            Some(&signature),
            at,
        )
    };
    assert!(later(now + hours(11)).counts());
    assert!(!later(now + hours(13)).counts());

    let cases = [
        (
            enrol("traffic", "prod-9"),
            request(&KeyPair::generate()),
            "unknown_target",
            "no target prod-9",
        ),
        (
            enrol("nosuch", "_"),
            request(&KeyPair::generate()),
            "unknown_target",
            "no tower nosuch",
        ),
        (
            enrol("workloads", "prod-1"),
            request(&KeyPair::generate()),
            "unknown_target",
            "no target prod-1",
        ),
        (
            enrol("traffic", "prod-2"),
            vec![0xff, 0xff, 0xff],
            "malformed",
            "does not decode",
        ),
        (
            enrol("traffic", "prod-2"),
            proto::EnrolRequest {
                public_key: vec![7; 5],
                agent: "x".into(),
            }
            .encode_to_vec(),
            "malformed",
            "not 32 bytes",
        ),
    ];
    for (subject, body, code, needle) in &cases {
        let answer: proto::EnrolResponse = h.request(subject.clone(), body.clone()).await;
        match answer.result {
            Some(E::Refused(refused)) => {
                assert_eq!(refused.code, *code, "{subject}");
                assert!(refused.message.contains(needle), "{subject}: {refused:?}");
            }
            other => panic!("{subject}: not refused: {other:?}"),
        }
    }
    // Each refusal on record, as admission's (signed) event.
    let filter = Filter {
        tower: Some(rct_admission::AUTH_TOWER.parse().unwrap()),
        ..Filter::default()
    }
    .trusting(Some(std::sync::Arc::new(trust)));
    let recorded: Vec<_> = replay::history(&h.js, &filter)
        .await
        .unwrap()
        .map(|r| r.unwrap())
        .filter(|r| std::future::ready(r.event.operation == "_auth/enrol"))
        .collect()
        .await;
    assert_eq!(recorded.len(), cases.len(), "{recorded:#?}");
    for (_, _, _, needle) in &cases {
        assert!(
            recorded.iter().any(
                |r| matches!(&r.event.kind, Some(Kind::Rejected(x)) if x.message.contains(needle))
            ),
            "{needle} not on record: {recorded:#?}"
        );
    }
    assert!(
        recorded
            .iter()
            .all(|r| r.provenance == Provenance::Verified(Author::Admission)),
        "{recorded:#?}"
    );
}
