#!/usr/bin/env python3
"""Converts LKM-UNet weights between the public PyTorch code's checkpoints (.pth) and lkm-engine's safetensors.

    python3 tools/convert_pth.py pth2st IN.pth OUT.safetensors [--config CFG.json | --config-name NAME]
                                        [--patch D H W] [--layout strided|window] [--trust-pickle]
                                        [--normalization zscore|ct:LO,HI,MEAN,STD] [--spacing D H W]
    python3 tools/convert_pth.py st2pth IN.safetensors OUT.pth [--plain]

pth2st reads an nnU-Net checkpoint ({'network_weights': state_dict, 'init_args': {...}, ...}) or a bare state_dict
(also under 'state_dict' / 'model'; 'module.' and '_orig_mod.' prefixes are stripped) and keeps exactly the
parameters of lkm-engine's model, under their canonical names, as float32. Dropped and reported:
  - aliases the public module tree repeats: `decoder.encoder.*` (the decoder holds a reference to the encoder) and
    `*.all_modules.0/1.*` (nnU-Net's conv blocks also list their conv and norm in a Sequential); each alias is
    checked to equal its canonical tensor;
  - anything else that is not a parameter of our model, e.g. the Mamba blocks' own `out_proj` (the public code
    replaces it by Identity and uses the layer's shared out_proj).
A missing parameter or a shape difference is an error. The model configuration comes from --config (a ModelConfig
JSON, or a checkpoint metadata JSON with a "config" field) or --config-name (flare-3d, amos-2d, tiny-3d); otherwise
it is inferred: channels, kernels, strides, block counts and Mamba sizes from the tensor shapes, the patch from the
checkpoint's nnU-Net plans (or --patch), and the PiM windows / PaM factors from the public code's formulas with the
public code's strided PiM grouping (--layout window for the paper's). The output's metadata key "lkm_engine" holds
{"config": ..., "source": ..., "run": {"normalization": ..., "spacing": ...}}; "batch_dice" is added when the plans
give it. "run" is what `lkm-engine predict` needs besides the weights: nnU-Net's CT or z-score normalisation and the
training spacing, read from the plans or given by --normalization (zscore | ct:LO,HI,MEAN,STD) and --spacing D H W.

st2pth writes {'network_weights': state_dict, 'lkm_engine': {...}} from an lkm-engine safetensors file (momentum
buffers and other non-parameters are left out and reported). By default the state_dict also carries the public
model's alias keys (sharing storage, so the file is not larger), so that the public LKMUNet loads it with strict
load_state_dict; --plain writes the canonical keys only (what tools/torch_lkmunet.LKMUNet loads).

Loading a .pth file unpickles it. By default only torch's safe loader is used (weights_only=True); a checkpoint
that needs more (nnU-Net's log holds numpy scalars) is refused unless --trust-pickle says it comes from a trusted
source.
"""
import argparse
import json
import os
import re
import sys
from collections import OrderedDict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402
import torch_lkmunet as tl  # noqa: E402

META_KEY = "lkm_engine"


def log(msg):
    print(msg, file=sys.stderr)


def load_pth(path, trust_pickle):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the safe unpickler refuses any global it does not know
        if not trust_pickle:
            raise SystemExit(
                f"{path}: torch's safe loader refused it ({str(e).splitlines()[0]}).\n"
                "If the file comes from a source you trust, pass --trust-pickle to load it with the full unpickler."
            )
        log(f"{path}: safe loading failed; loading with the full unpickler (--trust-pickle)")
        return torch.load(path, map_location="cpu", weights_only=False)


def extract_state_dict(ckpt, path):
    """The state_dict inside a checkpoint object, and the checkpoint dict itself (or None for a bare state_dict)."""
    if not isinstance(ckpt, dict):
        raise SystemExit(f"{path}: expected a dict (checkpoint or state_dict), got {type(ckpt).__name__}")
    for key in ("network_weights", "state_dict", "model"):
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key], ckpt
    if ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt, None
    raise SystemExit(f"{path}: no state_dict found (keys: {sorted(ckpt)[:10]})")


def strip_prefixes(sd):
    out = OrderedDict()
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------------------------------
# Aliases of the public module tree

