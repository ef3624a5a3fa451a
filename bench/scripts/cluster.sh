#!/usr/bin/env bash
# Cluster mode next to one node, in one sitting, on loopback: cross-node push latency, a room
# spread over three nodes, and queue appends on JetStream vs the local log.
#
#   cargo build --release -p switchboard -p switchboard-loadgen
#   NATS_SERVER=~/.cache/switchboard-nats-venv/bin/nats-server bash bench/scripts/cluster.sh
#
# Env: ROOM (members, 5000), MESSAGES (fan-out messages, 400), RATE (fixed fan-out rate, 50),
# PUSHES (5000), QUEUE_MESSAGES (50000), CONNECTS (3000), CLUSTER_EXTRA (more [cluster]
# keys), ONLY (run only the cases whose name contains it), SWITCHBOARD (another build to
# run). Results go to stdout (JSON lines).
set -euo pipefail
cd "$(dirname "$0")/../.."

NATS_SERVER=${NATS_SERVER:-$HOME/.cache/switchboard-nats-venv/bin/nats-server}
ROOM=${ROOM:-5000}
MESSAGES=${MESSAGES:-400}
RATE=${RATE:-50}
PUSHES=${PUSHES:-5000}
QUEUE_MESSAGES=${QUEUE_MESSAGES:-50000}
CONNECTS=${CONNECTS:-3000}
SB=${SWITCHBOARD:-target/release/switchboard}
L=target/release/switchboard-loadgen
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# node ID PORT_OFFSET [cluster]: writes a config and starts a node (one shard: three nodes,
# NATS and the load generator share two cores).
node() {
  local id=$1 offset=$2 cluster=${3:-}
  mkdir -p "$work/n$id"
  cat > "$work/n$id/sb.toml" <<EOF
[server]
listen = "127.0.0.1:$((18080 + offset))"
shards = 1
node_id = $id
data_dir = "$work/n$id/data"
[management]
listen = "127.0.0.1:$((19090 + offset))"
[limits]
max_connections_per_ip = 0
connects_per_sec_per_ip = 0
messages_per_sec = 0
bytes_per_sec = 0
[routes.join]
integration = { type = "room_join", room = "\$request.body.room" }
[routes.enqueue]
integration = { type = "queue", queue = "bench", ack = true }
$cluster
EOF
  RUST_LOG=warn "$SB" serve --config "$work/n$id/sb.toml" 2>"$work/n$id/log" &
  pids+=($!)
}

wait_http() {
  for _ in $(seq 100); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "not up: $1" >&2; exit 1
}

run() {
  case "$1" in *"${ONLY:-}"*) ;; *) return 0 ;; esac
  echo "{\"case\": \"$1\", \"result\": $("$L" --json "${@:2}")}"
}

stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, $(git rev-parse --short HEAD)" >&2

# --- one node, no cluster -------------------------------------------------------------
node 1 0
wait_http http://127.0.0.1:19090
run push-local push -c 1 -m "$PUSHES" --rate 1000 --url ws://127.0.0.1:18080/dev --api http://127.0.0.1:19090/dev
run room-one-node-max fanout -c "$ROOM" -m "$MESSAGES" --url ws://127.0.0.1:18080/dev --api http://127.0.0.1:19090/dev
run room-one-node-fixed fanout -c "$ROOM" -m "$((RATE * 10))" --rate "$RATE" --url ws://127.0.0.1:18080/dev --api http://127.0.0.1:19090/dev
run queue-local queue -c 10 -m "$QUEUE_MESSAGES" --url ws://127.0.0.1:18080/dev --api http://127.0.0.1:19090/dev
run connects-one-node connect -c "$CONNECTS" --source-addrs 4 --hold-secs 1 --url ws://127.0.0.1:18080/dev --api http://127.0.0.1:19090/dev
stop_all

