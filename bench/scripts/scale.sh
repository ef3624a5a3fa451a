#!/usr/bin/env bash
# Past one process's descriptors: three cluster nodes on one nats-server hold CONNECTIONS
# clients together (default 50,000), all in one room, from three load generators (one
# process may hold at most its open-files limit, 20,000 here). One of them publishes
# MESSAGES broadcasts at RATE through node PUBLISH_NODE's management API; the other two only
# listen. Reports each load generator's deliveries/s and latency, each node's resident
# memory (and per connection), and NATS messages per broadcast.
#
#   cargo build --release -p switchboard -p switchboard-loadgen
#   NATS_SERVER=~/.cache/switchboard-nats-venv/bin/nats-server bash bench/scripts/scale.sh
#
# Env: CONNECTIONS (50000), MESSAGES (100), RATE (5), PAYLOAD (128), PUBLISH_NODE (1).
# KILL_NODE=N: every node reports `$disconnect` to a small HTTP backend here, and node N is
# killed (SIGKILL) 5 s into the publishing; the report adds how long the survivors took to
# report its connections ("node lost") and at what rate (the listeners then report the
# connections they lost as DROPPED).
# Results go to stdout (JSON lines); loopback only.
set -euo pipefail
cd "$(dirname "$0")/../.."

NATS_SERVER=${NATS_SERVER:-$HOME/.cache/switchboard-nats-venv/bin/nats-server}
CONNECTIONS=${CONNECTIONS:-50000}
MESSAGES=${MESSAGES:-100}
RATE=${RATE:-5}
PAYLOAD=${PAYLOAD:-128}
PUBLISH_NODE=${PUBLISH_NODE:-1}
KILL_NODE=${KILL_NODE:-}
SB=target/release/switchboard
L=target/release/switchboard-loadgen
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "# $(date -u +%FT%TZ) $(nproc) cores, $(git rev-parse --short HEAD)" >&2

disconnect_route=""
if [ -n "$KILL_NODE" ]; then
  # The backend: notes when each "node lost" $disconnect arrived.
  python3 - "$work/disconnects" <<'PY' &
import http.server, json, sys, time
log = open(sys.argv[1], "a", buffering=1)
class Backend(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        reason = json.loads(body or b"{}").get("requestContext", {}).get("disconnectReason", "")
        log.write(f"{time.time():.6f} {reason.replace(' ', '_')}\n")
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *args): pass
class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 4096  # a burst of reports is not refused at the door
Server(("127.0.0.1", 18999), Backend).serve_forever()
PY
  pids+=($!)
  disconnect_route='[routes."$disconnect"]
integration = { type = "http", url = "http://127.0.0.1:18999/disconnect" }'
fi

"$NATS_SERVER" -a 127.0.0.1 -p 14222 -m 18222 -js -sd "$work/nats" 2>"$work/nats.log" &
pids+=($!)
sleep 0.5

node_pids=()
for id in 1 2 3; do
  mkdir -p "$work/n$id"
  cat > "$work/n$id/sb.toml" <<EOF
[server]
listen = "127.0.0.1:$((18079 + id))"
shards = 1
node_id = $id
data_dir = "$work/n$id/data"
[management]
listen = "127.0.0.1:$((19089 + id))"
[limits]
max_connections_per_ip = 0
connects_per_sec_per_ip = 0
[cluster]
nats_url = "nats://127.0.0.1:14222"
[routes.join]
integration = { type = "room_join", room = "\$request.body.room" }
$disconnect_route
EOF
  RUST_LOG=warn "$SB" serve --config "$work/n$id/sb.toml" 2>"$work/n$id/log" &
  pids+=($!)
  node_pids+=($!)
done
for id in 1 2 3; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$((19089 + id))/health" >/dev/null && break; sleep 0.1; done
done

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
idle=(); for pid in "${node_pids[@]}"; do idle+=("$(rss_kib "$pid")"); done

nodes=ws://127.0.0.1:18080/dev,ws://127.0.0.1:18081/dev,ws://127.0.0.1:18082/dev
api=http://127.0.0.1:$((19089 + PUBLISH_NODE))/dev
share=$((CONNECTIONS / 3))
# Each load generator connects from its own two loopback addresses (~28,000 ports each).
common=(--json --url "$nodes" --api "$api" --source-addrs 2 fanout --room scale -m "$MESSAGES"
  -p "$PAYLOAD" --room-members "$CONNECTIONS" --timeout-secs 600)
