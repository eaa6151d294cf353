#!/usr/bin/env bash
# On a GPU machine, after tools/gpu-pack.sh here: Nsight Compute on the kernels of a few convolution shapes or
# kernel-benchmark rows, one summary line per kernel (tools/ncu_summary.py: duration, tensor pipe, SM and DRAM
# throughput, occupancy, registers, shared memory, the largest stall reasons): the analysis the tensor-core
# convolution issue asks for below 0.7x cuDNN.
#
# Usage: bash tools/gpu-ncu.sh CONFIG LAYER[,LAYER...]                   e.g. flare-3d encoder.stages.1.blocks.0.conv2
#        bash tools/gpu-ncu.sh --only ROW_SUBSTRING [KERNEL_REGEX]        e.g. --only "selective_scan PiM stage 0" scan_backward
# The convolution form runs each layer in bf16 (`kernels --convs` on a list cut to it) and profiles the first
# launch of each role's product kernel (forward, input gradient, weight gradient: conv_ROLE_bf16, its _halo_,
# _wgmma_, _wgmma_cl_, _implicit_wgmma_, _gemm_wgmma_, _tma_ and _n32 forms, conv_transpose_ROLE_*; not the weight
# packing, the channels-last copy or the explicit products' row gathers). The --only form profiles the first
# LAUNCHES (default 2) launches whose name matches KERNEL_REGEX (default: any). --set full replays each launch about
# 40 times; the clocks are left as the card runs them (--clock-control none: ncu would otherwise hold the SM at its
# base clock, 1.36 GHz).
# Writes ${OUT:-/tmp/out}/ncu_<tag>_<part>.{ncu-rep,csv,log} and ncu_<tag>.md; prints the table. SASS=1 also writes
# each part's per-instruction source page, ncu_<tag>_<part>.sass.csv (tools/ncu_sass.py ranks its stalls).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}
mkdir -p "$out"
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
launches=${LAUNCHES:-2}
kernels=${KERNELS:-.gpu/tests/kernels}  # the kernel benchmark (e.g. another build's, for a before/after pair)
if [ "${1:-}" = --only ]; then
  row=${2:?--only needs a kernel-benchmark row name}
  parts=("kernels:${3:-.}:$launches:")
  tag=$(echo "$row" | tr -c 'A-Za-z0-9' '_')
  cmd=("$kernels" --only "$row")
else
  config=${1:?usage: gpu-ncu.sh CONFIG LAYER[,LAYER...] | --only ROW [KERNEL_REGEX]}
  layers=${2:?which layers (comma-separated)}
  tag="${config}_$(echo "$layers" | tr -c 'A-Za-z0-9' '_')"
  "$kernels" --list-convs "$out/ncu_all.json" 2>/dev/null
  # One list per layer (the benchmark times a list layer by layer, so a role's first launch is its first layer's).
  parts=()
  IFS=, read -ra layer_list <<<"$layers"
  for layer in "${layer_list[@]}"; do
    list="$out/ncu_$(echo "$config $layer" | tr -c 'A-Za-z0-9' '_').json"
    python3 -c 'import json, sys
shapes = [c for c in json.load(open(sys.argv[1])) if c["config"] == sys.argv[2] and c["layer"] == sys.argv[3]]
if not shapes:
    sys.exit(f"no shape of {sys.argv[2]} is named {sys.argv[3]} (kernels --list-convs lists them)")
json.dump(shapes, open(sys.argv[4], "w"))' "$out/ncu_all.json" "$config" "$layer" "$list" || exit 1
    for role in fprop dgrad wgrad; do
      kinds="halo|wgmma|wgmma_cl|implicit_wgmma|gemm_wgmma|tma"
      parts+=("$layer $role:^conv_(transpose_)?${role}_(($kinds)_)?bf16:1:$list")
    done
  done
fi
rm -f "$out/ncu_$tag.md"
for part in "${parts[@]}"; do
  IFS=: read -r name regex count list <<<"$part"
  [ -n "$list" ] && cmd=("$kernels" --convs "$list" --maths bf16)
  rep="$out/ncu_${tag}_$(echo "$name" | tr -c 'A-Za-z0-9' '_')"
  echo "### $name" >>"$out/ncu_$tag.md"
  if ! timeout "${NCU_TIMEOUT:-300}" "$ncu" --set full --clock-control none --kernel-name "regex:$regex" \
    --launch-count "$count" -f -o "$rep" "${cmd[@]}" >"$rep.log" 2>&1; then
    echo "ncu failed: $(tail -n 3 "$rep.log")" >>"$out/ncu_$tag.md"
    continue
  fi
  "$ncu" --import "$rep.ncu-rep" --page raw --csv >"$rep.csv" 2>>"$rep.log"
  python3 tools/ncu_summary.py "$rep.csv" >>"$out/ncu_$tag.md" 2>&1
  # SASS=1: also the per-instruction page (stall samples of every SASS instruction), for tools/ncu_sass.py.
  if [ "${SASS:-0}" = 1 ]; then
    "$ncu" --import "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.sass.csv" 2>>"$rep.log" ||
      echo "sass page failed: $(tail -n 2 "$rep.log")" >>"$out/ncu_$tag.md"
  fi
done
cat "$out/ncu_$tag.md"
