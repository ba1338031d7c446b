#!/usr/bin/env bash
# Sweeps an OpenAI endpoint with duet-bench over the workloads duet documents (input/output
# tokens 128/1024, 1024/128, 3500/1500, 1000/100) at concurrency 1, 2, 4 ... 256, and writes a
# report: a Markdown table per workload and, with gnuplot, PNG plots of output throughput vs
# concurrency, TPOT vs throughput (the Pareto curve) and the TTFT CDF. Starting the servers is
# the caller's business (deploy/launch-2p1d.sh, or a single duet-decode).
#
#   tools/bench-sweep.sh [--base-url URL | --host H --port P] [--model M] [--served-model-name N]
#       [--tokenizer DIR] [--backend openai|openai-chat] [--workloads "IN/OUT ..."]
#       [--scale F] [--concurrency "1 2 4 ..."] [--rounds K] [--num-warmups N] [--cards N]
#       [--label TEXT] [--out DIR] [--no-plots] [-- more duet-bench flags]
#   tools/bench-sweep.sh --merge OUT LABEL=DIR [LABEL=DIR ...]
#
# Each level sends rounds x concurrency random prompts (--rounds, default 4) with --ignore-eos
# after --num-warmups requests (default 1); --scale multiplies every workload's lengths (CI runs
# the shapes small); --cards divides throughput for the per-card column. Results: OUT/results/
# (duet-bench's JSON per level, with per-request times), OUT/summary.tsv, OUT/report.md and
# OUT/*.png. --merge puts several sweeps (single instance, 1P1D, 2P1D...) into one report and
# one set of plots. Plots are skipped, with a line in the report, when gnuplot is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

conn=() extra=() model="" label=duet out=bench-sweep plots=1 cards=1 rounds=4 warmups=1
workloads="128/1024 1024/128 3500/1500 1000/100" scale=1
concurrency="1 2 4 8 16 32 64 128 256" merge=()
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
    --base-url | --host | --port | --served-model-name | --tokenizer | --backend | --endpoint)
        [ $# -ge 2 ] || usage; conn+=("$1" "$2"); shift 2 ;;
    --model) [ $# -ge 2 ] || usage; model=$2; shift 2 ;;
    --workloads) workloads=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --num-warmups) warmups=$2; shift 2 ;;
    --cards) cards=$2; shift 2 ;;
    --label) label=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-plots) plots=0; shift ;;
    --merge) [ $# -ge 3 ] || usage; out=$2; shift 2; merge=("$@"); break ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) usage ;;
    *) echo "bench-sweep: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
command -v gnuplot >/dev/null 2>&1 || plots=0

# duet-bench: $DUET_BENCH, this checkout's build, the offline bundle's bin/, or PATH
bench=${DUET_BENCH:-}
for c in "$here/../build/tools/duet-bench" "$here/bin/duet-bench" "$(command -v duet-bench || true)"; do
    [ -z "$bench" ] && [ -n "$c" ] && [ -x "$c" ] && bench=$c
done

# ---- reading duet-bench's result JSON (its own compact output: "key":value) ----
jnum() { grep -o "\"$2\":[^,}]*" "$1" | head -1 | cut -d: -f2 || true; }
jlist() { grep -o "\"$2\":\[[^]]*\]" "$1" | sed 's/^[^[]*\[//; s/\]$//' | tr ',' '\n' || true; }
fmt() { awk -v x="${1:-nan}" -v d="${2:-2}" 'BEGIN { if (x == "" || x == "null") print "-"; else printf "%.*f", d, x }'; }

