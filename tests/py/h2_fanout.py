"""An HTTP/2 client fanning one connection out: through latchkey (CONNECT, TLS with
ALPN h2, certificate not checked), it opens STREAMS POST streams per connection, each
with an unfinished body, on CONNECTIONS connections, prints "ready", and holds them open
(answering pings and settings) until stdin closes.

usage: h2_fanout.py PROXY_PORT HOST CONNECTIONS STREAMS
"""
import socket
import ssl
import sys
import threading

import h2.config
import h2.connection
import h2.events

port, host, connections, streams = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


def open_tunnel():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise SystemExit(f"CONNECT closed: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"CONNECT refused: {head!r}")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(s, server_hostname=host)
    assert tls.selected_alpn_protocol() == "h2", tls.selected_alpn_protocol()
    return tls


def pump(tls, conn, lock):
    """Read frames for as long as the connection lives; answer what needs answering."""
    while True:
        try:
            data = tls.recv(65536)
        except OSError:
            return
        if not data:
            return
        with lock:
            try:
                conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                return
            out = conn.data_to_send()
        if out:
            tls.sendall(out)


held = []
for _ in range(connections):
    tls = open_tunnel()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    lock = threading.Lock()
    # Take in the server's SETTINGS (max_concurrent_streams) before opening streams.
    tls.settimeout(5)
    with lock:
        conn.receive_data(tls.recv(65536))
        tls.sendall(conn.data_to_send())
    tls.settimeout(None)
    for i in range(streams):
        sid = conn.get_next_available_stream_id()
        with lock:
            conn.send_headers(
                sid,
                [
                    (":method", "POST"),
                    (":scheme", "https"),
                    (":authority", host),
                    (":path", "/sink"),
                    ("content-length", "1000000"),
                ],
            )
            conn.send_data(sid, b"x" * 16)
            tls.sendall(conn.data_to_send())
    threading.Thread(target=pump, args=(tls, conn, lock), daemon=True).start()
    held.append(tls)

print("ready", flush=True)
sys.stdin.read()
