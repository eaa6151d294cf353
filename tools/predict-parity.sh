#!/usr/bin/env bash
# A checkpoint written by PyTorch, segmented by lkm-engine and by PyTorch (tools/predict_parity.py): synthetic
# phantoms (4 to train on, 1 held out), the PyTorch reference trains tiny-3d for STEPS steps and saves an
# nnU-Net-style .pth, tools/convert_pth.py turns it into lkm-engine's safetensors, `lkm-engine predict` segments the
# held-out case, and PyTorch segments it too; the two label maps are compared voxel by voxel.
# Usage: bash tools/predict-parity.sh [DEVICE (cpu|cuda, default cpu)] [STEPS (default 150)]
# Needs python3 with torch and numpy, and the release binary (cargo build --release, or .gpu/lkm-engine).
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cpu}
steps=${2:-150}
bin=target/release/lkm-engine
[ -x "$bin" ] || bin=.gpu/lkm-engine
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" synth --out "$work/ds" --cases 5 --shape 48,48,48
mkdir "$work/test"
mv "$work/ds/imagesTr/phantom_0004_0000.nii.gz" "$work/ds/labelsTr/phantom_0004.nii.gz" "$work/test/"
python3 tools/predict_parity.py train "$work/ds" "$work/model.pth" --steps "$steps" --device "$device"
python3 tools/convert_pth.py pth2st "$work/model.pth" "$work/model.safetensors" --config-name tiny-3d
"$bin" predict --model "$work/model.safetensors" --input "$work/test/phantom_0004_0000.nii.gz" --output "$work/ours" \
  --device "$device"
python3 tools/predict_parity.py compare "$work/model.pth" "$work/test/phantom_0004_0000.nii.gz" \
  "$work/ours/phantom_0004.nii.gz" --truth "$work/test/phantom_0004.nii.gz" --device "$device"
