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
