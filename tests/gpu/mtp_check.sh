#!/usr/bin/env bash
# MTP speculative decoding on one GPU, run from the offline bundle:
#   bash .bundle/run.sh bash .bundle/mtp_check.sh
# 1. duet-run on the CUDA backend (tiny MTP model, dummy weights): greedy output with
#    --num-speculative-tokens 1, 2, 3 equals the output without, in float32 (the check) and in
#    bfloat16 (reported: a multi-token step may round differently from a one-token step, and
#    random weights have near-ties);
# 2. bench_step --spec k on the V3-shaped MTP model: the verify step of k + 1 tokens against a
#    one-token step at batch 1, 16, 64, the k drafts' cost, and the speed-up at given acceptance
#    rates (random weights accept nearly nothing: acceptance is an input, not measured).
# Full output in $OUT/mtp.log, a summary on stdout.
set -u
out=${OUT:-/tmp/duet-device}
mkdir -p "$out"
B=${DUET_BUNDLE:?run through run.sh}
log=$out/mtp.log
: >"$log"
prompt="The quick brown fox jumps over the lazy dog and then"
fails=0
for dt in float32 bfloat16; do
    for k in 0 1 2 3; do
        timeout 300 duet-run --backend cuda --dtype "$dt" --load-format dummy \
            --model "$B/models/tiny-mtp" --prompt "$prompt" --max-tokens 64 --temperature 0 \
            --ignore-eos --num-speculative-tokens "$k" >"$out/mtp-$dt-k$k.txt" 2>>"$log"
        echo "duet-run $dt k=$k: rc=$?" | tee -a "$log"
    done
    for k in 1 2 3; do
        if cmp -s "$out/mtp-$dt-k0.txt" "$out/mtp-$dt-k$k.txt"; then
            echo "MTP $dt k=$k: same output as without drafts"
        else
            echo "MTP $dt k=$k: OUTPUT DIFFERS from k=0"
            [ "$dt" = float32 ] && fails=$((fails + 1))
        fi
    done
done
for k in 1 2 3; do
    timeout 600 bench_step --backend cuda --load-format dummy --model "$B/models/v3-mtp" \
        --batch 1,16,64 --ctx 1024 --steps 50 --spec "$k" 2>>"$log" | tee -a "$log"
done
[ "$fails" -eq 0 ] && echo "mtp_check: ok" || echo "mtp_check: $fails float32 mismatches"
