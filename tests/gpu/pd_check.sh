#!/usr/bin/env bash
# 1P1D on two GPUs (prefill on GPU 0, decode on GPU 1, KV through UCX, duet-proxy in front):
# the golden cases through the proxy give the same ids as a single-GPU instance, in float32
# (and then the golden ids too), in bf16, and in bf16 with --kv-cache-dtype fp8 on every worker.
# Run from the offline bundle on a 2-GPU machine:
#   bash .bundle/run.sh bash .bundle/pd_check.sh
set -u
out=${OUT:-/tmp/duet-pd}
mkdir -p "$out"
B=${DUET_BUNDLE:?run through run.sh}
G=$B/golden
log=$out/pd.log
: >"$log"
export DUET_KV_SECRET=gpu-pd-secret
pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; sleep 2;
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done; pids=(); }
trap stop_all EXIT
wait_up() { for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.2; done;
    echo "port $1 never healthy" | tee -a "$log"; return 1; }
common=(--model "$G/tiny-v3/model" --tokenizer "$G/tokenizer" --served-model-name tiny
        --host 127.0.0.1 --backend cuda --kv-cache-memory 256M --block-size 16)
{
    nvidia-smi -L
    ucx_info -v | head -2
    echo "UCX CUDA transports:"; ucx_info -d | grep -iE "cuda|gdr" | head -5
} >>"$log" 2>&1
for mode in float32 bfloat16 bfloat16-kvfp8; do
    # bfloat16-kvfp8: --kv-cache-dtype fp8 on every worker (e4m3 blocks through UCX)
    dt=${mode%%-*}
    kvdt=(--kv-cache-dtype auto)
    [ "$mode" = bfloat16-kvfp8 ] && kvdt=(--kv-cache-dtype fp8)
    echo "=== $mode: single GPU" | tee -a "$log"
    CUDA_VISIBLE_DEVICES=0 duet-decode "${common[@]}" --dtype "$dt" "${kvdt[@]}" --port 8300 \
        >>"$log" 2>&1 &
    pids+=($!)
    wait_up 8300 || exit 1
    python3 "$B/pd_golden.py" http://127.0.0.1:8300 "$G/tiny-v3/cases.json" "$out/single-$mode.json" \
        $([ "$dt" = float32 ] && echo --golden) 2>&1 | tee -a "$log"
    stop_all
    echo "=== $mode: 1P1D, prefill GPU 0 -> decode GPU 1, through duet-proxy" | tee -a "$log"
    CUDA_VISIBLE_DEVICES=0 mpirun -np 1 -x CUDA_VISIBLE_DEVICES -x DUET_KV_SECRET -x LD_LIBRARY_PATH \
        -x NCCL_NVLS_ENABLE duet-prefill "${common[@]}" --dtype "$dt" "${kvdt[@]}" --port 8100 >>"$log" 2>&1 &
    pids+=($!)
    CUDA_VISIBLE_DEVICES=1 mpirun -np 1 -x CUDA_VISIBLE_DEVICES -x DUET_KV_SECRET -x LD_LIBRARY_PATH \
        -x NCCL_NVLS_ENABLE duet-decode "${common[@]}" --dtype "$dt" "${kvdt[@]}" --port 8200 >>"$log" 2>&1 &
    pids+=($!)
    wait_up 8100 && wait_up 8200 || exit 1
    duet-proxy --host 127.0.0.1 --port 8000 --prefill 127.0.0.1:8100 --decode 127.0.0.1:8200 \
        >>"$log" 2>&1 &
    pids+=($!)
    wait_up 8000 || exit 1
    python3 "$B/pd_golden.py" http://127.0.0.1:8000 "$G/tiny-v3/cases.json" "$out/pd-$mode.json" \
        --expect "$out/single-$mode.json" $([ "$dt" = float32 ] && echo --golden) 2>&1 | tee -a "$log"
    curl -s http://127.0.0.1:8200/metrics | grep -E "^duet_kv_pull|kv_cache_usage" | tee -a "$log"
    curl -s http://127.0.0.1:8100/metrics | grep -E "^duet_kv_lease|kv_cache_usage" | tee -a "$log"
    grep -E "kv: " "$log" | sort -u | head -6
    stop_all
done
