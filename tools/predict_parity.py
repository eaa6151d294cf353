#!/usr/bin/env python3
"""A checkpoint written by PyTorch, segmented by lkm-engine and by PyTorch: the same labels?

    python3 tools/predict_parity.py train DATASET OUT.pth [--config tiny-3d] [--steps 40] [--device cuda] [--seed 0]
    python3 tools/predict_parity.py compare MODEL.pth IMAGE_0000.nii.gz OURS.nii.gz [--truth LABEL.nii.gz]
                                    [--device cuda]

train: the PyTorch reference (tools/torch_lkmunet.py, nnU-Net's init) trains on an nnU-Net raw dataset (CT, one
channel; `lkm-engine synth` writes one) for --steps SGD steps (Nesterov, momentum 0.99, lr 1e-2, batch 2, random
patches, a third centred on foreground, deep-supervision DC+CE loss) and is saved as nnU-Net saves it:
{'network_weights': state_dict, 'init_args': {'plans': ..., 'configuration': '3d_fullres'}}, with the plans
holding the patch, the training spacing, CTNormalization and the foreground intensity statistics (0.5 / 99.5
percentiles, mean, std of the training foreground), which `tools/convert_pth.py pth2st` turns into lkm-engine's
checkpoint metadata.

compare: PyTorch segments IMAGE as `lkm-engine predict --no-mirror` does (the image must already be at the training
spacing: no resampling here): CT normalisation from the plans, nnU-Net's sliding window (half-patch steps,
Gaussian importance sigma = patch / 8, logits blended), argmax (first class wins ties). It then compares with OURS,
the label map lkm-engine wrote: voxel agreement, and per class the voxel counts of both and the Dice between them
(and against --truth). Exits 1 unless at least 99.9% of the voxels agree, and the segmentation uses at least two
classes (so that agreement is not vacuous).
"""
import argparse
import gzip
import math
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_lkmunet as tl  # noqa: E402

NIFTI_DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8,
                512: np.uint16, 768: np.uint32}


def read_nifti(path):
    """(array (z, y, x) float64 after scl_slope/inter, spacing (z, y, x)) of a 3D NIfTI-1 file (.nii or .nii.gz)."""
    raw = open(path, "rb").read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 352:
        raise SystemExit(f"{path}: too short for a NIfTI-1 header")
    end = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    if struct.unpack(end + "i", raw[:4])[0] != 348:
        raise SystemExit(f"{path}: not a NIfTI-1 file (sizeof_hdr is not 348)")
    dim = struct.unpack(end + "8h", raw[40:56])
    datatype = struct.unpack(end + "h", raw[70:72])[0]
    pixdim = struct.unpack(end + "8f", raw[76:108])
    offset = int(struct.unpack(end + "f", raw[108:112])[0])
    slope, inter = struct.unpack(end + "2f", raw[112:120])
    if datatype not in NIFTI_DTYPES:
        raise SystemExit(f"{path}: NIfTI datatype {datatype} is not supported here")
    if dim[0] < 3 or any(d > 1 for d in dim[4:dim[0] + 1]):
        raise SystemExit(f"{path}: expected a 3D volume, dim = {dim[:dim[0] + 1]}")
    nx, ny, nz = dim[1:4]
    dt = np.dtype(NIFTI_DTYPES[datatype]).newbyteorder(end)
    data = np.frombuffer(raw, dtype=dt, count=nx * ny * nz, offset=offset).reshape(nz, ny, nx).astype(np.float64)
    if slope not in (0.0, 1.0) or inter != 0.0:
        data = data * (slope if slope != 0.0 else 1.0) + inter
    return data, (abs(pixdim[3]), abs(pixdim[2]), abs(pixdim[1]))


def ct_normalize(img, props):
    """nnU-Net's CTNormalization: clip to the foreground 0.5 / 99.5 percentiles, z-score with the foreground stats."""
    lo, hi = props["percentile_00_5"], props["percentile_99_5"]
    return (np.clip(img, lo, hi) - props["mean"]) / max(props["std"], 1e-8)


# --------------------------------------------------------------------------------------------------------------------
# train


