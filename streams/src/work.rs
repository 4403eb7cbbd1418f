//! Working through a durable pull consumer: a bounded number of messages handled at once,
//! pulling stopped as soon as shutdown is asked for.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Error, Result};

/// Pulls from `consumer` and spawns `handle` for each message on `tracker`, at most
/// `concurrency` at a time, until `shutdown` fires (`Ok`) or the consumer is gone (`Err`).
/// Messages pulled but not yet handled when it returns are redelivered after the ack wait.
pub async fn consume<F, Fut>(
    consumer: &PullConsumer,
    concurrency: usize,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    handle: F,
) -> Result<()>
where
    F: Fn(Message) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let what = format!("consumer {}", consumer.cached_info().name);
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(concurrency)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| Error::read(&what, e))?;
    let permits = Arc::new(Semaphore::new(concurrency));
    loop {
        let permit = tokio::select! {
            // Stop taking work as soon as shutdown is asked for.
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            next = messages.next() => next,
        };
        match next {
            Some(Ok(message)) => {
                let work = handle(message);
                tracker.spawn(async move {
                    work.await;
                    drop(permit);
                });
            }
            Some(Err(e)) => match e.kind() {
                MessagesErrorKind::MissingHeartbeat => {
                    tracing::debug!(%what, "no heartbeat from the server; still pulling")
                }
                MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::RequestLimitExceeded => {
                    return Err(Error::read(&what, e));
                }
                _ => tracing::warn!(%what, error = %e, "pulling"),
            },
            None => return Err(Error::read(&what, "the message stream ended")),
        }
    }
}
