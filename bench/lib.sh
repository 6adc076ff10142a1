# Shell helpers shared by the benchmark scripts (sourced; they set WORK and PIDS first).

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# start NAME CMD... : starts a server printing "listening on http://ADDR", sets URL and PID.
start() {
  local name=$1; shift
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PID=$!
  PIDS+=("$PID")
  for _ in $(seq 1 100); do
    URL=$(grep -o 'http://[0-9.:]*' "$WORK/$name.out" | head -1 || true)
    [ -n "$URL" ] && return
    sleep 0.1
  done
  echo "$name did not start:" >&2; cat "$WORK/$name.err" >&2; exit 1
}

# Every server a benchmark starts verifies tokens with this secret and has no per-caller rate
# limits (one load generator is one caller: the benchmarks measure capacity, not the limits).
export ORDERWAVE_JWT_SECRET="orderwave-bench-secret-0123456789abcdef-0123"
export ORDERWAVE_RATE_LIMIT_READ=0 ORDERWAVE_RATE_LIMIT_WRITE=0

# bench_auth: mints an admin token into ORDERWAVE_TOKEN (read by bench/saga and bench/notify)
# and AUTH (a curl header). Needs BIN.
bench_auth() {
  ORDERWAVE_TOKEN=$("$BIN/orderwave" token --sub bench --role admin --ttl 24h)
  export ORDERWAVE_TOKEN
  AUTH="Authorization: Bearer $ORDERWAVE_TOKEN"
}
