"""gRPC upstream for the tests (grpcio, TLS on loopback). Raw-bytes methods, so no
generated code: /test.Echo/Unary, /test.Echo/Stream, /test.Echo/Chat (bidirectional
ping-pong) and /test.Echo/Denied (a trailers-only PERMISSION_DENIED). Each checks that exactly one
`authorization: Bearer <token>` arrived (unless the token is "-"), and sets trailing
metadata. An optional fourth argument is a CA file: then a client certificate signed
by it is required (mTLS, like Talos)."""
import sys
from concurrent import futures

import grpc

cert, key, token = sys.argv[1], sys.argv[2], sys.argv[3]
client_ca = sys.argv[4] if len(sys.argv) > 4 else None


def check(ctx):
    if token == "-":
        return
    auth = [v for k, v in ctx.invocation_metadata() if k == "authorization"]
    if auth != [f"Bearer {token}"]:
        ctx.abort(grpc.StatusCode.UNAUTHENTICATED, f"authorization values: {len(auth)}")


def unary(request, ctx):
    check(ctx)
    ctx.set_trailing_metadata((("x-trailer", "unary-done"),))
    return b"echo:" + request


def denied(request, ctx):
    # Aborted before any message: grpcio answers trailers-only (one HEADERS, END_STREAM).
    check(ctx)
    ctx.set_trailing_metadata((("x-denied-by", "policy-7"),))
    ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "project alpha is not yours")


def chat(requests, ctx):
    # Bidirectional: one reply per message, at once (the client waits for each).
    check(ctx)
    for m in requests:
        yield b"pong:" + m


def stream(request, ctx):
    check(ctx)
    for i in range(5):
        yield b"msg%d" % i
    ctx.set_trailing_metadata((("x-trailer", "stream-done"),))


handler = grpc.method_handlers_generic_handler(
    "test.Echo",
    {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Denied": grpc.unary_unary_rpc_method_handler(denied),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    },
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
creds = grpc.ssl_server_credentials(
    [(open(key, "rb").read(), open(cert, "rb").read())],
    root_certificates=open(client_ca, "rb").read() if client_ca else None,
    require_client_auth=client_ca is not None,
)
port = server.add_secure_port("127.0.0.1:0", creds)
server.start()
print(port, flush=True)
server.wait_for_termination()
