#!/usr/bin/env bash
# A client generated from the served OpenAPI document (openapi-typescript + openapi-fetch, from
# web/package.json) places an order against the debug binary on SQLite with the demo catalogue,
# waits for CONFIRMED and reads its history. The client is generated afresh from the live
# document on every run, then type-checked (tsc) and run (node).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
BIN="$CARGO_TARGET_DIR/debug/orderwave"
[ -x "$BIN" ] || cargo build -p orderwave
[ -d web/node_modules/openapi-fetch ] || (cd web && npm ci --no-audit --no-fund)

DATA=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN" --demo --listen "127.0.0.1:$PORT" --data-dir "$DATA" >"$DATA/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 1 60); do
  curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null && break
  sleep 0.5
done
cd web
rm -rf client/generated
npx openapi-typescript "http://127.0.0.1:$PORT/openapi.json" -o client/generated/schema.d.ts
npx tsc -p client/tsconfig.json
ORDERWAVE_URL="http://127.0.0.1:$PORT" \
  ORDERWAVE_TOKEN=$("$BIN" token --sub client-test --role admin --data-dir "$DATA" --ttl 1h) \
  node client/generated/out/order-flow.js || { tail -20 "$DATA/server.log"; exit 1; }