_CONV = re.compile(r"^(.*)\.conv\.(weight|bias)$")
_NORM = re.compile(r"^(.*)\.norm\.(weight|bias)$")
_ALL = re.compile(r"^(.*)\.all_modules\.(\d+)\.(weight|bias)$")


def public_aliases(names):
    """alias key -> canonical key for a set of canonical names: `decoder.encoder.<k>` for every encoder key, and
    `P.all_modules.0.*` / `P.all_modules.1.*` for the conv / norm of every conv block P (a prefix with a
    `P.conv.weight`; LayerNorms of the Mamba layers have none)."""
    names = list(names)
    blocks = {m.group(1) for m in map(_CONV.match, names) if m}
    aliases = OrderedDict()
    for k in names:
        m = _CONV.match(k)
        if m:
            aliases[f"{m.group(1)}.all_modules.0.{m.group(2)}"] = k
        m = _NORM.match(k)
        if m and m.group(1) in blocks:
            aliases[f"{m.group(1)}.all_modules.1.{m.group(2)}"] = k
    for a, k in list(aliases.items()) + [(k, k) for k in names]:
        if a.startswith("encoder."):
            aliases["decoder." + a] = k
    return aliases


def resolve_aliases(sd):
    """Folds alias keys into canonical ones: drops an alias equal to its canonical tensor, renames one whose
    canonical key is absent. Returns (new state_dict, dropped alias keys)."""
    out = OrderedDict()
    aliases = []
    for k, v in sd.items():
        canon = k[len("decoder."):] if k.startswith("decoder.encoder.") else k
        m = _ALL.match(canon)
        if m:
            part = {"0": "conv", "1": "norm"}.get(m.group(2))
            if part is not None:
                canon = f"{m.group(1)}.{part}.{m.group(3)}"
        if canon != k:
            aliases.append((k, canon, v))
        else:
            out[k] = v
    dropped = []
    for k, canon, v in aliases:
        if canon in out:
            if out[canon].shape != v.shape or not torch.equal(out[canon], v):
                raise SystemExit(f"alias {k} differs from {canon}: the checkpoint is inconsistent")
            dropped.append(k)
        else:
            out[canon] = v
    return out, dropped


# --------------------------------------------------------------------------------------------------------------------
# Configuration inference


def _count(sd, prefix):
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({int(m.group(1)) for m in map(pat.match, sd) if m})


def plans_configuration(ckpt):
    """(plans, the configuration's dict with inherited keys) from an nnU-Net checkpoint's init_args, or None."""
    try:
        args = ckpt["init_args"]
        plans, name = args["plans"], args["configuration"]
        confs = plans["configurations"]
        conf = dict(confs[name])
        seen = {name}
        while "inherits_from" in conf and conf["inherits_from"] not in seen:
            parent = conf.pop("inherits_from")
            seen.add(parent)
            conf = {**confs[parent], **conf}
        return plans, conf
    except (KeyError, TypeError):
        return None


def plans_info(ckpt):
    """(patch, batch_dice) from an nnU-Net checkpoint's init_args, or (None, None)."""
    pc = plans_configuration(ckpt)
    if pc is None or "patch_size" not in pc[1]:
        return None, None
    return list(pc[1]["patch_size"]), pc[1].get("batch_dice")


def plans_run(ckpt):
    """What `lkm-engine predict` needs besides the weights, from nnU-Net plans: {"normalization", "spacing"} (either
    may be missing). nnU-Net's CTNormalization clips channel 0 to its foreground 0.5 / 99.5 percentiles and z-scores
    it with the foreground mean and std; ZScoreNormalization z-scores each image. A 2D configuration's spacing has no
    slice axis: the slice spacing is the dataset's original median (nnU-Net does not resample along it)."""
    pc = plans_configuration(ckpt) if ckpt is not None else None
    if pc is None:
        return {}
    plans, conf = pc
    run = {}
    schemes = conf.get("normalization_schemes") or []
    if schemes and schemes[0] == "CTNormalization":
        props = plans.get("foreground_intensity_properties_per_channel", {}).get("0")
        if props:
            run["normalization"] = {"scheme": "ct", "lo": props["percentile_00_5"], "hi": props["percentile_99_5"],
                                    "mean": props["mean"], "std": props["std"]}
    elif schemes and all(s == "ZScoreNormalization" for s in schemes):
        run["normalization"] = {"scheme": "zscore"}
    spacing = list(conf.get("spacing") or [])
    if len(spacing) == 2 and plans.get("original_median_spacing_after_transp"):
        spacing = [plans["original_median_spacing_after_transp"][0]] + spacing
    if len(spacing) == 3:
        run["spacing"] = [float(v) for v in spacing]
    return run


