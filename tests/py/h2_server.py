"""An HTTP/2-only TLS upstream on OpenSSL (Python ssl + h2), for the tests.

It offers only `h2` by ALPN; offered nothing it speaks, OpenSSL completes the handshake
with no protocol chosen (no alert), and the server then expects the HTTP/2 preface like
any h2-only server. Each request is answered with JSON of what arrived: pseudo-headers
and headers, trailers, body length and SHA-256. `/trailers` answers with a body and a
trailer (`x-checksum`) declared in a `trailer` header. `/reset-mid-body[?length]` resets
its stream after 1,000 bytes of body. On `/goaway-after-first...` a connection's streams
after its first are refused with a graceful GOAWAY as their head arrives; on
`/goaway-after-data...`, once some of their body has. Either way the connection is then
read and closed as nginx closes after its GOAWAY (`linger`).

Arguments: CERT KEY. Prints its port on the first line.
"""
import hashlib
import json
import socket
import ssl
import sys
import threading

import h2.config
import h2.connection
import h2.events
import h2.exceptions

cert, key = sys.argv[1], sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["h2"])


def respond(conn, stream_id, req):
    path = dict(req["headers"]).get(":path", "")
    if path.startswith("/reset-mid-body"):
        # 1,000 bytes of a body (of 100,000 if `?length`), then the stream reset.
        head = [(":status", "200")] + ([("content-length", "100000")] if path.endswith("?length") else [])
        conn.send_headers(stream_id, head)
        conn.send_data(stream_id, b"a" * 1000)
        conn.reset_stream(stream_id, error_code=2)
        return
    if path == "/trailers":
        conn.send_headers(stream_id, [(":status", "200"), ("trailer", "x-checksum")])
        conn.send_data(stream_id, b"payload")
        conn.send_headers(stream_id, [("x-checksum", "abc123")], end_stream=True)
        return
    body = bytes(req["body"])
    seen = {
        "version": "HTTP/2",
        "headers": req["headers"],
        "trailers": req["trailers"],
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    out = json.dumps(seen).encode()
    conn.send_headers(
        stream_id,
        [(":status", "200"), ("content-type", "application/json"), ("content-length", str(len(out)))],
    )
    # Small enough for one frame and the initial window.
    conn.send_data(stream_id, out, end_stream=True)


def linger(tls):
    """What the client still sends is read and dropped for a moment before the close, as
    nginx's lingering close does: closing on unread bytes would reset the connection,
    and the client could lose the GOAWAY to that reset."""
    tls.settimeout(1)
    try:
        while tls.recv(65536):
            pass
    except (ssl.SSLError, OSError):
        pass


def serve(sock):
    try:
        tls = ctx.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError):
        sock.close()
        return
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    streams = {}
    first = None
    doomed = set()
    try:
        while True:
            data = tls.recv(65536)
            if not data:
                return
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                # Not HTTP/2 (an HTTP/1.1 request, say): GOAWAY and close, as h2 servers do.
                tls.sendall(conn.data_to_send())
                return
            for ev in events:
                if isinstance(ev, h2.events.RequestReceived):
                    first = first or ev.stream_id
                    path = dict(ev.headers).get(":path", "")
                    if path.startswith("/goaway-after-data") and ev.stream_id != first:
                        # The same, once some of this stream's body has come.
                        doomed.add(ev.stream_id)
                    elif path.startswith("/goaway-after-first") and ev.stream_id != first:
                        # Going away gracefully before this stream: it was not processed.
                        conn.close_connection(error_code=0, last_stream_id=first)
                        tls.sendall(conn.data_to_send())
                        linger(tls)
                        return
                    streams[ev.stream_id] = {"headers": ev.headers, "body": bytearray(), "trailers": []}
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id in doomed:
                    conn.close_connection(error_code=0, last_stream_id=first)
                    tls.sendall(conn.data_to_send())
                    linger(tls)
                    return
                elif isinstance(ev, h2.events.DataReceived):
                    streams[ev.stream_id]["body"] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    streams[ev.stream_id]["trailers"] = ev.headers
                elif isinstance(ev, h2.events.StreamEnded):
                    respond(conn, ev.stream_id, streams.pop(ev.stream_id))
            tls.sendall(conn.data_to_send())
    except (ssl.SSLError, OSError):
        return
    finally:
        tls.close()


def main():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(listener.getsockname()[1], flush=True)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


main()
