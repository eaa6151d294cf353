#!/usr/bin/env bash
# On a GPU machine, after `tools/gpu-pack.sh --rev NAME=REV ...` here: the training step of every --rev binary
# (.gpu/NAME/lkm-engine) and of the packed working tree's (.gpu/lkm-engine, "packed") in one call, as one table, so
# that a change is timed beside what it changes on the same card in the same call (engine.md, "how we measure").
#
# The binaries run in rounds, each round in the same order (the reference first: the rev named "base" if there is
# one, else "packed"): a drift of the card over the call shows as a difference between the reference's rounds
# rather than as a speed-up. Each run is tools/gpu-step.sh with RUNS, MATHS and STEPS (defaults "flare-3d 2
# strided;amos-2d 12 strided", bf16, 4); ROUNDS (default 2). Writes ${OUT:-/tmp/out}/revs/ROUND_NAME/step.json and
# prints, last, per binary and configuration the median ms of the rounds, each round's ms, the peak GiB, and the
# ratio to the reference's median.
#
# PROFILE=1: then also `lkm-engine profile --csv` of every binary at each configuration (bf16 storage, STEPS steps),
# into $OUT/revs/profile_NAME_CONFIG.csv, and per configuration a table of the op kinds' ms per step side by side
# (tools/op_totals.py, the OPS_TOP (default 30) largest by the first binary's time; the device tool may not bring the
# CSVs back, so the table is the record): where a change acted, beside the step times that say how much it gave.
#
# Usage: bash tools/gpu-revs.sh [NAME ...]   (default: base if packed, every other .gpu/*/lkm-engine, then packed)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}/revs
mkdir -p "$out"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  [ -x .gpu/base/lkm-engine ] && names+=(base)
  for bin in .gpu/*/lkm-engine; do
    name=$(basename "$(dirname "$bin")")
    [ -x "$bin" ] && [ "$name" != base ] && names+=("$name")
  done
  names+=(packed)
fi
# The binary of NAME: the packed working tree's, or a --rev build's.
bin_of() { if [ "$1" = packed ]; then echo .gpu/lkm-engine; else echo ".gpu/$1/lkm-engine"; fi; }
export RUNS=${RUNS:-"flare-3d 2 strided;amos-2d 12 strided"} MATHS=${MATHS:-bf16} STEPS=${STEPS:-4}
for round in $(seq 1 "${ROUNDS:-2}"); do
  for name in "${names[@]}"; do
    bin=$(bin_of "$name")
    if [ ! -x "$bin" ]; then
      echo "$name: no binary $bin (tools/gpu-pack.sh --rev $name=REV packs it)" >&2
      continue
    fi
    echo "round $round: $name" >&2
    BIN=$bin OUT="$out/${round}_$name" bash tools/gpu-step.sh >"$out/${round}_$name.log" 2>&1 ||
      echo "$name round $round: gpu-step.sh failed: $(tail -n 3 "$out/${round}_$name.log")" >&2
  done
done
python3 - "$out" "${names[@]}" <<'PY'
import glob, json, os, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
runs = {}  # (name, config, batch, layout, precision) -> (ms per round, peaks)
for path in sorted(glob.glob(os.path.join(out, "*_*", "step.json"))):
    name = os.path.basename(os.path.dirname(path)).split("_", 1)[1]
    for r in json.load(open(path)):
        key = (name, r["config"], r["batch"], r["pim_layout"], r["precision"])
        ms, peaks = runs.setdefault(key, ([], []))
        ms.append(r["ms_per_step"])
        peaks.append(r["peak_gib"])
if not runs:
    sys.exit("no step was measured (see the logs in " + out + ")")
gpu = next(iter(json.load(open(p)) for p in glob.glob(os.path.join(out, "*_*", "step.json"))))[0]["gpu"]
print(f"\nGPU: {gpu}")
print(f"| binary | config | batch | PiM | precision | ms per step (median) | each round | peak GiB | / {names[0]} |")
print("|---|---|---|---|---|---|---|---|---|")
for (name, config, batch, layout, precision), (ms, peaks) in sorted(
        runs.items(), key=lambda kv: (kv[0][1:], names.index(kv[0][0]) if kv[0][0] in names else len(names))):
    median = statistics.median(ms)
    base = runs.get((names[0], config, batch, layout, precision))
    ratio = f"{median / statistics.median(base[0]):.3f}" if base else "-"
    peak = max((p for p in peaks if p is not None), default=None)
    print(f"| {name} | {config} | {batch} | {layout} | {precision} | {median:.1f} | "
          f"{', '.join(f'{m:.1f}' for m in ms)} | {peak if peak is not None else '-'} | {ratio} |")
PY
if [ "${PROFILE:-0}" = 1 ]; then
  IFS=';' read -ra profile_runs <<<"$RUNS"
  for run in "${profile_runs[@]}"; do
    read -r config batch layout <<<"$run"
    files=()
    for name in "${names[@]}"; do
      bin=$(bin_of "$name")
      csv="$out/profile_${name}_${config}.csv"
      timeout 300 "$bin" profile --config "$config" --batch "$batch" --pim-layout "$layout" --steps "$STEPS" \
        --device cuda --precision bf16 --csv "$csv" >"$out/profile_${name}_${config}.txt" 2>&1 &&
        files+=("$name=$csv") || echo "$name $config: profile failed: $(tail -n 3 "$out/profile_${name}_${config}.txt")" >&2
    done
    echo
    echo "$config b$batch $layout, per op kind (lkm-engine profile, recorded):"
    [ ${#files[@]} -gt 0 ] && python3 tools/op_totals.py "${files[@]}" --top "${OPS_TOP:-30}"
  done
fi
