#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: install dependencies, build, check
# formatting, install the OpenAI node client for the tests, run every meson test suite (unit,
# golden, integration, fuzz corpora).
# Usage: tests/run.sh [meson test args...]   (CI calls it through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh
bash tools/build.sh
bash tools/format.sh --check
# The integration tests drive the servers with the official OpenAI client (tests/node).
(cd tests/node && npm ci --no-audit --no-fund)
# Integration tests start several ranks per instance on a 2-core machine.
export OMPI_MCA_rmaps_base_oversubscribe=1
# GPU tests (suite gpu) need a CUDA device; CI has none: run them with `meson test --suite gpu`
# on a GPU machine (deploy/bundle-offline.sh packs them for one).
meson test -C build --print-errorlogs --num-processes "${DUET_TEST_JOBS:-2}" --no-suite gpu "$@"
