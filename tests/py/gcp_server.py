"""A Google stand-in on loopback: POST /token verifies the service-account JWT with
the account's public key (google-auth's verifier), or the authorized_user refresh
token, and mints "real-token-N"; any GET
echoes the Authorization it received. GET /reject-first answers 401 to real-token-1."""
import http.server
import json
import ssl
import sys
import urllib.parse

from google.auth import jwt

cert, key, public_key_file, expires_in = sys.argv[1:5]
public_key = open(public_key_file).read()
issued = []


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

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
        if self.path != "/token":
            return self.answer(404, {})
        form = urllib.parse.parse_qs(body)
        if form.get("grant_type") == ["refresh_token"]:
            # authorized_user: the real refresh token and client secret, only from latchkey.
            if form.get("refresh_token") != ["real-refresh-token"] or form.get("client_secret") != ["real-client-secret"]:
                return self.answer(401, {"error": "invalid_grant"})
            issued.append(form["client_id"][0])
            return self.answer(200, {"access_token": f"real-token-{len(issued)}", "expires_in": int(expires_in),
                                     "token_type": "Bearer"})
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return self.answer(400, {"error": "unsupported_grant_type", "got": form.get("grant_type")})
        try:
            claims = jwt.decode(form["assertion"][0], certs=public_key,
                                audience="https://oauth2.googleapis.com/token")
        except Exception as e:  # noqa: BLE001 - any verification failure is a 401
            return self.answer(401, {"error": "invalid_grant", "detail": str(e)})
        issued.append(claims["iss"])
        self.answer(200, {"access_token": f"real-token-{len(issued)}", "expires_in": int(expires_in),
                          "token_type": "Bearer"})

    def do_GET(self):
        auth = self.headers.get_all("authorization") or []
        if self.path.startswith("/reject-first") and auth == ["Bearer real-token-1"]:
            return self.answer(401, {"error": "revoked"})
        self.answer(200, {"authorization": auth, "path": self.path, "minted": len(issued)})


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
