//! The notifier: follows `RCT_EVT` on a durable consumer shared by admission's replicas, and
//! posts Slack-compatible webhook messages (`{"text": …}`) for operations whose catalog entry
//! names channels: when one starts, when it ends, and when it is refused.
//!
//! At least once: an event is acknowledged only after every channel took it; a failed post is
//! retried with growing pauses, forever. Each post carries the event's id in
//! `X-Rct-Event-Id`, and a replica remembers what it already posted, so a redelivered event is
//! not posted twice to the same channel. It runs beside the decisions and never holds them up.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use rct_bus::catalog::{Catalog, display_value};
use rct_bus::proto::{self, event::Kind};
use rct_bus::provenance::{Author, Provenance, Trust};
use rct_bus::{EventKind, Subject, rejection_code_name};
use rct_streams::Record;
use rct_streams::topology::{EVENT_STREAM, NOTIFIER_CONSUMER};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Header that carries the event id on every post, for receivers that deduplicate.
pub const EVENT_ID_HEADER: &str = "X-Rct-Event-Id";

/// Posted (event, channel) pairs remembered per replica.
const REMEMBERED: usize = 10_000;

/// Where notifications go.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Webhook URL of each channel the catalog's `notify` lists name.
    pub channels: BTreeMap<String, String>,
    /// How long one post may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

pub(crate) struct Notifier {
    js: jetstream::Context,
    catalog: tokio::sync::watch::Receiver<Arc<Catalog>>,
    channels: BTreeMap<String, String>,
    http: reqwest::Client,
    posted: Mutex<Remembered>,
    /// Who may write what: only events signed by their entitled writer are told about.
    trust: Arc<Trust>,
}

#[derive(Default)]
struct Remembered {
    set: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
}

impl Remembered {
    fn contains(&self, key: &(String, String)) -> bool {
        self.set.contains(key)
    }

