#!/usr/bin/env bash
# On a GPU machine, after tools/gpu-pack.sh here: `lkm-engine profile` at the reference configurations (flare-3d
# batch 2 in both PiM layouts, amos-2d batch 12), with per-op CSVs and one Chrome trace, then Nsight Compute filtered
# to one NVTX range (one layer's conv forward) to show that the ranges reach the tools. Writes to ${OUT:-/tmp/out};
# prints the reports' headers and roll-ups last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}
mkdir -p "$out"
bin=.gpu/lkm-engine
steps=${STEPS:-3}
for run in "flare-3d 2 strided" "flare-3d 2 window" "amos-2d 12 strided"; do
  read -r config batch layout <<<"$run"
  name="profile_${config}_b${batch}_${layout}"
  trace=()
  [ "$layout" = strided ] && [ "$config" = flare-3d ] && trace=(--trace "$out/$name.trace.json")
  timeout 300 "$bin" profile --config "$config" --batch "$batch" --pim-layout "$layout" --steps "$steps" --device cuda \
    --csv "$out/$name.csv" "${trace[@]}" --top 40 >"$out/$name.txt" 2>"$out/$name.err" || echo "$name failed: $(tail -n 3 "$out/$name.err")"
done
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
echo "nsys: $(command -v nsys || echo 'not installed')" >"$out/ncu.txt"
# One layer's convolution forward: the NVTX stack of its kernels ends in the layer's range and then the op's range.
for filter in "train_step/forward/encoder.stages.0.blocks.0/encoder.stages.0.blocks.0.conv1/conv3d.fwd/" \
  "regex:.*encoder\.stages\.0\.blocks\.0\.conv1/conv3d\.fwd/"; do
  echo "== ncu --nvtx --nvtx-include \"$filter\"" >>"$out/ncu.txt"
  timeout 180 "$ncu" --nvtx --nvtx-include "$filter" --metrics gpu__time_duration.sum --csv \
    "$bin" profile --config tiny-3d --batch 1 --steps 1 --device cuda >"$out/ncu_run.txt" 2>&1
  grep -E '^"[0-9]' "$out/ncu_run.txt" | awk -F'","' '{print $5}' | sort | uniq -c >>"$out/ncu.txt"
  grep -E "==PROF==|==ERROR==|==WARNING==" "$out/ncu_run.txt" | head -n 5 >>"$out/ncu.txt"
done
cat "$out/ncu.txt"
for f in "$out"/profile_*.txt; do
  echo "=== $(basename "$f")"
  head -n 2 "$f"
  sed -n '/^by op kind:/,/^by phase/p' "$f" | head -n 30
  sed -n '/^by phase/,$p' "$f"
done
