//! Who wrote a stored event, checkable later by anyone who trusts admission's keys.
//!
//! Admission signs the events it writes with its own key. An agent signs with a key of its
//! own, made when it starts and never written down, that admission certified for one tower
//! and target when the agent enrolled on `rct.auth.enrol.<tower>.<target>` (a subject only
//! that target's agent may publish on). The signature travels in the stored message's
//! [`HEADER`] and covers the subject and the payload, so an event copied to another subject
//! (another target, another kind, another command) no longer verifies.
//!
//! A reader asks [`Trust::check`]: an event is [`Provenance::Verified`] only when it is signed
//! by a trusted admission key, or by an agent key whose certificate is signed by a trusted
//! admission key, names the event's tower and target, was valid when the server stored the
//! event, and the event's kind is one agents write. Anything else is [`Provenance::Unsigned`]
//! or [`Provenance::Forged`]: shown, flagged, never obeyed or counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use prost::Message as _;

use crate::envelope::signed_bytes;
use crate::{EventKind, KeyPair, PublicKey, Purpose, Target, Tower, Unverified, Verifier, proto};

/// The header of a stored event that holds its signature: base64 of a `proto::EventSignature`.
pub const HEADER: &str = "Rct-Signature";

/// How far a certificate's validity stretches either way, for clocks a little apart (the
/// server's store time against admission's clock).
pub const CERTIFICATE_LEEWAY: Duration = Duration::from_secs(60);

/// The longest life an agent certificate may have (`agent_certificate_ttl` at most); one
/// from a retired admission key claiming longer does not verify. It bounds what a leaked
/// retired key can still sign: a certificate dated before the key's retirement holds at most
/// this long after it.
pub const MAX_CERTIFICATE_LIFE: Duration = Duration::from_secs(24 * 3600);

/// The bytes an event's signature covers.
fn event_bytes(subject: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(subject.len() + 1 + payload.len());
    body.extend_from_slice(subject.as_bytes());
    body.push(b'\n');
    body.extend_from_slice(payload);
    signed_bytes(Purpose::Event, &body)
}

/// Text from a signature, made safe and short to show.
fn shown(text: &str) -> String {
    let short: String = text.chars().take(128).collect();
    crate::text::printable(&short).into_owned()
}

/// Signs the events one writer publishes: admission, or an agent with its certificate (which
/// it renews: every holder of the signer signs with the newest).
pub struct Signer {
    current: RwLock<Option<Arc<Signing>>>,
}

struct Signing {
    key: KeyPair,
    certificate: Option<proto::SignedEnvelope>,
    /// An agent certificate's life, from when it came: nothing is signed after it (it would
    /// not verify).
    life: Option<Life>,
}

/// A certificate's life from when it came, told by elapsed time, never by the wall clock's
/// reading (this machine's may be off admission's): it has run out once either the monotonic
/// clock or the wall clock says so (the monotonic clock stands still while the machine
/// sleeps; the wall clock does not).
#[derive(Clone, Copy, Debug)]
struct Life {
    came: Instant,
    came_wall: SystemTime,
    lasts: Duration,
}

impl Life {
    /// The life of the certificate in `envelope`, just issued (read without checking it:
    /// readers do).
    fn of(envelope: &proto::SignedEnvelope) -> Self {
        let certificate: Option<proto::AgentCertificate> =
            Unverified::from_proto(envelope.clone()).peek();
        let time = |t: Option<prost_types::Timestamp>| t.and_then(|t| SystemTime::try_from(t).ok());
        let lasts = certificate
            .and_then(|c| time(c.not_after)?.duration_since(time(c.not_before)?).ok())
            .unwrap_or_default();
        Self {
            came: Instant::now(),
            came_wall: SystemTime::now(),
            lasts,
        }
    }

    /// How long it has run, by whichever clock says longer.
    fn elapsed(&self) -> Duration {
        let wall = SystemTime::now()
            .duration_since(self.came_wall)
            .unwrap_or_default();
        self.came.elapsed().max(wall)
    }

    fn over(&self) -> bool {
        self.elapsed() > self.lasts
    }
}

