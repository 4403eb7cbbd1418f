//! id_tokens verified with keys fetched from a JWKS URL (a local HTTP server): fetched on first
//! use, again once they are `jwks_ttl` old (a revoked key stops being trusted), refetched for
//! a new key id at most once per cooldown, so a flood of unknown key ids cannot turn admission
//! into a load generator against the identity provider, and tried again soon after a fetch
//! that failed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rct_admission::identity::{IdTokens, IssuerConfig};
use serde_json::json;

const RSA_KEY: &str = include_str!("fixtures/idp-rsa.key");
const ISSUER: &str = "https://idp.example.com";

/// Serves whatever JWKS is in `current`, counting requests.
struct JwksServer {
    url: String,
    current: Arc<Mutex<JwkSet>>,
    fetches: Arc<AtomicUsize>,
    /// This many requests to come are answered 503.
    failing: Arc<AtomicUsize>,
}

impl JwksServer {
    fn start(initial: JwkSet) -> Self {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks.json", server.server_addr().to_ip().unwrap());
        let current = Arc::new(Mutex::new(initial));
        let fetches = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicUsize::new(0));
        let (served, counted, fail) = (current.clone(), fetches.clone(), failing.clone());
        std::thread::spawn(move || {
            for request in server.incoming_requests() {
                counted.fetch_add(1, Ordering::SeqCst);
                let failed = fail
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let body = serde_json::to_string(&*served.lock().unwrap()).unwrap();
                let response = tiny_http::Response::from_string(body);
                let _ = request.respond(if failed {
                    response.with_status_code(503)
                } else {
                    response
                });
            }
        });
        Self {
            url,
            current,
            fetches,
            failing,
        }
    }
}

fn jwk(kid: &str) -> Jwk {
    let key = EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.into());
    jwk
}

fn token(kid: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    let claims = json!({"iss": ISSUER, "aud": "rct", "sub": "u-1", "exp": now + 600});
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn issuer(url: &str, cooldown: Duration) -> IssuerConfig {
    IssuerConfig {
        jwks_url: Some(url.into()),
        jwks_cooldown: cooldown,
        ..IssuerConfig::new(ISSUER, "rct", Algorithm::RS256)
    }
}

#[tokio::test]
async fn unknown_key_ids_refetch_at_most_once_per_cooldown() {
    let jwks = JwksServer::start(JwkSet {
        keys: vec![jwk("k1")],
    });
    let verifier = IdTokens::new(&[issuer(&jwks.url, Duration::from_secs(3600))]).unwrap();

    verifier.verify(&token("k1")).await.unwrap();
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        1,
        "fetched on first use"
    );
    verifier.verify(&token("k1")).await.unwrap();
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1, "cached");

    for i in 0..20 {
        let refusal = verifier
            .verify(&token(&format!("flood-{i}")))
            .await
            .unwrap_err();
        assert!(refusal.message.contains("does not have"), "{refusal:?}");
    }
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        1,
        "a flood of unknown kids within the cooldown fetches nothing"
    );
}

#[tokio::test]
async fn a_rotated_provider_key_is_picked_up_after_the_cooldown() {
    let jwks = JwksServer::start(JwkSet {
        keys: vec![jwk("k1")],
    });
    let cooldown = Duration::from_millis(500);
    let verifier = IdTokens::new(&[issuer(&jwks.url, cooldown)]).unwrap();
    verifier.verify(&token("k1")).await.unwrap();
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1);

    // The provider rotates: same key material under a new id.
    *jwks.current.lock().unwrap() = JwkSet {
        keys: vec![jwk("k2")],
    };
    // Asked for steadily: refused within the cooldown (the set is not fetched again), then
    // picked up once it has passed. A refusal that pushed the cooldown back would lock the
    // new key out for as long as it is asked for.
    let asked = std::time::Instant::now();
    while verifier.verify(&token("k2")).await.is_err() {
        assert_eq!(
            jwks.fetches.load(Ordering::SeqCst),
            1,
            "fetched within the cooldown"
        );
        assert!(
            asked.elapsed() < cooldown * 4,
            "a steady stream of asks kept the rotated key out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        asked.elapsed() >= cooldown / 2,
        "picked up before the cooldown passed"
    );
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_unreachable_jwks_url_refuses_with_a_reason() {
    let verifier =
        IdTokens::new(&[issuer("http://127.0.0.1:9/jwks.json", Duration::ZERO)]).unwrap();
    let refusal = verifier.verify(&token("k1")).await.unwrap_err();
    assert!(refusal.message.contains("names key \"k1\""), "{refusal:?}");
}

/// A key the provider revoked (dropped from its JWKS) stops being trusted once the fetched
/// keys are `jwks_ttl` old, although its id is known. Before, keys were never fetched again
/// while every key id asked for was known: the revoked key was trusted until a restart.
#[tokio::test]
async fn a_key_the_provider_revoked_is_refused_once_the_keys_are_stale() {
    let jwks = JwksServer::start(JwkSet {
        keys: vec![jwk("k1")],
    });
    let ttl = Duration::from_millis(400);
    let verifier = IdTokens::new(&[IssuerConfig {
        jwks_ttl: ttl,
        ..issuer(&jwks.url, Duration::ZERO)
    }])
    .unwrap();
    verifier.verify(&token("k1")).await.unwrap();
    *jwks.current.lock().unwrap() = JwkSet {
        keys: vec![jwk("k2")],
    };
    // Still fresh: the cached keys answer, nothing is fetched.
    verifier.verify(&token("k1")).await.unwrap();
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1);
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let refusal = verifier.verify(&token("k1")).await.unwrap_err();
    assert!(refusal.message.contains("does not have"), "{refusal:?}");
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 2);
    verifier.verify(&token("k2")).await.unwrap();
}

/// A fetch that failed (the provider briefly unavailable) is tried again within
/// `JWKS_RETRY`, not after the whole cooldown: before, one failed fetch at start locked every
/// login out for the cooldown (5 minutes by default).
#[tokio::test]
async fn a_failed_fetch_is_tried_again_soon_not_after_the_cooldown() {
    let jwks = JwksServer::start(JwkSet {
        keys: vec![jwk("k1")],
    });
    jwks.failing.store(1, Ordering::SeqCst);
    let verifier = IdTokens::new(&[issuer(&jwks.url, Duration::from_secs(3600))]).unwrap();
    let refusal = verifier.verify(&token("k1")).await.unwrap_err();
    assert!(refusal.message.contains("names key \"k1\""), "{refusal:?}");
    let failed = std::time::Instant::now();
    // Asked steadily: not fetched again at once (a flood still cannot hammer the provider)…
    while verifier.verify(&token("k1")).await.is_err() {
        assert!(
            failed.elapsed() < rct_admission::identity::JWKS_RETRY * 2,
            "still refused {:?} after the failed fetch",
            failed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // …and let in once the retry pause passed.
    assert!(failed.elapsed() >= rct_admission::identity::JWKS_RETRY - Duration::from_millis(200));
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 2);
}
