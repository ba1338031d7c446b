#!/usr/bin/env bash
# --speculative-config at start-up: an unknown method, num_speculative_tokens out of range
# (exit status 2, one line naming the problem), and a checkpoint without an MTP layer (one
# error line, non-zero exit, before any weight loads).
# Usage: spec_cli.sh PATH_TO_duet-decode PATH_TO_duet-mkmodel TOKENIZER_DIR
set -u
dec="$1"
mk="$2"
tokdir="$3"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/duet-speccli-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
fails=0

# expect "what" status pattern args...: the exit status and a stderr line matching pattern
expect() {
    local what="$1" want="$2" pat="$3"
    shift 3
    timeout 60 "$dec" "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$?
    if [ "$rc" -ne "$want" ] || ! grep -q -- "$pat" "$tmp/err"; then
        echo "FAIL $what: exit $rc (want $want), stderr:"
        cat "$tmp/err"
        fails=$((fails + 1))
    else
        echo "ok   $what: $(grep -- "$pat" "$tmp/err" | head -1)"
    fi
}

"$mk" --preset tiny --config-only --tokenizer "$tokdir" --out "$tmp/plain" >/dev/null 2>&1 ||
    { echo "FAIL duet-mkmodel"; exit 1; }
M="$tmp/plain"
expect "unknown method" 2 'speculative decoding for DeepSeek is MTP' --model "$M" \
    --speculative-config '{"method": "eagle", "num_speculative_tokens": 1}'
expect "k = 4" 2 'num_speculative_tokens must be an integer in 0..3' --model "$M" \
    --speculative-config '{"method": "deepseek_mtp", "num_speculative_tokens": 4}'
expect "k = -1" 2 'num_speculative_tokens must be an integer in 0..3' --model "$M" \
    --speculative-config '{"method": "mtp", "num_speculative_tokens": -1}'
expect "no method" 2 'method is required' --model "$M" \
    --speculative-config '{"num_speculative_tokens": 1}'
expect "no MTP layer" 1 'has no MTP layer (num_nextn_predict_layers is 0)' --model "$M" \
    --load-format dummy --port 0 \
    --speculative-config '{"method": "deepseek_mtp", "num_speculative_tokens": 1}'
[ "$fails" -eq 0 ] || exit 1
echo "all ok"
