#!/usr/bin/env bash
# On a GPU machine, after tools/gpu-pack.sh here: runs every GPU test (the ignored ones) and, with --bench, the kernel
# benchmark beside the PyTorch yardstick. Writes logs and tables to ${OUT:-/tmp/out}; prints a summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
summary=""
for t in .gpu/tests/*; do
  name=$(basename "$t")
  [ "$name" = kernels ] && continue
  "$t" --ignored --test-threads=1 >"$out/test_$name.log" 2>&1
  line=$(grep -E "^test result" "$out/test_$name.log" | tail -n 1)
  summary+="$name: ${line:-CRASHED (see test_$name.log)}"$'\n'
done
if [ "${1:-}" = "--bench" ]; then
  python3 tools/bench_torch.py --out "$out" >"$out/torch_bench.log" 2>&1 || echo "torch bench failed" >>"$out/torch_bench.log"
  .gpu/tests/kernels --torch "$out/torch_bench.json" --out "$out/kernels.md" >/dev/null 2>"$out/kernels.log"
  cat "$out/kernels.md" 2>/dev/null || tail -n 20 "$out/kernels.log"
fi
grep -h -B2 -A12 "^failures:" "$out"/test_*.log | head -n 80
printf '%s' "$summary"
