#!/usr/bin/env bash
# On a GPU machine, after tools/gpu-pack.sh here: runs every GPU test (the ignored ones) and, with --bench, the kernel
# benchmark beside the PyTorch yardstick. Writes logs and tables to ${OUT:-/tmp/out}; prints a summary last.
#
# --sanitize: also runs every GPU test binary under compute-sanitizer memcheck (out-of-bounds and misaligned
# accesses, use of freed memory, API errors), and the kernel-heavy ones, whose threads share memory (scan, norms,
# reductions, convolution: gpu_mamba_ops, gpu_norm_pool, gpu_loss, gpu_conv), under racecheck (shared-memory
# hazards) and synccheck (barrier misuse). Each tool's summary line ("ERROR SUMMARY: N errors", racecheck's
# "RACECHECK SUMMARY: ...") goes into the final summary. compute-sanitizer is taken from $COMPUTE_SANITIZER, PATH,
# $CUDA_HOME/bin or /usr/local/cuda/bin.
set -uo pipefail
cd "$(dirname "$0")/.."
bench=0 sanitize=0
for arg in "$@"; do
  case "$arg" in
    --bench) bench=1 ;;
    --sanitize) sanitize=1 ;;
    *) echo "usage: $0 [--bench] [--sanitize]" >&2; exit 2 ;;
  esac
done
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
if [ "$sanitize" = 1 ]; then
  sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
  for dir in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin; do
    [ -z "$sanitizer" ] && [ -x "$dir/compute-sanitizer" ] && sanitizer="$dir/compute-sanitizer"
  done
  if [ -z "$sanitizer" ]; then
    echo "--sanitize: compute-sanitizer not found (set COMPUTE_SANITIZER, PATH or CUDA_HOME)" >&2
    exit 1
  fi
  "$sanitizer" --version | tail -n 1 | tee "$out/sanitizer.txt"
fi
summary=""
for t in .gpu/tests/*; do
  name=$(basename "$t")
  [ "$name" = kernels ] && continue
  "$t" --ignored --test-threads=1 >"$out/test_$name.log" 2>&1
  line=$(grep -E "^test result" "$out/test_$name.log" | tail -n 1)
  summary+="$name: ${line:-CRASHED (see test_$name.log)}"$'\n'
  [ "$sanitize" = 1 ] || continue
  tools=memcheck
  case "$name" in gpu_mamba_ops | gpu_norm_pool | gpu_loss | gpu_conv) tools="memcheck racecheck synccheck" ;; esac
  for tool in $tools; do
    log="$out/sanitize_${tool}_$name.log"
    "$sanitizer" --tool "$tool" --error-exitcode 1 "$t" --ignored --test-threads=1 >"$log" 2>&1
    rc=$?
    line=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$log" | tail -n 1 | sed 's/^========= //')
    summary+="  $tool: ${line:-no summary line (see $(basename "$log"))} (exit $rc)"$'\n'
  done
done
if [ "$bench" = 1 ]; then
  python3 tools/bench_torch.py --out "$out" >"$out/torch_bench.log" 2>&1 || echo "torch bench failed" >>"$out/torch_bench.log"
  .gpu/tests/kernels --torch "$out/torch_bench.json" --out "$out/kernels.md" >/dev/null 2>"$out/kernels.log"
  cat "$out/kernels.md" 2>/dev/null || tail -n 20 "$out/kernels.log"
fi
grep -h -B2 -A12 "^failures:" "$out"/test_*.log | head -n 80
printf '%s' "$summary"
