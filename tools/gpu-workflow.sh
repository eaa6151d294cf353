#!/usr/bin/env bash
# On a GPU machine (after tools/gpu-pack.sh here): the end-to-end checks of the train issue.
#   1. the 3D reference configuration (flare-3d) trains on 40 x 224 x 192 patches, batch 2, of synthetic volumes of
#      that scale: step time and peak memory;
#   2. a run on the real chest CT of tests/fixtures/ct-chest (one case: it trains and is scored on the same image,
#      so the Dice shows what the pipeline learns, not generalisation): predict, then evaluate;
#   3. precision (issue 12): the default phantom training in fp32 and in bf16, same seed, validation Dice side by
#      side (must agree within 0.01); then the fp32 run's model predicts the phantom images with --precision fp32
#      and bf16, and the label maps must agree on at least 99.9% of the voxels.
# Usage: bash tools/gpu-workflow.sh [flare|ct|precision|all]   (logs under ${OUT:-/tmp/out})
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

if [ "$what" = precision ] || [ "$what" = all ]; then
  for p in fp32 bf16; do
    $bin train --device cuda --precision $p --epochs ${PREC_EPOCHS:-10} --seed 1 --out "$work/prec-$p" --no-progress \
      >"$out/precision_train_$p.log" 2>&1 || { echo "train $p failed"; tail -n 3 "$out/precision_train_$p.log"; }
  done
  $bin synth --out "$work/prec-data" --cases 6 >/dev/null
  for p in fp32 bf16; do
    $bin predict --model "$work/prec-fp32/latest.safetensors" --input "$work/prec-data/imagesTr" \
      --output "$work/prec-pred-$p" --device cuda --precision $p >"$out/precision_predict_$p.log" 2>&1 ||
      { echo "predict $p failed"; tail -n 3 "$out/precision_predict_$p.log"; }
  done
  python3 - "$work" <<'PY' | tee "$out/precision.txt"
import gzip, json, os, struct, sys
import numpy as np
work = sys.argv[1]

def last_dice(run):
    rows = [json.loads(l) for l in open(f"{work}/{run}/metrics.jsonl") if l.strip()]
    rows = [r for r in rows if r.get("val_mean_dice") is not None]
    return rows[-1]["val_mean_dice"], rows[-1].get("epoch")

def labels(path):
    raw = gzip.open(path).read()
    dims = struct.unpack("<8h", raw[40:56])
    code = struct.unpack("<h", raw[70:72])[0]
    offset = int(struct.unpack("<f", raw[108:112])[0])
    dtype = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 512: np.uint16}[code]
    return np.frombuffer(raw[offset:], dtype=dtype, count=int(np.prod(dims[1:1 + dims[0]])))

d32, e32 = last_dice("prec-fp32")
d16, e16 = last_dice("prec-bf16")
print(f"validation mean Dice after epoch {e32}: fp32 {d32:.4f}, bf16 {d16:.4f}, |difference| {abs(d32 - d16):.4f} "
      f"(limit 0.01): {'PASS' if abs(d32 - d16) <= 0.01 else 'FAIL'}")
same = total = 0
for name in sorted(os.listdir(f"{work}/prec-pred-fp32")):
    a, b = labels(f"{work}/prec-pred-fp32/{name}"), labels(f"{work}/prec-pred-bf16/{name}")
    same += int(np.sum(a == b))
    total += a.size
print(f"predict, one fp32-trained model, --precision fp32 vs bf16: {same} of {total} voxels agree "
      f"({100 * same / max(total, 1):.3f}%, limit 99.9%): {'PASS' if same >= 0.999 * total else 'FAIL'}")
PY
fi
