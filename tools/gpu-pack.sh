#!/usr/bin/env bash
# Builds the release binary, the GPU test executables (tests/gpu_*.rs, whose tests are #[ignore]d here, and the test
# files with device tests, whose `NAME::gpu` runs are) and the kernel benchmark with the CUDA kernels embedded, and
# copies them into .gpu/ (git-ignored) so that they can be carried to a GPU machine that has no Rust toolchain (the
# CPU tests are left out: they run here and in CI).
# There: bash tools/gpu-run.sh. The binaries are stripped, and also packed into .gpu.tar.xz (about a quarter of the
# size) for carriers with a size limit: there, `tar xJf .gpu.tar.xz` first.
#
# --before REV: also builds revision REV (a detached worktree in target/before-src, its own target dir
# target/before, so later builds are incremental) and adds its release binary and kernel benchmark as
# .gpu/before/lkm-engine and .gpu/before/kernels: a before/after pair measured in one device call
# (BIN=.gpu/before/lkm-engine bash tools/gpu-step.sh beside the plain run).
set -euo pipefail
cd "$(dirname "$0")/.."
export LKM_REQUIRE_NVCC=1
before=""
case "${1:-}" in
  --before) before=${2:?--before needs a revision} ;;
  "") ;;
  *) echo "usage: $0 [--before REV]" >&2; exit 2 ;;
esac
rm -rf .gpu && mkdir -p .gpu/tests
if [ -n "$before" ]; then
  root=$PWD
  git worktree remove --force target/before-src 2>/dev/null || true
  git worktree add --detach target/before-src "$before" >/dev/null
  (cd target/before-src && CARGO_TARGET_DIR="$root/target/before" cargo build --release &&
    CARGO_TARGET_DIR="$root/target/before" cargo bench --no-run --bench kernels --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "kernels":
        print(m["executable"])' >"$root/target/before-kernels.txt")
  mkdir -p .gpu/before
  cp target/before/release/lkm-engine .gpu/before/
  cp "$(cat target/before-kernels.txt)" .gpu/before/kernels
  git worktree remove --force target/before-src
  strip .gpu/before/*
fi
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
