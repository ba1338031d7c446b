#!/usr/bin/env bash
# --kv-cache-dtype on the workers: a value duet does not store (fp8_e5m2, bf16) exits 2 with one
# line naming the choices, on duet-decode and duet-prefill alike; a CPU duet-decode with fp8 and
# a fixed --kv-cache-memory allocates the blocks `duet-check plan --kv-cache-dtype fp8 --backend
# cpu` says, four times the float32 cache's (one byte a value instead of four); the cuda plan
# counts the CUDA backend's decoded layer (fewer blocks). MTP over an fp8 cache (the module's
# layer is one more layer of each block): duet-run's greedy output with 2 drafts a step equals
# its output without.
# Usage: kv_dtype_cli.sh PATH_TO_duet-decode PATH_TO_duet-prefill PATH_TO_duet-check
#        PATH_TO_duet-mkmodel TOKENIZER_DIR PATH_TO_duet-run
set -u
dec="$1"
pre="$2"
check="$3"
mk="$4"
tokdir="$5"
run="$6"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/duet-kvdtype-XXXXXX")"
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

"$mk" --preset tiny --config-only --tokenizer "$tokdir" --out "$tmp/m" >/dev/null 2>&1 ||
    { echo "FAIL duet-mkmodel"; exit 1; }
limits=(--kv-cache-memory 10M --block-size 16 --max-model-len 256)

for prog in "$dec" "$pre"; do
    for v in fp8_e5m2 bf16 ""; do
        timeout 60 "$prog" --model "$tmp/m" --kv-cache-dtype "$v" >"$tmp/out" 2>"$tmp/err"
        rc=$?
        if [ "$rc" -eq 2 ] && grep -q "kv-cache-dtype: expected auto, fp8 or fp8_e4m3, got '$v'" \
            "$tmp/err"; then
            ok "$(basename "$prog") --kv-cache-dtype '$v': exit 2, $(head -1 "$tmp/err")"
        else
            bad "$(basename "$prog") --kv-cache-dtype '$v': exit $rc, stderr: $(cat "$tmp/err")"
        fi
    done
done

# blocks of a CPU duet-decode's cache: its start-up line "KV cache: N blocks = ..."
dec_blocks() {
    "$dec" --model "$tmp/m" --load-format dummy --port 0 "${limits[@]}" "$@" >"$tmp/dec.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do
        grep -q "KV cache: " "$tmp/dec.log" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    pid=
    sed -n 's/.*KV cache: \([0-9][0-9]*\) blocks = .*/\1/p' "$tmp/dec.log" | head -1
}
plan_blocks() {
    "$check" plan "$tmp/m" --gpu-memory 1T --dtype float32 "${limits[@]}" "$@" >"$tmp/plan" \
        2>"$tmp/plan.err" || { cat "$tmp/plan" "$tmp/plan.err" >&2; return 1; }
    sed -n 's/.*fits: KV cache: \([0-9][0-9]*\) blocks = .*/\1/p' "$tmp/plan"
}
f32="$(dec_blocks)"
[ -n "$f32" ] || { bad "duet-decode logged no KV cache line: $(cat "$tmp/dec.log")"; exit 1; }
fp8="$(dec_blocks --kv-cache-dtype fp8)"
[ -n "$fp8" ] || { bad "duet-decode fp8 logged no KV cache line: $(cat "$tmp/dec.log")"; exit 1; }
plan="$(plan_blocks --kv-cache-dtype fp8 --backend cpu)" ||
    bad "duet-check plan --kv-cache-dtype fp8 --backend cpu failed"
# the CUDA backend's decoded layer (one layer in the activation type) is counted: fewer blocks
cuda="$(plan_blocks --kv-cache-dtype fp8)" || bad "duet-check plan --kv-cache-dtype fp8 failed"
if [ -n "$cuda" ] && [ -n "$plan" ] && [ "$cuda" -lt "$plan" ]; then
    ok "the cuda plan counts the decoded layer: $cuda blocks, the cpu plan $plan"
else
    bad "the cuda plan has '$cuda' blocks, the cpu plan '$plan' (want fewer)"
fi
if [ "$fp8" = "$plan" ]; then
    ok "duet-decode --kv-cache-dtype fp8 allocated $fp8 KV blocks, as the plan says"
else
    bad "duet-decode --kv-cache-dtype fp8 allocated $fp8 KV blocks, the plan says '$plan'"
fi
# the padding block comes out of the same budget: 4 * (f32 + 1) - 1 blocks
if [ "$fp8" -ge $((4 * f32)) ] && [ "$fp8" -le $((4 * f32 + 3)) ]; then
    ok "fp8: $fp8 blocks in the budget where float32 has $f32"
else
    bad "fp8: $fp8 blocks in the budget where float32 has $f32 (want about 4x)"
fi
"$mk" --preset tiny --mtp --tokenizer "$tokdir" --out "$tmp/mtp" >/dev/null 2>&1 ||
    { echo "FAIL duet-mkmodel --mtp"; exit 1; }
for k in 0 2; do
    timeout 120 "$run" --model "$tmp/mtp" --prompt "The quick brown fox jumps over the lazy dog" \
        --max-tokens 40 --ignore-eos --temperature 0 --num-speculative-tokens "$k" \
        --kv-cache-dtype fp8 >"$tmp/mtp$k" 2>"$tmp/mtp$k.err" ||
        bad "duet-run --kv-cache-dtype fp8 --num-speculative-tokens $k: $(tail -3 "$tmp/mtp$k.err")"
done
if [ -s "$tmp/mtp0" ] && cmp -s "$tmp/mtp0" "$tmp/mtp2"; then
    ok "fp8 KV with MTP (2 drafts a step): the same greedy output as without"
else
    bad "fp8 KV with MTP differs: '$(head -c 200 "$tmp/mtp0")' vs '$(head -c 200 "$tmp/mtp2")'"
fi
[ "$fails" -eq 0 ] || exit 1
echo "all ok"
