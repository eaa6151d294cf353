#!/usr/bin/env python3
"""Where a kernel's warps wait, instruction by instruction, from Nsight Compute's source page (tools/gpu-ncu.sh with
SASS=1 writes it: `ncu --import R.ncu-rep --page source --csv --print-source sass`):

    python3 tools/ncu_sass.py REPORT.sass.csv[.gz] [--top N] [--context K]

Prints the kernel's stall samples by reason (all instructions), then the N instructions with the most samples, each
with its share of all samples, its top reasons, its execution count, and K instructions before it (a stall is
charged to the instruction that waits, so the producer of what it waits for is usually a few lines up: the LDGSTS
behind a DEPBAR, the WGMMA behind a WARPGROUP.DEPBAR)."""
import argparse
import csv
import gzip
import io


def rows_of(path):
    raw = gzip.open(path, "rt") if path.endswith(".gz") else open(path)
    lines = raw.read().splitlines()
    # The page opens with a "Kernel Name" line before the header.
    start = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
    name = lines[0].split(",")[1].strip('"') if start else "?"
    return name, list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--context", type=int, default=0)
    args = ap.parse_args()
    name, rows = rows_of(args.report)
    reasons = [k for k in rows[0] if k.startswith("stall_") and not k.endswith("(Not Issued)")]
    samples = [number(r["Warp Stall Sampling (All Samples)"]) for r in rows]
    total = sum(samples) or 1.0
    print(f"{name}: {len(rows)} SASS instructions, {int(total)} stall samples")
    by_reason = sorted(((sum(number(r[k]) for r in rows), k[6:]) for k in reasons), reverse=True)
    print("  by reason: " + ", ".join(f"{k} {100 * v / total:.1f}%" for v, k in by_reason if v / total >= 0.01))
    order = sorted(range(len(rows)), key=lambda i: -samples[i])[: args.top]
    for i in order:
        r = rows[i]
        why = sorted(((number(r[k]), k[6:]) for k in reasons), reverse=True)[:3]
        why = ", ".join(f"{k} {int(v)}" for v, k in why if v > 0)
        print(f"{100 * samples[i] / total:5.1f}%  #{i:<5} x{r['Instructions Executed']:>8}  {r['Source'].strip()}"
              f"   [{why}]")
        for j in range(max(0, i - args.context), i):
            print(f"{'':>25}#{j:<5} {rows[j]['Source'].strip()}")


if __name__ == "__main__":
    main()
