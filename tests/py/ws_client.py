"""A real WebSocket client through latchkey: HTTPS_PROXY-style proxy, the latchkey CA
bundle, and only a placeholder credential."""
import os
import ssl

from websockets.sync.client import connect

ctx = ssl.create_default_context(cafile=os.environ["BUNDLE"])
# TLS 1.2: websockets' sync client (15.0.1 and 17.4 alike) sometimes never sends its
# handshake request when TLS 1.3 session tickets arrive right after the handshake (a
# packet capture shows it; latchkey without tickets never saw it; in TLS 1.2 tickets come
# inside the handshake). A client race, not latchkey's: docs/dev-notes/2026-12-02-fifth.md.
ctx.maximum_version = ssl.TLSVersion.TLSv1_2
with connect(
    "wss://api.example.com/ws",
    ssl=ctx,
    proxy=os.environ["PROXY"],
    additional_headers={"Authorization": "Bearer placeholder"},
) as ws:
    ws.send("hello")
    print(ws.recv())
    ws.send(b"\x00\x01\xffbinary")
    print(ws.recv().hex())
    big = "x" * 200_000
    ws.send(big)
    print(len(ws.recv()))
