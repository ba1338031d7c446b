#!/usr/bin/env bash
# Soak with faults: N requests through 2P1D (two prefill instances, a DP2 decode instance, KV
# over UCX) behind duet-proxy on 127.0.0.1, with client disconnects and aborts, a prefill and the
# decode instance SIGKILLed and restarted, a prefill SIGSTOPped and resumed; then every survivor
# up, every untouched request answered well, every KV pool free, RSS near its warm value.
# Prints one summary line; exit 0 when it holds. See tools/soak.mjs for the checks.
# Usage: tools/soak.sh [BUILD_DIR] [--requests N] [--concurrency C] [--time-limit S] [--n-refused-ok]
#                      [--rss-bound PCT] [--seed S] [--verbose]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
    build=$(cd "$1" && pwd)
    shift
fi
for b in prefill/duet-prefill decode/duet-decode proxy/duet-proxy; do
    [ -x "$build/$b" ] || { echo "soak: $build/$b is missing (build first)" >&2; exit 2; }
done
export DUET_PREFILL="$build/prefill/duet-prefill" DUET_DECODE="$build/decode/duet-decode"
export DUET_PROXY="$build/proxy/duet-proxy"
export DUET_GOLDEN="${DUET_GOLDEN:-$root/../shared/golden}"
export DUET_MPIRUN="${DUET_MPIRUN:-mpirun}"
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=passive
# The whole run stops by itself: the request phase has its own --time-limit, this is the backstop.
exec timeout --kill-after=30 "${SOAK_TIMEOUT:-1800}" node "$root/tools/soak.mjs" "$@"
