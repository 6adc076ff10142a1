#!/usr/bin/env bash
# The order cache on PostgreSQL: POST /api/v1/orders (each write also goes to the cache) and
# GET /api/v1/orders/{id} over 100 orders (each read a hit once cached), with wrk, for three
# caches measured one after the other in the same run:
#   none  --order-cache-mib 0: every read goes to PostgreSQL (the baseline)
#   redis --cache redis://127.0.0.1:6379 (keys under a prefix of the run's own, deleted after)
#   local the in-process cache (the default of a single process)
# The servers run with --no-background: the figures are the API's alone, without the saga.
#
# Usage: bench/cache.sh [ROUNDS=1]   (DURATION=15 seconds per phase, CONNECTIONS=32;
#                                     REDIS=redis://127.0.0.1:6379)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${1:-1}"
DURATION="${DURATION:-15}"
CONNECTIONS="${CONNECTIONS:-32}"
THREADS="${THREADS:-2}"
REDIS="${REDIS:-redis://127.0.0.1:6379}"
PG_ADMIN="${PG_ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}"
PG_BASE="${PG_ADMIN%/*}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/orderwave-target}"
BIN="$CARGO_TARGET_DIR/release"
WORK="$(mktemp -d)"
PREFIX="bench-$$"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  drop_redis_keys "$REDIS" "$PREFIX"
  rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=bench/lib.sh
. bench/lib.sh
require_wrk
require_postgres
require_redis "$REDIS"

cargo build --release -q -p orderwave

bench_auth

post_lua "$WORK/post.lua"

# wrk_run LABEL URL LUA: prints "req/s p50 p99 non-2xx" of one wrk run.
wrk_run() {
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$3" "$2" >"$WORK/$1.wrk"
  awk '/^Requests\/sec/ {r=$2} $1=="50%" {p50=$2} $1=="99%" {p99=$2} /Non-2xx/ {e=$NF}
       END {printf "%s %s %s %s", r, p50, p99, e+0}' "$WORK/$1.wrk"
}

# one MODE ROUND ARGS...: one server on a fresh database, POST then GET.
one() {
  local mode=$1 round=$2; shift 2
  local db="ow_bench_cache"
  psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
  start "$mode" "$BIN/orderwave" serve --demo --no-background --listen 127.0.0.1:0 \
    --database-url "$PG_BASE/$db" --log-format json "$@"
  local before post get
  before=$(loadavg)
  post=$(wrk_run "$mode-post-$round" "$URL/api/v1/orders" "$WORK/post.lua")
  get_lua "$URL" "$WORK/get.lua"
  get=$(wrk_run "$mode-get-$round" "$URL" "$WORK/get.lua")
  local hits
  hits=$(curl -sf -H "$AUTH" "$URL/metrics" | awk '/^order_cache_reads_total\{result="hit"\}/ {print $2}')
  printf '| %s | %s | %s | %s | %s | %s → %s |\n' "$mode" "$round" \
    "$(echo "$post" | awk '{printf "%s req/s, p50 %s, p99 %s, non-2xx %s", $1, $2, $3, $4}')" \
    "$(echo "$get" | awk '{printf "%s req/s, p50 %s, p99 %s, non-2xx %s", $1, $2, $3, $4}')" \
    "${hits:-n/a}" "$before" "$(loadavg)"
  kill "$PID"; wait "$PID" 2>/dev/null || true
}

echo "commit $(git rev-parse --short HEAD); $(nproc) cores; Redis $(redis-cli -u "$REDIS" INFO server | awk -F: '/^redis_version/ {print $2}' | tr -d '\r')"
echo
echo "| cache | round | POST | GET | Redis hits | load |"
echo "|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
  one none "$round" --order-cache-mib 0
  one redis "$round" --cache "$REDIS" --cache-prefix "$PREFIX"
  one local "$round"
done
