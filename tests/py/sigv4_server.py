"""An AWS-like upstream that verifies SigV4 independently: botocore's signer
recomputes each request's signature with the real secret, over exactly the headers
the request says it signed, and compares. Prints its port; answers JSON."""
import http.server
import json
import re
import ssl
import sys

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

cert, key, akid, secret = sys.argv[1:5]
token = sys.argv[5] if len(sys.argv) > 5 else None
AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                  r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$")


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

    def handle_any(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        auths = self.headers.get_all("authorization") or []
        m = AUTH.match(auths[0]) if len(auths) == 1 else None
        if not m:
            return self.answer(403, {"error": "no single SigV4 Authorization", "got": auths})
        got_akid, _, region, service, signed, signature = m.groups()
        if got_akid != akid:
            return self.answer(403, {"error": "wrong access key id", "got": got_akid})
        if self.headers.get("x-amz-security-token") != token:
            return self.answer(403, {"error": "wrong session token"})
        names = signed.split(";")
        url = "https://" + self.headers["host"] + self.path
        request = AWSRequest(method=self.command, url=url, data=body,
                             headers={n: self.headers[n] for n in names if n != "host"})
        request.context["timestamp"] = self.headers["x-amz-date"]

        base = S3SigV4Auth if service == "s3" else SigV4Auth

        class Verifier(base):
            def headers_to_sign(self, req):
                h = HTTPHeaders()
                for n in names:
                    h[n] = self_headers[n]
                return h

        self_headers = self.headers
        verifier = Verifier(Credentials(akid, secret, token), service, region)
        canonical = verifier.canonical_request(request)
        expected = verifier.signature(verifier.string_to_sign(request, canonical), request)
        if expected != signature:
            return self.answer(403, {"error": "signature mismatch", "canonical": canonical})
        self.answer(200, {"verified": True, "service": service, "region": region, "path": self.path,
                          "body_bytes": len(body), "signed": names})

    do_GET = do_POST = do_PUT = handle_any


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
