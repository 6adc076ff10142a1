# Sourced by the scripts that need Python tools from PyPI.

TOOLS=${ORDERWAVE_TOOLS:-/var/tmp/orderwave-tools}

# pinned_venv NAME PACKAGE==VERSION...: prints the path of a virtualenv under $TOOLS holding
# exactly these pins, creating it (once, under a lock against parallel callers) when it is
# missing or was made with other pins.
pinned_venv() {
  local name=$1; shift
  local venv="$TOOLS/$name"
  mkdir -p "$TOOLS"
  (
    flock 9
    if [ "$(cat "$venv/.pins" 2>/dev/null)" != "$*" ]; then
      echo "installing $* into $venv" >&2
      rm -rf "$venv"
      python3 -m venv "$venv"
      "$venv/bin/pip" install -q "$@" >&2
      echo "$*" >"$venv/.pins"
    fi
  ) 9>"$TOOLS/.$name.lock"
  echo "$venv"
}

# debian_promtool: prints the path of promtool taken from Debian's prometheus package
# (downloaded and unpacked under $TOOLS once; the server in it is neither installed nor run).
debian_promtool() {
  local dir="$TOOLS/promtool"
  mkdir -p "$TOOLS"
  (
    flock 9
    if [ ! -x "$dir/usr/bin/promtool" ]; then
      echo "unpacking promtool from Debian's prometheus package into $dir" >&2
      rm -rf "$dir" && mkdir -p "$dir"
      (cd "$dir" && apt-get download prometheus >&2 && dpkg -x prometheus_*.deb . && rm -f prometheus_*.deb)
    fi
  ) 9>"$TOOLS/.promtool.lock"
  echo "$dir/usr/bin/promtool"
}

# start_demo_server: builds the debug binary if missing and starts it with `--demo` on SQLite
# in a fresh temporary directory, on a free port, rate limits off; waits until it is ready.
# Sets BIN, DATA (the data directory, holding server.log), PORT and SERVER (its pid), and stops
# it and removes DATA when the calling script exits.
start_demo_server() {
  BIN="$CARGO_TARGET_DIR/debug/orderwave"
  [ -x "$BIN" ] || cargo build -p orderwave
  DATA=$(mktemp -d)
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  ORDERWAVE_RATE_LIMIT_READ=0 ORDERWAVE_RATE_LIMIT_WRITE=0 \
    "$BIN" --demo --listen "127.0.0.1:$PORT" --data-dir "$DATA" >"$DATA/server.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$DATA"' EXIT
  for _ in $(seq 1 60); do
    curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null && return 0
    sleep 0.5
  done
  echo "orderwave did not become ready on 127.0.0.1:$PORT; its log:" >&2
  tail -20 "$DATA/server.log" >&2
  return 1
}
