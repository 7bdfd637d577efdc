"""An HTTP/2 POST through latchkey whose body goes in two DATA frames, cut at a byte the
caller chooses (a secret split across them). Prints the response status and body.

usage: h2_split.py PROXY_PORT HOST PATH CUT < body
"""
import sys

import h2.config
import h2.connection
import h2.events

from h2_tunnel import open_h2_tunnel

port, host, path, cut = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
body = sys.stdin.buffer.read()

tls = open_h2_tunnel(port, f"{host}:443", timeout=20)
conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
conn.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", host), (":path", path),
                      ("content-type", "application/json"), ("content-length", str(len(body)))])
conn.send_data(1, body[:cut])
tls.sendall(conn.data_to_send())
conn.send_data(1, body[cut:], end_stream=True)
tls.sendall(conn.data_to_send())
status, got, done = None, b"", False
while not done:
    data = tls.recv(65536)
    if not data:
        break
    for ev in conn.receive_data(data):
        if isinstance(ev, h2.events.ResponseReceived):
            status = dict(ev.headers)[b":status"].decode()
        elif isinstance(ev, h2.events.DataReceived):
            got += ev.data
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
            done = True
    tls.sendall(conn.data_to_send())
print(status)
print(got.decode(errors="replace"))
