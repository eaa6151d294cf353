#!/usr/bin/env bash
# On a GPU machine, after tools/gpu-pack.sh here: the whole training step at the reference configurations, the
# numbers of issue 14's step table. Runs `lkm-engine dump-step` (a real training step: forward, loss, backward, clip,
# SGD; median of STEPS timed steps, pool peak) for each configuration, PiM layout and convolution math, and writes
# ${OUT:-/tmp/out}/step.json in the format of benches/step.json (config, pim_layout, precision, batch, ms_per_step,
# peak_gib, gpu, date) and prints the same as a Markdown table last.
#
# Environment: BIN (default .gpu/lkm-engine; e.g. a previous binary for a before/after pair in one call), STEPS
# (default 5), RUNS (default: "flare-3d 2 strided", "flare-3d 2 window", "amos-2d 12 strided", "amos-2d 12 window"),
# MATHS (default "bf16 tf32 exact": bf16 activations with bf16 products, float32 storage with tf32 products, exact
# float32), DEVICE (default cuda), RECOMPUTE (dump-step --recompute: none or mamba; default the configuration's, none).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}
mkdir -p "$out"
bin=${BIN:-.gpu/lkm-engine}
steps=${STEPS:-5}
runs=${RUNS:-"flare-3d 2 strided;flare-3d 2 window;amos-2d 12 strided;amos-2d 12 window"}
results=()
IFS=';' read -ra run_list <<<"$runs"
for run in "${run_list[@]}"; do
  read -r config batch layout <<<"$run"
  for math in ${MATHS:-bf16 tf32 exact}; do
    dir="$out/step_${config}_b${batch}_${layout}_${math}"
    case "$math" in
      bf16) flags=(--math tf32 --precision bf16) ;;
      tf32) flags=(--math tf32 --precision fp32) ;;
      *) flags=(--math "$math") ;;
    esac
    [ -n "${RECOMPUTE:-}" ] && flags+=(--recompute "$RECOMPUTE")
    if timeout 600 "$bin" dump-step --config "$config" --batch "$batch" --pim-layout "$layout" --steps "$steps" \
      "${flags[@]}" --device "${DEVICE:-cuda}" --out "$dir" >"$dir.log" 2>&1; then
      results+=("$config $batch $layout $math $dir/engine_step.json")
    else
      echo "$config b$batch $layout $math failed: $(tail -n 3 "$dir.log")"
    fi
  done
done
printf '%s\n' "${results[@]}" | python3 -c '
import datetime, json, sys
rows = []
for line in sys.stdin:
    if not line.strip():
        continue
    config, batch, layout, math, path = line.split()
    step = json.load(open(path))
    precision = {"bf16": "bf16 storage, bf16 matrix products", "tf32": "fp32 storage, tf32 matrix products",
                 "exact": "fp32 exact"}[math] + (", Mamba recomputed" if step.get("recompute_mamba") else "")
    peak = step.get("peak_gib")
    rows.append(dict(config=config, pim_layout=layout, precision=precision, batch=int(batch),
                     ms_per_step=round(step["ms_per_step_median"], 1),
                     peak_gib=None if peak is None else round(peak, 2), gpu=step["device"],
                     date=datetime.date.today().isoformat()))
json.dump(rows, open(sys.argv[1], "w"), indent=1)
print("| config | PiM | precision | batch | ms per step | peak GiB | GPU |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(str(r[k]) for k in ("config", "pim_layout", "precision", "batch", "ms_per_step", "peak_gib", "gpu")) + " |")
' "$out/step.json"
