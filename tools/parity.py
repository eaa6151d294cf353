#!/usr/bin/env python3
"""Parity of lkm-engine with the PyTorch reference (tools/torch_lkmunet.py): forward logits, loss and every
parameter gradient of one training step.

    python3 tools/parity.py --dir DIR [--device cuda|cpu] [--time N] [--warmup W] [--scan-chunk K]
                            [--save-torch] [--tf32] [--fwd-tol 1e-4] [--grad-tol 1e-3]

DIR holds
  weights.safetensors   every parameter under its public name; metadata "lkm_engine" = JSON with "config"
                        (lkm-engine's ModelConfig), optionally "batch_dice" ("true"/"false")
  inputs.safetensors    x (N, C, ...) float32 and labels (N, 1, ...) float32 class indices
  engine.safetensors    written by the engine: "out.I" (every deep-supervision output, highest resolution first),
                        "loss" [1], "grad.<name>" for every parameter
batch_dice is read from the metadata key "batch_dice" of inputs, weights or engine (first found; default true).

The reference model loads the weights strictly, runs forward, nnU-Net's deep-supervision DC+CE loss and backward in
float32 (TF32 off unless --tf32). Each tensor is compared by the relative error ||engine - torch|| / ||torch||.
Conv biases that feed an InstanceNorm (every `*.conv.bias`) have a gradient that is zero in exact arithmetic (the
norm removes the mean), so both sides hold only rounding noise there; those are measured against the gradient norm
of the same conv's weight instead (marked `~` in the table). A tensor whose reference is exactly zero must be
exactly zero in the engine too.

Prints every output, the loss and the 10 worst gradients; writes DIR/parity.json; exits 1 if any forward error
(outputs, loss) exceeds --fwd-tol (1e-4) or any gradient error exceeds --grad-tol (1e-3), 2 on unusable inputs.

--time N: the median milliseconds of N full training steps of the PyTorch model (forward, loss, backward, gradient
norm clipping at 12, SGD Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5) after W warm-up steps (default 2),
and on CUDA the peak memory (torch.cuda.max_memory_allocated, GiB); written to parity.json under "time".
--save-torch writes the reference's outputs, loss and gradients to DIR/torch.safetensors in the engine's format.
--scan-chunk K checkpoints the selective scan's time loop in chunks of K steps (less memory, same gradients).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402
import torch_lkmunet as tl  # noqa: E402


def fail(msg):
    print(f"parity: {msg}", file=sys.stderr)
    sys.exit(2)


def read(path):
    if not os.path.exists(path):
        fail(f"{path} does not exist")
    try:
        return safetensors_io.read(path)
    except safetensors_io.SafetensorsError as e:
        fail(str(e))


def parse_bool(s, where):
    v = str(s).strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    fail(f"{where}: batch_dice must be true or false, got {s!r}")


def rel_err(a, b):
    """||a - b|| / ||b|| in float64; 0 when both are exactly zero, inf when only the reference is."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    if not np.all(np.isfinite(a)):
        return math.inf
    nb = np.linalg.norm(b)
    nd = np.linalg.norm(a - b)
    if nb == 0:
        return 0.0 if nd == 0 else math.inf
    return float(nd / nb)


