"""A GitHub stand-in on loopback over TLS, for both api.github.com and github.com.

api.github.com:
  POST /app/installations/{id}/access_tokens verifies the app JWT (RS256) with the app's
  public key (google-auth's verifier) and its issuer (the app id), and mints
  "ghs_minted_N" limited to the `repositories` asked for (all when none), expiring in
  an hour. GET /installation/repositories lists the repositories the bearer token may
  reach; GET /debug/mints what each mint asked for (repositories, permissions).
github.com:
  git smart HTTP (git http-backend over `git_root`) behind basic auth: the password must
  be an unexpired minted token covering the repository; else 401 (or 404 for a
  repository outside the token's list, as GitHub answers).
"""
import base64
import datetime
import http.server
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time

from google.auth import jwt

cert, key, public_key_file, app_id, installation_id, git_root = sys.argv[1:7]
public_key = open(public_key_file).read()
lock = threading.Lock()
tokens = {}  # token -> (expiry, repositories or None)
mints = []


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, obj, extra=()):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def host(self):
        return (self.headers.get("host") or "").split(":")[0]

    def token_repos(self, token):
        with lock:
            expiry, repos = tokens.get(token, (0, None))
        return (expiry > time.time()), repos

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.host() == "github.com":
            return self.git(body)
        m = re.fullmatch(r"/app/installations/(\d+)/access_tokens", self.path)
        if not m:
            return self.answer(404, {"message": "Not Found"})
        auth = self.headers.get("authorization") or ""
        try:
            claims = jwt.decode(auth.removeprefix("Bearer "), certs=public_key, verify=True)
        except Exception as e:  # noqa: BLE001 - any verification failure is a 401
            return self.answer(401, {"message": f"A JSON web token could not be decoded: {e}"})
        if str(claims.get("iss")) != app_id or claims["exp"] - claims["iat"] > 600:
            return self.answer(401, {"message": "bad issuer or lifetime"})
        if m.group(1) != installation_id:
            return self.answer(404, {"message": "Not Found"})
        asked = json.loads(body or b"{}")
        with lock:
            mints.append(asked)
            token = f"ghs_minted_{len(mints)}"
            tokens[token] = (time.time() + 3600, asked.get("repositories"))
        expires = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1))
        self.answer(201, {"token": token, "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                          "permissions": asked.get("permissions", {})})

    def do_GET(self):
        if self.host() == "github.com":
            return self.git(b"")
        if self.path == "/debug/mints":
            with lock:
                return self.answer(200, mints)
        auth = self.headers.get_all("authorization") or []
        token = auth[0].removeprefix("Bearer ") if len(auth) == 1 else None
        valid, repos = self.token_repos(token)
        if not valid:
            return self.answer(401, {"message": "Bad credentials"})
        if self.path == "/installation/repositories":
            return self.answer(200, {"repositories": [{"name": r} for r in (repos or ["*"])]})
        self.answer(200, {"path": self.path})

    def git(self, body):
        m = re.match(r"/([^/]+)/([^/]+?)(\.git)?(/.*)", self.path.split("?")[0])
        auth = self.headers.get("authorization") or ""
        token = None
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            token = password if user == "x-access-token" else None
        valid, repos = self.token_repos(token)
        if not valid or not m:
            return self.answer(401, {"message": "auth"}, [("www-authenticate", 'Basic realm="GitHub"')])
        if repos is not None and m.group(2) not in repos:
            return self.answer(404, {"message": "Repository not found."})
        env = {
            "PATH": os.environ.get("PATH", ""), "GIT_PROJECT_ROOT": git_root, "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command, "PATH_INFO": f"/{m.group(1)}/{m.group(2)}.git{m.group(4)}",
            "QUERY_STRING": self.path.partition("?")[2], "CONTENT_TYPE": self.headers.get("content-type") or "",
            "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": "x-access-token", "REMOTE_ADDR": "127.0.0.1",
            "GIT_PROTOCOL": self.headers.get("git-protocol") or "",
        }
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode().splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.strip()[:3])
            elif k:
                headers.append((k.strip(), v.strip()))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
