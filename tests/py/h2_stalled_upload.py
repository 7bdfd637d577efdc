"""An HTTP/2 client that starts an upload and stalls (issue 20): through latchkey
(CONNECT, TLS with ALPN h2, certificate not checked) it sends a POST announcing 100,000
bytes, sends 1,000 of them, reads the answer to its end, and then sends nothing more,
its connection and stream open, for SECONDS, reading what latchkey sends. Prints JSON:
whether the answer came, whether latchkey reset the stream, GOAWAY, a close.

usage: h2_stalled_upload.py PROXY_PORT HOST PATH SECONDS
"""

import json
import socket
import ssl
import struct
import sys
import time

import hpack

from h2_tunnel import open_h2_tunnel

port, host, path, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY = 0, 1, 3, 4, 7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def main():
    tls = open_h2_tunnel(port, f"{host}:443")
    tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0))
    block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "https"), (":authority", host),
                                    (":path", path), ("content-length", "100000")])
    tls.sendall(frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, 0, 1, b"u" * 1000))
    out = {"answered": False, "rst": None, "goaway": None, "closed": False, "after": None}
    buf, answered_at = b"", None
    deadline = time.monotonic() + seconds
    tls.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            data = tls.recv(65536)
        except socket.timeout:
            continue
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            out["closed"] = True
            break
        buf += data
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            length = int.from_bytes(buf[:3], "big")
            kind, flags, stream = buf[3], buf[4], struct.unpack(">I", buf[5:9])[0] & 0x7FFFFFFF
            payload, buf = buf[9:9 + length], buf[9 + length:]
            if kind == SETTINGS and not flags & ACK:
                tls.sendall(frame(SETTINGS, ACK, 0))
            if stream == 1 and kind in (HEADERS, DATA) and flags & END_STREAM:
                out["answered"], answered_at = True, time.monotonic()
            if stream == 1 and kind == RST_STREAM:
                out["rst"] = struct.unpack(">I", payload)[0]
                out["after"] = round(time.monotonic() - answered_at, 2) if answered_at else None
            if kind == GOAWAY:
                out["goaway"] = struct.unpack(">I", payload[4:8])[0]
    print(json.dumps(out))


main()