impl Signer {
    /// Admission's own events.
    pub fn admission(key: KeyPair) -> Self {
        Self::of(key, None)
    }

    /// An agent's events, with `key` and the certificate admission issued for it.
    pub fn agent(key: KeyPair, certificate: proto::SignedEnvelope) -> Self {
        Self::of(key, Some(certificate))
    }

    /// An agent's, before admission certified its key: it signs nothing yet.
    pub fn unenrolled() -> Self {
        Self {
            current: RwLock::new(None),
        }
    }

    fn of(key: KeyPair, certificate: Option<proto::SignedEnvelope>) -> Self {
        let life = certificate.as_ref().map(Life::of);
        Self {
            current: RwLock::new(Some(Arc::new(Signing {
                key,
                certificate,
                life,
            }))),
        }
    }

    /// Signs from now on with `key` and its new `certificate`.
    pub fn renew(&self, key: KeyPair, certificate: proto::SignedEnvelope) {
        let next = Arc::new(Signing {
            life: Some(Life::of(&certificate)),
            key,
            certificate: Some(certificate),
        });
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(next);
    }

    /// How long the certificate in force has left (by [`Signer::sign`]'s clocks); `None`
    /// for admission, or before an agent is certified.
    pub fn left(&self) -> Option<Duration> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        let life = current.as_ref()?.life?;
        Some(life.lasts.saturating_sub(life.elapsed()))
    }

    /// The whole life of the certificate in force; `None` as for [`Signer::left`].
    pub fn life(&self) -> Option<Duration> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        Some(current.as_ref()?.life?.lasts)
    }

    /// The admission key that signed the certificate in force, if any.
    pub fn issuer(&self) -> Option<String> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        Some(current.as_ref()?.certificate.as_ref()?.key_id.clone())
    }

    /// The [`HEADER`] value for an event on `subject` with `payload`; `None` before an
    /// agent's key is certified, or once its certificate ran out (by this clock).
    pub fn sign(&self, subject: &str, payload: &[u8]) -> Option<String> {
        let current = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        if current.life.is_some_and(|life| life.over()) {
            return None;
        }
        let signature = proto::EventSignature {
            key_id: current.key.id().to_string(),
            signature: current
                .key
                .sign_raw(&event_bytes(subject, payload))
                .to_vec(),
            certificate: current.certificate.clone(),
        };
        Some(STANDARD.encode(signature.encode_to_vec()))
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("Signer")
            .field("key", &current.as_ref().map(|c| c.key.id().clone()))
            .field(
                "agent",
                &current.as_ref().is_some_and(|c| c.certificate.is_some()),
            )
            .finish()
    }
}

/// Admission's certificate for an agent key: it may write the agent kinds of events of
/// `tower` and `target` (as events name it) between `not_before` and `not_after`.
pub fn certify(
    admission: &KeyPair,
    tower: &Tower,
    target: &Target,
    agent: &str,
    key: &PublicKey,
    not_before: SystemTime,
    not_after: SystemTime,
) -> proto::SignedEnvelope {
    let certificate = proto::AgentCertificate {
        tower: tower.to_string(),
        target: target.to_string(),
        agent: agent.to_owned(),
        public_key: key.to_bytes().to_vec(),
        not_before: Some(not_before.into()),
        not_after: Some(not_after.into()),
    };
    admission.sign(Purpose::AgentCertificate, certificate.encode_to_vec())
}

/// Who wrote an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Author {
    /// Admission.
    Admission,
    /// An agent certified for the event's tower and target: its instance.
    Agent(String),
}

/// What a reader knows of who wrote an event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Provenance {
    /// Not checked (a reader without admission's keys: a benchmark).
    #[default]
    Unchecked,
    /// Signed by someone entitled to write it.
    Verified(Author),
    /// It carries no signature, and was stored before events were signed (see
    /// [`Trust::signed_from`]): counted, as all history from then is.
    Legacy,
    /// It carries no signature.
    Unsigned,
    /// Its signature does not hold: why.
    Forged(String),
}

impl Provenance {
    /// Whether the event may count as what it says (decide, claim, end, cancel): verified, or
    /// read by a reader that does not check.
    pub fn counts(&self) -> bool {
        matches!(
            self,
            Provenance::Unchecked | Provenance::Verified(_) | Provenance::Legacy
        )
    }

