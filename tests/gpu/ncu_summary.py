#!/usr/bin/env python3
"""Sums an `ncu --csv --page raw` report by kernel: launches, total time, share of the step,
DRAM bytes read and the achieved GB/s, most expensive first. A device-side analysis aid for
tools/bench-gpu.sh's profile section, never part of duet.
Usage: ncu_summary.py REPORT.csv [TOP]"""
import csv
import sys

rows = list(csv.reader(open(sys.argv[1], newline="")))
top = int(sys.argv[2]) if len(sys.argv) > 2 else 20
hdr = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if hdr is None:
    sys.exit("ncu_summary: no 'Kernel Name' column in " + sys.argv[1])
h = rows[hdr]
units = rows[hdr + 1] if hdr + 1 < len(rows) else []
name_c, t_c = h.index("Kernel Name"), h.index("gpu__time_duration.sum")
b_c = h.index("dram__bytes_read.sum") if "dram__bytes_read.sum" in h else None
scale_t = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}
scale_b = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}
agg = {}
for r in rows[hdr + 1:]:
    if len(r) <= t_c:
        continue
    try:
        t = float(r[t_c].replace(",", "")) * scale_t.get(units[t_c] if units else "nsecond", 1e-3)
    except ValueError:
        continue  # the units row
    b = 0.0
    if b_c is not None:
        try:
            b = float(r[b_c].replace(",", "")) * scale_b.get(units[b_c] if units else "byte", 1)
        except ValueError:
            pass
    k = r[name_c].split("(")[0][:70]
    a = agg.setdefault(k, [0, 0.0, 0.0])
    a[0] += 1
    a[1] += t
    a[2] += b
total = sum(a[1] for a in agg.values())
print("%-70s %6s %10s %6s %10s %8s" % ("kernel", "n", "us", "share", "MB read", "GB/s"))
for k, (n, t, b) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
    print("%-70s %6d %10.1f %5.1f%% %10.2f %8.0f" % (k, n, t, 100 * t / total, b / 1e6,
                                                     b / (t * 1e-6) / 1e9 if t else 0))
print("total: %d kernels, %.1f us of kernel time" % (sum(a[0] for a in agg.values()), total))
