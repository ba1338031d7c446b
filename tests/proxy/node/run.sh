#!/usr/bin/env bash
# Runs roundtrip.mjs (the official openai npm client) against duet-proxy and two stub backends.
# Usage: run.sh STUB PROXY WORKDIR. Installs the pinned client into WORKDIR with `npm ci`; exits
# 77 (skipped) when node or the package cannot be had.
set -euo pipefail
STUB=$1 PROXY=$2 WORK=$3
HERE=$(cd "$(dirname "$0")" && pwd)
command -v node >/dev/null && command -v npm >/dev/null || { echo "node/npm not found: skipped"; exit 77; }
mkdir -p "$WORK"
if [ ! -f "$WORK/node_modules/openai/package.json" ] ||
    ! cmp -s "$HERE/package-lock.json" "$WORK/package-lock.json"; then
    cp "$HERE/package.json" "$HERE/package-lock.json" "$WORK/"
    (cd "$WORK" && timeout 120 npm ci --no-audit --no-fund --loglevel=error) ||
        { echo "npm ci failed: skipped"; exit 77; }
fi
cp "$HERE/roundtrip.mjs" "$WORK/"

# shellcheck source=../../../tools/proxy-procs.sh
. "$HERE/../../../tools/proxy-procs.sh"
PP=$(free_port) DP=$(free_port) XP=$(free_port)
procs_start "$STUB" --port "$PP" --role prefill --name p1 --api-key up
procs_start "$STUB" --port "$DP" --role decode --name d1 --token-delay-ms 5 --api-key up
wait_port "$PP"
wait_port "$DP"
procs_start "$PROXY" --host 127.0.0.1 --port "$XP" --prefill "127.0.0.1:$PP" \
    --decode "127.0.0.1:$DP" --api-key test-key --upstream-api-key up
wait_port "$XP"
cd "$WORK"
timeout 60 node roundtrip.mjs "$XP" "$DP"
