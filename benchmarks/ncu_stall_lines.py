"""The SASS lines where a kernel's warps stall most, from Nsight Compute's source page:

    ncu --clock-control none --section WarpStateStats --section SourceCounters --page source \
        --print-source sass --csv -k regex:DecodeTc --launch-skip 3 --launch-count 1 \
        /tmp/decode_driver_bin/base one 1 4096 11008 3 0 6 > src.csv
    python3 benchmarks/ncu_stall_lines.py src.csv

Prints the 45 instructions with the most warp-stall samples (share of all samples, address, SASS)."""
import csv
import sys
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
hdr = None
for i, r in enumerate(rows):
    if any("Warp Stall Sampling (All Samples)" in c for c in r):
        hdr = i; break
if hdr is None:
    print("no header; first lines:"); [print(r[:6]) for r in rows[:15]]; sys.exit()
h = rows[hdr]
col = next(j for j, c in enumerate(h) if c.startswith("Warp Stall Sampling (All Samples)"))
src = next(j for j, c in enumerate(h) if c in ("Source", "# Source"))
addr = next((j for j, c in enumerate(h) if c == "Address"), 0)
data = []
for r in rows[hdr + 1:]:
    if len(r) <= col: continue
    try: v = float(r[col].replace(",", ""))
    except ValueError: continue
    data.append((v, r[addr], r[src]))
tot = sum(d[0] for d in data) or 1
print("total samples", tot, "instructions", len(data))
for v, a, s in sorted(data, reverse=True)[:45]:
    print(f"{100*v/tot:5.1f}%  {a}  {s}")
