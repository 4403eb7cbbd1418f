//! Secret parameter values, encrypted to the tower that runs them.
//!
//! The CLI seals each `secret: true` value to the recipients the served catalog lists for the
//! tower (or the target), bound to the command id, operation, target, parameter name, the
//! operator and the values of the other parameters.
//! Admission and the streams see ciphertext only; the agent opens it with one of its keys and
//! refuses a value sealed for another command or parameter. The cryptography is age
//! (age-encryption.org/v1) with X25519 recipients: recipients are written `age1…` and keys
//! `AGE-SECRET-KEY-1…`, so `age-keygen` and `rage` read and write the same files.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use age::secrecy::ExposeSecret;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::proto::{self, value::Kind as V};

/// The public half of `ops/examples/workloads.agekey`, the example catalog's key for the
/// workloads tower. That key is public: admission warns when a catalog lists it, and `rct dev`
/// puts a key of its own in its place.
pub const EXAMPLE_RECIPIENT: &str =
    "age1h8w2m3amcn8m9r4m4g9cdnhch3d74rtutexzgxjjtz08t9rk0dgsmwq8e5";

/// The largest sealed value admission accepts, in bytes: the value, its binding, and about
/// 200 bytes per recipient.
pub const MAX_SEALED: usize = 64 * 1024;

/// What a sealed value is for: it opens only for the same command, operation, target,
/// parameter, operator and other parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The command id (chosen by the CLI before it seals).
    pub command_id: String,
    /// `<tower>/<op>`.
    pub operation: String,
    /// The command's target (`_` on simple towers).
    pub target: String,
    /// The parameter's name.
    pub param: String,
    /// Who asks: the operator's subject (the certificate's `sub`).
    pub operator: String,
    /// [`params_digest`] of the command's parameters.
    pub params: Vec<u8>,
}

/// SHA-256 over the parameters that are not `secret` (name and encoded value each, in name
/// order): what a sealed value is bound to besides its command. `params` are the effective
/// ones (defaults applied), as the CLI checked them and as the command carries them.
pub fn params_digest<'a>(
    params: impl IntoIterator<Item = (&'a String, &'a proto::Value)>,
    secret: impl Fn(&str) -> bool,
) -> Vec<u8> {
    let sorted: BTreeMap<&String, &proto::Value> = params.into_iter().collect();
    let mut hash = Sha256::new();
    hash.update(b"rct sealed params v1\0");
    for (name, value) in sorted.into_iter().filter(|(n, _)| !secret(n)) {
        for part in [name.as_bytes(), &value.encode_to_vec()] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
    }
    hash.finalize().to_vec()
}

/// Why a sealed value could not be opened; each has a code for the `Failed` outcome.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// None of the agent's keys is among the recipients.
    #[error(
        "no key of this agent opens it: it was sealed to other recipients (a key rotated away, \
         or a catalog naming another agent's key); fire it again"
    )]
    NoKey,
    /// Not an age file, or changed after it was sealed.
    #[error("it is not a valid sealed value, or it was changed after it was sealed")]
    Tampered,
    /// Sealed for another command, parameter, operator or request.
    #[error("it was sealed for {sealed_for}, and this command's {} differ", .differs.join(", "))]
    Misbound {
        /// What it was sealed for, in words.
        sealed_for: String,
        /// What differs: `command id`, `operation`, `target`, `parameter`, `operator`,
        /// `other parameters`.
        differs: Vec<&'static str>,
    },
}

impl OpenError {
    /// The code of the `Failed` outcome.
    pub fn code(&self) -> &'static str {
        match self {
            OpenError::NoKey => "secret_undecryptable",
            OpenError::Tampered => "secret_tampered",
            OpenError::Misbound { .. } => "secret_misbound",
        }
    }
}

/// Whether `text` is an X25519 age recipient (`age1…`); the error says what is wrong.
pub fn check_recipient(text: &str) -> Result<(), String> {
    text.parse::<age::x25519::Recipient>()
        .map(|_| ())
        .map_err(|e| format!("{text:?} is not an age X25519 recipient (age1…): {e}"))
}

/// `value` encrypted to every one of `recipients`, for `binding`.
pub fn seal(
    recipients: &[String],
    binding: &Binding,
    value: &proto::Value,
) -> Result<proto::Value, String> {
    let parsed = recipients
        .iter()
        .map(|r| r.parse::<age::x25519::Recipient>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("a recipient of the tower does not parse: {e}"))?;
    let encryptor =
        age::Encryptor::with_recipients(parsed.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| format!("cannot encrypt to the tower's recipients: {e}"))?;
    let content = proto::SealedContent {
        command_id: binding.command_id.clone(),
        operation: binding.operation.clone(),
        target: binding.target.clone(),
        param: binding.param.clone(),
        value: Some(value.clone()),
        operator: binding.operator.clone(),
        params: binding.params.clone(),
    };
    let mut age = Vec::new();
    let mut writer = encryptor
        .wrap_output(&mut age)
        .map_err(|e| format!("cannot encrypt: {e}"))?;
    writer
        .write_all(&content.encode_to_vec())
        .and_then(|()| writer.finish().map(|_| ()))
        .map_err(|e| format!("cannot encrypt: {e}"))?;
    Ok(proto::Value {
        kind: Some(V::Sealed(proto::Sealed { age })),
    })
}

