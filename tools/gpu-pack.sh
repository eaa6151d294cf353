#!/usr/bin/env bash
# Builds the release binary, the GPU test executables (tests/gpu_*.rs, whose tests are #[ignore]d here, and the test
# files with device tests, whose `NAME::gpu` runs are) and the kernel benchmark with the CUDA kernels embedded, and
# copies them into .gpu/ (git-ignored) so that they can be carried to a GPU machine that has no Rust toolchain (the
# CPU tests are left out: they run here and in CI).
# There: bash tools/gpu-run.sh. The binaries are stripped, and also packed into .gpu.tar.xz (about a fifth of the
# size) for carriers with a size limit: there, `tar xJf .gpu.tar.xz` first. The device tool carries at most 64 MiB:
# with every test binary the archive is larger (83 MB with xz -3 at 30 binaries), so PACK_TESTS="gpu_ops gpu_layout ..."
# (names of .gpu/tests) builds and packs only those tests (the release binary, the benchmark and the --rev binaries
# always; 1.5 instead of 4-6 minutes here), and the script says when the archive is over 64 MiB.
#
# --rev NAME=REV (repeatable): also builds revision REV (a branch, a commit) and adds its release binary and kernel
# benchmark as .gpu/NAME/lkm-engine and .gpu/NAME/kernels, so that several variants are timed in one device call
# (BIN=.gpu/NAME/lkm-engine bash tools/gpu-step.sh beside the plain run; .gpu/NAME/kernels --convs ... beside
# .gpu/tests/kernels). Each is built in a detached worktree (target/rev-src) into one target dir (target/revs), so a
# revision that differs from the last in a few files rebuilds only those. --before REV is --rev before=REV.
set -euo pipefail
cd "$(dirname "$0")/.."
# The worktrees of --rev builds have no .toolchain of their own: nvcc comes from this checkout's (tools/install-nvcc.sh).
export LKM_REQUIRE_NVCC=1 PATH="$PWD/.toolchain/cuda/bin:$PATH"
revs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --before) revs+=("before=${2:?--before needs a revision}"); shift 2 ;;
    --rev)
      case "${2:-}" in
        ?*=?*) revs+=("$2"); shift 2 ;;
        *) echo "--rev needs NAME=REV" >&2; exit 2 ;;
      esac ;;
    *) echo "usage: $0 [--before REV] [--rev NAME=REV]..." >&2; exit 2 ;;
  esac
done
rm -rf .gpu && mkdir -p .gpu/tests
root=$PWD
for rev in "${revs[@]}"; do
  name=${rev%%=*} commit=${rev#*=}
  case "$name" in
    tests | lkm-engine | *[!A-Za-z0-9._-]*) echo "--rev: NAME must be letters, digits, . _ - and not $name" >&2; exit 2 ;;
  esac
  git worktree remove --force target/rev-src 2>/dev/null || true
  git worktree add --detach target/rev-src "$commit" >/dev/null
  (cd target/rev-src && CARGO_TARGET_DIR="$root/target/revs" cargo build --release &&
    CARGO_TARGET_DIR="$root/target/revs" cargo bench --no-run --bench kernels --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "kernels":
        print(m["executable"])' >"$root/target/rev-kernels.txt")
  mkdir -p ".gpu/$name"
  cp target/revs/release/lkm-engine ".gpu/$name/"
  cp "$(cat target/rev-kernels.txt)" ".gpu/$name/kernels"
  git worktree remove --force target/rev-src
  strip ".gpu/$name"/*
done
cargo build --release
cp target/release/lkm-engine .gpu/
# With PACK_TESTS, only those test executables (and the benchmark) are built: linking all of them takes minutes.
kinds=("test --release --no-run" "bench --no-run")
if [ -n "${PACK_TESTS:-}" ]; then
  kinds=("test --release --no-run$(printf ' --test %s' $PACK_TESTS)" "bench --no-run --bench kernels")
fi
for kind in "${kinds[@]}"; do
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
for rev in "${revs[@]}"; do packed+=(".gpu/${rev%%=*}"); done
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
