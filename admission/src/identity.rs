//! Who is asking: id_tokens from identity providers, operator certificates issued by
//! admission, service identities, and the development issuer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rct_bus::proto::{self, RejectionCode};
use rct_bus::{KeyPair, PublicKey, certificate};
use serde::Deserialize;
use serde_json::Value;

/// Issuer name of the development issuer.
pub const DEV_ISSUER: &str = "rct-dev";
/// Audience of id_tokens minted by the development issuer.
pub const DEV_AUDIENCE: &str = "rct";

/// An authenticated person or service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The identity provider's stable subject.
    pub subject: String,
    /// For people to read; the subject when the provider gives no email.
    pub email: String,
    /// Groups, as the provider (or the service registration) states them.
    pub groups: Vec<String>,
}

impl Identity {
    /// The operator as recorded in commands and events.
    pub fn to_proto(&self) -> proto::Operator {
        proto::Operator {
            subject: self.subject.clone(),
            email: self.email.clone(),
            groups: self.groups.clone(),
        }
    }

    /// How people are named in messages.
    pub fn name(&self) -> &str {
        if self.email.is_empty() {
            &self.subject
        } else {
            &self.email
        }
    }
}

/// Why someone was not let in: a stable code and a sentence to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The code recorded in the rejection event.
    pub code: RejectionCode,
    /// What happened and what to do.
    pub message: String,
}

impl Refusal {
    fn unauthenticated(message: impl Into<String>) -> Self {
        Self {
            code: RejectionCode::Unauthenticated,
            message: message.into(),
        }
    }
}

/// An identity provider whose id_tokens admission accepts at login.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` claim, exactly.
    pub issuer: String,
    /// Accepted `aud` values; the token must name one of them.
    pub audience: Vec<String>,
    /// Accepted signature algorithms (`RS256`, `ES256`, `EdDSA`, …); nothing else is tried.
    pub algorithms: Vec<Algorithm>,
    /// The provider's public keys, given here.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Where the provider publishes its keys (JWKS): `https://`, or `http://` on loopback
    /// only. Fetched on first use, again once the keys are `jwks_ttl` old (a key the provider
    /// revoked is dropped then), and when a token names a key id not seen yet, at most once
    /// per `jwks_cooldown`. A fetch that failed is tried again after at most
    /// [`JWKS_RETRY`]; until a fetch succeeds, the keys fetched last are used.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// How long fetched keys are used before they are fetched again.
    #[serde(default = "default_jwks_ttl", with = "humantime_serde")]
    pub jwks_ttl: Duration,
    /// Shortest time between two JWKS fetches for tokens naming unknown key ids.
    #[serde(default = "default_jwks_cooldown", with = "humantime_serde")]
    pub jwks_cooldown: Duration,
    /// The claim that lists the user's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// The claim with the user's email.
    #[serde(default = "default_email_claim")]
    pub email_claim: String,
    /// Clock skew tolerated on `nbf` and `iat` (a token issued by a clock a little ahead).
    /// Never on `exp`: an expired token is refused, so a session never ends in the past.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
}

impl IssuerConfig {
    /// An issuer for `audience` signing with `algorithm`, with no keys yet and every other
    /// setting at its default.
    pub fn new(issuer: &str, audience: &str, algorithm: Algorithm) -> Self {
        Self {
            issuer: issuer.into(),
            audience: vec![audience.into()],
            algorithms: vec![algorithm],
            keys: Vec::new(),
            jwks_url: None,
            jwks_ttl: default_jwks_ttl(),
            jwks_cooldown: default_jwks_cooldown(),
            groups_claim: default_groups_claim(),
            email_claim: default_email_claim(),
            leeway: default_leeway(),
        }
    }
}

/// The longest wait before a JWKS fetch that failed is tried again.
pub const JWKS_RETRY: Duration = Duration::from_secs(5);

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_email_claim() -> String {
    "email".into()
}

fn default_leeway() -> Duration {
    Duration::from_secs(10)
}

fn default_jwks_ttl() -> Duration {
    Duration::from_secs(600)
}

fn default_jwks_cooldown() -> Duration {
    Duration::from_secs(60)
}

