"""WebSocket echo upstream for the tests: TLS on loopback, prints its port, and accepts
the handshake only with exactly one `Authorization: Bearer <token>` header."""
import http
import ssl
import sys

from websockets.sync.server import serve

cert, key, token = sys.argv[1], sys.argv[2], sys.argv[3]


def check(connection, request):
    values = request.headers.get_all("Authorization")
    if values != [f"Bearer {token}"]:
        return connection.respond(http.HTTPStatus.UNAUTHORIZED, f"bad authorization: {len(values)} values\n")
    return None


def echo(ws):
    for message in ws:
        if message == "whoami":
            # A reflecting upstream: hands back the credential it received.
            ws.send(f"you are {ws.request.headers['Authorization']}")
            continue
        if message == "whoami in pieces":
            # The same, with the credential split across fragments of one message.
            value = ws.request.headers["Authorization"]
            ws.send(iter(["you are ", value[:12], value[12:20], value[20:]]))
            continue
        ws.send(message if isinstance(message, bytes) else f"echo: {message}")


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
with serve(echo, "127.0.0.1", 0, ssl=ctx, process_request=check) as server:
    print(server.socket.getsockname()[1], flush=True)
    server.serve_forever()
