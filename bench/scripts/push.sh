#!/usr/bin/env bash
# Queue push delivery against a backend that takes LATENCY_MS (default 50) per request:
#   cargo build --release -p switchboard -p switchboard-loadgen -p switchboard-bench --bin slow_backend
#   bash bench/scripts/push.sh BATCH_SIZE MAX_IN_FLIGHT ENTRIES [LATENCY_MS]
# Queues ENTRIES frames (loadgen, 10 clients), then times until the backend has them all.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=$1; F=$2; N=$3; LATENCY=${4:-50}
d=$(mktemp -d)
target/release/slow_backend 18999 "$LATENCY" &
backend=$!
trap 'kill $backend 2>/dev/null; rm -rf "$d"' EXIT
sleep 0.5
cat > $d/sb.toml <<CFG
[server]
listen = "127.0.0.1:28080"
shards = 1
data_dir = "$d/data"
[management]
listen = "127.0.0.1:29090"
[limits]
max_connections_per_ip = 0
connects_per_sec_per_ip = 0
messages_per_sec = 0
bytes_per_sec = 0
[queues.bench]
batch_size = $B
max_in_flight = $F
[routes.enqueue]
integration = { type = "queue", queue = "bench", ack = true, deliver_to = "http://127.0.0.1:18999/" }
CFG
before=$(curl -s http://127.0.0.1:18999/)
RUST_LOG=warn target/release/switchboard serve --config $d/sb.toml 2>/dev/null &
pid=$!
sleep 0.5
start=$(date +%s.%N)
target/release/switchboard-loadgen --json --url ws://127.0.0.1:28080/dev --api http://127.0.0.1:29090/dev queue -c 10 -m $N >/dev/null
while [ $(( $(curl -s http://127.0.0.1:18999/) - before )) -lt $N ]; do sleep 0.05; done
end=$(date +%s.%N)
kill $pid; wait $pid 2>/dev/null || true
python3 -c "print('batch_size=$B max_in_flight=$F entries=$N secs=%.2f entries_per_sec=%.0f' % ($end-$start, $N/($end-$start)))"
