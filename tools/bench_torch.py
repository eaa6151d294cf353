#!/usr/bin/env python3
"""PyTorch yardstick for lkm-engine's kernel benchmark: the same ops at the same reference shapes (lkm-unet.md section
5, 3D configuration, stage 0), timed with CUDA events on the same GPU, plus the two machine ceilings (device-to-device
copy bandwidth and bf16 matrix-product rate).

Usage: python3 tools/bench_torch.py --out DIR   (writes DIR/torch_bench.json and DIR/torch_bench.md)
       python3 tools/bench_torch.py --convs convs.json --out DIR   (writes DIR/torch_convs.json: cuDNN on every
       convolution shape of the list that `kernels --list-convs` writes, each role alone (fprop, dgrad, wgrad with the
       bias gradient) in bf16 channels-last and tf32, cudnn.benchmark on; rows named as lkm-engine's)
The selective scan here is plain PyTorch (mamba_ssm's selective_scan_ref formulation: a loop over time); mamba_ssm's
CUDA kernel numbers measured on an H100 are in shared anchors (see benches/RESULTS.md)."""
import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F


def timed(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def ceilings():
    n = 1 << 28  # 1 GiB of float32
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), reps=20)
    copy_gbs = 2 * a.numel() * 4 / ms / 1e6
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms_mm = timed(lambda: x @ y, reps=20)
    return {"copy_GBps": copy_gbs, "bf16_TFLOPs": 2 * m**3 / ms_mm / 1e9}


