#!/usr/bin/env python3
"""A loopback TLS upstream streaming Server-Sent Events for the first-byte benchmark.

GET /sse answers at once with one event, holds the stream 10 ms, sends a second event
and ends (chunked, keep-alive). Usage: sse_server.py PORT CERT KEY
"""
import asyncio
import ssl
import sys


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunk(b"data: first\n\n"))
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(chunk(b"data: last\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = await asyncio.start_server(serve, "127.0.0.1", port, ssl=ctx)
    async with server:
        await server.serve_forever()


asyncio.run(main())
