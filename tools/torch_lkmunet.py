#!/usr/bin/env python3
"""LKM-UNet in plain PyTorch: the reference that lkm-engine's parity test compares against.

Written from the network description in shared/design/lkm-unet.md and the public code's structure (github
wjh892521292/LKM-UNet, `LKMUNet.py` on nnU-Net v2's dynamic_network_architectures and mamba_ssm), with no
dependency but torch. The module tree is laid out so that `state_dict()` keys are the public model's canonical keys,
which are also lkm-engine's parameter names:

    encoder.stem.convs.0.{conv,norm}.{weight,bias}
    encoder.stages.S.blocks.B.{conv1,conv2}.{conv,norm}.{weight,bias}
    encoder.stages.S.blocks.B.skip.I.{conv.weight,norm.weight,norm.bias}     (I = 1 after an AvgPool, else 0)
    encoder.mamba_layers.S.{norm.*, mamba_forw.*, out_proj.weight, mamba_backw.*}      (PiM)
    encoder.w_mamba_layers.S.{...}                                                     (PaM)
      mamba_*: in_proj.weight, conv1d.{weight,bias}, x_proj.weight, dt_proj.{weight,bias}, A_log, D
    decoder.transpconvs.I.{weight,bias}, decoder.stages.I.blocks.B..., decoder.seg_layers.I.{weight,bias}

(The public model's own state_dict also repeats every encoder key under `decoder.encoder.` and every conv/norm
under `all_modules.0/1`; those are aliases of the same tensors, handled by tools/convert_pth.py.)

Built from a dict with the fields of lkm-engine's `ModelConfig` (its serde JSON): in_channels, num_classes,
features, kernels, strides, blocks_enc, blocks_dec, deep_supervision, pim_windows, pim_layout ("window" |
"strided"), pam_pools, mamba {d_state, d_conv, expand}, patch. As in the engine, blocks_dec[s] is the block count of
the decoder level of encoder stage s, i.e. of `decoder.stages.{n-2-s}`; the public code's n_conv_per_stage_decoder
lists the same counts in decoder order (deepest first), so it is this list reversed.

Everything runs in float32. The selective scan is a loop over time in the formulation of mamba_ssm's
`selective_scan_ref` (one (G, D, N) state per step; nothing of size (G, D, L, N) is formed), differentiated by
autograd, so the gradients here do not depend on any handwritten backward.

Also here: nnU-Net v2's training loss (DC_and_CE with MemoryEfficientSoftDiceLoss, deep-supervision weighting) and
the label downsampling lkm-engine uses.
"""
import json
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LEAKY_SLOPE = 1e-2
NORM_EPS = 1e-5
DICE_SMOOTH = 1e-5

CONFIG_FIELDS = (
    "in_channels",
    "num_classes",
    "features",
    "kernels",
    "strides",
    "blocks_enc",
    "blocks_dec",
    "deep_supervision",
    "pim_windows",
    "pim_layout",
    "pam_pools",
    "mamba",
    "patch",
)


# --------------------------------------------------------------------------------------------------------------------
# Configuration


def load_config(src):
    """A ModelConfig dict from a dict, a JSON string or a path to a JSON file (a bare config, or an object with a
    "config" field such as lkm-engine's checkpoint metadata)."""
    if isinstance(src, dict):
        cfg = src
    else:
        text = str(src)
        if not text.lstrip().startswith("{"):
            with open(text) as f:
                text = f.read()
        cfg = json.loads(text)
    if "config" in cfg and "features" not in cfg:
        cfg = cfg["config"]
    missing = [k for k in CONFIG_FIELDS if k not in cfg]
    if missing:
        raise ValueError(f"model config lacks {missing}")
    return cfg


