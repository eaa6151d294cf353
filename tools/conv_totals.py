#!/usr/bin/env python3
"""Per-step totals of a convolution table (`kernels --convs ... --out F.md`, benches/kernels/convs.rs): per config and
role, the sum over the shapes of ours bf16 ms x the layer's count per step, and, where the table has cuDNN's column
(`tools/gpu-run.sh --convs`), cuDNN's total, the median and smallest ratio (cuDNN ms / ours) and the shapes below 0.7:
the numbers of the tensor-core convolution issue's targets.

    python3 tools/conv_totals.py TABLE.md                    # totals (and the cuDNN summary)
    python3 tools/conv_totals.py BEFORE.md AFTER.md [--min-change 0.05]
                                                             # both totals, and the shapes whose time changed by more
                                                             # than that fraction (of at least 0.1 ms)

Both tables of a comparison must come from the same device call: timings of different calls are not compared."""
import statistics
import sys

ROLES = ("fprop", "dgrad", "wgrad")


def read_table(path):
    """{(config, layer, role): row} for the rows of a convs table; row: count, ours ms, cuDNN ms and ratio (None
    where the table has no cuDNN column or the cell is '-')."""
    rows = {}
    with open(path) as f:
        for line in f:
            cells = [c.strip() for c in line.split("|")]
            if len(cells) < 9 or cells[6] not in ROLES:
                continue
            layer = cells[2]
            count = int(layer.rsplit("(", 1)[1].rstrip(")")) if "(" in layer else 1

            def number(i):
                return float(cells[i]) if len(cells) > i and cells[i] not in ("", "-") else None

            rows[(cells[1], layer, cells[6])] = {"count": count, "ours": number(7), "cudnn": number(9),
                                                 "ratio": number(10)}
    if not rows:
        sys.exit(f"{path}: no convolution rows (a table of `kernels --convs` is expected)")
    return rows


def totals(rows):
    """{(config, role): {ours, cudnn, ratios}}: per-step sums (ms x count) and the per-shape ratios."""
    out = {}
    for (config, _, role), r in sorted(rows.items()):
        t = out.setdefault((config, role), {"ours": 0.0, "cudnn": 0.0, "ratios": []})
        t["ours"] += r["ours"] * r["count"]
        if r["cudnn"] is not None and r["ratio"] is not None:
            t["cudnn"] += r["cudnn"] * r["count"]
            t["ratios"].append(r["ratio"])
    return out


def summary_lines(rows):
    lines, below, shapes = [], 0, 0
    for (config, role), t in totals(rows).items():
        line = f"{config} {role}: ours {t['ours']:.2f} ms"
        if t["ratios"]:
            r = t["ratios"]
            n_below = sum(x < 0.7 for x in r)
            below, shapes = below + n_below, shapes + len(r)
            line += (f", cuDNN {t['cudnn']:.2f} ms; cuDNN/ours median {statistics.median(r):.2f} (min {min(r):.2f}),"
                     f" {n_below} of {len(r)} below 0.7")
        lines.append(line)
    if shapes:
        lines.append(f"below 0.7: {below} of {shapes} rows")
    return lines


def comparison_lines(before, after, min_change):
    tb, ta = totals(before), totals(after)
    lines = [f"{c} {r}: {tb[(c, r)]['ours']:.2f} -> {ta[(c, r)]['ours']:.2f} ms" for (c, r) in ta if (c, r) in tb]
    for key in sorted(after):
        if key not in before:
            continue
        b, a = before[key]["ours"], after[key]["ours"]
        if max(a, b) >= 0.1 and abs(a - b) > min_change * b:
            lines.append(f"  {key[0]} {key[1]} {key[2]}: {b:.3f} -> {a:.3f} ms")
    return lines


def main(argv):
    min_change = 0.05
    if "--min-change" in argv:
        i = argv.index("--min-change")
        min_change = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if len(argv) == 1:
        print("\n".join(summary_lines(read_table(argv[0]))))
    elif len(argv) == 2:
        print("\n".join(comparison_lines(read_table(argv[0]), read_table(argv[1]), min_change)))
    else:
        sys.exit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
