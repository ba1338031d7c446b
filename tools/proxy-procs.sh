# Shell helpers for scripts that run duet-proxy and stub backends on localhost (sourced by
# tools/bench-proxy.sh and tests/proxy/node/run.sh): free ports, waiting for a listener, and
# processes started in the background that are stopped, by their ids, when the script exits.
PROCS_PIDS=()
PROCS_CLEANUP=()

procs_cleanup() {
    local p c
    for p in "${PROCS_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PROCS_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for c in "${PROCS_CLEANUP[@]}"; do eval "$c"; done
}
trap procs_cleanup EXIT

# Runs "$@" in the background; its pid is stopped at exit.
procs_start() {
    "$@" &
    PROCS_PIDS+=($!)
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    exit 1
}
