#!/usr/bin/env bash
# On a GPU machine (after tools/gpu-pack.sh here): parity of one training step with the PyTorch reference
# (tools/torch_lkmunet.py) for the reference configurations and both PiM layouts, and the step-time table.
# Usage: bash tools/gpu-parity.sh [CASE...]   CASE = config:layout:batch[:time], e.g. flare-3d:strided:2:3
# (time = PyTorch training steps to time; 0 skips). Results: ${OUT:-/tmp/out}/parity_*.txt and step_table.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}
mkdir -p "$out"
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(tiny-3d:window:2:3 flare-3d:strided:2:3 amos-2d:strided:12:3 amos-2d:window:2:0 flare-3d:window:2:0)
for c in "${cases[@]}"; do
  IFS=: read -r cfg layout batch time <<<"$c"
  dir=$(mktemp -d)
  .gpu/lkm-engine dump-step --config "$cfg" --pim-layout "$layout" --batch "$batch" --steps 10 --device cuda \
    --out "$dir" >"$out/dump_${cfg}_${layout}.log" 2>&1 || { echo "$c: dump failed"; tail -3 "$out/dump_${cfg}_${layout}.log"; continue; }
  chunk=0
  [ "$layout" = window ] && chunk=512
  python3 tools/parity.py --dir "$dir" --device cuda --time "${time:-0}" --scan-chunk $chunk \
    >"$out/parity_${cfg}_${layout}.txt" 2>&1
  echo "$c: $(tail -n 1 "$out/parity_${cfg}_${layout}.txt")"
  python3 - "$dir" "$c" >>"$out/step_rows.txt" <<'PY'
import json, sys
d, case = sys.argv[1], sys.argv[2]
e = json.load(open(d + "/engine_step.json"))
try:
    p = json.load(open(d + "/parity.json"))
except Exception:
    p = {}
t = p.get("time") or {}
fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)
print(f"| {case} | {e['device']} | {e['parameters']/1e6:.2f} M | {fmt(e['ms_per_step_median'])} | {fmt(e['peak_gib'], '{:.2f}')} "
      f"| {fmt(t.get('median_ms'))} | {fmt(t.get('peak_gib'), '{:.2f}')} |")
PY
  cp "$dir/parity.json" "$out/parity_${cfg}_${layout}.json" 2>/dev/null
  rm -rf "$dir"
done
{
  echo "| config:layout:batch | GPU | parameters | ours ms/step | ours peak GiB | PyTorch reference ms/step | PyTorch peak GiB |"
  echo "|---|---|---|---|---|---|---|"
  cat "$out/step_rows.txt"
} >"$out/step_table.md"
cat "$out/step_table.md"
