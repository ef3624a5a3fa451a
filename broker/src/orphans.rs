//! Connections that ended without their session, reported to `$disconnect`: those a crash
//! cut (found in the records at the next start) and, in cluster mode, those a lost node
//! held. Many at once, and each again while the backend refuses it: nothing else will
//! report them.

use futures_util::StreamExt;
use switchboard_storage::ConnectionRecord;

use crate::disconnect::DisconnectReason;
use crate::event::ConnectionFacts;
use crate::gateway::Gateway;
use crate::integration::HttpIntegration;

/// Reports connections that ended without their session to `$disconnect`: those a crash
/// cut (found in the records at the next start) and, in cluster mode, those a lost node
/// held. Up to [`OrphanReporter::CONCURRENCY`] reports may be in flight at once.
pub struct OrphanReporter<'a> {
    gateway: &'a Gateway,
    http: HttpIntegration,
    ids: std::sync::Mutex<crate::connection_id::IdMinter>,
    domain_name: String,
    reason: DisconnectReason,
}

impl<'a> OrphanReporter<'a> {
    /// Reports in flight at once, at most: 100,000 connections of a lost node are reported
    /// in about a minute at a backend's 2 ms, and a small backend is not flooded.
    pub const CONCURRENCY: usize = 32;
    /// How long a report is sent again while the backend refuses it (unreachable, 429,
    /// 5xx): 0.2 s, 0.4 s, 0.8 s, 1.6 s apart, then every [`OrphanReporter::RETRY_MAX`].
    /// Past that it is dropped, and logged: a backend down that long has lost more.
    pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);
    /// The longest pause between two calls of one report.
    pub const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

    pub fn new(gateway: &'a Gateway, reason: DisconnectReason) -> Self {
        let server = &gateway.config.server;
        Self {
            gateway,
            http: HttpIntegration::new(),
            ids: std::sync::Mutex::new(crate::connection_id::IdMinter::new(
                server.node_id,
                server.shards as u16,
                gateway.epoch,
            )),
            domain_name: server.listen.to_string(),
            reason,
        }
    }

    /// Calls `$disconnect` for the connection of `record` (and counts it), with the
    /// authorizer context when it was kept.
    pub async fn report(
        &self,
        record: switchboard_storage::ConnectionRecord,
        authorizer: Option<std::sync::Arc<serde_json::value::RawValue>>,
    ) {
        let facts = ConnectionFacts {
            connection_id: record.connection_id,
            connected_at_ms: record.connected_at_ms,
            source_ip: record.source_ip,
            user_agent: record.user_agent,
            domain_name: self.domain_name.clone(),
            authorizer,
        };
        let reason = &self.reason;
        self.gateway
            .metrics
            .disconnects
            .with_label_values(&[reason.label()])
            .inc();
        // A backend that a takeover's burst of reports overwhelms, or that is down, gets each
        // again until it takes it: these connections have no session left to report them.
        let started = std::time::Instant::now();
        let mut backoff = std::time::Duration::from_millis(200);
        loop {
            let request_id = (self.ids.lock())
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .request_id();
            let reported = crate::dispatch::report_disconnect(
                self.gateway,
                &self.http,
                &facts,
                &request_id,
                reason,
            );
            if reported.await == crate::dispatch::Reported::Done {
                return;
            }
            if started.elapsed() >= Self::PATIENCE {
                tracing::error!(
                    connection_id = %facts.connection_id,
                    "the backend refused this $disconnect for {:?}; it is dropped",
                    Self::PATIENCE
                );
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Self::RETRY_MAX);
        }
    }
}

/// Reports the connections an unclean stop of this single node cut (the records its
/// previous run left), each record removed once reported.
pub async fn report_cut(gateway: &Gateway, orphans: Vec<ConnectionRecord>) {
    tracing::info!(
        count = orphans.len(),
        "reporting connections cut by an unclean stop"
    );
    let reporter = OrphanReporter::new(gateway, DisconnectReason::GatewayRestarted);
    let reports = futures_util::stream::iter(orphans).map(|record| async {
        let connection_id = record.connection_id.clone();
        reporter.report(record, None).await;
        let mut changes = switchboard_storage::RecordChanges::default();
        changes.remove(connection_id);
        let records = gateway.records.clone();
        let _ = tokio::task::spawn_blocking(move || records.apply(changes)).await;
    });
    let mut reports = reports.buffer_unordered(OrphanReporter::CONCURRENCY);
    while reports.next().await.is_some() {}
}
