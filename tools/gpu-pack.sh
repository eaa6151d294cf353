#!/usr/bin/env bash
# Builds the release binary, the GPU test executables (tests/gpu_*.rs, whose tests are #[ignore]d here, and the test
# files with device tests, whose `NAME::gpu` runs are) and the kernel benchmark with the CUDA kernels embedded, and
# copies them into .gpu/ (git-ignored) so that they can be carried to a GPU machine that has no Rust toolchain (the
# CPU tests are left out: they run here and in CI).
# There: bash tools/gpu-run.sh. The binaries are stripped, and also packed into .gpu.tar.xz (about a quarter of the
# size) for carriers with a size limit: there, `tar xJf .gpu.tar.xz` first.
set -euo pipefail
cd "$(dirname "$0")/.."
export LKM_REQUIRE_NVCC=1
rm -rf .gpu && mkdir -p .gpu/tests
cargo build --release
cp target/release/lkm-engine .gpu/
for kind in "test --release --no-run" "bench --no-run"; do
  # shellcheck disable=SC2086
  cargo $kind --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do
      case "$name" in
        gpu_* | kernels | profile) cp "$exe" ".gpu/tests/$name" ;;
        # A CPU test file with device tests (tests/common's device_test!) holds ignored GPU runs of its checks too.
        *) if grep -q 'device_test!(' "tests/$name.rs" 2>/dev/null; then cp "$exe" ".gpu/tests/$name"; fi ;;
      esac
    done
done
strip .gpu/lkm-engine .gpu/tests/*
tar cf - .gpu | xz -T0 -3 >.gpu.tar.xz
ls -la .gpu/tests | tail -n +2
du -sh .gpu .gpu.tar.xz
