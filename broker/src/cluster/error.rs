//! Why a node could not join its cluster.

/// Why the node could not join the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error(
        "server.node_id {node_id} is held by a live node (started {since}); every node of a \
         cluster needs its own server.node_id"
    )]
    DuplicateNodeId { node_id: u16, since: String },
    #[error("JetStream is not available on the NATS server ({0}); start nats-server with -js")]
    JetStream(String),
    #[error("cluster setup failed: {0}")]
    Setup(String),
}

impl ClusterError {
    pub(in crate::cluster) fn setup(error: impl std::fmt::Display) -> Self {
        Self::Setup(error.to_string())
    }
}
