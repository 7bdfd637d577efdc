"""An HTTPS echo server for container tests: answers every request with what it
received, as JSON (method, path, headers as [name, value] pairs), like the Rust test
upstream. Usage: echo_tls.py CERT KEY [PORT]; prints "listening" when ready."""
import http.server
import json
import ssl
import sys


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        out = json.dumps(
            {"method": self.command, "path": self.path, "headers": [[k, v] for k, v in self.headers.items()], "body": body}
        ).encode()
        # What arrived, for the test to read with `podman logs` (the answer itself may
        # be masked by latchkey's response redaction on the way back).
        print(out.decode(), flush=True)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass


def main():
    cert, key = sys.argv[1], sys.argv[2]
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 443
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Echo)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
