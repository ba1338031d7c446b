#!/usr/bin/env bash
# The layering check: every #include "..." of a C/CUDA source must point to its own folder or to
# a folder below it, and the modules of one folder must not include each other in a circle.
# The order is written once, here (docs/architecture.md draws the same):
#
#   runtime/base                       (nothing)
#   runtime/net        base
#   runtime/openai     base net
#   runtime/text       base
#   runtime/dist       base
#   runtime/model      base dist
#   runtime/engine     base dist model text
#   runtime/server     base net openai text dist model engine
#   transport          runtime
#   prefill, decode    runtime transport
#   proxy              runtime/base runtime/net runtime/openai
#   tools, tests       anything
#
# Usage: tools/check-layers.sh [ROOT]   (default: the repository). Exit 1 with one line per
# violation.
set -euo pipefail
root=${1:-"$(cd "$(dirname "$0")/.." && pwd)"}
cd "$root"

declare -A allowed=(
    [runtime/base]=""
    [runtime/net]="runtime/base"
    [runtime/openai]="runtime/base runtime/net"
    [runtime/text]="runtime/base"
    [runtime/dist]="runtime/base"
    [runtime/model]="runtime/base runtime/dist"
    [runtime/engine]="runtime/base runtime/dist runtime/model runtime/text"
    [runtime/server]="runtime/base runtime/net runtime/openai runtime/text runtime/dist runtime/model runtime/engine"
    [transport]="runtime/base runtime/net runtime/openai runtime/text runtime/dist runtime/model runtime/engine runtime/server"
    [prefill]="runtime/base runtime/net runtime/openai runtime/text runtime/dist runtime/model runtime/engine runtime/server transport"
    [decode]="runtime/base runtime/net runtime/openai runtime/text runtime/dist runtime/model runtime/engine runtime/server transport"
    [proxy]="runtime/base runtime/net runtime/openai"
)

# The layer a path belongs to (into the variable named by $2): runtime/<folder> for runtime,
# else its top folder. No subshells: this runs for every include.
layer_of() {
    local p=$1 rest
    case "$p" in
    runtime/*) rest=${p#runtime/}; printf -v "$2" '%s' "runtime/${rest%%/*}" ;;
    *) printf -v "$2" '%s' "${p%%/*}" ;;
    esac
}

bad=0
fail() {
    echo "check-layers: $*"
    bad=1
}

if compgen -G "runtime/*.c" >/dev/null; then
    for f in runtime/*.c; do fail "$f: a .c file in the root of runtime/ (it belongs to a layer)"; done
fi

edges=$(mktemp)
trap 'rm -f "$edges"' EXIT

mapfile -t files < <(find runtime transport prefill decode proxy -type f \
    \( -name '*.c' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null | sort)
# every quoted include of every file, one awk pass: "file<TAB>header"
while IFS=$'\t' read -r f inc; do
    layer_of "$f" from
    [ -n "${allowed[$from]+x}" ] || continue # tools, tests: anything
    dir=${f%/*}
    # resolve like the compiler: beside the file, then runtime/ (layer-qualified names), then
    # the program folders whose headers are on the include path
    if [ -f "$dir/$inc" ]; then
        target="$dir/$inc"
    elif [ -f "runtime/$inc" ]; then
        target="runtime/$inc"
    elif [ -f "transport/$inc" ]; then
        target="transport/$inc"
    elif [[ "$inc" == *.pb-c.h ]]; then
        target="transport/$inc" # generated from transport/*.proto
    else
        fail "$f: includes \"$inc\", which is no file of the tree"
        continue
    fi
    layer_of "$target" to
    if [ "$to" = "$from" ]; then
        # same folder: record module -> module for the circle check
        a=${f##*/}; a=${a%%.*}; a=${a%-impl}
        b=${target##*/}; b=${b%%.*}; b=${b%-impl}
        [ "$a" = "$b" ] || echo "${f%/*}/$a ${target%/*}/$b" >>"$edges"
        continue
    fi
    case " ${allowed[$from]} " in
    *" $to "*) ;;
    *) fail "$f: includes \"$inc\" from $to, which $from may not use" ;;
    esac
done < <(awk 'match($0, /^[ \t]*#[ \t]*include[ \t]*"[^"]*"/) {
                  s = substr($0, RSTART, RLENGTH); sub(/^[^"]*"/, "", s); sub(/"$/, "", s)
                  print FILENAME "\t" s }' "${files[@]}")

# modules of one folder that include each other, directly or around a circle
if [ -s "$edges" ]; then
    if ! out=$(sort -u "$edges" | tsort 2>&1 >/dev/null); then
        fail "modules include each other in a circle: $(echo "$out" | grep -v 'input contains a loop' | sed 's/^tsort: //' | tr '\n' ' ')"
    fi
fi

if [ $bad -ne 0 ]; then exit 1; fi
echo "check-layers: every include points down"
