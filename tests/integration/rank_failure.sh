#!/usr/bin/env bash
# A rank that dies or hangs must end the whole instance quickly, with a line saying which rank
# and what, instead of leaving the others stuck in a collective.
#   1. kill -9 one rank of a TP2 instance: mpirun ends nonzero and names the rank;
#   2. SIGSTOP one rank: the other's collective times out (DUET_COMM_TIMEOUT=3), it logs the
#      rank, the group and the wait, and the instance ends nonzero.
# Usage: rank_failure.sh DUET_CHECK GOLDEN_CASE_DIR [GOLDEN_OPTIONS...] (e.g. --backend cuda)
set -u
check=$1
case_dir=$2
shift 2
extra=("$@")
tmp=$(mktemp -d)
trap 'pkill -9 -f "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
fail() { echo "FAIL: $*"; echo "--- log:"; cat "$tmp/log" 2>/dev/null | tail -20; exit 1; }

# The rank's pid: the duet-check process whose environment says OMPI_COMM_WORLD_RANK=$1.
rank_pid() {
    for p in $(pgrep -f "duet-check golden.*$tmp"); do
        if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$1"; then
            echo "$p"
            return
        fi
    done
}

start() {
    # the case dir is reached through a link inside $tmp so pgrep can tell our ranks apart
    ln -sfn "$case_dir" "$tmp/case"
    DUET_COMM_TIMEOUT=${1:-60} mpirun --oversubscribe -np 2 "$check" golden -tp 2 --repeat 100000 \
        "${extra[@]}" "$tmp/case" >"$tmp/log" 2>&1 &
    mpirun_pid=$!
    # past MPI's start-up (which has no deadline to test): rank 0 has loaded the model and
    # begins the cases
    for _ in $(seq 600); do
        grep -q "golden: .* cases" "$tmp/log" 2>/dev/null && [ -n "$(rank_pid 1)" ] &&
            sleep 0.5 && return 0
        sleep 0.1
    done
    fail "instance did not start within 60 s"
}

wait_exit() { # seconds
    for _ in $(seq $(($1 * 10))); do
        kill -0 "$mpirun_pid" 2>/dev/null || { wait "$mpirun_pid"; return $?; }
        sleep 0.1
    done
    fail "instance still running $1 s after the fault"
}

# 1. a rank killed
start
kill -9 "$(rank_pid 1)"
wait_exit 20
rc=$?
[ "$rc" -ne 0 ] || fail "exit status 0 after a rank was killed"
grep -qi "rank 1" "$tmp/log" || fail "no line names rank 1"
[ -z "$(rank_pid 0)" ] || fail "rank 0 still alive"
echo "killed rank: instance ended with status $rc"

# 2. a rank hung
start 3
kill -STOP "$(rank_pid 1)"
wait_exit 30
rc=$?
[ "$rc" -ne 0 ] || fail "exit status 0 after a rank hung"
grep -q "rank 0: .* did not complete within 3 s" "$tmp/log" || fail "no timeout line from rank 0"
echo "hung rank: instance ended with status $rc"
grep "did not complete" "$tmp/log" | head -1
exit 0
