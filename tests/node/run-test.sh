#!/usr/bin/env bash
# Runs one node integration test file (meson's integration suite). The OpenAI client comes from
# `npm ci` in this folder (tests/run.sh does it); without it the test is skipped, not failed.
# Usage: run-test.sh FILE.test.mjs [args...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if ! command -v node >/dev/null 2>&1; then
    echo "node is not installed (deploy/install-deps.sh installs it): skipped"
    exit 77
fi
if [ ! -d "$here/node_modules/openai" ]; then
    echo "tests/node/node_modules is missing: run 'npm ci' in tests/node (tests/run.sh does): skipped"
    exit 77
fi
exec node --test-reporter=spec "$here/$1" "${@:2}"
