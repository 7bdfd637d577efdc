"""A real WebSocket client through latchkey: HTTPS_PROXY-style proxy, the latchkey CA
bundle, and only a placeholder credential."""
import os

from websockets.sync.client import connect
from ws_tls import client_context

ctx = client_context()
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