/// One public key of an identity provider: a PEM (inline or in a file) or a JWK.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key id tokens name in their header; a key without one is tried for any token.
    #[serde(default)]
    pub kid: Option<String>,
    /// A public key PEM.
    #[serde(default)]
    pub pem: Option<String>,
    /// A file holding a public key PEM.
    #[serde(default)]
    pub pem_file: Option<PathBuf>,
    /// A JSON Web Key (its `kid` is used when `kid` is not set).
    #[serde(default)]
    pub jwk: Option<jsonwebtoken::jwk::Jwk>,
}

type Keys = Vec<(Option<String>, DecodingKey)>;

struct Issuer {
    config: IssuerConfig,
    keys: Keys,
    jwks: Option<Jwks>,
}

/// Keys fetched from an issuer's JWKS URL, and when.
struct Jwks {
    url: String,
    http: reqwest::Client,
    // A tokio mutex: held across the fetch, so concurrent logins with a new kid fetch once.
    state: tokio::sync::Mutex<Fetched>,
}

/// What was fetched from a JWKS URL, and when it was last tried.
#[derive(Default)]
struct Fetched {
    keys: Keys,
    /// The last fetch that succeeded.
    at: Option<std::time::Instant>,
    /// The last attempt, and whether it succeeded.
    tried: Option<(std::time::Instant, bool)>,
}

impl Jwks {
    /// The keys: fetched again when never fetched, `ttl` old, or without `kid`; never sooner
    /// than `cooldown` after the last fetch (nor [`JWKS_RETRY`] after a failed one, if that
    /// is sooner), so tokens naming made-up key ids cannot make admission hammer the
    /// provider.
    async fn keys(&self, kid: Option<&str>, ttl: Duration, cooldown: Duration) -> Keys {
        let mut state = self.state.lock().await;
        let known = kid.is_none_or(|kid| state.keys.iter().any(|(k, _)| k.as_deref() == Some(kid)));
        let stale = state.at.is_none_or(|at| at.elapsed() >= ttl);
        let may = state.tried.is_none_or(|(at, ok)| {
            at.elapsed()
                >= if ok {
                    cooldown
                } else {
                    cooldown.min(JWKS_RETRY)
                }
        });
        if (stale || !known) && may {
            let fetched = self.fetch().await;
            // Timed from the end: logins queued behind a fetch that timed out do not each
            // fetch again, they take the keys fetched last.
            let now = std::time::Instant::now();
            match fetched {
                Ok(fresh) => {
                    state.keys = fresh;
                    state.at = Some(now);
                    state.tried = Some((now, true));
                }
                Err(e) => {
                    state.tried = Some((now, false));
                    tracing::warn!(url = %self.url, error = %e, "cannot fetch the JWKS; using the keys fetched last");
                }
            }
        }
        state.keys.clone()
    }

    async fn fetch(&self) -> Result<Keys, String> {
        let set: jsonwebtoken::jwk::JwkSet = self
            .http
            .get(&self.url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| format!("not a JWKS: {e}"))?;
        Ok(set
            .keys
            .iter()
            .filter_map(|jwk| {
                let key = DecodingKey::from_jwk(jwk).ok()?;
                Some((jwk.common.key_id.clone(), key))
            })
            .collect())
    }
}

/// Verifies id_tokens against the configured issuers.
pub struct IdTokens {
    issuers: Vec<Issuer>,
}

impl std::fmt::Debug for IdTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .issuers
            .iter()
            .map(|i| i.config.issuer.as_str())
            .collect();
        f.debug_struct("IdTokens").field("issuers", &names).finish()
    }
}

/// What a verified id_token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Who it is.
    pub identity: Identity,
    /// When the token expires (seconds since the epoch); certificates never outlive it.
    pub expires_at: u64,
}

