#!/usr/bin/env bash
# MTP speculative decoding with expert parallelism on the CPU, on a duet-mkmodel --mtp
# checkpoint: the greedy ids with k = 1 and 3 drafts equal those without drafts (and a one-rank
# run's), and seeded sampling with drafts equals it without, in DP2+EP and TP2+DP2+EP, with
# every DP group drafting on its own requests and with one group idle while the other drafts
# (mtp-ep --busy first, and duet-run, whose other DP groups only join), with the drafts as the
# random module makes them (nearly none accepted) and steered to the reference's tokens
# (mtp-ep --oracle: most accepted, checked in its counters). Every run has a deadline
# and the collectives a short timeout: a broken lockstep fails here instead of hanging.
# Usage: mtp_ep.sh PATH_TO_mtp-ep PATH_TO_duet-run PATH_TO_duet-mkmodel TOKENIZER_DIR
# DUET_MTP_EP_ARGS: more arguments for every run (on GPUs: "--backend cuda").
set -u
prog="$1"
run="$2"
mk="$3"
tokdir="$4"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/duet-mtpep-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
export DUET_COMM_TIMEOUT=30
read -r -a extra <<<"${DUET_MTP_EP_ARGS:-}"
fails=0
"$mk" --preset tiny --mtp --tokenizer "$tokdir" --out "$tmp/m" >/dev/null 2>&1 ||
    { echo "FAIL duet-mkmodel --mtp"; exit 1; }

# gen NAME NP [mtp-ep args...]: its stdout into $tmp/NAME
gen() {
    local name="$1" np="$2"
    shift 2
    timeout 200 mpirun --oversubscribe -np "$np" "$prog" --model "$tmp/m" "${extra[@]}" "$@" \
        >"$tmp/$name" 2>"$tmp/$name.err"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "FAIL $name: exit $rc"
        grep -v '^ *$' "$tmp/$name.err" | grep -v ' I ' | tail -5
        fails=$((fails + 1))
    fi
}

# same REF NAME: equal outputs, each with at least one request's ids
same() {
    if grep -q 'req' "$tmp/$1" && cmp -s "$tmp/$1" "$tmp/$2"; then
        echo "ok   $2 = $1"
    else
        echo "FAIL $2 differs from $1:"
        echo "  $1: $(head -c 400 "$tmp/$1")"
        echo "  $2: $(head -c 400 "$tmp/$2")"
        fails=$((fails + 1))
    fi
}

ep=(--enable-expert-parallel)
# the reference: DP group 0's requests on one rank, no MTP, no EP
gen one-off 1
gen dp2-off 2 -dp 2 "${ep[@]}"
grep '^dp 0 ' "$tmp/dp2-off" >"$tmp/dp2-off.dp0"
same one-off dp2-off.dp0
for k in 1 3; do
    gen dp2-k$k 2 -dp 2 "${ep[@]}" --num-speculative-tokens $k
    same dp2-off dp2-k$k
done
gen dp2-off-s 2 -dp 2 "${ep[@]}" --sampled
gen dp2-k2-s 2 -dp 2 "${ep[@]}" --sampled --num-speculative-tokens 2
same dp2-off-s dp2-k2-s
# one DP group drafts, the other only joins (steps and MTP passes)
gen dp2-off-first 2 -dp 2 "${ep[@]}" --busy first
gen dp2-k3-first 2 -dp 2 "${ep[@]}" --busy first --num-speculative-tokens 3
same dp2-off-first dp2-k3-first
same one-off dp2-k3-first

# drafts steered to the reference's tokens: most are accepted, requests advance up to k + 1
# tokens a step (and some steps accept only part), so DP groups drift apart in steps
gen dp2-k3-oracle 2 -dp 2 "${ep[@]}" --num-speculative-tokens 3 --oracle "$tmp/dp2-off"
same dp2-off dp2-k3-oracle
gen dp2-k2-s-oracle 2 -dp 2 "${ep[@]}" --sampled --num-speculative-tokens 2 --oracle "$tmp/dp2-off-s"
same dp2-off-s dp2-k2-s-oracle
gen dp2-k3-first-oracle 2 -dp 2 "${ep[@]}" --busy first --num-speculative-tokens 3 \
    --oracle "$tmp/dp2-off-first"
same dp2-off-first dp2-k3-first-oracle
for name in dp2-k3-oracle dp2-k2-s-oracle dp2-k3-first-oracle; do
    if grep -q 'dp 0 drafted [1-9][0-9]*, accepted [1-9]' "$tmp/$name.err"; then
        echo "ok   $name: drafts accepted"
    else
        echo "FAIL $name: no draft accepted ($(grep 'mtp-ep: dp' "$tmp/$name.err" | tr '\n' ' '))"
        fails=$((fails + 1))
    fi
done

gen tp2dp2-off 4 -tp 2 -dp 2 "${ep[@]}"
for k in 1 3; do
    gen tp2dp2-k$k 4 -tp 2 -dp 2 "${ep[@]}" --num-speculative-tokens $k
    same tp2dp2-off tp2dp2-k$k
done
gen tp2dp2-off-s 4 -tp 2 -dp 2 "${ep[@]}" --sampled
gen tp2dp2-k1-s 4 -tp 2 -dp 2 "${ep[@]}" --sampled --num-speculative-tokens 1
same tp2dp2-off-s tp2dp2-k1-s
gen tp2dp2-k3-oracle 4 -tp 2 -dp 2 "${ep[@]}" --num-speculative-tokens 3 --oracle "$tmp/tp2dp2-off"
same tp2dp2-off tp2dp2-k3-oracle

# duet-run: DP rank 0 generates, DP rank 1 only joins
prompt="The quick brown fox jumps over the lazy dog and then"
for k in 0 1 3; do
    timeout 200 mpirun --oversubscribe -np 2 "$run" --model "$tmp/m" --prompt "$prompt" \
        --max-tokens 40 --ignore-eos --temperature 0 -dp 2 "${ep[@]}" "${extra[@]}" \
        --num-speculative-tokens "$k" >"$tmp/run-k$k" 2>"$tmp/run-k$k.err" ||
        { echo "FAIL duet-run k=$k: exit $?"; tail -3 "$tmp/run-k$k.err"; fails=$((fails + 1)); }
done
for k in 1 3; do
    if [ -s "$tmp/run-k0" ] && cmp -s "$tmp/run-k0" "$tmp/run-k$k"; then
        echo "ok   duet-run dp2-ep k=$k = k=0"
    else
        echo "FAIL duet-run dp2-ep k=$k differs from k=0"
        fails=$((fails + 1))
    fi
done
[ "$fails" -eq 0 ] || exit 1
echo "all ok"
