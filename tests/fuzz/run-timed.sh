#!/usr/bin/env bash
# The timed fuzzing job: every libFuzzer driver of a clang build runs SECONDS from its checked-in
# corpus (read only: new inputs go to a scratch directory), two at a time. First the planted
# driver (tests/sanitize/planted_fuzz.c) must be caught from an empty corpus, so a job that
# stopped reporting crashes fails. A crash, leak or timeout of a real driver fails the job and
# leaves the reproducer in the scratch directory named on the last lines.
# Usage: tests/fuzz/run-timed.sh BUILD_DIR [SECONDS] [JOBS]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "$1" && pwd)
secs=${2:-30}
jobs=${3:-2}
corpus="$root/tests/fuzz/corpus"
golden="$root/../shared/golden"
scratch=$(mktemp -d /tmp/duet-fuzz.XXXXXX)
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"

# The corpus directories of each driver (the jinja driver also reads the golden templates).
corpora() {
    case $1 in
    jinja) echo "$corpus/jinja $golden/chat-templates" ;;
    *) echo "$corpus/$1" ;;
    esac
}

planted="$build/tests/sanitize/planted_fuzz"
[ -x "$planted" ] || { echo "run-timed: $planted missing (a clang build with libFuzzer?)"; exit 1; }
mkdir -p "$scratch/planted"
if (cd "$scratch/planted" && "$planted" -max_total_time=60 -seed=1 \
    >"$scratch/planted.log" 2>&1); then
    tail -5 "$scratch/planted.log"
    echo "run-timed: libFuzzer did not catch the planted bug in 60 s"
    exit 1
fi
grep -q "ERROR: AddressSanitizer: heap-buffer-overflow" "$scratch/planted.log" || {
    tail -20 "$scratch/planted.log"
    echo "run-timed: the planted driver failed without ASan's report"
    exit 1
}
echo "run-timed: planted bug caught ($(grep -m1 -o 'stat::number_of_executed_units: [0-9]*' \
    "$scratch/planted.log" || echo 'found'))"

drivers=()
for f in "$build"/tests/fuzz/fuzz_*; do
    case $f in *_replay | *.p) continue ;; esac
    [ -f "$f" ] && [ -x "$f" ] && drivers+=("${f##*/}")
done
[ ${#drivers[@]} -gt 0 ] || { echo "run-timed: no libFuzzer drivers in $build"; exit 1; }
run_one() {
    local d=$1 name=${1#fuzz_}
    mkdir -p "$scratch/$name"
    # shellcheck disable=SC2046 # the corpus list is meant to split
    if (cd "$scratch/$name" && "$build/tests/fuzz/$d" -max_total_time="$secs" -timeout=20 \
        -rss_limit_mb=2048 -print_final_stats=1 "$scratch/$name" $(corpora "$name") \
        >"$scratch/$name.log" 2>&1); then
        echo "run-timed: $d: $(grep -o 'stat::number_of_executed_units: [0-9]*' "$scratch/$name.log" \
            | grep -o '[0-9]*$') runs in ${secs}s, clean"
    else
        tail -60 "$scratch/$name.log"
        echo "run-timed: $d FAILED; reproducer and log in $scratch/$name"
        return 1
    fi
}
export -f run_one corpora
export build secs scratch corpus golden
printf '%s\n' "${drivers[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one {}'
echo "run-timed: ${#drivers[@]} drivers, ${secs}s each, clean"
rm -rf "$scratch"
