#!/usr/bin/env bash
# The GPU checks of one device-machine call, run from the offline bundle:
#   bash .bundle/run.sh bash .bundle/device_check.sh single|multi
# single (one GPU): op test, sampling test, goldens on CUDA in float32 and bf16 (the device MoE
# path, and the host-routing one for comparison), the host's Open MPI with the CPU backend,
# compute-sanitizer memcheck over golden runs and the op test, the MoE microbenchmark.
# moe (one GPU): the MoE op tests and the microbenchmark alone.
# multi (two GPUs): goldens with -tp 2 and -dp 2 --enable-expert-parallel over NCCL, and the
# rank-failure test on the CUDA backend (a killed or stopped rank ends the instance).
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
mpi=(mpirun -np 2 -x LD_LIBRARY_PATH -x PATH -x NCCL_NVLS_ENABLE -x DUET_BUNDLE)
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)

case "${1:-single}" in
single)
    run op-test test_backend_ops
    run sample-test test_sample
    for c in tiny-v3 tiny-v3-fp8; do
        for dt in float32 bfloat16; do
            run "golden-$dt-$c" duet-check golden --backend cuda --dtype "$dt" "$G/$c"
        done
    done
    run "golden-default-tiny-v3" duet-check golden --backend cuda "$G/tiny-v3"
    run mpi-cpu-tp2 "${mpi[@]}" duet-check golden -tp 2 "$G/tiny-v3"
    TMO=200 run sanitizer-golden-f32 "$san" --tool memcheck --error-exitcode 9 \
        duet-check golden --backend cuda --dtype float32 "$G/tiny-v3"
    TMO=150 run sanitizer-golden-bf16-fp8 "$san" --tool memcheck --error-exitcode 9 \
        duet-check golden --backend cuda --dtype bfloat16 "$G/tiny-v3-fp8"
    TMO=200 DUET_TEST_MOE_QUICK=1 run sanitizer-op-test "$san" --tool memcheck \
        --error-exitcode 9 test_backend_ops
    run "golden-bf16-tiny-v3-moe-host" env DUET_MOE_PATH=host duet-check golden --backend cuda \
        --dtype bfloat16 "$G/tiny-v3"
    TMO=400 run bench-moe bench_moe
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
esac
# the report lines and failures of every run, then the summary
grep -E "^=== |PASS|FAIL|passed|error|ERROR|did not complete|rel_l2|agree|chi-square|skipped|SUMMARY|unpacked|NCCL [0-9]" \
    "$log" | grep -v "^    row" | grep -v "PASS$" | tail -c 6000
# the MoE microbenchmark's table, whole
sed -n '/^ceilings:/,/^PASS$\|^FAIL$/p' "$log" | tail -c 3000
echo "---- summary"
cat "$summary"
