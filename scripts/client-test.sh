#!/usr/bin/env bash
# A client generated from the served OpenAPI document (openapi-typescript + openapi-fetch, from
# web/package.json) places an order against the debug binary on SQLite with the demo catalogue,
# waits for CONFIRMED and reads its history. The client is generated afresh from the live
# document on every run, then type-checked (tsc) and run (node).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
[ -d web/node_modules/openapi-fetch ] || (cd web && npm ci --no-audit --no-fund)
start_demo_server
cd web
rm -rf client/generated
npx openapi-typescript "http://127.0.0.1:$PORT/openapi.json" -o client/generated/schema.d.ts
npx tsc -p client/tsconfig.json
ORDERWAVE_URL="http://127.0.0.1:$PORT" \
  ORDERWAVE_TOKEN=$("$BIN" token --sub client-test --role admin --data-dir "$DATA" --ttl 1h) \
  node client/generated/out/order-flow.js || { tail -20 "$DATA/server.log"; exit 1; }
