#!/usr/bin/env python3
"""Parity of lkm-engine with the PyTorch reference (tools/torch_lkmunet.py): forward logits, loss and every
parameter gradient of one training step.

    python3 tools/parity.py --dir DIR [--device cuda|cpu] [--dtype float32|float64] [--floor | --autocast] [--time N]
                            [--warmup W] [--scan-chunk K] [--save-torch] [--tf32] [--fwd-tol 1e-4] [--grad-tol 1e-3]

DIR holds (as `lkm-engine dump-step` writes it)
  weights.safetensors   every parameter under its public name; metadata "lkm_engine" = JSON with "config"
                        (lkm-engine's ModelConfig), optionally "batch_dice" (true/false)
  inputs.safetensors    x (N, C, ...) float32 and labels (N, 1, ...) float32 class indices
  engine.safetensors    written by the engine: "out.I" (every deep-supervision output, highest resolution first),
                        "loss" [1], "grad.<name>" for every parameter; "dtype" in its metadata (float32 / float64)
batch_dice is read from the metadata of inputs, weights or engine (first found; default true).

The reference model loads the weights strictly and runs forward, nnU-Net's deep-supervision DC+CE loss and backward
in --dtype (default: the engine's; TF32 off unless --tf32). Each tensor is compared by the relative error
||engine - torch|| / ||torch||. Conv biases that feed an InstanceNorm (every `*.conv.bias`) have a gradient that is
zero in exact arithmetic (the norm removes the mean), so both sides hold only rounding noise there; those are
measured against the gradient norm of the same conv's weight instead (marked `~`). A tensor whose reference is
exactly zero must be exactly zero in the engine too.

Two ways to use it:
- float64 engine (`dump-step --device cpu --dtype f64`) against the float64 reference: the two compute the same
  function if they agree to near float64 rounding; the tolerances are --fwd-tol / --grad-tol.
- --floor, for a float32 engine run (the GPU): the reference runs in float64, and PyTorch's own float32 step is
  compared with it as well. The gradients of LKM-UNet's large configurations are ill-conditioned in float32 (a
  relative change of 1e-7 in the input moves them by ~2e-3 in exact arithmetic, and float32 rounding everywhere by
  1-2%), so two float32 implementations cannot agree to 1e-3 there, and neither can agree with float64. The
  engine's error against float64 is then judged against PyTorch's own: a tensor passes when its error is below the
  tolerance or at most FLOOR_FACTOR (3) times PyTorch's float32 error on the same tensor.

- --autocast, for a bf16 engine run (`dump-step --precision bf16`, "precision" in the engine's metadata): the
  reference runs in float64, and PyTorch's own mixed-precision step (float32 weights, forward and loss under
  torch.autocast(bfloat16), as nnU-Net trains) is compared with it as well. Over every output, the loss and every
  gradient, the ratio (engine error / PyTorch autocast error) must have a median of at most AUTOCAST_MEDIAN (1.5) and
  no value above AUTOCAST_MAX (4); the per-tensor ratios are printed and written to parity.json.

Prints every output, the loss and the 10 worst gradients (with PyTorch's float32 error beside them under --floor);
writes DIR/parity.json; exits 1 if any tensor fails, 2 on unusable inputs.

--time N: the median milliseconds of N full float32 training steps of the PyTorch model (forward, loss, backward,
gradient norm clipping at 12, SGD Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5) after W warm-up steps
(default 2), and on CUDA the peak memory (torch.cuda.max_memory_allocated, GiB); written to parity.json under "time".
--save-torch writes the reference's outputs, loss and gradients to DIR/torch.safetensors in the engine's format.
--scan-chunk K checkpoints the selective scan in pieces of at most K steps (less memory, same gradients).
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


def fields(meta, where):
    """The metadata's own keys and those of its "lkm_engine" JSON (where the engine writes them)."""
    out = dict(meta)
    if "lkm_engine" in meta:
        try:
            out.update(json.loads(meta["lkm_engine"]))
        except json.JSONDecodeError as e:
            fail(f"{where}: bad 'lkm_engine' metadata: {e}")
    return out


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


