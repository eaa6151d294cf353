#!/usr/bin/env bash
# Runs GPU tests on this machine's CPU through cuda-emu (tools/cuda-emu/build.py: a stand-in libcuda.so built from
# cuda/*.cu), for a machine without a GPU. Slow (minutes per test file), and not a substitute for the GPU: it checks the
# kernels' logic, indexing, synchronisation and host contract, not their speed nor the GPU's last bits.
#
#   bash tools/cuda-emu/run.sh gpu_conv gpu_mamba_ops          # these test files' GPU tests (their --ignored ones)
#   bash tools/cuda-emu/run.sh gpu_conv -- gpu_conv_stride      # only the tests whose names contain a filter
#   bash tools/cuda-emu/run.sh grad_mamba_ops -- ::gpu           # a file's device_test! GPU runs
#   CUDA_EMU_SMS=3 bash tools/cuda-emu/run.sh gpu_conv -- tma   # a GPU of 3 SMs (default 132): persistent grids loop
#
# The kernels come from the library, built from the working tree's cuda/ (not from the test binary), so the two
# must be of the same revision: the script builds both from the working tree. A kernel that deadlocks (a barrier some
# threads never reach), reads or writes past the end of a buffer, or uses PTX the emulator does not know, stops the
# test with a message naming the kernel and block.
set -euo pipefail
cd "$(dirname "$0")/../.."
export LKM_REQUIRE_NVCC=1 PATH="$PWD/.toolchain/cuda/bin:$PATH"
names=() filters=()
while [ $# -gt 0 ]; do
  if [ "$1" = -- ]; then shift; filters=("$@"); break; fi
  names+=("$1"); shift
done
[ ${#names[@]} -gt 0 ] || { echo "usage: $0 TEST_FILE... [-- FILTER...]" >&2; exit 2; }
python3 tools/cuda-emu/build.py
# shellcheck disable=SC2046
cargo test --release --no-run $(printf -- '--test %s ' "${names[@]}") --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' >target/cuda-emu/tests.txt
status=0
for name in "${names[@]}"; do
  exe=$(awk -v n="$name" '$1 == n {print $2}' target/cuda-emu/tests.txt)
  [ -n "$exe" ] || { echo "no test file $name" >&2; exit 2; }
  echo "== $name (cuda-emu)"
  LD_LIBRARY_PATH="$PWD/target/cuda-emu" "$exe" --ignored --test-threads 1 "${filters[@]}" || status=1
done
exit $status
