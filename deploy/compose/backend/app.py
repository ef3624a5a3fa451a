"""A sample backend for the compose demo: logs $connect/$disconnect, answers messages,
and takes queue pushes. Standard library only."""
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        event = json.loads(self.rfile.read(length) or b"null")
        context = (event or {}).get("requestContext", {})
        print(self.path, context.get("connectionId"), context.get("routeKey"), flush=True)
        if self.path == "/message":
            reply = {"statusCode": 200, "body": json.dumps({"you_said": event.get("body")})}
            body = json.dumps(reply).encode()
        else:
            body = b""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", 3000), Handler).serve_forever()
