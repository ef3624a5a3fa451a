#!/usr/bin/env bash
# What `[api] resume = true` costs, measured next to `false` with fresh gateways:
#   cargo build --release -p switchboard -p switchboard-loadgen
#   bash bench/scripts/resume.sh RESUME [CONNECTIONS]
# RESUME is true | false. Runs `switchboard-loadgen connect` (idle memory per connection,
# each client having read its welcome frame when resume is on), then `fanout` to a room of
# CONNECTIONS (default 1000) members at max rate (each delivery also kept in the member's
# resend buffer when resume is on).
set -euo pipefail
cd "$(dirname "$0")/../.."
RESUME=$1; C=${2:-1000}
d=$(mktemp -d)
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$d"' EXIT
cat > "$d/sb.toml" <<CFG
[server]
listen = "127.0.0.1:28080"
data_dir = "$d/data"
[management]
listen = "127.0.0.1:29090"
[api]
resume = $RESUME
[limits]
max_connections_per_ip = 0
connects_per_sec_per_ip = 0
[routes.join]
integration = { type = "room_join", room = "\$request.body.room" }
CFG
RUST_LOG=warn target/release/switchboard serve --config "$d/sb.toml" 2>/dev/null &
pid=$!
for _ in $(seq 50); do curl -sf http://127.0.0.1:29090/health >/dev/null && break; sleep 0.1; done
L="target/release/switchboard-loadgen --url ws://127.0.0.1:28080/dev --api http://127.0.0.1:29090/dev"
echo "resume=$RESUME"
$L connect -c 10000 --source-addrs 2 --hold-secs 3 --server-pid $pid | grep -iE "connected|rss|per"
$L fanout -c "$C" -m 3000 -p 128 --window 32 | grep -E "deliveries_per_sec|verdict|latency_ms.p99 "
