#!/usr/bin/env bash
# Installs every Debian package duet needs to build, test and run (Debian 12 / bookworm).
# clang with its sanitizer and libFuzzer runtimes (libclang-rt-14-dev) and llvm-symbolizer
# (llvm-14) serve CI's sanitizer and fuzzing jobs (tests/sanitize/run.sh).
# Used by both README commands and by CI; safe to run again (apt-get skips what is present).
set -euo pipefail

pkgs=(
    build-essential meson ninja-build pkg-config clang-format valgrind
    libuv1-dev libcjson-dev libhttp-parser-dev libpcre2-dev libopenblas-dev
    libprotobuf-c-dev protobuf-c-compiler libssl-dev
    libucx-dev ucx-utils libopenmpi-dev openmpi-bin
    curl procps psmisc iproute2 openssl
    clang libclang-rt-14-dev llvm-14
    prometheus nginx-light wrk
    gnuplot-nox
)

# Node.js runs the tests' real OpenAI client; a machine may already carry its own build of it.
command -v npm >/dev/null 2>&1 || pkgs+=(nodejs npm)
# kubectl renders the Kubernetes overlays (kubectl kustomize) in the tests: Debian 12 ships it as
# kubernetes-client; a machine with another kubectl package keeps it (both own /usr/bin/kubectl).
command -v kubectl >/dev/null 2>&1 || pkgs+=(kubernetes-client)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all ${#pkgs[@]} packages present"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: installed ${missing[*]}"