# ---- one sweep ----
sweep() {
    [ -n "$bench" ] || { echo "bench-sweep: duet-bench not found (build it, or set DUET_BENCH)" >&2; exit 1; }
    mkdir -p "$out/results" "$out/logs"
    local sum=$out/summary.tsv
    printf 'workload\tinput\toutput\tconcurrency\tprompts\tcompleted\tfailed\tduration_s\treq_s\tout_tok_s\ttotal_tok_s\tmean_ttft_ms\tp99_ttft_ms\tmean_tpot_ms\tp99_tpot_ms\tmean_itl_ms\tp99_itl_ms\tmean_e2el_ms\tp99_e2el_ms\tload1\n' >"$sum"
    local margs=()
    [ -n "$model" ] && margs=(--model "$model")
    for w in $workloads; do
        local in=${w%/*} outl=${w#*/}
        local sin sout
        sin=$(awk -v x="$in" -v s="$scale" 'BEGIN { v = int(x * s + 0.5); print v < 1 ? 1 : v }')
        sout=$(awk -v x="$outl" -v s="$scale" 'BEGIN { v = int(x * s + 0.5); print v < 1 ? 1 : v }')
        for c in $concurrency; do
            local n=$((rounds * c)) name="${in}x${outl}-c${c}"
            echo "bench-sweep: $w (sent as $sin/$sout) at concurrency $c: $n requests" >&2
            local rc=0
            "$bench" "${conn[@]}" "${margs[@]}" --dataset-name random --random-input-len "$sin" \
                --random-output-len "$sout" --num-prompts "$n" --max-concurrency "$c" \
                --num-warmups "$warmups" --ignore-eos --percentile-metrics ttft,tpot,itl,e2el \
                --metric-percentiles 50,99 --save-result --save-detailed \
                --result-dir "$out/results" --result-filename "$name.json" --disable-tqdm \
                --label "$label" "${extra[@]}" >"$out/logs/$name.log" 2>&1 || rc=$?
            local f=$out/results/$name.json
            if [ ! -s "$f" ]; then
                echo "bench-sweep: duet-bench exited $rc without a result; see $out/logs/$name.log" >&2
                exit 1
            fi
            printf '%s\t%s\t%s\t%s\t%s' "$w" "$sin" "$sout" "$c" "$n" >>"$sum"
            for k in completed failed duration request_throughput output_throughput \
                total_token_throughput mean_ttft_ms p99_ttft_ms mean_tpot_ms p99_tpot_ms \
                mean_itl_ms p99_itl_ms mean_e2el_ms p99_e2el_ms; do
                printf '\t%s' "$(jnum "$f" "$k")" >>"$sum"
            done
            # a shared machine's other work shows in its load: kept next to the numbers
            printf '\t%s\n' "$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo -)" >>"$sum"
            local failed
            failed=$(jnum "$f" failed)
            [ "${failed:-0}" = 0 ] || echo "bench-sweep: $failed requests failed at $name (see its JSON's errors)" >&2
        done
    done
    {
        echo "label=$label"
        echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit=$(commit)"
        echo "machine=$(machine)"
        echo "model=${model:-the server default}"
        echo "cards=$cards"
        echo "scale=$scale"
        echo "command=$cmdline"
    } >"$out/info"
}

# what was measured: the offline bundle's COMMIT file, else this checkout's HEAD, else DUET_COMMIT
commit() {
    if [ -f "$here/COMMIT" ]; then
        cat "$here/COMMIT"
    else
        git -C "$here" rev-parse --short HEAD 2>/dev/null || echo "${DUET_COMMIT:-unknown}"
    fi
}

machine() {
    local cpu gpu=""
    cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c |
            awk '{ n = $1; $1 = ""; printf "%s%dx%s", sep, n, substr($0, 2); sep = ", " }')
    fi
    echo "$(uname -sm), ${cpu:-unknown CPU}, $(nproc --all) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)${gpu:+, $gpu}"
}

info() { sed -n "s/^$2=//p" "$1/info" 2>/dev/null | head -1; }

