#!/usr/bin/env bash
# Measures duet-proxy's added latency and its highest request rate against a stub backend, next
# to nginx proxying the same stub, in one run. nginx relays one request per client request;
# duet-proxy makes two (prefill, then decode), so each is compared with its own direct baseline:
#   added latency = latency through the proxy - latency of the same backend requests made
#   directly (one request for nginx, the two legs back to back for duet-proxy, `--pd`).
# Usage: tools/bench-proxy.sh [--quick] [--out FILE]   (build first: tools/build.sh)
# Prints a Markdown table; --out also writes it to FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
B=build
STUB=$B/tests/proxy/stub_backend
PROXY=$B/proxy/duet-proxy
BENCH=$B/tools/duet-proxy-bench
LAT_N=3000      # requests one at a time, for latency
RATE_SECS=5     # seconds at high concurrency, for the rate
RATE_CONC=64
ROUNDS=3        # every measurement this many times, interleaved; medians reported
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) LAT_N=500; RATE_SECS=2; ROUNDS=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: $0 [--quick] [--out FILE]" >&2; exit 2 ;;
    esac
done
for f in "$STUB" "$PROXY" "$BENCH"; do
    [ -x "$f" ] || { echo "bench-proxy: $f missing: run tools/build.sh" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "bench-proxy: nginx not found (apt-get install nginx-light)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "bench-proxy: wrk not found (apt-get install wrk)" >&2; exit 1; }

# shellcheck source=tools/proxy-procs.sh
. tools/proxy-procs.sh
TMP=$(mktemp -d /tmp/bench-proxy.XXXXXX)
PROCS_CLEANUP+=("rm -rf '$TMP'")

STUB_PORT=$(free_port)
procs_start "$STUB" --port "$STUB_PORT" --role both --name bench >"$TMP/stub.log" 2>&1
wait_port "$STUB_PORT"

PX_PORT=$(free_port)
procs_start "$PROXY" --host 127.0.0.1 --port "$PX_PORT" --prefill "127.0.0.1:$STUB_PORT" \
    --decode "127.0.0.1:$STUB_PORT" >"$TMP/proxy.log" 2>&1
wait_port "$PX_PORT"

# nginx as an unprivileged process with a generated config: one worker (duet-proxy is one
# thread), keep-alive to the backend, no buffering (streams pass through as they come).
NG_PORT=$(free_port)
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    upstream stub { server 127.0.0.1:$STUB_PORT; keepalive 128; }
    server {
        listen 127.0.0.1:$NG_PORT;
        keepalive_requests 1000000;
        location / {
            proxy_pass http://stub;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
procs_start "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" \
    2>"$TMP/nginx/start.log"
wait_port "$NG_PORT"

# Latency: one request at a time, non-streaming, 16 tokens.
lat() { # url extra-flags... -> "p50 p99 rate errors"
    local url=$1
    shift
    "$BENCH" --url "$url" --requests "$LAT_N" --concurrency 1 --json "$@" |
        python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["latency_ms"]["p50"], j["latency_ms"]["p99"], j["rate"], j["errors"])'
}
# Rate: wrk, one thread, RATE_CONC connections, a fixed non-streaming POST.
cat >"$TMP/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"duet-stub","prompt":"abcdefgh abcdefgh abcdefgh abcdefgh","max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Request-Id"] = "wrk-bench"
EOF
rate() { # url -> "req/s non2xx"
    wrk -t1 -c"$RATE_CONC" -d"${RATE_SECS}s" -s "$TMP/post.lua" "$1" >"$TMP/wrk.txt" 2>&1
    local rps non
    rps=$(awk '/Requests\/sec/ {print $2}' "$TMP/wrk.txt")
    non=$(awk '/Non-2xx/ {print $5}' "$TMP/wrk.txt")
    echo "$rps ${non:-0}"
}

U_STUB="http://127.0.0.1:$STUB_PORT/v1/completions"
U_NG="http://127.0.0.1:$NG_PORT/v1/completions"
U_PX="http://127.0.0.1:$PX_PORT/v1/completions"
# Warm-up: connections, page faults.
"$BENCH" --url "$U_PX" --requests 200 --concurrency 8 >/dev/null
"$BENCH" --url "$U_NG" --requests 200 --concurrency 8 >/dev/null

# One line per round; the summary takes medians, so one noisy round on a shared machine does
# not decide the result.
for r in $(seq "$ROUNDS"); do
    echo "$(lat "$U_STUB") $(lat "$U_STUB" --pd) $(lat "$U_NG") $(lat "$U_PX") $(rate "$U_STUB") $(rate "$U_NG") $(rate "$U_PX")" >>"$TMP/rounds.txt"
    echo "bench-proxy: round $r of $ROUNDS done" >&2
done

REPORT=$(python3 - "$TMP/rounds.txt" "$LAT_N" "$RATE_SECS" "$RATE_CONC" "$(nproc)" <<'EOF'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
n, secs, conc, cpus = sys.argv[2:]
med = lambda i: statistics.median(r[i] for r in rows)
# Per round: 4 x (p50 p99 rate errors), then 3 x (req/s non2xx).
d1, d1q, d2, d2q = med(0), med(1), med(4), med(5)
ng, ngq, px, pxq = med(8), med(9), med(12), med(13)
rs, nr, pr = med(16), med(18), med(20)
errs = sum(r[i] for r in rows for i in (3, 7, 11, 15))
non = sum(r[i] for r in rows for i in (17, 19, 21))
add = lambda f: statistics.median(f(r) for r in rows)
ng_add, ng_add99 = add(lambda r: r[8] - r[0]), add(lambda r: r[9] - r[1])
px_add, px_add99 = add(lambda r: r[12] - r[4]), add(lambda r: r[13] - r[5])
spread = lambda f: f"{min(f(r) for r in rows):.3f}..{max(f(r) for r in rows):.3f}"
ratio = lambda x, y: f"{x / y:.2f}" if y > 0 and x > 0 else "n/a"
print("| path | p50 ms | p99 ms | added p50 ms | added p99 ms | max rate req/s |")
print("|---|---|---|---|---|---|")
print(f"| stub directly, 1 request | {d1:.3f} | {d1q:.3f} | - | - | {rs:.0f} |")
print(f"| stub directly, 2 legs (`--pd`) | {d2:.3f} | {d2q:.3f} | - | - | - |")
print(f"| nginx -> stub (1 upstream request) | {ng:.3f} | {ngq:.3f} | {ng_add:.3f} | {ng_add99:.3f} | {nr:.0f} |")
print(f"| duet-proxy -> stub (2 upstream requests) | {px:.3f} | {pxq:.3f} | {px_add:.3f} | {px_add99:.3f} | {pr:.0f} |")
print()
print(f"duet-proxy / nginx: added latency p50 {ratio(px_add, ng_add)}x, p99 {ratio(px_add99, ng_add99)}x; "
      f"max client request rate {ratio(pr, nr)}x (upstream requests/s {ratio(2 * pr, nr)}x).")
print(f"Medians of {len(rows)} rounds (added p50 per round: nginx {spread(lambda r: r[8] - r[0])} ms, "
      f"duet-proxy {spread(lambda r: r[12] - r[4])} ms). Latency: {n} non-streaming requests one at "
      f"a time (16 tokens); rate: wrk -t1 -c{conc} -d{secs}s; {cpus} CPUs shared by client, proxy and "
      f"stub. Errors: {errs:.0f} (bench), non-2xx: {non:.0f}.")
EOF
)
echo "$REPORT"
if [ -n "$OUT" ]; then echo "$REPORT" >"$OUT"; fi