def _pim_base(n, s):
    # The public code's 2^((n - s + 1) // 2 - 1).
    return 2 ** ((n - s + 1) // 2 - 1)


def _pam_factor(n, s):
    # The public code's 2^((n - s + 1) // 2) // 2.
    return 2 ** ((n - s + 1) // 2) // 2


def public_windows(n_stages, rank):
    """The public code's PiM sizes per stage: 2D 5 * base on both axes, 3D base * (5, 7, 6)."""
    if rank == 2:
        return [[5 * _pim_base(n_stages, s)] * 2 for s in range(n_stages)]
    return [[m * _pim_base(n_stages, s) for m in (5, 7, 6)] for s in range(n_stages)]


def public_pools(n_stages, rank):
    """The public code's PaM pooling factor per stage, on every axis."""
    return [[_pam_factor(n_stages, s)] * rank for s in range(n_stages)]


def flare_3d():
    """lkm-engine's ModelConfig::flare_3d (FLARE22 3d_fullres, patch 40 x 224 x 192, 14 classes)."""
    n = 6
    return {
        "in_channels": 1,
        "num_classes": 14,
        "features": [32, 64, 128, 256, 320, 320],
        "kernels": [[1, 3, 3]] + [[3, 3, 3]] * (n - 1),
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]],
        "blocks_enc": [2] * n,
        "blocks_dec": [2] * (n - 1),
        "deep_supervision": True,
        "pim_windows": public_windows(n, 3),
        "pim_layout": "window",
        "pam_pools": public_pools(n, 3),
        "mamba": {"d_state": 16, "d_conv": 4, "expand": 2},
        "patch": [40, 224, 192],
    }


def amos_2d():
    """lkm-engine's ModelConfig::amos_2d (7 stages, patch 320 x 320, 14 classes)."""
    n = 7
    return {
        "in_channels": 1,
        "num_classes": 14,
        "features": [32, 64, 128, 256, 512, 512, 512],
        "kernels": [[3, 3]] * n,
        "strides": [[1, 1]] + [[2, 2]] * (n - 1),
        "blocks_enc": [2] * n,
        "blocks_dec": [2] * (n - 1),
        "deep_supervision": True,
        "pim_windows": public_windows(n, 2),
        "pim_layout": "window",
        "pam_pools": public_pools(n, 2),
        "mamba": {"d_state": 16, "d_conv": 4, "expand": 2},
        "patch": [320, 320],
    }


def tiny_3d():
    """lkm-engine's ModelConfig::tiny_3d (4 stages, 8..64 features, patch 32^3, 4 classes)."""
    return {
        "in_channels": 1,
        "num_classes": 4,
        "features": [8, 16, 32, 64],
        "kernels": [[3, 3, 3]] * 4,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        "blocks_enc": [1, 1, 1, 1],
        "blocks_dec": [1, 1, 1],
        "deep_supervision": True,
        "pim_windows": [[4, 4, 4], [4, 4, 4], [2, 2, 2], [2, 2, 2]],
        "pim_layout": "window",
        "pam_pools": [[4, 4, 4], [2, 2, 2], [1, 1, 1], [1, 1, 1]],
        "mamba": {"d_state": 8, "d_conv": 4, "expand": 2},
        "patch": [32, 32, 32],
    }


BUILTIN = {"flare-3d": flare_3d, "amos-2d": amos_2d, "tiny-3d": tiny_3d}