/// An agent's secret keys: every one it may open values with (the new and the old one while a
/// rotation is under way). `Debug` shows the public halves only.
#[derive(Default)]
pub struct Keys {
    identities: Vec<age::x25519::Identity>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("recipients", &self.recipients())
            .finish()
    }
}

impl Keys {
    /// One new key.
    pub fn generate() -> Self {
        Self {
            identities: vec![age::x25519::Identity::generate()],
        }
    }

    /// The keys of an identity file: one `AGE-SECRET-KEY-1…` a line; blank lines and `#`
    /// comments are skipped. The error names the line, never its content.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut identities = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let identity = line.parse::<age::x25519::Identity>().map_err(|_| {
                format!(
                    "line {} is not an age X25519 secret key (AGE-SECRET-KEY-1…)",
                    n + 1
                )
            })?;
            identities.push(identity);
        }
        if identities.is_empty() {
            return Err("it holds no key".into());
        }
        Ok(Self { identities })
    }

    /// Adds `other`'s keys.
    pub fn extend(&mut self, other: Keys) {
        self.identities.extend(other.identities);
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }

    /// The public halves (`age1…`), in order: what the catalog lists as the tower's recipients.
    pub fn recipients(&self) -> Vec<String> {
        self.identities
            .iter()
            .map(|i| i.to_public().to_string())
            .collect()
    }

    /// The keys as an identity file, each after a comment with its public half.
    pub fn to_file_text(&self) -> String {
        self.identities
            .iter()
            .map(|i| {
                format!(
                    "# public key: {}\n{}\n",
                    i.to_public(),
                    i.to_string().expose_secret()
                )
            })
            .collect()
    }

    /// Opens a sealed value for `binding`.
    pub fn open(
        &self,
        sealed: &proto::Sealed,
        binding: &Binding,
    ) -> Result<proto::Value, OpenError> {
        let decryptor =
            age::Decryptor::new_buffered(sealed.age.as_slice()).map_err(|_| OpenError::Tampered)?;
        let mut reader = decryptor
            .decrypt(self.identities.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => OpenError::NoKey,
                _ => OpenError::Tampered,
            })?;
        let mut plain = Vec::new();
        reader
            .read_to_end(&mut plain)
            .map_err(|_| OpenError::Tampered)?;
        let content =
            proto::SealedContent::decode(plain.as_slice()).map_err(|_| OpenError::Tampered)?;
        let fields = [
            ("command id", &content.command_id, &binding.command_id),
            ("operation", &content.operation, &binding.operation),
            ("target", &content.target, &binding.target),
            ("parameter", &content.param, &binding.param),
            ("operator", &content.operator, &binding.operator),
        ];
        let mut differs: Vec<&'static str> = fields
            .iter()
            .filter(|(_, sealed, here)| sealed != here)
            .map(|(what, _, _)| *what)
            .collect();
        if content.params != binding.params {
            differs.push("other parameters");
        }
        if !differs.is_empty() {
            return Err(OpenError::Misbound {
                sealed_for: format!(
                    "parameter {} of command {} ({} on {}, by {})",
                    content.param,
                    content.command_id,
                    content.operation,
                    content.target,
                    content.operator
                ),
                differs,
            });
        }
        content.value.ok_or(OpenError::Tampered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(param: &str) -> Binding {
        Binding {
            command_id: "01JCOMMAND".into(),
            operation: "workloads/set-secret".into(),
            target: "_".into(),
            param: param.into(),
            operator: "alice".into(),
            params: params_digest(&other(), |n| n == "value"),
        }
    }

    fn other() -> BTreeMap<String, proto::Value> {
        [
            ("namespace".to_owned(), text("shop")),
            ("value".to_owned(), text("hunter2")),
        ]
        .into()
    }

    fn text(s: &str) -> proto::Value {
        proto::Value {
            kind: Some(V::String(s.into())),
        }
    }

    fn sealed(value: &proto::Value) -> &proto::Sealed {
        match &value.kind {
            Some(V::Sealed(s)) => s,
            other => panic!("not sealed: {other:?}"),
        }
    }

    #[test]
    fn a_value_opens_with_any_recipient_key_and_holds_no_clear_text() {
        let (old, new) = (Keys::generate(), Keys::generate());
        let recipients = [old.recipients(), new.recipients()].concat();
        let value = seal(&recipients, &binding("value"), &text("hunter2")).unwrap();
        let age = &sealed(&value).age;
        assert!(!age.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            old.open(sealed(&value), &binding("value")),
            Ok(text("hunter2"))
        );
        assert_eq!(
            new.open(sealed(&value), &binding("value")),
            Ok(text("hunter2"))
        );
    }

    #[test]
    fn a_key_rotated_away_no_longer_opens_old_values() {
        let (old, new) = (Keys::generate(), Keys::generate());
        let value = seal(&old.recipients(), &binding("value"), &text("hunter2")).unwrap();
        assert_eq!(
            new.open(sealed(&value), &binding("value")),
            Err(OpenError::NoKey)
        );
    }

    #[test]
    fn a_changed_or_foreign_value_is_refused() {
        let keys = Keys::generate();
        let value = seal(&keys.recipients(), &binding("value"), &text("hunter2")).unwrap();
        let mut changed = sealed(&value).clone();
        let last = changed.age.len() - 1;
        changed.age[last] ^= 1;
        assert_eq!(
            keys.open(&changed, &binding("value")),
            Err(OpenError::Tampered)
        );
        let garbage = proto::Sealed {
            age: b"hunter2".to_vec(),
        };
        assert_eq!(
            keys.open(&garbage, &binding("value")),
            Err(OpenError::Tampered)
        );
        // Copied into another parameter, command, operator's request, or beside other
        // parameters: refused, saying what it was sealed for and what differs.
        let e = keys.open(sealed(&value), &binding("key")).unwrap_err();
        assert_eq!(e.code(), "secret_misbound");
        assert_eq!(
            e.to_string(),
            "it was sealed for parameter value of command 01JCOMMAND (workloads/set-secret \
             on _, by alice), and this command's parameter differ"
        );
        let mut elsewhere = binding("value");
        elsewhere.operator = "mallory".into();
        let mut params = other();
        params.insert("namespace".into(), text("mallory-ns"));
        elsewhere.params = params_digest(&params, |n| n == "value");
        elsewhere.command_id = "01JOTHER".into();
        let e = keys.open(sealed(&value), &elsewhere).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("this command's command id, operator, other parameters differ"),
            "{e}"
        );
    }

    #[test]
    fn the_params_digest_ignores_secrets_and_order_only() {
        let digest = |p: &BTreeMap<String, proto::Value>| params_digest(p, |n| n == "value");
        let mut changed_secret = other();
        changed_secret.insert("value".into(), text("other"));
        assert_eq!(digest(&other()), digest(&changed_secret));
        let mut changed = other();
        changed.insert("namespace".into(), text("shop2"));
        assert_ne!(digest(&other()), digest(&changed));
        let mut added = other();
        added.insert("extra".into(), text(""));
        assert_ne!(digest(&other()), digest(&added));
    }

    #[test]
    fn identity_files_round_trip_and_errors_never_show_a_key() {
        let keys = Keys::generate();
        let text_of = keys.to_file_text();
        let again = Keys::parse(&text_of).unwrap();
        assert_eq!(again.recipients(), keys.recipients());
        assert!(text_of.contains(&keys.recipients()[0]));
        let secret_line = text_of.lines().nth(1).unwrap().to_owned();
        let broken = format!("# comment\n\n{}X\n", secret_line);
        let e = Keys::parse(&broken).unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        assert!(!e.contains(&secret_line[..20]), "{e}");
        assert!(Keys::parse("# nothing\n").is_err());
        assert!(!format!("{keys:?}").contains("AGE-SECRET-KEY"));
    }

    proptest::proptest! {
        /// Whatever bytes arrive as a sealed value, opening them fails cleanly.
        #[test]
        fn arbitrary_bytes_never_open_and_never_panic(
            age in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        ) {
            let keys = Keys::generate();
            let sealed = proto::Sealed { age };
            proptest::prop_assert!(keys.open(&sealed, &binding("value")).is_err());
        }
    }

    #[test]
    fn the_example_key_is_the_one_the_example_catalog_names() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/");
        let key = std::fs::read_to_string(format!("{root}examples/workloads.agekey")).unwrap();
        assert_eq!(Keys::parse(&key).unwrap().recipients(), [EXAMPLE_RECIPIENT]);
        let catalog = std::fs::read_to_string(format!("{root}catalog.example.yaml")).unwrap();
        assert!(catalog.contains(EXAMPLE_RECIPIENT));
    }

    #[test]
    fn recipients_are_checked() {
        let keys = Keys::generate();
        assert!(check_recipient(&keys.recipients()[0]).is_ok());
        assert!(check_recipient("age1nope").is_err());
        assert!(seal(&[], &binding("value"), &text("x")).is_err());
    }
}
