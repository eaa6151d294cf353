#!/usr/bin/env bash
# On a GPU machine, after tools/gpu-pack.sh here: runs every GPU test (the ignored ones) and, with --bench, the kernel
# benchmark beside the PyTorch yardstick. Writes logs and tables to ${OUT:-/tmp/out}; prints a summary last.
#
# --convs: only the per-shape convolution table (every convolution of the flare-3d and amos-2d steps, each role, bf16
# and tf32, beside cuDNN bf16 channels-last and tf32; benches/kernels/convs.rs), no tests: $OUT/convs.md. Both
# configurations and maths take about 6 minutes; CONVS_CONFIG (flare-3d or amos-2d), CONVS_MATHS (bf16 or tf32) and
# CONVS_STRIDED=1 (the strided convs only, not the transposed: the stage entries) time a part of it. The kernel benchmark of every --rev binary of tools/gpu-pack.sh (.gpu/NAME/kernels) is timed
# too, against the same cuDNN run, into $OUT/convs-NAME.md, each compared with the packed tree's by
# tools/conv_totals.py (the shapes whose time changed by more than 5%): a change's per-shape table in one call.
#
# --sanitize: also runs every GPU test binary under compute-sanitizer memcheck (out-of-bounds and misaligned
# accesses, use of freed memory, API errors), and the kernel-heavy ones, whose threads share memory (scan, norms,
# reductions, convolution: gpu_mamba_ops, gpu_norm_pool, gpu_loss, gpu_conv), under racecheck (shared-memory
# hazards) and synccheck (barrier misuse). Each tool's summary line ("ERROR SUMMARY: N errors", racecheck's
# "RACECHECK SUMMARY: ...") goes into the final summary. compute-sanitizer is taken from $COMPUTE_SANITIZER, PATH,
# $CUDA_HOME/bin or /usr/local/cuda/bin. The sanitizer runs go side by side (SANITIZE_JOBS, SANITIZE_TIMEOUT).
set -uo pipefail
cd "$(dirname "$0")/.."
bench=0 sanitize=0 convs=0
for arg in "$@"; do
  case "$arg" in
    --bench) bench=1 ;;
    --sanitize) sanitize=1 ;;
    --convs) convs=1 ;;
    *) echo "usage: $0 [--bench] [--sanitize] [--convs]" >&2; exit 2 ;;
  esac
done
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
if [ "$convs" = 1 ]; then
  .gpu/tests/kernels --list-convs "$out/convs.json"
  python3 -c 'import json, sys