def forward_backward(model, x, labels, batch_dice, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
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


FLOOR_FACTOR = 3.0
AUTOCAST_MEDIAN = 1.5
AUTOCAST_MAX = 4.0


def reference_step(model, x, labels, batch_dice, dtype, autocast=False):
    """One forward/backward of the reference in `dtype` (under bf16 autocast if asked): ({"out.i", "loss",
    "grad.<name>"} as float64 numpy, seconds). Parameters no gradient reaches (the deepest seg head: deep-supervision
    weight 0) have none."""
    model.to(dtype)
    t0 = time.perf_counter()
    outs, loss = forward_backward(model, x.to(dtype), labels, batch_dice, autocast)
    seconds = time.perf_counter() - t0
    out = {f"out.{i}": o.detach().cpu().double().numpy() for i, o in enumerate(outs)}
    out["loss"] = np.array([float(loss.detach().cpu())])
    out.update({f"grad.{k}": p.grad.detach().cpu().double().numpy() for k, p in model.named_parameters()
                if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return out, seconds


def compare(engine, ref):
    """Relative errors of every output, the loss and every gradient of `engine` against `ref` (both in the engine's
    format): (forward {key: err}, gradients {name: err}, {name: "~" for biases before an InstanceNorm}, problems)."""
    forward, problems = {}, []
    outs = sorted((k for k in ref if k.startswith("out.")), key=lambda k: int(k[4:]))
    for key in outs + ["loss"]:
        if key not in engine:
            problems.append(f"engine has no {key}")
            forward[key] = math.inf
        elif engine[key].shape != ref[key].shape and key != "loss":
            problems.append(f"{key}: engine shape {list(engine[key].shape)}, torch {list(ref[key].shape)}")
            forward[key] = math.inf
        else:
            forward[key] = rel_err(np.asarray(engine[key]).ravel() if key == "loss" else engine[key], ref[key])
    extra_outs = sorted(k for k in engine if k.startswith("out.") and k not in forward)
    if extra_outs:
        problems.append(f"engine has outputs the reference lacks: {extra_outs}")

    grad_err, grad_kind = {}, {}
    names = [k[5:] for k in ref if k.startswith("grad.")]
    for k in names:
        key, r = f"grad.{k}", ref[f"grad.{k}"]
        if key not in engine:
            problems.append(f"engine has no {key}")
            grad_err[k] = math.inf
            continue
        eng = engine[key]
        if eng.shape != r.shape:
            problems.append(f"{key}: engine shape {list(eng.shape)}, torch {list(r.shape)}")
            grad_err[k] = math.inf
            continue
        sibling = f"grad.{k[: -len('bias')]}weight"
        if k.endswith(".conv.bias") and sibling in ref:
            # Zero in exact arithmetic (an InstanceNorm follows): compare against the conv weight's gradient scale.
            scale = np.linalg.norm(ref[sibling])
            diff = np.linalg.norm(eng.astype(np.float64) - r)
            grad_err[k] = float(diff / scale) if scale > 0 else (0.0 if diff == 0 else math.inf)
            if not np.all(np.isfinite(eng)):
                grad_err[k] = math.inf
            grad_kind[k] = "~"
        else:
            grad_err[k] = rel_err(eng, r)
            grad_kind[k] = ""
    extra = sorted(k for k in engine if k.startswith("grad.") and f"grad.{k[5:]}" not in ref)
    if extra:
        problems.append(f"engine has gradients PyTorch has not (unknown or unreached parameters): {extra[:5]}")
    return forward, grad_err, grad_kind, problems


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
    ap.add_argument("--dtype", choices=("float32", "float64"),
                    help="precision of the reference (default: the engine's, from its metadata \"dtype\")")
    ap.add_argument("--autocast", action="store_true",
                    help="float64 reference; judge a bf16 engine run against PyTorch's bf16 autocast step (median "
                         "error ratio <= 1.5, none above 4)")
    ap.add_argument("--floor", action="store_true",
                    help="float64 reference; also time PyTorch's float32 step against it and judge the engine's "
                         "float32 errors against that floor")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    d = args.dir
    model, cfg, wmeta = build(os.path.join(d, "weights.safetensors"), device, args.scan_chunk)
    inputs, imeta = read(os.path.join(d, "inputs.safetensors"))
    engine, emeta = read(os.path.join(d, "engine.safetensors"))
    wmeta, imeta, emeta = (fields(m, f) for m, f in ((wmeta, "weights"), (imeta, "inputs"), (emeta, "engine")))
    for k in ("x", "labels"):
        if k not in inputs:
            fail(f"inputs.safetensors has no '{k}'")
    bd_src = next(((m["batch_dice"], f) for m, f in ((imeta, "inputs"), (wmeta, "weights"), (emeta, "engine"))
                   if "batch_dice" in m), ("true", "default"))
    batch_dice = parse_bool(bd_src[0], bd_src[1])
    engine_dtype = emeta.get("dtype", "float32")
    engine_precision = emeta.get("precision", "fp32")
    if args.floor and args.autocast:
        fail("--floor (a float32 engine run) and --autocast (a bf16 one) exclude each other")
    if args.autocast:
        if engine_precision != "bf16":
            fail("--autocast judges a bf16 engine run (dump-step --precision bf16); this one is " + engine_precision)
        args.dtype = "float64"
    if args.floor:
        if engine_dtype != "float32":
            fail("--floor judges a float32 engine run; this one is " + engine_dtype)
        args.dtype = "float64"
    args.dtype = args.dtype or engine_dtype
    x = torch.from_numpy(inputs["x"].astype(np.float32)).to(device)
    labels = torch.from_numpy(inputs["labels"].astype(np.float32)).to(device)  # class indices: exact in float32
    if labels.shape[0] != x.shape[0] or labels.shape[1] != 1 or labels.shape[2:] != x.shape[2:]:
        fail(f"labels {list(labels.shape)} do not fit x {list(x.shape)} (want (N, 1, spatial))")

    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    ref, ref_seconds = reference_step(model, x, labels, batch_dice, dtype)
    forward, grad_err, grad_kind, problems = compare(engine, ref)
    floor = None
    if args.floor:
        # PyTorch's own float32 step against the same float64 reference: the float32 floor of this problem.
        t32, _ = reference_step(model, x, labels, batch_dice, torch.float32)
        floor = compare(t32, ref)
        del t32
    mixed = None
    if args.autocast:
        # PyTorch's own bf16 autocast step (float32 weights) against the same float64 reference.
        tac, _ = reference_step(model, x, labels, batch_dice, torch.float32, autocast=True)
        mixed = compare(tac, ref)
        del tac

    max_fwd = max(forward.values())
    max_grad = max(grad_err.values()) if grad_err else math.inf
    # Allowed error per tensor: the tolerance, or in --floor mode FLOOR_FACTOR times PyTorch's own float32 error.
    limit = {k: tol for k, tol in [(k, args.fwd_tol) for k in forward] + [(k, args.grad_tol) for k in grad_err]}
    if floor:
        for k, v in list(floor[0].items()) + list(floor[1].items()):
            limit[k] = max(limit.get(k, 0.0), FLOOR_FACTOR * v)
        problems += [f"PyTorch float32: {p}" for p in floor[3]]
    failed = {k for k, v in list(forward.items()) + list(grad_err.items()) if v > limit[k]}
    ratios = {}
    if mixed:
        # Error ratios against PyTorch's autocast step; a tensor both compute exactly (error 0) is left out.
        theirs = dict(mixed[0]) | dict(mixed[1])
        ours = dict(forward) | dict(grad_err)
        ratios = {k: ours[k] / theirs[k] for k in ours if k in theirs and theirs[k] > 0}
        problems += [f"PyTorch autocast: {p}" for p in mixed[3]]
        median = statistics.median(ratios.values()) if ratios else math.inf
        worst_ratio = max(ratios.values(), default=math.inf)
        failed = {k for k, r in ratios.items() if r > AUTOCAST_MAX}
        if median > AUTOCAST_MEDIAN:
            problems.append(f"median error ratio {median:.2f} > {AUTOCAST_MEDIAN}")
    ok = not problems and not failed

    print(f"parity  dir={d}  device={device}  torch={torch.__version__}  engine {engine_dtype}  reference "
          f"{args.dtype}  batch_dice={batch_dice}  x={list(x.shape)}  params={tl.parameter_count(model)}  "
          f"reference step {ref_seconds:.2f}s")
    beside = floor or mixed
    fl = (lambda k, table: f" {table.get(k, math.nan):>12.3e}") if beside else (lambda k, table: "")
    label = "torch32 err" if floor else "autocast err"
    print(f"{'tensor':<72} {'engine err':>11}" + (f" {label:>12}" if beside else ""))
    for k, v in forward.items():
        print(f"{k:<72} {v:>11.3e}{fl(k, beside[0] if beside else {})}{'  FAIL' if k in failed else ''}")
    print(f"{'  (loss engine ' + repr(float(np.asarray(engine['loss']).ravel()[0])) + ', torch ' + repr(float(ref['loss'][0])) + ')':<72}"
          if "loss" in engine else "")
    worst = sorted(grad_err.items(), key=lambda kv: -kv[1])[:10]
    print(f"worst gradients of {len(grad_err)} (~ = bias before InstanceNorm, relative to its weight's gradient):")
    for k, v in worst:
        print(f"{'grad.' + k + grad_kind.get(k, ''):<72} {v:>11.3e}{fl(k, beside[1] if beside else {})}"
              f"{'  FAIL' if k in failed else ''}")
    if mixed:
        top = sorted(ratios.items(), key=lambda kv: -kv[1])[:10]
        print(f"error ratio engine / PyTorch autocast over {len(ratios)} tensors: median "
              f"{statistics.median(ratios.values()):.2f} (limit {AUTOCAST_MEDIAN}), max {max(ratios.values()):.2f} "
              f"(limit {AUTOCAST_MAX}); largest: " + ", ".join(f"{k} {r:.2f}" for k, r in top[:5]))
    if floor:
        worst_floor = max(floor[1].items(), key=lambda kv: kv[1])
        ratio = max((grad_err[k] / max(v, 1e-300) for k, v in floor[1].items()), default=math.nan)
        print(f"PyTorch's own float32 step against float64: worst forward {max(floor[0].values()):.3e}, worst "
              f"gradient {worst_floor[1]:.3e} ({worst_floor[0]}); engine/torch32 error ratio at most {ratio:.2f}")
    for p in problems:
        print(f"problem: {p}")
    rule = (f"engine error <= max(tol, {FLOOR_FACTOR:g} x PyTorch float32 error)" if floor else
            f"median(engine error / PyTorch autocast error) <= {AUTOCAST_MEDIAN:g}, each <= {AUTOCAST_MAX:g}"
            if mixed else "engine error <= tol")
    print(f"max forward {max_fwd:.3e} (tol {args.fwd_tol:g}), max gradient {max_grad:.3e} (tol {args.grad_tol:g}), "
          f"{rule}: {'PASS' if ok else 'FAIL'}")

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
        "engine_dtype": engine_dtype,
        "reference_dtype": args.dtype,
        "loss": {"engine": float(np.asarray(engine["loss"]).ravel()[0]) if "loss" in engine else None,
                 "torch": float(ref["loss"][0])},
        "max_forward_err": max_fwd,
        "max_grad_err": max_grad,
        "worst_grads": [{"name": k, "rel_err": v, "vs_weight_grad": grad_kind.get(k) == "~"} for k, v in worst],
        "grads": grad_err,
        "failed": sorted(failed),
        "problems": problems,
        "reference_step_seconds": ref_seconds,
    }
    if floor:
        report["float32_floor"] = {"forward": floor[0], "grads": floor[1], "factor": FLOOR_FACTOR}
    if mixed:
        report["autocast"] = {"forward": mixed[0], "grads": mixed[1], "ratios": ratios,
                              "median_ratio": statistics.median(ratios.values()) if ratios else None,
                              "max_ratio": max(ratios.values(), default=None), "median_limit": AUTOCAST_MEDIAN,
                              "max_limit": AUTOCAST_MAX}
        report["engine_precision"] = engine_precision
    if args.save_torch:
        safetensors_io.write(os.path.join(d, "torch.safetensors"), ref, {"torch": torch.__version__,
                                                                          "dtype": args.dtype})
    del ref
    if args.time > 0:
        model.to(torch.float32)
        report["time"] = time_steps(model, x, labels, batch_dice, args.time, args.warmup, device)
        t = report["time"]
        print(f"time: median {t['median_ms']:.1f} ms over {t['steps']} steps"
              + (f", peak {t['peak_gib']:.2f} GiB" if "peak_gib" in t else ""))
    with open(os.path.join(d, "parity.json"), "w") as f:
        json.dump(_json_safe(report), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
