#!/usr/bin/env bash
# MTP speculative decoding on one GPU, run from the offline bundle:
#   bash .bundle/run.sh bash .bundle/mtp_check.sh
# 1. test_graph_shape cuda: five sequences (padded to a batch bucket of 8) through verify steps
#    of 1..4 tokens and MTP draft passes, graphs on (recorded, then replayed) against
#    --enforce-eager, in float32 (logits within 1e-3, drafts equal) and bf16 (differences
#    reported: its rounding can flip a tiny random model's routing);
# 2. duet-run on the CUDA backend (tiny MTP model, dummy weights): greedy output with
#    --num-speculative-tokens 1, 2, 3 and graphs on equals the same run with --enforce-eager
#    (the check, float32 and bf16: one sequence, so the same kernels run either way; where two
#    eager runs differ from each other too, that is reported instead) and the
#    output without drafts (the check in float32; reported in bf16: a multi-token step may round
#    differently from a one-token step, and random weights have near-ties); the model's exit
#    line ("graphs recorded/replayed") must show verify and draft replays;
# 3. bench_step --spec k on the V3-shaped MTP model: the verify step of k + 1 tokens against a
#    one-token step at batch 1, 16, 64, the k drafts' cost (both as graph replays after
#    warm-up), and the speed-up at given acceptance rates (random weights accept nearly
#    nothing: acceptance is an input, not measured).
# Full output in $OUT/mtp.log, a summary on stdout.
set -u
out=${OUT:-/tmp/duet-device}
mkdir -p "$out"
B=${DUET_BUNDLE:?run through run.sh}
log=$out/mtp.log
: >"$log"
prompt="The quick brown fox jumps over the lazy dog and then"
fails=0
timeout 600 test_graph_shape cuda >>"$log" 2>&1
rc=$?
echo "test_graph_shape cuda: rc=$rc" | tee -a "$log"
grep -E "^cuda " "$log"
[ "$rc" -eq 0 ] || fails=$((fails + 1))
export DUET_LOG=info # the model's exit line with the graph counters
for dt in float32 bfloat16; do
    for mode in graphs eager; do
        for k in 0 1 2 3; do
            [ "$mode" = eager ] && [ "$k" -eq 0 ] && continue
            flags=()
            [ "$mode" = eager ] && flags=(--enforce-eager)
            f=$out/mtp-$dt-$mode-k$k
            timeout 300 duet-run --backend cuda --dtype "$dt" --load-format dummy \
                --model "$B/models/tiny-mtp" --prompt "$prompt" --max-tokens 64 --temperature 0 \
                --ignore-eos --num-speculative-tokens "$k" "${flags[@]}" >"$f.txt" 2>"$f.err"
            echo "duet-run $dt $mode k=$k: rc=$?" | tee -a "$log"
            cat "$f.err" >>"$log"
        done
    done
    for k in 1 2 3; do
        g=$out/mtp-$dt-graphs-k$k
        e=$out/mtp-$dt-eager-k$k
        if cmp -s "$g.txt" "$e.txt" && [ -s "$g.txt" ]; then
            echo "MTP $dt k=$k: graphs on, same output as --enforce-eager"
        else
            # a second eager run tells a graph fault from a run-to-run difference of the
            # kernels themselves
            timeout 300 duet-run --backend cuda --dtype "$dt" --load-format dummy \
                --model "$B/models/tiny-mtp" --prompt "$prompt" --max-tokens 64 --temperature 0 \
                --ignore-eos --num-speculative-tokens "$k" --enforce-eager >"$e-2.txt" 2>>"$log"
            if cmp -s "$e.txt" "$e-2.txt"; then
                echo "MTP $dt k=$k: GRAPHS CHANGE THE OUTPUT (vs --enforce-eager)"
                fails=$((fails + 1))
            else
                echo "MTP $dt k=$k: graphs differ from --enforce-eager, but so do two eager runs"
            fi
        fi
        # "decode r/l, verify r/l, drafts r/l": replays of verify steps and draft passes
        line=$(grep -o "graphs recorded/replayed: .*" "$g.err" | tail -1)
        vr=$(sed -n 's/.*verify [0-9]*\/\([0-9]*\).*/\1/p' <<<"$line")
        dr=$(sed -n 's/.*drafts [0-9]*\/\([0-9]*\).*/\1/p' <<<"$line")
        if [ "${vr:-0}" -gt 0 ] && [ "${dr:-0}" -gt 0 ]; then
            echo "MTP $dt k=$k: ${line#graphs }"
        else
            echo "MTP $dt k=$k: NO VERIFY/DRAFT REPLAYS (${line:-no counter line})"
            fails=$((fails + 1))
        fi
        if cmp -s "$out/mtp-$dt-graphs-k0.txt" "$g.txt"; then
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
[ "$fails" -eq 0 ] && echo "mtp_check: ok" || echo "mtp_check: $fails failures"
