#!/usr/bin/env bash
# Checks the OpenAPI document against the server as a new user would: schemathesis (pinned, from
# PyPI, installed once into /var/tmp/orderwave-tools) with every check against the debug binary
# on SQLite with the demo catalogue, rate limits off. Exits non-zero on any failure.
# CI runs it (.ci/run). Settings: scripts/schemathesis.toml; hooks: scripts/contract_hooks.py.
#   bash scripts/contract-test.sh [extra schemathesis options, e.g. --max-examples 50]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
VENV=$(pinned_venv schemathesis schemathesis==4.32.5)
start_demo_server
TOKEN=$("$BIN" token --sub contract-test --role admin --data-dir "$DATA" --ttl 1h)
# The WebSocket route is not HTTP: schemathesis cannot speak it. Run from the temporary
# directory: schemathesis keeps its cache of failures in the current directory.
HOOKS_DIR=$PWD/scripts
cd "$DATA"
PYTHONPATH="$HOOKS_DIR" SCHEMATHESIS_HOOKS=contract_hooks \
  "$VENV/bin/schemathesis" --config-file "$HOOKS_DIR/schemathesis.toml" run "http://127.0.0.1:$PORT/openapi.json" \
  --header "Authorization: Bearer $TOKEN" \
  --exclude-path /api/v1/orders/ws \
  --max-examples 20 \
  --no-color \
  "$@"
