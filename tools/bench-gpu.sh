#!/usr/bin/env bash
# The GPU benchmark of one device call, from the offline bundle (deploy/bundle-offline.sh packs
# it with the programs and a DeepSeek-V2-Lite config.json for --load-format dummy):
#   bash .bundle/run.sh bash .bundle/bench-gpu.sh [SECTIONS...]
# Sections (default: all, in this order):
#   kernels  the ceilings and each hot kernel: bench_mla, bench_moe, bench_sample, when packed
#   step     decode steps through the model at batch 1, 16, 64 (context 1k) next to their
#            memory floor, with recorded steps (CUDA graphs) and with --enforce-eager
#   profile  one eager decode step at batch 1 and 64 under ncu, time and DRAM bytes per kernel
#   prefill  prompts (TTFT's work): bench_mla's prompt-chunk table (the prefill attention kernel
#            next to a dense GEMM), then bench_step --prefill 1k/4k/16k next to the compute floor
#   prefill_profile  one 4k-token prompt under ncu, time per kernel
#   serve    duet-decode on the GPU behind duet-bench: TPOT at 1 and at 64 concurrent (greedy
#            and top_p 0.95), 200 requests at once (1,000 in / 100 out), a lone prompt's TTFT
#   pd       1P1D and 2P1D behind duet-proxy (duet-prefill, duet-decode, KV over UCX), 200
#            requests at once; on one GPU every instance shares it
# Output: a summary on stdout; every log and result JSON under $OUT (or /tmp/duet-bench-gpu).
set -u
here=${DUET_BUNDLE:?run through run.sh}
out=${OUT:-/tmp/duet-bench-gpu}
mkdir -p "$out"
model=${DUET_BENCH_MODEL:-$here/models/v2-lite}
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(kernels step serve)
log=$out/bench.log
summary=$out/summary.txt
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
has() { command -v "$1" >/dev/null 2>&1; }
run() { # name timeout cmd...: output to $out/name.txt, tail to the summary
    local name=$1 tmo=$2
    shift 2
    echo "=== $name: $*" >>"$log"
    local t0=$SECONDS
    timeout "$tmo" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    say "--- $name (rc=$rc, $((SECONDS - t0)) s): $*"
    grep -v "^[0-9:.]* .* [IDW] " "$out/$name.txt" | tail -n "${TAIL:-14}" | tee -a "$summary"
    return $rc
}

say "commit $(cat "$here/COMMIT" 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%MZ)"
say "$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"

