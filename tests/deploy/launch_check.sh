#!/usr/bin/env bash
# deploy/launch's checks, one description per test:
#   launch_check.sh LAUNCH MODEL_CONFIG expect DESC.json EXPECTED.txt
#       --dry-run prints exactly EXPECTED.txt (the commands of an example deployment);
#   launch_check.sh LAUNCH MODEL_CONFIG refuse DESC.json
#       the launcher refuses DESC.json with one error line holding the text after "// expect: "
#       on its first line, and exit status 2 (1 for a run-time refusal, marked "// run:").
#       "// run:" runs it for real with no secret in the environment; "// no-model-config:"
#       leaves out --model-config. Nothing may have been started: no log folder appears.
set -euo pipefail
launch=$1 config=$2 mode=$3 desc=$4
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ "$mode" = expect ]; then
    "$launch" --dry-run --model-config "$config" "$desc" >"$tmp/out" 2>"$tmp/err" || {
        echo "FAIL: the launcher refused $desc:"; cat "$tmp/err"; exit 1; }
    if ! diff -u "$5" "$tmp/out"; then
        echo "FAIL: the commands differ from $5 (above: expected, then printed)"
        exit 1
    fi
    [ ! -s "$tmp/err" ] || { echo "FAIL: unexpected output on stderr:"; cat "$tmp/err"; exit 1; }
    echo "ok: $(grep -c '^# ' "$tmp/out") commands as expected"
    exit 0
fi
want=$(sed -n '1s|^// expect: ||p' "$desc")
[ -n "$want" ] || { echo "FAIL: $desc has no '// expect: ' first line"; exit 1; }
args=(--dry-run --model-config "$config")
status=2
grep -q '^// no-model-config:' "$desc" && args=(--dry-run)
if grep -q '^// run:' "$desc"; then
    args=(--model-config "$config" --log-dir "$tmp/logs" --ready-timeout 5)
    status=1
fi
rc=0
env -u DUET_KV_SECRET -u DUET_API_KEY "$launch" "${args[@]}" "$desc" >"$tmp/out" 2>"$tmp/err" || rc=$?
cat "$tmp/err"
[ "$rc" = "$status" ] || { echo "FAIL: exit status $rc, not $status"; exit 1; }
[ "$(wc -l <"$tmp/err")" = 1 ] || { echo "FAIL: not one error line"; exit 1; }
grep -qF -- "$want" "$tmp/err" || { echo "FAIL: the error does not say: $want"; exit 1; }
[ ! -s "$tmp/out" ] || { echo "FAIL: something on stdout"; cat "$tmp/out"; exit 1; }
[ ! -e "$tmp/logs" ] || { echo "FAIL: it started something (a log folder appeared)"; exit 1; }
echo "ok: refused as expected"
