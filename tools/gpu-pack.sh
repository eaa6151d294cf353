#!/usr/bin/env bash
# Builds the release binary, the GPU test executables (tests/gpu_*.rs, whose tests are #[ignore]d here, and the test
# files with device tests, whose `NAME::gpu` runs are) and the kernel benchmark with the CUDA kernels embedded, and
# copies them into .gpu/ (git-ignored) so that they can be carried to a GPU machine that has no Rust toolchain (the
# CPU tests are left out: they run here and in CI).
# There: bash tools/gpu-run.sh. The binaries are stripped, and also packed into .gpu.tar.xz (about a fifth of the
# size) for carriers with a size limit: there, `tar xJf .gpu.tar.xz` first. The device tool carries at most 64 MiB:
# with every test binary the archive is larger (83 MB with xz -3 at 30 binaries), so PACK_TESTS="gpu_ops gpu_layout ..."
# (names of .gpu/tests) packs only those tests into the archive (the release binary, the benchmark and the --before
# binaries always), and the script says when the archive is over 64 MiB.
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
packed=(.gpu/lkm-engine)
[ -d .gpu/before ] && packed+=(.gpu/before)
if [ -n "${PACK_TESTS:-}" ]; then
  for t in $PACK_TESTS kernels; do
    [ -e ".gpu/tests/$t" ] || { echo "PACK_TESTS: no test executable .gpu/tests/$t" >&2; exit 2; }
    packed+=(".gpu/tests/$t")
  done
else
  packed+=(.gpu/tests)
fi
tar cf - "${packed[@]}" | xz -T0 -6 >.gpu.tar.xz
if [ "$(stat -c %s .gpu.tar.xz)" -gt $((64 << 20)) ]; then
  echo "warning: .gpu.tar.xz is over 64 MiB, more than the device tool carries: set PACK_TESTS" >&2
fi
ls -la .gpu/tests | tail -n +2
du -sh .gpu .gpu.tar.xz
