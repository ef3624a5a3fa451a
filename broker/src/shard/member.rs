//! A shard's record of one local connection in one room: the connection, and since when it
//! is a member (what presence reports).

use std::rc::Rc;

use crate::connection::Connection;
use crate::rooms::PresenceMember;

/// A local connection in a room, and since when.
pub(super) struct Member {
    pub(super) connection: Rc<Connection>,
    pub(super) joined_at_ms: u64,
}

impl Member {
    /// The member as presence reports it.
    pub(super) fn presence(&self) -> PresenceMember {
        let facts = &self.connection.facts;
        PresenceMember {
            connection_id: facts.connection_id.clone(),
            user: crate::auth::authorizer::user_of(facts.authorizer.as_deref()),
            joined_at_ms: self.joined_at_ms,
        }
    }
}
