"""What every HTTP/2 test client here starts with: a CONNECT through latchkey's proxy
port, then TLS inside the tunnel with ALPN h2 (latchkey's leaf certificate not checked).
Imported by the h2_*.py scripts (their own directory is on sys.path when run)."""

import socket
import ssl


def open_h2_tunnel(port, authority, timeout=None):
    """A TLS socket speaking h2 to `authority` ("host:port") through 127.0.0.1:`port`."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise SystemExit(f"CONNECT closed: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"CONNECT refused: {head!r}")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(s, server_hostname=authority.rsplit(":", 1)[0])
    assert tls.selected_alpn_protocol() == "h2", tls.selected_alpn_protocol()
    return tls
