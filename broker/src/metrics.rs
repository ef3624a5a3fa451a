//! Every Prometheus metric the gateway exports, defined once with its help text.
//!
//! Labels stay low-cardinality: route keys (configured routes only), integration kinds,
//! results and reasons from fixed sets. Never a connectionId or a room name.

use crate::outbound::Wire;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The gateway's metrics and the registry that exports them.
/// The `route` label of the http authorizer's integration series.
pub const AUTHORIZER_ROUTE: &str = "$authorizer";

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Connections currently open (after a successful `$connect`), by transport
    /// (websocket, webtransport).
    pub connections_active: IntGaugeVec,
    /// Handshakes by result and transport: accepted, rejected (by `$connect`), not_found,
    /// bad_request, backend_error, the admission refusals over_capacity, overloaded,
    /// ip_limit, ip_rate, and fenced (a cluster node that lost touch with its cluster).
    pub connections_total: IntCounterVec,
    /// Inbound messages by the route they were dispatched to.
    pub messages_received: IntCounterVec,
    /// Frames queued to clients (responses, pushes, error frames).
    pub messages_sent: IntCounter,
    /// Backend round-trip time by route and integration kind.
    pub integration_duration: HistogramVec,
    /// Failed integration calls by route and kind (timeout, unreachable, status).
    pub integration_errors: IntCounterVec,
    /// Closed connections by the reason `$disconnect` reports.
    pub disconnects: IntCounterVec,
    /// Connections closed because they could not keep up with their outbound queue.
    pub slow_consumer_disconnects: IntCounter,
    /// Bytes written to clients per vectored write: how well writes coalesce.
    pub write_batch_bytes: Histogram,
    /// Client messages held back by their connection's inbound rate limit.
    pub inbound_throttled: IntCounter,
    /// Connections closed for staying over their inbound rate limit.
    pub rate_limited: IntCounter,
    /// Connections cut because the outbound memory budget ran out.
    pub overload_disconnects: IntCounter,
    /// Bytes queued to clients across all connections (as of the last sweep).
    pub outbound_queued_bytes: IntGauge,
    /// 1 while the outbound memory budget is exceeded and new connections are refused.
    pub overloaded: IntGauge,
    /// Client sockets open, handshakes included (updated at scrape time).
    pub open_sockets: IntGauge,
    /// Client requests refused by a limit, by reason (rooms_per_connection, not_a_member,
    /// room_not_allowed).
    pub refused: IntCounterVec,
    /// `$connect` authorizer verdicts: allowed, missing, malformed, denied.
    pub authorizer_results: IntCounterVec,
    /// Entries appended (and acknowledged durable) per queue.
    pub queue_appended: IntCounterVec,
    /// Entries retained per queue (updated at scrape time).
    pub queue_depth: IntGaugeVec,
    /// Segment files per queue (updated at scrape time).
    pub queue_segments: IntGaugeVec,
    /// Bytes of segment files per queue (updated at scrape time).
    pub queue_stored_bytes: IntGaugeVec,
    /// Bytes of torn writes cut from queue segments at start.
    pub queue_recovered_bytes: IntCounter,
    /// Appends that could not be stored, by queue and kind (disk_full, io).
    pub queue_append_errors: IntCounterVec,
    /// Entries a consumer group has not committed yet (updated at scrape time).
    pub queue_consumer_lag: IntGaugeVec,
    /// Push deliveries by queue and result (ok, error).
    pub queue_delivery_attempts: IntCounterVec,
    /// Time of each queue log flush (fsync).
    pub storage_flush_duration: Histogram,
    /// Time from a shard handing a turn's appends to the queue log until they are durable.
    pub queue_append_duration: Histogram,
    /// Entries per queue log flush (group commit size).
    pub queue_flush_batch_size: Histogram,
    /// Entries per `deliver_to` push request.
    pub queue_push_batch_size: Histogram,
    /// Time from a broadcast or bulk request to its frame being queued to every recipient
    /// (cluster mode: with the other nodes' counts), by kind (room, bulk).
    pub fanout_duration: HistogramVec,
    /// Sockets the admission gate lets in at most (`server.max_connections`, capped by
    /// the open-files limit less `server.fd_reserve`).
    pub connection_capacity: IntGauge,
    /// Cluster mode: 1 while the node's NATS connection is up.
    pub cluster_nats_connected: IntGauge,
    /// Cluster mode: nodes whose heartbeat this node sees, itself included.
    pub cluster_nodes_live: IntGauge,
    /// Cluster mode: round trip of a call to another node, by op (send, get, delete,
    /// join, leave, bulk, broadcast, list).
    pub cluster_request_duration: HistogramVec,
    /// Cluster mode: calls to other nodes that failed, by op and kind (timeout,
    /// no_responders, nats).
    pub cluster_request_errors: IntCounterVec,
    /// Cluster mode: messages this node sent over NATS, by kind (push, bulk, broadcast,
    /// queue, mirror).
    pub cluster_forwarded: IntCounterVec,
    /// Cluster mode: rooms this node is subscribed to (it has local members).
    pub cluster_room_interest: IntGauge,
    /// Cluster mode: lost nodes whose connections this node reported to `$disconnect`.
    pub cluster_takeovers: IntCounter,
    /// Conflating rooms' messages that took the place of a queued one with the same key.
    pub conflated_messages: IntCounter,
    /// Room webhook events by outcome: stored (to be POSTed), dropped (too many waited
    /// for storage).
    pub webhook_events: IntCounterVec,
    /// Resumable connections whose socket is gone, waiting for their client.
    pub connections_parked: IntGauge,
    /// Resume attempts by outcome: resumed, expired, unknown, overflow, refused (the
    /// authorizer or `$connect` said no).
    pub resumes: IntCounterVec,
    /// Messages sent again to resumed clients.
    pub resume_replayed: IntCounter,
    /// Gaps a member of a numbered room found in its frames, by outcome: mended (read
    /// from the room's history and queued in order), unmended (the history did not have
    /// them any more, or its owner did not answer).
    pub room_gaps: IntCounterVec,
}

