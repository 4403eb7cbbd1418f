//! Ed25519 keys: operators' session keys and admission's command-signing keys.

use std::fmt;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::envelope::{Purpose, signed_bytes};
use crate::{Error, Result, proto};

/// Names a public key: `ed25519:` and the first 8 bytes of SHA-256(public key) in hex.
///
/// An id only selects a key; trust comes from the verifier's key set, never from the id.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(String);

impl KeyId {
    fn of(key: &VerifyingKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self(format!("ed25519:{hex}"))
    }

    /// The id as written in envelopes.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `text` has the form of a key id (`ed25519:` and 16 lower-case hex digits):
    /// what an envelope claims is recorded and quoted only then.
    pub fn is_well_formed(text: &str) -> bool {
        text.strip_prefix("ed25519:").is_some_and(|hex| {
            hex.len() == 16
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    }
}

// Hash and Eq of `KeyId` are those of its string, so maps keyed by `KeyId` can be searched
// with the `&str` an envelope carries.
impl std::borrow::Borrow<str> for KeyId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A public key that verifies signatures, with its [`KeyId`].
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    /// Reads a raw 32-byte Ed25519 public key.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bytes: &[u8; 32] = bytes.try_into().map_err(|_| Error::InvalidKey {
            reason: format!("an Ed25519 public key has 32 bytes, not {}", bytes.len()),
        })?;
        let key = VerifyingKey::from_bytes(bytes).map_err(|e| Error::InvalidKey {
            reason: e.to_string(),
        })?;
        Ok(Self::from(key))
    }

    /// Reads a `PUBLIC KEY` PEM (SubjectPublicKeyInfo).
    pub fn from_pem(pem: &str) -> Result<Self> {
        VerifyingKey::from_public_key_pem(pem)
            .map(Self::from)
            .map_err(|e| Error::InvalidKey {
                reason: format!("not an Ed25519 public key PEM: {e}"),
            })
    }

    /// Reads every `PUBLIC KEY` PEM block of `text` (a bundle, as during a key rotation);
    /// an error if any block is not an Ed25519 public key or there is none.
    pub fn all_from_pem(text: &str) -> Result<Vec<Self>> {
        const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
        const END: &str = "-----END PUBLIC KEY-----";
        let mut keys = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find(BEGIN) {
            let end = rest[start..].find(END).ok_or_else(|| Error::InvalidKey {
                reason: "a PUBLIC KEY block has no END line".into(),
            })? + start
                + END.len();
            keys.push(Self::from_pem(&rest[start..end])?);
            rest = &rest[end..];
        }
        if keys.is_empty() {
            return Err(Error::InvalidKey {
                reason: "no PUBLIC KEY block".into(),
            });
        }
        Ok(keys)
    }

    /// Writes a `PUBLIC KEY` PEM.
    pub fn to_pem(&self) -> String {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .expect("encoding a valid Ed25519 public key cannot fail")
    }

    /// The raw 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The key's id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// Strict Ed25519 verification of `signature` over `message`, as it is (no purpose
    /// prefix: see [`crate::Verifier`] for envelopes).
    pub fn verify_raw(&self, message: &[u8], signature: &[u8]) -> Result<()> {
        let bad = || Error::BadSignature {
            key_id: self.id.to_string(),
        };
        let signature = ed25519_dalek::Signature::from_slice(signature).map_err(|_| bad())?;
        self.key
            .verify_strict(message, &signature)
            .map_err(|_| bad())
    }
}

impl From<VerifyingKey> for PublicKey {
    fn from(key: VerifyingKey) -> Self {
        let id = KeyId::of(&key);
        Self { key, id }
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PublicKey").field(&self.id).finish()
    }
}

/// A signing key with its public half. `Debug` never shows the secret.
pub struct KeyPair {
    signing: SigningKey,
    public: PublicKey,
}

