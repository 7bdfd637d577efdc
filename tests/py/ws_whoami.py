"""Ask a reflecting WebSocket upstream (through latchkey) who we are."""
import os

from websockets.sync.client import connect
from ws_tls import client_context

ctx = client_context()
with connect("wss://api.example.com/ws", ssl=ctx, proxy=os.environ["PROXY"],
             additional_headers={"Authorization": "Bearer placeholder"}) as ws:
    ws.send("whoami")
    print(ws.recv())
    ws.send("whoami in pieces")
    print(ws.recv())
    print(ws.response.headers.get("Sec-WebSocket-Extensions"))