    /// This provenance for `event`, decoded: a claim an agent signed counts only in the name
    /// of the instance its certificate names (one agent of a target cannot claim a command in
    /// another's name, which would have that one resume it).
    pub fn for_event(self, event: &proto::Event) -> Self {
        match (&self, event.kind.as_ref()) {
            (
                Provenance::Verified(Author::Agent(agent)),
                Some(proto::event::Kind::Started(started)),
            ) if started.agent != *agent => Provenance::Forged(format!(
                "a claim in the name of {} signed by agent {agent}",
                shown(&started.agent)
            )),
            _ => self,
        }
    }

    /// Why it does not count, for people; `None` if it counts.
    pub fn doubt(&self) -> Option<String> {
        match self {
            Provenance::Unchecked | Provenance::Verified(_) | Provenance::Legacy => None,
            Provenance::Unsigned => Some("it is not signed".into()),
            Provenance::Forged(why) => Some(why.clone()),
        }
    }
}

/// An agent certificate, checked once.
#[derive(Clone, Debug)]
struct Certified {
    tower: String,
    target: String,
    agent: String,
    key: PublicKey,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// Certificates that checked out, remembered by the digest of their whole envelope: agents
/// sign every event with the same one. Failures are not remembered: a writer cannot make a
/// good certificate read as bad by sending a bad one like it first.
const CERTIFICATES_REMEMBERED: usize = 4096;

/// Checks who wrote events, trusting admission's keys.
#[derive(Debug)]
pub struct Trust {
    admission: Verifier,
    /// Admission keys retired for good, with when: nothing they signed after counts.
    retired: HashMap<String, SystemTime>,
    /// The first stream sequence from which every event is signed.
    signed_from: Option<u64>,
    certificates: Mutex<HashMap<[u8; 32], Certified>>,
}

impl Trust {
    /// Trusts events signed by these admission keys, or by agents they certified.
    pub fn new(admission: Verifier) -> Self {
        Self {
            admission,
            retired: HashMap::new(),
            signed_from: None,
            certificates: Mutex::default(),
        }
    }

    /// Events stored before stream sequence `first` were written before events were signed:
    /// unsigned, they read as [`Provenance::Legacy`] (a sequence is never reused, so nothing
    /// written since can pass for one of them).
    pub fn signed_from(mut self, first: Option<u64>) -> Self {
        self.signed_from = first;
        self
    }

    /// [`Trust::check`] of the event at stream `sequence`: unsigned before
    /// [`Trust::signed_from`], it is [`Provenance::Legacy`].
    pub fn check_at(
        &self,
        sequence: u64,
        place: (&Tower, &Target, EventKind),
        subject: &str,
        payload: &[u8],
        signature: Option<&str>,
        stored: SystemTime,
    ) -> Provenance {
        match self.check(place, subject, payload, signature, stored) {
            Provenance::Unsigned if self.signed_from.is_some_and(|first| sequence < first) => {
                Provenance::Legacy
            }
            other => other,
        }
    }

    /// Trusts also `retired` admission keys, each for what it signed until it was retired:
    /// an event stored later, or an agent certificate that begins later, does not verify
    /// with it (a retired key that leaks forges nothing new).
    pub fn with_retired(
        mut self,
        retired: impl IntoIterator<Item = (PublicKey, SystemTime)>,
    ) -> Self {
        for (key, at) in retired {
            self.retired.insert(key.id().to_string(), at);
            self.admission.trust(key);
        }
        self
    }

    /// Why a signature by admission key `key_id` made at `at` does not count, if it does not.
    fn past_retirement(&self, key_id: &str, at: SystemTime) -> Option<String> {
        let retired = *self.retired.get(key_id)?;
        (at > retired).then(|| {
            format!(
                "signed with admission key {} after it was retired ({})",
                shown(key_id),
                humantime::format_rfc3339_seconds(retired)
            )
        })
    }

