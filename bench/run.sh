#!/usr/bin/env bash
# Load benchmark of the order API against two baselines measured in the same run:
#   - pgbench running the exact SQL of placing an order (event + order + items + outbox in one
#     transaction), at the same concurrency;
#   - an axum hello-world (bench/hello), the HTTP ceiling of this machine.
# Then POST /api/v1/orders and GET /api/v1/orders/{id} on PostgreSQL and on SQLite, with the
# server's peak RSS under load. Then the saga at a fixed rate (bench/saga): orders/s reaching
# CONFIRMED and the POST-to-CONFIRMED latency read from the orders' event timestamps, with the
# consumers' lag sampled to show whether a backlog grows. Prints a Markdown report (and writes
# it to bench/last-run.md).
#
# Usage: bench/run.sh   (DURATION=15 seconds per phase, CONNECTIONS=32,
#                        SAGA_RATE=200 orders/s for SAGA_SECONDS=300 per backend)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-15}"
SAGA_RATE="${SAGA_RATE:-200}"
SAGA_SECONDS="${SAGA_SECONDS:-300}"
CONNECTIONS="${CONNECTIONS:-32}"
THREADS="${THREADS:-2}"
PG_ADMIN="${PG_ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}"
PG_BASE="${PG_ADMIN%/*}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/orderwave-target}"
BIN="$CARGO_TARGET_DIR/release"
WORK="$(mktemp -d)"
REPORT="bench/last-run.md"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

# shellcheck source=bench/lib.sh
. bench/lib.sh
require_wrk
command -v pgbench >/dev/null || { echo "pgbench is missing (Debian package postgresql-15)" >&2; exit 1; }
require_postgres

cargo build --release -q -p orderwave -p bench-hello -p bench-saga

bench_auth

# rss_watch PID FILE: samples RSS (KiB) every 200 ms until stopped.
rss_watch() { while kill -0 "$1" 2>/dev/null; do ps -o rss= -p "$1" >>"$2" || true; sleep 0.2; done; }
peak_mib() { sort -n "$1" | tail -1 | awk '{printf "%.1f", $1/1024}'; }

# wrk_run LABEL URL [LUA]: runs wrk, stores req/s, p50, p99, errors in R_* variables.
wrk_run() {
  local label=$1 url=$2 lua=${3:-}
  local args=(-t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency)
  [ -n "$lua" ] && args+=(-s "$lua")
  local before; before=$(loadavg)
  wrk "${args[@]}" "$url" >"$WORK/$label.wrk"
  R_RPS=$(awk '/^Requests\/sec/ {print $2}' "$WORK/$label.wrk")
  R_P50=$(awk '$1=="50%" {print $2}' "$WORK/$label.wrk")
  R_P99=$(awk '$1=="99%" {print $2}' "$WORK/$label.wrk")
  R_NON2XX=$(awk '/Non-2xx/ {print $NF}' "$WORK/$label.wrk"); R_NON2XX=${R_NON2XX:-0}
  R_LOAD="$before → $(loadavg)"
  echo "$label: $R_RPS req/s, p50 $R_P50, p99 $R_P99, non-2xx $R_NON2XX" >&2
}

post_lua "$WORK/post.lua"

# stock_up URL: enough chairs and lamps that no order of the run is out of stock.
stock_up() {
  for sku in SKU-CHAIR SKU-LAMP; do
    curl -sf -H "$AUTH" -X PUT "$1/api/v1/inventory/$sku" -H 'content-type: application/json' -d '{"onHand":100000000}' >/dev/null
  done
}

fresh_pg() {
  local db="ow_bench_$1"
  psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
  echo "$PG_BASE/$db"
}

