#!/usr/bin/env bash
# The JetStream anchor for the queue benchmarks: a fresh nats-server (file storage) and
# `jetstream_publish` with 10 publishers × 256 acks in flight, 200-byte messages:
#   cargo build --release -p switchboard-bench --bin jetstream_publish
#   NATS_SERVER=path/to/nats-server bash bench/scripts/jetstream.sh SYNC MESSAGES [RATE]
# SYNC is `default` (nats-server syncs every 2 minutes) or `always` (an fsync per message).
set -euo pipefail
cd "$(dirname "$0")/../.."
SYNC=$1; N=$2; RATE=${3:-}
NATS_SERVER=${NATS_SERVER:-$HOME/.cache/switchboard-nats-venv/bin/nats-server}
d=$(mktemp -d)
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$d"' EXIT
{
  echo "listen: 127.0.0.1:24222"
  echo "jetstream { store_dir: \"$d/js\""
  [ "$SYNC" = always ] && echo "  sync_interval: always"
  echo "}"
} > "$d/nats.conf"
"$NATS_SERVER" -c "$d/nats.conf" >/dev/null 2>&1 &
pid=$!
sleep 0.5
target/release/jetstream_publish nats://127.0.0.1:24222 10 256 "$N" $RATE
