#!/usr/bin/env python3
"""Per-op-kind totals of several `lkm-engine profile --csv` files, side by side (tools/gpu-revs.sh with PROFILE=1 writes
one per binary and configuration, and prints this table last):

    python3 tools/op_totals.py NAME=FILE.csv [NAME=FILE.csv ...] [--top N]

Each op kind (`selective_scan.bwd`, `conv3d.fwd`, ...) is the sum of the file's rows of that kind (ms per step, over
layers); the table has one column per file, the kinds in the order of the first file's time (its N largest), then
each file's sum of every op, and every other column's ratio to the first. Per-op times are recorded ones (CUDA events
around each op, `profile`'s third measurement): they say where a change acted, the step time of gpu-revs.sh says how
much it gave."""
import argparse
import collections
import csv


def totals(path):
    """ms per step by op kind, summed over the file's rows."""
    kinds = collections.Counter()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            kinds[row["op"]] += float(row["ms_per_step"])
    return kinds


def table(named, top):
    """Markdown lines: op kind, each file's ms, each later file's ratio to the first; the all-ops sums last."""
    names = [name for name, _ in named]
    sums = [kinds for _, kinds in named]
    first = sums[0]
    order = sorted(first, key=lambda k: -first[k])[:top]
    order += sorted(k for s in sums[1:] for k in s if k not in first)  # kinds the first file lacks

    def line(label, values):
        ratios = [f"{v / values[0]:.3f}" if values[0] else "-" for v in values[1:]]
        return "| " + " | ".join([label] + [f"{v:.2f}" for v in values] + ratios) + " |"

    head = ["op kind"] + [f"{n} ms" for n in names] + [f"{n} / {names[0]}" for n in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [line(k, [s.get(k, 0.0) for s in sums]) for k in dict.fromkeys(order)]
    lines.append(line("all ops", [sum(s.values()) for s in sums]))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", metavar="NAME=FILE.csv")
    ap.add_argument("--top", type=int, default=12, help="op kinds shown, by the first file's time")
    args = ap.parse_args()
    named = []
    for arg in args.files:
        name, sep, path = arg.partition("=")
        if not sep or not name or not path:
            ap.error(f"{arg}: expected NAME=FILE.csv")
        named.append((name, totals(path)))
    print("\n".join(table(named, args.top)))


if __name__ == "__main__":
    main()