def parse_normalization(text):
    """--normalization: "zscore" or "ct:LO,HI,MEAN,STD"."""
    if text == "zscore":
        return {"scheme": "zscore"}
    try:
        kind, values = text.split(":")
        lo, hi, mean, std = (float(v) for v in values.split(","))
        if kind == "ct":
            return {"scheme": "ct", "lo": lo, "hi": hi, "mean": mean, "std": std}
    except ValueError:
        pass
    raise SystemExit(f"--normalization {text!r}: give zscore or ct:LO,HI,MEAN,STD")


def infer_config(sd, patch, layout):
    n = _count(sd, "encoder.stages.")
    if n < 2:
        raise SystemExit("cannot infer the model: fewer than 2 encoder stages in the state_dict (give --config)")
    w = lambda s: sd[f"encoder.stages.{s}.blocks.0.conv1.conv.weight"]  # noqa: E731
    features = [w(s).shape[0] for s in range(n)]
    rank = w(0).dim() - 2
    strides = [[1] * rank] + [list(sd[f"decoder.transpconvs.{n - 2 - s}.weight"].shape[2:]) for s in range(n - 1)]
    a_log = sd["encoder.mamba_layers.0.mamba_forw.A_log"]
    in_proj = sd["encoder.mamba_layers.0.mamba_forw.in_proj.weight"]
    if patch is None:
        raise SystemExit("the patch size is unknown (no nnU-Net plans in the checkpoint): give --patch or --config")
    if len(patch) != rank:
        raise SystemExit(f"--patch {patch} has {len(patch)} axes, the network {rank}")
    return {
        "in_channels": sd["encoder.stem.convs.0.conv.weight"].shape[1],
        "num_classes": sd["decoder.seg_layers.0.weight"].shape[0],
        "features": features,
        "kernels": [list(w(s).shape[2:]) for s in range(n)],
        "strides": strides,
        "blocks_enc": [_count(sd, f"encoder.stages.{s}.blocks.") for s in range(n)],
        "blocks_dec": [_count(sd, f"decoder.stages.{n - 2 - s}.blocks.") for s in range(n - 1)],
        "deep_supervision": True,
        "pim_windows": tl.public_windows(n, rank),
        "pim_layout": layout,
        "pam_pools": tl.public_pools(n, rank),
        "mamba": {
            "d_state": a_log.shape[1],
            "d_conv": sd["encoder.mamba_layers.0.mamba_forw.conv1d.weight"].shape[-1],
            "expand": in_proj.shape[0] // (2 * in_proj.shape[1]),
        },
        "patch": list(patch),
    }


def expected_shapes(cfg):
    with torch.device("meta"):
        model = tl.LKMUNet(cfg, init=False)
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------------------------------


