#!/usr/bin/env bash
# Offline bundle for a GPU host with no network and none of duet's Debian libraries (seen:
# Ubuntu 24.04, CUDA 13 driver, Open MPI 4.1.6, UCX 1.16, NCCL and cuBLAS from PyTorch's pip
# wheels): builds duet here with CUDA into build-bundle/, then packs into OUT (default
# .bundle/, git-ignored) the stripped programs and GPU tests, the .debs of the runtime
# libraries such a host may lack, golden data when asked, and run.sh, which unpacks the .debs
# the host really lacks (dpkg -x into a prefix, once), points LD_LIBRARY_PATH at them and at
# the pip NCCL/cuBLAS, and runs a command:   bash OUT/run.sh duet-check golden ...
# Usage: deploy/bundle-offline.sh [--out DIR] [--golden CASE_DIR]...
# MPI stays a dynamic dependency: the host's Open MPI 4.1.x (libmpi.so.40) is used there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.bundle
golden=()
while [ $# -gt 0 ]; do
    case "$1" in
    --out) out=$2; shift 2 ;;
    --golden) golden+=("$2"); shift 2 ;;
    *) echo "usage: $0 [--out DIR] [--golden CASE_DIR]..." >&2; exit 2 ;;
    esac
done

# 1. the build: optimized (as CI builds it), CUDA required
if [ ! -f build-bundle/build.ninja ]; then
    meson setup build-bundle -Dcuda=enabled --buildtype=debugoptimized
fi
ninja -C build-bundle -j"${DUET_BUILD_JOBS:-2}"

rm -rf "$out"
mkdir -p "$out/bin" "$out/debs" "$out/golden"
progs=(tools/duet-check tools/duet-run tests/gpu/test_backend_ops tests/gpu/test_sample
       tests/gpu/bench_sample tests/gpu/gpu_guard tests/gpu/bench_mla tests/gpu/bench_moe
       prefill/duet-prefill decode/duet-decode proxy/duet-proxy tools/duet-kvbench tools/duet-bench
       tests/gpu/bench_step tests/gpu/memplan_check tests/gpu/bench_fp8
       tests/gpu/test_dummy_device tests/unit/test_graph_shape tools/fp8-lt-probe)
for p in "${progs[@]}"; do
    install -m 755 "build-bundle/$p" "$out/bin/"
    strip --strip-unneeded "$out/bin/$(basename "$p")"
done
install -m 755 tests/gpu/device_check.sh tests/gpu/pd_check.sh tests/gpu/pd_golden.py \
    tests/gpu/ncu_summary.py tests/gpu/mtp_check.sh tests/integration/rank_failure.sh \
    tools/bench-sweep.sh deploy/launch-2p1d.sh "$out/"
# the GPU benchmark and its model: DeepSeek-V2-Lite's config.json (weights: --load-format
# dummy) with the DeepSeek-V3 tokenizer of the goldens (its ids cover V2-Lite's vocabulary)
install -m 755 tools/bench-gpu.sh "$out/"
tok=()
[ -d ../shared/golden/tokenizer ] && tok=(--tokenizer ../shared/golden/tokenizer)
build-bundle/tools/duet-mkmodel --preset v2-lite --config-only --out "$out/models/v2-lite" \
    "${tok[@]}" >/dev/null
# the KV transfer benchmark (tools/bench-kv-gpu.sh): DeepSeek-V3's 61 layers and attention,
# 4 routed experts (all picked: half of V3's 8 per token) so that a prefill and a decode instance
# (bf16 weights, 50.7 GiB each) share one GPU
install -m 755 tools/bench-kv-gpu.sh "$out/"
build-bundle/tools/duet-mkmodel --preset v3 --config-only --layers 61 --experts 4 \
    --experts-per-tok 4 --n-group 1 --topk-group 1 --out "$out/models/v3-kv" "${tok[@]}" >/dev/null
# DeepSeek-V3 cut to 12 layers (3 dense + 9 MoE), FP8: the FP8-resident load on one GPU
build-bundle/tools/duet-mkmodel --preset v3 --layers 12 --first-dense 3 --config-only \
    --out "$out/models/v3-12l" "${tok[@]}" >/dev/null
# MTP (tests/gpu/mtp_check.sh): a tiny model and a V3-shaped one, each with an MTP layer
build-bundle/tools/duet-mkmodel --preset tiny --mtp --config-only --out "$out/models/tiny-mtp" \
    "${tok[@]}" >/dev/null
