//! The operator's session: an Ed25519 key made at login and the certificate admission issued
//! for it, stored per context with mode 0600.

use rct_bus::KeyPair;
use serde::{Deserialize, Serialize};

use crate::exit::{Error, Result};
use crate::home::{Home, write_private};

/// Who the certificate says we are (for display; admission verifies the certificate itself).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    /// The identity provider's subject.
    pub subject: String,
    /// Email.
    pub email: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Certificate expiry, seconds since the epoch.
    pub expires_at: u64,
}

/// A logged-in session.
#[derive(Debug)]
pub struct Session {
    /// The session key submissions are signed with.
    pub key: KeyPair,
    /// The operator certificate.
    pub certificate: String,
    /// What the certificate says.
    pub identity: Identity,
}

impl Session {
    /// `submission`, signed with the session key and carrying the certificate.
    pub fn sign(&self, submission: &rct_bus::proto::Submission) -> rct_bus::proto::SignedEnvelope {
        use prost::Message as _;
        let mut envelope = self
            .key
            .sign(rct_bus::Purpose::Submission, submission.encode_to_vec());
        envelope.certificate = self.certificate.clone();
        envelope
    }

    /// Stores the session for `context`.
    pub fn save(&self, home: &Home, context: &str) -> Result<()> {
        let dir = home.context_dir(context);
        write_private(&dir.join("session.key"), self.key.to_pem().as_bytes())?;
        write_private(&dir.join("certificate"), self.certificate.as_bytes())?;
        let identity = serde_json::to_vec_pretty(&self.identity).expect("identity serializes");
        write_private(&dir.join("identity.json"), &identity)
    }

    /// Removes the stored session of `context`; whether there was one.
    pub fn remove(home: &Home, context: &str) -> Result<bool> {
        let dir = home.context_dir(context);
        let mut removed = false;
        for name in ["session.key", "certificate", "identity.json"] {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::usage(format!(
                        "cannot remove {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        Ok(removed)
    }

    /// The stored session of `context`, refusing an expired one with the way out.
    pub fn load(home: &Home, context: &str) -> Result<Self> {
        let dir = home.context_dir(context);
        let read = |name: &str| std::fs::read_to_string(dir.join(name));
        let (Ok(pem), Ok(certificate), Ok(identity)) = (
            read("session.key"),
            read("certificate"),
            read("identity.json"),
        ) else {
            return Err(Error::usage(format!(
                "not logged in to context {context}: run rct login"
            )));
        };
        let key = KeyPair::from_pem(&pem).map_err(|e| {
            Error::usage(format!(
                "the stored session key is unusable ({e}): run rct login"
            ))
        })?;
        let identity: Identity = serde_json::from_str(&identity)
            .map_err(|_| Error::usage("the stored session is unreadable: run rct login"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if identity.expires_at <= now {
            return Err(Error::usage(format!(
                "your session for {} expired at {}: run rct login",
                identity.email,
                crate::render::time(identity.expires_at as i64)
            )));
        }
        Ok(Self {
            key,
            certificate: certificate.trim().to_owned(),
            identity,
        })
    }
}
