"""A real WebSocket client (Python websockets) through latchkey that sends one text
message fragmented in three frames, then "hello". Prints what comes back, or `closed`.

usage: PROXY=... BUNDLE=... MESSAGE=... ws_fragments.py
"""
import os

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from ws_tls import client_context

text = os.environ["MESSAGE"]
third = len(text) // 3
ctx = client_context()
with connect("wss://api.example.com/ws", ssl=ctx, proxy=os.environ["PROXY"],
             additional_headers={"Authorization": "Bearer placeholder"}) as ws:
    try:
        ws.send(iter([text[:third], text[third:2 * third], text[2 * third:]]))
        print(ws.recv(timeout=10))
        ws.send("hello")
        print(ws.recv(timeout=10))
    except (ConnectionClosed, TimeoutError):
        print("closed")