# ---- 1. pgbench on the SQL of placing an order ------------------------------------------------
PGB_URL=$(fresh_pg pgbench)
"$BIN/orderwave" migrate --database-url "$PGB_URL" >/dev/null
# One real order through the API gives the exact rows (and sizes) the server writes when it
# answers 201 (no saga behind it: --no-background).
start sample "$BIN/orderwave" serve --demo --no-background --listen 127.0.0.1:0 --database-url "$PGB_URL" --log-format json
curl -sf -H "$AUTH" -X POST "$URL/api/v1/orders" -H 'content-type: application/json' -d "$ORDER_BODY" >/dev/null
kill "$PID"; wait "$PID" 2>/dev/null || true
# pgbench would read ":name" inside the JSON as a variable: a space after the colon keeps the
# bytes' meaning and (within one byte) their size.
q() { psql -At "$PGB_URL" -c "SET search_path TO orders; $1" | tail -1 | sed "s/'/''/g; s/\":\([a-z]\)/\": \1/g"; }
EVENT=$(q "SELECT payload FROM events LIMIT 1")
DOC=$(q "SELECT document FROM orders LIMIT 1")
ENVELOPE=$(q "SELECT payload FROM outbox LIMIT 1")
cat >"$WORK/place_order.sql" <<SQL
\set r random(1, 9000000000000000000)
BEGIN;
INSERT INTO events (aggregate_id, version, event_type, payload, occurred_at) VALUES (:client_id || '-' || :r, 1, 'OrderPlaced', '$EVENT', (now() at time zone 'utc')::text);
INSERT INTO orders (id, customer_id, status, currency, total, version, created_at, updated_at, document) VALUES (:client_id || '-' || :r, '019ab1c2-0000-7000-8000-000000000001', 'PENDING', 'USD', '114.85', 1, (now() at time zone 'utc')::text, (now() at time zone 'utc')::text, '$DOC');
INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price) VALUES (:client_id || '-' || :r, 0, 'SKU-CHAIR', 2, '49.90'), (:client_id || '-' || :r, 1, 'SKU-LAMP', 1, '15.05');
INSERT INTO outbox (id, aggregate_id, aggregate_version, topic, payload, created_at) VALUES (gen_random_uuid()::text, :client_id || '-' || :r, 1, 'order.created', '$ENVELOPE', (now() at time zone 'utc')::text);
COMMIT;
SQL
cp "$WORK/place_order.sql" bench/place_order.last.sql
LOAD_BEFORE=$(loadavg)
PGOPTIONS='-c search_path=orders' pgbench -n -M prepared -c "$CONNECTIONS" -j "$THREADS" -T "$DURATION" -f "$WORK/place_order.sql" "$PGB_URL" >"$WORK/pgbench.out" 2>&1
PGB_TPS=$(awk '/^tps/ {print $3; exit}' "$WORK/pgbench.out")
PGB_LAT=$(awk '/latency average/ {print $4 $5}' "$WORK/pgbench.out")
PGB_LOAD="$LOAD_BEFORE → $(loadavg)"
echo "pgbench: $PGB_TPS tx/s" >&2

# ---- 2. HTTP ceiling ------------------------------------------------------------------------
start hello "$BIN/bench-hello" 127.0.0.1:0
wrk_run hello "$URL/"
HELLO_RPS=$R_RPS; HELLO_P99=$R_P99; HELLO_LOAD=$R_LOAD
kill "$PID"

