#!/usr/bin/env python3
"""A minimal OTLP/HTTP trace receiver for the benchmarks: accepts every export (protobuf) on
POST /v1/traces, counts the spans in it, and prints the totals when it is stopped (SIGTERM).

Usage: python3 bench/otlp_sink.py PORT
"""
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
totals = {"exports": 0, "spans": 0, "bytes": 0}


def fields(data):
    """(field number, wire type, value) of a protobuf message; length-delimited values as bytes."""
    i = 0
    while i < len(data):
        key, i = varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(data, i)
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 2:
            length, i = varint(data, i)
            value, i = data[i : i + length], i + length
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def varint(data, i):
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def count_spans(body):
    """ExportTraceServiceRequest.resource_spans(1) -> ResourceSpans.scope_spans(2) -> ScopeSpans.spans(2)."""
    spans = 0
    for number, _, resource in fields(body):
        if number != 1:
            continue
        for number, _, scope in fields(resource):
            if number != 2:
                continue
            spans += sum(1 for number, _, _ in fields(scope) if number == 2)
    return spans


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        spans = count_spans(body)
        with lock:
            totals["exports"] += 1
            totals["spans"] += spans
            totals["bytes"] += len(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)

    def stop(*_):
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    print(
        f"otlp sink: {totals['exports']} exports, {totals['spans']} spans, "
        f"{totals['bytes'] / 1e6:.1f} MB; its own CPU {time.process_time():.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
