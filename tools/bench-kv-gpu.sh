#!/usr/bin/env bash
# KV transfer at link speed on one GPU, prefill and decode processes sharing it (issue 18), from
# the offline bundle (deploy/bundle-offline.sh packs it with a DeepSeek-V3-geometry config):
#   bash .bundle/run.sh bash .bundle/bench-kv-gpu.sh [SECTIONS...]
# Sections (default: both, in this order):
#   pull  duet-kvbench on the CUDA backend: KV pulls of 8k-token prompts of V3 geometry (61
#         layers x 576 latent dims, bf16, blocks of 64 tokens), byte-checked, on the path UCX
#         picks (direct when it reports CUDA memory) and on the pipelined staged path, each next
#         to the pinned host<->device copy bandwidth of the same blocks (pull/ref = the pull's
#         share of the slower direction; the issue asks for >= 0.5), and with --kv-cuda-ipc
#         (the decode maps the prefill's cache and copies device to device)
#   ttft  duet-prefill + duet-decode + duet-proxy on the GPU with a V3-geometry model (61
#         layers, V3's attention, 4 routed experts all picked per token, so two copies fit;
#         --load-format dummy): TTFT of an 8k-token prompt through the proxy (prefill,
#         KV pull, first decode step) next to the prefill worker's own TTFT for the same prompt
#         in the same run, on the auto KV path, with --kv-staging on and with --kv-cuda-ipc;
#         both prefill in chunks of KV_CHUNK tokens (--max-num-batched-tokens), and the proxy
#         starts the decode leg on the prefill's first event (early hand-over), so the pull
#         overlaps every chunk but the last (docs/kv-transfer.md)
# Output: a summary on stdout; every log under $OUT (or /tmp/duet-bench-kv). KV_TOKENS (8192),
# KV_CHUNK (2048), KV_PATHS ("cuda-ipc auto staged": the paths each section runs, in this order)
# and KV_GPU_UTIL (0.47, --gpu-memory-utilization of each instance) change the setup.
set -u
here=${DUET_BUNDLE:?run through run.sh}
out=${OUT:-/tmp/duet-bench-kv}
mkdir -p "$out"
model=${DUET_KV_MODEL:-$here/models/v3-kv}
tokens=${KV_TOKENS:-8192}
chunk=${KV_CHUNK:-2048}
read -r -a paths <<<"${KV_PATHS:-cuda-ipc auto staged}"
backend=${KV_BACKEND:-cuda} # cpu: a smoke run of the script itself (KV_TOKENS small, a tiny model)
mem=(--gpu-memory-utilization "${KV_GPU_UTIL:-0.47}") # each of the two instances
[ "$backend" = cuda ] || mem=(--kv-cache-memory 256M)
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(pull ttft)
summary=$out/summary.txt
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
export DUET_KV_SECRET=bench-kv-secret

say "commit $(cat "$here/COMMIT" 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%MZ)"
say "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
say "$(ucx_info -v 2>&1 | head -2 | tr '\n' ' ')"
say "UCX CUDA transports: $(ucx_info -d 2>/dev/null | awk '/Transport:/ {print $3}' |
    grep -E 'cuda|gdr' | sort -u | tr '\n' ' ')"

pull() { # name args...
    local name=$1
    shift
    say "--- pull $name: duet-kvbench --backend $backend --layers 61 --block-size 64 --tokens $tokens $*"
    timeout 600 duet-kvbench --backend "$backend" --layers 61 --block-size 64 --tokens "$tokens" \
        --repeat 5 --copy-reference "$@" >"$out/pull-$name.txt" 2>&1
    local rc=$?
    grep -E "kv: KV path|cuda-ipc|CUDA IPC" "$out/pull-$name.txt" | sed 's/.* kv: /  /' | sort -u | tee -a "$summary"
    grep -vE "^[0-9:.]+ [a-z-]+ [IDW] " "$out/pull-$name.txt" | tail -4 | tee -a "$summary"
    [ $rc = 0 ] || say "  (rc=$rc)"
}

wait_up() { # port pid
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}

