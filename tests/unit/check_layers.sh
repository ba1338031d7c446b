#!/usr/bin/env bash
# The layering check (tools/check-layers.sh) on the real tree passes, and on copies of it with
# one planted defect each fails naming it: an upward include, two modules including each other,
# a .c file in the root of runtime/, an include of a file that does not exist.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
check="$src/tools/check-layers.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

bash "$check" "$src"

plant() { # name, then a command run inside a fresh copy; the check must fail with the pattern
    local name=$1 pattern=$2
    shift 2
    rm -rf "$tmp/t"
    mkdir -p "$tmp/t"
    cp -r "$src/runtime" "$src/transport" "$src/prefill" "$src/decode" "$src/proxy" "$tmp/t/"
    (cd "$tmp/t" && "$@")
    if out=$(bash "$check" "$tmp/t" 2>&1); then
        echo "FAIL: $name: the check passed"
        exit 1
    fi
    if ! grep -q -- "$pattern" <<<"$out"; then
        echo "FAIL: $name: expected '$pattern' in: $out"
        exit 1
    fi
    echo "ok: $name: $(head -1 <<<"$out")"
}

plant "upward include" 'runtime/base/log.c: includes "engine/engine.h" from runtime/engine, which runtime/base may not use' \
    sed -i '0,/#include "base\/log.h"/s//#include "base\/log.h"\n#include "engine\/engine.h"/' runtime/base/log.c
plant "proxy uses the engine" 'proxy/px_body.c: includes "engine/engine.h"' \
    sed -i '0,/#include "/s//#include "engine\/engine.h"\n#include "/' proxy/px_body.c
plant "modules in a circle" 'modules include each other in a circle' \
    sed -i '0,/#include "/s//#include "model\/collectives.h"\n#include "/' runtime/model/shard.c
plant "a .c in runtime/" 'a .c file in the root of runtime/' \
    cp runtime/base/log.c runtime/stray.c
plant "a missing header" 'includes "base/nope.h", which is no file of the tree' \
    sed -i '0,/#include "/s//#include "base\/nope.h"\n#include "/' runtime/net/http.c
echo "check_layers: all planted defects caught"
