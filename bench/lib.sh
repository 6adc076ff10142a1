# Shell helpers shared by the benchmark scripts (sourced; they set WORK and PIDS first).

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# drop_redis_keys URL PREFIX: deletes the keys a run made in Redis under PREFIX.
drop_redis_keys() {
  redis-cli -u "$1" --scan --pattern "$2:*" | xargs -r redis-cli -u "$1" DEL >/dev/null || true
}

# require_wrk: installs wrk from Debian when it is missing.
require_wrk() {
  if ! command -v wrk >/dev/null; then
    echo "installing wrk from Debian" >&2
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
  fi
}

# require_postgres: fails, saying how to start it, unless PostgreSQL answers on 127.0.0.1:5432.
require_postgres() {
  pg_isready -q -h 127.0.0.1 -p 5432 || { echo "PostgreSQL is not running: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2; exit 1; }
}

# require_redis URL: fails, saying how to start it, unless Redis answers at URL.
require_redis() {
  redis-cli -u "$1" PING >/dev/null || { echo "Redis does not answer at $1: redis-server --daemonize yes --port 6379 --save \"\" --appendonly no" >&2; exit 1; }
}

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

# The order the load benchmarks place: the demo customer's two chairs and a lamp, paid.
ORDER_BODY='{"customerId":"019ab1c2-0000-7000-8000-000000000001","currency":"USD","items":[{"sku":"SKU-CHAIR","quantity":2,"unitPrice":"49.90"},{"sku":"SKU-LAMP","quantity":1,"unitPrice":"15.05"}],"shippingAddress":{"name":"Ada Lovelace","line1":"12 Analytical Row","city":"London","postalCode":"N1 7AA","country":"GB"},"payment":{"method":"card","token":"tok_ok"}}'

# post_lua FILE: a wrk script that places ORDER_BODY as the admin of bench_auth.
post_lua() {
  cat >"$1" <<LUA
wrk.method = "POST"
wrk.body = '$ORDER_BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $ORDERWAVE_TOKEN"
LUA
}

# get_lua URL FILE: a wrk script that reads the server's 100 newest orders, one at random each.
get_lua() {
  curl -sf -H "$AUTH" "$1/api/v1/orders?limit=100" | grep -o '"id":"[0-9a-f-]\{36\}"' | cut -d'"' -f4 >"$2.ids"
  {
    echo "ids = {"; sed 's/.*/"&",/' "$2.ids"; echo "}"
    echo "auth = { [\"Authorization\"] = \"Bearer $ORDERWAVE_TOKEN\" }"
    echo 'request = function() return wrk.format("GET", "/api/v1/orders/" .. ids[math.random(#ids)], auth) end'
  } >"$2"
}