build-bundle/tools/duet-mkmodel --preset v3 --mtp --config-only --out "$out/models/v3-mtp" \
    "${tok[@]}" >/dev/null
# the sweep's report names the commit it measured; there is no git checkout on that host
git rev-parse --short HEAD >"$out/COMMIT"

# 2. runtime libraries: what the programs link, less what the host must provide itself (libc,
# the compiler runtimes, Open MPI and its stack, CUDA), plus the libraries of duet's servers
debs=(libuv1 libcjson1 libprotobuf-c1 libhttp-parser2.9 libssl3)
host_owned='^(libc6|libstdc\+\+6|libgcc-s1|libgomp1|zlib1g|libopenmpi3.*|libhwloc.*|libevent-.*|libudev1|libucx0|libzstd1|liblzma5)$'
for lib in $(ldd "$out"/bin/* 2>/dev/null | awk '/=> \//{print $3}' | sort -u); do
    pkg=$(dpkg -S "$(readlink -f "$lib")" 2>/dev/null | head -1 | cut -d: -f1) || true
    [ -n "$pkg" ] || continue # CUDA libraries: not packages here, pip's there
    [[ "$pkg" =~ $host_owned ]] && continue
    debs+=("$pkg")
done
# libopenblas0-pthread needs libgfortran5, which needs libquadmath0
debs+=(libgfortran5 libquadmath0)
mapfile -t debs < <(printf '%s\n' "${debs[@]}" | sort -u)
(cd "$out/debs" && apt-get download "${debs[@]}" 2>&1 | grep -v unsandboxed || true)
[ "$(ls "$out"/debs/*.deb | wc -l)" -eq "${#debs[@]}" ] || { echo "apt-get download failed" >&2; exit 1; }
# manifest: each .deb with the sonames of its libraries; run.sh skips a .deb whose sonames the
# host already has (a newer system copy must not be shadowed by Debian 12's older one)
tmpx=$(mktemp -d)
for f in "$out"/debs/*.deb; do
    rm -rf "$tmpx"/*
    dpkg -x "$f" "$tmpx"
    sos=$(find "$tmpx" -type f -name '*.so*' -exec objdump -p {} \; 2>/dev/null |
        awk '/SONAME/{print $2}' | sort -u | tr '\n' ' ')
    echo "$(basename "$f") $sos" >>"$out/debs/manifest"
done
rm -rf "$tmpx"

# 3. golden data for the GPU checks
for g in "${golden[@]}"; do
    cp -r "$g" "$out/golden/$(basename "$g")"
    chmod -R u+w "$out/golden/$(basename "$g")"
done

# 4. the wrapper
cat >"$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs a command with this bundle's programs and libraries (see deploy/bundle-offline.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prefix=${DUET_BUNDLE_PREFIX:-/tmp/duet-bundle-prefix}
# the marker names this bundle's package list: another bundle unpacked into the same prefix
# (a different set of .debs) does not count as this one's
mark=$prefix/.unpacked-$(cksum <"$here/debs/manifest" | cut -d' ' -f1)
if [ ! -f "$mark" ]; then
    mkdir -p "$prefix"
    have=$(ldconfig -p)
    while read -r deb sos; do
        missing=0
        for so in $sos; do grep -q "/$so\$" <<<"$have" || missing=1; done
        if [ "$missing" = 1 ]; then
            dpkg -x "$here/debs/$deb" "$prefix"
            echo "run.sh: unpacked $deb" >&2
        fi
    done <"$here/debs/manifest"
    touch "$mark"
fi
lib=$prefix/usr/lib/x86_64-linux-gnu
libs=$lib:$lib/openblas-pthread:$prefix/lib/x86_64-linux-gnu
# NCCL and cuBLAS: PyTorch's pip wheels, else the CUDA toolkit's
site=$(python3 -c "import nvidia,os;print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null || true)
for d in "$site"/nvidia/nccl/lib "$site"/nvidia/cublas/lib "$site"/nvidia/cu13/lib \
         /usr/local/cuda/lib64; do
    [ -d "$d" ] && libs=$libs:$d
done
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$here/bin:$PATH
export DUET_BUNDLE=$here
# NVLink multicast can take the host's shared GPUs down: off unless asked for
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec "$@"
RUN
chmod 755 "$out/run.sh"
du -sh "$out"
echo "bundle: $out (bash $out/run.sh CMD [ARGS...])"
