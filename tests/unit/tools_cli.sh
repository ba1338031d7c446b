#!/usr/bin/env bash
# The tools' command lines, parsed by base/opt.h: --help is the option table's (stdout, exit 0);
# a typo gets one stderr line suggesting the flag, a bad value one line naming it, both exit 2.
# Usage: tools_cli.sh DUET_CHECK DUET_KVBENCH DUET_PROXY_BENCH
set -u
check="$1" kvbench="$2" bench="$3"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/duet-toolscli-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
fails=0

# expect_help "usage line start" program args...
expect_help() {
    local want="$1"
    shift
    "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$?
    if [ "$rc" -eq 0 ] && head -1 "$tmp/out" | grep -qF "$want" && grep -q -- "--help" "$tmp/out" &&
        [ ! -s "$tmp/err" ]; then
        echo "ok   help: $want"
    else
        echo "FAIL help of $*: exit $rc"
        cat "$tmp/out" "$tmp/err"
        fails=$((fails + 1))
    fi
}

# expect_bad "text the line must hold" program args...: exit 2, exactly that one stderr line
expect_bad() {
    local want="$1"
    shift
    "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$? lines
    lines=$(wc -l <"$tmp/err")
    if [ "$rc" -eq 2 ] && [ "$lines" -eq 1 ] && grep -qF -- "$want" "$tmp/err"; then
        echo "ok   $(cat "$tmp/err")"
    else
        echo "FAIL $* (wanted '$want'): exit $rc, $lines stderr lines:"
        cat "$tmp/err"
        fails=$((fails + 1))
    fi
}

expect_help "usage: duet-check {golden,tokenizer,chat,plan}" "$check" --help
expect_help "usage: duet-check golden [options] CASE_DIR" "$check" golden --help
expect_help "usage: duet-check tokenizer TOKENIZER_DIR CASES_JSON VARIANT" "$check" tokenizer -h
expect_help "usage: duet-check chat TOKENIZER_DIR CASES_JSON" "$check" chat --help
expect_bad "a subcommand is required" "$check"
expect_bad "unknown subcommand 'gold'" "$check" gold
expect_bad "unknown option --tl (did you mean --tol?)" "$check" golden --tl 1 dir
expect_bad "--tol: expected a number in [0, 10], got 'x'" "$check" golden --tol=x dir
expect_bad "expected TOKENIZER_DIR CASES_JSON VARIANT" "$check" tokenizer a b
expect_bad "unexpected argument 'c'" "$check" chat a b c

# duet-check plan on DeepSeek's published configs: exit 0 with the plan when it fits, exit 1 with
# the plan on stdout and one stderr line naming what does not fit, exit 2 on bad input
data="$(cd "$(dirname "$0")/../data" && pwd)"
expect_help "usage: duet-check plan --model DIR --gpu-memory SIZE" "$check" plan --help
expect_bad "--gpu-memory is required" "$check" plan --model "$data/deepseek-v3"
expect_bad "--model DIR is required" "$check" plan --gpu-memory 80G
expect_bad "--gpu-memory-utilization must be a fraction of the device's memory in (0, 1], got 0" \
    "$check" plan "$data/deepseek-v3" --gpu-memory 80G --gpu-memory-utilization 0
expect_bad "num_attention_heads (128) is not divisible by --tensor-parallel-size (6)" \
    "$check" plan "$data/deepseek-v3" --gpu-memory 80G -tp 6
expect_bad "--weights: expected one of auto, bf16, fp8, float32, got 'int4'" \
    "$check" plan "$data/deepseek-v3" --gpu-memory 80G --weights int4
"$check" plan "$data/deepseek-v3" --gpu-memory 80G -dp 8 --enable-expert-parallel --weights fp8 \
    >"$tmp/out" 2>"$tmp/err"
rc=$?
want="deepseek-v3 on 8 GPUs of 80.0 GiB with DP8+EP8: 95.1 GiB of weights per rank exceed 72.0 GiB"
if [ "$rc" -eq 1 ] && [ "$(wc -l <"$tmp/err")" -eq 1 ] && grep -qF "$want" "$tmp/err" &&
    grep -q "^  does not fit: " "$tmp/out"; then
    echo "ok   $(cat "$tmp/err")"
else
    echo "FAIL plan of DeepSeek-V3 on 8 H100s: exit $rc"
    cat "$tmp/out" "$tmp/err"
    fails=$((fails + 1))
fi
if "$check" plan --model "$data/deepseek-v3" -dp 8 -ep --gpu-memory 143771M --weights fp8 \
    >"$tmp/out" 2>"$tmp/err" && grep -q "^  fits: KV cache: " "$tmp/out" && [ ! -s "$tmp/err" ]; then
    echo "ok   plan: DeepSeek-V3 fits 8 H200s with DP8+EP8 and fp8 weights"
else
    echo "FAIL plan of DeepSeek-V3 on 8 H200s"
    cat "$tmp/out" "$tmp/err"
    fails=$((fails + 1))
fi

expect_help "usage: duet-kvbench" "$kvbench" --help
expect_bad "unknown option --tokns (did you mean --tokens?)" "$kvbench" --tokns 5
expect_bad "--tokens: expected prompt lengths" "$kvbench" --tokens 1024,0
expect_bad "--backend: expected one of cpu, cuda, got 'gpu'" "$kvbench" --backend gpu
expect_bad "--layers needs a value" "$kvbench" --layers

expect_help "usage: duet-proxy-bench --url" "$bench" --help
expect_bad "--url is required" "$bench"
expect_bad "unknown option --concurency (did you mean --concurrency?)" "$bench" --concurency 3
expect_bad "--url: expected http://HOST:PORT/PATH, got 'ftp://h:1'" "$bench" --url ftp://h:1
expect_bad "--requests: expected an integer in [1, " "$bench" --url http://h:1 --requests=0

echo "$fails failed"
[ "$fails" -eq 0 ]