for n in 1 2; do
  "$L" --source-base $((1 + 2 * n)) "${common[@]}" -c "$share" --listen-only \
    >"$work/listener$n.json" 2>"$work/listener$n.log" &
  pids+=($!)
  listeners+=($!)
done

# Once publishing has begun (node 1 has forwarded a broadcast; the publisher waits for every
# member first): resident memory, NATS's counters and the broadcasts so far, so that NATS
# messages per broadcast count only what the broadcasts added. Ends with the publisher.
broadcasts() {
  curl -s --max-time 5 http://127.0.0.1:19090/metrics \
    | awk '/^switchboard_cluster_forwarded_total\{kind="broadcast"\}/ {print $2}'
}
sample() {
  while [ ! -e "$work/publisher.done" ]; do
    if [ "$(broadcasts)" != "0" ] && [ -n "$(broadcasts)" ]; then
      loaded=(); for pid in "${node_pids[@]}"; do loaded+=("$(rss_kib "$pid")"); done
      echo "${loaded[*]}" >"$work/rss"
      curl -s http://127.0.0.1:18222/varz >"$work/varz-before"
      broadcasts >"$work/broadcasts-before"
      return
    fi
    sleep 0.2
  done
}
sample &
sampler=$!

if [ -n "$KILL_NODE" ]; then
  (
    while [ ! -e "$work/rss" ]; do sleep 0.2; done
    sleep 5
    python3 -c 'import time; print(f"{time.time():.6f}")' >"$work/killed-at"
    kill -9 "${node_pids[$((KILL_NODE - 1))]}"
  ) &
fi

"$L" --source-base 1 "${common[@]}" -c "$((CONNECTIONS - 2 * share))" --rate "$RATE" \
  >"$work/publisher.json"
curl -s http://127.0.0.1:18222/varz >"$work/varz-after"
broadcasts >"$work/broadcasts-after"
touch "$work/publisher.done"
wait "$sampler"
for pid in "${listeners[@]}"; do wait "$pid"; done
if [ -n "$KILL_NODE" ]; then
  # Until the survivors' reports stop coming (10 s without one), or 300 s.
  last=-1
  for _ in $(seq 30); do
    now=$(grep -c node_lost "$work/disconnects" 2>/dev/null || true)
    [ "$now" = "$last" ] && [ "$now" != "0" ] && break
    last=$now
    sleep 10
  done
  [ -n "${KEEP_LOGS:-}" ] && cp -r "$work" "$KEEP_LOGS"
fi

python3 - "$work" "$CONNECTIONS" "${idle[*]}" <<'PY'
import json, sys
work, connections, idle = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for name in ("publisher", "listener1", "listener2"):
    report = json.load(open(f"{work}/{name}.json"))
    print(json.dumps({"case": name, "result": report}))
idle = [int(k) for k in idle.split()]
loaded = [int(k) for k in open(f"{work}/rss").read().split()]
per_node = [{"node": i + 1, "rss_idle_mib": round(a / 1024, 1), "rss_loaded_mib": round(b / 1024, 1),
             "kib_per_connection": round((b - a) / (connections / 3), 2)} for i, (a, b) in enumerate(zip(idle, loaded))]
before = json.load(open(f"{work}/varz-before")); after = json.load(open(f"{work}/varz-after"))
sent = float(open(f"{work}/broadcasts-after").read()) - float(open(f"{work}/broadcasts-before").read())
print(json.dumps({"case": "nodes", "connections": connections, "per_node": per_node,
                  "broadcasts_sampled": sent,
                  "nats_in_per_broadcast": round((after["in_msgs"] - before["in_msgs"]) / sent, 1),
                  "nats_out_per_broadcast": round((after["out_msgs"] - before["out_msgs"]) / sent, 1)}))
import os
if os.path.exists(f"{work}/killed-at"):
    killed = float(open(f"{work}/killed-at").read())
    lost = sorted(float(line.split()[0]) for line in open(f"{work}/disconnects") if line.split()[1:] == ["node_lost"])
    if lost:
        print(json.dumps({"case": "node-killed", "reported": len(lost),
                          "first_report_after_s": round(lost[0] - killed, 2),
                          "all_reported_after_s": round(lost[-1] - killed, 2),
                          "reports_per_sec": round(len(lost) / max(lost[-1] - lost[0], 0.001))}))
    else:
        print(json.dumps({"case": "node-killed", "reported": 0}))
PY
