#!/usr/bin/env bash
# The memory plan with MTP against a real instance: duet-decode on the CPU (a duet-mkmodel --mtp
# model, dummy weights, a fixed --kv-cache-memory) allocates as many KV blocks, each holding the
# MTP module's layer too, as `duet-check plan` with the same flags and --speculative-config says;
# without MTP the plan says more blocks (so the comparison can tell the two apart). duet-check plan
# reads --speculative-config with the workers' parser: their messages, exit 2; a checkpoint
# without an MTP layer is refused the same way.
# Usage: mtp_plan_cli.sh PATH_TO_duet-decode PATH_TO_duet-check PATH_TO_duet-mkmodel TOKENIZER_DIR
set -u
dec="$1"
check="$2"
mk="$3"
tokdir="$4"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/duet-mtpplan-XXXXXX")"
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
fails=0
ok() { echo "ok   $*"; }
bad() {
    echo "FAIL $*"
    fails=$((fails + 1))
}

"$mk" --preset tiny --config-only --mtp --tokenizer "$tokdir" --out "$tmp/mtp" >/dev/null 2>&1 &&
    "$mk" --preset tiny --config-only --tokenizer "$tokdir" --out "$tmp/plain" >/dev/null 2>&1 ||
    { echo "FAIL duet-mkmodel"; exit 1; }
spec='{"method": "deepseek_mtp", "num_speculative_tokens": 1}'
limits=(--kv-cache-memory 10M --block-size 16 --max-model-len 256)

# the instance: its start-up line "KV cache: N blocks = ..."
"$dec" --model "$tmp/mtp" --load-format dummy --port 0 "${limits[@]}" \
    --speculative-config "$spec" >"$tmp/dec.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
    grep -q "KV cache: " "$tmp/dec.log" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
pid=
got="$(sed -n 's/.*KV cache: \([0-9][0-9]*\) blocks = .*/\1/p' "$tmp/dec.log" | head -1)"
if [ -z "$got" ]; then
    bad "duet-decode with MTP logged no KV cache line:"
    cat "$tmp/dec.log"
    exit 1
fi

# the plans (float32: the CPU backend's activations, weights and cache)
plan_blocks() {
    "$check" plan "$tmp/mtp" --gpu-memory 1T --dtype float32 "${limits[@]}" "$@" >"$tmp/plan" \
        2>"$tmp/plan.err" || { cat "$tmp/plan" "$tmp/plan.err"; return 1; }
    sed -n 's/.*fits: KV cache: \([0-9][0-9]*\) blocks = .*/\1/p' "$tmp/plan"
}
without="$(plan_blocks)" || bad "duet-check plan without MTP failed"
with="$(plan_blocks --speculative-config "$spec")" || bad "duet-check plan with MTP failed"
if [ "$with" = "$got" ]; then
    ok "duet-decode with MTP allocated $got KV blocks, as the plan says"
else
    bad "duet-decode with MTP allocated $got KV blocks, the plan says '$with'"
fi
if [ -n "$without" ] && [ "$without" -gt "$got" ]; then
    ok "without MTP the plan has $without blocks (one layer fewer in each)"
else
    bad "without MTP the plan has '$without' blocks, not more than $got"
fi
if grep -q "MTP module " "$tmp/plan" && grep -q "5 layers with the MTP module's" "$tmp/plan"; then
    ok "the plan shows the MTP module and its KV layer"
else
    bad "no MTP lines in the plan: $(cat "$tmp/plan")"
fi

# the workers' parser: its messages, exit 2
expect_bad() {
    local pat="$1"
    shift
    "$check" plan "$@" --gpu-memory 80G >"$tmp/out" 2>"$tmp/err"
    local rc=$?
    if [ "$rc" -eq 2 ] && grep -q -- "$pat" "$tmp/err"; then
        ok "$(head -1 "$tmp/err")"
    else
        bad "duet-check plan $*: exit $rc, stderr: $(cat "$tmp/err")"
    fi
}
expect_bad 'num_speculative_tokens must be an integer in 0..3' "$tmp/mtp" \
    --speculative-config '{"method": "mtp", "num_speculative_tokens": 4}'
expect_bad 'speculative decoding for DeepSeek is MTP' "$tmp/mtp" \
    --speculative-config '{"method": "eagle", "num_speculative_tokens": 1}'
expect_bad 'expected a JSON object' "$tmp/mtp" --speculative-config 'k=1'
expect_bad 'num_nextn_predict_layers is 0' "$tmp/plain" --speculative-config "$spec"
[ "$fails" -eq 0 ] || exit 1
echo "all ok"
