#!/usr/bin/env bash
# The reports on large order tables: for each backend and size, a fresh database seeded with that
# many orders and their events straight into the order service's tables (bench/reports_seed.py,
# not through the API), then the server started on it, which fills the reports' projection from
# them once (the upgrade backfill, timed), then each report over HTTP with curl, RUNS times
# after 3 warm-up requests: median and p95. Baseline, in the same run: the same sales
# aggregate as one GROUP BY over the orders table (sqlite3 / psql), and the PENDING -> CONFIRMED
# median computed from the events (a self-join per request), RUNS_SQL times each.
#
# Usage: bench/reports.sh [SIZES="100000 1000000"] [BACKENDS="sqlite pg"]   (RUNS=30, RUNS_SQL=5)
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES="${1:-100000 1000000}"
BACKENDS="${2:-sqlite pg}"
RUNS="${RUNS:-30}"
RUNS_SQL="${RUNS_SQL:-5}"
PG_ADMIN="${PG_ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}"
PG_BASE="${PG_ADMIN%/*}"
PG_DB=ow_bench_reports
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/orderwave-target}"
BIN="$CARGO_TARGET_DIR/release"
WORK="$(mktemp -d /var/tmp/ow-bench-reports.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=bench/lib.sh
. bench/lib.sh
require_postgres
cargo build --release -q -p orderwave
bench_auth

# serve BACKEND: starts the server (no saga workers: only the API is measured) and waits, however
# long the backfill takes, until it listens; sets URL, PID and STARTUP (seconds).
serve() {
  local args=(serve --no-background --listen 127.0.0.1:0 --log-format json)
  if [ "$1" = sqlite ]; then args+=(--data-dir "$WORK/data"); else args+=(--database-url "$PG_BASE/$PG_DB"); fi
  local t0; t0=$(date +%s.%N)
  "$BIN/orderwave" "${args[@]}" >"$WORK/server.out" 2>"$WORK/server.err" &
  PID=$!; PIDS+=("$PID")
  URL=""
  while [ -z "$URL" ]; do
    kill -0 "$PID" 2>/dev/null || { echo "the server stopped:" >&2; tail -5 "$WORK/server.err" >&2; exit 1; }
    sleep 0.2
    URL=$(grep -o 'http://[0-9.:]*' "$WORK/server.out" | head -1 || true)
  done
  STARTUP=$(echo "$(date +%s.%N) - $t0" | bc)
}

stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; }

# stats: reads seconds, one per line; prints "median p95" in milliseconds.
stats() {
  sort -g | awk '{v[NR]=$1*1000} END {m=v[int((NR+1)/2)]; p=v[int(NR*0.95+0.999)]; printf "%.1f %.1f", m, p}'
}

# timed PATH: RUNS timings of GET PATH (after 3 warm-ups), as "median p95" ms.
timed() {
  for _ in 1 2 3; do curl -sf -o /dev/null -H "$AUTH" "$URL$1"; done
  for _ in $(seq 1 "$RUNS"); do
    curl -sf -o /dev/null -w '%{time_total}\n' -H "$AUTH" "$URL$1"
  done | stats
}

# sql BACKEND QUERY: RUNS_SQL timings of QUERY on the seeded database, as "median p95" ms.
sql() {
  for _ in $(seq 1 "$RUNS_SQL"); do
    if [ "$1" = sqlite ]; then
      printf '.timer on\n%s\n' "$2" | sqlite3 "$WORK/data/orders.db" | awk '/^Run Time/ {print $4}'
    else
      printf '\\timing on\nSET search_path TO orders;\n%s\n' "$2" | psql -qAt "$PG_BASE/$PG_DB" \
        | awk '/^Time:/ {t = $2} END {print t / 1000}'   # the query's, not the SET's
    fi
  done | stats
}

GROUP_BY_SQL="SELECT substr(created_at, 1, 10), currency, status, COUNT(*), SUM(CAST(total AS NUMERIC)) FROM orders GROUP BY 1, 2, 3;"
# The PENDING -> CONFIRMED median from the events, computed per request.
lead_sql() {
  local lead
  if [ "$1" = sqlite ]; then
    lead="(julianday(c.occurred_at) - julianday(o.created_at)) * 86400000"
  else
    lead="EXTRACT(EPOCH FROM (c.occurred_at::timestamptz - o.created_at::timestamptz)) * 1000"
  fi
  echo "SELECT $lead AS ms FROM events c JOIN orders o ON o.id = c.aggregate_id
        WHERE c.event_type = 'OrderStatusChanged' AND c.payload LIKE '%\"to\":\"CONFIRMED\"%'
        ORDER BY ms LIMIT 1 OFFSET $2;"
}

