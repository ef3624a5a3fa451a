//! Where room events become webhook queue entries: one task per node takes the events the
//! directory and the cluster note, keeps those `[webhooks] events` asks for, gives each its
//! id, gathers them for up to [`GATHER`] (at most [`super::BATCH`]) and appends them to
//! [`super::QUEUE`] together, retrying until they are stored. From there the queue's push
//! deliverer POSTs them.

use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

use super::config::WebhookConfig;
use super::{BATCH, QUEUE, WebhookEvent};
use crate::queues::store::QueueStore;

/// How long events are gathered before they are appended.
pub const GATHER: Duration = Duration::from_millis(50);

/// See the module documentation.
pub struct Feed {
    store: QueueStore,
    events: Receiver<WebhookEvent>,
    config: WebhookConfig,
    /// Ids are `{origin}.{count}`; the origin names this node and run.
    origin: String,
    count: u64,
    /// `switchboard_webhook_events_total{outcome="stored"}`.
    stored: prometheus::IntCounter,
}

impl Feed {
    pub fn new(
        store: QueueStore,
        events: Receiver<WebhookEvent>,
        config: WebhookConfig,
        origin: String,
        stored: prometheus::IntCounter,
    ) -> Self {
        Self {
            store,
            events,
            config,
            origin,
            count: 0,
            stored,
        }
    }

    /// Stores the events that arrive until `stop`; those already noted then get one more
    /// try before it ends.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => break,
                event = self.events.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
            };
            let mut batch = Vec::new();
            self.take(first, &mut batch);
            let gathered = tokio::time::sleep(GATHER);
            tokio::pin!(gathered);
            while batch.len() < BATCH {
                tokio::select! {
                    _ = &mut gathered => break,
                    event = self.events.recv() => match event {
                        Some(event) => self.take(event, &mut batch),
                        None => break,
                    },
                }
            }
            self.store(&batch, &stop).await;
        }
        let mut left = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            self.take(event, &mut left);
        }
        self.store(&left, &stop).await;
    }

    /// Adds `event` to `batch`, named, if the webhooks want it.
    fn take(&mut self, mut event: WebhookEvent, batch: &mut Vec<WebhookEvent>) {
        if self.config.wants(event.name) {
            self.count += 1;
            event.id = format!("{}.{}", self.origin, self.count);
            batch.push(event);
        }
    }

    /// Appends `batch`, retrying with backoff while the queue cannot take it (a full
    /// disk, JetStream away), until `stop`.
    async fn store(&self, batch: &[WebhookEvent], stop: &CancellationToken) {
        if batch.is_empty() {
            return;
        }
        let mut pause = Duration::from_millis(100);
        loop {
            let entries = batch.iter().map(WebhookEvent::to_entry).collect();
            match self.store.append_raw(QUEUE, entries).await {
                Ok(()) => {
                    self.stored.inc_by(batch.len() as u64);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, events = batch.len(), "webhook events not stored yet; retrying");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}