# TTFT of one streamed completion of N random token ids (median of REPS after one warm-up)
ttft_py='
import http.client, json, random, statistics, sys, time
port, n, reps, extra = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
times = []
for rep in range(reps + 1):
    rng = random.Random(1000 * rep + len(extra))
    body = {"model": "v3kv", "prompt": [rng.randrange(100, 120000) for _ in range(n)],
            "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.monotonic()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        sys.exit("HTTP %d: %s" % (r.status, r.read()[:300]))
    t = None
    for line in r:
        if line.startswith(b"data: {") and b"\"text\"" in line:
            t = time.monotonic() - t0
            break
    r.read()
    c.close()
    if t is None:
        sys.exit("no token in the stream")
    if rep > 0:
        times.append(t * 1e3)
print("%.1f" % statistics.median(times))
'

ttft_run() { # name extra-flags...
    local name=$1
    shift
    local common=(--model "$model" --served-model-name v3kv --backend "$backend"
        --load-format dummy --host 127.0.0.1 --max-model-len $((tokens + 1024))
        --max-num-batched-tokens "$chunk" --max-num-seqs 8 --no-enable-prefix-caching "${mem[@]}"
        "$@")
    local pids=()
    mpirun -np 1 -x DUET_KV_SECRET -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE \
        duet-prefill "${common[@]}" --port 8710 >"$out/ttft-$name-prefill.log" 2>&1 &
    pids+=($!)
    if ! wait_up 8710 "${pids[0]}"; then
        say "--- ttft $name: the prefill worker did not come up"
        tail -5 "$out/ttft-$name-prefill.log" | tee -a "$summary"
        kill "${pids[@]}" 2>/dev/null
        return
    fi
    mpirun -np 1 -x DUET_KV_SECRET -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE \
        duet-decode "${common[@]}" --port 8720 >"$out/ttft-$name-decode.log" 2>&1 &
    pids+=($!)
    duet-proxy --host 127.0.0.1 --port 8700 --prefill 127.0.0.1:8710 --decode 127.0.0.1:8720 \
        >"$out/ttft-$name-proxy.log" 2>&1 &
    pids+=($!)
    if wait_up 8720 "${pids[1]}" && wait_up 8700 "${pids[2]}"; then
        local solo pd
        solo=$(python3 -c "$ttft_py" 8710 "$tokens" 3 solo 2>&1 | tail -1)
        pd=$(python3 -c "$ttft_py" 8700 "$tokens" 3 pd 2>&1 | tail -1)
        say "--- ttft $name ($tokens-token prompt in $chunk-token chunks, median of 3): prefill-only ${solo} ms," \
            "disaggregated through the proxy ${pd} ms, KV transfer adds" \
            "$(awk -v a="$pd" -v b="$solo" 'BEGIN { if (b > 0) printf "%.1f%%", (a / b - 1) * 100; else print "?" }')"
        grep -hE "kv: KV path|cuda-ipc|CUDA IPC" "$out/ttft-$name-prefill.log" "$out/ttft-$name-decode.log" |
            sed 's/.* kv: /  /' | sort -u | tee -a "$summary"
        curl -s http://127.0.0.1:8720/metrics | grep -E "^duet_kv_pull_(bytes|seconds)" |
            sed 's/^/  /' | tee -a "$summary"
        curl -s http://127.0.0.1:8710/metrics | grep -E "^duet_kv_lease_pins_(computing_)?total" |
            sed 's/^/  /' | tee -a "$summary"
    else
        say "--- ttft $name: the decode worker or the proxy did not come up"
        tail -5 "$out/ttft-$name-decode.log" | tee -a "$summary"
    fi
    kill -TERM "${pids[@]}" 2>/dev/null
    sleep 3
    kill -KILL "${pids[@]}" 2>/dev/null
    wait 2>/dev/null
}

for s in "${sections[@]}"; do
    case "$s" in
    pull | ttft)
        for p in "${paths[@]}"; do
            case "$p" in
            auto) args=(--kv-staging auto --no-kv-cuda-ipc) ;;
            staged) args=(--kv-staging on --no-kv-cuda-ipc) ;;
            cuda-ipc) args=(--kv-cuda-ipc) ;;
            *)
                say "unknown KV path $p"
                continue
                ;;
            esac
            if [ "$s" = pull ]; then pull "$p" "${args[@]}"; else ttft_run "$p" "${args[@]}"; fi
        done
        ;;
    *) say "unknown section $s" ;;
    esac
done
