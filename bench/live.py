"""Open live streams at once against a running orderwave and measure what they cost.

Usage: python3 bench/live.py idle|streams URL ORDER_ID SERVER_PID TOKENS_FILE STREAMS

idle holds STREAMS idle keep-alive connections (each has asked GET /health/live once): the
baseline. streams holds STREAMS streams of GET /api/v1/orders/{id}/events, each past its first
event, then makes one change to the order (PUT status PROCESSING) and times its arrival on every
stream. Each prints the server's RSS growth per connection (run each on a fresh server). The
callers rotate over the tokens (a caller may hold 16 streams)."""

import asyncio
import json
import sys
import time
import urllib.parse
import urllib.request

MODE, URL, ORDER, PID, TOKENS, STREAMS = (
    sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
HOST, PORT = urllib.parse.urlsplit(URL).hostname, urllib.parse.urlsplit(URL).port
tokens = [t.strip() for t in open(TOKENS) if t.strip()]


def rss_kib():
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def request(path, token, extra=""):
    reader, writer = await asyncio.open_connection(HOST, PORT)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n{extra}\r\n".encode()
    )
    await writer.drain()
    return reader, writer


async def idle(i):
    reader, writer = await request("/health/live", tokens[i % len(tokens)])
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return reader, writer


async def stream(i):
    reader, writer = await request(
        f"/api/v1/orders/{ORDER}/events", tokens[i % len(tokens)], "Accept: text/event-stream\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], head
    await reader.readuntil(b"\n\n")  # the first event
    return reader, writer


async def wait_for(reader, marker):
    while True:
        chunk = await reader.readuntil(b"\n\n")
        if marker in chunk:
            return time.monotonic()


async def hold(open_one, label):
    before = rss_kib()
    connections = []
    for start in range(0, STREAMS, 100):
        connections += await asyncio.gather(*(open_one(i) for i in range(start, min(start + 100, STREAMS))))
    await asyncio.sleep(1)
    after = rss_kib()
    print(f"{label}: {len(connections)} open, server RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB, "
          f"{(after - before) / len(connections):.1f} KiB each")
    return connections, (after - before) / len(connections)


async def main():
    if MODE == "idle":
        await hold(idle, "idle keep-alive connections")
        return
    streams, _ = await hold(stream, "live streams")
    # One change, fanned out to every stream.
    body = json.dumps({"status": "PROCESSING"}).encode()
    put = urllib.request.Request(f"{URL}/api/v1/orders/{ORDER}/status", data=body, method="PUT",
                                 headers={"Authorization": f"Bearer {tokens[0]}", "Content-Type": "application/json"})
    started = time.monotonic()
    waits = [asyncio.create_task(wait_for(reader, b'"toStatus":"PROCESSING"')) for reader, _ in streams]
    await asyncio.get_running_loop().run_in_executor(None, lambda: urllib.request.urlopen(put).read())
    arrived = sorted(t - started for t in await asyncio.gather(*waits))
    p = lambda q: arrived[min(len(arrived) - 1, int(q * (len(arrived) - 1)))] * 1000
    print(f"one change reached all {len(arrived)} streams: p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, "
          f"last {arrived[-1] * 1000:.1f} ms")


asyncio.run(main())
