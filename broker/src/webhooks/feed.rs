//! Where room events become webhook queue entries: one task per node takes the events the
//! directory notes, gathers them for up to [`GATHER`] (at most [`super::BATCH`]), and
//! appends them to [`super::QUEUE`] together, retrying until they are stored. From there
//! the queue's push deliverer POSTs them.

use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;

use super::{BATCH, QUEUE, WebhookEvent};
use crate::queues::store::QueueStore;

/// How long events are gathered before they are appended.
pub const GATHER: Duration = Duration::from_millis(50);

/// Events on their way to the feed.
pub type WebhookSender = UnboundedSender<WebhookEvent>;

/// Appends the events that arrive on `events` until shutdown; those already noted then get
/// one more try before it ends.
pub async fn feed(
    store: QueueStore,
    mut events: UnboundedReceiver<WebhookEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        let mut batch = vec![first];
        let gathered = tokio::time::sleep(GATHER);
        tokio::pin!(gathered);
        while batch.len() < BATCH {
            tokio::select! {
                _ = &mut gathered => break,
                event = events.recv() => match event {
                    Some(event) => batch.push(event),
                    None => break,
                },
            }
        }
        store_until_stored(&store, &batch, &shutdown).await;
    }
    let mut left = Vec::new();
    while let Ok(event) = events.try_recv() {
        left.push(event);
    }
    if !left.is_empty() {
        store_until_stored(&store, &left, &shutdown).await;
    }
}

/// Appends `batch`, retrying with backoff while the queue cannot take it (a full disk,
/// JetStream away), until shutdown.
async fn store_until_stored(
    store: &QueueStore,
    batch: &[WebhookEvent],
    shutdown: &CancellationToken,
) {
    let mut pause = Duration::from_millis(100);
    loop {
        let entries = batch.iter().map(WebhookEvent::to_entry).collect();
        match store.append_raw(QUEUE, entries).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, events = batch.len(), "webhook events not stored yet; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