impl IdTokens {
    /// Reads the issuers' keys; an unreadable key is a configuration error.
    pub fn new(configs: &[IssuerConfig]) -> Result<Self, String> {
        let mut issuers = Vec::new();
        for config in configs {
            if config.algorithms.is_empty() {
                return Err(format!("issuer {}: list its algorithms", config.issuer));
            }
            if let Some(hs) = config.algorithms.iter().find(|a| is_shared_secret(**a)) {
                return Err(format!(
                    "issuer {}: {hs:?} is a shared-secret algorithm, never accepted for \
                     id_tokens (anyone who can verify such a token can forge one)",
                    config.issuer
                ));
            }
            if let Some(url) = &config.jwks_url {
                jwks_url_problem(url).map_err(|e| format!("issuer {}: {e}", config.issuer))?;
            }
            let mut keys = Vec::new();
            for (i, key) in config.keys.iter().enumerate() {
                let decoding = decoding_key(key, &config.algorithms)
                    .map_err(|e| format!("issuer {} key {}: {e}", config.issuer, i + 1))?;
                let kid = key
                    .kid
                    .clone()
                    .or_else(|| key.jwk.as_ref().and_then(|j| j.common.key_id.clone()));
                keys.push((kid, decoding));
            }
            if keys.is_empty() && config.jwks_url.is_none() {
                return Err(format!(
                    "issuer {} has no keys: give `keys` or `jwks_url`",
                    config.issuer
                ));
            }
            let jwks = config.jwks_url.as_ref().map(|url| Jwks {
                url: url.clone(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("a default HTTP client builds"),
                state: tokio::sync::Mutex::default(),
            });
            issuers.push(Issuer {
                config: config.clone(),
                keys,
                jwks,
            });
        }
        Ok(Self { issuers })
    }

    /// Verifies signature, algorithm, `iss`, `aud`, `exp`, `nbf` and reads the identity.
    pub async fn verify(&self, token: &str) -> Result<Verified, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            Refusal::unauthenticated(format!("the id_token is not a valid JWT ({e})"))
        })?;
        let issuer = self.issuer_of(token)?;
        let config = &issuer.config;
        if !config.algorithms.contains(&header.alg) {
            return Err(Refusal::unauthenticated(format!(
                "the id_token is signed with {:?}, which is not allowed for {}",
                header.alg, config.issuer
            )));
        }
        let mut keys = issuer.keys.clone();
        if let Some(jwks) = &issuer.jwks {
            let fetched = jwks.keys(header.kid.as_deref(), config.jwks_ttl, config.jwks_cooldown);
            keys.extend(fetched.await);
        }
        // A token naming a key id is tried with that key, and with the keys that name none; a
        // token naming none, with every key.
        let candidates: Vec<&DecodingKey> = keys
            .iter()
            .filter(|(k, _)| header.kid.is_none() || k.is_none() || *k == header.kid)
            .map(|(_, key)| key)
            .collect();
        if candidates.is_empty() {
            return Err(Refusal::unauthenticated(format!(
                "the id_token names key {:?}, which {} does not have",
                header.kid.unwrap_or_default(),
                config.issuer
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&config.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // `exp` without leeway; `nbf` and `iat` with it, in `claims_identity`.
        validation.leeway = 0;
        validation.validate_nbf = false;

        let mut last = None;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, &validation) {
                Ok(data) => return claims_identity(&data.claims, config, unix_now()),
                Err(e) => last = Some(e),
            }
        }
        Err(token_refusal(
            last.expect("at least one key was tried"),
            "id_token",
        ))
    }

    /// The issuer named by the token's (not yet verified) `iss`: only used to choose keys.
    fn issuer_of(&self, token: &str) -> Result<&Issuer, Refusal> {
        let iss = unverified_claim(token, "iss").unwrap_or_default();
        self.issuers
            .iter()
            .find(|i| i.config.issuer == iss)
            .ok_or_else(|| {
                Refusal::unauthenticated(format!(
                    "the id_token's issuer {iss:?} is not one admission trusts"
                ))
            })
    }
}

/// A claim of a token whose signature is not checked yet: only for choosing keys.
fn unverified_claim(token: &str, name: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Map<String, Value> = serde_json::from_slice(&bytes).ok()?;
    claims.get(name)?.as_str().map(str::to_owned)
}

fn is_shared_secret(algorithm: Algorithm) -> bool {
    matches!(
        algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    )
}