# ---- the report over one or more sweeps: LABEL=DIR ... ----
report() {
    local md=$out/report.md series=("$@") s lbl dir
    local wls=()
    for s in "${series[@]}"; do
        dir=${s#*=}
        [ -f "$dir/summary.tsv" ] || { echo "bench-sweep: $dir/summary.tsv missing" >&2; exit 1; }
        while read -r w; do
            [[ " ${wls[*]} " == *" $w "* ]] || wls+=("$w")
        done < <(tail -n +2 "$dir/summary.tsv" | cut -f1 | awk '!seen[$0]++')
    done
    {
        echo "# duet-bench sweep"
        echo
        for s in "${series[@]}"; do
            lbl=${s%%=*} dir=${s#*=}
            echo "- **$lbl**: model $(info "$dir" model), commit $(info "$dir" commit), $(info "$dir" date)"
            echo "  - machine: $(info "$dir" machine); throughput per card over $(info "$dir" cards) card(s)"
            local sc
            sc=$(info "$dir" scale)
            [ "${sc:-1}" = 1 ] || echo "  - lengths scaled by $sc (columns *sent* below)"
            echo "  - command: \`$(info "$dir" command)\`"
        done
        echo
        echo "Streamed requests with \`--ignore-eos\`; TTFT, TPOT, ITL and E2EL as \`vllm bench serve\`"
        echo "defines them (docs/benchmarks.md). Each level: rounds x concurrency requests. load: the"
        echo "machine's 1-minute load average when the level ended."
        for w in "${wls[@]}"; do
            echo
            echo "## $w input/output tokens"
            echo
            echo "| series | sent | concurrency | requests (failed) | req/s | output tok/s | output tok/s/card | total tok/s | TTFT mean / P99 ms | TPOT mean / P99 ms | ITL mean / P99 ms | E2EL mean ms | load |"
            echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            for s in "${series[@]}"; do
                lbl=${s%%=*} dir=${s#*=}
                local cards
                cards=$(info "$dir" cards)
                awk -F'\t' -v w="$w" -v l="$lbl" -v cards="${cards:-1}" 'NR > 1 && $1 == w {
                    printf "| %s | %s/%s | %s | %s (%s) | %.2f | %.1f | %.1f | %.1f | %.1f / %.1f | %.2f / %.2f | %.2f / %.2f | %.1f | %s |\n",
                        l, $2, $3, $4, $6, $7, $9, $10, $10 / cards, $11, $12, $13, $14, $15, $16, $17, $18, $20 == "" ? "-" : $20 }' "$dir/summary.tsv"
            done
        done
        echo
        if [ "$plots" = 1 ]; then
            echo "## Plots"
            echo
            echo "![output throughput vs concurrency](throughput_vs_concurrency.png)"
            echo
            echo "![TPOT vs output throughput per card](tpot_vs_throughput.png)"
            echo
            echo "![TTFT CDF](ttft_cdf.png)"
        else
            echo "Plots skipped: gnuplot not found (Debian: apt-get install gnuplot-nox) or --no-plots."
        fi
    } >"$md"
    [ "$plots" = 1 ] && plot "${wls[@]}"
    echo "bench-sweep: report in $md" >&2
}

# ---- gnuplot: one panel per workload, one line per series ----
plot() {
    local wls=("$@") d=$out/plot-data s lbl dir w i=0 k
    rm -rf "$d"
    mkdir -p "$d"
    local nw=${#wls[@]} rows cols
    cols=$((nw > 1 ? 2 : 1))
    rows=$(((nw + 1) / 2))
    local term="pngcairo size $((cols * 640)),$((rows * 440)) font ',10'"
    gnuplot -e 'set terminal pngcairo' >/dev/null 2>&1 || term="png size $((cols * 640)),$((rows * 440))"
    local p1="" p2="" p3="" nseries=${#series_args[@]}
    for w in "${wls[@]}"; do
        local wf=${w/\//x} l1="" l2="" l3=""
        for s in "${series_args[@]}"; do
            lbl=${s%%=*} dir=${s#*=}
            local cards
            cards=$(info "$dir" cards)
            awk -F'\t' -v w="$w" -v cards="${cards:-1}" 'NR > 1 && $1 == w && $6 > 0 {
                print $4, $10 / cards, $14 }' "$dir/summary.tsv" >"$d/$i.dat"
            if [ -s "$d/$i.dat" ]; then
                l1+="'$d/$i.dat' using 1:2 with linespoints title '$lbl', "
                l2+="'$d/$i.dat' using 2:3 with linespoints title '$lbl', "
            fi
            # TTFT CDFs: every concurrency for one series; the highest level of each for several
            local levels
            levels=$(awk -F'\t' -v w="$w" 'NR > 1 && $1 == w { print $4 }' "$dir/summary.tsv")
            [ "$nseries" -gt 1 ] && levels=$(echo "$levels" | tail -1)
            for c in $levels; do
                local f=$dir/results/${wf}-c$c.json
                [ -f "$f" ] || continue
                jlist "$f" ttfts | awk '$1 > 0 { print $1 * 1000 }' | sort -g |
                    awk '{ v[NR] = $1 } END { if (NR) print v[1], 0; for (k = 1; k <= NR; k++) print v[k], k / NR }' >"$d/$i-c$c.cdf"
                [ -s "$d/$i-c$c.cdf" ] || continue
                local t="c=$c"
                [ "$nseries" -gt 1 ] && t="$lbl c=$c"
                l3+="'$d/$i-c$c.cdf' using 1:2 with steps title '$t', "
            done
            i=$((i + 1))
        done
        p1+="set title '$w tokens'; plot ${l1%, }; "
        p2+="set title '$w tokens'; plot ${l2%, }; "
        p3+="set title '$w tokens'; plot ${l3%, }; "
    done
    k="set key top left; set grid; set multiplot layout $rows,$cols;"
    gnuplot <<EOF
set terminal $term
set output '$out/throughput_vs_concurrency.png'
set logscale x 2
set xlabel 'concurrency'
set ylabel 'output tokens/s per card'
$k $p1
unset multiplot
set output '$out/tpot_vs_throughput.png'
unset logscale x
set xlabel 'output tokens/s per card'
set ylabel 'mean TPOT (ms)'
$k $p2
unset multiplot
set output '$out/ttft_cdf.png'
set xlabel 'TTFT (ms)'
set ylabel 'fraction of requests'
set yrange [0:1]
set key bottom right
set multiplot layout $rows,$cols
$p3
unset multiplot
EOF
}

margs=()
[ -n "$model" ] && margs=(--model "$model")
[ ${#extra[@]} -gt 0 ] && margs+=(-- "${extra[@]}")
cmdline="tools/bench-sweep.sh $(printf '%q ' "${conn[@]}" --workloads "$workloads" --scale "$scale" \
    --concurrency "$concurrency" --rounds "$rounds" --num-warmups "$warmups" --cards "$cards" \
    --label "$label" --out "$out" "${margs[@]}")"
if [ ${#merge[@]} -gt 0 ]; then
    mkdir -p "$out"
    series_args=("${merge[@]}")
    report "${merge[@]}"
else
    sweep
    series_args=("$label=$out")
    report "$label=$out"
fi
