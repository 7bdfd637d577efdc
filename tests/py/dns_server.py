"""A DNS server on UDP port 53 of a loopback address, for latchkey's resolver tests
(issue 20): latchkey runs with a resolv.conf naming it (in a mount namespace of its
own), so getaddrinfo asks it.

  fast.<zone>   answered at once: A 127.0.0.1 (AAAA: no records)
  slow.<zone>   held, unanswered, until the datagram b"release" arrives on the same
                socket: a resolver that takes as long as the test wants, with no clock
  anything else NXDOMAIN

Prints "ready", then one line per query ("query NAME TYPE", "held NAME") and
"released", flushed, so the test can wait for what it needs.

usage: dns_server.py BIND_IP
"""
import socket
import struct
import sys

bind_ip = sys.argv[1]
A, AAAA = 1, 28


def question(msg):
    """(name, qtype, end of the question section)."""
    i, labels = 12, []
    while msg[i]:
        n = msg[i]
        labels.append(msg[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    qtype = struct.unpack(">H", msg[i + 1:i + 3])[0]
    return ".".join(labels).lower(), qtype, i + 5


def answer(msg):
    name, qtype, end = question(msg)
    known = name.split(".", 1)[0] in ("fast", "slow")
    rcode = 0 if known else 3
    records = b""
    if known and qtype == A:
        records = b"\xc0\x0c" + struct.pack(">HHIH", A, 1, 0, 4) + socket.inet_aton("127.0.0.1")
    count = 1 if records else 0
    head = msg[:2] + struct.pack(">HHHHH", 0x8180 | rcode, 1, count, 0, 0)
    return head + msg[12:end] + records


def main():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind_ip, 53))
    print("ready", flush=True)
    held = []
    while True:
        msg, peer = s.recvfrom(4096)
        if msg == b"release":
            for m, p in held:
                s.sendto(answer(m), p)
            held.clear()
            print("released", flush=True)
            continue
        if len(msg) < 17:
            continue
        name, qtype, _ = question(msg)
        print(f"query {name} {qtype}", flush=True)
        if name.startswith("slow."):
            held.append((msg, peer))
            print(f"held {name}", flush=True)
            continue
        s.sendto(answer(msg), peer)


main()
