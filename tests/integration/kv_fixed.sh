#!/usr/bin/env bash
# --kv-cache-memory is held to what the memory can give (CPU backend: the host's available
# memory) before the cache is allocated:
# - duet-decode and duet-prefill asked for 10T: exit 1 at start-up, before any allocation,
#   with exactly one error line naming the flag, the size asked and what the host has; the
#   same for --num-gpu-blocks-override (the line names that flag and the bytes of its blocks);
# - the same under mpirun (DP2: two ranks on this host): one error line for the instance, every
#   rank ending, exit nonzero within the time limit;
# - a size that fits (64M): the worker starts, answers /health and a completion, stops on
#   SIGTERM with exit 0.
# Usage: kv_fixed.sh PATH_TO_duet-decode PATH_TO_duet-prefill GOLDEN_DIR
set -u
decode="$1"
prefill="$2"
golden="$3"
model="$golden/tiny-v3/model"
tokdir="$golden/tokenizer"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/duet-kvfixed-XXXXXX")"
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"' EXIT
export DUET_COMM_TIMEOUT=20
fails=0
fail() {
    echo "FAIL $*"
    fails=$((fails + 1))
}
common=(--model "$model" --tokenizer "$tokdir" --host 127.0.0.1 --port 0)

# too_big NAME CMD...: the command must end with the one-line refusal of 10T (or of what
# $want names)
want='--kv-cache-memory 10240.0 GiB does not fit: '
too_big() {
    local name="$1"
    shift
    timeout 60 "$@" >"$tmp/$name.out" 2>&1 </dev/null
    local rc=$?
    local lines
    lines=$(grep -c ' E ' "$tmp/$name.out")
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$lines" = 1 ] &&
        grep ' E ' "$tmp/$name.out" | grep -q -- "$want" &&
        grep ' E ' "$tmp/$name.out" | grep -q 'the host has [0-9.]* [GM]iB available' &&
        ! grep -q 'cannot allocate' "$tmp/$name.out"; then
        echo "ok   $name: exit $rc, $(grep ' E ' "$tmp/$name.out" | sed 's/.* E //')"
    else
        fail "$name: exit $rc, $lines error lines (want nonzero and 1)"
        grep -v ' I ' "$tmp/$name.out" | tail -5
    fi
}
too_big decode-10T "$decode" "${common[@]}" --kv-cache-memory 10T
too_big prefill-10T "$prefill" "${common[@]}" --kv-cache-memory 10T
too_big decode-dp2-10T mpirun --oversubscribe -np 2 "$decode" "${common[@]}" -dp 2 \
    --kv-cache-memory 10T
if grep ' E ' "$tmp/decode-dp2-10T.out" | grep -q 'the 2 ranks on the host need 20480.0 GiB'; then
    echo "ok   decode-dp2-10T: both ranks' caches counted"
else
    fail "decode-dp2-10T: the line does not count both ranks"
fi
# the same check for a size asked in blocks (vLLM's flag): the line names it and its bytes
want='--num-gpu-blocks-override 1073741823 ([0-9.]* [GT]iB) does not fit: '
too_big decode-blocks "$decode" "${common[@]}" --num-gpu-blocks-override 1073741823
want='--num-gpu-blocks-override 40000000 ([0-9.]* [GT]iB) does not fit: the 2 ranks on the host'
too_big decode-dp2-blocks mpirun --oversubscribe -np 2 "$decode" "${common[@]}" -dp 2 \
    --num-gpu-blocks-override 40000000

# a size that fits: the worker starts and serves
"$decode" "${common[@]}" --kv-cache-memory 64M >"$tmp/fits.out" 2>&1 </dev/null &
pid=$!
port=
for _ in $(seq 1 600); do
    port=$(sed -n 's/.* serving .* on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$tmp/fits.out")
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$port" ]; then
    fail "64M: the worker did not start"
    grep -v ' I ' "$tmp/fits.out" | tail -5
else
    health=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")
    answer=$(curl -s "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
        -d '{"prompt": [1, 2, 3, 4], "max_tokens": 4, "temperature": 0, "ignore_eos": true}')
    if [ "$health" = 200 ] && grep -q '"completion_tokens":4' <<<"$answer" &&
        grep -q 'KV cache: [0-9]* blocks' "$tmp/fits.out"; then
        echo "ok   64M: started on port $port, healthy, answered"
    else
        fail "64M: /health $health, answer ${answer:0:200}"
    fi
fi
if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    rc=0
    wait "$pid" || rc=$?
    pid=
    [ "$rc" = 0 ] || fail "64M: exit $rc after SIGTERM (want 0)"
fi
[ "$fails" -eq 0 ] || exit 1
echo "all ok"
