//! Finding connections whose first node went. A call for a connection goes to the node that
//! gave out its id, which forwards it if the connection moved; when that node's run is gone
//! (it restarted, or was judged lost), its forwarding went with it. The node a connection
//! lives on knows it by all its earlier ids, so the caller asks every live node
//! (`Op::Find`): for one id (a call for one connection), or for all of a bulk send's at
//! once, one request per node.

use std::collections::HashMap;

use bytes::Bytes;

use super::Cluster;
use super::remote::Op;
use crate::connection_id::ConnectionId;

impl Cluster {
    /// Where connection `id` lives now, if it moved to this or another live node before
    /// the run that gave out `id` went.
    pub async fn find_moved(&self, id: ConnectionId) -> Option<ConnectionId> {
        self.find_all_moved(vec![id]).await.remove(&id)
    }

    /// [`Cluster::find_moved`] for many ids at once: those found, with where they live.
    pub async fn find_all_moved(
        &self,
        ids: Vec<ConnectionId>,
    ) -> HashMap<ConnectionId, ConnectionId> {
        let mut found = HashMap::new();
        let mut asked = Vec::new();
        for id in ids {
            match self.arrived_as(id) {
                Some(alias) => drop(found.insert(id, alias)),
                None => asked.push(id.to_string()),
            }
        }
        if asked.is_empty() {
            return found;
        }
        let body = Bytes::from(serde_json::to_vec(&asked).unwrap_or_default());
        let peers = self.registry.live_peer_ids().into_iter();
        let asks = peers.map(|node| self.call(node, Op::Find, "", None, body.clone()));
        let answers = futures_util::future::join_all(asks).await;
        for reply in answers.into_iter().flatten().filter(|r| r.status == 200) {
            let known = serde_json::from_slice::<HashMap<String, String>>(&reply.body);
            for (id, alias) in known.unwrap_or_default() {
                if let (Ok(id), Ok(alias)) = (id.parse(), alias.parse()) {
                    found.insert(id, alias);
                }
            }
        }
        found
    }

    /// `ids` as a bulk send addresses them: each where it lives
    /// ([`Cluster::where_they_live`]), and those whose node's run is gone where they moved
    /// to, if any live node has them. The others stay, to be reported gone.
    pub async fn where_they_live_now(&self, ids: &[String]) -> Vec<String> {
        let mut living = self.where_they_live(ids);
        let orphaned: Vec<(usize, ConnectionId)> = (living.iter().enumerate())
            .filter_map(|(at, now)| {
                let now: ConnectionId = now.parse().ok()?;
                (!self.issuer_runs(now)).then_some((at, ids[at].parse().ok()?))
            })
            .collect();
        if orphaned.is_empty() {
            return living;
        }
        let asked = orphaned.iter().map(|&(_, id)| id).collect();
        let found = self.find_all_moved(asked).await;
        for (at, id) in orphaned {
            if let Some(alias) = found.get(&id) {
                living[at] = alias.to_string();
            }
        }
        living
    }

    /// The answer to `Op::Find`: which of the ids listed in `payload` moved here, each
    /// with the id it has here (`{"earlier": "here"}`).
    pub(super) fn answer_find(&self, payload: &[u8]) -> (u16, Bytes) {
        let asked: Vec<String> = serde_json::from_slice(payload).unwrap_or_default();
        let known: HashMap<&str, String> = (asked.iter())
            .filter_map(|text| {
                let alias = self.arrived_as(text.parse().ok()?)?;
                Some((text.as_str(), alias.to_string()))
            })
            .collect();
        (
            200,
            Bytes::from(serde_json::to_vec(&known).unwrap_or_default()),
        )
    }
}
