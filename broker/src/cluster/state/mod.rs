//! The cluster's state, one type per concern, below the [`crate::cluster::Cluster`] that
//! owns them: the behaviour that needs the whole node ([`crate::cluster::interest`],
//! [`crate::cluster::mirror`], [`crate::cluster::queues`]) sits above, so nothing here
//! imports the cluster itself.

pub mod history;
pub mod interest;
pub mod mirror;
pub mod occupancy;
pub mod queues;

use async_nats::jetstream::{self, kv};

use crate::cluster::error::ClusterError;

/// Opens key-value bucket `bucket`, or makes it (one value per key, `replicas` copies).
pub async fn bucket(
    jetstream: &jetstream::Context,
    bucket: String,
    replicas: usize,
) -> Result<kv::Store, ClusterError> {
    if let Ok(store) = jetstream.get_key_value(&bucket).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket,
        history: 1,
        num_replicas: replicas,
        ..Default::default()
    };
    (jetstream.create_key_value(config).await).map_err(|e| ClusterError::JetStream(e.to_string()))
}

/// The last entry of `key` in `store` (`None` if it never had one) as the bucket's stream
/// leader has it. The bucket's own `get` and `entry` may be answered by any replica, a
/// lagging one too; this read sees every write acknowledged before it, as a decision that
/// must not be taken twice (a claim, a commit) needs.
pub async fn latest_entry(
    store: &kv::Store,
    key: &str,
) -> Result<Option<kv::Entry>, jetstream::stream::LastRawMessageError> {
    let subject = format!("{}{key}", store.prefix);
    match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => {
            let operation = match message.headers.get("KV-Operation").map(|v| v.as_str()) {
                Some("DEL") => kv::Operation::Delete,
                Some("PURGE") => kv::Operation::Purge,
                _ => kv::Operation::Put,
            };
            Ok(Some(kv::Entry {
                bucket: store.name.clone(),
                key: key.to_owned(),
                value: message.payload,
                revision: message.sequence,
                delta: 0,
                created: message.time,
                operation,
                seen_current: true,
            }))
        }
        Err(error)
            if error.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
        {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// The value of `key` in `store` as its leader has it ([`latest_entry`]); `None` if it has
/// none, or it was deleted.
pub async fn latest_value(
    store: &kv::Store,
    key: &str,
) -> Result<Option<bytes::Bytes>, jetstream::stream::LastRawMessageError> {
    let entry = latest_entry(store, key).await?;
    Ok(entry
        .filter(|entry| entry.operation == kv::Operation::Put)
        .map(|entry| entry.value))
}
