"""An OAuth2 authorization server and the API it protects, on loopback over TLS.

POST /oauth/token: the client_credentials grant (RFC 6749 4.4). It checks the client's
authentication (client_secret_basic or client_secret_post, as told), the scopes asked
for, and the audience when one is expected; it waits `delay` seconds (so requests that
need a token pile up behind one refresh) and issues "at-N" living `expires_in` seconds.
Wrong client: 401 invalid_client.

Any other path is the API: it accepts only an issued, unexpired bearer token (401
otherwise) and answers what it saw, with the number of token requests so far.
"""
import base64
import http.server
import json
import ssl
import sys
import threading
import time
import urllib.parse

cert, key, client_id, client_secret, scope, expires_in, delay, method, audience = sys.argv[1:10]
lock = threading.Lock()
issued = {}  # token -> expiry (epoch seconds)
token_requests = []  # what each token request carried: (auth header, form)
secret_seen_by_api = []


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def client_ok(self, form):
        auth = self.headers.get("authorization") or ""
        if method == "client_secret_basic":
            if not auth.startswith("Basic ") or "client_secret" in form:
                return False
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            return urllib.parse.unquote(user) == client_id and urllib.parse.unquote(password) == client_secret
        return not auth and form.get("client_id") == [client_id] and form.get("client_secret") == [client_secret]

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
        if self.path != "/oauth/token":
            return self.answer(404, {"error": "not_found"})
        form = urllib.parse.parse_qs(body)
        with lock:
            token_requests.append(1)
        if self.headers.get("content-type") != "application/x-www-form-urlencoded":
            return self.answer(400, {"error": "invalid_request"})
        if not self.client_ok(form):
            return self.answer(401, {"error": "invalid_client"})
        if form.get("grant_type") != ["client_credentials"]:
            return self.answer(400, {"error": "unsupported_grant_type"})
        if sorted(form.get("scope", [""])[0].split()) != sorted(scope.split()):
            return self.answer(400, {"error": "invalid_scope"})
        if audience != "-" and form.get("audience") != [audience]:
            return self.answer(400, {"error": "invalid_request"})
        time.sleep(float(delay))
        with lock:
            token = f"at-{len(issued) + 1}"
            issued[token] = time.time() + int(expires_in)
        self.answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": int(expires_in)})

    def do_GET(self):
        everything = str(self.path) + str(self.headers)
        if client_secret in everything:
            secret_seen_by_api.append(self.path)
        auth = self.headers.get_all("authorization") or []
        token = auth[0][7:] if len(auth) == 1 and auth[0].startswith("Bearer ") else None
        with lock:
            valid = token in issued and issued[token] > time.time()
            count = len(token_requests)
        if not valid:
            return self.answer(401, {"error": "invalid_token", "authorization": auth})
        self.answer(200, {"token": token, "path": self.path, "token_requests": count,
                          "secret_seen_by_api": secret_seen_by_api})


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
