#!/usr/bin/env bash
# Starts a disaggregated deployment on this host: NP prefill instances, one decode instance of
# DP data-parallel ranks, and duet-proxy in front (an OpenAI endpoint on --port), each instance
# its own mpirun job; waits until all are healthy, then keeps running until Ctrl-C or SIGTERM,
# which stops everything. The default is the 2P1D layout: two prefill instances, one decode
# instance with DP2.
#
#   deploy/launch-2p1d.sh --model DIR [--tokenizer DIR] [--port 8000] [--prefills 2]
#                         [--decode-dp 2] [--prefill-tp 1] [--decode-tp 1] [--backend cpu|cuda]
#                         [--load-format auto|dummy] [--demo] [-- extra worker flags]
#
# Ports: proxy P, prefill i on P+100+10*i, decode DP rank r on P+200+r, KV side channels on the
# prefill ports + 1000. --demo sends one chat request through the proxy once everything is up.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${DUET_BIN:-$here/build}

model="" tokenizer="" port=8000 prefills=2 decode_dp=2 prefill_tp=1 decode_tp=1
backend=cpu load_format=auto demo=0 extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --model) model=$2; shift 2 ;;
    --tokenizer) tokenizer=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --prefills) prefills=$2; shift 2 ;;
    --decode-dp) decode_dp=$2; shift 2 ;;
    --prefill-tp) prefill_tp=$2; shift 2 ;;
    --decode-tp) decode_tp=$2; shift 2 ;;
    --backend) backend=$2; shift 2 ;;
    --load-format) load_format=$2; shift 2 ;;
    --demo) demo=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "launch-2p1d.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -n "$model" ] || { echo "launch-2p1d.sh: --model DIR is required" >&2; exit 2; }
[ -n "$tokenizer" ] || tokenizer=$model
for b in duet-prefill duet-decode duet-proxy; do
    [ -x "$bin/$b" ] || [ -x "$bin/prefill/$b" ] || [ -x "$bin/decode/$b" ] || [ -x "$bin/proxy/$b" ] ||
        { echo "launch-2p1d.sh: $b is not built in $bin (run tools/build.sh)" >&2; exit 1; }
done
find_bin() { for d in "$bin" "$bin/prefill" "$bin/decode" "$bin/proxy"; do [ -x "$d/$1" ] && { echo "$d/$1"; return; }; done; }
PREFILL=$(find_bin duet-prefill) DECODE=$(find_bin duet-decode) PROXY=$(find_bin duet-proxy)

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 NCCL_NVLS_ENABLE=0
# One shared secret authenticates the KV side channel between these workers.
export DUET_KV_SECRET=${DUET_KV_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
logdir=${DUET_LOG_DIR:-$here/.demo/logs}
mkdir -p "$logdir"

pids=()
cleanup() {
    trap - EXIT INT TERM
    echo "stopping..."
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

common=(--model "$model" --tokenizer "$tokenizer" --served-model-name duet --host 127.0.0.1
        --backend "$backend" --load-format "$load_format" "${extra[@]}")
prefill_urls=()
for i in $(seq 0 $((prefills - 1))); do
    p=$((port + 100 + 10 * i))
    mpirun -np "$prefill_tp" "$PREFILL" "${common[@]}" --port "$p" -tp "$prefill_tp" \
        >"$logdir/prefill$i.log" 2>&1 &
    pids+=($!)
    prefill_urls+=("127.0.0.1:$p")
done
d=$((port + 200))
mpirun -np $((decode_dp * decode_tp)) "$DECODE" "${common[@]}" --port "$d" \
    -dp "$decode_dp" -tp "$decode_tp" >"$logdir/decode.log" 2>&1 &
pids+=($!)
decode_urls=()
for r in $(seq 0 $((decode_dp - 1))); do decode_urls+=("127.0.0.1:$((d + r))"); done

wait_healthy() { # url name
    for _ in $(seq 600); do
        curl -sf "http://$1/health" >/dev/null 2>&1 && return 0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "$2 exited; see $logdir" >&2; exit 1; }; done
        sleep 0.2
    done
    echo "$2 did not become healthy; see $logdir" >&2
    exit 1
}
for u in "${prefill_urls[@]}"; do wait_healthy "$u" "prefill $u"; done
for u in "${decode_urls[@]}"; do wait_healthy "$u" "decode $u"; done

"$PROXY" --host 127.0.0.1 --port "$port" --prefill "${prefill_urls[@]}" --decode "${decode_urls[@]}" \
    >"$logdir/proxy.log" 2>&1 &
pids+=($!)
wait_healthy "127.0.0.1:$port" "proxy"

echo "duet is up: OpenAI API at http://127.0.0.1:$port/v1 (model \"duet\")"
echo "  prefill: ${prefill_urls[*]}   decode: ${decode_urls[*]}   logs: $logdir"
echo "  try: curl http://127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' \\"
echo "         -d '{\"model\":\"duet\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello!\"}],\"max_tokens\":32}'"
if [ "$demo" = 1 ]; then
    echo "demo request through the proxy (prefill -> KV over UCX -> decode):"
    curl -sS "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
        -d '{"model":"duet","messages":[{"role":"user","content":"Say hello in three languages."}],"max_tokens":32,"temperature":0.7,"seed":1}'
    echo
fi
echo "Ctrl-C stops everything."
wait -n "${pids[@]}" || true
echo "a process exited; see $logdir" >&2