def _json_safe(v):
    """Non-finite floats as strings ("inf", "nan"), which strict JSON readers accept."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def build(weights_path, device, scan_chunk):
    params, meta = read(weights_path)
    if "lkm_engine" not in meta:
        fail(f"{weights_path}: no 'lkm_engine' metadata with the model config")
    try:
        cfg = tl.load_config(json.loads(meta["lkm_engine"]))
    except (ValueError, json.JSONDecodeError) as e:
        fail(f"{weights_path}: bad 'lkm_engine' metadata: {e}")
    model = tl.LKMUNet(cfg, scan_chunk=scan_chunk, init=False)
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in params.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape differences
        fail(f"{weights_path} does not match the model: {e}")
    if result.missing_keys or result.unexpected_keys:
        fail(f"{weights_path} does not match the model: missing {result.missing_keys[:8]}, "
             f"unexpected {result.unexpected_keys[:8]}")
    return model.to(device), cfg, meta


def forward_backward(model, x, labels, batch_dice):
    model.zero_grad(set_to_none=True)
    outs = model(x)
    loss = tl.deep_supervision_loss(outs, labels, batch_dice)
    loss.backward()
    return outs, loss


def time_steps(model, x, labels, batch_dice, n, warmup, device):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    cuda = device.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        loss = tl.deep_supervision_loss(model(x), labels, batch_dice)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        opt.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    out = {"steps": n, "warmup": warmup, "median_ms": statistics.median(times), "min_ms": min(times),
           "max_ms": max(times), "batch": int(x.shape[0]), "patch": list(x.shape[2:])}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="lkm-engine vs PyTorch parity", epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--time", type=int, default=0, metavar="N")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scan-chunk", type=int, default=0, metavar="K")
    ap.add_argument("--save-torch", action="store_true")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convs (off for parity)")
    ap.add_argument("--fwd-tol", type=float, default=1e-4)
    ap.add_argument("--grad-tol", type=float, default=1e-3)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    d = args.dir
    model, cfg, wmeta = build(os.path.join(d, "weights.safetensors"), device, args.scan_chunk)
    inputs, imeta = read(os.path.join(d, "inputs.safetensors"))
    engine, emeta = read(os.path.join(d, "engine.safetensors"))
    for k in ("x", "labels"):
        if k not in inputs:
            fail(f"inputs.safetensors has no '{k}'")
    bd_src = next(((m["batch_dice"], f) for m, f in ((imeta, "inputs"), (wmeta, "weights"), (emeta, "engine"))
                   if "batch_dice" in m), ("true", "default"))
    batch_dice = parse_bool(bd_src[0], bd_src[1])
    x = torch.from_numpy(inputs["x"].astype(np.float32)).to(device)
    labels = torch.from_numpy(inputs["labels"].astype(np.float32)).to(device)
    if labels.shape[0] != x.shape[0] or labels.shape[1] != 1 or labels.shape[2:] != x.shape[2:]:
        fail(f"labels {list(labels.shape)} do not fit x {list(x.shape)} (want (N, 1, spatial))")

    t0 = time.perf_counter()
    outs, loss = forward_backward(model, x, labels, batch_dice)
    ref_seconds = time.perf_counter() - t0
    # Parameters no gradient reaches (the deepest seg head: deep-supervision weight 0) have none on either side.
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    forward = {}
    problems = []
    for i, o in enumerate(outs):
        key = f"out.{i}"
        if key not in engine:
            problems.append(f"engine.safetensors has no {key}")
            forward[key] = math.inf
            continue
        ref = o.detach().cpu().numpy()
        if engine[key].shape != ref.shape:
            problems.append(f"{key}: engine shape {list(engine[key].shape)}, torch {list(ref.shape)}")
            forward[key] = math.inf
            continue
        forward[key] = rel_err(engine[key], ref)
    extra_outs = sorted(k for k in engine if k.startswith("out.") and k not in forward)
    if extra_outs:
        problems.append(f"engine has outputs the reference lacks: {extra_outs}")
    loss_ref = float(loss.detach().cpu())
    if "loss" in engine:
        loss_eng = float(np.asarray(engine["loss"], dtype=np.float64).ravel()[0])
        forward["loss"] = rel_err(np.array([loss_eng]), np.array([loss_ref]))
    else:
        loss_eng = None
        problems.append("engine.safetensors has no loss")
        forward["loss"] = math.inf

    grad_err, grad_kind = {}, {}
    ref_np = {k: g.detach().cpu().numpy() for k, g in grads.items()}
    for k, ref in ref_np.items():
        key = f"grad.{k}"
        if key not in engine:
            problems.append(f"engine.safetensors has no {key}")
            grad_err[k] = math.inf
            continue
        eng = engine[key]
        if eng.shape != ref.shape:
            problems.append(f"{key}: engine shape {list(eng.shape)}, torch {list(ref.shape)}")
            grad_err[k] = math.inf
            continue
        sibling = k[: -len("bias")] + "weight"
        if k.endswith(".conv.bias") and sibling in ref_np:
            # Zero in exact arithmetic (an InstanceNorm follows): compare against the conv weight's gradient scale.
            scale = np.linalg.norm(ref_np[sibling].astype(np.float64))
            diff = np.linalg.norm(eng.astype(np.float64) - ref.astype(np.float64))
            grad_err[k] = float(diff / scale) if scale > 0 else (0.0 if diff == 0 else math.inf)
            if not np.all(np.isfinite(eng)):
                grad_err[k] = math.inf
            grad_kind[k] = "~"
        else:
            grad_err[k] = rel_err(eng, ref)
            grad_kind[k] = ""
    extra = sorted(k for k in engine if k.startswith("grad.") and k[5:] not in ref_np)
    if extra:
        problems.append(f"engine has gradients PyTorch has not (unknown or unreached parameters): {extra[:5]}")

    max_fwd = max(forward.values())
    max_grad = max(grad_err.values()) if grad_err else math.inf
    ok = not problems and max_fwd <= args.fwd_tol and max_grad <= args.grad_tol

    print(f"parity  dir={d}  device={device}  torch={torch.__version__}  batch_dice={batch_dice}  "
          f"x={list(x.shape)}  params={tl.parameter_count(model)}  reference step {ref_seconds:.2f}s")
    print(f"{'tensor':<72} {'rel err':>10}")
    for k, v in forward.items():
        print(f"{k:<72} {v:>10.3e}{'  FAIL' if v > args.fwd_tol else ''}")
    print(f"{'  (loss engine ' + repr(loss_eng) + ', torch ' + repr(loss_ref) + ')':<72}")
    worst = sorted(grad_err.items(), key=lambda kv: -kv[1])[:10]
    print(f"worst gradients of {len(grad_err)} (~ = bias before InstanceNorm, relative to its weight's gradient):")
    for k, v in worst:
        print(f"{'grad.' + k + grad_kind.get(k, ''):<72} {v:>10.3e}{'  FAIL' if v > args.grad_tol else ''}")
    for p in problems:
        print(f"problem: {p}")
    print(f"max forward {max_fwd:.3e} (tol {args.fwd_tol:g}), max gradient {max_grad:.3e} (tol {args.grad_tol:g}): "
          f"{'PASS' if ok else 'FAIL'}")

    report = {
        "pass": ok,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tf32": args.tf32,
        "batch_dice": batch_dice,
        "x_shape": list(x.shape),
        "parameters": tl.parameter_count(model),
        "config": cfg,
        "tolerances": {"forward": args.fwd_tol, "gradient": args.grad_tol},
        "forward": forward,
        "loss": {"engine": loss_eng, "torch": loss_ref},
        "max_forward_err": max_fwd,
        "max_grad_err": max_grad,
        "worst_grads": [{"name": k, "rel_err": v, "vs_weight_grad": grad_kind.get(k) == "~"} for k, v in worst],
        "grads": grad_err,
        "problems": problems,
        "reference_step_seconds": ref_seconds,
    }
    if args.save_torch:
        tensors = {f"out.{i}": o.detach().cpu().numpy() for i, o in enumerate(outs)}
        tensors["loss"] = np.array([loss_ref], dtype=np.float32)
        tensors.update({f"grad.{k}": v for k, v in ref_np.items()})
        safetensors_io.write(os.path.join(d, "torch.safetensors"), tensors, {"torch": torch.__version__})
    del outs, loss, grads
    if args.time > 0:
        report["time"] = time_steps(model, x, labels, batch_dice, args.time, args.warmup, device)
        t = report["time"]
        print(f"time: median {t['median_ms']:.1f} ms over {t['steps']} steps"
              + (f", peak {t['peak_gib']:.2f} GiB" if "peak_gib" in t else ""))
    with open(os.path.join(d, "parity.json"), "w") as f:
        json.dump(_json_safe(report), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
