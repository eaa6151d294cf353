#!/usr/bin/env bash
# On a GPU machine (after tools/gpu-pack.sh here): the end-to-end checks of the train issue.
#   1. the 3D reference configuration (flare-3d) trains on 40 x 224 x 192 patches, batch 2, of synthetic volumes of
#      that scale: step time and peak memory;
#   2. a run on the real chest CT of tests/fixtures/ct-chest (one case: it trains and is scored on the same image,
#      so the Dice shows what the pipeline learns, not generalisation): predict, then evaluate.
# Usage: bash tools/gpu-workflow.sh [flare|ct|all]   (logs under ${OUT:-/tmp/out})
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}
mkdir -p "$out"
bin=.gpu/lkm-engine
what=${1:-all}
work=$(mktemp -d)

if [ "$what" = flare ] || [ "$what" = all ]; then
  $bin synth --out "$work/phantoms" --cases 4 --shape 48,256,224 >/dev/null
  $bin train --data "$work/phantoms" --config flare-3d --epochs 1 --iters ${FLARE_ITERS:-20} --batch 2 \
    --device cuda --val-fraction 0 --out "$work/flare" --no-progress 2>&1 | tee "$out/flare_train.log" | tail -n 3
fi

if [ "$what" = ct ] || [ "$what" = all ]; then
  ds="$work/ct"
  mkdir -p "$ds/imagesTr" "$ds/labelsTr"
  cp tests/fixtures/ct-chest/image.nii.gz "$ds/imagesTr/chest_0000.nii.gz"
  cp tests/fixtures/ct-chest/label.nii.gz "$ds/labelsTr/chest.nii.gz"
  python3 - "$ds" <<'PY'
import json, sys
labels = {}
for line in open("tests/fixtures/ct-chest/labels.txt"):
    v, name = line.split(maxsplit=1)
    labels[name.strip().replace(" ", "_")] = int(v)
json.dump({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"},
          open(sys.argv[1] + "/dataset.json", "w"))
PY
  # Right and left lung are separate classes: mirroring would teach the network to confuse them.
  $bin train --data "$ds" --config tiny-3d --patch 32,128,128 --epochs ${CT_EPOCHS:-40} --iters 25 --batch 2 \
    --no-mirror --device cuda --val-fraction 0 --out "$work/ct-run" --no-progress 2>&1 | tee "$out/ct_train.log" | tail -n 2
  $bin predict --model "$work/ct-run/latest.safetensors" --input "$ds/imagesTr" --output "$work/ct-pred" --device cuda
  $bin evaluate --pred "$work/ct-pred" --ref "$ds/labelsTr" --classes 8 --tolerance 3 --csv "$out/ct_scores.csv" \
    | tee "$out/ct_eval.txt"
  $bin evaluate --pred "$work/ct-pred" --ref "$ds/labelsTr" --tolerance 3 --group lungs=5,6 --group spine=2,3,4 \
    --group ribs=1 --csv "$out/ct_scores_grouped.csv" | tee "$out/ct_eval_grouped.txt"
fi
