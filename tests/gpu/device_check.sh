#!/usr/bin/env bash
# The GPU checks of one device-machine call, run from the offline bundle:
#   bash .bundle/run.sh bash .bundle/device_check.sh quick|single|multi|mla|moe|fp8|fp8-plan|shared
# quick (one GPU): the op and sampling tests, the goldens on every path, the memory plan.
# single (one GPU): op test, sampling test and benchmark, goldens on CUDA in float32 and bf16
# (the device MoE path, and the host-routing one for comparison), bf16 against the
# bf16-emulating CPU backend row by row (needs the bundle built with
# --golden .../tiny-v3-smooth --golden .../tiny-v3-fp8-smooth), the host's Open MPI with the
# CPU backend, compute-sanitizer memcheck over golden runs, the op test and the sampling test.
# moe (one GPU): the MoE op tests and the microbenchmark alone.
# multi (two GPUs): goldens with -tp 2 and -dp 2 --enable-expert-parallel over NCCL, and the
# rank-failure test on the CUDA backend (a killed or stopped rank ends the instance).
# mla (one GPU): the MLA decode kernels: op test, compute-sanitizer (memcheck over the op test,
# racecheck and synccheck over its MLA kernels), their SASS, and bench_mla's table
# (docs/kernels/mla.md).
# fp8 (one GPU): the FP8 weights (docs/kernels/fp8.md): op test (FP8 linear and experts
# against the CPU), the FP8 goldens with bf16 activations (the FP8 path) against the
# bf16-emulating CPU backend and alone, compute-sanitizer over the op test and an FP8 golden,
# and bench_fp8's table. fp8-plan (one GPU): the memory plan against a DeepSeek-V3 cut to 12
# layers (FP8 dummy weights, ~102 GiB) on the device.
# shared (one GPU): two duet-decode instances started at the same moment on one GPU at
# --gpu-memory-utilization 0.45 each; both must become healthy.
# Full output goes to $OUT/all.log (few files come back), a summary to stdout at the end.
set -u
out=${OUT:-/tmp/duet-device}
mkdir -p "$out"
G=${DUET_BUNDLE:?run through run.sh}/golden
log=$out/all.log
summary=$out/summary.txt
: >"$summary"

run() { # name cmd...
    local name=$1 t0 rc ms
    shift
    t0=$(date +%s%N)
    echo "=== $name: $*" >>"$log"
    timeout "${TMO:-300}" "$@" >>"$log" 2>&1
    rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    printf '%-40s rc=%-3d %4d.%01ds\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000 / 100)) |
        tee -a "$summary" >>"$log"
    return 0
}

{
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    mpirun --version | head -1
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$(command -v duet-check)" | grep -E "not found|nccl|cublas|libmpi|openblas|cjson"
} >>"$log" 2>&1
# SASS instruction counts of each mla_decode_tc kernel in a binary: "SASS <kernel> <op> <n>"
sass_counts() {
    "$DIS" -sass "$1" | awk '
        /Function : / { f = ($3 ~ /mla_decode_tc/) ? $3 : "" }
        f { for (i = 1; i <= NF; i++) if ($i ~ /^(HMMA|LDSM|LDGSTS|LDL|STL|BAR)/) {
                split($i, a, "."); n[f " " a[1]]++ } }
        END { for (k in n) print "SASS", k, n[k] }' | sort
}
mpi=(mpirun -np 2 -x LD_LIBRARY_PATH -x PATH -x NCCL_NVLS_ENABLE -x DUET_BUNDLE)
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)