# --- three nodes on one nats-server -----------------------------------------------------
"$NATS_SERVER" -a 127.0.0.1 -p 14222 -m 18222 -js -sd "$work/nats" 2>"$work/nats.log" &
pids+=($!)
sleep 0.5
cluster="[cluster]
nats_url = \"nats://127.0.0.1:14222\"
${CLUSTER_EXTRA:-}"
for id in 1 2 3; do node "$id" "$((id - 1))" "$cluster"; done
for id in 1 2 3; do wait_http "http://127.0.0.1:$((19089 + id))"; done
nodes=ws://127.0.0.1:18080/dev,ws://127.0.0.1:18081/dev,ws://127.0.0.1:18082/dev
varz() { curl -s http://127.0.0.1:18222/varz | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['in_msgs'], d['out_msgs'])"; }

# Each connect waits for its record to be acked by the mirror stream.
run connects-three-nodes connect -c "$CONNECTS" --source-addrs 4 --hold-secs 1 --url "$nodes" --api http://127.0.0.1:19090/dev
run push-local-in-cluster push -c 1 -m "$PUSHES" --rate 1000 --url ws://127.0.0.1:18080/dev --api http://127.0.0.1:19090/dev
run push-cross-node push -c 1 -m "$PUSHES" --rate 1000 --url ws://127.0.0.1:18081/dev --api http://127.0.0.1:19090/dev
run room-three-nodes-max fanout -c "$ROOM" -m "$MESSAGES" --url "$nodes" --api http://127.0.0.1:19090/dev
# NATS messages per broadcast, from NATS's own /varz counters: sampled over 4 s while the
# fixed-rate run publishes (node 1's broadcast counter tells when), less the idle cluster's
# own traffic (heartbeats) over 4 s measured first.
sample_nats() {
  python3 - "$1" <<'PY'
import json, re, sys, time, urllib.request
def varz():
    d = json.load(urllib.request.urlopen("http://127.0.0.1:18222/varz"))
    return d["in_msgs"], d["out_msgs"], time.time()
def broadcasts():
    text = urllib.request.urlopen("http://127.0.0.1:19090/metrics").read().decode()
    m = re.search(r'switchboard_cluster_forwarded_total\{kind="broadcast"\} (\d+)', text)
    return int(m.group(1)) if m else 0
idle_in0, idle_out0, t0 = varz(); time.sleep(4); idle_in1, idle_out1, t1 = varz()
idle_in, idle_out = (idle_in1 - idle_in0) / (t1 - t0), (idle_out1 - idle_out0) / (t1 - t0)
open(sys.argv[1], "w").write("ready")
start = broadcasts()
while broadcasts() - start < 2 * 50: time.sleep(0.05)  # publishing has begun
b0 = broadcasts(); in0, out0, t0 = varz(); time.sleep(4); b1 = broadcasts(); in1, out1, t1 = varz()
n = b1 - b0; dt = t1 - t0
print(json.dumps({"case": "nats-per-broadcast", "broadcasts": n,
    "in_per_broadcast": round((in1 - in0 - idle_in * dt) / n, 2),
    "out_per_broadcast": round((out1 - out0 - idle_out * dt) / n, 2),
    "idle_in_per_sec": round(idle_in, 1), "idle_out_per_sec": round(idle_out, 1)}))
PY
}
case room-three-nodes-fixed in *"${ONLY:-}"*)
  sample_nats "$work/sampler-ready" &
  sampler=$!
  while [ ! -e "$work/sampler-ready" ]; do sleep 0.1; done
  run room-three-nodes-fixed fanout -c "$ROOM" -m "$((RATE * 10))" --rate "$RATE" --url "$nodes" --api http://127.0.0.1:19090/dev
  wait "$sampler"
  ;;
esac
run queue-jetstream queue -c 10 -m "$QUEUE_MESSAGES" --url ws://127.0.0.1:18080/dev --api http://127.0.0.1:19090/dev
