//! What a resumable connection keeps to be resumed, and what one that moved here from
//! another node was known by there.

use crate::connection_id::ConnectionId;
use crate::outbound::SharedFrame;
use crate::resume::{Secret, SecretHash};

/// What a resumable connection keeps to be resumed.
pub(crate) struct Resumable {
    /// The secret of its resume token. A new one at every resume.
    pub(crate) secret: Secret,
    /// After a resume: the secret it replaced, and the `resumed` frame that carries the new
    /// one. The old secret still resumes while that frame is unwritten (its client may
    /// lose the new socket before it learns the new token), and never after.
    pub(crate) handover: Option<(Secret, SharedFrame)>,
    /// Resumes it takes (each replays and runs the authorizer and `$connect` again): a
    /// token in the wrong hands cannot make it do that without bound.
    pub(crate) resumes: Option<crate::limits::TokenBucket>,
    /// What it was known by on the nodes it moved here from: a client that lost the
    /// `resumed` frame of a move still holds a token from one of them.
    pub(crate) earlier: Option<Earlier>,
    /// The client's data messages handled so far (routed, in order), over all its sockets:
    /// the `resumed` frame tells the client, which sends again what never arrived.
    pub(crate) handled: u64,
}

/// What a connection that moved here was known by on the nodes it left.
#[derive(Debug, Default)]
pub(crate) struct Earlier {
    pub(crate) ids: Vec<ConnectionId>,
    /// The hashes of the secrets that resumed it there: good until the `resumed` frame
    /// with its token here is written.
    pub(crate) secret_hashes: Vec<SecretHash>,
    /// That frame.
    pub(crate) frame: Option<SharedFrame>,
}
