#!/usr/bin/env python3
"""A minimal SMTP server for the notification benchmark: accepts every message and counts them.

Usage: python3 bench/smtp_sink.py PORT
"""
import asyncio
import sys

received = 0


async def session(reader, writer):
    global received
    writer.write(b"220 bench-sink ESMTP\r\n")
    in_data = False
    while True:
        line = await reader.readline()
        if not line:
            break
        if in_data:
            if line in (b".\r\n", b".\n"):
                in_data = False
                received += 1
                writer.write(b"250 OK queued as bench-%d\r\n" % received)
            continue
        command = line.strip().upper()
        if command.startswith(b"EHLO"):
            writer.write(b"250-bench-sink\r\n250 8BITMIME\r\n")
        elif command == b"DATA":
            in_data = True
            writer.write(b"354 go ahead\r\n")
        elif command == b"QUIT":
            writer.write(b"221 bye\r\n")
            await writer.drain()
            break
        else:
            writer.write(b"250 OK\r\n")
        await writer.drain()
    writer.close()


async def main(port):
    server = await asyncio.start_server(session, "127.0.0.1", port)
    print(f"smtp sink listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
