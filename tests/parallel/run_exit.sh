#!/usr/bin/env bash
# duet-run under mpirun ends, with the right status, in every layout: DP rank 0 generates, its
# TP followers follow, the other DP groups only join, and all leave in the same round.
# - TP2+DP2+EP, DP2+EP, TP2, TP2+DP2 (no EP), DP2: exit 0, the generated text equal to one
#   rank's, the summary line printed (tiny-v3-smooth: routing without near-ties, so the greedy
#   text does not depend on the layout's summation order);
# - a prompt the model cannot take (ids past its vocabulary) in TP2+DP2+EP: exit 1 with the
#   engine's error, not a collective's timeout;
# - --chat in TP2+DP2+EP with a pause between two lines longer than the collectives' deadline:
#   both turns answered, exit 0 (rank 0 keeps the others' collectives alive while it waits).
# Every run has a wall-clock limit and the collectives a short deadline, so a rank left in a
# collective fails the test instead of hanging it.
# Usage: run_exit.sh PATH_TO_duet-run PATH_TO_duet-mkmodel GOLDEN_DIR
# DUET_RUN_EXIT_ARGS: more arguments for every run (on GPUs: "--backend cuda").
set -u
run="$1"
mk="$2"
golden="$3"
model="$golden/tiny-v3-smooth/model"
tokdir="$golden/tokenizer"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/duet-runexit-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
export DUET_COMM_TIMEOUT=20
read -r -a extra <<<"${DUET_RUN_EXIT_ARGS:-}"
fails=0

fail() {
    echo "FAIL $*"
    fails=$((fails + 1))
}

# gen NAME NP [duet-run args...]: stdout into $tmp/NAME, stderr into $tmp/NAME.err, status into
# $tmp/NAME.rc
gen() {
    local name="$1" np="$2"
    shift 2
    local t0=$SECONDS
    timeout 120 mpirun --oversubscribe -np "$np" "$run" --model "$model" --tokenizer "$tokdir" \
        "${extra[@]}" "$@" >"$tmp/$name" 2>"$tmp/$name.err" </dev/null
    echo $? >"$tmp/$name.rc"
    echo "     $name: exit $(cat "$tmp/$name.rc") after $((SECONDS - t0)) s"
}

# the digits tokenize inside tiny-v3's 2048-token vocabulary
prompt=(--prompt "1 2 3 4 5 6 7" --max-tokens 16 --ignore-eos --temperature 0)
gen one 1 "${prompt[@]}"
if [ "$(cat "$tmp/one.rc")" != 0 ] || [ ! -s "$tmp/one" ]; then
    fail "one rank: exit $(cat "$tmp/one.rc"), $(wc -c <"$tmp/one") bytes"
    tail -3 "$tmp/one.err"
fi
for layout in "4 -tp 2 -dp 2 --enable-expert-parallel" "2 -dp 2 --enable-expert-parallel" \
    "2 -tp 2" "4 -tp 2 -dp 2" "2 -dp 2"; do
    read -r -a a <<<"$layout"
    name="np${a[0]}$(printf '%s' "${a[*]:1}" | tr -d ' -')"
    gen "$name" "${a[@]}" "${prompt[@]}"
    rc=$(cat "$tmp/$name.rc")
    if [ "$rc" != 0 ]; then
        fail "$layout: exit $rc"
        grep -v ' I ' "$tmp/$name.err" | grep -v '^ *$' | tail -4
    elif ! cmp -s "$tmp/one" "$tmp/$name"; then
        fail "$layout: text differs from one rank's"
    elif ! grep -q 'prompt tokens, 16 generated, .*finish: length\]' "$tmp/$name.err"; then
        fail "$layout: no summary line"
    elif grep -q 'did not complete within' "$tmp/$name.err"; then
        fail "$layout: a collective timed out"
    else
        echo "ok   $layout"
    fi
done

# an error on DP rank 0 ends every rank with its status (1), not through a collective's deadline
gen bad 4 -tp 2 -dp 2 --enable-expert-parallel --prompt "Hello world" --max-tokens 4
rc=$(cat "$tmp/bad.rc")
if [ "$rc" = 1 ] && grep -q 'out of vocabulary' "$tmp/bad.err" &&
    ! grep -q 'did not complete within' "$tmp/bad.err"; then
    echo "ok   a prompt past the vocabulary: exit 1 with the engine's error"
else
    fail "a prompt past the vocabulary: exit $rc (want 1)"
    grep -v ' I ' "$tmp/bad.err" | grep -v '^ *$' | tail -4
fi

# --chat: the chat template's special tokens need the full vocabulary (a duet-mkmodel tiny
# checkpoint); the pause between the lines outlasts the collectives' deadline
if "$mk" --preset tiny --tokenizer "$tokdir" --out "$tmp/m" >/dev/null 2>&1; then
    t0=$SECONDS
    { echo "1 2 3"; sleep 7; echo "a b c"; } |
        DUET_COMM_TIMEOUT=4 timeout 120 mpirun --oversubscribe -np 4 "$run" --model "$tmp/m" \
            -tp 2 -dp 2 --enable-expert-parallel --chat --max-tokens 6 --ignore-eos \
            --temperature 0 "${extra[@]}" >"$tmp/chat" 2>"$tmp/chat.err"
    rc=$?
    echo "     chat: exit $rc after $((SECONDS - t0)) s"
    turns=$(grep -c 'prompt tokens, 6 generated' "$tmp/chat.err")
    if [ "$rc" = 0 ] && [ "$turns" = 2 ] && ! grep -q 'did not complete within' "$tmp/chat.err"; then
        echo "ok   --chat with a pause longer than the deadline: 2 turns, exit 0"
    else
        fail "--chat: exit $rc, $turns turns (want 0, 2)"
        grep -v ' I ' "$tmp/chat.err" | grep -v '^ *$' | tail -4
    fi
else
    fail "duet-mkmodel --preset tiny"
fi
[ "$fails" -eq 0 ] || exit 1
echo "all ok"
