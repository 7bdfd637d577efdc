"""An HTTP/2 client that gives up on a request: through latchkey (CONNECT, TLS with ALPN
h2, certificate not checked) it asks for PATH, resets that stream after PAUSE seconds,
then asks for /after on the same connection and prints that answer's status once its
body has ended (frames are read in order, so the reset was read before it). The
connection then stays open until stdin closes: closing it would drop the reset stream's
request along with the whole connection.

usage: h2_reset.py PROXY_PORT HOST PATH PAUSE
"""
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events

from h2_tunnel import open_h2_tunnel

port, host, path, pause = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])

tls = open_h2_tunnel(port, f"{host}:443", timeout=10)
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
tls.sendall(conn.data_to_send())


def get(target):
    sid = conn.get_next_available_stream_id()
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", host), (":path", target)]
    conn.send_headers(sid, headers, end_stream=True)
    tls.sendall(conn.data_to_send())
    return sid


given_up = get(path)
time.sleep(pause)
conn.reset_stream(given_up, error_code=h2.errors.ErrorCodes.CANCEL)
tls.sendall(conn.data_to_send())
after = get("/after")
status = None
while True:
    data = tls.recv(65536)
    if not data:
        raise SystemExit("the connection closed before /after was answered")
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id == after:
            status = dict(event.headers)[b":status"].decode()
        if isinstance(event, h2.events.DataReceived):
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if isinstance(event, h2.events.StreamEnded) and event.stream_id == after:
            print(status, flush=True)
            sys.stdin.read()
            tls.close()
            raise SystemExit(0)
    out = conn.data_to_send()
    if out:
        tls.sendall(out)
