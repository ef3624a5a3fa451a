//! A node's duties in the cluster, the work that needs the whole gateway: renewing its
//! registration (closing its connections if it was declared lost while cut off), watching
//! for lost nodes and reporting their connections to `$disconnect` once cluster-wide,
//! recovering what its own earlier runs left behind, and delivering queues pushed to a
//! backend. Started by the server; the rest of [`super`] knows nothing of the gateway.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use switchboard_storage::ConnectionRecord;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use super::queues::deliver;
use super::registry::{Registration, Renewal, observe};
use super::state::mirror::MirrorRecord;
use crate::connection_id::ConnectionId;
use crate::disconnect::DisconnectReason;
use crate::gateway::Gateway;
use crate::orphans::OrphanReporter;
use crate::rooms::RoomName;
use crate::rooms::events::Change;

/// Renews this node's registration every `cluster.heartbeat_ms`, which keeps its lease
/// ([`crate::fence`]). If a takeover declared this node lost while it was paused or cut off
/// from NATS, its connections have been reported gone: it closes them (without a second
/// `$disconnect`) and registers again.
pub async fn heartbeat_loop(gateway: Arc<Gateway>, shutdown: CancellationToken) {
    let Some(cluster) = gateway.cluster.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(cluster.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sent_at = Instant::now();
        match cluster.registry.renew().await {
            Renewal::Renewed => cluster.fence.renewed(sent_at),
            Renewal::Failed => {}
            Renewal::DeclaredLost => {
                tracing::error!(
                    "this node was declared lost while paused or cut off from NATS, and its \
                     connections were reported to $disconnect; closing them so clients \
                     reconnect"
                );
                // Fenced for good, those sessions; the closes are queued to every shard
                // before anything waiting on the fence goes on.
                cluster.fence.declared_lost();
                for shard in gateway.shards.iter() {
                    shard.close_all(DisconnectReason::NodeLost).await;
                }
                // Serves again once the takeover has reported what this node held.
                loop {
                    let sent_at = Instant::now();
                    if cluster.registry.rejoin().await {
                        cluster.fence.renewed(sent_at);
                        tracing::info!("registered again after the takeover; serving");
                        break;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                }
            }
            Renewal::Taken => {
                let reason = format!(
                    "server.node_id {} was taken by another process while this node was not \
                     heard from; stop one of them",
                    cluster.node_id
                );
                tracing::error!("{reason}");
                cluster.set_degraded(Some(reason));
            }
        }
    }
}

/// Follows the other nodes' registrations and takes over the ones that lapse.
pub async fn watch_loop(gateway: Arc<Gateway>, shutdown: CancellationToken) {
    let Some(cluster) = gateway.cluster.clone() else {
        return;
    };
    let timeout = cluster.config.node_timeout;
    let mut tick = tokio::time::interval(cluster.config.heartbeat);
    let mut connected_since: Option<Instant> = None;
    let mut watch = None;
    loop {
        if watch.is_none() {
            watch = cluster
                .registry
                .store
                .watch_with_history("node.*")
                .await
                .ok();
        }
        let next = async {
            match watch.as_mut() {
                Some(watch) => watch.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            entry = next => match entry {
                Some(Ok(entry)) => observe(&cluster.registry, entry),
                _ => watch = None,
            },
            _ = tick.tick() => {
                // A node whose own lease ran out (it was paused, or cut off) has not been
                // watching either: it judges nobody until it has watched a full timeout.
                let connected = cluster.client.connection_state()
                    == async_nats::connection::State::Connected
                    && cluster.fence.holds();
                match (connected, connected_since) {
                    (false, _) => connected_since = None,
                    (true, None) => {
                        connected_since = Some(Instant::now());
                        cluster.registry.refresh_all();
                    }
                    (true, Some(since)) if since.elapsed() >= timeout => {
                        for (node, peer) in cluster.registry.lapsed(timeout) {
                            tokio::spawn(take_over(
                                gateway.clone(),
                                node,
                                peer.registration,
                                peer.revision,
                            ));
                        }
                    }
                    _ => {}
                }
                let live = cluster.registry.live_peers() + 1;
                cluster.metrics().cluster_nodes_live.set(live as i64);
            }
        }
    }
}

/// Reports every connection lost node `node` (incarnation `registration`) held to
/// `$disconnect` with reason "node lost", once cluster-wide: the claim decides which node
/// does it.
async fn take_over(gateway: Arc<Gateway>, node: u16, registration: Registration, revision: u64) {
    let Some(cluster) = gateway.cluster.clone() else {
        return;
    };
    let epoch = registration.epoch;
    if !cluster.registry.claim(node, epoch).await {
        // Another live node is reporting it, or has: look again after another timeout.
        // When that node finishes, it removes the registration and the watch forgets the
        // peer; if it dies half-way, its claim is taken over then.
        cluster.registry.postpone(node);
        cluster.registry.takeover_finished(node);
        return;
    }
    let Some(condemned) = cluster.registry.condemn(node, revision).await else {
        tracing::info!(
            node,
            "a node that looked lost renewed its registration: it is alive"
        );
        cluster.registry.release(node, epoch).await;
        cluster.registry.postpone(node);
        cluster.registry.takeover_finished(node);
        return;
    };
    let records = match cluster
        .mirrored_records(cluster.subjects.mirror_node(node))
        .await
    {
        Ok(records) => records,
        Err(error) => {
            tracing::error!(node, %error, "cannot read a lost node's connections; will retry");
            cluster.registry.takeover_finished(node);
            return;
        }
    };
    tracing::warn!(
        node,
        epoch,
        connections = records.len(),
        "node lost; reporting its connections to $disconnect"
    );
    report_lost(&gateway, records).await;
    cluster.vacate_node(node).await;
    cluster.registry.finish(node, epoch, Some(condemned)).await;
    cluster.metrics().cluster_takeovers.inc();
    cluster.registry.forget(node);
    cluster.registry.takeover_finished(node);
}

/// Calls `$disconnect` for each record, replacing each by a tombstone in the mirror once
/// reported (a takeover cut short resumes with the rest); up to
/// [`OrphanReporter::CONCURRENCY`] at once.
async fn report_lost(gateway: &Gateway, records: Vec<(String, MirrorRecord)>) {
    let Some(cluster) = gateway.cluster.as_ref() else {
        return;
    };
    let reporter = OrphanReporter::new(gateway, DisconnectReason::NodeLost);
    let reporter = &reporter;
    let reports = futures_util::stream::iter(records).map(|(subject, mut record)| async move {
        let authorizer = record.authorizer_context();
        // Its rooms are told it left (presence events, `member_left`), like any leave.
        let id = record.connection_id.parse::<ConnectionId>();
        for room in std::mem::take(&mut record.rooms) {
            if let (Ok(room), Ok(id)) = (RoomName::parse(&room), &id) {
                let directory = &gateway.directory;
                directory.membership_changed(&room, Change::Leave, *id, authorizer.as_deref());
            }
        }
        reporter.report(record.into(), authorizer).await;
        cluster.mark_reported(subject).await;
    });
    let mut reports = reports.buffer_unordered(OrphanReporter::CONCURRENCY);
    while reports.next().await.is_some() {}
}

/// Cluster mode's crash recovery, run at start before any orphan is reported the
/// single-node way. Connections that earlier runs of this data dir left behind (in the
/// local records and in the mirror) are reported as "node lost", one incarnation at a
/// time and under that incarnation's claim, so they are reported once even when a
/// surviving node noticed the crash too: an incarnation marked reported is only
/// forgotten locally; one a live survivor is reporting right now is left to it.
pub async fn recover_previous_runs(gateway: &Gateway, orphans: Vec<ConnectionRecord>) {
    let Some(cluster) = gateway.cluster.as_ref() else {
        return;
    };
    let node = cluster.node_id;
    let mut by_epoch: std::collections::BTreeMap<u32, Vec<ConnectionRecord>> =
        std::collections::BTreeMap::new();
    if let Some(previous) = &cluster.registry.previous {
        by_epoch.entry(previous.epoch).or_default();
    }
    for record in orphans {
        by_epoch
            .entry(epoch_of(&record.connection_id))
            .or_default()
            .push(record);
    }
    for (epoch, local) in by_epoch {
        let local_ids: Vec<String> = local.iter().map(|r| r.connection_id.clone()).collect();
        if cluster.registry.claim(node, epoch).await {
            let filter = cluster.subjects.mirror_incarnation(node, epoch);
            let mut records = cluster.mirrored_records(filter).await.unwrap_or_default();
            let mirrored: HashSet<String> = records
                .iter()
                .map(|(_, r)| r.connection_id.clone())
                .collect();
            for record in local {
                if mirrored.contains(&record.connection_id) {
                    continue;
                }
                let subject = (cluster.subjects).mirror_record(node, epoch, &record.connection_id);
                // A tombstone: it closed and was reported (its local record's removal was
                // lost with the crash), or another node reported it.
                if cluster.was_mirrored(&subject).await == Ok(true) {
                    continue;
                }
                records.push((subject, MirrorRecord::from(record)));
            }
            tracing::info!(
                epoch,
                connections = records.len(),
                "reporting connections cut when this node stopped uncleanly"
            );
            report_lost(gateway, records).await;
            forget_local_records(gateway, local_ids).await;
            cluster.registry.finish(node, epoch, None).await;
            cluster.metrics().cluster_takeovers.inc();
        } else {
            // Reported already, or being reported by a live survivor.
            forget_local_records(gateway, local_ids).await;
        }
    }
}

/// Removes local connection records whose connections have been reported.
async fn forget_local_records(gateway: &Gateway, connection_ids: Vec<String>) {
    if connection_ids.is_empty() {
        return;
    }
    let mut changes = switchboard_storage::RecordChanges::default();
    for id in connection_ids {
        changes.remove(id);
    }
    let records = gateway.records.clone();
    let _ = tokio::task::spawn_blocking(move || records.apply(changes)).await;
}

fn epoch_of(connection_id: &str) -> u32 {
    connection_id
        .parse::<crate::connection_id::ConnectionId>()
        .map_or(0, |id| id.epoch)
}

/// Starts a push deliverer on this node for every queue with `deliver_to`.
pub fn start_deliverers(
    gateway: &Arc<Gateway>,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(cluster) = gateway.cluster.clone() else {
        return Vec::new();
    };
    gateway
        .config
        .queues
        .iter()
        .filter_map(|queue| {
            let url = queue.deliver_to.clone()?;
            Some(tokio::spawn(deliver(
                cluster.clone(),
                queue.name.clone(),
                url,
                (queue.push, queue.format.clone()),
                gateway.metrics.clone(),
                shutdown.clone(),
            )))
        })
        .collect()
}

/// Starts the node's background work: answering other nodes, heartbeats and lost-node
/// takeovers, the record mirror, the queue deliverers. Each stops at `shutdown`.
pub fn run(
    gateway: &Arc<Gateway>,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(cluster) = gateway.cluster.clone() else {
        return Vec::new();
    };
    let mut tasks = vec![
        tokio::spawn(super::remote::serve(cluster.clone(), shutdown.clone())),
        tokio::spawn(super::interest::route_gathers(
            cluster.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(super::mirror::flush_loop(cluster.clone(), shutdown.clone())),
        tokio::spawn(heartbeat_loop(gateway.clone(), shutdown.clone())),
        tokio::spawn(watch_loop(gateway.clone(), shutdown.clone())),
    ];
    tasks.extend(start_deliverers(gateway, shutdown));
    tasks
}

/// Leaves the cluster at a clean stop: this run's mirrored records go (the node reported its
/// connections itself; any it could not report stay in its local records for its next
/// start) and so does its registration, so no takeover follows.
pub async fn leave(cluster: &Cluster) {
    let records = (cluster.subjects).mirror_incarnation(cluster.node_id, cluster.registry.epoch());
    cluster.forget_mirrored(records).await;
    cluster.registry.deregister().await;
    let _ = cluster.client.flush().await;
}