def stage_sizes(cfg, size):
    """Feature-map size of each stage for an input of `size`: a stride-s conv with padding k // 2 gives ceil(n / s)."""
    out, cur = [], list(size)
    for st in cfg["strides"]:
        cur = [-(-c // s) for c, s in zip(cur, st)]
        out.append(list(cur))
    return out


def validate(cfg, size=None):
    """Raises ValueError, naming stage, axis and sizes, where the config is inconsistent or a PiM window / PaM
    factor does not divide its stage's map (lkm-engine refuses these; the public code silently fell back)."""
    size = list(cfg["patch"] if size is None else size)
    n = len(cfg["features"])
    r = len(cfg["patch"])
    if n < 2:
        raise ValueError(f"a U-Net needs at least 2 stages, got {n}")
    for key in ("kernels", "strides", "blocks_enc", "pim_windows", "pam_pools"):
        if len(cfg[key]) != n:
            raise ValueError(f"{key} has {len(cfg[key])} entries for {n} stages")
    if len(cfg["blocks_dec"]) != n - 1:
        raise ValueError(f"blocks_dec needs {n - 1} entries, got {len(cfg['blocks_dec'])}")
    if cfg["pim_layout"] not in ("window", "strided"):
        raise ValueError(f"pim_layout must be 'window' or 'strided', got {cfg['pim_layout']!r}")
    if len(size) != r:
        raise ValueError(f"patch {size} has {len(size)} axes, the model {r}")
    axes = ["D", "H", "W"][3 - r:]
    prev = size
    for s, sizes in enumerate(stage_sizes(cfg, size)):
        for key in ("kernels", "strides", "pim_windows", "pam_pools"):
            if len(cfg[key][s]) != r:
                raise ValueError(f"stage {s}: {key} {cfg[key][s]} does not have {r} axes")
        for a, (length, st) in enumerate(zip(prev, cfg["strides"][s])):
            if length % st:
                raise ValueError(f"stage {s}: stride {st} does not divide axis {axes[a]} of size {length} (patch {size})")
        for a, length in enumerate(sizes):
            w, f = cfg["pim_windows"][s][a], cfg["pam_pools"][s][a]
            if length % w:
                raise ValueError(f"PiM stage {s}: window {w} does not divide axis {axes[a]} of size {length} "
                                 f"(stage map {sizes}, patch {size})")
            if length % f:
                raise ValueError(f"PaM stage {s}: pooling factor {f} does not divide axis {axes[a]} of size {length} "
                                 f"(stage map {sizes}, patch {size})")
        prev = sizes


# --------------------------------------------------------------------------------------------------------------------
# Convolution blocks (nnU-Net's ConvDropoutNormReLU, BasicBlockD, StackedResidualBlocks)


def _conv_cls(rank, transposed=False):
    if transposed:
        return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[rank]
    return {2: nn.Conv2d, 3: nn.Conv3d}[rank]


def _norm_cls(rank):
    return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[rank]


def _pool(x, factors):
    return F.avg_pool3d(x, factors, factors) if x.dim() == 5 else F.avg_pool2d(x, factors, factors)


class AvgPool(nn.Module):
    """Average pooling with kernel = stride = `factors` (per axis); no parameters."""

    def __init__(self, factors):
        super().__init__()
        self.factors = tuple(factors)

    def forward(self, x):
        return _pool(x, self.factors)


class ConvNormAct(nn.Module):
    """conv (padding k // 2) -> InstanceNorm (eps 1e-5, affine) -> optional LeakyReLU(0.01)."""

    def __init__(self, rank, cin, cout, kernel, stride, bias, act):
        super().__init__()
        self.conv = _conv_cls(rank)(cin, cout, tuple(kernel), tuple(stride), padding=tuple(k // 2 for k in kernel),
                                    bias=bias)
        self.norm = _norm_cls(rank)(cout, eps=NORM_EPS, affine=True)
        self.act = act

    def forward(self, x):
        y = self.norm(self.conv(x))
        return F.leaky_relu(y, LEAKY_SLOPE) if self.act else y


class ResidualBlock(nn.Module):
    """BasicBlockD: LReLU(IN(conv2(LReLU(IN(conv1_stride(x))))) + skip(x)), skip = [AvgPool(stride)] then
    [1x1 conv without bias + IN] when the stride is not 1 / the channel count changes."""

    def __init__(self, rank, cin, cout, kernel, stride):
        super().__init__()
        ones = [1] * rank
        self.conv1 = ConvNormAct(rank, cin, cout, kernel, stride, True, True)
        self.conv2 = ConvNormAct(rank, cout, cout, kernel, ones, True, False)
        ops = []
        if any(s != 1 for s in stride):
            ops.append(AvgPool(stride))
        if cin != cout:
            ops.append(ConvNormAct(rank, cin, cout, ones, ones, False, False))
        self.skip = nn.Sequential(*ops) if ops else nn.Identity()

    def forward(self, x):
        return F.leaky_relu(self.conv2(self.conv1(x)) + self.skip(x), LEAKY_SLOPE)


class ResidualStage(nn.Module):
    """`n` residual blocks; the first strided and changing channels."""

    def __init__(self, rank, n, cin, cout, kernel, stride):
        super().__init__()
        ones = [1] * rank
        self.blocks = nn.Sequential(
            *[ResidualBlock(rank, cin if i == 0 else cout, cout, kernel, stride if i == 0 else ones) for i in range(n)]
        )

    def forward(self, x):
        return self.blocks(x)


class Stem(nn.Module):
    """StackedConvBlocks with one conv: `convs.0` = conv -> IN -> LReLU, stride 1."""

    def __init__(self, rank, cin, cout, kernel):
        super().__init__()
        self.convs = nn.Sequential(ConvNormAct(rank, cin, cout, kernel, [1] * rank, True, True))

    def forward(self, x):
        return self.convs(x)


# --------------------------------------------------------------------------------------------------------------------
# Mamba


def _scan_steps(h, A, dt, u, B, C):
    """Advances the state h (G, D, N) over the steps of one chunk; dt, u: (G, T, D); B, C: (G, T, N).
    Returns (h after the chunk, y (G, T, D) = <C_t, h_t> per step)."""
    ys = []
    for t in range(dt.shape[1]):
        decay = torch.exp(dt[:, t, :, None] * A)                       # exp(delta_t A), (G, D, N)
        drive = (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]    # delta_t B_t u_t, (G, D, N)
        h = decay * h + drive
        ys.append(torch.einsum("gdn,gn->gd", h, C[:, t]))
    return h, torch.stack(ys, dim=1)


def selective_scan(u, delta, A_log, B, C, D, z, delta_bias, chunk=0, group=0):
    """Mamba v1's selective scan with softplus step and SiLU(z) gate, channels last.

    u, delta, z: (G, L, D); A_log: (D, N); B, C: (G, L, N); D, delta_bias: (D,). Per sequence g and channel d, with
    h_{-1} = 0:  dt_t = softplus(delta_t + delta_bias), h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t (A = -exp(A_log)),
    y_t = (<C_t, h_t> + D u_t) SiLU(z_t).

    `chunk` > 0 runs the scan in pieces under activation checkpointing (autograd recomputes a piece in the backward
    pass), trading time for memory; the gradients are autograd's either way. A piece is at most `chunk` steps of at
    most `group` sequences (default max(1, chunk * 256 // steps)): long sequences (PiM windows) are cut in time, many short ones (the
    strided grouping, whose sequences are as long as the number of windows) in groups of sequences."""
    dt = F.softplus(delta + delta_bias)   # threshold 20: the identity above it, as mamba_ssm
    A = -torch.exp(A_log)
    G, L, Dch = u.shape
    if not (chunk and torch.is_grad_enabled()):
        _, y = _scan_steps(u.new_zeros(G, Dch, A.shape[1]), A, dt, u, B, C)
        return (y + u * D) * F.silu(z)
    steps = min(chunk, L)
    group = group or max(1, chunk * 256 // steps)
    pieces = []
    for g0 in range(0, G, group):
        gs = slice(g0, g0 + group)
        h = u.new_zeros(dt[gs].shape[0], Dch, A.shape[1])
        ys = []
        for t0 in range(0, L, steps):
            ts = slice(t0, t0 + steps)
            h, y = checkpoint(_scan_steps, h, A, dt[gs, ts], u[gs, ts], B[gs, ts], C[gs, ts], use_reentrant=False)
            ys.append(y)
        pieces.append(torch.cat(ys, dim=1))
    y = torch.cat(pieces, dim=0)
    return (y + u * D) * F.silu(z)


class MambaBlock(nn.Module):
    """Mamba v1 (d_state, d_conv, expand; dt_rank = ceil(d_model / 16)) without its out_proj: tokens (G, L, d_model)
    to (G, L, d_inner). Parameter names as mamba_ssm's Mamba."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, scan_chunk=0):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.scan_chunk = scan_chunk
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.reset_dt()

    @torch.no_grad()
    def reset_dt(self, dt_min=1e-3, dt_max=1e-1, dt_floor=1e-4):
        """mamba_ssm's step-size init: weight U(+-dt_rank^-0.5); bias = softplus^-1 of a log-uniform dt."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, u):
        L = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)                                     # (G, L, di) each
        x = self.conv1d(x.transpose(1, 2))[..., :L].transpose(1, 2)                  # causal: left padding d_conv - 1
        x = F.silu(x)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)                                    # its bias goes into the scan
        return selective_scan(x, delta, self.A_log, B, C, self.D, z, self.dt_proj.bias, chunk=self.scan_chunk)


def _group(x, window, layout):
    """Feature map (B, C, *S) to token sequences (G, L, C): S_a = i * p_a + j per axis; `window` makes one sequence
    per block i of adjacent pixels (tokens j in raster order), `strided` one per offset j (tokens i): the public
    code's reshape / permute."""
    b, c, *sizes = x.shape
    r = len(sizes)
    split = [b, c]
    for n, p in zip(sizes, window):
        split += [n // p, p]
    y = x.reshape(split)
    blocks = [2 + 2 * a for a in range(r)]      # the i digits
    inner = [3 + 2 * a for a in range(r)]       # the j digits
    group, token = (blocks, inner) if layout == "window" else (inner, blocks)
    y = y.permute(0, *group, *token, 1)
    n_tok = math.prod(split[t] for t in token)
    return y.reshape(-1, n_tok, c)


def _ungroup(t, shape, window, layout):
    """The inverse of _group: tokens (G, L, C) back to a map of `shape`."""
    b, c, *sizes = shape
    r = len(sizes)
    blocks = [n // p for n, p in zip(sizes, window)]
    group, token = (blocks, list(window)) if layout == "window" else (list(window), blocks)
    y = t.reshape(b, *group, *token, c)
    # y axes: 0 = b, 1..r = group digits, r+1..2r = token digits, 2r+1 = c; put back (b, c, i0, j0, i1, j1, ...).
    gi = list(range(1, r + 1))
    ti = list(range(r + 1, 2 * r + 1))
    i_ax, j_ax = (gi, ti) if layout == "window" else (ti, gi)
    order = [0, 2 * r + 1]
    for a in range(r):
        order += [i_ax[a], j_ax[a]]
    return y.permute(order).reshape(shape)


class BiMambaLayer(nn.Module):
    """x + ungroup(out_proj(fwd(t) + flip(bwd(flip(t))))), t = LayerNorm(group(x)).

    PiM (`kind` = "pixel"): groups of `window` pixels in `layout`. PaM (`kind` = "patch"): AvgPool by `window`
    (per axis), one sequence per sample over the pooled map, nearest upsampling back."""

    def __init__(self, dim, kind, window, layout, mamba_cfg, scan_chunk=0):
        super().__init__()
        self.kind, self.window, self.layout = kind, list(window), layout
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        mc = {k: mamba_cfg[k] for k in ("d_state", "d_conv", "expand")}
        self.mamba_forw = MambaBlock(dim, scan_chunk=scan_chunk, **mc)
        self.out_proj = nn.Linear(mamba_cfg["expand"] * dim, dim, bias=False)
        self.mamba_backw = MambaBlock(dim, scan_chunk=scan_chunk, **mc)

    def forward(self, x):
        if self.kind == "pixel":
            src, window, layout = x, self.window, self.layout
        else:
            pooled = any(f != 1 for f in self.window)
            src = _pool(x, self.window) if pooled else x
            window, layout = list(src.shape[2:]), "window"
        for a, (n, p) in enumerate(zip(src.shape[2:], window)):
            if n % p:
                raise ValueError(f"{self.kind} layer: window {p} does not divide axis {a} of the map {list(src.shape)}")
        t = self.norm(_group(src, window, layout))
        y = self.mamba_forw(t) + torch.flip(self.mamba_backw(torch.flip(t, dims=[1])), dims=[1])
        y = _ungroup(self.out_proj(y), src.shape, window, layout)
        if self.kind == "patch" and any(f != 1 for f in self.window):
            y = F.interpolate(y, scale_factor=tuple(float(f) for f in self.window), mode="nearest")
        return x + y


# --------------------------------------------------------------------------------------------------------------------
# The network


class Encoder(nn.Module):
    def __init__(self, cfg, scan_chunk=0):
        super().__init__()
        r = len(cfg["patch"])
        f = cfg["features"]
        n = len(f)
        self.stem = Stem(r, cfg["in_channels"], f[0], cfg["kernels"][0])
        self.stages = nn.ModuleList(
            ResidualStage(r, cfg["blocks_enc"][s], f[max(s - 1, 0)], f[s], cfg["kernels"][s], cfg["strides"][s])
            for s in range(n)
        )
        self.mamba_layers = nn.ModuleList(
            BiMambaLayer(f[s], "pixel", cfg["pim_windows"][s], cfg["pim_layout"], cfg["mamba"], scan_chunk)
            for s in range(n)
        )
        self.w_mamba_layers = nn.ModuleList(
            BiMambaLayer(f[s], "patch", cfg["pam_pools"][s], "window", cfg["mamba"], scan_chunk) for s in range(n)
        )

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for stage, pim, pam in zip(self.stages, self.mamba_layers, self.w_mamba_layers):
            x = pam(pim(stage(x)))
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """Stage i works at encoder level s = n - 2 - i: transposed conv (kernel = stride = strides[s + 1]) from level
    s + 1, concat [up, skip s], residual blocks, 1x1 head."""

    def __init__(self, cfg):
        super().__init__()
        r = len(cfg["patch"])
        f = cfg["features"]
        n = len(f)
        ones = [1] * r
        self.deep_supervision = cfg["deep_supervision"]
        levels = [n - 2 - i for i in range(n - 1)]
        self.transpconvs = nn.ModuleList(
            _conv_cls(r, True)(f[s + 1], f[s], tuple(cfg["strides"][s + 1]), tuple(cfg["strides"][s + 1]), bias=True)
            for s in levels
        )
        self.stages = nn.ModuleList(
            ResidualStage(r, cfg["blocks_dec"][s], 2 * f[s], f[s], cfg["kernels"][s], ones) for s in levels
        )
        self.seg_layers = nn.ModuleList(_conv_cls(r)(f[s], cfg["num_classes"], 1, 1, 0, bias=True) for s in levels)

    def forward(self, skips):
        below = skips[-1]
        outs = []
        last = len(self.stages) - 1
        for i, (up, stage, seg) in enumerate(zip(self.transpconvs, self.stages, self.seg_layers)):
            below = stage(torch.cat([up(below), skips[-(i + 2)]], dim=1))
            if self.deep_supervision or i == last:
                outs.append(seg(below))
        return outs[::-1]


class LKMUNet(nn.Module):
    """LKM-UNet from a ModelConfig dict. forward(x) returns a list of logits, highest resolution first (one entry
    without deep supervision). `scan_chunk` > 0 checkpoints the scan's time loop in chunks (less memory)."""

    def __init__(self, cfg, scan_chunk=0, init=True):
        super().__init__()
        cfg = load_config(cfg)
        validate(cfg)
        self.config = cfg
        self.encoder = Encoder(cfg, scan_chunk)
        self.decoder = Decoder(cfg)
        if init:
            self.initialise()

    def forward(self, x):
        r = len(self.config["patch"])
        if x.dim() != r + 2 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"LKM-UNet expects input (N, {self.config['in_channels']}, {r} spatial axes), "
                             f"got {list(x.shape)}")
        validate(self.config, list(x.shape[2:]))
        return self.decoder(self.encoder(x))

    @torch.no_grad()
    def initialise(self):
        """nnU-Net's init (He normal with slope 1e-2 for 2D/3D convs and transposed convs, biases 0; every residual
        block's last IN scale 0); Mamba and Linear layers keep their own init (set in their constructors)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResidualBlock):
                nn.init.zeros_(m.conv2.norm.weight)
                nn.init.zeros_(m.conv2.norm.bias)


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Loss (nnU-Net v2: DC_and_CE_loss + DeepSupervisionWrapper)


def downsample_labels(labels, size, mode="nearest-exact"):
    """Labels (N, 1, *S) to `size` by integer factors f per axis. mode "nearest-exact" (the default, and what
    lkm-engine's downsample_labels does): output voxel o takes input voxel o * f + f // 2, as nnU-Net v2's current
    pipeline (batchgeneratorsv2 DownsampleSegForDSTransform, F.interpolate(mode='nearest-exact')) picks;
    mode "first": o * f."""
    spatial = list(labels.shape[2:])
    if spatial == list(size):
        return labels
    factors = [a // b for a, b in zip(spatial, size)]
    if any(f < 1 or f * b != a for a, b, f in zip(spatial, size, factors)):
        raise ValueError(f"labels of spatial size {spatial} cannot be reduced to {list(size)} by integer factors")
    if mode not in ("first", "nearest-exact"):
        raise ValueError(f"unknown label downsampling mode {mode!r}")
    first = (lambda f: 0) if mode == "first" else (lambda f: f // 2)
    index = (slice(None), slice(None)) + tuple(slice(first(f), None, f) for f in factors)
    return labels[index]


def soft_dice_loss(logits, target, batch_dice):
    """MemoryEfficientSoftDiceLoss(softmax, batch_dice, do_bg=False, smooth=1e-5): -mean over foreground classes
    (and samples unless batch_dice) of (2 I + s) / max(P + G + s, 1e-8)."""
    probs = torch.softmax(logits, dim=1)[:, 1:]
    axes = tuple(range(2, logits.dim()))
    with torch.no_grad():
        onehot = torch.zeros_like(logits, dtype=torch.bool)
        onehot.scatter_(1, target.long(), True)
        onehot = onehot[:, 1:]
        sum_gt = onehot.sum(axes).to(probs.dtype)
    intersect = (probs * onehot).sum(axes)
    sum_pred = probs.sum(axes)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dc = (2 * intersect + DICE_SMOOTH) / torch.clip(sum_gt + sum_pred + DICE_SMOOTH, min=1e-8)
    return -dc.mean()


def dc_ce_loss(logits, target, batch_dice):
    """nnU-Net's DC_and_CE_loss with weights 1:1: cross-entropy (mean over voxels) + soft Dice."""
    return F.cross_entropy(logits, target[:, 0].long()) + soft_dice_loss(logits, target, batch_dice)


def deep_supervision_weights(n):
    """2^-i for output i (highest resolution first), the last 0 when n > 1, normalised to sum 1."""
    w = [0.5 ** i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


def deep_supervision_loss(outputs, labels, batch_dice=True, label_mode="nearest-exact"):
    """sum_i w_i DC_and_CE(outputs[i], labels downsampled to outputs[i]); zero-weight outputs are skipped.
    `label_mode` as in downsample_labels."""
    total = None
    for out, w in zip(outputs, deep_supervision_weights(len(outputs))):
        if w == 0.0:
            continue
        term = w * dc_ce_loss(out, downsample_labels(labels, out.shape[2:], label_mode), batch_dice)
        total = term if total is None else total + term
    return total


def _main():
    import argparse

    ap = argparse.ArgumentParser(description="Build the PyTorch LKM-UNet and print its parameter names and count.")
    ap.add_argument("config", help="a built-in name (flare-3d, amos-2d, tiny-3d) or a ModelConfig JSON file")
    ap.add_argument("--names", action="store_true", help="print every state_dict key with its shape")
    args = ap.parse_args()
    cfg = BUILTIN[args.config]() if args.config in BUILTIN else load_config(args.config)
    with torch.device("meta"):
        model = LKMUNet(cfg, init=False)
    if args.names:
        for k, v in model.state_dict().items():
            print(k, list(v.shape))
    n = parameter_count(model)
    print(f"{len(model.state_dict())} tensors, {n} parameters ({n / 1e6:.2f} M)")


if __name__ == "__main__":
    _main()
