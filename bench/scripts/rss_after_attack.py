#!/usr/bin/env python3
"""RSS of a switchboard process under clients that never read, and after they leave.

usage: rss_after_attack.py BINARY CLIENTS SECONDS [OUTBOUND_MEMORY_BYTES]
env:   ROUNDS (default 1) attack rounds in one process; AFTER (default 30) seconds watched after
       each round. Loopback only (127.0.0.1 for the gateway, 127.0.x.y as client addresses);
       every run is bounded by CLIENTS, SECONDS, ROUNDS and AFTER.

Each client upgrades, then sends 30 KB text frames to the $default echo route as fast as the
gateway takes them and never reads: the echoes pile up in the gateway. Prints the idle RSS, the
peak during each round, and RSS once a second after the clients close (every third sample).
"""
import os, socket, struct, sys, time, threading, subprocess, json
binary, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
budget = sys.argv[4] if len(sys.argv) > 4 else None
d = "/tmp/switchboard-rss-after-attack"; subprocess.run(["rm", "-rf", d]); os.makedirs(d)
cfg = f'''[server]
listen = "127.0.0.1:18400"
data_dir = "{d}/data"
[management]
listen = "127.0.0.1:18401"
[limits]
bytes_per_sec = 0
messages_per_sec = 0
max_connections_per_ip = 0
connects_per_sec_per_ip = 0
{"outbound_memory_bytes = " + budget if budget else ""}
[routes."$default"]
integration = {{ type = "echo" }}
'''
open(f"{d}/c.toml", "w").write(cfg)
p = subprocess.Popen([binary, "serve", "--config", f"{d}/c.toml"], stderr=subprocess.DEVNULL)
def rss():
    for line in open(f"/proc/{p.pid}/status"):
        if line.startswith("VmRSS:"): return int(line.split()[1]) // 1024
time.sleep(1)
def frame(payload):
    mask = b"\x01\x02\x03\x04"; n = len(payload)
    head = b"\x81" + (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
f = frame(b"e" * 30000)
def client(i):
    s = socket.socket(); s.bind((f"127.0.{1 + i // 250}.{1 + i % 250}", 0)); s.connect(("127.0.0.1", 18400))
    s.sendall(b"GET /dev HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    s.recv(1024); s.settimeout(0.5)
    return s
base = rss()
for rnd in range(int(os.environ.get("ROUNDS", "1"))):
  socks = [client(i) for i in range(n)]
  print(json.dumps({"baseline_mib": base, "after_connect_mib": rss()}))
  stop = time.time() + secs
  def flood(s):
      try:
          while time.time() < stop: s.sendall(f)
      except Exception: pass
  ts = [threading.Thread(target=flood, args=(s,)) for s in socks]
  [t.start() for t in ts]
  peak = 0
  while time.time() < stop:
      peak = max(peak, rss()); time.sleep(0.25)
  [t.join() for t in ts]
  peak = max(peak, rss())
  print(json.dumps({"peak_mib": peak}))
  for s in socks: s.close()
  t0 = time.time(); series = []
  while time.time() - t0 < float(os.environ.get("AFTER", "30")):
      series.append((round(time.time() - t0, 1), rss())); time.sleep(1)
  print(json.dumps({"after_close": series[::3]}))
m = subprocess.run(["curl", "-s", "http://127.0.0.1:18401/metrics"], capture_output=True, text=True).stdout
print("\n".join(l for l in m.splitlines() if "overload" in l or "disconnects_total" in l))
p.terminate(); p.wait()
