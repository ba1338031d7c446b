#!/usr/bin/env bash
# tools/bench-sweep.sh end to end on the CPU demo model (duet-mkmodel's tiny preset with the
# golden DeepSeek-V3 tokenizer) served by one duet-decode: the four documented workloads at
# 1/32 of their lengths, concurrency 1, 2 and 4 (one round each), must give a report with a row
# per level and no failed request, and the three plots (skipped, exit 77, when gnuplot is
# missing). Small enough to stay well under 3 minutes on a busy 2-CPU machine.
#   sweep_ci.sh DUET_DECODE DUET_MKMODEL DUET_BENCH TOKENIZER_DIR
set -euo pipefail
decode=$1 mkmodel=$2 bench=$3 tok=$4
here=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d /tmp/duet-sweep-ci.XXXXXX)
pid=""
cleanup() {
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "sweep_ci: $*" >&2; cat "$tmp"/sweep/logs/*.log >&2 2>/dev/null || true; exit 1; }

"$mkmodel" --preset tiny --tokenizer "$tok" --out "$tmp/model" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$decode" --model "$tmp/model" --served-model-name demo \
    --host 127.0.0.1 --port "$port" --kv-cache-memory 256M >"$tmp/decode.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || fail "duet-decode exited: $(cat "$tmp/decode.log")"
    sleep 0.1
done

start=$(date +%s)
DUET_BENCH=$bench bash "$here/tools/bench-sweep.sh" --port "$port" --model "$tmp/model" \
    --served-model-name demo --scale 0.03125 --concurrency "1 2 4" --rounds 1 --num-warmups 0 \
    --label "1 instance" --out "$tmp/sweep" || fail "bench-sweep.sh failed"
echo "sweep_ci: the sweep took $(($(date +%s) - start)) s"

md=$tmp/sweep/report.md
[ -f "$md" ] || fail "no report.md"
for w in 128/1024 1024/128 3500/1500 1000/100; do
    grep -q "^## $w input/output tokens" "$md" || fail "no section for $w"
done
rows=$(grep -c '^| 1 instance |' "$md" || true)
[ "$rows" = 12 ] || fail "$rows table rows, wanted 12"
bad=$(awk -F'\t' 'NR > 1 && ($6 != $5 || $7 != 0)' "$tmp/sweep/summary.tsv")
[ -z "$bad" ] || fail "levels with failed requests:"$'\n'"$bad"
# the shapes were sent as asked: 1024/128 at 1/32 is 32/4
grep -q '^| 1 instance | 32/4 | 4 | 4 (0) |' "$md" || fail "no 32/4 row at concurrency 4"
cat "$md"
if ! command -v gnuplot >/dev/null 2>&1; then
    grep -q "Plots skipped" "$md" || fail "no plots and no word why"
    echo "sweep_ci: gnuplot is not installed: plots not checked"
    exit 77
fi
for p in throughput_vs_concurrency tpot_vs_throughput ttft_cdf; do
    f=$tmp/sweep/$p.png
    [ -s "$f" ] || fail "no $p.png"
    [ "$(head -c 8 "$f" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] || fail "$p.png is not a PNG"
done
echo "sweep_ci: report and plots OK"
