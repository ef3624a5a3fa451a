#!/usr/bin/env bash
# permessage-deflate, measured (docs/PERFORMANCE.md, "Compression"):
#   cargo build --release -p switchboard -p switchboard-loadgen
#   bash bench/scripts/compression.sh fanout [C] [P] [BODY] [on|off] [RATE|max] [M]
#       a room of C members that all offer permessage-deflate (as browsers do); M messages
#       of P bytes shaped as BODY (ticker, chat, pad) published at RATE/s or as fast as
#       possible; the gateway compresses (on) or declines the offer (off). Prints loadgen's
#       report (deliveries/s, latency, wire bytes per delivery) and the server's CPU seconds.
#       MIN_BYTES, LEVEL: [server.compression] min_bytes (256) and level (6).
#       INFLATE=count: the clients count compressed messages without inflating them (the
#       server measured, not the clients' inflating on the same cores; no latency for them).
#   bash bench/scripts/compression.sh idle [C] [on|off]
#       C idle connections that negotiated it (on) or not (off): the server's RSS per
#       connection.
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/scripts/gateway.sh
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
config() {
  cat <<CFG
[server.compression]
enabled = $([ "$1" = on ] && echo true || echo false)
min_bytes = ${MIN_BYTES:-256}
level = ${LEVEL:-6}
[limits]
max_connections_per_ip = 0
connects_per_sec_per_ip = 0
messages_per_sec = 0
bytes_per_sec = 0
[api]
route_selection_expression = "\$request.body.action"
[routes.join]
integration = { type = "room_join", room = "\$request.body.room" }
CFG
}
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' /proc/$1/stat; }
case ${1:-} in
  fanout)
    C=${2:-5000}; P=${3:-512}; BODY=${4:-ticker}; ON=${5:-on}; RATE=${6:-max}; M=${7:-2000}
    start_gateway < <(config "$ON")
    rate=(); [ "$RATE" = max ] || rate=(--rate "$RATE")
    before=$(cpu_secs $pid)
    $L --deflate "${INFLATE:-inflate}" --source-addrs 4 fanout -c "$C" -m "$M" -p "$P" --body "$BODY" "${rate[@]}"
    echo "server CPU seconds: $(echo "$(cpu_secs $pid) - $before" | bc)"
    ;;
  idle)
    C=${2:-10000}; ON=${3:-on}
    start_gateway < <(config "$ON")
    $L --deflate inflate --source-addrs 4 connect -c "$C" --hold-secs 5 --server-pid "$pid"
    ;;
  *) echo "usage: $0 fanout [C] [P] [BODY] [on|off] [RATE|max] [M] | idle [C] [on|off]" >&2; exit 2;;
esac
