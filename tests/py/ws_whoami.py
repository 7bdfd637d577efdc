"""Ask a reflecting WebSocket upstream (through latchkey) who we are."""
import os
import ssl

from websockets.sync.client import connect

ctx = ssl.create_default_context(cafile=os.environ["BUNDLE"])
with connect("wss://api.example.com/ws", ssl=ctx, proxy=os.environ["PROXY"],
             additional_headers={"Authorization": "Bearer placeholder"}) as ws:
    ws.send("whoami")
    print(ws.recv())
    ws.send("whoami in pieces")
    print(ws.recv())
    print(ws.response.headers.get("Sec-WebSocket-Extensions"))