    /// Who wrote the event stored on `subject` (its `tower`, `target` and `kind`) with
    /// `payload` and the [`HEADER`] value `signature`, stored by the server at `stored`.
    pub fn check(
        &self,
        (tower, target, kind): (&Tower, &Target, EventKind),
        subject: &str,
        payload: &[u8],
        signature: Option<&str>,
        stored: SystemTime,
    ) -> Provenance {
        let Some(signature) = signature else {
            return Provenance::Unsigned;
        };
        let Some(signature) = STANDARD
            .decode(signature.trim())
            .ok()
            .and_then(|bytes| proto::EventSignature::decode(bytes.as_slice()).ok())
        else {
            return Provenance::Forged("its signature header does not read".into());
        };
        let (key, author) = match &signature.certificate {
            None => match self.admission.key(&signature.key_id) {
                Some(key) => {
                    if let Some(why) = self.past_retirement(&signature.key_id, stored) {
                        return Provenance::Forged(why);
                    }
                    (key.clone(), Author::Admission)
                }
                None => {
                    return Provenance::Forged(format!(
                        "signed by key {:?}, which is not admission's, without a certificate",
                        shown(&signature.key_id)
                    ));
                }
            },
            Some(certificate) => {
                let certified = match self.certified(certificate) {
                    Ok(c) => c,
                    Err(why) => return Provenance::Forged(why),
                };
                if let Some(why) = self.past_retirement(&certificate.key_id, certified.not_before) {
                    return Provenance::Forged(format!("its agent certificate is {why}"));
                }
                if certified.tower != tower.as_str() || certified.target != target.as_str() {
                    return Provenance::Forged(format!(
                        "signed by agent {} certified for {}/{}, not {tower}/{target}",
                        certified.agent, certified.tower, certified.target
                    ));
                }
                if !kind.is_written_by_agents() {
                    return Provenance::Forged(format!(
                        "signed by agent {}: agents do not write {kind} events",
                        certified.agent
                    ));
                }
                let valid = certified.not_before.checked_sub(CERTIFICATE_LEEWAY)
                    ..=certified.not_after.checked_add(CERTIFICATE_LEEWAY);
                if valid.start().is_some_and(|start| stored < start)
                    || valid.end().is_some_and(|end| stored > end)
                {
                    return Provenance::Forged(format!(
                        "signed by agent {} with a certificate not valid when it was stored",
                        certified.agent
                    ));
                }
                if certified.key.id().as_str() != signature.key_id {
                    return Provenance::Forged(format!(
                        "signed by another key than agent {}'s certificate names",
                        certified.agent
                    ));
                }
                (certified.key.clone(), Author::Agent(certified.agent))
            }
        };
        match key.verify_raw(&event_bytes(subject, payload), &signature.signature) {
            Ok(()) => Provenance::Verified(author),
            Err(_) => Provenance::Forged(match author {
                Author::Admission => "admission's signature does not verify".into(),
                Author::Agent(agent) => format!("agent {agent}'s signature does not verify"),
            }),
        }
    }

    /// The certificate, checked against admission's keys (once per certificate that holds).
    fn certified(&self, envelope: &proto::SignedEnvelope) -> Result<Certified, String> {
        use sha2::{Digest, Sha256};
        let digest: [u8; 32] = Sha256::digest(envelope.encode_to_vec()).into();
        let remembered = || self.certificates.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = remembered().get(&digest) {
            return Ok(known.clone());
        }
        let checked = self.certify_check(envelope)?;
        let mut known = remembered();
        if known.len() >= CERTIFICATES_REMEMBERED {
            known.clear();
        }
        known.insert(digest, checked.clone());
        Ok(checked)
    }

