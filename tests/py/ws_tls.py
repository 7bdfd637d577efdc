"""The TLS context the WebSocket test clients use to reach latchkey (its CA bundle)."""
import os
import ssl


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=os.environ["BUNDLE"])
    # TLS 1.2: websockets' sync client (15.0.1 and 17.4 alike) sometimes never sends its
    # handshake request when TLS 1.3 session tickets arrive right after the handshake (a
    # packet capture shows it; latchkey without tickets never saw it; in TLS 1.2 tickets
    # come inside the handshake). A client race, not latchkey's:
    # docs/dev-notes/2026-12-02-fifth.md.
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx
