#!/usr/bin/env bash
# Runs a planted-bug program and passes only when its sanitizer reported the bug: the program
# must exit non-zero and its output must match every PATTERN (extended regexes). A sanitizer job
# whose flags, runtime options or suppressions stop catching the bug fails here.
# Usage: expect.sh PATTERN... -- COMMAND [ARGS...]
set -uo pipefail
patterns=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    patterns+=("$1")
    shift
done
[ $# -gt 1 ] || { echo "usage: expect.sh PATTERN... -- COMMAND [ARGS...]" >&2; exit 2; }
shift
out=$("$@" 2>&1)
rc=$?
if [ "$rc" -eq 0 ]; then
    printf '%s\n' "$out" | tail -20
    echo "expect.sh: '$*' exited 0: the planted bug went unreported"
    exit 1
fi
for p in "${patterns[@]}"; do
    if ! printf '%s\n' "$out" | grep -Eq "$p"; then
        printf '%s\n' "$out" | tail -40
        echo "expect.sh: '$*' failed (exit $rc) without a report matching /$p/"
        exit 1
    fi
    echo "expect.sh: /$p/ reported: $(printf '%s\n' "$out" | grep -Em1 "$p")"
done
