#!/usr/bin/env bash
# Handshakes per second on one node (each connection recorded before it opens):
#   cargo build --release -p switchboard -p switchboard-loadgen
#   bash bench/scripts/connects.sh [ROUNDS]
# Opens 5,000 connections (four source addresses) ROUNDS times (default 3)
# against a fresh gateway each time. SWITCHBOARD=path measures another build the same way.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
for round in $(seq "$ROUNDS"); do
  (
    . bench/scripts/gateway.sh
    start_gateway <<CFG
[limits]
max_connections_per_ip = 0
connects_per_sec_per_ip = 0
CFG
    printf 'round %s: ' "$round"
    $L connect -c 5000 --source-addrs 4 --hold-secs 1 2>/dev/null | grep -E "^(connected|connects_per_sec) " | tr -s " " | paste -sd" "
  )
done
