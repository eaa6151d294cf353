#!/usr/bin/env bash
# On a GPU machine (after tools/gpu-pack.sh here): parity of one training step with the PyTorch reference
# (tools/torch_lkmunet.py) and the step-time table.
#
# Usage: bash tools/gpu-parity.sh [--f64 | --bf16] [CASE...]   CASE = config:layout:batch[:time[:seed]], e.g. flare-3d:strided:2:3
#   (seed: dump-step --seed, default 7). tiny-3d runs at seed 8: at seed 7 our GPU's float32 forward rounds one
#   LeakyReLU input across 0, which changes its gradients by up to 4e-3 (benches/RESULTS.md, LeakyReLU's kink).
#   default     the engine's float32 step on the GPU against a float64 PyTorch reference, PyTorch's own float32 step
#               beside it (parity.py --floor); engine steps timed, and PyTorch float32 steps when time > 0.
#   --f64       the engine's float64 step on the CPU against the float64 reference on the GPU (exact arithmetic:
#               the two must compute the same function); nothing timed.
#   --bf16      the engine's bf16 step (--precision bf16) against the float64 reference, PyTorch's own bf16 autocast
#               step beside it (parity.py --autocast: median error ratio <= 1.5, none above 4).
# Results: ${OUT:-/tmp/out}/parity_<mode>_<config>_<layout>.{txt,json} and, without --f64, step_table.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}
mkdir -p "$out"
mode=f32
case "${1:-}" in
  --f64) mode=f64; shift ;;
  --bf16) mode=bf16; shift ;;
esac
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(amos-2d:window:2:0 amos-2d:strided:2:0 flare-3d:window:1:0 flare-3d:strided:1:0 tiny-3d:window:2:0:8
  tiny-3d:strided:2:0:8)
for c in "${cases[@]}"; do
  IFS=: read -r cfg layout batch time seed <<<"$c"
  dir=$(mktemp -d)
  tag="${mode}_${cfg}_${layout}${seed:+_seed$seed}"
  if [ $mode = f64 ]; then
    dump=(--device cpu --dtype f64 --steps 0)
    check=()
  elif [ $mode = bf16 ]; then
    dump=(--device cuda --precision bf16 --math tf32 --steps 10)
    check=(--autocast --time "${time:-0}")
  else
    dump=(--device cuda --steps 10)
    check=(--floor --time "${time:-0}")
  fi
  t0=$(date +%s)
  .gpu/lkm-engine dump-step --config "$cfg" --pim-layout "$layout" --batch "$batch" --seed "${seed:-7}" "${dump[@]}" \
    --out "$dir" \
    >"$out/dump_$tag.log" 2>&1 || { echo "$c: dump failed"; tail -3 "$out/dump_$tag.log"; continue; }
  t1=$(date +%s)
  python3 tools/parity.py --dir "$dir" --device cuda --scan-chunk 512 "${check[@]}" >"$out/parity_$tag.txt" 2>&1
  echo "$mode $c: $(tail -n 1 "$out/parity_$tag.txt") (engine dump $((t1 - t0)) s, check $(($(date +%s) - t1)) s)"
  cp "$dir/parity.json" "$out/parity_$tag.json" 2>/dev/null
  if [ $mode = f32 ]; then
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
  fi
  rm -rf "$dir"
done
if [ $mode = f32 ] && [ -f "$out/step_rows.txt" ]; then
  {
    echo "| config:layout:batch | GPU | parameters | ours ms/step | ours peak GiB | PyTorch reference ms/step | PyTorch peak GiB |"
    echo "|---|---|---|---|---|---|---|"
    cat "$out/step_rows.txt"
  } >"$out/step_table.md"
  cat "$out/step_table.md"
fi
