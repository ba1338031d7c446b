#!/usr/bin/env bash
# Test hosts as network namespaces (root, as in CI): "up" makes PREFIX-sw holding a bridge and,
# for each NAME, a namespace PREFIX-NAME joined to it by a veth pair whose inner end is duet0
# with the address 198.18.0.N/24 (RFC 2544's benchmarking range; N counts from 1 in argument
# order). The addresses exist only inside these namespaces: nothing is routed out of them and
# the machine's own namespace gets no address or link. "down" kills every process left in
# them and deletes them; "kill" SIGKILLs every process of one (a host lost).
#   hosts.sh up PREFIX NAME...     hosts.sh down PREFIX     hosts.sh kill PREFIX-NAME
#   hosts.sh addr N                (prints 198.18.0.N)
set -euo pipefail

addr() { echo "198.18.0.$1"; }

ns_of_prefix() { ip netns list | awk '{print $1}' | grep -E "^$1-" || true; }

kill_ns() { # SIGKILL until none is left (a dying process may fork no more, but wait for it)
    for _ in $(seq 50); do
        pids=$(ip netns pids "$1" 2>/dev/null || true)
        [ -z "$pids" ] && return 0
        # shellcheck disable=SC2086 # a list of pids
        kill -9 $pids 2>/dev/null || true
        sleep 0.1
    done
    echo "hosts.sh: processes left in $1: $(ip netns pids "$1" | tr '\n' ' ')" >&2
}

case "${1:-}" in
up)
    prefix=$2
    shift 2
    [ ${#prefix} -le 9 ] || { echo "hosts.sh: PREFIX must be short (interface names)" >&2; exit 2; }
    ip netns add "$prefix-sw"
    ip -n "$prefix-sw" link set lo up
    ip -n "$prefix-sw" link add br0 type bridge
    ip -n "$prefix-sw" link set br0 up
    n=1
    for h in "$@"; do
        ns=$prefix-$h
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # both ends are created inside the namespaces: nothing appears in the caller's
        ip -n "$prefix-sw" link add "p$n" type veth peer name duet0 netns "$ns"
        ip -n "$prefix-sw" link set "p$n" master br0
        ip -n "$prefix-sw" link set "p$n" up
        ip -n "$ns" addr add "$(addr $n)/24" dev duet0
        ip -n "$ns" link set duet0 up
        n=$((n + 1))
    done
    ;;
down)
    for ns in $(ns_of_prefix "$2"); do kill_ns "$ns"; done
    for ns in $(ns_of_prefix "$2"); do ip netns del "$ns" || true; done
    ;;
kill)
    kill_ns "$2"
    ;;
addr)
    addr "$2"
    ;;
*)
    echo "usage: hosts.sh up PREFIX NAME... | down PREFIX | kill NAMESPACE | addr N" >&2
    exit 2
    ;;
esac