for s in "${sections[@]}"; do
    case "$s" in
    kernels)
        has bench_mla && run bench_mla 240 bench_mla
        has bench_moe && run bench_moe 240 bench_moe
        has bench_sample && run bench_sample 180 bench_sample
        ;;
    step)
        run step_graphs 420 bench_step --model "$model" --backend cuda --load-format dummy \
            --batch 1,16,64 --ctx 1024 --steps 50
        run step_eager 420 bench_step --model "$model" --backend cuda --load-format dummy \
            --batch 1,64 --ctx 1024 --steps 20 --enforce-eager
        ;;
    profile)
        # one eager decode step per batch size under Nsight Compute, summed by kernel
        ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
        [ -n "$ncu" ] || { say "--- profile: no ncu"; continue; }
        for b in ${DUET_PROFILE_BATCHES:-1 64}; do
            run "ncu_b$b" 300 "$ncu" --profile-from-start off --clock-control none --csv \
                --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum \
                --log-file "$out/ncu_b$b.csv" bench_step --model "$model" --backend cuda \
                --load-format dummy --batch "$b" --ctx 1024 --steps 3 --enforce-eager --profile
            TAIL=30 run "ncu_b${b}_sum" 30 python3 "$here/ncu_summary.py" "$out/ncu_b$b.csv" 25
        done
        ;;
    prefill)
        has bench_mla && TAIL=16 run bench_mla_prefill 240 bench_mla 10 prefill
        TAIL=8 run prefill_v2lite 300 bench_step --model "$model" --backend cuda \
            --load-format dummy --prefill 1024,4096,16384 --chunk 8192
        ;;
    prefill_profile)
        ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
        [ -n "$ncu" ] || { say "--- prefill_profile: no ncu"; continue; }
        run ncu_prefill 300 "$ncu" --profile-from-start off --clock-control none --csv \
            --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum \
            --log-file "$out/ncu_prefill.csv" bench_step --model "$model" --backend cuda \
            --load-format dummy --prefill 4096 --chunk 8192 --profile
        TAIL=30 run ncu_prefill_sum 30 python3 "$here/ncu_summary.py" "$out/ncu_prefill.csv" 25
        ;;
    serve)
        port=8600
        DUET_LOG=debug duet-decode --model "$model" --served-model-name v2lite --backend cuda \
            --load-format dummy --host 127.0.0.1 --port $port --max-model-len 4096 \
            --max-num-seqs 256 --max-num-batched-tokens 8192 --print-memory-plan \
            >"$out/server.log" 2>&1 &
        srv=$!
        ok=0
        for _ in $(seq 300); do
            curl -sf "http://127.0.0.1:$port/health" >/dev/null && ok=1 && break
            kill -0 $srv 2>/dev/null || break
            sleep 1
        done
        if [ $ok != 1 ]; then
            say "--- serve: the server did not come up"
            tail -20 "$out/server.log" | tee -a "$summary"
            kill $srv 2>/dev/null
            continue
        fi
        common=(--base-url "http://127.0.0.1:$port" --model "$model" --served-model-name v2lite
            --dataset-name random --random-input-len 1000 --random-output-len 100 --ignore-eos
            --save-result --result-dir "$out" --seed 7)
        TAIL=24 run serve_batch1 300 duet-bench "${common[@]}" --num-prompts 8 \
            --max-concurrency 1 --result-filename batch1.json
        TAIL=24 run serve_conc64 300 duet-bench "${common[@]}" --num-prompts 128 \
            --max-concurrency 64 --result-filename conc64.json
        TAIL=24 run serve_conc64_topp 300 duet-bench "${common[@]}" --num-prompts 128 \
            --max-concurrency 64 --temperature 0.6 --top-p 0.95 --result-filename conc64_topp.json
        # the engine's step lines (DUET_LOG=debug) of the 200-request run, summed
        s0=$(grep -o 'engine: step [0-9]*' "$out/server.log" | tail -1 | grep -o '[0-9]*$')
        TAIL=24 run serve_200 400 duet-bench "${common[@]}" --num-prompts 200 \
            --result-filename all200.json
        awk -v s0="${s0:-0}" '/engine: step [0-9]+:/ {
                for (i = 1; i <= NF; i++) if ($i == "step") n = $(i + 1) + 0
                if (n <= s0) next
                match($0, /[0-9.]+ ms \(/); ms = substr($0, RSTART, RLENGTH - 4) + 0
                match($0, /, [0-9]+ tokens/); tok = substr($0, RSTART + 2, RLENGTH - 9) + 0
                match($0, /of [0-9]+ tokens\)/); pt = substr($0, RSTART + 3, RLENGTH - 11) + 0
                match($0, /: [0-9]+ requests/); rq = substr($0, RSTART + 2, RLENGTH - 11) + 0
                if (pt > 0) { pn++; pms += ms; ptok += pt; pall += tok } else { dn++; dms += ms; drq += rq }
            }
            END { printf "serve_200 steps: %d with prompt chunks (%.0f ms, %d prompt tokens, %.0f tokens a step), %d decode-only (%.0f ms, %.1f requests a step)\n",
                pn, pms, ptok, pn ? pall / pn : 0, dn, dms, dn ? drq / dn : 0 }' \
            "$out/server.log" | tee -a "$summary"
        kill -TERM $srv 2>/dev/null
        wait $srv 2>/dev/null
        grep -E "graph|KV cache|serving" "$out/server.log" | head -5 | tee -a "$summary"
        ;;
    pd)
        # 1P1D and 2P1D behind duet-proxy on the GPUs there are (all on GPU 0 when there is
        # one: the instances then share its SMs and HBM bandwidth, so this shows what
        # disaggregation costs there, not what it buys), 1,000 in / 100 out x 200 at once
        export DUET_KV_SECRET=bench-gpu-pd
        ngpu=$(nvidia-smi -L 2>/dev/null | grep -c GPU)
        [ "$ngpu" -ge 1 ] || ngpu=1
        for np in 1 2; do
            pids=()
            util=$(awk -v n=$((np + 1)) -v g="$ngpu" 'BEGIN { k = n / g; if (k < 1) k = 1;
                printf "%.2f", 0.9 / (k > int(k) ? int(k) + 1 : k) }')
            wargs=(--model "$model" --served-model-name v2lite --backend cuda
                --load-format dummy --host 127.0.0.1 --max-model-len 4096
                --gpu-memory-utilization "$util")
            peers=()
            # one instance after another: not needed since instances count their own memory
            # (docs/memory.md), kept so one instance's start-up failure is seen by itself
            up=1
            wait_health() {
                for _ in $(seq 120); do
                    curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0
                    kill -0 "$2" 2>/dev/null || return 1
                    sleep 1
                done
                return 1
            }
            for i in $(seq 0 $((np - 1))); do
                [ $up = 1 ] || break
                CUDA_VISIBLE_DEVICES=$((i % ngpu)) duet-prefill "${wargs[@]}" \
                    --port $((8700 + 10 * i)) >"$out/pd${np}_prefill$i.log" 2>&1 &
                pids+=($!)
                peers+=("127.0.0.1:$((8700 + 10 * i))")
                wait_health $((8700 + 10 * i)) $! || up=0
            done
            if [ $up = 1 ]; then
                CUDA_VISIBLE_DEVICES=$((np % ngpu)) duet-decode "${wargs[@]}" --port 8790 \
                    --max-num-seqs 256 >"$out/pd${np}_decode.log" 2>&1 &
                pids+=($!)
                wait_health 8790 $! || up=0
            fi
            duet-proxy --host 127.0.0.1 --port 8780 --prefill "${peers[@]}" --decode 127.0.0.1:8790 \
                >"$out/pd${np}_proxy.log" 2>&1 &
            pids+=($!)
            for _ in $(seq 50); do
                curl -sf http://127.0.0.1:8780/health >/dev/null && break
                sleep 0.2
            done
            if [ $up = 1 ]; then
                TAIL=24 run "pd_${np}p1d_200" 400 duet-bench --base-url http://127.0.0.1:8780 \
                    --model "$model" --served-model-name v2lite --dataset-name random \
                    --random-input-len 1000 --random-output-len 100 --ignore-eos --seed 7 \
                    --num-prompts 200 --save-result --result-dir "$out" \
                    --result-filename "pd${np}p1d.json"
            else
                say "--- pd ${np}P1D: an instance did not come up (util $util)"
                tail -5 "$out"/pd"${np}"_*.log | tee -a "$summary"
            fi
            for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
            sleep 3
            for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
            wait 2>/dev/null
        done
        ;;
    *) say "unknown section $s" ;;
    esac
done
