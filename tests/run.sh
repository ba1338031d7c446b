#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: install dependencies, build, check
# formatting, install the OpenAI node client for the tests, run every meson test suite (unit,
# golden, integration, fuzz corpora), then the hardening jobs: a release (-O3) build, clang
# ASan+UBSan over the unit, golden, fuzz, parallel, integration and proxy suites, every libFuzzer
# driver for 30 s, clang TSan over the engine, server, KV-transfer and proxy tests, and a short
# soak of 2P1D with faults (tests/sanitize/run.sh, tools/soak.sh). Each stage's time is printed
# at the end.
# Usage: tests/run.sh [meson test args...]   (CI calls it through .ci/run)
# DUET_STAGES picks stages (default: "gcc release asan fuzz tsan soak").
set -euo pipefail
cd "$(dirname "$0")/.."

stages=" ${DUET_STAGES:-gcc release asan fuzz tsan soak} "
declare -a timing=()
t_all=$(date +%s)
stage() { # NAME COMMAND...
    local name=$1 t0
    shift
    [[ $stages == *" $name "* ]] || return 0
    echo "==== stage $name"
    t0=$(date +%s)
    "$@"
    timing+=("$name $(($(date +%s) - t0))s")
}

bash deploy/install-deps.sh
# The integration tests drive the servers with the official OpenAI client (tests/node).
(cd tests/node && npm ci --no-audit --no-fund)
# Integration tests start several ranks per instance on a 2-core machine.
export OMPI_MCA_rmaps_base_oversubscribe=1

gcc_stage() {
    bash tools/build.sh
    bash tools/format.sh --check
    # GPU tests (suite gpu) need a CUDA device; CI has none: run them with `meson test --suite
    # gpu` on a GPU machine (deploy/bundle-offline.sh packs them for one).
    meson test -C build --print-errorlogs --num-processes "${DUET_TEST_JOBS:-2}" --no-suite gpu "$@"
}
stage gcc gcc_stage "$@"
stage release bash tests/sanitize/run.sh release
stage asan bash tests/sanitize/run.sh asan
stage fuzz bash tests/sanitize/run.sh fuzz 30
stage tsan bash tests/sanitize/run.sh tsan
# 2,000 requests with every fault kind, bounded at 200 s of requests (about a minute here).
stage soak bash tools/soak.sh build --requests 2000 --concurrency 12 --time-limit 200
echo "==== stage times: ${timing[*]}; total $(($(date +%s) - t_all))s"
