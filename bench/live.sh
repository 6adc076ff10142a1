#!/usr/bin/env bash
# Live order status at scale: STREAMS (default 1000) server-sent event streams of one order held
# open at once against one orderwave (release build, SQLite), against the same number of idle
# keep-alive connections measured in the same run (bench/live.py): the server's memory per
# stream, and how long one change takes to reach every stream.
#
# Usage: bench/live.sh [STREAMS=1000]
set -euo pipefail
cd "$(dirname "$0")/.."
STREAMS="${1:-1000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/orderwave-target}"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
# shellcheck source=bench/lib.sh
. bench/lib.sh
cargo build --release -q -p orderwave
BIN="$CARGO_TARGET_DIR/release"
bench_auth
ulimit -n "$((STREAMS * 2 + 256))"
# A caller may hold 16 streams: enough callers for all of them.
for i in $(seq 1 $(((STREAMS + 15) / 16))); do
  "$BIN/orderwave" token --sub "bench-live-$i" --role admin --ttl 1h
done >"$WORK/tokens"
BEFORE=$(loadavg)
# Each on a server of its own, so neither reuses what the other's connections freed.
for mode in idle streams; do
  start "$mode" "$BIN/orderwave" serve --demo --listen 127.0.0.1:0 --data-dir "$WORK/$mode"
  ORDER=$(curl -sf -H "$AUTH" -H 'content-type: application/json' -d "$ORDER_BODY" "$URL/api/v1/orders" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  # Until it is CONFIRMED (PROCESSING comes from there).
  for _ in $(seq 1 100); do
    curl -sf -H "$AUTH" "$URL/api/v1/orders/$ORDER" | grep -q '"status":"CONFIRMED"' && break
    sleep 0.1
  done
  python3 bench/live.py "$mode" "$URL" "$ORDER" "$PID" "$WORK/tokens" "$STREAMS"
  kill "$PID"; wait "$PID" 2>/dev/null || true
done
echo "load average: $BEFORE -> $(loadavg); $(nproc) cores; commit $(git rev-parse --short HEAD)"