def scan_ref(u, delta, A, B, C, D, z, delta_bias):
    """u, delta, z: (G, D, L); A: (D, N); B, C: (G, N, L). As mamba_ssm's selective_scan_ref."""
    delta = F.softplus(delta + delta_bias[None, :, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    # Per step rather than materialising (G, D, L, N) tensors, which would not fit at these shapes.
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2) + u * D[None, :, None]
    return y * F.silu(z)


def bench(name, shape, fwd, inputs, flops=None, nbytes=None, reps=10, backward=True):
    """Times fwd() and fwd()+backward of a random seed gradient."""
    with torch.no_grad():
        ms_f = timed(lambda: fwd(*inputs), reps=reps)
    row = {"name": name, "shape": shape, "fwd_ms": ms_f, "flops": flops, "bytes": nbytes}
    if backward:
        for t in inputs:
            if t.is_floating_point():
                t.requires_grad_(True)
        out = fwd(*inputs)
        g = torch.randn_like(out)

        def fb():
            for t in inputs:
                t.grad = None
            fwd(*inputs).backward(g)

        row["fwd_bwd_ms"] = timed(fb, warmup=2, reps=max(3, reps // 2))
    print(f"{name:40s} {shape:40s} fwd {row['fwd_ms']:9.3f} ms  fwd+bwd {row.get('fwd_bwd_ms', float('nan')):9.3f} ms",
          flush=True)
    return row


def conv_roles(c, variant, graphs=False):
    """Milliseconds of one convolution shape's forward, input gradient and weight (+ bias) gradient, each alone:
    variant "bf16_cl" (bf16, channels-last) or "tf32" (float32 storage, TF32 on); with `graphs`, each role timed as
    the replay of a CUDA graph (the GPU's time alone), else as PyTorch runs it eagerly."""
    torch.backends.cudnn.allow_tf32 = variant == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = variant == "tf32"
    dtype = torch.bfloat16 if variant == "bf16_cl" else torch.float32
    spatial = len(c["input"]) - 2
    fmt = (torch.channels_last_3d if spatial == 3 else torch.channels_last) if variant == "bf16_cl" \
        else torch.contiguous_format
    x = torch.randn(*c["input"], device="cuda").to(dtype).to(memory_format=fmt).requires_grad_(True)
    w = (torch.randn(*c["weight"], device="cuda") * 0.05).to(dtype).to(memory_format=fmt).requires_grad_(True)
    cout = c["weight"][1] if c["transposed"] else c["weight"][0]
    b = (torch.randn(cout, device="cuda") * 0.1).to(dtype).requires_grad_(True) if c["bias"] else None
    k = c["weight"][2:]
    if c["transposed"]:
        conv = F.conv_transpose3d if spatial == 3 else F.conv_transpose2d
        fwd = lambda: conv(x, w, b, stride=c["stride"])
    else:
        conv = F.conv3d if spatial == 3 else F.conv2d
        fwd = lambda: conv(x, w, b, stride=c["stride"], padding=[kk // 2 for kk in k])
    # With graphs, y is made on the side stream that captures the roles: autograd runs each backward op on the stream
    # of its forward op, so the gradients' kernels land in the capture. Eager, everything stays on the current stream.
    side = torch.cuda.Stream() if graphs else torch.cuda.current_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = fwd()
        g = torch.randn_like(y)
    torch.cuda.current_stream().wait_stream(side)
    wrt = [w] + ([b] if b is not None else [])
    roles = [lambda: fwd(),
             lambda: torch.autograd.grad(y, [x], g, retain_graph=True),
             lambda: torch.autograd.grad(y, wrt, g, retain_graph=True)]
    if graphs:
        roles = [replayed(role, side) for role in roles]
    times = [timed(role, warmup=2, reps=7) for role in roles]
    del x, w, b, y, g, roles
    return times


def replayed(fn, stream):
    """fn captured into a CUDA graph on `stream` after three warm-up runs there (cudnn.benchmark's search among them):
    the replay launches the same kernels without Python's and autograd's host time, which is the floor of a small
    shape's eager timing (about 0.08 ms a call for autograd.grad on an H100 host)."""
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay


def bench_convs(path, out, variants, graphs=False):
    """cuDNN beside lkm-engine's per-shape convolution table (benches/kernels/convs.rs), in the given variants, each
    role eager or (graphs) from a CUDA graph."""
    torch.backends.cudnn.benchmark = True
    shapes = json.load(open(path))
    rows = []
    for c in shapes:
        for variant, math in [(v, m) for v, m in [("bf16_cl", 0), ("tf32", 1)] if v in variants]:
            for role, ms in zip(["fprop", "dgrad", "wgrad"], conv_roles(c, variant, graphs)):
                names = c["names"][["fprop", "dgrad", "wgrad"].index(role)]
                rows.append({"name": names[math], "variant": variant, "ms": ms})
        print(f"{c['config']} {c['layer']}: " + " ".join(f"{r['ms']:.3f}" for r in rows[-3 * len(variants):]),
              flush=True)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
           "timing": "CUDA graph replays" if graphs else "eager",
           "ceilings": ceilings(), "rows": rows}
    with open(os.path.join(out, "torch_convs.json"), "w") as f:
        json.dump(res, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--convs", help="the convolution list of `kernels --list-convs`: time cuDNN on it instead")
    ap.add_argument("--variants", default="bf16_cl,tf32", help="with --convs: bf16_cl (channels-last bf16), tf32")
    ap.add_argument("--eager", action="store_true",
                    help="with --convs: time each role as PyTorch runs it eagerly (host time included) rather than as "
                         "a CUDA graph replay")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.convs:
        torch.manual_seed(0)
        bench_convs(args.convs, args.out, args.variants.split(","), graphs=not args.eager)
        return
    torch.manual_seed(0)
    # cuDNN picks its fastest algorithm per shape (what a tuned PyTorch training run uses).
    torch.backends.cudnn.benchmark = True
    dev = "cuda"
    gpu = torch.cuda.get_device_name()
    ceil = ceilings()
    print(f"GPU {gpu}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}; ceilings {ceil}")
    rows = []
    r = lambda *s: torch.randn(*s, device=dev)
    N, Cc, Dd, H, W = 2, 32, 40, 224, 192
    vox = N * Dd * H * W
    x = r(N, Cc, Dd, H, W)
    for k in [(3, 3, 3), (1, 3, 3)]:
        w, b = r(Cc, Cc, *k) * 0.05, r(Cc)
        fl = 2 * vox * Cc * Cc * k[0] * k[1] * k[2]
        by = 2 * x.numel() * 4
        for mode in ["fp32", "tf32", "bf16"]:
            torch.backends.cudnn.allow_tf32 = mode == "tf32"
            if mode == "bf16":
                xi, wi, bi = x.bfloat16(), w.bfloat16(), b.bfloat16()
            else:
                xi, wi, bi = x, w, b
            # Named as lkm-engine's benchmark rows (the fp32 ones are compared with ours; cuDNN does all of them).
            rows.append(bench(f"conv3d {k[0]}x{k[1]}x{k[2]} {mode}", "2x32x40x224x192->32",
                              lambda a, ww, bb: F.conv3d(a, ww, bb, padding=(k[0] // 2, 1, 1)), [xi.clone(), wi.clone(), bi.clone()],
                              flops=fl, nbytes=by // (2 if mode == "bf16" else 1)))
    torch.backends.cudnn.allow_tf32 = False
    g, bt = torch.ones(Cc, device=dev), torch.zeros(Cc, device=dev)
    rows.append(bench("instance_norm+leaky_relu", "2x32x40x224x192",
                      lambda a, gg, bb: F.leaky_relu(F.instance_norm(a, weight=gg, bias=bb, eps=1e-5), 0.01),
                      [x.clone(), g.clone(), bt.clone()], nbytes=2 * x.numel() * 4))
    rows.append(bench("instance_norm", "2x32x40x224x192",
                      lambda a, gg, bb: F.instance_norm(a, weight=gg, bias=bb, eps=1e-5),
                      [x.clone(), g.clone(), bt.clone()], nbytes=2 * x.numel() * 4))
    rows.append(bench("leaky_relu", "2x32x40x224x192", lambda a: F.leaky_relu(a, 0.01), [x.clone()],
                      nbytes=2 * x.numel() * 4))
    tok = x.permute(0, 2, 3, 4, 1).reshape(-1, Cc).contiguous()
    rows.append(bench("layer_norm", f"{tok.shape[0]}x32", lambda a, gg, bb: F.layer_norm(a, (Cc,), gg, bb, 1e-5),
                      [tok.clone(), g.clone(), bt.clone()], nbytes=2 * tok.numel() * 4))
    # Stage 0's Mamba projections: in_proj (32 -> 2 x 64), x_proj (64 -> 2 + 2 x 16), dt_proj (2 -> 64), out_proj
    # (64 -> 32), in both float32 maths and bf16.
    tok64, tok2 = r(tok.shape[0], 64), r(tok.shape[0], 2)
    for (proj, a, k_in, n_out) in [("in_proj", tok, 32, 128), ("x_proj", tok64, 64, 34), ("dt_proj", tok2, 2, 64),
                                   ("out_proj", tok64, 64, 32)]:
        wi = r(n_out, k_in) * 0.1
        for mode in ["fp32", "tf32", "bf16"]:
            torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
            ai, wii = (a.bfloat16(), wi.bfloat16()) if mode == "bf16" else (a, wi)
            rows.append(bench(f"linear {proj} {mode}", f"{a.shape[0]}x{k_in}->{n_out}", lambda x_, ww: x_ @ ww.t(),
                              [ai.clone(), wii.clone()], flops=2 * a.shape[0] * k_in * n_out,
                              nbytes=a.shape[0] * (k_in + n_out) * (2 if mode == "bf16" else 4)))
    torch.backends.cuda.matmul.allow_tf32 = False
    del tok64, tok2
    # Mamba on PiM stage-0 sequences: 26,880 sequences of 128 tokens, d_inner 64 (the PyTorch loop's autograd
    # graph does not fit at the full count, so the scan runs a quarter of them: 6,720; ours runs both).
    G, L, Din, Ns = 26880, 128, 64, 16
    xc = r(G, Din, L)
    wc, bc = r(Din, 1, 4) * 0.5, r(Din)
    rows.append(bench("causal_conv1d depthwise", f"{G}x{L}x{Din} k4",
                      lambda a, ww, bb: F.conv1d(a, ww, bb, padding=3, groups=Din)[..., :L], [xc, wc, bc],
                      nbytes=2 * xc.numel() * 4))
    del xc
    for (name, G, L) in [("PiM stage 0 (quarter)", 6720, 128), ("PaM stage 0", 2, 26880)]:
        u, z = r(G, Din, L), r(G, Din, L)
        delta = r(G, Din, L) * 0.5 - 1
        A = -torch.arange(1, Ns + 1, device=dev, dtype=torch.float32).repeat(Din, 1)
        Bm, Cm = r(G, Ns, L), r(G, Ns, L)
        Dv, db = torch.ones(Din, device=dev), r(Din) * 0.1
        nb = (4 * G * Din * L + 2 * G * Ns * L) * 4
        reps = 3 if L > 1000 else 5
        rows.append(bench(f"selective_scan {name}", f"{G}x{Din}x{L}x{Ns}", scan_ref,
                          [u, delta, A, Bm, Cm, Dv, z, db], nbytes=nb, reps=reps, backward=L <= 1000))
        del u, z, delta, Bm, Cm
        torch.cuda.empty_cache()
    K = 14
    logits, labels = r(N, K, Dd, H, W), torch.randint(0, K, (N, Dd, H, W), device=dev)
    rows.append(bench("cross_entropy", f"{N}x{K}x40x224x192", lambda a: F.cross_entropy(a, labels), [logits],
                      nbytes=logits.numel() * 4))
    params = [torch.randn(63_450_000, device=dev)]
    params[0].grad = torch.randn_like(params[0])
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    ms = timed(lambda: opt.step(), reps=10)
    rows.append({"name": "sgd nesterov step", "shape": "63.45M params", "fwd_ms": ms,
                 "bytes": 63_450_000 * 4 * 5})
    print(f"{'sgd nesterov step':40s} {'63.45M':40s} {ms:9.3f} ms")
    res = {"gpu": gpu, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "ceilings": ceil,
           "rows": rows}
    with open(os.path.join(args.out, "torch_bench.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