config, strided = sys.argv[2], sys.argv[3] == "1"
shapes = [c for c in json.load(open(sys.argv[1])) if config in ("", c["config"])]
shapes = [c for c in shapes if not strided or (max(c["stride"]) > 1 and not c["transposed"])]
json.dump(shapes, open(sys.argv[1], "w"))' "$out/convs.json" "${CONVS_CONFIG:-}" "${CONVS_STRIDED:-0}"
  maths=${CONVS_MATHS:-bf16,tf32}
  variants=$(echo "$maths" | sed 's/bf16/bf16_cl/')
  # cuDNN's roles are timed as CUDA graph replays, the GPU's time alone as ours is; CONVS_EAGER=1 times them as
  # PyTorch runs them eagerly (autograd's host time of about 0.08 ms a call included: tools/bench_torch.py --eager).
  python3 tools/bench_torch.py --convs "$out/convs.json" --out "$out" --variants "$variants" ${CONVS_EAGER:+--eager} \
    >"$out/torch_convs.log" 2>&1 ||
    { echo "torch conv bench failed"; tail -n 5 "$out/torch_convs.log"; }
  .gpu/tests/kernels --convs "$out/convs.json" --torch "$out/torch_convs.json" --out "$out/convs.md" --maths "$maths" \
    2>"$out/kernels_convs.log" >/dev/null || tail -n 5 "$out/kernels_convs.log"
  cat "$out/convs.md"
  for bin in .gpu/*/kernels; do
    [ -x "$bin" ] || continue
    name=$(basename "$(dirname "$bin")")
    [ "$name" = tests ] && continue
    "$bin" --convs "$out/convs.json" --torch "$out/torch_convs.json" --out "$out/convs-$name.md" --maths "$maths" \
      2>"$out/kernels_convs-$name.log" >/dev/null || tail -n 5 "$out/kernels_convs-$name.log"
    echo "== $name (before) against the packed tree (after)"
    python3 tools/conv_totals.py "$out/convs-$name.md" "$out/convs.md" --min-change 0.05
  done
  exit 0
fi
# NCCL for gpu_distributed: cudarc loads `libnccl.so`; where only libnccl.so.2 exists (the system's, or PyTorch's
# wheel), link it under that name. NVLink multicast stays off on the lent machines (KINDS.md of the device tool).
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then
  nccl=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 /{print $NF; exit}')
  [ -z "$nccl" ] && nccl=$(python3 -c 'import nvidia.nccl as m; print(m.__path__[0] + "/lib/libnccl.so.2")' 2>/dev/null)
  if [ -n "$nccl" ] && [ -e "$nccl" ]; then
    mkdir -p "$out/nccl" && ln -sf "$nccl" "$out/nccl/libnccl.so"
    export LD_LIBRARY_PATH="$out/nccl:${LD_LIBRARY_PATH:-}"
    echo "NCCL: $nccl"
  fi
fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
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
# Every (binary, tool) run is independent: "plain" runs a test binary as it is, the others under compute-sanitizer.
# Without --sanitize the plain runs go one at a time; with it all runs go side by side (SANITIZE_JOBS at once, default
# 6; each under SANITIZE_TIMEOUT seconds, default none), since memcheck multiplies the binaries' run time.
runs=()
for t in .gpu/tests/*; do
  name=$(basename "$t")
  [ "$name" = kernels ] && continue
  runs+=("plain $name")
  [ "$sanitize" = 1 ] || continue
  runs+=("memcheck $name")
  case "$name" in gpu_mamba_ops | gpu_norm_pool | gpu_loss | gpu_conv) runs+=("racecheck $name" "synccheck $name") ;; esac
done
parallel=1
[ "$sanitize" = 1 ] && parallel=${SANITIZE_JOBS:-6}
printf '%s\n' "${runs[@]}" | xargs -P "$parallel" -L 1 sh -c '
  if [ "$2" = plain ]; then
    ".gpu/tests/$3" --ignored --test-threads=1 >"$0/test_$3.log" 2>&1
  else
    log="$0/sanitize_$2_$3.log"
    # Two exceptions, each narrow. NCCL (gpu_distributed) asks cudaFuncGetAttributes for kernels it ships for other
    # architectures while it initialises a communicator, gets "no kernel image" (error 209) and handles it: 4 API
    # errors per run, inside libnccl, none in our code (our own API errors fail the test anyway). Memory accesses are
    # still checked there. racecheck serialises the block, so the full-size convolution test alone runs past 500 s;
    # its kernels are the ones the smaller gpu_conv tests check.
    flags=""
    [ "$3" = gpu_distributed ] && flags="--report-api-errors no"
    skip=""
    [ "$2/$3" = racecheck/gpu_conv ] && skip="--skip gpu_conv3d_reference_shape"
    timeout "${SANITIZE_TIMEOUT:-0}" "$1" --tool "$2" $flags --error-exitcode 1 ".gpu/tests/$3" --ignored \
      --test-threads=1 $skip >"$log" 2>&1
    echo "exit $?" >>"$log"
  fi' "$out" "${sanitizer:-none}"
summary=""
for run in "${runs[@]}"; do
  set -- $run
  if [ "$1" = plain ]; then
    line=$(grep -E "^test result" "$out/test_$2.log" | tail -n 1)
    summary+="$2: ${line:-CRASHED (see test_$2.log)}"$'\n'
  else
    log="$out/sanitize_$1_$2.log"
    line=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$log" | tail -n 1 | sed 's/^========= //')
    tests=$(grep -E "^test result" "$log" | tail -n 1 | cut -d';' -f1)
    summary+="  $2 $1: ${line:-no summary line (see $(basename "$log"))}; ${tests:-no test result}; $(tail -n 1 "$log")"$'\n'
  fi
done
if [ "$bench" = 1 ]; then
  python3 tools/bench_torch.py --out "$out" >"$out/torch_bench.log" 2>&1 || echo "torch bench failed" >>"$out/torch_bench.log"
  .gpu/tests/kernels --torch "$out/torch_bench.json" --out "$out/kernels.md" >/dev/null 2>"$out/kernels.log"
  cat "$out/kernels.md" 2>/dev/null || tail -n 20 "$out/kernels.log"
fi
grep -h -B2 -A12 "^failures:" "$out"/test_*.log | head -n 80
printf '%s' "$summary"
