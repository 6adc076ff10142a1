#!/usr/bin/env bash
# Builds the web console (web/, React + Vite + TypeScript) into web/dist, which the binary
# embeds at compile time. The built files are committed, so `cargo run --release` needs no npm;
# run this after changing web/src and commit web/dist with the change.
set -euo pipefail
cd "$(dirname "$0")/../web"
npm ci --no-audit --no-fund --loglevel=error
npm run build
