#!/usr/bin/env bash
# Durable queue appends end to end (loadgen's WebSocket clients → ack frames), on a fresh
# data dir, then the bytes the queue takes on disk per message and the gateway's RSS:
#   cargo build --release -p switchboard -p switchboard-loadgen -p switchboard-bench
#   bash bench/scripts/queue.sh FSYNC MESSAGES [RATE] [CONNECTIONS]
# FSYNC is always | batch | never; RATE (frames/s over all clients) omitted = max rate.
# QUEUE_CONFIG adds lines to `[queues.bench]` (e.g. "max_messages = 1000000");
# RSS_EVERY=N prints the gateway's RSS every N seconds while the clients run. With a RATE,
# disk_probe runs beside them and prints the disk's own sync stalls in the same seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
FSYNC=$1; N=$2; RATE=${3:-}; C=${4:-10}
. bench/scripts/gateway.sh
start_gateway <<CFG
[storage]
fsync = "$FSYNC"
flush_interval_ms = 2
[limits]
max_connections_per_ip = 0
connects_per_sec_per_ip = 0
messages_per_sec = 0
bytes_per_sec = 0
[routes.enqueue]
integration = { type = "queue", queue = "bench", ack = true }
[queues.bench]
${QUEUE_CONFIG:-}
CFG
rate=()
if [ -n "$RATE" ]; then
  rate=(--rate "$RATE")
  target/release/disk_probe "$d" $((N / RATE + 1)) > "$d/probe.txt" &
  probe=$!
fi
if [ -n "${RSS_EVERY:-}" ]; then
  ( while kill -0 $pid 2>/dev/null; do
      echo "rss_kib=$(awk '/VmRSS/ {print $2}' /proc/$pid/status) queue_bytes=$(du -sb "$d/data/queues" | cut -f1)"
      sleep "$RSS_EVERY"
    done ) &
fi
$L queue -c "$C" -m "$N" -p 200 "${rate[@]}"
[ -n "$RATE" ] && wait $probe && cat "$d/probe.txt"
# Syncs slower than ~4 ms, and the slowest bucket: what an ack latency outlier waited on.
curl -s http://127.0.0.1:29090/metrics | awk '
  /^switchboard_storage_flush_duration_seconds_bucket/ {
    split($0, a, "le=\""); split(a[2], b, "\""); le = b[1]; n = $NF
    if (le == "0.00390625") fast = n
    if (n > prev) slowest = le
    prev = n
  }
  /^switchboard_storage_flush_duration_seconds_count/ { total = $NF }
  END { printf "syncs=%d slower_than_4ms=%d slowest_bucket_le=%s\n", total, total - fast, slowest }'
bytes=$(du -sb "$d/data/queues" | cut -f1)
rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
echo "fsync=$FSYNC messages=$N queue_bytes=$bytes bytes_per_message=$((bytes / N)) gateway_rss_kib=$rss"