def load_dataset(root):
    images, labels = [], []
    names = sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(os.path.join(root, "imagesTr"))
                   if f.endswith("_0000.nii.gz"))
    if not names:
        raise SystemExit(f"{root}/imagesTr has no *_0000.nii.gz images")
    spacing = None
    for n in names:
        img, sp = read_nifti(os.path.join(root, "imagesTr", f"{n}_0000.nii.gz"))
        lab, _ = read_nifti(os.path.join(root, "labelsTr", f"{n}.nii.gz"))
        if img.shape != lab.shape:
            raise SystemExit(f"{n}: image {img.shape} and label {lab.shape} differ")
        images.append(img)
        labels.append(lab.astype(np.int64))
        spacing = spacing or sp
    return names, images, labels, spacing


def foreground_properties(images, labels):
    fg = np.concatenate([i[l > 0] for i, l in zip(images, labels)])
    return {"mean": float(fg.mean()), "std": float(fg.std()), "percentile_00_5": float(np.percentile(fg, 0.5)),
            "percentile_99_5": float(np.percentile(fg, 99.5))}


def sample_patch(img, lab, patch, rng):
    """A random patch (zero-padded where the volume is smaller); a third of them centred on a foreground voxel."""
    fg = np.argwhere(lab > 0)
    if len(fg) and rng.random() < 1 / 3:
        centre = fg[rng.integers(len(fg))]
        origin = [min(max(int(c) - p // 2, 0), max(s - p, 0)) for c, p, s in zip(centre, patch, img.shape)]
    else:
        origin = [int(rng.integers(0, max(s - p, 0) + 1)) for p, s in zip(patch, img.shape)]
    x = np.zeros(patch)
    y = np.zeros(patch, dtype=np.int64)
    src = tuple(slice(o, o + p) for o, p in zip(origin, patch))
    part = img[src]
    x[tuple(slice(0, s) for s in part.shape)] = part
    y[tuple(slice(0, s) for s in part.shape)] = lab[src]
    return x, y


def train(args):
    names, images, labels, spacing = load_dataset(args.dataset)
    cfg = tl.BUILTIN[args.config]()
    if len(cfg["patch"]) != 3:
        raise SystemExit("train: a 3D configuration is needed (the comparison predicts volumes with 3D tiles)")
    props = foreground_properties(images, labels)
    images = [ct_normalize(i, props) for i in images]
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    model = tl.LKMUNet(cfg, init=True).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    for step in range(args.steps):
        batch = [sample_patch(images[k], labels[k], cfg["patch"], rng) for k in rng.integers(len(images), size=2)]
        x = torch.tensor(np.stack([b[0] for b in batch])[:, None], dtype=torch.float32, device=device)
        y = torch.tensor(np.stack([b[1] for b in batch])[:, None], dtype=torch.float32, device=device)
        opt.zero_grad(set_to_none=True)
        loss = tl.deep_supervision_loss(model(x), y, True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}", file=sys.stderr)
    plans = {
        "configurations": {"3d_fullres": {"patch_size": list(cfg["patch"]), "spacing": list(spacing),
                                          "normalization_schemes": ["CTNormalization"], "batch_dice": True}},
        "foreground_intensity_properties_per_channel": {"0": props},
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"network_weights": state, "init_args": {"plans": plans, "configuration": "3d_fullres"},
                "trainer_name": "tools/predict_parity.py train", "steps": args.steps}, args.out)
    print(f"wrote {args.out}: {args.config} after {args.steps} steps on {len(names)} cases", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# compare


def window_starts(size, patch, step=0.5):
    """nnU-Net's compute_steps_for_sliding_window (one tile at 0 when the axis is no longer than the patch)."""
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / (patch * step)) + 1
    actual = (size - patch) / (n - 1)
    return [int(round(actual * i)) for i in range(n)]   # Python's round: half to even, as NumPy's


def gaussian(patch):
    """nnU-Net's importance map: separable Gaussian, sigma = p / 8 centred at p // 2, truncated at scipy's radius
    floor(4 sigma + 0.5), scaled to max 1, zeros raised to the smallest nonzero value."""
    axes = []
    for p in patch:
        sigma, c = p / 8, p // 2
        d = np.arange(p) - c
        axes.append(np.where(np.abs(d) > math.floor(4 * sigma + 0.5), 0.0, np.exp(-d * d / (2 * sigma * sigma))))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g = g / g.max()
    g[g == 0] = g[g > 0].min()
    return g.astype(np.float32)


def segment(model, img, patch, device):
    """Argmax of the Gaussian-blended sliding-window logits of a (z, y, x) volume at least as large as the patch."""
    if any(s < p for s, p in zip(img.shape, patch)):
        raise SystemExit(f"compare: the image {img.shape} is smaller than the patch {patch} (padding not done here)")
    k = model.config["num_classes"]
    x = torch.tensor(img, dtype=torch.float32, device=device)
    g = torch.tensor(gaussian(patch), device=device)
    acc = torch.zeros((k,) + img.shape, device=device)
    weight = torch.zeros(img.shape, device=device)
    with torch.no_grad():
        for z in window_starts(img.shape[0], patch[0]):
            for y in window_starts(img.shape[1], patch[1]):
                for xx in window_starts(img.shape[2], patch[2]):
                    box = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(xx, xx + patch[2]))
                    logits = model(x[box][None, None])[0][0]
                    acc[(slice(None),) + box] += logits * g
                    weight[box] += g
    return (acc / weight).argmax(0).cpu().numpy()   # torch.argmax returns the first maximum


def dice(a, b):
    s = a.sum() + b.sum()
    return 2.0 * np.logical_and(a, b).sum() / s if s else math.nan


def compare(args):
    ckpt = torch.load(args.model, map_location="cpu", weights_only=True)
    plans = ckpt["init_args"]["plans"]
    conf = plans["configurations"][ckpt["init_args"]["configuration"]]
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    device = torch.device(args.device)
    cfg = tl.BUILTIN[args.config]()
    model = tl.LKMUNet(cfg, init=False)
    model.load_state_dict(ckpt["network_weights"], strict=True)
    model = model.to(device).eval()
    img, spacing = read_nifti(args.image)
    if not np.allclose(spacing, conf["spacing"], rtol=1e-4):
        raise SystemExit(f"{args.image}: spacing {spacing} is not the training spacing {conf['spacing']} "
                         "(resampling is not done here)")
    torch_seg = segment(model, ct_normalize(img, props), conf["patch_size"], device)
    ours, _ = read_nifti(args.ours)
    if ours.shape != torch_seg.shape:
        raise SystemExit(f"{args.ours}: shape {ours.shape}, PyTorch's segmentation {torch_seg.shape}")
    ours = ours.astype(np.int64)
    truth = read_nifti(args.truth)[0].astype(np.int64) if args.truth else None
    agree = float((ours == torch_seg).mean())
    print(f"{'class':>5} {'PyTorch voxels':>15} {'ours voxels':>12} {'Dice ours/PyTorch':>18}"
          + (f" {'Dice PyTorch/truth':>19} {'Dice ours/truth':>16}" if truth is not None else ""))
    used = 0
    for c in range(cfg["num_classes"]):
        a, b = torch_seg == c, ours == c
        used += int(a.any())
        row = f"{c:>5} {int(a.sum()):>15} {int(b.sum()):>12} {dice(a, b):>18.5f}"
        if truth is not None:
            row += f" {dice(a, truth == c):>19.4f} {dice(b, truth == c):>16.4f}"
        print(row)
    ok = agree >= 0.999 and used >= 2
    print(f"voxels: {ours.size}, agreeing: {agree * 100:.4f}% ({int((ours != torch_seg).sum())} differ), classes "
          f"predicted by PyTorch: {used}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("dataset")
    t.add_argument("out")
    t.add_argument("--config", default="tiny-3d", choices=sorted(tl.BUILTIN))
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.set_defaults(fn=train)
    c = sub.add_parser("compare")
    c.add_argument("model")
    c.add_argument("image")
    c.add_argument("ours")
    c.add_argument("--truth")
    c.add_argument("--config", default="tiny-3d", choices=sorted(tl.BUILTIN))
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.set_defaults(fn=compare)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
