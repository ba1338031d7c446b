#!/usr/bin/env bash
# Runs tests/node/proxy-roundtrip.mjs (the official openai npm client, installed by `npm ci` in
# tests/node, as tests/run.sh does) against duet-proxy and two stub backends.
# Usage: run-openai.sh STUB PROXY. Exits 77 (skipped) when node or the client is missing.
set -euo pipefail
STUB=$1 PROXY=$2
HERE=$(cd "$(dirname "$0")" && pwd)
NODE_DIR=$HERE/../node
command -v node >/dev/null || { echo "node not found: skipped"; exit 77; }
[ -d "$NODE_DIR/node_modules/openai" ] ||
    { echo "tests/node/node_modules is missing: run 'npm ci' in tests/node: skipped"; exit 77; }

# shellcheck source=../../tools/proxy-procs.sh
. "$HERE/../../tools/proxy-procs.sh"
PP=$(free_port) DP=$(free_port) XP=$(free_port)
procs_start "$STUB" --port "$PP" --role prefill --name p1 --api-key up
procs_start "$STUB" --port "$DP" --role decode --name d1 --token-delay-ms 5 --api-key up
wait_port "$PP"
wait_port "$DP"
procs_start "$PROXY" --host 127.0.0.1 --port "$XP" --prefill "127.0.0.1:$PP" \
    --decode "127.0.0.1:$DP" --api-key test-key --upstream-api-key up
wait_port "$XP"
timeout 60 node "$NODE_DIR/proxy-roundtrip.mjs" "$XP" "$DP"