# ---- 3. the order API on PostgreSQL and SQLite --------------------------------------------------
bench_backend() {
  local name=$1; shift
  start "ow-$name" "$BIN/orderwave" serve --demo --listen 127.0.0.1:0 --log-format json "$@"
  local pid=$PID url=$URL
  stock_up "$url"
  : >"$WORK/$name.rss"
  rss_watch "$pid" "$WORK/$name.rss" &
  wrk_run "$name-post" "$url/api/v1/orders" "$WORK/post.lua"
  eval "${name}_POST_RPS=\$R_RPS ${name}_POST_P50=\$R_P50 ${name}_POST_P99=\$R_P99 ${name}_POST_ERR=\$R_NON2XX"
  eval "${name}_POST_LOAD=\"\$R_LOAD\""
  # Average group-commit batch during the POST phase.
  eval "${name}_BATCH=$(curl -sf -H "$AUTH" "$url/metrics" | awk '/^order_store_batch_size_sum/ {s=$2} /^order_store_batch_size_count/ {c=$2} END {if (c > 0) printf "%.1f", s/c; else print "n/a"}')"
  # The saga's work behind the load (relays, the inventory consumer) drains before GET is
  # measured; how long that takes is a figure of its own.
  local drain_start; drain_start=$(date +%s.%N)
  for _ in $(seq 1 600); do
    local pending lag
    pending=$(curl -sf -H "$AUTH" "$url/api/v1/admin/outbox" | grep -o '"pending":[0-9]*' | cut -d: -f2 | awk '{s+=$1} END {print s+0}')
    lag=$(curl -sf -H "$AUTH" "$url/api/v1/admin/consumers" | grep -o '"lag":[0-9]*' | cut -d: -f2 | awk '{s+=$1} END {print s+0}')
    [ "${pending:-0}" = 0 ] && [ "${lag:-0}" = 0 ] && break
    sleep 0.5
  done
  eval "${name}_DRAIN=$(awk -v a="$(date +%s.%N)" -v b="$drain_start" 'BEGIN {printf "%.1f", a - b}')"
  # GET over ids of orders just placed.
  get_lua "$url" "$WORK/$name-get.lua"
  wrk_run "$name-get" "$url" "$WORK/$name-get.lua"
  eval "${name}_GET_RPS=\$R_RPS ${name}_GET_P50=\$R_P50 ${name}_GET_P99=\$R_P99 ${name}_GET_ERR=\$R_NON2XX"
  eval "${name}_GET_LOAD=\"\$R_LOAD\""
  eval "${name}_RSS=$(peak_mib "$WORK/$name.rss")"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
bench_backend pg --database-url "$(fresh_pg api)"
bench_backend sqlite --data-dir "$WORK/data"

# ---- 4. the saga at a fixed rate ------------------------------------------------------------------
saga_backend() {
  local name=$1; shift
  start "saga-$name" "$BIN/orderwave" serve --demo --listen 127.0.0.1:0 --log-format json "$@"
  local pid=$PID url=$URL
  stock_up "$url"
  local before; before=$(loadavg)
  "$BIN/bench-saga" "$url" "$SAGA_RATE" "$SAGA_SECONDS" >"$WORK/saga-$name.json" 2>"$WORK/saga-$name.err"
  eval "${name}_SAGA_LOAD=\"$before → $(loadavg)\""
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "saga $name: $(cat "$WORK/saga-$name.json")" >&2
}
saga_backend pg --database-url "$(fresh_pg saga)"
saga_backend sqlite --data-dir "$WORK/saga-data"
field() { grep -o "\"$2\":[^,}]*" "$WORK/saga-$1.json" | cut -d: -f2 | awk '{ if ($1 ~ /^[0-9.]+$/) printf "%.1f", $1; else print $1 }'; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b; else print "n/a" }'; }

{
  echo "### Run of $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "$CONNECTIONS connections, $THREADS load threads, ${DURATION}s per phase; load generator, server and PostgreSQL share the machine."
  echo
  echo "| phase | result | p50 | p99 | non-2xx | ratio | load avg (before → after) |"
  echo "|---|---|---|---|---|---|---|"
  echo "| pgbench, place-order SQL | $PGB_TPS tx/s | | avg $PGB_LAT | | baseline | $PGB_LOAD |"
  echo "| axum hello-world | $HELLO_RPS req/s | | $HELLO_P99 | | baseline | $HELLO_LOAD |"
  echo "| POST /orders, PostgreSQL | $pg_POST_RPS req/s | $pg_POST_P50 | $pg_POST_P99 | $pg_POST_ERR | $(ratio "$pg_POST_RPS" "$PGB_TPS") of pgbench | $pg_POST_LOAD |"
  echo "| GET /orders/{id}, PostgreSQL | $pg_GET_RPS req/s | $pg_GET_P50 | $pg_GET_P99 | $pg_GET_ERR | $(ratio "$pg_GET_RPS" "$HELLO_RPS") of hello | $pg_GET_LOAD |"
  echo "| POST /orders, SQLite | $sqlite_POST_RPS req/s | $sqlite_POST_P50 | $sqlite_POST_P99 | $sqlite_POST_ERR | $(ratio "$sqlite_POST_RPS" "$PGB_TPS") of pgbench | $sqlite_POST_LOAD |"
  echo "| GET /orders/{id}, SQLite | $sqlite_GET_RPS req/s | $sqlite_GET_P50 | $sqlite_GET_P99 | $sqlite_GET_ERR | $(ratio "$sqlite_GET_RPS" "$HELLO_RPS") of hello | $sqlite_GET_LOAD |"
  echo
  echo "Peak server RSS under load: PostgreSQL $pg_RSS MiB, SQLite $sqlite_RSS MiB."
  echo "Average orders per commit (group commit) during POST: PostgreSQL $pg_BATCH, SQLite $sqlite_BATCH."
  echo "Time for the relays and consumers to catch up after the POST phase: PostgreSQL ${pg_DRAIN} s, SQLite ${sqlite_DRAIN} s."
  echo
  echo "Saga at a fixed $SAGA_RATE orders/s for ${SAGA_SECONDS}s (tok_ok, one chair each), POST-to-CONFIRMED from the orders' event times:"
  echo
  echo "| backend | placed | confirmed/s | ratio to offered | POST p50 / p99 ms | saga p50 / p99 / max ms | max lag 1st half / 2nd half | catch-up after | load avg |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for b in pg sqlite; do
    echo "| $b | $(field $b placed) | $(field $b confirmedPerSecond) | $(ratio "$(field $b confirmedPerSecond)" "$SAGA_RATE") | $(field $b postP50Ms) / $(field $b postP99Ms) | $(field $b sagaP50Ms) / $(field $b sagaP99Ms) / $(field $b sagaMaxMs) | $(field $b maxLagFirstHalf) / $(field $b maxLagSecondHalf) | $(field $b catchUpSeconds) s | $(eval echo "\$${b}_SAGA_LOAD") |"
  done
} | tee "$REPORT"
