#!/usr/bin/env bash
# The distributed mode against one process, in one run, on PostgreSQL and a broker:
#   one   `orderwave serve` with every service (the baseline)
#   split the gateway in front of one process per service (the order service with the Redis cache)
# For each: the saga at a fixed rate (bench/saga: orders/s confirmed, POST-to-CONFIRMED p50/p99)
# through its one address, then each process's peak RSS. Then the gateway's added latency:
# GET /api/v1/orders/{id} with wrk through the gateway against the order process directly, the
# same orders, connections and duration.
#
# Usage: bench/distributed.sh [SECONDS=60] [RATE=100] [BUS=nats|rabbitmq]
#   DURATION=15 CONNECTIONS=16 (the latency runs); REDIS=redis://127.0.0.1:6379
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_="${1:-60}"
RATE="${2:-100}"
BUS="${3:-nats}"
DURATION="${DURATION:-15}"
CONNECTIONS="${CONNECTIONS:-16}"
REDIS="${REDIS:-redis://127.0.0.1:6379}"
PG_ADMIN="${PG_ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}"
PG_BASE="${PG_ADMIN%/*}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/orderwave-target}"
case "$BUS" in
  nats) BUS_URL=nats://127.0.0.1:4222 ;;
  rabbitmq) BUS_URL=amqp://guest:guest@127.0.0.1:5672/%2f ;;
  *) echo "bus: nats or rabbitmq" >&2; exit 2 ;;
esac
PREFIX="benchd$(date +%s)"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  for run in one split; do
    "$BIN/orderwave" bus-delete --bus "$BUS_URL" --bus-prefix "$PREFIX$run" >/dev/null 2>&1 || true
  done
  drop_redis_keys "$REDIS" "$PREFIX"
  rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=bench/lib.sh
. bench/lib.sh
require_wrk
require_postgres
require_redis "$REDIS"

cargo build --release -q -p orderwave -p bench-saga
BIN="$CARGO_TARGET_DIR/release"
bench_auth

fresh_db() {
  psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1"
  echo "$PG_BASE/$1"
}

# The peak RSS of a process, in MiB.
rss() { awk '/^VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

stock_up() {
  for sku in SKU-CHAIR SKU-LAMP; do
    curl -sf -H "$AUTH" -X PUT "$1/api/v1/inventory/$sku" -H 'content-type: application/json' \
      -d '{"onHand":100000000}' >/dev/null
  done
}

# saga LABEL URL: the saga at RATE for SECONDS_ through URL; its JSON line to $WORK/LABEL.json.
saga() {
  psql -q "$PG_ADMIN" -c CHECKPOINT
  "$BIN/bench-saga" "$2" "$RATE" "$SECONDS_" >"$WORK/$1.json" 2>"$WORK/$1.err"
  python3 - "$1" "$WORK/$1.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
print(f"{sys.argv[1]:>6}: placed {r['placed']} (errors {r['errors']}), confirmed {r['confirmed']} "
      f"({r['confirmedPerSecond']:.1f}/s), not confirmed {r['notConfirmed']}; POST p50/p99 "
      f"{r['postP50Ms']:.2f}/{r['postP99Ms']:.2f} ms; POST-to-CONFIRMED p50/p99 "
      f"{r['sagaP50Ms']:.2f}/{r['sagaP99Ms']:.2f} ms; max lag {r['maxConsumerLag']}")
PY
}

# latency LABEL URL LUA: "p50 p99 req/s non-2xx" of GET /api/v1/orders/{id} with wrk.
latency() {
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$3" "$2" >"$WORK/$1.wrk"
  awk '/^Requests\/sec/ {r=$2} $1=="50%" {p50=$2} $1=="99%" {p99=$2} /Non-2xx/ {e=$NF}
       END {printf "%s %s %s %s", p50, p99, r, e+0}' "$WORK/$1.wrk"
}

BEFORE=$(loadavg)
COMMON=(--demo --log-format json --bus "$BUS_URL")

# 1. Every service in one process.
DB=$(fresh_db ow_bench_one)
start one "$BIN/orderwave" serve --listen 127.0.0.1:0 "${COMMON[@]}" --bus-prefix "${PREFIX}one" \
  --database-url "$DB"
ONE_PID=$PID ONE_URL=$URL
stock_up "$ONE_URL"
saga one "$ONE_URL"
echo "    one process: peak RSS $(rss "$ONE_PID") MiB"
kill "$ONE_PID"; wait "$ONE_PID" 2>/dev/null || true

# 2. The gateway and a process per service.
DB=$(fresh_db ow_bench_split)
SPLIT=(--database-url "$DB" --bus-prefix "${PREFIX}split" --rate-limit-read 0 --rate-limit-write 0)
declare -A URLS SPLIT_PIDS
for service in customer inventory payment notification order; do
  extra=()
  case "$service" in
    order) extra=(--customer-service-url "${URLS[customer]}" --cache "$REDIS" --cache-prefix "$PREFIX") ;;
    notification) extra=(--customer-service-url "${URLS[customer]}") ;;
  esac
  start "$service" "$BIN/orderwave" serve --services "$service" --listen 127.0.0.1:0 \
    "${COMMON[@]}" "${SPLIT[@]}" "${extra[@]}"
  URLS[$service]=$URL SPLIT_PIDS[$service]=$PID
done
UPSTREAMS=()
for service in order inventory payment customer notification; do
  UPSTREAMS+=(--upstream "$service=${URLS[$service]}")
done
start gateway "$BIN/orderwave" serve --services gateway --listen 127.0.0.1:0 --log-format json \
  "${UPSTREAMS[@]}"
SPLIT_PIDS[gateway]=$PID GATEWAY=$URL
stock_up "$GATEWAY"
saga split "$GATEWAY"
line="    split: peak RSS MiB"
total=0
for service in gateway order inventory payment customer notification; do
  r=$(rss "${SPLIT_PIDS[$service]}")
  line+=" $service $r,"
  total=$(awk -v a="$total" -v b="$r" 'BEGIN {print a + b}')
done
echo "${line%,}; all $total"

# 3. The gateway's added latency: the same 100 orders read through it and directly.
get_lua "$GATEWAY" "$WORK/get.lua"
read -r G50 G99 GRPS GERR <<<"$(latency gateway "$GATEWAY" "$WORK/get.lua")"
read -r D50 D99 DRPS DERR <<<"$(latency direct "${URLS[order]}" "$WORK/get.lua")"
echo "GET /api/v1/orders/{id}, $CONNECTIONS connections, ${DURATION}s each:"
echo "  through the gateway: p50 $G50 p99 $G99, $GRPS req/s, non-2xx $GERR"
echo "  order process directly: p50 $D50 p99 $D99, $DRPS req/s, non-2xx $DERR"
echo "bus $BUS; rate $RATE/s for ${SECONDS_}s; load average: $BEFORE -> $(loadavg); $(nproc) cores; commit $(git rev-parse --short HEAD)"
