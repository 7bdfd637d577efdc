"""A stand-in for the Anthropic Messages API over TLS that checks the credential: POST
/v1/messages with the expected x-api-key (or Authorization: Bearer) streams an SSE
answer (or JSON when "stream" is false); a wrong or missing key gets 401. Every
request is appended to LOG as one JSON line. Prints its port.
Usage: anthropic_fake.py CERT KEY EXPECTED_KEY LOG"""
import http.server
import json
import ssl
import sys

cert, key, expected, log = sys.argv[1:5]


def events(model):
    yield "message_start", {"type": "message_start", "message": {
        "id": "msg_jail", "type": "message", "role": "assistant", "content": [], "model": model,
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 1}}}
    yield "content_block_start", {"type": "content_block_start", "index": 0,
                                  "content_block": {"type": "text", "text": ""}}
    yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                  "delta": {"type": "text_delta", "text": "hi from the fake API"}}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {"output_tokens": 5}}
    yield "message_stop", {"type": "message_stop"}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def record(self, ok, body=b""):
        with open(log, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path, "key_ok": ok,
                                "body": body.decode(errors="replace")}) + "\n")

    def key_ok(self):
        got = self.headers.get("x-api-key") or (self.headers.get("authorization") or "").removeprefix("Bearer ")
        return got == expected

    def reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.record(self.key_ok())
        self.reply(404, {"type": "error", "error": {"type": "not_found_error", "message": "not here"}})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        ok = self.key_ok()
        self.record(ok, body)
        if not ok:
            return self.reply(401, {"type": "error", "error": {"type": "authentication_error",
                                                               "message": "invalid x-api-key"}})
        if not self.path.startswith("/v1/messages"):
            return self.reply(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            req = {}
        model = req.get("model", "claude-test")
        if not req.get("stream"):
            return self.reply(200, {"id": "msg_jail", "type": "message", "role": "assistant", "model": model,
                                    "content": [{"type": "text", "text": "hi from the fake API"}],
                                    "stop_reason": "end_turn", "stop_sequence": None,
                                    "usage": {"input_tokens": 10, "output_tokens": 5}})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for name, data in events(model):
            event = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
