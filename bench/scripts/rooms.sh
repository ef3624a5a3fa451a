#!/usr/bin/env bash
# Rooms that remember, measured (docs/PERFORMANCE.md, "Rooms that remember"):
#   cargo build --release -p switchboard -p switchboard-loadgen
#   bash bench/scripts/rooms.sh rejoin [C] [HISTORY]   a storm of C members rejoining one room
#                                                       with `history: HISTORY` (0: a plain
#                                                       replay-less join, for comparison)
#   bash bench/scripts/rooms.sh presence [C]            presence queries on a C-member room
#   bash bench/scripts/rooms.sh memory [M] [P]          RSS per kept message: M messages of P
#                                                       bytes kept in one room
#   bash bench/scripts/rooms.sh conflate [C] [RATE] [SECONDS] [on|off]
#                                                       a ticker room of C members, a tenth of
#                                                       them reading at a tenth of RATE keyed
#                                                       ticks/s (50 keys), conflating or not
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/scripts/gateway.sh
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
limits='[limits]
max_connections_per_ip = 0
connects_per_sec_per_ip = 0
messages_per_sec = 0
bytes_per_sec = 0'
routes='[api]
route_selection_expression = "$request.body.action"
[routes.join]
integration = { type = "room_join", room = "$request.body.room", history = "$request.body.history" }'
rss_kib() { awk '/VmRSS/ {print $2}' /proc/$1/status; }
case ${1:-} in
  rejoin)
    C=${2:-5000}; K=${3:-50}
    start_gateway <<CFG
$limits
[rooms]
history_size = 50
$routes
CFG
    $L --source-addrs 4 rejoin -c "$C" --history "$K" --server-pid "$pid"
    ;;
  presence)
    C=${2:-50000}
    start_gateway <<CFG
$limits
$routes
CFG
    $L --source-addrs 4 presence -c "$C"
    echo "server RSS KiB: $(rss_kib $pid)"
    ;;
  memory)
    M=${2:-100000}; P=${3:-128}
    start_gateway <<CFG
$limits
[rooms]
history_size = 100000
$routes
CFG
    before=$(rss_kib $pid)
    $L fanout -c 1 -m "$M" -p "$P" --room kept >/dev/null
    sleep 1
    after=$(rss_kib $pid)
    echo "kept $M messages of $P bytes: RSS $before -> $after KiB, $(( (after - before) * 1024 / M )) bytes per message"
    ;;
  conflate)
    C=${2:-5000}; RATE=${3:-200}; SECONDS=${4:-20}; ON=${5:-on}
    conflate=$([ "$ON" = on ] && echo true || echo false)
    start_gateway <<CFG
$limits
[[rooms.class]]
pattern = "ticker:*"
conflate = $conflate
$routes
CFG
    $L --source-addrs 4 conflate -c "$C" --rate "$RATE" --seconds "$SECONDS" --server-pid "$pid"
    ;;
  *) echo "usage: $0 rejoin [C] [HISTORY] | presence [C] | memory [M] [P] | conflate [C] [RATE] [SECONDS] [on|off]" >&2; exit 2;;
esac