impl Metrics {
    /// Creates the series of every `http` route (and of the http authorizer, under
    /// [`AUTHORIZER_ROUTE`]), so dashboards and alerts that query them see zeros from the
    /// start instead of nothing until the first call.
    pub fn register_routes<'a>(
        &self,
        http_routes: impl IntoIterator<Item = &'a str>,
        http_authorizer: bool,
    ) {
        let authorizer = http_authorizer.then_some(AUTHORIZER_ROUTE);
        for route in http_routes.into_iter().chain(authorizer) {
            let _ = self
                .integration_duration
                .with_label_values(&[route, "http"]);
            for kind in ["timeout", "unreachable", "status"] {
                let _ = self.integration_errors.with_label_values(&[route, kind]);
            }
        }
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            connections_active: gauge_vec(
                "switchboard_connections_active",
                "Client connections currently open, by transport",
                &["transport"],
            ),
            connections_total: counter_vec(
                "switchboard_connections_total",
                "Client handshakes by result and transport",
                &["result", "transport"],
            ),
            messages_received: counter_vec(
                "switchboard_messages_received_total",
                "Inbound messages by route",
                &["route"],
            ),
            messages_sent: IntCounter::new(
                "switchboard_messages_sent_total",
                "Frames queued to clients",
            )
            .unwrap_or_else(|_| unreachable!("static metric definition")),
            integration_duration: HistogramVec::new(
                HistogramOpts::new(
                    "switchboard_integration_duration_seconds",
                    "Backend integration latency",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ]),
                &["route", "integration"],
            )
            .unwrap_or_else(|_| unreachable!("static metric definition")),
            integration_errors: counter_vec(
                "switchboard_integration_errors_total",
                "Failed integration calls by route and kind",
                &["route", "kind"],
            ),
            disconnects: counter_vec(
                "switchboard_disconnects_total",
                "Closed connections by reason",
                &["reason"],
            ),
            slow_consumer_disconnects: IntCounter::new(
                "switchboard_slow_consumer_disconnects_total",
                "Connections closed because their outbound queue overflowed",
            )
            .unwrap_or_else(|_| unreachable!("static metric definition")),
            write_batch_bytes: histogram(
                "switchboard_write_batch_bytes",
                "Bytes per vectored socket write to a client",
                prometheus::exponential_buckets(64.0, 4.0, 9),
            ),
            inbound_throttled: counter(
                "switchboard_inbound_throttled_total",
                "Client messages held back by the connection's inbound rate limit",
            ),
            rate_limited: counter(
                "switchboard_rate_limited_disconnects_total",
                "Connections closed for staying over their inbound rate limit",
            ),
            overload_disconnects: counter(
                "switchboard_overload_disconnects_total",
                "Connections cut because the outbound memory budget ran out",
            ),
            outbound_queued_bytes: gauge(
                "switchboard_outbound_queued_bytes",
                "Bytes queued to clients across all connections",
            ),
            overloaded: gauge(
                "switchboard_overloaded",
                "1 while the outbound memory budget is exceeded and new connections are refused",
            ),
            open_sockets: gauge(
                "switchboard_open_sockets",
                "Client sockets open, handshakes included",
            ),
            refused: counter_vec(
                "switchboard_refused_total",
                "Client requests refused by a limit, by reason",
                &["reason"],
            ),
            authorizer_results: counter_vec(
                "switchboard_authorizer_total",
                "$connect authorizer verdicts by result",
                &["result"],
            ),
            queue_appended: counter_vec(
                "switchboard_queue_appended_total",
                "Entries appended to durable queues",
                &["queue"],
            ),
            queue_depth: gauge_vec(
                "switchboard_queue_depth",
                "Entries retained in each durable queue",
                &["queue"],
            ),
            queue_segments: gauge_vec(
                "switchboard_queue_segments",
                "Segment files of each durable queue",
                &["queue"],
            ),
            queue_stored_bytes: gauge_vec(
                "switchboard_queue_stored_bytes",
                "Bytes of each durable queue's segment files",
                &["queue"],
            ),
            queue_recovered_bytes: IntCounter::new(
                "switchboard_queue_recovered_bytes_total",
                "Bytes of torn writes cut from queue segments at start",
            )
            .unwrap_or_else(|_| unreachable!("static metric definition")),
            queue_append_errors: counter_vec(
                "switchboard_queue_append_errors_total",
                "Queue appends not stored, by kind",
                &["queue", "kind"],
            ),
            queue_consumer_lag: gauge_vec(
                "switchboard_queue_consumer_lag",
                "Entries a consumer group has not committed",
                &["queue", "group"],
            ),
            queue_delivery_attempts: counter_vec(
                "switchboard_queue_delivery_attempts_total",
                "Push delivery attempts by result",
                &["queue", "result"],
            ),
            storage_flush_duration: histogram(
                "switchboard_storage_flush_duration_seconds",
                "Duration of each queue log flush",
                prometheus::exponential_buckets(0.0001, 2.5, 12),
            ),
            queue_append_duration: histogram(
                "switchboard_queue_append_duration_seconds",
                "Time from a shard's hand-off of appends until they are durable",
                prometheus::exponential_buckets(0.0001, 2.5, 12),
            ),
            queue_flush_batch_size: histogram(
                "switchboard_queue_flush_batch_size",
                "Entries made durable per queue log flush",
                prometheus::exponential_buckets(1.0, 4.0, 9),
            ),
            queue_push_batch_size: histogram(
                "switchboard_queue_push_batch_size",
                "Entries per deliver_to push request",
                prometheus::exponential_buckets(1.0, 4.0, 8),
            ),
            fanout_duration: fast_latency_vec(
                "switchboard_fanout_duration_seconds",
                "Time to queue a broadcast or bulk push to every recipient, by kind",
                &["kind"],
            ),
            connection_capacity: gauge(
                "switchboard_connection_capacity",
                "Client sockets the gateway admits at most (max_connections capped by the open-files limit)",
            ),
            cluster_nats_connected: gauge(
                "switchboard_cluster_nats_connected",
                "1 while the node's NATS connection is up (cluster mode)",
            ),
            cluster_nodes_live: gauge(
                "switchboard_cluster_nodes_live",
                "Nodes with a live heartbeat, this one included (cluster mode)",
            ),
            cluster_request_duration: fast_latency_vec(
                "switchboard_cluster_request_duration_seconds",
                "Round trip of a call to another node, by op",
                &["op"],
            ),
            cluster_request_errors: counter_vec(
                "switchboard_cluster_request_errors_total",
                "Calls to other nodes that failed, by op and kind",
                &["op", "kind"],
            ),
            cluster_forwarded: counter_vec(
                "switchboard_cluster_forwarded_total",
                "Messages sent over NATS, by kind",
                &["kind"],
            ),
            cluster_room_interest: gauge(
                "switchboard_cluster_room_interest",
                "Rooms this node subscribes to because it has local members",
            ),
            cluster_takeovers: counter(
                "switchboard_cluster_node_takeovers_total",
                "Lost nodes whose connections this node reported to $disconnect",
            ),
            conflated_messages: counter(
                "switchboard_conflated_messages_total",
                "Conflating rooms' messages that took the place of a queued, unsent one with the same key",
            ),
            webhook_events: counter_vec(
                "switchboard_webhook_events_total",
                "Room webhook events by outcome: stored (to be POSTed), dropped (too many waited for storage)",
                &["outcome"],
            ),
            connections_parked: gauge(
                "switchboard_connections_parked",
                "Resumable connections whose socket is gone, waiting for their client",
            ),
            resumes: counter_vec(
                "switchboard_resumes_total",
                "Resume attempts by outcome",
                &["outcome"],
            ),
            resume_replayed: counter(
                "switchboard_resume_replayed_messages_total",
                "Messages sent again to clients that resumed",
            ),
            room_gaps: counter_vec(
                "switchboard_room_gaps_total",
                "Gaps a member of a numbered room found in its frames, by outcome (mended from the room's history, or not)",
                &["outcome"],
            ),
            registry,
        };
        metrics.register_all();
        metrics.initialize_known_labels();
        metrics
    }

    /// Creates the series of every fixed label value at zero, so that dashboards and
    /// alerts find them (and cluster metrics read the same on every node) before the first
    /// event.
    fn initialize_known_labels(&self) {
        const OPS: [&str; 10] = [
            "send",
            "get",
            "delete",
            "join",
            "leave",
            "bulk",
            "broadcast",
            "list",
            "move",
            "move_status",
        ];
        for op in OPS {
            let _ = self.cluster_request_duration.with_label_values(&[op]);
            for kind in ["timeout", "no_responders", "nats"] {
                let _ = self.cluster_request_errors.with_label_values(&[op, kind]);
            }
        }
        for kind in ["push", "bulk", "broadcast", "queue", "mirror"] {
            let _ = self.cluster_forwarded.with_label_values(&[kind]);
        }
        for kind in ["room", "bulk"] {
            let _ = self.fanout_duration.with_label_values(&[kind]);
        }
        for reason in ["rooms_per_connection", "not_a_member", "room_not_allowed"] {
            let _ = self.refused.with_label_values(&[reason]);
        }
        for outcome in ["resumed", "expired", "unknown", "overflow", "refused"] {
            let _ = self.resumes.with_label_values(&[outcome]);
        }
        for outcome in ["mended", "unmended"] {
            let _ = self.room_gaps.with_label_values(&[outcome]);
        }
        for transport in [Wire::WebSocket, Wire::WebTransport] {
            let _ = self
                .connections_active
                .with_label_values(&[transport.label()]);
            let _ = self
                .connections_total
                .with_label_values(&["accepted", transport.label()]);
        }
    }

    fn register_all(&self) {
        for collector in self.collectors() {
            if let Err(error) = self.registry.register(collector) {
                tracing::error!(%error, "metric registration failed");
            }
        }
    }

    /// Every metric family's name, exported or not yet (a labelled family shows in
    /// `/metrics` only once it has a series).
    pub fn names(&self) -> Vec<String> {
        self.collectors()
            .iter()
            .flat_map(|collector| collector.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect()
    }

    fn collectors(&self) -> [Box<dyn prometheus::core::Collector>; 44] {
        [
            Box::new(self.connections_active.clone()),
            Box::new(self.connections_total.clone()),
            Box::new(self.messages_received.clone()),
            Box::new(self.messages_sent.clone()),
            Box::new(self.integration_duration.clone()),
            Box::new(self.integration_errors.clone()),
            Box::new(self.disconnects.clone()),
            Box::new(self.slow_consumer_disconnects.clone()),
            Box::new(self.write_batch_bytes.clone()),
            Box::new(self.inbound_throttled.clone()),
            Box::new(self.rate_limited.clone()),
            Box::new(self.overload_disconnects.clone()),
            Box::new(self.outbound_queued_bytes.clone()),
            Box::new(self.overloaded.clone()),
            Box::new(self.open_sockets.clone()),
            Box::new(self.refused.clone()),
            Box::new(self.authorizer_results.clone()),
            Box::new(self.queue_appended.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.queue_segments.clone()),
            Box::new(self.queue_stored_bytes.clone()),
            Box::new(self.queue_recovered_bytes.clone()),
            Box::new(self.queue_append_errors.clone()),
            Box::new(self.queue_consumer_lag.clone()),
            Box::new(self.queue_delivery_attempts.clone()),
            Box::new(self.storage_flush_duration.clone()),
            Box::new(self.queue_append_duration.clone()),
            Box::new(self.queue_flush_batch_size.clone()),
            Box::new(self.queue_push_batch_size.clone()),
            Box::new(self.fanout_duration.clone()),
            Box::new(self.connection_capacity.clone()),
            Box::new(self.cluster_nats_connected.clone()),
            Box::new(self.cluster_nodes_live.clone()),
            Box::new(self.cluster_request_duration.clone()),
            Box::new(self.cluster_request_errors.clone()),
            Box::new(self.cluster_forwarded.clone()),
            Box::new(self.cluster_room_interest.clone()),
            Box::new(self.cluster_takeovers.clone()),
            Box::new(self.webhook_events.clone()),
            Box::new(self.conflated_messages.clone()),
            Box::new(self.connections_parked.clone()),
            Box::new(self.resumes.clone()),
            Box::new(self.resume_replayed.clone()),
            Box::new(self.room_gaps.clone()),
        ]
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%error, "metric encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn histogram(name: &str, help: &str, buckets: prometheus::Result<Vec<f64>>) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.unwrap_or_default());
    Histogram::with_opts(opts).unwrap_or_else(|_| unreachable!("static metric definition"))
}

/// A latency histogram for work measured in micro- to milliseconds (100 µs to 1 s).
fn fast_latency_vec(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    ];
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|_| unreachable!("static metric definition"))
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).unwrap_or_else(|_| unreachable!("static metric definition"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).unwrap_or_else(|_| unreachable!("static metric definition"))
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|_| unreachable!("static metric definition"))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|_| unreachable!("static metric definition"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backticked names in the first column of a docs/REFERENCE.md table whose
    /// names start with `prefix`.
    pub(crate) fn reference_names(prefix: &str) -> std::collections::BTreeSet<String> {
        include_str!("../../docs/REFERENCE.md")
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|rest| rest.split('`').next())
            .filter(|name| name.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_metric_is_in_the_reference() {
        let code: std::collections::BTreeSet<String> = Metrics::new().names().into_iter().collect();
        assert_eq!(code, reference_names("switchboard_"));
    }
}
