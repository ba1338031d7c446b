#!/bin/bash
# Entry point of every duet instance pod (a StatefulSet of DUET_PODS pods, its headless Service
# of the same name). Every pod of a multi-pod instance runs sshd for mpirun; pod 0 waits for the
# others and runs the instance's one mpirun job over all of them, one app context per pod, each
# with --port rebased so that every pod's DP ranks serve DUET_PORT, DUET_PORT+1, ... (its probes
# and the proxy's endpoint list are the same on every pod), and prefill ranks advertise their
# pod's stable DNS name for the KV side channel. Worker flags beyond the layout are the args.
# DUET_ENTRYPOINT_PRINT=1 prints pod 0's command, one word per line, and starts nothing.
set -euo pipefail
name=${HOSTNAME%-*} # the StatefulSet, and its headless Service
idx=${HOSTNAME##*-}
pods=${DUET_PODS:-1} dp=${DUET_DP:-1} tp=${DUET_TP:-1}
ranks=$((dp * tp))
per=$((ranks / pods))
if [ $((per * pods)) -ne "$ranks" ] || [ $((per % tp)) -ne 0 ]; then
    echo "entrypoint: dp $dp x tp $tp ranks do not split into whole TP groups over $pods pods" >&2
    exit 2
fi

env_args=(-x DUET_KV_SECRET -x NCCL_NVLS_ENABLE)
[ -n "${DUET_API_KEY:-}" ] && env_args+=(-x DUET_API_KEY)
mca=()
if [ -n "${DUET_NIC:-}" ]; then
    env_args+=(-x "NCCL_SOCKET_IFNAME=$DUET_NIC" -x "UCX_NET_DEVICES=${DUET_RDMA:-$DUET_NIC}")
    mca=(--mca btl_tcp_if_include "$DUET_NIC" --mca oob_tcp_if_include "$DUET_NIC")
fi
[ -n "${DUET_RDMA:-}" ] && env_args+=(-x "NCCL_IB_HCA=$DUET_RDMA")
ssh_opts="-p 2222 -i /etc/duet-ssh/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
cmd=(mpirun --allow-run-as-root --mca plm_rsh_agent "ssh $ssh_opts" "${mca[@]}")
for k in $(seq 0 $((pods - 1))); do
    [ "$k" = 0 ] || cmd+=(:)
    first_dp=$((k * per / tp))
    cmd+=(-np "$per" --host "$name-$k.$name:$per" "${env_args[@]}"
        "/opt/duet/bin/duet-$DUET_ROLE" --model "${DUET_MODEL:-/models/model}"
        --served-model-name "${DUET_SERVED_MODEL_NAME:-duet}" --backend cuda
        --data-parallel-size "$dp" --tensor-parallel-size "$tp"
        --host 0.0.0.0 --port $((DUET_PORT - first_dp)))
    [ "${DUET_EP:-0}" = 1 ] && cmd+=(--enable-expert-parallel)
    [ "$DUET_ROLE" = prefill ] && cmd+=(--kv-host "$name-$k.$name")
    cmd+=("$@")
done
if [ "${DUET_ENTRYPOINT_PRINT:-0}" = 1 ]; then
    printf '%s\n' "${cmd[@]}"
    exit 0
fi

if [ "$pods" -gt 1 ]; then
    mkdir -p /run/sshd /root/.ssh
    install -m 600 /etc/duet-ssh/id.pub /root/.ssh/authorized_keys
    ssh-keygen -A >/dev/null
    /usr/sbin/sshd -p 2222 -e
    if [ "$idx" != 0 ]; then
        # pod 0's mpirun starts this pod's ranks over ssh; stay up as long as sshd does
        exec tail --pid="$(cat /run/sshd.pid)" -f /dev/null
    fi
    for k in $(seq 1 $((pods - 1))); do
        until (exec 3<>"/dev/tcp/$name-$k.$name/2222") 2>/dev/null; do sleep 2; done
    done
fi
echo "entrypoint: ${cmd[*]}" >&2
exec "${cmd[@]}"
