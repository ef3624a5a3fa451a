"""A backend that answers every POST after LATENCY_MS (argv[2], default 50; threaded),
counting entries it receives."""
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
count = 0
lock = threading.Lock()
LATENCY = (float(sys.argv[2]) if len(sys.argv) > 2 else 50.0) / 1000
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        global count
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(LATENCY)
        event = json.loads(body)
        n = len(event["Records"]) if "Records" in event else 1
        with lock:
            count += n
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def do_GET(self):
        data = str(count).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