def pth2st(args):
    ckpt = load_pth(args.input, args.trust_pickle)
    sd, outer = extract_state_dict(ckpt, args.input)
    sd = strip_prefixes(sd)
    sd = OrderedDict((k, v) for k, v in sd.items() if torch.is_tensor(v))
    sd, aliases = resolve_aliases(sd)
    patch, batch_dice = plans_info(outer) if outer is not None else (None, None)
    if args.config:
        cfg = tl.load_config(args.config)
    elif args.config_name:
        cfg = tl.BUILTIN[args.config_name]()
    else:
        cfg = infer_config(sd, args.patch or patch, args.layout)
        log(f"inferred config: {json.dumps(cfg)}")
    try:
        tl.validate(cfg)
    except ValueError as e:
        raise SystemExit(f"the model configuration does not fit its patch: {e}")
    want = expected_shapes(cfg)
    extra = [k for k in sd if k not in want]
    missing = [k for k in want if k not in sd]
    if missing:
        raise SystemExit(f"{len(missing)} parameters of the model are not in {args.input}: {missing[:8]}")
    bad = [(k, tuple(sd[k].shape), s) for k, s in want.items() if tuple(sd[k].shape) != s]
    if bad:
        raise SystemExit(f"shape differences (name, checkpoint, model): {bad[:8]}")
    tensors = OrderedDict((k, sd[k].detach().to(torch.float32).cpu().numpy()) for k in want)
    run = plans_run(outer)
    if args.normalization:
        run["normalization"] = parse_normalization(args.normalization)
    if args.spacing:
        run["spacing"] = args.spacing
    missing_run = [k for k in ("normalization", "spacing") if k not in run]
    if missing_run:
        log(f"no {' or '.join(missing_run)} in the checkpoint's plans or the flags: the file loads for training and "
            f"parity, but `lkm-engine predict` needs them (--normalization, --spacing)")
    info = {"config": cfg, "source": os.path.basename(args.input), "converted_by": "tools/convert_pth.py pth2st"}
    if run:
        info["run"] = run
    meta = {META_KEY: json.dumps(info)}
    if batch_dice is not None:
        meta["batch_dice"] = "true" if batch_dice else "false"
    safetensors_io.write(args.output, tensors, meta)
    log(f"wrote {args.output}: {len(tensors)} tensors, {sum(v.size for v in tensors.values())} parameters")
    log(f"dropped {len(aliases)} alias keys (decoder.encoder.*, *.all_modules.*), each equal to its canonical tensor")
    if extra:
        log(f"dropped {len(extra)} keys that are not parameters of the model:")
        for k in extra:
            log(f"  {k} {list(sd[k].shape)}")
    return 0


def st2pth(args):
    tensors, meta = safetensors_io.read(args.input)
    info = json.loads(meta[META_KEY]) if META_KEY in meta else {}
    cfg = info.get("config")
    names = list(tensors)
    skipped = []
    if cfg is not None:
        want = expected_shapes(cfg)
        skipped = [k for k in names if k not in want]
        missing = [k for k in want if k not in tensors]
        if missing:
            raise SystemExit(f"{args.input}: {len(missing)} parameters missing: {missing[:8]}")
        names = list(want)
    else:
        log(f"{args.input}: no '{META_KEY}' config in the metadata; writing every tensor except optimizer.* buffers")
        skipped = [k for k in names if k.startswith("optimizer.")]
        names = [k for k in names if not k.startswith("optimizer.")]
    sd = OrderedDict((k, torch.from_numpy(np.ascontiguousarray(tensors[k]))) for k in names)
    if not args.plain:
        for alias, canon in public_aliases(names).items():
            sd[alias] = sd[canon]
    torch.save({"network_weights": sd, META_KEY: info}, args.output)
    log(f"wrote {args.output}: {len(names)} parameters" + ("" if args.plain else f" + {len(sd) - len(names)} alias keys"))
    if skipped:
        log(f"left out {len(skipped)} tensors that are not parameters (e.g. {skipped[:3]})")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pth2st", help="public .pth checkpoint -> lkm-engine safetensors")
    a.add_argument("input")
    a.add_argument("output")
    a.add_argument("--config", help="ModelConfig JSON file (or checkpoint-metadata JSON with a 'config' field)")
    a.add_argument("--config-name", choices=sorted(tl.BUILTIN), help="a built-in configuration")
    a.add_argument("--patch", type=int, nargs="+", help="patch size, when inferring without nnU-Net plans")
    a.add_argument("--layout", choices=["strided", "window"], default="strided",
                   help="PiM grouping when inferring (default: strided, the public code's)")
    a.add_argument("--normalization", help="zscore or ct:LO,HI,MEAN,STD (default: from the nnU-Net plans)")
    a.add_argument("--spacing", type=float, nargs=3, metavar=("D", "H", "W"),
                   help="training voxel spacing in mm, slice axis first (default: from the nnU-Net plans)")
    a.add_argument("--trust-pickle", action="store_true", help="allow the full unpickler for trusted files")
    a.set_defaults(fn=pth2st)
    b = sub.add_parser("st2pth", help="lkm-engine safetensors -> .pth checkpoint")
    b.add_argument("input")
    b.add_argument("output")
    b.add_argument("--plain", action="store_true", help="canonical keys only, no public alias keys")
    b.set_defaults(fn=st2pth)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