case "${1:-single}" in
quick)
    # correctness only, in a few minutes: the op tests (MLA, MoE, sampling kernels against the
    # CPU rules), the goldens on every path (graphs replay from the third decode step on), bf16
    # against its emulation, and the memory plan against a V2-Lite-sized dummy load
    TMO=150 run op-test test_backend_ops
    TMO=120 run sample-test test_sample
    TMO=120 run dummy-test test_dummy_device
    # bf16 is held to the smooth-routing goldens below; on tiny-v3 and tiny-v3-fp8 bf16
    # rounding flips experts at their tiny routing margins (docs/cuda.md), so float32 only
    for c in tiny-v3 tiny-v3-fp8; do
        run "golden-float32-$c" duet-check golden --backend cuda --dtype float32 "$G/$c"
    done
    run golden-f32-eager-tiny-v3 duet-check golden --backend cuda --dtype float32 \
        --enforce-eager "$G/tiny-v3"
    run golden-f32-moe-host-tiny-v3 env DUET_MOE_PATH=host duet-check golden --backend cuda \
        --dtype float32 "$G/tiny-v3"
    for c in tiny-v3-smooth tiny-v3-fp8-smooth; do
        [ -d "$G/$c" ] || continue
        run "golden-bf16-vs-emulated-$c" duet-check golden --backend cuda --dtype bfloat16 \
            --compare-to bf16-emulated --ratio-of p90 --per-row "$G/$c"
    done
    # --kv-cache-dtype fp8 (e4m3 latents; CUDA decodes a layer's blocks before attention): within
    # the bounds the CPU's fp8 goldens hold (tests/golden/meson.build), graphs and eager, and
    # bf16 against the bf16-emulating CPU with the same fp8 cache
    for c in tiny-v3-smooth tiny-v3-fp8-smooth; do
        [ -d "$G/$c" ] || continue
        run "golden-kv-fp8-float32-$c" duet-check golden --backend cuda --dtype float32 \
            --kv-cache-dtype fp8 --tol 0.13 "$G/$c"
        run "golden-kv-fp8-bf16-vs-emulated-$c" duet-check golden --backend cuda \
            --dtype bfloat16 --kv-cache-dtype fp8 --tol 0.16 --compare-to bf16-emulated \
            --ratio-of p90 --per-row "$G/$c"
    done
    run golden-kv-fp8-f32-eager duet-check golden --backend cuda --dtype float32 \
        --kv-cache-dtype fp8 --tol 0.13 --enforce-eager "$G/tiny-v3-smooth"
    TMO=240 run memplan-check memplan_check --model "$DUET_BUNDLE/models/v2-lite" \
        --backend cuda --load-format dummy
    TMO=240 run memplan-check-kv-fp8 memplan_check --model "$DUET_BUNDLE/models/v2-lite" \
        --backend cuda --load-format dummy --kv-cache-dtype fp8
    ;;
single)
    run op-test test_backend_ops
    run sample-test test_sample
    run dummy-test test_dummy_device
    run sample-bench bash -c "set -o pipefail; bench_sample cuda | tee $out/bench_sample.txt"
    for c in tiny-v3 tiny-v3-fp8; do
        for dt in float32 bfloat16; do
            run "golden-$dt-$c" duet-check golden --backend cuda --dtype "$dt" "$G/$c"
        done
    done
    for c in tiny-v3-smooth tiny-v3-fp8-smooth; do
        [ -d "$G/$c" ] || continue
        run "golden-bf16-vs-emulated-$c" duet-check golden --backend cuda --dtype bfloat16 \
            --compare-to bf16-emulated --ratio-of p90 --per-row "$G/$c"
    done
    run "golden-default-tiny-v3" duet-check golden --backend cuda "$G/tiny-v3"
    # --kv-cache-dtype fp8 (e4m3 latents; CUDA decodes a layer's blocks before attention): within
    # the bounds the CPU's fp8 goldens hold (tests/golden/meson.build), graphs and eager, and
    # bf16 against the bf16-emulating CPU with the same fp8 cache
    for c in tiny-v3-smooth tiny-v3-fp8-smooth; do
        [ -d "$G/$c" ] || continue
        run "golden-kv-fp8-float32-$c" duet-check golden --backend cuda --dtype float32 \
            --kv-cache-dtype fp8 --tol 0.13 "$G/$c"
        run "golden-kv-fp8-bf16-vs-emulated-$c" duet-check golden --backend cuda \
            --dtype bfloat16 --kv-cache-dtype fp8 --tol 0.16 --compare-to bf16-emulated \
            --ratio-of p90 --per-row "$G/$c"
    done
    run golden-kv-fp8-f32-eager duet-check golden --backend cuda --dtype float32 \
        --kv-cache-dtype fp8 --tol 0.13 --enforce-eager "$G/tiny-v3-smooth"
    TMO=200 run sanitizer-golden-kv-fp8 "$san" --tool memcheck --error-exitcode 9 \
        duet-check golden --backend cuda --dtype bfloat16 --kv-cache-dtype fp8 --tol 0.16 \
        "$G/tiny-v3-smooth"
    run mpi-cpu-tp2 "${mpi[@]}" duet-check golden -tp 2 "$G/tiny-v3"
    TMO=200 run sanitizer-golden-f32 "$san" --tool memcheck --error-exitcode 9 \
        duet-check golden --backend cuda --dtype float32 "$G/tiny-v3"
    TMO=150 run sanitizer-golden-bf16-fp8 "$san" --tool memcheck --error-exitcode 9 \
        duet-check golden --backend cuda --dtype bfloat16 "$G/tiny-v3-fp8"
    TMO=200 DUET_TEST_MOE_QUICK=1 run sanitizer-op-test "$san" --tool memcheck \
        --error-exitcode 9 test_backend_ops
    TMO=200 DUET_TEST_QUICK=1 run sanitizer-sample-test "$san" --tool memcheck \
        --error-exitcode 9 test_sample
    TMO=200 DUET_TEST_QUICK=1 run racecheck-sample-test "$san" --tool racecheck \
        --error-exitcode 9 test_sample
    run "golden-bf16-tiny-v3-moe-host" env DUET_MOE_PATH=host duet-check golden --backend cuda \
        --dtype bfloat16 "$G/tiny-v3"
    ;;