echo "commit $(git rev-parse --short HEAD); $(nproc) cores; $(psql -qAt "$PG_ADMIN" -c 'SHOW server_version'); SQLite $(sqlite3 --version | cut -d' ' -f1) (CLI)"
echo
echo "| backend | orders | seed s | start with backfill s | sales by day | by status | by currency | one week, partial days | fulfilment | GROUP BY baseline | lead median baseline | load |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for size in $SIZES; do
  for backend in $BACKENDS; do
    before=$(loadavg)
    rm -rf "$WORK/data"; mkdir -p "$WORK/data"
    if [ "$backend" = pg ]; then
      psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" -c "CREATE DATABASE $PG_DB"
    fi
    # The schema, by the server's own migrations; then the orders, as an older version left them.
    serve "$backend"; stop
    t0=$(date +%s.%N)
    if [ "$backend" = sqlite ]; then
      python3 bench/reports_seed.py sqlite "$WORK/data/orders.db" "$size"
      sqlite3 "$WORK/data/orders.db" "INSERT INTO order_reports_backfill (pending) VALUES (1); ANALYZE;"
    else
      python3 bench/reports_seed.py tsv "$WORK" "$size"
      psql -q "$PG_BASE/$PG_DB" -c "\\copy orders.orders FROM '$WORK/orders.tsv'" \
        -c "\\copy orders.events (aggregate_id, version, event_type, payload, occurred_at, feed_position) FROM '$WORK/events.tsv'" \
        -c "INSERT INTO orders.order_reports_backfill (pending) VALUES (1)" -c "ANALYZE"
      rm -f "$WORK"/*.tsv
    fi
    seed=$(echo "$(date +%s.%N) - $t0" | bc)
    serve "$backend"
    backfill=$STARTUP
    # A week in the middle of the year, from and to inside a day.
    from=$(date -u -d '180 days ago' +%Y-%m-%dT13:30:00Z)
    to=$(date -u -d '173 days ago' +%Y-%m-%dT09:15:00Z)
    day=$(timed "/api/v1/reports/sales?groupBy=day")
    status=$(timed "/api/v1/reports/sales?groupBy=status")
    currency=$(timed "/api/v1/reports/sales?groupBy=currency")
    week=$(timed "/api/v1/reports/sales?from=$from&to=$to&groupBy=day")
    fulfilment=$(timed "/api/v1/reports/fulfilment")
    curl -sf -H "$AUTH" "$URL/api/v1/reports/fulfilment" >"$WORK/fulfilment.json"
    curl -sf -H "$AUTH" "$URL/api/v1/reports/sales?groupBy=currency" >"$WORK/sales.json"
    # The seeded orders are read back through the API as they are stored.
    some=$(curl -sf -H "$AUTH" "$URL/api/v1/orders?limit=1" | grep -o '"id":"[0-9a-f-]\{36\}"' | head -1 | cut -d'"' -f4)
    curl -sf -o /dev/null -H "$AUTH" "$URL/api/v1/orders/$some" || echo "warning: seeded order $some not readable" >&2
    stop
    confirmed=$(python3 -c "import json; print(json.load(open('$WORK/fulfilment.json'))['leadTimes'][0]['orders'])")
    baseline=$(sql "$backend" "$GROUP_BY_SQL")
    lead=$(sql "$backend" "$(lead_sql "$backend" $((confirmed / 2)))")
    ms() { echo "$1" | awk '{printf "%s / %s ms", $1, $2}'; }
    printf '| %s | %s | %.0f | %.1f | %s | %s | %s | %s | %s | %s | %s | %s -> %s |\n' \
      "$backend" "$size" "$seed" "$backfill" "$(ms "$day")" "$(ms "$status")" "$(ms "$currency")" \
      "$(ms "$week")" "$(ms "$fulfilment")" "$(ms "$baseline")" "$(ms "$lead")" "$before" "$(loadavg)"
    echo "  sales totals: $(python3 -c "import json; print('; '.join(f\"{t['currency']} {t['orders']} orders, revenue {t['revenue']}\" for t in json.load(open('$WORK/sales.json'))['totals']))")" >&2
    echo "  fulfilment: $(python3 -c "import json; r=json.load(open('$WORK/fulfilment.json')); print(r['orders'], 'orders;', ', '.join(f\"{l['from']}->{l['to']} p50 {l['p50Ms']} p99 {l['p99Ms']} ms\" for l in r['leadTimes']), '; saga failure rate', r['saga']['failureRate'])")" >&2
  done
done
