"""A real WebSocket client (Python websockets) through latchkey that sends one text
message fragmented in three frames, then "hello". Prints what comes back, or `closed`.

usage: PROXY=... BUNDLE=... MESSAGE=... ws_fragments.py
"""
import os
import ssl

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

text = os.environ["MESSAGE"]
third = len(text) // 3
ctx = ssl.create_default_context(cafile=os.environ["BUNDLE"])
# TLS 1.2: websockets' sync client (15.0.1 and 17.4 alike) sometimes never sends its
# handshake request when TLS 1.3 session tickets arrive right after the handshake (a
# packet capture shows it; latchkey without tickets never saw it; in TLS 1.2 tickets come
# inside the handshake). A client race, not latchkey's: docs/dev-notes/2026-12-02-fifth.md.
ctx.maximum_version = ssl.TLSVersion.TLSv1_2
with connect("wss://api.example.com/ws", ssl=ctx, proxy=os.environ["PROXY"],
             additional_headers={"Authorization": "Bearer placeholder"}) as ws:
    try:
        ws.send(iter([text[:third], text[third:2 * third], text[2 * third:]]))
        print(ws.recv(timeout=10))
        ws.send("hello")
        print(ws.recv(timeout=10))
    except (ConnectionClosed, TimeoutError):
        print("closed")