moe)
    run op-test test_backend_ops
    TMO=200 DUET_TEST_MOE_QUICK=1 run sanitizer-op-test "$san" --tool memcheck \
        --error-exitcode 9 test_backend_ops
    run golden-float32-tiny-v3 duet-check golden --backend cuda --dtype float32 "$G/tiny-v3"
    TMO=400 run bench-moe bench_moe
    ;;
multi)
    run op-test test_backend_ops
    run sample-test test_sample
    for c in tiny-v3 tiny-v3-fp8; do
        for dt in float32 bfloat16; do
            run "tp2-$dt-$c" "${mpi[@]}" duet-check golden --backend cuda --dtype "$dt" -tp 2 \
                "$G/$c"
            run "dp2-ep2-$dt-$c" "${mpi[@]}" duet-check golden --backend cuda --dtype "$dt" \
                -dp 2 --enable-expert-parallel "$G/$c"
        done
    done
    run dp2-ep2-one-busy-f32 "${mpi[@]}" duet-check golden --backend cuda --dtype float32 \
        -dp 2 --enable-expert-parallel --dp-cases first "$G/tiny-v3"
    run rank-failure-cuda bash "$DUET_BUNDLE/rank_failure.sh" "$(command -v duet-check)" \
        "$G/tiny-v3" --backend cuda --dtype float32
    ;;
fp8)
    TMO=150 run op-test test_backend_ops
    # bf16 on the FP8 path, held to its emulation on the smooth-routing golden (tiny-v3-fp8's
    # routing margins flip experts under any bf16 rounding: docs/cuda.md)
    [ -d "$G/tiny-v3-fp8-smooth" ] &&
        run "golden-fp8-bf16-vs-emulated-tiny-v3-fp8-smooth" duet-check golden --backend cuda \
            --dtype bfloat16 --compare-to bf16-emulated --ratio-of p90 --per-row \
            "$G/tiny-v3-fp8-smooth"
    # the opt-in FP8 prefill GEMMs (cuBLASLt block-scaled) against their emulation
    [ -d "$G/tiny-v3-fp8-smooth" ] &&
        run golden-fp8-prefill-vs-emulated env DUET_FP8_PREFILL_ROWS=32 duet-check golden \
            --backend cuda --dtype bfloat16 --compare-to bf16-emulated --ratio-of p90 --tol 0.13 \
            --per-row \
            "$G/tiny-v3-fp8-smooth"
    run golden-fp8-f32-tiny-v3-fp8 duet-check golden --backend cuda --dtype float32 \
        "$G/tiny-v3-fp8"
    TMO=150 run sanitizer-golden-bf16-fp8 "$san" --tool memcheck --error-exitcode 9 \
        duet-check golden --backend cuda --dtype bfloat16 "$G/tiny-v3-fp8"
    TMO=200 DUET_TEST_MOE_QUICK=1 run sanitizer-op-test "$san" --tool memcheck \
        --error-exitcode 9 test_backend_ops
    TMO=200 run bench-fp8 bash -c "set -o pipefail; bench_fp8 | tee '$out/bench_fp8.txt'"
    ;;
