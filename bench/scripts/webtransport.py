#!/usr/bin/env python3
"""WebTransport next to WebSocket in one sitting (docs/PERFORMANCE.md, "WebTransport").

Alternates the two transports against a fresh gateway per run: ROUNDS max-rate fan-outs
(C members, M messages of 128 bytes), one fixed-rate fan-out (100 messages/s), and idle
memory per session (2,000 held sessions, the gateway's RSS before and after).

    cargo build --release -p switchboard -p switchboard-loadgen
    C=1000 M=3000 ROUNDS=3 python3 bench/scripts/webtransport.py > results.jsonl
"""
import json, os, pathlib, subprocess, sys, tempfile, time

ROOT = pathlib.Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "target/release/switchboard"
LOADGEN = ROOT / "target/release/switchboard-loadgen"
C, M = int(os.environ.get("C", "1000")), int(os.environ.get("M", "3000"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
CONFIG = """
[server]
listen = "127.0.0.1:18700"
data_dir = "{data}"
[server.webtransport]
listen = "127.0.0.1:18743"
[management]
listen = "127.0.0.1:18790"
[api]
route_selection_expression = "$request.body.action"
[limits]
max_connections_per_ip = 0
connects_per_sec_per_ip = 0
[routes.join]
integration = {{ type = "room_join", room = "$request.body.room" }}
"""


def run(transport, args, label):
    with tempfile.TemporaryDirectory() as scratch:
        config = pathlib.Path(scratch) / "gateway.toml"
        config.write_text(CONFIG.format(data=pathlib.Path(scratch) / "data"))
        gateway = subprocess.Popen([GATEWAY, "serve", "--config", config],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            up = subprocess.run(["curl", "-sf", "http://127.0.0.1:18790/health"],
                                stdout=subprocess.DEVNULL).returncode == 0
            if up:
                break
            time.sleep(0.1)
        command = [LOADGEN, "--api", "http://127.0.0.1:18790/dev",
                   "--url", "ws://127.0.0.1:18700/dev", "--transport", transport, "--json"]
        command += [a.replace("PID", str(gateway.pid)) for a in args]
        result = subprocess.run(command, capture_output=True, text=True)
        gateway.terminate()
        gateway.wait()
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        report = {"error": result.stderr[-2000:]}
    report.update({"transport": transport, "run": label,
                   "command": " ".join(str(part) for part in command[1:])})
    print(json.dumps(report), flush=True)


for round_ in range(ROUNDS):
    for transport in ("websocket", "webtransport"):
        run(transport, ["fanout", "-c", str(C), "-m", str(M), "-p", "128"], f"max{round_}")
for transport in ("websocket", "webtransport"):
    run(transport, ["fanout", "-c", str(C), "-m", "1000", "-p", "128", "--rate", "100"], "fixed")
for transport in ("websocket", "webtransport"):
    run(transport, ["connect", "-c", "2000", "--hold-secs", "3", "--server-pid", "PID"], "idle")