/// Whether `host` (a name, an IPv4 or a bracketed IPv6 address) is this machine's loopback.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a JWKS URL cannot be used: keys fetched in the clear could be anyone's, so only
/// `https://` is accepted, or `http://` to a loopback address (a local test issuer).
fn jwks_url_problem(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("jwks_url {url:?}: {e}"))?;
    let loopback = is_loopback(parsed.host_str().unwrap_or_default());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        scheme => Err(format!(
            "jwks_url {url:?}: keys must be fetched over https ({scheme}:// is accepted on \
             loopback only, for a local test issuer)"
        )),
    }
}

fn decoding_key(key: &KeyConfig, algorithms: &[Algorithm]) -> Result<DecodingKey, String> {
    if let Some(jwk) = &key.jwk {
        return DecodingKey::from_jwk(jwk).map_err(|e| format!("bad JWK: {e}"));
    }
    let pem = match (&key.pem, &key.pem_file) {
        (Some(pem), _) => pem.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?,
        (None, None) => return Err("give `pem`, `pem_file` or `jwk`".into()),
    };
    let pem = pem.as_bytes();
    let family = algorithms[0];
    let key = match family {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => DecodingKey::from_rsa_pem(pem),
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            return Err("shared-secret algorithms (HS*) are not accepted for id_tokens".into());
        }
        other => return Err(format!("algorithm {other:?} is not supported")),
    };
    key.map_err(|e| format!("bad PEM for {family:?}: {e}"))
}

/// The identity in verified claims, once their times hold at `now`: `exp` strictly after it,
/// `nbf` and `iat` no later than it, give or take the issuer's leeway.
fn claims_identity(
    claims: &serde_json::Map<String, Value>,
    config: &IssuerConfig,
    now: u64,
) -> Result<Verified, Refusal> {
    // NumericDate: seconds since the epoch, fractions allowed (rounded down).
    let time = |name: &str| -> Result<Option<u64>, Refusal> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or_else(|| {
                    Refusal::unauthenticated(format!(
                        "the id_token's {name} claim is not a time (seconds since the epoch)"
                    ))
                }),
        }
    };
    let expires_at = time("exp")?
        .ok_or_else(|| Refusal::unauthenticated("the id_token's exp is not a number"))?;
    if expires_at <= now {
        return Err(Refusal::unauthenticated(format!(
            "the id_token expired {}s ago; log in again (rct login) with a fresh one",
            now - expires_at
        )));
    }
    let latest = now.saturating_add(config.leeway.as_secs());
    for (name, what) in [("nbf", "is not valid until"), ("iat", "says it was issued")] {
        if let Some(at) = time(name)?
            && at > latest
        {
            return Err(Refusal::unauthenticated(format!(
                "the id_token {what} {}s from now ({name}), beyond the {}s of clock skew \
                 allowed: check the clocks of the identity provider and of admission",
                at - now,
                config.leeway.as_secs()
            )));
        }
    }
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Refusal::unauthenticated("the id_token has no subject"))?
        .to_owned();
    let email = claims
        .get(&config.email_claim)
        .and_then(Value::as_str)
        .unwrap_or(&subject)
        .to_owned();
    let groups = match claims.get(&config.groups_claim) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect(),
        Some(Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    };
    Ok(Verified {
        identity: Identity {
            subject,
            email,
            groups,
        },
        expires_at,
    })
}

fn token_refusal(error: jsonwebtoken::errors::Error, what: &str) -> Refusal {
    let message = match error.kind() {
        ErrorKind::ExpiredSignature => {
            format!("the {what} has expired; log in again (rct login)")
        }
        ErrorKind::ImmatureSignature => {
            format!("the {what} is not valid yet (nbf is in the future)")
        }
        ErrorKind::InvalidIssuer => {
            format!("the {what} comes from an issuer admission does not trust")
        }
        ErrorKind::InvalidAudience => format!("the {what} is meant for another audience"),
        ErrorKind::InvalidSignature => format!("the {what}'s signature does not verify"),
        ErrorKind::InvalidAlgorithm => {
            format!("the {what} uses an algorithm its key does not allow")
        }
        ErrorKind::MissingRequiredClaim(claim) => {
            format!("the {what} has no usable {claim} claim (missing, or not of the right type)")
        }
        ErrorKind::InvalidClaimFormat(claim) => {
            format!("the {what}'s {claim} claim has the wrong type")
        }
        _ => format!("the {what} is not valid ({error})"),
    };
    Refusal::unauthenticated(message)
}

