"""A real gRPC client (grpcio) through latchkey via https_proxy, holding a placeholder.
With the argument `denied`: one call answered trailers-only; prints code, details and
the trailing metadata. With `chat`: a bidirectional ping-pong that sends each message
only once the reply to the previous one arrived. With `again`: one call, then (on the
same channel) another once a line arrives on stdin; prints each outcome. With `once`: one
call sending $GRPC_MESSAGE (default "hi")."""
import os
import queue
import sys

import grpc

roots = open(os.environ["BUNDLE"], "rb").read()
channel = grpc.secure_channel("api.example.com:443", grpc.ssl_channel_credentials(roots))
metadata = (("authorization", "Bearer placeholder"),)

if sys.argv[1:] == ["denied"]:
    try:
        channel.unary_unary("/test.Echo/Denied")(b"hi", metadata=metadata, timeout=20)
        print("OK?")
    except grpc.RpcError as e:
        print(e.code().name)
        print(e.details())
        print(dict(e.trailing_metadata() or ()).get("x-denied-by"))
    sys.exit(0)

def outcome(call):
    try:
        message = os.environ.get("GRPC_MESSAGE", "hi").encode()
        response, c = call.with_call(message, metadata=metadata, timeout=20)
        print("OK", response.decode(), flush=True)
    except grpc.RpcError as e:
        print(e.code().name)
        print(e.details())
        print(dict(e.trailing_metadata() or ()).get("x-latchkey-error"), flush=True)


if sys.argv[1:] == ["once"]:
    outcome(channel.unary_unary("/test.Echo/Unary"))
    sys.exit(0)

if sys.argv[1:] == ["again"]:
    unary = channel.unary_unary("/test.Echo/Unary")
    outcome(unary)
    sys.stdin.readline()
    outcome(unary)
    sys.exit(0)

if sys.argv[1:] == ["chat"]:
    replied = queue.Queue()

    def pings():
        for i in range(3):
            yield b"ping%d" % i
            replied.get(timeout=5)

    call = channel.stream_stream("/test.Echo/Chat")(pings(), metadata=metadata, timeout=20)
    try:
        for reply in call:
            print(reply.decode(), flush=True)
            replied.put(None)
        print(call.code().name)
    except grpc.RpcError as e:
        print(e.code().name, e.details())
    sys.exit(0)

unary = channel.unary_unary("/test.Echo/Unary")
response, call = unary.with_call(b"hi", metadata=metadata, timeout=20)
print(response.decode())
print(call.code().name, dict(call.trailing_metadata())["x-trailer"])

stream = channel.unary_stream("/test.Echo/Stream")
replies = stream(b"x", metadata=metadata, timeout=20)
print(",".join(m.decode() for m in replies))
print(replies.code().name, dict(replies.trailing_metadata())["x-trailer"])