    fn certify_check(&self, envelope: &proto::SignedEnvelope) -> Result<Certified, String> {
        let certificate: proto::AgentCertificate = self
            .admission
            .verify(
                Unverified::from_proto(envelope.clone()),
                Purpose::AgentCertificate,
            )
            .and_then(|v| v.decode())
            .map_err(|e| format!("its agent certificate is not admission's ({e})"))?;
        let time = |t: Option<prost_types::Timestamp>| {
            t.and_then(|t| SystemTime::try_from(t).ok())
                .ok_or_else(|| "its agent certificate has no validity".to_owned())
        };
        let (not_before, not_after) = (time(certificate.not_before)?, time(certificate.not_after)?);
        // What a retired key may have signed is bounded: it could be leaked and date a
        // certificate before its retirement.
        if self.retired.contains_key(&envelope.key_id)
            && not_after
                .duration_since(not_before)
                .is_ok_and(|life| life > MAX_CERTIFICATE_LIFE)
        {
            return Err(format!(
                "its agent certificate, from a retired admission key, claims a life longer \
                 than {} (admission issues none longer)",
                humantime::format_duration(MAX_CERTIFICATE_LIFE)
            ));
        }
        Ok(Certified {
            key: PublicKey::from_bytes(&certificate.public_key)
                .map_err(|e| format!("its agent certificate holds no key ({e})"))?,
            not_before,
            not_after,
            tower: certificate.tower,
            target: certificate.target,
            agent: shown(&certificate.agent),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct World {
        admission: KeyPair,
        trust: Trust,
        tower: Tower,
        prod1: Target,
        now: SystemTime,
    }

    fn world() -> World {
        let admission = KeyPair::generate();
        World {
            trust: Trust::new(Verifier::new([admission.public().clone()])),
            admission,
            tower: Tower::new("traffic").unwrap(),
            prod1: Target::new("prod-1").unwrap(),
            now: SystemTime::now(),
        }
    }

    impl World {
        fn agent(&self, target: &Target) -> Signer {
            let key = KeyPair::generate();
            let hour = Duration::from_secs(3600);
            let certificate = certify(
                &self.admission,
                &self.tower,
                target,
                "prod-1-a1-01abc",
                key.public(),
                self.now - hour,
                self.now + hour,
            );
            Signer::agent(key, certificate)
        }

        fn check(&self, kind: EventKind, subject: &str, signature: Option<&str>) -> Provenance {
            self.trust.check(
                (&self.tower, &self.prod1, kind),
                subject,
                b"payload",
                signature,
                self.now,
            )
        }
    }

    const SUBJECT: &str = "rct.evt.traffic.prod-1.01JQ0000000000000000000000.outcome";

    #[test]
    fn admission_and_a_certified_agent_verify() {
        let w = world();
        let admission = Signer::admission(KeyPair::from_pem(&w.admission.to_pem()).unwrap());
        let decision = "rct.evt.traffic.prod-1.01JQ0000000000000000000000.decision";
        let sig = admission.sign(decision, b"payload").unwrap();
        assert_eq!(
            w.check(EventKind::Decision, decision, Some(&sig)),
            Provenance::Verified(Author::Admission)
        );
        let sig = w.agent(&w.prod1).sign(SUBJECT, b"payload").unwrap();
        assert_eq!(
            w.check(EventKind::Outcome, SUBJECT, Some(&sig)),
            Provenance::Verified(Author::Agent("prod-1-a1-01abc".into()))
        );
    }

    /// Every way an event can fail to be what it says: none verifies, each says why.
    #[test]
    fn what_is_not_signed_by_its_entitled_writer_does_not_count() {
        let w = world();
        let agent = w.agent(&w.prod1);
        let good = agent.sign(SUBJECT, b"payload").unwrap();
        assert_eq!(
            w.check(EventKind::Outcome, SUBJECT, None),
            Provenance::Unsigned
        );
        let forged = |p: Provenance, why: &str| match p {
            Provenance::Forged(said) => assert!(said.contains(why), "{said:?} lacks {why:?}"),
            other => panic!("{other:?} is not forged ({why})"),
        };
        forged(
            w.check(EventKind::Outcome, SUBJECT, Some("%%%")),
            "does not read",
        );
        // Another payload, another subject (a copy moved to another command's slot).
        forged(
            w.trust.check(
                (&w.tower, &w.prod1, EventKind::Outcome),
                SUBJECT,
                b"payload2",
                Some(&good),
                w.now,
            ),
            "does not verify",
        );
        let other = SUBJECT.replace("01JQ0000000000000000000000", "01JQ0000000000000000000001");
        forged(
            w.check(EventKind::Outcome, &other, Some(&good)),
            "does not verify",
        );
        // An agent of prod-2 writing at prod-1; an agent writing a decision.
        let prod2 = w.agent(&Target::new("prod-2").unwrap());
        forged(
            w.check(
                EventKind::Outcome,
                SUBJECT,
                prod2.sign(SUBJECT, b"payload").as_deref(),
            ),
            "certified for traffic/prod-2",
        );
        let decision = SUBJECT.replace("outcome", "decision");
        forged(
            w.check(
                EventKind::Decision,
                &decision,
                agent.sign(&decision, b"payload").as_deref(),
            ),
            "agents do not write decision",
        );
        // A key admission does not hold, with no certificate or one it did not sign.
        let stranger = KeyPair::generate();
        forged(
            w.check(
                EventKind::Outcome,
                SUBJECT,
                Signer::admission(KeyPair::generate())
                    .sign(SUBJECT, b"payload")
                    .as_deref(),
            ),
            "not admission's",
        );
        let self_made = certify(
            &stranger,
            &w.tower,
            &w.prod1,
            "me",
            stranger.public(),
            w.now,
            w.now + Duration::from_secs(60),
        );
        let sig = Signer::agent(KeyPair::from_pem(&stranger.to_pem()).unwrap(), self_made)
            .sign(SUBJECT, b"payload")
            .unwrap();
        forged(
            w.check(EventKind::Outcome, SUBJECT, Some(&sig)),
            "certificate is not admission's",
        );
        // A certificate of admission's for one key, with another key's signature.
        let mut swapped =
            proto::EventSignature::decode(STANDARD.decode(&good).unwrap().as_slice()).unwrap();
        let thief = KeyPair::generate();
        swapped.key_id = thief.id().to_string();
        swapped.signature = thief.sign_raw(&event_bytes(SUBJECT, b"payload")).to_vec();
        let sig = STANDARD.encode(swapped.encode_to_vec());
        forged(
            w.check(EventKind::Outcome, SUBJECT, Some(&sig)),
            "another key",
        );
        // Stored outside the certificate's validity (beyond the leeway).
        let late = w.now + Duration::from_secs(3600) + CERTIFICATE_LEEWAY * 2;
        forged(
            w.trust.check(
                (&w.tower, &w.prod1, EventKind::Outcome),
                SUBJECT,
                b"payload",
                Some(&good),
                late,
            ),
            "not valid when it was stored",
        );
        // A retired key: what it signed before its retirement verifies, nothing after (an
        // agent's events verify under a certificate it issued before, whenever stored).
        let retiring = Trust::new(Verifier::default()).with_retired([(
            w.admission.public().clone(),
            w.now + Duration::from_secs(10),
        )]);
        let by_admission = Signer::admission(KeyPair::from_pem(&w.admission.to_pem()).unwrap())
            .sign(SUBJECT, b"payload")
            .unwrap();
        let at = |stored| {
            retiring.check(
                (&w.tower, &w.prod1, EventKind::Outcome),
                SUBJECT,
                b"payload",
                Some(&by_admission),
                stored,
            )
        };
        let later = w.now + Duration::from_secs(20);
        assert!(
            retiring
                .check(
                    (&w.tower, &w.prod1, EventKind::Outcome),
                    SUBJECT,
                    b"payload",
                    Some(&good),
                    later
                )
                .counts()
        );
        assert!(at(w.now).counts());
        forged(at(w.now + Duration::from_secs(20)), "after it was retired");
        let late_certificate = Trust::new(Verifier::default()).with_retired([(
            w.admission.public().clone(),
            w.now - Duration::from_secs(7200),
        )]);
        forged(
            late_certificate.check(
                (&w.tower, &w.prod1, EventKind::Outcome),
                SUBJECT,
                b"payload",
                Some(&good),
                w.now - Duration::from_secs(7300),
            ),
            "its agent certificate is signed with admission key",
        );
        // A key no longer trusted at all: its certificates stop verifying.
        let retired = Trust::new(Verifier::new([KeyPair::generate().public().clone()]));
        forged(
            retired.check(
                (&w.tower, &w.prod1, EventKind::Outcome),
                SUBJECT,
                b"payload",
                Some(&good),
                w.now,
            ),
            "certificate is not admission's",
        );
    }

    /// A certificate from a retired key claiming a longer life than admission issues does
    /// not verify: a leaked retired key could otherwise date one before its retirement and
    /// have it hold for years.
    #[test]
    fn a_retired_keys_certificate_longer_than_any_admission_issues_does_not_verify() {
        let mut w = world();
        w.trust = Trust::new(Verifier::default()).with_retired([(
            w.admission.public().clone(),
            w.now + Duration::from_secs(10),
        )]);
        let certified_for = |life: Duration| {
            let key = KeyPair::generate();
            let certificate = certify(
                &w.admission,
                &w.tower,
                &w.prod1,
                "prod-1-a1",
                key.public(),
                w.now - Duration::from_secs(60),
                w.now - Duration::from_secs(60) + life,
            );
            let sig = Signer::agent(key, certificate)
                .sign(SUBJECT, b"payload")
                .unwrap();
            w.check(EventKind::Outcome, SUBJECT, Some(&sig))
        };
        assert!(certified_for(MAX_CERTIFICATE_LIFE).counts());
        match certified_for(MAX_CERTIFICATE_LIFE + Duration::from_secs(1)) {
            Provenance::Forged(why) => assert!(why.contains("longer than"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// A certificate's life runs by the wall clock too: the monotonic clock stands still
    /// while the machine sleeps, and an agent woken after its certificate ran out must not
    /// sign with it.
    #[test]
    fn a_certificate_runs_out_by_either_clock() {
        let lasts = Duration::from_secs(10);
        let life = |came_wall: SystemTime| Life {
            came: Instant::now(),
            came_wall,
            lasts,
        };
        assert!(!life(SystemTime::now()).over());
        // Asleep for twice its life: the monotonic clock says nothing passed.
        assert!(life(SystemTime::now() - 2 * lasts).over());
        // A wall clock set back says less than nothing: the monotonic clock still counts.
        let set_back = Life {
            came: Instant::now().checked_sub(2 * lasts).expect("up for 20 s"),
            came_wall: SystemTime::now() + lasts,
            lasts,
        };
        assert!(set_back.over());
    }

    #[test]
    fn only_verified_or_unchecked_events_count() {
        assert!(Provenance::Unchecked.counts());
        assert!(Provenance::Verified(Author::Admission).counts());
        assert!(!Provenance::Unsigned.counts());
        assert!(!Provenance::Forged("x".into()).counts());
        assert_eq!(
            Provenance::Unsigned.doubt().as_deref(),
            Some("it is not signed")
        );
        assert_eq!(Signer::unenrolled().sign(SUBJECT, b"payload"), None);
    }

    #[test]
    fn an_agent_claims_only_in_its_own_name() {
        let me = Provenance::Verified(Author::Agent("prod-1-a1-01abc".into()));
        let claim = |agent: &str| proto::Event {
            kind: Some(proto::event::Kind::Started(proto::Started {
                agent: agent.into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(me.clone().for_event(&claim("prod-1-a1-01abc")), me);
        assert!(!me.clone().for_event(&claim("prod-1-a2-01xyz")).counts());
        // Admission ends commands unrun under claims of its own name.
        let admission = Provenance::Verified(Author::Admission);
        assert_eq!(
            admission.clone().for_event(&claim("admission/a1")),
            admission
        );
    }

    /// Unsigned history from before events were signed counts; unsigned events since do not,
    /// and a signature that does not hold is forged whenever it was stored.
    #[test]
    fn unsigned_events_count_only_before_signing_began() {
        let w = world();
        let trust =
            Trust::new(Verifier::new([w.admission.public().clone()])).signed_from(Some(100));
        let at = |sequence, signature: Option<&str>| {
            trust.check_at(
                sequence,
                (&w.tower, &w.prod1, EventKind::Outcome),
                SUBJECT,
                b"payload",
                signature,
                w.now,
            )
        };
        assert_eq!(at(99, None), Provenance::Legacy);
        assert_eq!(at(100, None), Provenance::Unsigned);
        assert!(matches!(at(5, Some("%%%")), Provenance::Forged(_)));
        assert!(Provenance::Legacy.counts());
    }
}
