#!/usr/bin/env bash
# The Kubernetes manifests, offline:
#   k8s_check.sh render OVERLAY_DIR   kubectl kustomize renders the overlay (Debian 12's kubectl,
#                                     package kubernetes-client, or a newer one) and
#                                     k8s_validate.mjs checks the result against the Kubernetes
#                                     OpenAPI schemas and its cross references;
#   k8s_check.sh broken               the validator refuses a broken rendering (k8s-broken.yaml)
#                                     with each of its problems named;
#   k8s_check.sh entrypoint           the instance pods' entry point builds the expected mpirun
#                                     command for a decode instance over two pods.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ ! -d "$here/../node/node_modules/kubernetes-models" ]; then
    echo "tests/node/node_modules is missing: run 'npm ci' in tests/node (tests/run.sh does): skipped"
    exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
case "$1" in
render)
    command -v kubectl >/dev/null || { echo "FAIL: kubectl is missing (deploy/install-deps.sh installs kubernetes-client)"; exit 1; }
    kubectl kustomize "$2" >"$tmp/out.yaml" 2>"$tmp/err" || { cat "$tmp/err"; echo "FAIL: kubectl kustomize $2"; exit 1; }
    grep -v "^# Warning: '.*' is deprecated" "$tmp/err" || true # newer kustomize nags about v2 spellings
    node "$here/k8s_validate.mjs" "$tmp/out.yaml"
    ;;
broken)
    rc=0
    node "$here/k8s_validate.mjs" "$here/k8s-broken.yaml" >"$tmp/out" || rc=$?
    cat "$tmp/out"
    [ "$rc" = 1 ] || { echo "FAIL: the validator accepted k8s-broken.yaml"; exit 1; }
    for want in 'StatefulSet/duet-decode: schema: data/spec/replicas must be integer' \
        'Service/duet-orphan: selects no pods' \
        'lists 1 of duet-decode' \
        'endpoint duet-decode-3.duet-decode:8200: duet-decode has' \
        'endpoint duet-prefill-0.duet-prefill:8100 is not a pod of a rendered StatefulSet' \
        'readinessProbe names port metrics' \
        'volume models: no claim duet-models' \
        'PodDisruptionBudget/duet-decode: selects no pods'; do
        grep -qF -- "$want" "$tmp/out" || { echo "FAIL: not reported: $want"; exit 1; }
    done
    echo "ok: every problem of k8s-broken.yaml reported"
    ;;
entrypoint)
    HOSTNAME=duet-decode-0 DUET_PODS=2 DUET_DP=16 DUET_TP=1 DUET_EP=1 DUET_PORT=8200 \
        DUET_ROLE=decode DUET_NIC=eth0 DUET_ENTRYPOINT_PRINT=1 DUET_API_KEY='' \
        bash "$root/deploy/k8s/base/entrypoint.sh" --max-num-seqs 28 >"$tmp/decode"
    HOSTNAME=duet-prefill-0 DUET_PODS=1 DUET_DP=2 DUET_TP=4 DUET_PORT=8100 DUET_ROLE=prefill \
        DUET_ENTRYPOINT_PRINT=1 DUET_API_KEY=k bash "$root/deploy/k8s/base/entrypoint.sh" >"$tmp/prefill"
    cat "$tmp/decode" "$tmp/prefill" >"$tmp/both"
    diff -u "$here/expected/k8s-entrypoint.txt" "$tmp/both" || { echo "FAIL: the commands differ"; exit 1; }
    rc=0
    HOSTNAME=duet-x-0 DUET_PODS=3 DUET_DP=4 DUET_PORT=1 DUET_ROLE=decode DUET_ENTRYPOINT_PRINT=1 \
        bash "$root/deploy/k8s/base/entrypoint.sh" 2>"$tmp/err" || rc=$?
    if [ "$rc" != 2 ] || ! grep -q 'do not split' "$tmp/err"; then
        echo "FAIL: 4 ranks over 3 pods accepted"
        exit 1
    fi
    echo "ok: entry point commands as expected"
    ;;
esac
