#!/usr/bin/env bash
# Notification throughput and recovery (issue 5), on the embedded SQLite platform:
#   1. COUNT ad-hoc emails through the log transport;
#   2. the same through a local SMTP server (bench/smtp_sink.py);
#   3. an outage: the SMTP server is down while COUNT emails are posted, comes back after
#      OUTAGE seconds, and the time for the backlog to drain is measured from then;
#   4. the saga at SAGA_RATE orders/s for SAGA_SECONDS with the SMTP server hanging (accepts,
#      never answers) against the same with the log transport: ordering must not slow down.
# Prints JSON lines and the machine's load.
#
# Usage: bench/notify.sh   (COUNT=10000, OUTAGE=20, SAGA_RATE=200, SAGA_SECONDS=60)
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT="${COUNT:-10000}"
OUTAGE="${OUTAGE:-20}"
SAGA_RATE="${SAGA_RATE:-200}"
SAGA_SECONDS="${SAGA_SECONDS:-60}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/orderwave-target}"
BIN="$CARGO_TARGET_DIR/release"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

cargo build --release -q -p orderwave -p bench-notify -p bench-saga

# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_auth
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# serve NAME ARGS...: starts the platform on its own data directory, sets URL and PID.
serve() {
  local name=$1; shift
  start "$name" "$BIN/orderwave" serve --listen 127.0.0.1:0 --log-format json --data-dir "$WORK/$name" "$@"
}

stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

echo "# log transport ($(loadavg))"
serve log
"$BIN/bench-notify" "$URL" "$COUNT"
stop "$PID"

echo "# local SMTP server ($(loadavg))"
SMTP=$(free_port)
python3 bench/smtp_sink.py "$SMTP" >"$WORK/sink.out" 2>&1 &
SINK=$!; PIDS+=("$SINK")
sleep 0.5
serve smtp --smtp-host 127.0.0.1 --smtp-port "$SMTP" --smtp-tls none
"$BIN/bench-notify" "$URL" "$COUNT"
stop "$PID"; stop "$SINK"

echo "# outage: SMTP down for ${OUTAGE}s while $COUNT emails are posted ($(loadavg))"
SMTP=$(free_port)
serve outage --smtp-host 127.0.0.1 --smtp-port "$SMTP" --smtp-tls none
down_since=$(date +%s.%N)
"$BIN/bench-notify" "$URL" "$COUNT" --no-wait
left=$(echo "$OUTAGE - ($(date +%s.%N) - $down_since)" | bc)
if [ "$(echo "$left > 0" | bc)" = 1 ]; then sleep "$left"; fi
python3 bench/smtp_sink.py "$SMTP" >"$WORK/sink2.out" 2>&1 &
SINK=$!; PIDS+=("$SINK")
echo "{\"smtpDownSeconds\": $(echo "$(date +%s.%N) - $down_since" | bc)}"
"$BIN/bench-notify" "$URL" 0
echo "(drainSeconds above is counted from the SMTP server's return)"
stop "$PID"; stop "$SINK"

for mode in log hanging; do
  echo "# saga at $SAGA_RATE orders/s for ${SAGA_SECONDS}s, email: $mode ($(loadavg))"
  if [ "$mode" = hanging ]; then
    HANG=$(free_port)
    # Accepts connections and never answers.
    python3 -c "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1',$HANG)); s.listen(1000); c=[]
while True: c.append(s.accept())" &
    HANGER=$!; PIDS+=("$HANGER")
    serve "saga-$mode" --demo --smtp-host 127.0.0.1 --smtp-port "$HANG" --smtp-tls none
  else
    serve "saga-$mode" --demo
  fi
  for sku in SKU-CHAIR SKU-LAMP; do
    curl -sf -H "$AUTH" -X PUT "$URL/api/v1/inventory/$sku" -H 'content-type: application/json' -d '{"onHand":100000000}' >/dev/null
  done
  "$BIN/bench-saga" "$URL" "$SAGA_RATE" "$SAGA_SECONDS" 2>/dev/null
  stop "$PID"
  [ "$mode" = hanging ] && stop "$HANGER"
done
echo "# done ($(loadavg))"
