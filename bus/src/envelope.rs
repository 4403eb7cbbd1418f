//! Signed envelopes: sign the exact bytes, verify before decoding.
//!
//! Bytes from the wire become an [`Unverified`] envelope; only a successful check against a
//! known key turns it into a [`Verified`] one, and only a `Verified` envelope gives access to
//! its body. The signature covers `rct/v1/<purpose>\n` followed by the body, so a signature
//! made for one purpose never passes for another.

use std::collections::HashMap;
use std::fmt;

use prost::Message;

use crate::{Error, KeyId, PublicKey, Result, proto};

/// What a signature is for.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Purpose {
    /// A `Submission`, signed by an operator's session key.
    Submission,
    /// A `Command`, signed by admission.
    Command,
    /// A stored event: its subject and payload (see [`crate::provenance`]).
    Event,
    /// An `AgentCertificate`, signed by admission.
    AgentCertificate,
    /// Anything this version does not know (an unset or newer purpose): never verifies.
    Unspecified,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Submission => "submission",
            Purpose::Command => "command",
            Purpose::Event => "event",
            Purpose::AgentCertificate => "agent-certificate",
            Purpose::Unspecified => "unspecified",
        }
    }

    pub(crate) fn to_proto(self) -> proto::Purpose {
        match self {
            Purpose::Submission => proto::Purpose::Submission,
            Purpose::Command => proto::Purpose::Command,
            Purpose::Event => proto::Purpose::Event,
            Purpose::AgentCertificate => proto::Purpose::AgentCertificate,
            Purpose::Unspecified => proto::Purpose::Unspecified,
        }
    }

    fn from_proto(value: i32) -> Self {
        match proto::Purpose::try_from(value) {
            Ok(proto::Purpose::Submission) => Purpose::Submission,
            Ok(proto::Purpose::Command) => Purpose::Command,
            Ok(proto::Purpose::Event) => Purpose::Event,
            Ok(proto::Purpose::AgentCertificate) => Purpose::AgentCertificate,
            Ok(proto::Purpose::Unspecified) | Err(_) => Purpose::Unspecified,
        }
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The bytes a signature covers: a domain-separation prefix, then the body.
pub(crate) fn signed_bytes(purpose: Purpose, body: &[u8]) -> Vec<u8> {
    let prefix = format!("rct/v1/{purpose}\n");
    let mut bytes = Vec::with_capacity(prefix.len() + body.len());
    bytes.extend_from_slice(prefix.as_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// An envelope as received: its body cannot be read until it is verified.
#[derive(Clone, Debug)]
pub struct Unverified(proto::SignedEnvelope);

impl Unverified {
    /// Decodes envelope bytes from the wire.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        proto::SignedEnvelope::decode(bytes)
            .map(Self)
            .map_err(|source| Error::Decode {
                what: "signed envelope",
                source,
            })
    }

    /// Wraps an envelope carried inside another message (a command's submission).
    pub fn from_proto(envelope: proto::SignedEnvelope) -> Self {
        Self(envelope)
    }

    /// Decodes the body without verifying it: only to name what was refused (the command id
    /// a refused envelope claims), never to act on it.
    pub fn peek<M: Message + Default>(&self) -> Option<M> {
        M::decode(self.0.body.as_slice()).ok()
    }

    /// The key the envelope claims to be signed with; unchecked.
    pub fn key_id(&self) -> &str {
        &self.0.key_id
    }

    /// The purpose the envelope claims; unchecked.
    pub fn purpose(&self) -> Purpose {
        Purpose::from_proto(self.0.purpose)
    }

    /// The operator certificate the envelope carries; unchecked. The caller verifies the
    /// certificate, then verifies the envelope with the key the certificate binds.
    pub fn certificate(&self) -> &str {
        &self.0.certificate
    }

    /// Verifies the envelope with one specific key (an operator's session key, bound by a
    /// certificate) for the expected purpose.
    pub fn verify_with(self, key: &PublicKey, expected: Purpose) -> Result<Verified> {
        if self.0.key_id != key.id().as_str() {
            return Err(Error::UntrustedKey {
                key_id: self.0.key_id,
            });
        }
        let found = self.purpose();
        if found != expected || found == Purpose::Unspecified {
            return Err(Error::WrongPurpose { expected, found });
        }
        key.verify_raw(&signed_bytes(found, &self.0.body), &self.0.signature)?;
        Ok(Verified {
            envelope: self.0,
            key_id: key.id().clone(),
            purpose: found,
        })
    }
}

/// An envelope whose signature has been checked against a known key.
#[derive(Clone, Debug)]
pub struct Verified {
    envelope: proto::SignedEnvelope,
    key_id: KeyId,
    purpose: Purpose,
}

impl Verified {
    /// The signed bytes, exactly as received.
    pub fn body(&self) -> &[u8] {
        &self.envelope.body
    }

    /// The key that signed.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// What the signature is for.
    pub fn purpose(&self) -> Purpose {
        self.purpose
    }

    /// The operator certificate carried with the envelope (empty for commands).
    pub fn certificate(&self) -> &str {
        &self.envelope.certificate
    }

    /// Decodes the body as `M`.
    pub fn decode<M: Message + Default>(&self) -> Result<M> {
        M::decode(self.body()).map_err(|source| Error::Decode {
            what: std::any::type_name::<M>(),
            source,
        })
    }

    /// The envelope as received, to embed in another message (admission keeps the
    /// operator's submission inside the command).
    pub fn into_proto(self) -> proto::SignedEnvelope {
        self.envelope
    }
}

/// Verifies envelopes against a set of trusted keys: several at once, so a new key can be
/// trusted before it signs and an old one retired after.
#[derive(Clone, Debug, Default)]
pub struct Verifier {
    keys: HashMap<KeyId, PublicKey>,
}

impl Verifier {
    /// A verifier that trusts exactly `keys`.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        let mut verifier = Self::default();
        for key in keys {
            verifier.trust(key);
        }
        verifier
    }

    /// Trusts one more key.
    pub fn trust(&mut self, key: PublicKey) {
        self.keys.insert(key.id().clone(), key);
    }

    /// Stops trusting a key; envelopes it signed no longer verify.
    pub fn retire(&mut self, id: &KeyId) -> Option<PublicKey> {
        self.keys.remove(id)
    }

    /// The trusted key with id `id`.
    pub fn key(&self, id: &str) -> Option<&PublicKey> {
        self.keys.get(id)
    }

    /// The ids of the trusted keys.
    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    /// Verifies `envelope` for `expected` with the trusted key it names.
    pub fn verify(&self, envelope: Unverified, expected: Purpose) -> Result<Verified> {
        let key = self
            .keys
            .get(envelope.key_id())
            .ok_or_else(|| Error::UntrustedKey {
                key_id: envelope.key_id().to_owned(),
            })?;
        envelope.verify_with(key, expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyPair;

    fn signed(key: &KeyPair) -> proto::SignedEnvelope {
        let body = proto::Submission {
            command_id: "01JQ0000000000000000000000".into(),
            operation: "traffic/drain-cluster".into(),
            justification: "SRE-101".into(),
            ..Default::default()
        }
        .encode_to_vec();
        key.sign(Purpose::Submission, body)
    }

    #[test]
    fn a_signed_envelope_verifies_and_decodes() {
        let key = KeyPair::generate();
        let wire = signed(&key).encode_to_vec();
        let verified = Verifier::new([key.public().clone()])
            .verify(Unverified::decode(&wire).unwrap(), Purpose::Submission)
            .unwrap();
        assert_eq!(verified.key_id(), key.id());
        let submission: proto::Submission = verified.decode().unwrap();
        assert_eq!(submission.justification, "SRE-101");
    }

    /// Every single-byte change of body, signature or key id is caught, whatever the byte
    /// becomes.
    #[test]
    fn every_single_byte_mutation_fails() {
        let key = KeyPair::generate();
        let verifier = Verifier::new([key.public().clone()]);
        let original = signed(&key);
        let mut checked = 0;
        for field in ["body", "signature", "key_id"] {
            let len = match field {
                "body" => original.body.len(),
                "signature" => original.signature.len(),
                _ => original.key_id.len(),
            };
            for i in 0..len {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut env = original.clone();
                    match field {
                        "body" => env.body[i] ^= flip,
                        "signature" => env.signature[i] ^= flip,
                        _ => {
                            let mut bytes = env.key_id.into_bytes();
                            bytes[i] ^= flip;
                            env.key_id = String::from_utf8_lossy(&bytes).into_owned();
                        }
                    }
                    let result = verifier.verify(Unverified::from_proto(env), Purpose::Submission);
                    assert!(result.is_err(), "{field}[{i}] ^ {flip:#x} verified");
                    checked += 1;
                }
            }
        }
        assert!(checked > 64 * 3, "only {checked} mutations tried");
    }

    #[test]
    fn untrusted_keys_wrong_purposes_and_rotation() {
        let old = KeyPair::generate();
        let new = KeyPair::generate();
        let stranger = KeyPair::generate();
        let mut verifier = Verifier::new([old.public().clone(), new.public().clone()]);

        let from_stranger = Unverified::from_proto(signed(&stranger));
        assert!(matches!(
            verifier.verify(from_stranger, Purpose::Submission),
            Err(Error::UntrustedKey { .. })
        ));

        // The purpose is signed: relabelling a submission as a command breaks the signature,
        // and asking for a command when a submission was signed is refused outright.
        let mut relabelled = signed(&old);
        relabelled.purpose = proto::Purpose::Command as i32;
        assert!(matches!(
            verifier.verify(Unverified::from_proto(relabelled), Purpose::Command),
            Err(Error::BadSignature { .. })
        ));
        assert!(matches!(
            verifier.verify(Unverified::from_proto(signed(&old)), Purpose::Command),
            Err(Error::WrongPurpose { .. })
        ));

        // Both keys verify during a rotation; the retired one stops verifying.
        for key in [&old, &new] {
            verifier
                .verify(Unverified::from_proto(signed(key)), Purpose::Submission)
                .unwrap();
        }
        verifier.retire(old.id());
        assert!(matches!(
            verifier.verify(Unverified::from_proto(signed(&old)), Purpose::Submission),
            Err(Error::UntrustedKey { .. })
        ));
    }

    #[test]
    fn verify_with_checks_the_bound_key() {
        let session = KeyPair::generate();
        let other = KeyPair::generate();
        let env = Unverified::from_proto(signed(&session));
        assert!(matches!(
            env.clone().verify_with(other.public(), Purpose::Submission),
            Err(Error::UntrustedKey { .. })
        ));
        env.verify_with(session.public(), Purpose::Submission)
            .unwrap();
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(matches!(
            Unverified::decode(&[0xff, 0xff, 0xff]),
            Err(Error::Decode { .. })
        ));
    }
}