fp8-plan)
    # DeepSeek-V3 cut to 12 layers, FP8 dummy weights (~102 GiB): the plan against the device
    TMO=540 run memplan-check-v3-12l-fp8 memplan_check --model "$DUET_BUNDLE/models/v3-12l" \
        --backend cuda --load-format dummy
    ;;
shared)
    # two duet-decode instances of V2-Lite (dummy weights, 29.3 GiB each) on GPU 0, started at
    # the same moment at --gpu-memory-utilization 0.45 each: each sizes its KV cache from its
    # own allocations, so the other's load must not refuse it (docs/memory.md); both must
    # become healthy. Their memory plan and KV cache lines, and the device's use with both
    # up, go to the summary.
    export DUET_KV_SECRET=device-check-shared
    shared_start() { # out-dir model-dir
        local out=$1 model=$2 pids=() rc=0 port i ok p
        for i in 0 1; do
            CUDA_VISIBLE_DEVICES=0 duet-decode --model "$model" \
                --backend cuda --load-format dummy --host 127.0.0.1 --port $((8750 + i)) \
                --max-model-len 4096 --gpu-memory-utilization 0.45 \
                >"$out/shared$i.log" 2>&1 &
            pids+=($!)
        done
        for i in 0 1; do
            port=$((8750 + i)) ok=0
            for _ in $(seq 200); do
                curl -sf "http://127.0.0.1:$port/health" >/dev/null && ok=1 && break
                kill -0 "${pids[$i]}" 2>/dev/null || break
                sleep 1
            done
            [ $ok = 1 ] || rc=1
            echo "memplan_check shared: instance $i $([ $ok = 1 ] && echo healthy || echo FAILED)"
            grep -E "memory plan|KV cache:|ERROR|WARN" "$out/shared$i.log" | head -6
        done
        nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader |
            sed 's/^/memplan_check shared: both up, device /'
        for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
        sleep 3
        for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
        wait "${pids[@]}" 2>/dev/null
        return $rc
    }
    export -f shared_start
    TMO=260 run shared-start-2x-decode-0.45 bash -c 'shared_start "$0" "$1"' "$out" \
        "$DUET_BUNDLE/models/v2-lite"
    ;;
mla)
    # most telling first; the timeouts add up to under the device call's 10 minutes
    TMO=120 run op-test test_backend_ops
    TMO=150 run bench-mla bash -c "set -o pipefail; bench_mla 30 | tee '$out/bench_mla.txt'"
    # the tensor-core kernel's instructions: HMMA (mma.sync), LDSM (ldmatrix), LDGSTS
    # (cp.async), BAR; LDL/STL would be local-memory spills
    DIS=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
    export DIS
    export -f sass_counts
    TMO=30 run sass-mla bash -c 'sass_counts "$0"' "$(command -v test_backend_ops)"
    san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    TMO=120 run sanitizer-memcheck-op-test "$san" --tool memcheck --error-exitcode 9 test_backend_ops
    TMO=100 run sanitizer-racecheck-mla "$san" --tool racecheck --error-exitcode 9 \
        --kernel-name kns=mla_ test_backend_ops
    TMO=60 run sanitizer-synccheck-mla "$san" --tool synccheck --error-exitcode 9 \
        --kernel-name kns=mla_ test_backend_ops
    ;;
esac
# the report lines and failures of every run, then the summary
grep -E "^=== |PASS|FAIL|passed|error|ERROR|did not complete|rel_l2|agree|differ from|chi-square|skipped|SUMMARY|unpacked|as graphs|memplan_check|NCCL [0-9]" \
    "$log" | grep -v "^    row" | grep -v "PASS$" | tail -c 8000
if [ -f "$out/bench_sample.txt" ]; then
    echo "---- bench_sample"
    cat "$out/bench_sample.txt"
fi
grep -E "^SASS " "$log"
[ -f "$out/bench_mla.txt" ] && sed -n '/^device copy/p;/^per op/,$p' "$out/bench_mla.txt"
if [ -f "$out/bench_fp8.txt" ]; then
    echo "---- bench_fp8"
    cat "$out/bench_fp8.txt"
fi
# the MoE microbenchmark's table, whole
sed -n '/^ceilings:/,/^PASS$\|^FAIL$/p' "$log" | tail -c 3000
echo "---- summary"
cat "$summary"
