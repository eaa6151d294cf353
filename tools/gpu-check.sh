#!/usr/bin/env bash
# On a GPU machine, after `tools/gpu-pack.sh --rev base=REV` here: one change's whole check in one device call, each
# part under its own time limit so that the summary is always printed, last:
#   tests    every packed test binary (.gpu/tests/*, the benchmark excepted; TESTS="gpu_mamba_ops ..." names some)
#            with --ignored, one thread: the GPU tests and the device_test files' NAME::gpu runs; each file's
#            "test result" line and failed tests, or that it timed out
#   revs     the step of base and the packed binary, ROUNDS rounds (tools/gpu-revs.sh; MATHS, RUNS as there)
#   rows     the kernel benchmark's rows whose names contain ROWS (default "linear"), base's binary and the packed one
#   profile  `profile` of the packed binary: flare-3d b2 bf16, strided PiM, the top ops
#   parity   the bf16 step against float64 beside PyTorch's autocast (tools/gpu-parity.sh --bf16)
# PARTS (default "tests revs rows profile parity") picks the parts and their order; each part's limit in seconds:
# TESTS_S (per test file, default 150), REVS_S (300), ROWS_S (90), PROFILE_S (90), PARITY_S (150). The device tool
# allows 600 s a call: pick PARTS to fit. Logs under ${OUT:-/tmp/out}.
#
# Usage: bash tools/gpu-check.sh     e.g. PARTS="tests revs" ROUNDS=1 bash tools/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}
mkdir -p "$out"
summary=()
note() { summary+=("$1"); }
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
for part in ${PARTS:-tests revs rows profile parity}; do
  case "$part" in
    tests)
      exes=(.gpu/tests/*)
      [ -n "${TESTS:-}" ] && read -ra exes <<<"$(printf '.gpu/tests/%s ' $TESTS)"
      for exe in "${exes[@]}"; do
        name=$(basename "$exe")
        [ "$name" = kernels ] && continue
        timeout "${TESTS_S:-150}" "$exe" --ignored --test-threads 1 >"$out/test_$name.log" 2>&1
        rc=$?
        result=$(grep -E "^test result" "$out/test_$name.log" | tail -n 1)
        failed=$(grep -E "^test .* FAILED$" "$out/test_$name.log" | sed 's/^test //; s/ \.\.\. FAILED$//' | tr '\n' ' ')
        [ "$rc" = 124 ] && result="timed out after ${TESTS_S:-150} s"
        note "$name: ${result:-no result (exit $rc)}${failed:+ FAILED: $failed}"
      done ;;
    revs)
      ROUNDS=${ROUNDS:-2} OUT="$out" timeout "${REVS_S:-300}" bash tools/gpu-revs.sh base packed >"$out/revs.log" 2>&1 ||
        note "revs: exit $? (see revs.log)"
      note "$(sed -n '/^| binary/,$p' "$out/revs.log")" ;;
    rows)
      for bin in base packed; do
        exe=.gpu/tests/kernels
        [ "$bin" = base ] && exe=.gpu/base/kernels
        timeout "${ROWS_S:-90}" "$exe" --only "${ROWS:-linear}" --out "$out/rows_$bin.md" >"$out/rows_$bin.log" 2>&1 ||
          note "rows $bin: exit $? (see rows_$bin.log)"
        [ -f "$out/rows_$bin.md" ] && note "rows of $bin:"$'\n'"$(cat "$out/rows_$bin.md")"
      done ;;
    profile)
      timeout "${PROFILE_S:-90}" .gpu/lkm-engine profile --config flare-3d --batch 2 --pim-layout strided \
        --precision bf16 --steps 2 --device cuda --top 40 >"$out/profile.txt" 2>&1 ||
        note "profile: exit $? (see profile.txt)"
      note "profile: $(grep -E "^step: " "$out/profile.txt" | head -n 1)" ;;
    parity)
      OUT="$out" timeout "${PARITY_S:-150}" bash tools/gpu-parity.sh --bf16 tiny-3d:strided:2:0:8 amos-2d:strided:2:0 \
        >"$out/parity.log" 2>&1
      note "parity (exit $?): $(grep -E "PASS|FAIL" "$out/parity.log" | tr '\n' ' ')" ;;
    *) echo "unknown part $part (tests revs rows profile parity)" >&2; exit 2 ;;
  esac
done
echo
echo "== GPU: $gpu"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
