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
. bench/scripts/gateway.sh
start_gateway <<CFG
[api]
resume = $RESUME
[limits]
max_connections_per_ip = 0
connects_per_sec_per_ip = 0
[routes.join]
integration = { type = "room_join", room = "\$request.body.room" }
CFG
echo "resume=$RESUME"
$L connect -c 10000 --source-addrs 2 --hold-secs 3 --server-pid $pid | grep -iE "connected|rss|per"
$L fanout -c "$C" -m 3000 -p 128 --window 32 | grep -E "deliveries_per_sec|verdict|latency_ms.p99 "
