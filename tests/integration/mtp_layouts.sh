#!/usr/bin/env bash
# MTP speculative decoding in the parallel layouts on the CPU: on a duet-mkmodel --mtp
# checkpoint, duet-run's output with --num-speculative-tokens k equals its output without, in
# each layout (one rank; TP 2; DP 2 without EP), greedy and seeded sampling. The layouts with
# expert parallelism run in tests/parallel/mtp_ep.sh.
# Usage: mtp_layouts.sh PATH_TO_duet-run PATH_TO_duet-mkmodel TOKENIZER_DIR
set -u
run="$1"
mk="$2"
tokdir="$3"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/duet-mtplay-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
fails=0
"$mk" --preset tiny --mtp --tokenizer "$tokdir" --out "$tmp/m" >/dev/null 2>&1 ||
    { echo "FAIL duet-mkmodel --mtp"; exit 1; }
prompt="The quick brown fox jumps over the lazy dog and then"

# gen NAME NP k [layout and sampling args...]: duet-run's stdout into $tmp/NAME
gen() {
    local name="$1" np="$2" k="$3"
    shift 3
    timeout 240 mpirun --oversubscribe -np "$np" "$run" --model "$tmp/m" --prompt "$prompt" \
        --max-tokens 40 --ignore-eos --num-speculative-tokens "$k" "$@" \
        >"$tmp/$name" 2>"$tmp/$name.err"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "FAIL $name: exit $rc"
        tail -5 "$tmp/$name.err"
        fails=$((fails + 1))
    fi
}

# same REF NAME: equal outputs
same() {
    if [ -s "$tmp/$1" ] && cmp -s "$tmp/$1" "$tmp/$2"; then
        echo "ok   $2 = $1"
    else
        echo "FAIL $2 differs from $1:"
        echo "  $1: $(head -c 300 "$tmp/$1")"
        echo "  $2: $(head -c 300 "$tmp/$2")"
        fails=$((fails + 1))
    fi
}

greedy=(--temperature 0)
sampled=(--temperature 0.8 --top-k 20 --seed 7)
gen one-off 1 0 "${greedy[@]}"
for k in 1 2 3; do
    gen one-k$k 1 "$k" "${greedy[@]}"
    same one-off one-k$k
done
gen one-off-s 1 0 "${sampled[@]}"
gen one-k2-s 1 2 "${sampled[@]}"
same one-off-s one-k2-s

gen tp2-off 2 0 -tp 2 "${greedy[@]}"
gen tp2-k3 2 3 -tp 2 "${greedy[@]}"
same tp2-off tp2-k3
gen tp2-off-s 2 0 -tp 2 "${sampled[@]}"
gen tp2-k1-s 2 1 -tp 2 "${sampled[@]}"
same tp2-off-s tp2-k1-s

gen dp2-off 2 0 -dp 2 "${greedy[@]}"
gen dp2-k2 2 2 -dp 2 "${greedy[@]}"
same dp2-off dp2-k2

[ "$fails" -eq 0 ] || exit 1
echo "all ok"