impl KeyPair {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        Self::from(SigningKey::generate(&mut rand_core::OsRng))
    }

    /// Reads a `PRIVATE KEY` PEM (PKCS#8).
    pub fn from_pem(pem: &str) -> Result<Self> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self::from)
            .map_err(|e| Error::InvalidKey {
                reason: format!("not an Ed25519 private key PEM (PKCS#8): {e}"),
            })
    }

    /// Writes a `PRIVATE KEY` PEM (PKCS#8). Store it with mode 0600.
    pub fn to_pem(&self) -> String {
        self.signing
            .to_pkcs8_pem(LineEnding::LF)
            .expect("encoding a valid Ed25519 private key cannot fail")
            .to_string()
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Another key, derived from this one for `label`: the same for every holder of this key
    /// (so every replica derives it), and no signature by one verifies with the other.
    pub fn derive(&self, label: &str) -> Self {
        use sha2::{Digest, Sha256};
        let seed: [u8; 32] = Sha256::new()
            .chain_update(b"rct/v1/derived-key\n")
            .chain_update(label.as_bytes())
            .chain_update(b"\n")
            .chain_update(self.signing.to_bytes())
            .finalize()
            .into();
        Self::from(SigningKey::from_bytes(&seed))
    }

    /// The key's id.
    pub fn id(&self) -> &KeyId {
        self.public.id()
    }

    /// Signs `message` as it is (the caller has prefixed it with its purpose).
    pub(crate) fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// Signs `body` (an encoded message, never re-encoded afterwards) for `purpose`.
    pub fn sign(&self, purpose: Purpose, body: Vec<u8>) -> proto::SignedEnvelope {
        let signature = self.signing.sign(&signed_bytes(purpose, &body));
        proto::SignedEnvelope {
            body,
            key_id: self.id().to_string(),
            signature: signature.to_bytes().to_vec(),
            purpose: purpose.to_proto() as i32,
            certificate: String::new(),
        }
    }
}

impl From<SigningKey> for KeyPair {
    fn from(signing: SigningKey) -> Self {
        let public = PublicKey::from(signing.verifying_key());
        Self { signing, public }
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("id", self.id())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bundle_holds_several_public_keys() {
        let (a, b) = (KeyPair::generate(), KeyPair::generate());
        let bundle = format!(
            "# old\n{}\n# new\n{}",
            a.public().to_pem(),
            b.public().to_pem()
        );
        let keys = PublicKey::all_from_pem(&bundle).unwrap();
        assert_eq!(keys, [a.public().clone(), b.public().clone()]);
        assert!(PublicKey::all_from_pem("nothing here").is_err());
        let broken = format!("{}-----BEGIN PUBLIC KEY-----\nAAAA", a.public().to_pem());
        assert!(PublicKey::all_from_pem(&broken).is_err());
    }

    use super::*;

    #[test]
    fn keys_survive_pem_round_trips() {
        let key = KeyPair::generate();
        let again = KeyPair::from_pem(&key.to_pem()).unwrap();
        assert_eq!(again.public(), key.public());
        let public = PublicKey::from_pem(&key.public().to_pem()).unwrap();
        assert_eq!(&public, key.public());
        assert_eq!(
            PublicKey::from_bytes(&key.public().to_bytes()).unwrap(),
            public
        );
    }

    #[test]
    fn key_ids_are_stable_and_distinct() {
        let a = KeyPair::generate();
        let b = KeyPair::generate();
        assert_ne!(a.id(), b.id());
        assert!(a.id().as_str().starts_with("ed25519:"));
        assert_eq!(a.id().as_str().len(), "ed25519:".len() + 16);
        assert_eq!(KeyPair::from_pem(&a.to_pem()).unwrap().id(), a.id());
    }

    #[test]
    fn bad_key_material_is_refused() {
        assert!(matches!(
            KeyPair::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            Err(Error::InvalidKey { .. })
        ));
        assert!(matches!(
            PublicKey::from_bytes(&[1, 2, 3]),
            Err(Error::InvalidKey { .. })
        ));
        assert!(!format!("{:?}", KeyPair::generate()).contains("signing"));
    }
}
