#!/usr/bin/env bash
# The saga alone, at a fixed rate, on one backend, with the per-hop split (bench/hops.py): the quick
# loop for latency work (bench/run.sh is the full report).
#
# Usage: bench/saga.sh sqlite|pg [SECONDS=60] [RATE=200] [BUS=sql|nats|rabbitmq|kafka]
#   BUS: the embedded sql bus (default), or the local NATS JetStream (127.0.0.1:4222), RabbitMQ
#        (127.0.0.1:5672) or Kafka test broker (127.0.0.1:9092, scripts/kafka-test-broker.sh)
#        under a prefix of the run's own, deleted at the end
#   BIN=dir   uses the binaries in dir (default: builds them in $CARGO_TARGET_DIR/release)
#   KEEP=dir  keeps the SQLite data directory there (for bench/hops.py)
#   TRACES=1  the server exports its traces (every span sampled) to a local OTLP/HTTP receiver
#             (bench/otlp_sink.py), which reports the spans it got at the end
#   VACUUM_EVERY=seconds (pg, default 60): the bench database is vacuumed this often while the
#             load runs, as autovacuum would; 0 leaves it alone. Checked: a server with
#             autovacuum on needs no help (SHOW autovacuum).
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND="${1:?usage: bench/saga.sh sqlite|pg [SECONDS] [RATE] [BUS]}"
SECONDS_="${2:-60}"
RATE="${3:-200}"
BUS="${4:-sql}"
PG_ADMIN="${PG_ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/orderwave-target}"
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p orderwave -p bench-saga
  BIN="$CARGO_TARGET_DIR/release"
fi
case "$BUS" in
  sql) BUS_ARGS=(--bus sql) ;;
  nats) BUS_ARGS=(--bus nats://127.0.0.1:4222) ;;
  rabbitmq) BUS_ARGS=(--bus amqp://guest:guest@127.0.0.1:5672/%2f) ;;
  kafka) bash scripts/kafka-test-broker.sh >&2; BUS_ARGS=(--bus kafka://127.0.0.1:9092) ;;
  *) echo "bus: sql, nats, rabbitmq or kafka" >&2; exit 2 ;;
esac
BUS_ARGS+=(--bus-prefix "bench$(date +%s)")
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  if [ "$BUS" != sql ]; then "$BIN/orderwave" bus-delete "${BUS_ARGS[@]}" >/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_auth

DATA="${KEEP:-$WORK/data}"
case "$BACKEND" in
  sqlite) rm -rf "$DATA"; STORE=(--data-dir "$DATA") ;;
  pg)
    psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS ow_bench_saga WITH (FORCE)" -c "CREATE DATABASE ow_bench_saga"
    STORE=(--database-url "${PG_ADMIN%/*}/ow_bench_saga") ;;
  *) echo "backend: sqlite or pg" >&2; exit 2 ;;
esac
TRACE_ARGS=()
SINK=""
if [ "${TRACES:-0}" = 1 ]; then
  SINK_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 bench/otlp_sink.py "$SINK_PORT" >"$WORK/otlp.out" 2>&1 &
  SINK=$!
  PIDS+=("$SINK")
  TRACE_ARGS=(--otlp-endpoint "http://127.0.0.1:$SINK_PORT")
fi
start saga "$BIN/orderwave" serve --demo --listen 127.0.0.1:0 --log-format json "${STORE[@]}" "${BUS_ARGS[@]}" "${TRACE_ARGS[@]}"
for sku in SKU-CHAIR SKU-LAMP; do
  curl -sf -H "$AUTH" -X PUT "$URL/api/v1/inventory/$sku" -H 'content-type: application/json' -d '{"onHand":100000000}' >/dev/null
done
if [ "$BACKEND" = pg ]; then
  # Every run starts from a fresh checkpoint: one falling inside the load (another run's WAL)
  # would stall it for seconds.
  psql -q "$PG_ADMIN" -c CHECKPOINT
fi
if [ "$BUS" = kafka ]; then
  # The test broker assigns a new group's partitions half a session (7.5 s) after it joins:
  # the load starts once the groups have theirs.
  sleep 10
fi
BEFORE=$(loadavg)
VACUUMING=""
if [ "$BACKEND" = pg ] && [ "${VACUUM_EVERY:-60}" -gt 0 ] &&
  [ "$(psql -Atc 'SHOW autovacuum' "$PG_ADMIN")" = off ]; then
  # This server runs without autovacuum: dead rows of the outboxes, payments and notifications
  # would pile up in their indexes for the whole run and slow every lookup. What autovacuum
  # (naptime 1 min, paced) would do, the bench does.
  (while sleep "${VACUUM_EVERY:-60}"; do
    # Paced as autovacuum paces itself (autovacuum_vacuum_cost_delay, 2 ms by default); an
    # unpaced VACUUM of the whole database reads and dirties pages as fast as it can and
    # stalls the load while it runs, which autovacuum would not.
    psql -q "${PG_ADMIN%/*}/ow_bench_saga" -c "SET vacuum_cost_delay = '2ms'" -c "VACUUM (ANALYZE)" 2>/dev/null || true
  done) &
  VACUUMING=$!
  PIDS+=("$VACUUMING")
  echo "autovacuum is off on this server: the bench vacuums its database every ${VACUUM_EVERY:-60} s" >&2
fi
"$BIN/bench-saga" "$URL" "$RATE" "$SECONDS_" 2>"$WORK/saga.err"
grep -av '^t=' "$WORK/saga.err" | tail -5 >&2 || true
# CPU time the server used over its life (start, load and catch-up), user + system.
CPU=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$PID/stat")
echo "bus $BUS; traces ${TRACES:-0}; server CPU ${CPU} s; load average: $BEFORE -> $(loadavg); $(nproc) cores; commit $(git rev-parse --short HEAD)"
kill "$PID"; wait "$PID" 2>/dev/null || true
if [ -n "$SINK" ]; then
  # The server exported its last spans as it stopped.
  kill "$SINK"; wait "$SINK" 2>/dev/null || true
  cat "$WORK/otlp.out"
fi
if [ -n "$VACUUMING" ]; then kill "$VACUUMING" 2>/dev/null || true; fi
if [ "$BUS" != sql ]; then
  : # the hops are read from the sql bus's log
elif [ "$BACKEND" = sqlite ]; then
  python3 bench/hops.py "$DATA"
else
  python3 bench/hops.py "${PG_ADMIN%/*}/ow_bench_saga"
fi
