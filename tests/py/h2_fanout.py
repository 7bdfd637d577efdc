"""An HTTP/2 client fanning one connection out: through latchkey (CONNECT, TLS with
ALPN h2, certificate not checked), it opens STREAMS POST streams per connection, each
with an unfinished body, on CONNECTIONS connections, prints "ready", and holds them open
(answering pings and settings) until stdin closes.

usage: h2_fanout.py PROXY_PORT HOST CONNECTIONS STREAMS
"""
import sys
import threading

import h2.config
import h2.connection
import h2.events

from h2_tunnel import open_h2_tunnel

port, host, connections, streams = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


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
    tls = open_h2_tunnel(port, f"{host}:443")
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