/// Issues and verifies operator certificates: EdDSA JWTs signed by admission that bind a
/// session key to an identity for a short time.
pub struct Certificates {
    key: KeyPair,
    trusted: rct_bus::Verifier,
    ttl: Duration,
    /// Certificates already verified, by token: an operator signs many submissions with one
    /// certificate, and verifying it once is enough (expiry is checked on every use).
    verified: std::sync::Mutex<HashMap<String, Certificate>>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("kid", self.key.id())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A verified operator certificate.
#[derive(Clone, Debug)]
pub struct Certificate {
    /// Who it names.
    pub identity: Identity,
    /// The session key it binds.
    pub session_key: PublicKey,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
}

impl Certificates {
    /// Signs with `key`; certificates signed by it or by any of `also_trusted` verify.
    pub fn new(key: &KeyPair, also_trusted: &[PublicKey], ttl: Duration) -> Self {
        let trusted =
            rct_bus::Verifier::new(std::iter::once(key.public()).chain(also_trusted).cloned());
        Self {
            key: KeyPair::from_pem(&key.to_pem()).expect("our own PEM reads back"),
            trusted,
            ttl,
            verified: std::sync::Mutex::default(),
        }
    }

    /// A certificate for `identity` and `session_key`, expiring after the configured time or
    /// with the id_token, whichever comes first.
    pub fn issue(
        &self,
        identity: &Identity,
        session_key: &PublicKey,
        not_after: u64,
    ) -> (String, u64) {
        let now = unix_now();
        let exp = now.saturating_add(self.ttl.as_secs()).min(not_after);
        let token = certificate::issue(
            &self.key,
            &identity.to_proto(),
            session_key,
            now,
            now.saturating_sub(5),
            exp,
        );
        (token, exp)
    }

    /// Verifies a certificate: signed by a trusted admission key, for operators, not expired.
    pub fn verify(&self, token: &str) -> Result<Certificate, Refusal> {
        const REMEMBERED: usize = 10_000;
        let now = unix_now();
        if let Some(known) = self.remembered().get(token)
            && known.expires_at > now
        {
            return Ok(known.clone());
        }
        let certificate = self.verify_token(token)?;
        let mut remembered = self.remembered();
        if remembered.len() >= REMEMBERED {
            remembered.retain(|_, c| c.expires_at > now);
            if remembered.len() >= REMEMBERED {
                remembered.clear();
            }
        }
        remembered.insert(token.to_owned(), certificate.clone());
        Ok(certificate)
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, HashMap<String, Certificate>> {
        // Held for a lookup or an insert only, never across an await.
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn verify_token(&self, token: &str) -> Result<Certificate, Refusal> {
        use certificate::Refused;
        let refusal = |refused: Refused| match refused {
            Refused::NotJwt => Refusal::unauthenticated(
                "the operator certificate is not a valid JWT; run rct login",
            ),
            Refused::UntrustedIssuer => Refusal::unauthenticated(
                "the operator certificate was not issued by this admission; run rct login",
            ),
            Refused::Token(e) => token_refusal(e, "operator certificate"),
            Refused::GarbledKey => {
                Refusal::unauthenticated("the certificate's session key is garbled")
            }
        };
        let certified = certificate::verify(token, &self.trusted).map_err(refusal)?;
        certified.holds_at(unix_now()).map_err(refusal)?;
        Ok(Certificate {
            identity: Identity {
                subject: certified.operator.subject,
                email: certified.operator.email,
                groups: certified.operator.groups,
            },
            session_key: certified.session_key,
            expires_at: certified.expires_at,
        })
    }
}

/// A registered automation identity: its public key and groups, no login.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Its name (recorded as the operator).
    pub name: String,
    /// Its Ed25519 public key PEM.
    pub public_key: String,
    /// Its groups.
    pub groups: Vec<String>,
}

/// Service identities by key id.
#[derive(Clone, Debug, Default)]
pub struct Services {
    by_key: HashMap<String, (PublicKey, Identity)>,
}

impl Services {
    /// Reads the registrations; a bad key is a configuration error.
    pub fn new(configs: &[ServiceConfig]) -> Result<Self, String> {
        let mut by_key = HashMap::new();
        for service in configs {
            let key = PublicKey::from_pem(&service.public_key)
                .map_err(|e| format!("service {}: {e}", service.name))?;
            let identity = Identity {
                subject: format!("service:{}", service.name),
                email: service.name.clone(),
                groups: service.groups.clone(),
            };
            by_key.insert(key.id().to_string(), (key, identity));
        }
        Ok(Self { by_key })
    }

