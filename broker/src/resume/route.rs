//! Where a resume goes: the token names a connection on this shard ([`super::attach`]),
//! on another shard of this node (handed over there, before anything is answered), or on
//! another node (the session moves here: [`super::moving`]); a token from before a restart
//! names nothing, and the client gets a new connection that says so.

use std::rc::Rc;

use super::attach::{open_new, resume_here};
use super::handoff::{Handoff, Resuming};
use crate::resume::{Refusal, ResumeRequest, ResumeToken};
use crate::shard::Shard;

/// Resumes the connection `resuming` names, or opens a new one that says why not.
pub(crate) async fn resume(shard: Rc<Shard>, resuming: Resuming) {
    let (token, received) = match &resuming.resume {
        ResumeRequest::Resume { token, received } => (token.clone(), *received),
        ResumeRequest::Malformed => return open_new(shard, resuming, Refusal::Unknown).await,
    };
    let gateway = &shard.gateway;
    let token = where_it_lives(gateway.cluster.as_deref(), token);
    if token.id.node != gateway.config.server.node_id {
        // Another node's: in a cluster, the session moves here.
        return match gateway.cluster.clone() {
            Some(cluster) => {
                Box::pin(super::moving::move_in(
                    shard, resuming, token, received, cluster,
                ))
                .await
            }
            None => open_new(shard, resuming, Refusal::Unknown).await,
        };
    }
    if token.id.epoch != gateway.epoch {
        // From before a restart: nothing here to resume.
        return open_new(shard, resuming, Refusal::Unknown).await;
    }
    if token.id.shard != shard.index {
        let Some(owner) = gateway.shards.get(usize::from(token.id.shard)).cloned() else {
            return open_new(shard, resuming, Refusal::Unknown).await;
        };
        if let Some(handoff) = Handoff::of(resuming) {
            owner.adopt_resume(handoff).await;
        }
        return;
    }
    resume_here(shard, resuming, &token, received).await;
}

/// `token` naming its connection by the id it has now, if this node knows it moved: here
/// (the token is from before the move that brought it, and names the node it left) or away
/// from here (the token is from this node; the session lives on elsewhere).
fn where_it_lives(cluster: Option<&crate::cluster::Cluster>, token: ResumeToken) -> ResumeToken {
    let Some(cluster) = cluster else {
        return token;
    };
    let here = cluster.here_as(token.id);
    let id = cluster.moved_to(&here.to_string()).unwrap_or(here);
    ResumeToken { id, ..token }
}

/// Continues a resume another shard handed over.
pub(crate) async fn adopt(shard: Rc<Shard>, handoff: Handoff) {
    let Ok(resuming) = handoff.into_resuming() else {
        return;
    };
    Box::pin(resume(shard, resuming)).await;
}
