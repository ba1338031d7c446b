#!/usr/bin/env bash
# The 2P1D layout of the seed commands, scaled down to three test hosts (network namespaces a,
# b, c joined by a bridge; tests/netns/hosts.sh) and started by deploy/launch from one
# description, which this script writes: prefill p0 TP2 on a, prefill p1 DP2 over a and b,
# decode DP4 + EP over b and c, the launcher, mpirun and duet-proxy on a fourth host, head.
# MPI (TCP), UCX (KV, TCP on duet0) and HTTP all cross the veths. tests/node/netns.test.mjs
# then checks golden ids through the proxy, the loss of host a, and a clean stop. Every
# namespace is removed at the end, also on failure, a signal or meson's timeout.
# Environment (meson sets it): DUET_LAUNCH, DUET_GOLDEN, DUET_DECODE.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" != 0 ]; then
    echo "network namespaces need root (CI runs as root): skipped"
    exit 77
fi
if [ ! -d "$here/../node/node_modules/openai" ]; then
    echo "tests/node/node_modules is missing: run 'npm ci' in tests/node (tests/run.sh does): skipped"
    exit 77
fi
prefix=dn$$
work=$(mktemp -d /tmp/duet-netns.XXXXXX)
cleanup() {
    rc=$?
    trap - EXIT INT TERM HUP
    bash "$here/hosts.sh" down "$prefix"
    if [ "$rc" != 0 ] && [ -d "$work/logs" ]; then
        for f in "$work"/logs/*.log; do
            echo "--- last lines of $f"
            tail -n 25 "$f"
        done
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

bash "$here/hosts.sh" up "$prefix" head a b c
G=$DUET_GOLDEN
cat >"$work/desc.json" <<JSON
{
  "model": "$G/tiny-v3/model",
  "tokenizer": "$G/tokenizer",
  "served_model_name": "tiny",
  "network": {"nic": "duet0"},
  // the hosts share one kernel: UCX's shared-memory transports would take KV past the veths
  "env": {"UCX_TLS": "tcp", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
          "OMP_WAIT_POLICY": "passive"},
  "worker_args": ["--kv-cache-memory", "32M", "--block-size", "16", "--kv-lease-timeout", "5"],
  "hosts": [
    {"name": "$prefix-a", "address": "198.18.0.2", "gpus": 4},
    {"name": "$prefix-b", "address": "198.18.0.3", "gpus": 4},
    {"name": "$prefix-c", "address": "198.18.0.4", "gpus": 4}
  ],
  "instances": [
    {"name": "p0", "role": "prefill", "hosts": ["$prefix-a"], "tp": 2, "port": 8100},
    {"name": "p1", "role": "prefill", "hosts": ["$prefix-a", "$prefix-b"], "dp": 2, "port": 8110},
    {"name": "decode", "role": "decode", "hosts": ["$prefix-b", "$prefix-c"], "dp": 4, "ep": true,
     "port": 8200}
  ],
  "proxy": {"port": 8000, "listen": "198.18.0.1",
            "args": ["--health-interval", "0.2", "--eject-after", "2", "--readmit-after", "2"]}
}
JSON
mkdir -p "$work/tmp"
# mpirun reaches the namespaces through netns-exec (as it would reach hosts through ssh), also
# under duet-mpi-agent; each namespace has its own TMPDIR
export DUET_NETNS_TMP=$work/tmp TMPDIR=$work/tmp
export OMPI_MCA_plm_rsh_agent=$here/netns-exec DUET_MPI_REMOTE=$here/netns-exec
export DUET_MPI_AGENT_GRACE=5 DUET_KV_SECRET=netns-test-secret
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export DUET_NETNS_PREFIX=$prefix DUET_NETNS_DESC=$work/desc.json DUET_NETNS_LOGS=$work/logs
export DUET_NETNS_HOSTS=$here/hosts.sh
ip netns exec "$prefix-head" node --test-reporter=spec "$here/../node/netns.test.mjs"
