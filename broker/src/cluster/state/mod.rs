//! The cluster's state, one type per concern, below the [`crate::cluster::Cluster`] that
//! owns them: the behaviour that needs the whole node ([`crate::cluster::interest`],
//! [`crate::cluster::mirror`], [`crate::cluster::queues`]) sits above, so nothing here
//! imports the cluster itself.

pub mod history;
pub mod interest;
pub mod mirror;
pub mod occupancy;
pub mod queues;
