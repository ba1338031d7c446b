#!/usr/bin/env bash
# duet-mkmodel's command line: bad arguments give one line on stderr and exit status 2; a good
# one writes a loadable checkpoint and a one-line summary; an existing checkpoint needs --force.
# Usage: mkmodel_cli.sh PATH_TO_duet-mkmodel
set -u
mk="$1"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/duet-mkcli-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
fails=0

# expect_bad "what" args...: exit status 2 and exactly one line of stderr
expect_bad() {
    local what="$1"
    shift
    "$mk" "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$? lines
    lines=$(wc -l <"$tmp/err")
    if [ "$rc" -ne 2 ] || [ "$lines" -ne 1 ]; then
        echo "FAIL $what: exit $rc, $lines stderr lines:"
        cat "$tmp/err"
        fails=$((fails + 1))
    else
        echo "ok   $what: $(cat "$tmp/err")"
    fi
}

expect_bad "no arguments"
expect_bad "no --out" --preset tiny
expect_bad "no --preset" --out "$tmp/x"
expect_bad "unknown preset" --preset v4 --out "$tmp/x"
expect_bad "unknown option" --preset tiny --out "$tmp/x" --colour blue
expect_bad "missing value" --preset tiny --out
expect_bad "bad integer" --preset tiny --out "$tmp/x" --layers four
expect_bad "zero layers" --preset tiny --out "$tmp/x" --layers 0
expect_bad "negative shards" --preset tiny --out "$tmp/x" --shards=-2
expect_bad "bad dtype" --preset tiny --out "$tmp/x" --dtype fp4
expect_bad "bad seed" --preset tiny --out "$tmp/x" --seed -1
expect_bad "config refuses it" --preset v3 --out "$tmp/x" --experts 12
[ -e "$tmp/x" ] && { echo "FAIL: a refused command created $tmp/x"; fails=$((fails + 1)); }

if "$mk" --help | grep -q "usage: duet-mkmodel"; then echo "ok   --help"; else
    echo "FAIL --help"
    fails=$((fails + 1))
fi

# a good run: files, summary on stdout
if "$mk" --preset tiny --vocab-size 256 --layers 2 --shards 2 --seed 3 --out "$tmp/m" \
    >"$tmp/out" 2>"$tmp/err" &&
    [ -f "$tmp/m/config.json" ] && [ -f "$tmp/m/model.safetensors.index.json" ] &&
    [ -f "$tmp/m/model-00001-of-00002.safetensors" ] &&
    [ -f "$tmp/m/model-00002-of-00002.safetensors" ] &&
    grep -q "tiny checkpoint, 2 layers, bf16" "$tmp/out" &&
    grep -q '"vocab_size": 256' "$tmp/m/config.json"; then
    echo "ok   write: $(cat "$tmp/out")"
else
    echo "FAIL write:"
    cat "$tmp/out" "$tmp/err"
    fails=$((fails + 1))
fi

# writing over it needs --force, which also removes the old shards
"$mk" --preset tiny --vocab-size 256 --layers 2 --out "$tmp/m" >/dev/null 2>"$tmp/err"
rc=$?
if [ $rc -eq 1 ] && grep -q "already holds a checkpoint" "$tmp/err"; then echo "ok   no overwrite"; else
    echo "FAIL no overwrite: exit $rc"
    cat "$tmp/err"
    fails=$((fails + 1))
fi
if "$mk" --preset tiny --vocab-size 256 --layers 2 --dtype fp8 --mtp --force --out "$tmp/m" \
    >/dev/null 2>&1 && [ -f "$tmp/m/model.safetensors" ] &&
    [ ! -e "$tmp/m/model-00001-of-00002.safetensors" ] &&
    [ ! -e "$tmp/m/model.safetensors.index.json" ] &&
    grep -q '"quant_method": "fp8"' "$tmp/m/config.json" &&
    grep -q '"num_nextn_predict_layers": 1' "$tmp/m/config.json"; then
    echo "ok   --force"
else
    echo "FAIL --force"
    fails=$((fails + 1))
fi

echo "$fails failed"
[ "$fails" -eq 0 ]
