//! Publishes a running command's progress and log lines as events, in order, off the
//! handler's path: the handler only queues (never blocks), progress that comes faster than it
//! can be published is coalesced to the latest, log lines are never dropped, and secret values
//! are masked before anything leaves the agent.

use rct_bus::proto::{self, event::Kind};
use rct_bus::{EventKind, Tower};
use rct_streams::Publisher;
use rct_streams::timestamp::from_datetime;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Written instead of a secret value.
const MASK: &str = "***";

#[derive(Debug)]
enum Emit {
    Progress(proto::Progress),
    Log(proto::LogStream, String),
}

/// The handler's side: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub(crate) struct Emitter {
    tx: mpsc::UnboundedSender<Emit>,
}

impl Emitter {
    pub(crate) fn progress(&self, percent: u32, step: String, message: String) {
        // The receiver lives until the command's outcome is written; after that nothing
        // listens, and late progress has nowhere to go.
        let _ = self.tx.send(Emit::Progress(proto::Progress {
            percent,
            step,
            message,
        }));
    }

    pub(crate) fn log(&self, stream: proto::LogStream, line: String) {
        let _ = self.tx.send(Emit::Log(stream, line));
    }
}

/// Starts publishing events like `template` (command id, operation, target, source) for
/// `tower`. The task ends, flushed, once every `Emitter` clone is dropped.
pub(crate) fn start(
    publisher: Publisher,
    tower: Tower,
    template: proto::Event,
    secrets: Vec<String>,
) -> (Emitter, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut counters = (0u64, 0u64);
        let mut batch = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < 1000 {
                match rx.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            let last_progress = batch.iter().rposition(|e| matches!(e, Emit::Progress(_)));
            for (i, emit) in batch.drain(..).enumerate() {
                let (kind, n) = match emit {
                    Emit::Progress(_) if Some(i) != last_progress => continue,
                    Emit::Progress(mut p) => {
                        p.step = mask(&p.step, &secrets);
                        p.message = mask(&p.message, &secrets);
                        counters.0 += 1;
                        (Kind::Progress(p), counters.0)
                    }
                    Emit::Log(stream, line) => {
                        counters.1 += 1;
                        let line = mask(&line, &secrets);
                        (
                            Kind::Log(proto::Log {
                                stream: stream as i32,
                                line,
                            }),
                            counters.1,
                        )
                    }
                };
                let event = proto::Event {
                    at: Some(from_datetime(OffsetDateTime::now_utc())),
                    kind: Some(kind),
                    ..template.clone()
                };
                publish(&publisher, &tower, &event, n).await;
            }
        }
    });
    (Emitter { tx }, task)
}

/// Publishes until it is stored: progress and logs are never lost, only late.
pub(crate) async fn publish(publisher: &Publisher, tower: &Tower, event: &proto::Event, n: u64) {
    let kind = EventKind::of(event).map_or("event", EventKind::as_str);
    loop {
        match publisher.event(tower, event, n).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(command_id = %event.command_id, kind, error = %e, "cannot publish; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// `text` with every secret value replaced by `***`.
pub(crate) fn mask(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_owned(), |text, secret| {
            text.replace(secret.as_str(), MASK)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_wherever_they_appear() {
        let secrets = vec!["hunter2".to_owned(), String::new()];
        assert_eq!(
            mask("password=hunter2 again hunter2", &secrets),
            "password=*** again ***"
        );
        assert_eq!(mask("nothing here", &secrets), "nothing here");
    }
}