    /// The service whose key has id `key_id`.
    pub fn get(&self, key_id: &str) -> Option<&(PublicKey, Identity)> {
        self.by_key.get(key_id)
    }
}

/// Mints id_tokens for anyone: development only, never enabled in production configs.
pub struct DevIssuer {
    key: KeyPair,
    encoding: EncodingKey,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("key", self.key.id())
            .finish()
    }
}

impl DevIssuer {
    /// A development issuer whose key is derived from admission's signing key `key`: every
    /// replica accepts the tokens any replica mints, and a dev token's key signs nothing else
    /// (no agent or certificate verifies with it).
    pub fn new(key: &KeyPair) -> Self {
        let key = key.derive("dev-issuer");
        let encoding =
            EncodingKey::from_ed_pem(key.to_pem().as_bytes()).expect("our own PEM encodes");
        Self { key, encoding }
    }

    /// The issuer configuration that makes admission accept this issuer's tokens.
    pub fn issuer_config(&self) -> IssuerConfig {
        IssuerConfig {
            keys: vec![KeyConfig {
                kid: Some(self.key.id().to_string()),
                pem: Some(self.key.public().to_pem()),
                ..KeyConfig::default()
            }],
            ..IssuerConfig::new(DEV_ISSUER, DEV_AUDIENCE, Algorithm::EdDSA)
        }
    }

    /// An id_token for `user` in `groups`, valid for 12 hours.
    pub fn mint(&self, user: &str, email: &str, groups: &[String]) -> String {
        let now = unix_now();
        let claims = serde_json::json!({
            "iss": DEV_ISSUER,
            "aud": DEV_AUDIENCE,
            "sub": user,
            "email": if email.is_empty() { format!("{user}@example.com") } else { email.to_owned() },
            "groups": groups,
            "iat": now,
            "exp": now + 12 * 3600,
        });
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.key.id().to_string());
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .expect("signing with our own key cannot fail")
    }
}