    fn insert(&mut self, key: (String, String)) {
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
            if self.order.len() > REMEMBERED
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
}

impl Notifier {
    pub(crate) fn new(
        js: jetstream::Context,
        catalog: tokio::sync::watch::Receiver<Arc<Catalog>>,
        config: &Config,
        trust: Arc<Trust>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(config.timeout.unwrap_or(Duration::from_secs(10)))
            .build()
            .expect("a default HTTP client builds");
        Self {
            js,
            catalog,
            channels: config.channels.clone(),
            http,
            posted: Mutex::default(),
            trust,
        }
    }

    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let consumer: PullConsumer = match self
            .js
            .get_consumer_from_stream(NOTIFIER_CONSUMER, EVENT_STREAM)
            .await
        {
            Ok(consumer) => consumer,
            Err(e) => {
                tracing::error!(error = %e, "cannot bind the notifier consumer; no notifications will be sent");
                return;
            }
        };
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => {
                tracing::error!(error = %e, "cannot pull events for notifications");
                return;
            }
        };
        tracing::info!(channels = self.channels.len(), "notifier ready");
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => self.handle(message).await,
                Some(Err(e)) => tracing::debug!(error = %e, "pulling events for notifications"),
                None => break,
            }
        }
    }

    async fn handle(&self, message: jetstream::Message) {
        let Ok(info) = message.info() else { return };
        let (sequence, published, delivered) =
            (info.stream_sequence, info.published, info.delivered);
        let event_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map_or_else(|| sequence.to_string(), |id| id.to_string());
        let stored = (
            message.subject.as_str(),
            message.payload.as_ref(),
            message.headers.as_ref(),
        );
        let record = match Record::from_message(sequence, published, stored, Some(&self.trust)) {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(error = %e, "not notifying about a malformed event");
                let _ = message.ack().await;
                return;
            }
        };
        if let Some(why) = record.provenance.doubt() {
            tracing::warn!(sequence, subject = %message.subject, %why, "not notifying about an unverified event");
            let _ = message.ack().await;
            return;
        }
        let channels: Vec<(String, String)> = self
            .catalog
            .borrow()
            .operations
            .get(&record.event.operation)
            .map(|op| {
                // Approvers hear of a request waiting for them; the break-glass channels of a
                // command run without its approvals.
                let extra: &[String] = match &record.event.kind {
                    Some(Kind::Pending(_)) => op.approvals.as_ref().map_or(&[], |a| &a.notify),
                    Some(Kind::Admitted(a))
                        if a.request.as_ref().is_some_and(|r| !r.break_glass.is_empty()) =>
                    {
                        op.break_glass.as_ref().map_or(&[], |b| &b.notify)
                    }
                    _ => &[],
                };
                op.notify
                    .iter()
                    .chain(extra)
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .filter_map(|c| match self.channels.get(c) {
                        Some(url) => Some((c.clone(), url.clone())),
                        None => {
                            tracing::warn!(channel = %c, "the catalog names a channel with no webhook");
                            None
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let text = if channels.is_empty() {
            None
        } else {
            self.text(&record).await
        };
        let Some(text) = text else {
            let _ = message.ack().await;
            return;
        };

        let mut all_posted = true;
        for (channel, url) in channels {
            let key = (event_id.clone(), channel.clone());
            if self
                .posted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&key)
            {
                continue;
            }
            match self.post(&url, &event_id, &posted(&text)).await {
                Ok(()) => self
                    .posted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key),
                Err(e) => {
                    tracing::warn!(%channel, event_id = %event_id, error = %e, "webhook post failed; will retry");
                    all_posted = false;
                }
            }
        }
        if all_posted {
            let _ = message.ack().await;
        } else {
            // 1 s, 2 s, 4 s … up to a minute between attempts.
            let pause = Duration::from_secs(1 << delivered.clamp(1, 7).saturating_sub(1))
                .min(Duration::from_secs(60));
            let _ = message.ack_with(AckKind::Nak(Some(pause))).await;
        }
    }

    async fn post(&self, url: &str, event_id: &str, text: &str) -> Result<(), String> {
        let response = self
            .http
            .post(url)
            .header(EVENT_ID_HEADER, event_id)
            .json(&serde_json::json!({ "text": text }))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("the webhook answered {}", response.status()))
        }
    }

    /// The message for an event, or `None` for events nobody is told about: among them, a
    /// claim or outcome with no decision of its operation at its own tower and target (written
    /// under a command's id by a writer of another target or tower: not the command's).
    async fn text(&self, record: &Record) -> Option<String> {
        let event = &record.event;
        let decision = match record.kind {
            // Only claims and outcomes are told about (a refusal is its own decision).
            EventKind::Claim | EventKind::Outcome => match self.decision_of(record).await {
                Ok(Some(decision)) if decision.operation == event.operation => Some(decision),
                Ok(_) => {
                    tracing::warn!(sequence = record.sequence, subject_target = %record.target, "not notifying about an event with no decision of its operation at its tower and target (not the command's)");
                    return None;
                }
                // Unreadable now: told, with what cannot be looked up said so.
                Err(()) => None,
            },
            EventKind::Decision | EventKind::Pending => None,
            _ => return None,
        };
        let what = match event.target.as_str() {
            "" | "_" => event.operation.clone(),
            target => format!("{} on {target}", event.operation),
        };
        let id = &event.command_id;
        match event.kind.as_ref()? {
            Kind::Started(started) if started.without_running => None,
            Kind::Started(started) => {
                let (who, why) = who_and_why(decision);
                Some(format!(
                    "Starting {what} — by {who}, {why} (agent {}, command {id})",
                    started.agent
                ))
            }
            Kind::Succeeded(s) => Some(format!(
                "Succeeded: {what}{} (command {id})",
                if s.summary.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", s.summary)
                }
            )),
            Kind::Failed(f) => Some(format!(
                "Failed: {what} — {} {} (command {id})",
                f.code, f.message
            )),
            Kind::Expired(_) => Some(format!(
                "Expired: {what} was not started before its deadline (command {id})"
            )),
            Kind::Cancelled(c) => Some(format!("Cancelled: {what} — {} (command {id})", c.reason)),
            Kind::Unknown(u) => Some(format!(
                "Outcome unknown: {what} — {}; check the target by hand (command {id})",
                u.reason
            )),
            Kind::Pending(p) => {
                let rule = p.rule.clone().unwrap_or_default();
                let who = p
                    .request
                    .as_ref()
                    .and_then(|q| q.operator.as_ref())
                    .map_or("?".to_owned(), operator_name);
                let why = p.request.as_ref().map_or("", |q| q.justification.as_str());
                let until = p
                    .expires_at
                    .as_ref()
                    .and_then(rct_streams::timestamp::to_datetime)
                    .map_or_else(|| "?".to_owned(), |at| at.to_string());
                Some(format!(
                    "Approval needed: {what} for {who} ({why}) needs {} of {} by {until} — rct \
                     approve {id} (command {id})",
                    rule.required,
                    rule.approver_groups.join(", ")
                ))
            }
            Kind::Admitted(a) => {
                let request = a.request.as_ref()?;
                if request.break_glass.is_empty() {
                    return None;
                }
                let who = request
                    .operator
                    .as_ref()
                    .map_or("?".to_owned(), operator_name);
                Some(format!(
                    "BREAK-GLASS: {what} by {who} without its approvals — {} ({}); review it: \
                     rct review {id} -j … (command {id})",
                    request.break_glass, request.justification
                ))
            }
            Kind::Rejected(r) => {
                let who = r
                    .request
                    .as_ref()
                    .and_then(|q| q.operator.as_ref())
                    .map_or("someone not authenticated".to_owned(), operator_name);
                Some(format!(
                    "Refused: {what} for {who} — {} ({})",
                    r.message,
                    rejection_code_name(r.code)
                ))
            }
            _ => None,
        }
    }

    /// The decision of the record's command at the record's own tower and target (`Ok(None)`
    /// when there is none; `Err` when it cannot be read now).
    async fn decision_of(&self, record: &Record) -> Result<Option<proto::Event>, ()> {
        let subject = Subject::event(
            &record.tower,
            &record.target,
            record.command_id,
            EventKind::Decision,
        );
        // The slot's occupant is its first message; only a decision admission signed is one.
        match rct_streams::journal::first(&self.js, EVENT_STREAM, &subject.to_string(), |_| true)
            .await
        {
            Ok(Some(stored)) => Ok(Record::from_message(
                stored.sequence,
                stored.time,
                (&stored.subject, &stored.payload, Some(&stored.headers)),
                Some(&self.trust),
            )
            .ok()
            .filter(|r| r.provenance == Provenance::Verified(Author::Admission))
            .map(|r| r.event)),
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        }
    }
}

