"""Ask a reflecting WebSocket upstream (through latchkey) who we are."""
import os
import ssl

from websockets.sync.client import connect

ctx = ssl.create_default_context(cafile=os.environ["BUNDLE"])
# TLS 1.2: websockets' sync client (15.0.1 and 17.4 alike) sometimes never sends its
# handshake request when TLS 1.3 session tickets arrive right after the handshake (a
# packet capture shows it; latchkey without tickets never saw it; in TLS 1.2 tickets come
# inside the handshake). A client race, not latchkey's: docs/dev-notes/2026-12-02-fifth.md.
ctx.maximum_version = ssl.TLSVersion.TLSv1_2
with connect("wss://api.example.com/ws", ssl=ctx, proxy=os.environ["PROXY"],
             additional_headers={"Authorization": "Bearer placeholder"}) as ws:
    ws.send("whoami")
    print(ws.recv())
    ws.send("whoami in pieces")
    print(ws.recv())
    print(ws.response.headers.get("Sec-WebSocket-Extensions"))
