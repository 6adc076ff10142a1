#!/usr/bin/env bash
# The web console's tests: its unit tests (Vitest), a check that the committed web/dist is
# what web/src builds to, and the end-to-end run in headless Chromium (Debian's package,
# installed here when missing) against the debug binary that `cargo test --workspace` built.
# Screenshots of every page go to $ARTIFACTS (default web/e2e/artifacts).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

if [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian's chromium for the browser tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
bash scripts/build-console.sh
if [ -n "$(git status --porcelain -- web/dist)" ]; then
  git status --short -- web/dist
  echo "web/dist is not what web/src builds to: run scripts/build-console.sh and commit web/dist" >&2
  exit 1
fi
(cd web && npm test)
if [ ! -x "$CARGO_TARGET_DIR/debug/orderwave" ]; then
  cargo build -p orderwave
fi
ORDERWAVE_BIN="$CARGO_TARGET_DIR/debug/orderwave" node web/e2e/console.mjs
