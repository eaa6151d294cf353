#!/usr/bin/env python3
"""One line per profiled kernel from Nsight Compute's raw CSV page, for the tensor-core convolution issue's analysis
of slow shapes: `ncu --import REPORT.ncu-rep --page raw --csv > raw.csv; python3 tools/ncu_summary.py raw.csv`.

Per kernel (each launch in the report): duration, tensor-pipe activity, SM, DRAM and L2 throughput (% of peak:
the L2 column says whether a tile's operand loads outrun the cache),
achieved occupancy, registers per thread, dynamic shared memory per block, and the four largest stall reasons
(warps stalled per issued instruction: long_scoreboard = waiting on global memory, barrier = __syncthreads,
short_scoreboard = shared memory, mio_throttle = the shared-memory queue, math_pipe_throttle = a busy pipe, ...).
Metric names differ between ncu versions; each column is the first of its candidate metric names that the report
has, and one that has none prints "-". The tensor-pipe column is the pipe's active cycles (mma.sync and wgmma alike);
the ncu of 2026-12-06 showed that the HMMA instruction-issue rate this column used to read stays at a few percent
for wgmma kernels whose pipe is 13% busy, and that the first column matching "dram" was an empty
FBSP.TriageCompute.dramc__ one."""
import csv
import sys

# (label, candidate metric names in order of preference): the first that the report has is the column.
COLUMNS = [
    ("ms", ["gpu__time_duration.sum"]),
    ("tensor %", ["sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
                  "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"]),
    ("SM %", ["sm__throughput.avg.pct_of_peak_sustained_elapsed"]),
    ("DRAM %", ["gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                "dram__throughput.avg.pct_of_peak_sustained_elapsed"]),
    ("L2 %", ["lts__t_sectors.avg.pct_of_peak_sustained_elapsed",
              "lts__throughput.avg.pct_of_peak_sustained_elapsed"]),
    ("occupancy %", ["sm__warps_active.avg.pct_of_peak_sustained_active"]),
    ("regs", ["launch__registers_per_thread"]),
    ("smem KB", ["launch__shared_mem_per_block_dynamic"]),
]
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarise(rows):
    """rows: the CSV as lists (header, units, then one row per kernel). Returns (header, lines) of a Markdown table."""
    header, units, data = rows[0], rows[1], rows[2:]
    index = {name: i for i, name in enumerate(header)}
    name_col = index.get("Kernel Name", index.get("Function Name"))
    picked = []
    for label, names in COLUMNS:
        picked.append((label, next((index[n] for n in names if n in index), None)))
    stalls = [i for i, h in enumerate(header) if h.startswith(STALL_PREFIX) and h.endswith(STALL_SUFFIX)]
    lines = []
    for row in data:
        cells = [row[name_col] if name_col is not None else "?"]
        for label, col in picked:
            value = number(row[col]) if col is not None else None
            if value is not None and label == "ms":
                # Duration units: ns, us (usecond) or ms (msecond), as the units row says.
                unit = units[col]
                value /= {"ns": 1e6, "nsecond": 1e6, "us": 1e3, "usecond": 1e3}.get(unit, 1.0)
            if value is not None and label == "smem KB":
                # Bytes, kilobytes or megabytes, spelled byte/Kbyte/Mbyte or B/KB/MB by ncu versions (the H200's
                # ncu 2025 wrote KB: 150 KB read as bytes printed 0.146), some per block ("Kbyte/block").
                unit = units[col].lower().removesuffix("/block")
                scale = {"byte": 1024.0, "b": 1024.0, "kbyte": 1.0, "kb": 1.0, "mbyte": 1.0 / 1024, "mb": 1.0 / 1024}
                if unit not in scale:
                    sys.exit(f"shared memory in an unknown unit {units[col]!r}")
                value /= scale[unit]
            cells.append("-" if value is None else f"{value:.3g}")
        top = sorted(((number(row[i]) or 0.0, header[i][len(STALL_PREFIX):-len(STALL_SUFFIX)]) for i in stalls),
                     reverse=True)[:4]
        cells.append(", ".join(f"{name} {value:.2f}" for value, name in top if value > 0) or "-")
        lines.append(cells)
    return ["kernel"] + [label for label, _ in COLUMNS] + ["top stalls (warps per issue)"], lines


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: ncu_summary.py RAW.csv  (ncu --import R.ncu-rep --page raw --csv > RAW.csv)")
    with open(sys.argv[1], newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("==")]
    if len(rows) < 3:
        sys.exit(f"{sys.argv[1]}: no kernel rows (did ncu profile any kernel? see its log)")
    header, lines = summarise(rows)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