/// Seconds since the epoch, now.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const RSA_KEY: &str = include_str!("../tests/fixtures/idp-rsa.key");
    const RSA_PUB: &str = include_str!("../tests/fixtures/idp-rsa.pub");
    const ISSUER: &str = "https://idp.example.com";

    fn issuer() -> IssuerConfig {
        IssuerConfig {
            keys: vec![KeyConfig {
                kid: Some("k1".into()),
                pem: Some(RSA_PUB.into()),
                ..KeyConfig::default()
            }],
            ..IssuerConfig::new(ISSUER, "rct", Algorithm::RS256)
        }
    }

    fn claims() -> Value {
        let now = unix_now();
        json!({
            "iss": ISSUER, "aud": "rct", "sub": "u-1", "email": "alice@example.com",
            "groups": ["sre_team"], "iat": now, "exp": now + 600,
        })
    }

    fn sign(header: Header, claims: &Value) -> String {
        let key = EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    fn rs256() -> Header {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("k1".into());
        header
    }

    fn verifier() -> IdTokens {
        IdTokens::new(&[issuer()]).unwrap()
    }

    async fn refused(token: &str) -> String {
        let refusal = verifier().verify(token).await.unwrap_err();
        assert_eq!(refusal.code, RejectionCode::Unauthenticated);
        refusal.message
    }

    fn with(change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
        let mut c = claims();
        change(c.as_object_mut().unwrap());
        c
    }

    #[tokio::test]
    async fn a_good_id_token_gives_the_identity() {
        let verified = verifier().verify(&sign(rs256(), &claims())).await.unwrap();
        assert_eq!(verified.identity.subject, "u-1");
        assert_eq!(verified.identity.email, "alice@example.com");
        assert_eq!(verified.identity.groups, ["sre_team"]);
        assert!(verified.expires_at > unix_now());
    }

    #[tokio::test]
    async fn alg_none_is_refused() {
        use base64::Engine;
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let token = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims()));
        assert!(refused(&token).await.contains("not a valid JWT"));
    }

    #[tokio::test]
    async fn hs256_signed_with_the_public_key_is_refused() {
        let key = EncodingKey::from_secret(RSA_PUB.as_bytes());
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims(), &key).unwrap();
        assert!(
            refused(&token)
                .await
                .contains("HS256, which is not allowed")
        );
    }

    #[tokio::test]
    async fn every_claim_is_checked() {
        let now = unix_now();
        let cases = [
            (
                with(|c| {
                    c.insert("iss".into(), json!("https://evil"));
                }),
                "issuer \"https://evil\" is not one admission trusts",
            ),
            (
                with(|c| {
                    c.insert("aud".into(), json!("other"));
                }),
                "meant for another audience",
            ),
            (
                with(|c| {
                    c.insert("exp".into(), json!(now - 3600));
                }),
                "has expired",
            ),
            (
                with(|c| {
                    c.insert("nbf".into(), json!(now + 3600));
                }),
                "is not valid until",
            ),
            // No leeway on exp: accepted before, with a session "until" 10 s ago.
            (
                with(|c| {
                    c.insert("exp".into(), json!(now - 10));
                }),
                "has expired",
            ),
            (
                with(|c| {
                    c.insert("exp".into(), json!(now));
                }),
                "expired",
            ),
            (
                with(|c| {
                    c.insert("iat".into(), json!(now + 3600));
                }),
                "s from now (iat), beyond the 10s of clock skew",
            ),
            (
                with(|c| {
                    c.insert("nbf".into(), json!(now + 60));
                }),
                "s from now (nbf), beyond the 10s of clock skew",
            ),
            (
                with(|c| {
                    c.insert("iat".into(), json!("yesterday"));
                }),
                "iat claim is not a time",
            ),
            (
                with(|c| {
                    c.insert("exp".into(), json!((now + 600).to_string()));
                }),
                "no usable exp claim",
            ),
            (
                with(|c| {
                    c.remove("sub");
                }),
                "no usable sub claim",
            ),
        ];
        for (claims, expected) in cases {
            let message = refused(&sign(rs256(), &claims)).await;
            assert!(
                message.contains(expected),
                "{expected:?} not in {message:?}"
            );
        }
        // Within the leeway, a clock a little ahead is no reason to refuse.
        let ahead = with(|c| {
            c.insert("iat".into(), json!(now + 5));
            c.insert("nbf".into(), json!(now + 5));
        });
        verifier().verify(&sign(rs256(), &ahead)).await.unwrap();
    }

    /// A key configured without a key id is tried for every token, a key id or not; a key
    /// with another id is not.
    #[tokio::test]
    async fn a_key_without_an_id_is_tried_for_tokens_that_name_one() {
        let mut config = issuer();
        config.keys[0].kid = None;
        let verifier = IdTokens::new(&[config]).unwrap();
        let mut header = rs256();
        header.kid = Some("rotated-7".into());
        verifier.verify(&sign(header, &claims())).await.unwrap();
        verifier
            .verify(&sign(Header::new(Algorithm::RS256), &claims()))
            .await
            .unwrap();
    }

    #[test]
    fn shared_secrets_and_keys_fetched_in_the_clear_are_refused_at_start() {
        for algorithms in [
            vec![Algorithm::HS256],
            vec![Algorithm::RS256, Algorithm::HS256],
            vec![Algorithm::ES256, Algorithm::RS256, Algorithm::HS512],
        ] {
            let config = IssuerConfig {
                algorithms: algorithms.clone(),
                ..issuer()
            };
            let error = IdTokens::new(&[config]).unwrap_err();
            assert!(error.contains("shared-secret"), "{algorithms:?}: {error}");
        }
        let with_url = |url: &str| IssuerConfig {
            jwks_url: Some(url.into()),
            ..issuer()
        };
        for clear in [
            "http://idp.example.com/jwks",
            "http://10.0.0.1/jwks",
            "http://localhost.evil.example/jwks",
            "ftp://idp.example.com/jwks",
            "not a url",
        ] {
            assert!(
                IdTokens::new(&[with_url(clear)]).is_err(),
                "{clear} accepted"
            );
        }
        for fine in [
            "https://idp.example.com/.well-known/jwks.json",
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9/jwks",
        ] {
            IdTokens::new(&[with_url(fine)]).unwrap_or_else(|e| panic!("{fine}: {e}"));
        }
    }

    #[tokio::test]
    async fn unknown_kids_and_foreign_signatures_are_refused() {
        let mut header = rs256();
        header.kid = Some("k9".into());
        assert!(
            refused(&sign(header, &claims()))
                .await
                .contains("names key \"k9\"")
        );

        // Signed by an EdDSA key the issuer does not have, claiming RS256 is impossible; so
        // forge by swapping the signature of another token.
        let good = sign(rs256(), &claims());
        let other = sign(
            rs256(),
            &with(|c| {
                c.insert("sub".into(), json!("mallory"));
            }),
        );
        let forged = format!(
            "{}.{}",
            other.rsplit_once('.').unwrap().0,
            good.rsplit_once('.').unwrap().1
        );
        assert!(refused(&forged).await.contains("signature does not verify"));
    }

    #[tokio::test]
    async fn groups_may_be_a_single_string_and_the_claim_renamed() {
        let mut config = issuer();
        config.groups_claim = "roles".into();
        let verifier = IdTokens::new(&[config]).unwrap();
        let token = sign(
            rs256(),
            &with(|c| {
                c.insert("roles".into(), json!("dba"));
            }),
        );
        assert_eq!(
            verifier.verify(&token).await.unwrap().identity.groups,
            ["dba"]
        );
    }

    #[test]
    fn bad_issuer_configs_are_refused_at_start() {
        let mut config = issuer();
        config.keys[0].pem = Some("not a pem".into());
        assert!(IdTokens::new(&[config]).unwrap_err().contains("bad PEM"));
    }

    #[test]
    fn certificates_bind_a_session_key_until_they_expire() {
        let admission = KeyPair::generate();
        let certificates = Certificates::new(&admission, &[], Duration::from_secs(3600));
        let session = KeyPair::generate();
        let identity = Identity {
            subject: "u-1".into(),
            email: "alice@example.com".into(),
            groups: vec!["sre_team".into()],
        };
        let id_token_exp = unix_now() + 60;
        let (token, exp) = certificates.issue(&identity, session.public(), id_token_exp);
        assert_eq!(exp, id_token_exp, "never outlives the id_token");
        let certificate = certificates.verify(&token).unwrap();
        assert_eq!(certificate.identity, identity);
        assert_eq!(&certificate.session_key, session.public());

        // Another admission's certificate is refused.
        let other = Certificates::new(&KeyPair::generate(), &[], Duration::from_secs(3600));
        let (foreign, _) = other.issue(&identity, session.public(), id_token_exp);
        assert!(
            certificates
                .verify(&foreign)
                .unwrap_err()
                .message
                .contains("not issued by this admission")
        );

        // An expired certificate says what to do.
        let (expired, _) = certificates.issue(&identity, session.public(), unix_now() - 120);
        let refusal = certificates.verify(&expired).unwrap_err();
        assert!(
            refusal.message.contains("expired; log in again"),
            "{refusal:?}"
        );

        // During a key rotation, the new admission key still accepts the old key's certificates.
        let rotated = Certificates::new(
            &KeyPair::generate(),
            &[admission.public().clone()],
            Duration::from_secs(60),
        );
        rotated.verify(&token).unwrap();
    }

    #[tokio::test]
    async fn the_dev_issuer_mints_tokens_its_own_config_accepts() {
        let dev = DevIssuer::new(&KeyPair::generate());
        let verifier = IdTokens::new(&[dev.issuer_config()]).unwrap();
        let token = dev.mint("alice", "", &["sre_team".into()]);
        let verified = verifier.verify(&token).await.unwrap();
        assert_eq!(verified.identity.email, "alice@example.com");
        assert_eq!(verified.identity.groups, ["sre_team"]);
        // A token of another dev issuer (another admission's) is refused.
        let stranger = DevIssuer::new(&KeyPair::generate()).mint("mallory", "", &[]);
        assert!(verifier.verify(&stranger).await.is_err());
    }
}
