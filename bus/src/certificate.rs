//! Operator certificates: EdDSA JWTs admission issues, binding an operator's session key to
//! their identity for a short time. Admission issues and checks them; agents check the ones
//! approvals carry, against the same admission keys they trust for commands.

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::{KeyPair, PublicKey, Verifier, proto};

/// Audience of operator certificates.
pub const AUDIENCE: &str = "rct-operator";
/// Issuer of operator certificates.
pub const ISSUER: &str = "rct-admission";
/// Seconds of clock difference forgiven when checking a certificate's times.
pub const LEEWAY: u64 = 5;

/// The claims of an operator certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// [`ISSUER`].
    pub iss: String,
    /// [`AUDIENCE`].
    pub aud: String,
    /// The identity provider's subject.
    pub sub: String,
    /// For people.
    pub email: String,
    /// The groups the identity provider stated.
    pub groups: Vec<String>,
    /// The session key it binds.
    pub cnf: Confirmation,
    /// Issued, not before, expires: seconds since the epoch.
    pub iat: u64,
    /// Not valid before.
    pub nbf: u64,
    /// Not valid after.
    pub exp: u64,
}

/// The session key a certificate binds (RFC 7800 style confirmation).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Confirmation {
    /// rct key id of the session key.
    pub kid: String,
    /// The raw 32-byte Ed25519 public key, base64url.
    pub x: String,
}

impl Confirmation {
    /// The confirmation of `key`.
    pub fn of(key: &PublicKey) -> Self {
        Self {
            kid: key.id().to_string(),
            x: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.to_bytes()),
        }
    }
}

/// A certificate whose signature verified: who it names, the key it binds, and when it holds.
#[derive(Clone, Debug)]
pub struct Certified {
    /// Who it names.
    pub operator: proto::Operator,
    /// The session key it binds.
    pub session_key: PublicKey,
    /// Not valid before, seconds since the epoch.
    pub not_before: u64,
    /// Not valid after, seconds since the epoch.
    pub expires_at: u64,
}

/// Why a certificate does not verify.
#[derive(Debug)]
pub enum Refused {
    /// It is not a JWT.
    NotJwt,
    /// It names no key of the trusted admission keys.
    UntrustedIssuer,
    /// The token itself: signature, issuer, audience, claims or times.
    Token(jsonwebtoken::errors::Error),
    /// The session key it binds does not read.
    GarbledKey,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::NotJwt => f.write_str("the operator certificate is not a JWT"),
            Refused::UntrustedIssuer => {
                f.write_str("the operator certificate was not issued by a trusted admission key")
            }
            Refused::Token(e) => match e.kind() {
                ErrorKind::ExpiredSignature => f.write_str("the operator certificate had expired"),
                ErrorKind::ImmatureSignature => {
                    f.write_str("the operator certificate was not valid yet")
                }
                _ => write!(f, "the operator certificate is not valid ({e})"),
            },
            Refused::GarbledKey => f.write_str("the certificate's session key is garbled"),
        }
    }
}

/// A certificate signed by `key` naming `operator` and binding `session_key`, valid from
/// `not_before` to `expires_at` (seconds since the epoch; `issued_at` is recorded).
pub fn issue(
    key: &KeyPair,
    operator: &proto::Operator,
    session_key: &PublicKey,
    issued_at: u64,
    not_before: u64,
    expires_at: u64,
) -> String {
    let claims = Claims {
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
        sub: operator.subject.clone(),
        email: operator.email.clone(),
        groups: operator.groups.clone(),
        cnf: Confirmation::of(session_key),
        iat: issued_at,
        nbf: not_before,
        exp: expires_at,
    };
    let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
    header.kid = Some(key.id().to_string());
    let encoding = jsonwebtoken::EncodingKey::from_ed_pem(key.to_pem().as_bytes())
        .expect("our own PEM encodes");
    jsonwebtoken::encode(&header, &claims, &encoding).expect("signing with our own key cannot fail")
}

/// Verifies `token`'s signature (by a key of `trusted`), issuer, audience and claims; its
/// times are checked by [`Certified::holds_at`].
pub fn verify(token: &str, trusted: &Verifier) -> Result<Certified, Refused> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| Refused::NotJwt)?;
    let key = header
        .kid
        .as_deref()
        .and_then(|kid| trusted.key(kid))
        .ok_or(Refused::UntrustedIssuer)?;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.to_bytes());
    let key = DecodingKey::from_ed_components(&x).map_err(Refused::Token)?;
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&[AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
        .map_err(Refused::Token)?
        .claims;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&claims.cnf.x)
        .map_err(|_| Refused::GarbledKey)?;
    let session_key = PublicKey::from_bytes(&bytes).map_err(|_| Refused::GarbledKey)?;
    Ok(Certified {
        operator: proto::Operator {
            subject: claims.sub,
            email: claims.email,
            groups: claims.groups,
        },
        session_key,
        not_before: claims.nbf,
        expires_at: claims.exp,
    })
}

impl Certified {
    /// Whether it holds at `at` (seconds since the epoch), with [`LEEWAY`].
    pub fn holds_at(&self, at: u64) -> Result<(), Refused> {
        if at > self.expires_at.saturating_add(LEEWAY) {
            return Err(Refused::Token(ErrorKind::ExpiredSignature.into()));
        }
        if self.not_before > at.saturating_add(LEEWAY) {
            return Err(Refused::Token(ErrorKind::ImmatureSignature.into()));
        }
        Ok(())
    }
}
