#!/usr/bin/env bash
# mpirun binds one or two ranks to a core each by default; duet's ranks then take every CPU
# they may use (and size OpenMP for them), unless mpirun was given a binding (--bind-to).
# Usage: mpi_binding.sh PATH_TO_affinity
set -u
prog="$1"
unset OMP_NUM_THREADS # what OpenMP would pick by itself is the point
all=$(nproc)
if [ "$all" -le 1 ]; then
    echo "one CPU here: nothing to unbind"
    exit 77
fi
fails=0
check() { # NAME EXPECTED_CPUS OUTPUT
    local name="$1" want="$2" out="$3"
    echo "$name: $(echo "$out" | grep '^rank' | tr '\n' ';')"
    local n
    n=$(echo "$out" | grep -c "^rank .* cpus $want omp $want\$")
    if [ "$n" -ne "$4" ]; then
        echo "FAIL $name: want $4 rank(s) with $want CPUs and $want OpenMP threads"
        echo "$out" | tail -5
        fails=$((fails + 1))
    fi
}
out=$(timeout 60 mpirun -np 1 "$prog" 2>&1)
check "mpirun -np 1" "$all" "$out" 1
echo "$out" | grep -q "mpirun bound rank 0 to CPU .* alone" ||
    { echo "FAIL mpirun -np 1: no line saying the binding was dropped"; fails=$((fails + 1)); }
out=$(timeout 60 mpirun --oversubscribe -np 2 "$prog" 2>&1)
check "mpirun -np 2" "$all" "$out" 2
out=$(timeout 60 mpirun --bind-to core -np 1 "$prog" 2>&1)
check "mpirun --bind-to core -np 1" 1 "$out" 1
out=$(timeout 60 mpirun --bind-to none -np 1 "$prog" 2>&1)
check "mpirun --bind-to none -np 1" "$all" "$out" 1
[ "$fails" -eq 0 ] && echo "mpi-binding: ok" || exit 1
