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

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1"
    exit 1
}
PP=$(free_port) DP=$(free_port) XP=$(free_port)
"$STUB" --port "$PP" --role prefill --name p1 --api-key up &
PIDS+=($!)
"$STUB" --port "$DP" --role decode --name d1 --token-delay-ms 5 --api-key up &
PIDS+=($!)
wait_port "$PP"
wait_port "$DP"
"$PROXY" --host 127.0.0.1 --port "$XP" --prefill "127.0.0.1:$PP" --decode "127.0.0.1:$DP" \
    --api-key test-key --upstream-api-key up &
PIDS+=($!)
wait_port "$XP"
cd "$WORK"
timeout 60 node roundtrip.mjs "$XP" "$DP"
