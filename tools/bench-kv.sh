#!/usr/bin/env bash
# KV transfer benchmark: duet's disaggregation pull (duet-kvbench: pin, coalesced UCX GETs,
# release, byte-checked) next to ucx_perftest's one-sided GET of the same size on the same
# UCX transport, both run here, reported as a ratio. Writes a markdown table to stdout.
#   tools/bench-kv.sh [TLS ...]      (default: shm tcp)
set -euo pipefail
cd "$(dirname "$0")/.."
bench=build/tools/duet-kvbench
[ -x "$bench" ] || { echo "build first (tools/build.sh)" >&2; exit 1; }
tokens=${KV_TOKENS:-1024,8192,32768}
layers=${KV_LAYERS:-30}
repeat=${KV_REPEAT:-5}
tls_list=("$@")
[ ${#tls_list[@]} -gt 0 ] || tls_list=(shm tcp)

perftest_gbs() { # tls bytes -> GB/s of ucx_perftest ucp_get
    local tls=$1 bytes=$2 port=$((13400 + RANDOM % 500)) iters=5
    UCX_TLS=$tls ucx_perftest -p "$port" >/dev/null 2>&1 &
    local srv=$!
    sleep 0.5
    local out
    out=$(UCX_TLS=$tls timeout 120 ucx_perftest 127.0.0.1 -p "$port" -t ucp_get -s "$bytes" \
        -n "$iters" -w 1 2>&1 | awk '/Final:/ {print $7}')
    kill "$srv" 2>/dev/null || true
    wait "$srv" 2>/dev/null || true
    # MB/s (2^20 bytes) -> GB/s (1e9 bytes)
    awk -v m="${out:-0}" 'BEGIN { printf "%.2f", m * 1048576 / 1e9 }'
}

echo "| UCX_TLS | prompt tokens | KV bytes | duet pull p50 ms | duet GB/s (mean) | ucx_perftest GB/s | ratio |"
echo "|---|---|---|---|---|---|---|"
for tls in "${tls_list[@]}"; do
    UCX_TLS=$tls "$bench" --tokens "$tokens" --layers "$layers" --repeat "$repeat" 2>/dev/null |
        awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1, $2, $3, $6}' |
        while read -r n bytes p50 gbs; do
            ref=$(perftest_gbs "$tls" "$bytes")
            ratio=$(awk -v a="$gbs" -v b="$ref" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
            echo "| $tls | $n | $bytes | $p50 | $gbs | $ref | $ratio |"
        done
done
