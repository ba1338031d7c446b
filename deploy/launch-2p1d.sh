#!/usr/bin/env bash
# A disaggregated deployment on this host, through deploy/launch: writes the description of NP
# prefill instances, one decode instance of DP data-parallel ranks and duet-proxy on --port (all
# on 127.0.0.1), then runs the launcher, which starts each instance as its own mpirun job, waits
# until all are healthy and keeps running until Ctrl-C or SIGTERM, which stops everything. The
# default is the 2P1D layout: two prefill instances, one decode instance with DP2.
#
#   deploy/launch-2p1d.sh --model DIR [--tokenizer DIR] [--port 8000] [--prefills 2]
#                         [--decode-dp 2] [--prefill-tp 1] [--decode-tp 1] [--backend cpu|cuda]
#                         [--load-format auto|dummy] [--demo] [--dry-run] [-- extra worker flags]
#
# Ports: proxy P, prefill i on P+100+10*i, decode DP rank r on P+200+r, KV side channels on the
# prefill ports + 1000. --demo sends one chat request through the proxy once everything is up;
# --dry-run prints the commands. The description and the logs go to .demo/logs/ (DUET_LOG_DIR).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

model="" tokenizer="" port=8000 prefills=2 decode_dp=2 prefill_tp=1 decode_tp=1
backend=cpu load_format=auto demo=0 dry=() extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --model) model=$2; shift 2 ;;
    --tokenizer) tokenizer=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --prefills) prefills=$2; shift 2 ;;
    --decode-dp) decode_dp=$2; shift 2 ;;
    --prefill-tp) prefill_tp=$2; shift 2 ;;
    --decode-tp) decode_tp=$2; shift 2 ;;
    --backend) backend=$2; shift 2 ;;
    --load-format) load_format=$2; shift 2 ;;
    --demo) demo=1; shift ;;
    --dry-run) dry=(--dry-run); shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "launch-2p1d.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -n "$model" ] || { echo "launch-2p1d.sh: --model DIR is required" >&2; exit 2; }
[ -n "$tokenizer" ] || tokenizer=$model
model=$(cd "$model" && pwd) tokenizer=$(cd "$tokenizer" && pwd)

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 NCCL_NVLS_ENABLE=0
# One shared secret authenticates the KV side channel between these workers.
export DUET_KV_SECRET=${DUET_KV_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
logdir=${DUET_LOG_DIR:-$here/.demo/logs}
mkdir -p "$logdir"

json_str() { # a JSON string literal
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}
args="\"--load-format\", $(json_str "$load_format")"
for a in "${extra[@]}"; do args="$args, $(json_str "$a")"; done
instances=""
for i in $(seq 0 $((prefills - 1))); do
    instances="$instances{\"name\": \"prefill$i\", \"role\": \"prefill\", \"hosts\": [\"localhost\"],
      \"tp\": $prefill_tp, \"port\": $((port + 100 + 10 * i))},
    "
done
gpus=$((prefills * prefill_tp + decode_dp * decode_tp))
desc=$logdir/2p1d.json
cat >"$desc" <<EOF
// written by deploy/launch-2p1d.sh
{
  "model": $(json_str "$model"),
  "tokenizer": $(json_str "$tokenizer"),
  "served_model_name": "duet",
  "backend": $(json_str "$backend"),
  "worker_args": [$args],
  "hosts": [{"name": "localhost", "address": "127.0.0.1", "listen": "127.0.0.1", "gpus": $gpus}],
  "instances": [
    $instances{"name": "decode", "role": "decode", "hosts": ["localhost"],
      "dp": $decode_dp, "tp": $decode_tp, "port": $((port + 200))}
  ],
  "proxy": {"listen": "127.0.0.1", "port": $port}
}
EOF
if [ ${#dry[@]} -gt 0 ] || [ "$demo" = 0 ]; then
    exec "$here/deploy/launch" "${dry[@]}" --log-dir "$logdir" "$desc"
fi

# --demo: run the launcher, and once it is ready, one request through the proxy
rm -f "$logdir/launch.out"
"$here/deploy/launch" --log-dir "$logdir" "$desc" > >(tee "$logdir/launch.out") &
launcher=$!
# whatever ends this script stops the deployment (the launcher takes a doubled signal as one)
trap 'kill -TERM $launcher 2>/dev/null; wait $launcher 2>/dev/null' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
until grep -q 'duet-launch: ready' "$logdir/launch.out" 2>/dev/null; do
    kill -0 $launcher 2>/dev/null || exit 1
    sleep 0.5
done
echo "duet is up: OpenAI API at http://127.0.0.1:$port/v1 (model \"duet\"); logs in $logdir"
echo "demo request through the proxy (prefill -> KV over UCX -> decode):"
curl -sS "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model":"duet","messages":[{"role":"user","content":"Say hello in three languages."}],"max_tokens":32,"temperature":0.7,"seed":1}' || true
echo
echo "Ctrl-C stops everything."
wait $launcher