/// The keys admission publishes (see [`rct_streams::topology::admission_keys`]), read until
/// they are there: a notifier of its own checks who wrote each event against them.
pub(crate) async fn trust_published(
    js: &jetstream::Context,
    shutdown: &CancellationToken,
) -> Trust {
    loop {
        match rct_streams::topology::admission_trust(js).await {
            Ok(Some(trust)) => return trust,
            Ok(None) => {
                tracing::warn!("admission has published no public keys yet; waiting for them")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read admission's public keys; trying again")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Trust::new(rct_bus::Verifier::default()),
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// The operator and justification from the command's decision, if it could be read.
fn who_and_why(decision: Option<proto::Event>) -> (String, String) {
    let unknown = (
        "an unknown operator".to_owned(),
        "no justification recorded".to_owned(),
    );
    let Some(Kind::Admitted(admitted)) = decision.and_then(|d| d.kind) else {
        return unknown;
    };
    let Some(request) = admitted.request else {
        return unknown;
    };
    let who = request.operator.as_ref().map_or(unknown.0, operator_name);
    let mut why = request.justification;
    if why.is_empty() {
        why = unknown.1;
    }
    let params: Vec<String> = request
        .params
        .iter()
        .map(|(k, v)| format!("{k}={}", display_value(v)))
        .collect();
    if !params.is_empty() {
        why = format!("{why}; {}", params.join(" "));
    }
    (who, why)
}

/// `text` as posted: printable (nothing on record can start a fake line in a channel), with
/// `&`, `<` and `>` escaped as Slack reads them (no `<!channel>` ping, no `<url|label>` link
/// that says something else than where it goes).
fn posted(text: &str) -> String {
    rct_bus::text::printable(text)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn operator_name(operator: &proto::Operator) -> String {
    if operator.email.is_empty() {
        operator.subject.clone()
    } else {
        operator.email.clone()
    }
}
