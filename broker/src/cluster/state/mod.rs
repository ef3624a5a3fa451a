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
