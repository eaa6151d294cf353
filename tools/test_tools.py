#!/usr/bin/env python3
"""Self-tests of the Python tools (CPU, a few seconds). Run `python3 tools/test_tools.py` or pytest on this file.
The safetensors tests need numpy only; the rest need torch and are skipped without it.

Optional: `python3 tools/test_tools.py --engine-names FILE CONFIG` also checks that the PyTorch model's state_dict
(names and shapes) equals a list of `name [shape]` lines printed from lkm-engine's Params for the same config."""
import json
import math
import os
import struct
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conv_totals  # noqa: E402
import ncu_summary  # noqa: E402
import op_totals  # noqa: E402
import safetensors_io as st  # noqa: E402

try:
    import torch
    import torch.nn.functional as F

    import convert_pth as cv
    import parity as pa
    import predict_parity as pp
    import torch_lkmunet as tl
except ImportError:  # numpy-only machine
    torch = None


def _tmp(name):
    return os.path.join(tempfile.mkdtemp(prefix="lkm_tools_"), name)


def test_safetensors_round_trip():
    rng = np.random.default_rng(1)
    tensors = {
        "f64": rng.standard_normal((3, 5)),
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i64": np.arange(-4, 5, dtype=np.int64).reshape(3, 3),
        "i32": np.array([1, -2], dtype=np.int32),
        "u8": np.arange(11, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
        "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],
    }
    meta = {"lkm_engine": json.dumps({"config": {"a": 1}}), "batch_dice": "false"}
    path = _tmp("rt.safetensors")
    st.write(path, tensors, meta)
    back, meta2 = st.read(path)
    assert meta2 == meta
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].shape == v.shape, k
        assert np.array_equal(back[k], v), k
        assert back[k].dtype.newbyteorder("=") == v.dtype.newbyteorder("="), k
    # header: 8-byte length, data aligned to 8
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    assert n % 8 == 0


def test_safetensors_bf16_and_errors():
    path = _tmp("bf16.safetensors")
    vals = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    raw = (vals.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + raw)
    t, _ = st.read(path)
    assert np.array_equal(t["w"], vals)

    def bad(hdr, data, needle):
        p = _tmp("bad.safetensors")
        h = json.dumps(hdr).encode()
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + data)
        try:
            st.read(p)
        except st.SafetensorsError as e:
            assert needle in str(e), (needle, str(e))
            return
        raise AssertionError(f"accepted a bad file ({needle})")

    bad({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "data_offsets")
    bad({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap or overlap")
    bad({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "cover")
    bad({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unsupported dtype")
    bad({"__metadata__": {"k": 1}}, b"", "metadata")
    p = _tmp("short.safetensors")
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", 1000) + b"{}")
    try:
        st.read(p)
        raise AssertionError("accepted a truncated header")
    except st.SafetensorsError as e:
        assert "header length" in str(e)


def _needs_torch():
    if torch is None:
        print("  (skipped: no torch)")
        return True
    return False


def test_grouping_layouts():
    if _needs_torch():
        return
    x = torch.randn(2, 3, 8, 12, 20)
    w = [2, 3, 4]
    for layout in ("window", "strided"):
        t = tl._group(x, w, layout)
        assert torch.equal(tl._ungroup(t, x.shape, w, layout), x)
    b, c, z, h, wd = x.shape
    public = (x.reshape(b, c, z // 2, 2, h // 3, 3, wd // 4, 4).permute(0, 3, 5, 7, 1, 2, 4, 6)
              .reshape(b * 24, c, -1).transpose(1, 2))
    assert torch.equal(tl._group(x, w, "strided"), public)
    t = tl._group(x, w, "window")   # group (n, i_d, i_h, i_w), token (j_d, j_h, j_w), raster order
    n, i, j = 1, (2, 3, 1), (1, 2, 0)
    g = ((n * 4 + i[0]) * 4 + i[1]) * 5 + i[2]
    tok = (j[0] * 3 + j[1]) * 4 + j[2]
    assert torch.equal(t[g, tok], x[n, :, i[0] * 2 + j[0], i[1] * 3 + j[1], i[2] * 4 + j[2]])
    x2 = torch.randn(2, 3, 10, 15)
    for layout in ("window", "strided"):
        assert torch.equal(tl._ungroup(tl._group(x2, [5, 5], layout), x2.shape, [5, 5], layout), x2)


def test_scan_matches_closed_form_and_chunking():
    if _needs_torch():
        return
    torch.manual_seed(0)
    G, L, D, N = 2, 7, 3, 4
    u, delta, z = (torch.randn(G, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    A_log = torch.randn(D, N, dtype=torch.float64).abs().requires_grad_()
    B, C = (torch.randn(G, L, N, dtype=torch.float64, requires_grad=True) for _ in range(2))
    Dp, bias = (torch.randn(D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    y = tl.selective_scan(u, delta, A_log, B, C, Dp, z, bias)
    # closed form: h_t = sum_{s<=t} exp(A sum_{r=s+1..t} dt_r) dt_s B_s u_s
    dt = F.softplus(delta + bias)
    A = -torch.exp(A_log)
    ref = torch.zeros(G, L, D, dtype=torch.float64)
    for t in range(L):
        h = torch.zeros(G, D, N, dtype=torch.float64)
        for s in range(t + 1):
            decay = torch.exp(A[None] * dt[:, s + 1:t + 1].sum(1)[:, :, None])
            h = h + decay * (dt[:, s] * u[:, s])[:, :, None] * B[:, s, None, :]
        ref[:, t] = (h * C[:, t, None, :]).sum(-1)
    ref = (ref + u * Dp) * F.silu(z)
    assert torch.allclose(y, ref, atol=1e-12), (y - ref).abs().max()
    ins = (u, delta, A_log, B, C, Dp, z, bias)
    g1 = torch.autograd.grad(y.square().sum(), ins)
    y2 = tl.selective_scan(*ins, chunk=3)
    g2 = torch.autograd.grad(y2.square().sum(), ins)
    assert torch.equal(y, y2)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-12)
    y3 = tl.selective_scan(*ins, chunk=L, group=1)  # pieces of one whole sequence each
    g3 = torch.autograd.grad(y3.square().sum(), ins)
    assert torch.equal(y, y3)
    for a, b in zip(g1, g3):
        assert torch.allclose(a, b, atol=1e-12)


def test_parity_floor_rule():
    """compare(): relative errors, the conv-bias rule, missing tensors; the --floor limit of main()."""
    if _needs_torch():
        return
    ref = {"out.0": np.ones((2, 3)), "loss": np.array([2.0]), "grad.a.conv.weight": np.full(4, 2.0),
           "grad.a.conv.bias": np.zeros(2), "grad.b": np.array([3.0, 4.0])}
    eng = {"out.0": np.ones((2, 3)) * (1 + 1e-6), "loss": np.array([2.0]), "grad.a.conv.weight": np.full(4, 2.0),
           "grad.a.conv.bias": np.array([4e-3, 0.0]), "grad.b": np.array([3.0, 4.05])}
    fwd, grads, kind, problems = pa.compare(eng, ref)
    assert abs(fwd["out.0"] - 1e-6) < 1e-12 and fwd["loss"] == 0.0 and not problems
    assert abs(grads["a.conv.bias"] - 1e-3) < 1e-12 and kind["a.conv.bias"] == "~"   # 4e-3 / ||(2, 2, 2, 2)||
    assert abs(grads["b"] - 0.01) < 1e-12
    del eng["grad.b"]
    _, grads, _, problems = pa.compare(eng, ref)
    assert grads["b"] == math.inf and any("grad.b" in p for p in problems)


def test_predict_parity_window_and_nifti():
    if _needs_torch():
        return
    # nnU-Net's compute_steps_for_sliding_window: n = ceil((S - P) / (P / 2)) + 1 starts, evenly spread, rounded.
    assert pp.window_starts(48, 32) == [0, 16]
    assert pp.window_starts(32, 32) == [0] and pp.window_starts(20, 32) == [0]
    assert pp.window_starts(100, 32) == [0, 14, 27, 41, 54, 68]   # 68 / 5 = 13.6 apart
    g = pp.gaussian([8, 16, 12])
    assert g.shape == (8, 16, 12) and g.max() == 1.0 and g.min() > 0
    assert np.unravel_index(g.argmax(), g.shape) == (4, 8, 6)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ct-chest")
    img, spacing = pp.read_nifti(os.path.join(root, "image.nii.gz"))
    lab, _ = pp.read_nifti(os.path.join(root, "label.nii.gz"))
    assert img.shape == lab.shape == (34, 128, 128), img.shape
    assert abs(spacing[0] - 10.0) < 0.1 and abs(spacing[1] - 3.05) < 0.05, spacing
    assert img.min() < -900 and img.max() > 500 and lab.max() > 0
    props = {"percentile_00_5": -100.0, "percentile_99_5": 300.0, "mean": 50.0, "std": 25.0}
    assert np.allclose(pp.ct_normalize(np.array([-1000.0, 50.0, 1000.0]), props), [-6.0, 0.0, 10.0])


def test_pth2st_run_metadata():
    if _needs_torch():
        return
    props = {"mean": 80.0, "std": 40.0, "percentile_00_5": -50.0, "percentile_99_5": 400.0}
    ckpt = {"init_args": {"configuration": "3d_lowres", "plans": {
        "configurations": {"3d_fullres": {"patch_size": [40, 224, 192], "spacing": [2.5, 0.8, 0.8],
                                          "normalization_schemes": ["CTNormalization"]},
                           "3d_lowres": {"inherits_from": "3d_fullres", "spacing": [3.0, 1.5, 1.5]},
                           "2d": {"patch_size": [320, 320], "spacing": [0.7, 0.7],
                                  "normalization_schemes": ["ZScoreNormalization"]}},
        "original_median_spacing_after_transp": [5.0, 0.7, 0.7],
        "foreground_intensity_properties_per_channel": {"0": props}}}}
    run = cv.plans_run(ckpt)
    assert run == {"normalization": {"scheme": "ct", "lo": -50.0, "hi": 400.0, "mean": 80.0, "std": 40.0},
                   "spacing": [3.0, 1.5, 1.5]}, run
    ckpt["init_args"]["configuration"] = "2d"
    assert cv.plans_run(ckpt) == {"normalization": {"scheme": "zscore"}, "spacing": [5.0, 0.7, 0.7]}
    assert cv.plans_run({"network_weights": {}}) == {}
    assert cv.parse_normalization("ct:-1,2,0.5,3") == {"scheme": "ct", "lo": -1.0, "hi": 2.0, "mean": 0.5, "std": 3.0}
    try:
        cv.parse_normalization("ct:1,2")
        raise AssertionError("accepted a short ct normalisation")
    except SystemExit as e:
        assert "ct:LO,HI,MEAN,STD" in str(e)


def test_reference_configs_and_names():
    if _needs_torch():
        return
    for name, count, tensors in (("flare-3d", 63_454_566, 455), ("amos-2d", 80_886_452, 532)):
        with torch.device("meta"):
            m = tl.LKMUNet(tl.BUILTIN[name](), init=False)
        assert tl.parameter_count(m) == count, (name, tl.parameter_count(m))
        sd = m.state_dict()
        assert len(sd) == tensors
        for k in ("encoder.stem.convs.0.conv.weight", "encoder.stages.1.blocks.0.skip.1.conv.weight",
                  "encoder.stages.1.blocks.0.skip.1.norm.bias", "encoder.mamba_layers.0.mamba_forw.A_log",
                  "encoder.w_mamba_layers.5.out_proj.weight", "decoder.transpconvs.0.bias",
                  "decoder.stages.4.blocks.1.conv2.norm.weight", "decoder.seg_layers.4.weight"):
            assert k in sd, k
        assert not any("out_proj" in k and "mamba_" in k.split(".")[-3] for k in sd)
    cfg = tl.flare_3d()
    assert cfg["pim_windows"][0] == [20, 28, 24] and cfg["pim_windows"][5] == [5, 7, 6]
    assert [p[0] for p in cfg["pam_pools"]] == [4, 4, 2, 2, 1, 1]
    assert [w[0] for w in tl.amos_2d()["pim_windows"]] == [40, 20, 20, 10, 10, 5, 5]


def test_tiny_model_and_loss():
    if _needs_torch():
        return
    torch.manual_seed(0)
    cfg = {"in_channels": 2, "num_classes": 3, "features": [4, 8, 16], "kernels": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
           "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "blocks_enc": [1, 2, 1], "blocks_dec": [2, 1],
           "deep_supervision": True, "pim_windows": [[2, 4, 4], [2, 2, 2], [1, 2, 2]], "pim_layout": "window",
           "pam_pools": [[2, 2, 2], [2, 2, 2], [1, 1, 1]], "mamba": {"d_state": 4, "d_conv": 4, "expand": 2},
           "patch": [8, 16, 16]}
    m = tl.LKMUNet(cfg)
    x = torch.randn(2, 2, 8, 16, 16)
    outs = m(x)
    assert [list(o.shape) for o in outs] == [[2, 3, 8, 16, 16], [2, 3, 8, 8, 8]]
    assert len(m.decoder.stages[0].blocks) == 1 and len(m.decoder.stages[1].blocks) == 2   # blocks_dec by level
    y = torch.randint(0, 3, (2, 1, 8, 16, 16)).float()
    loss = tl.deep_supervision_loss(outs, y, True)
    loss.backward()
    assert math.isfinite(loss.item())
    assert m.decoder.seg_layers[0].weight.grad is None   # the lowest output has weight 0
    assert tl.deep_supervision_weights(3) == [1 / 1.5, 0.5 / 1.5, 0.0]
    lab = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert tl.downsample_labels(lab, [2, 2], "first").flatten().tolist() == [0, 2, 8, 10]
    assert tl.downsample_labels(lab, [2, 2]).flatten().tolist() == [5, 7, 13, 15]   # block centres, the default
    # a perfect prediction has Dice loss -1 (all foreground classes present)
    perfect = F.one_hot(y[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float() * 100
    assert abs(tl.soft_dice_loss(perfect, y, True).item() + 1) < 1e-5
    bad = dict(cfg, pim_windows=[[3, 4, 4], [2, 2, 2], [1, 2, 2]])
    try:
        tl.LKMUNet(bad)
        raise AssertionError("accepted a window that does not divide the map")
    except ValueError as e:
        assert "PiM stage 0" in str(e) and "axis D" in str(e)


def test_convert_aliases_round_trip():
    if _needs_torch():
        return
    with torch.device("meta"):
        m = tl.LKMUNet(tl.tiny_3d(), init=False)
    names = list(m.state_dict())
    aliases = cv.public_aliases(names)
    assert aliases["encoder.stem.convs.0.all_modules.0.weight"] == "encoder.stem.convs.0.conv.weight"
    assert aliases["encoder.stages.1.blocks.0.skip.1.all_modules.1.bias"] == "encoder.stages.1.blocks.0.skip.1.norm.bias"
    assert aliases["decoder.encoder.mamba_layers.2.norm.weight"] == "encoder.mamba_layers.2.norm.weight"
    assert "encoder.mamba_layers.2.all_modules.1.weight" not in aliases   # LayerNorms have no conv block
    assert not any(a.startswith(("decoder.encoder.decoder", "decoder.decoder")) for a in aliases)
    sd = {k: torch.randn(2) for k in names}
    full = dict(sd)
    full.update({a: sd[c].clone() for a, c in aliases.items()})
    full["encoder.mamba_layers.0.mamba_forw.out_proj.weight"] = torch.randn(2)
    back, dropped = cv.resolve_aliases(full)
    assert len(dropped) == len(aliases)
    assert set(back) == set(names) | {"encoder.mamba_layers.0.mamba_forw.out_proj.weight"}
    full["decoder.encoder.stem.convs.0.conv.weight"] = torch.randn(2)
    try:
        cv.resolve_aliases(full)
        raise AssertionError("accepted an alias that differs from its tensor")
    except SystemExit as e:
        assert "differs" in str(e)


def test_pth2st_st2pth_cli():
    if _needs_torch():
        return
    torch.manual_seed(0)
    # 3 stages with the public code's windows and factors, on a patch they divide
    n = 3
    cfg = {"in_channels": 1, "num_classes": 3, "features": [4, 8, 16], "kernels": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
           "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "blocks_enc": [1, 2, 1], "blocks_dec": [1, 2],
           "deep_supervision": True, "pim_windows": tl.public_windows(n, 3), "pim_layout": "window",
           "pam_pools": tl.public_pools(n, 3), "mamba": {"d_state": 16, "d_conv": 4, "expand": 2},
           "patch": [20, 28, 24]}
    m = tl.LKMUNet(cfg)
    sd = m.state_dict()
    full = dict(sd)
    full.update({a: sd[c] for a, c in cv.public_aliases(list(sd)).items()})
    full["encoder.w_mamba_layers.1.mamba_backw.out_proj.weight"] = torch.randn(8, 16)
    pth = _tmp("m.pth")
    plans = {"configurations": {"base": {"patch_size": [20, 28, 24], "batch_dice": True},
                                "3d_fullres": {"inherits_from": "base"}}}
    torch.save({"network_weights": {"module." + k: v for k, v in full.items()},
                "init_args": {"plans": plans, "configuration": "3d_fullres"}}, pth)
    out = _tmp("m.safetensors")
    assert cv.main(["pth2st", pth, out, "--layout", "window"]) == 0
    w, meta = st.read(out)
    inferred = json.loads(meta["lkm_engine"])["config"]
    assert inferred == cfg, (inferred, cfg)
    assert meta["batch_dice"] == "true"
    assert set(w) == set(sd) and all(np.array_equal(w[k], sd[k].numpy()) for k in sd)
    cfg_path = _tmp("cfg.json")
    with open(cfg_path, "w") as f:
        json.dump({"config": cfg}, f)
    assert cv.main(["pth2st", pth, out, "--config", cfg_path]) == 0
    assert json.loads(st.read(out)[1]["lkm_engine"])["config"] == cfg
    try:
        cv.main(["pth2st", pth, out, "--config-name", "tiny-3d"])
        raise AssertionError("converted into a model of other shapes")
    except SystemExit as e:
        assert "not in" in str(e) or "shape" in str(e), e
    back = _tmp("back.pth")
    assert cv.main(["st2pth", out, back]) == 0
    ck = torch.load(back, weights_only=True)
    assert set(ck["network_weights"]) == set(full) - {"encoder.w_mamba_layers.1.mamba_backw.out_proj.weight"}
    assert cv.main(["st2pth", out, back, "--plain"]) == 0
    m2 = tl.LKMUNet(cfg, init=False)
    m2.load_state_dict(torch.load(back, weights_only=True)["network_weights"], strict=True)


def check_engine_names(path, config):
    """Compares `name [shape]` lines (from lkm-engine's Params) with the PyTorch model's state_dict."""
    cfg = tl.BUILTIN[config]() if config in tl.BUILTIN else tl.load_config(config)
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in tl.LKMUNet(cfg, init=False).state_dict().items()}
    theirs = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                name, shape = line.strip().split(" ", 1)
                theirs[name] = json.loads(shape)
    assert ours == theirs, (sorted(set(ours) ^ set(theirs))[:10],
                            [k for k in ours if k in theirs and ours[k] != theirs[k]][:10])
    print(f"engine names of {config}: {len(ours)} tensors, identical names and shapes")


def test_ncu_summary_columns_by_pattern():
    # ncu's raw CSV page: header, units, one row per kernel; a missing metric prints "-", units are converted, the
    # stall columns are ranked; a decoy whose name also holds "dram" and "throughput" (empty in ncu 2025's reports)
    # is not the DRAM column.
    stall = ncu_summary.STALL_PREFIX + "{}" + ncu_summary.STALL_SUFFIX
    header = ["ID", "Kernel Name", "gpu__time_duration.sum",
              "FBSP.TriageCompute.dramc__throughput.avg.pct_of_peak_sustained_elapsed",
              "dram__throughput.avg.pct_of_peak_sustained_elapsed",
              "launch__registers_per_thread", "launch__shared_mem_per_block_dynamic",
              stall.format("long_scoreboard"), stall.format("barrier"), stall.format("wait")]
    units = ["", "", "usecond", "%", "%", "register/thread", "byte", "", "", ""]
    rows = [header, units, ["0", "conv_wgrad_halo_bf16", "3,700.5", "", "12.5", "125", "56320", "9.5", "2.25", "0"]]
    cols, lines = ncu_summary.summarise(rows)
    got = dict(zip(cols, lines[0]))
    assert got["kernel"] == "conv_wgrad_halo_bf16" and got["ms"] == "3.7", got
    assert got["DRAM %"] == "12.5" and got["tensor %"] == "-" and got["regs"] == "125", got
    assert got["smem KB"] == "55", got
    assert got["top stalls (warps per issue)"] == "long_scoreboard 9.50, barrier 2.25", got
    # Newer ncu: KB, DRAM throughput named gpu__dram_throughput, and the tensor pipe's active cycles (wgmma included)
    # beside the HMMA-only ones: the first is the column.
    header[4], units[6], rows[2][6] = "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "KB", "150"
    header += ["sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
               "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
               "lts__t_sectors.avg.pct_of_peak_sustained_elapsed"]
    units += ["%", "%", "%"]
    rows[2] += ["1.7", "13.2", "71.5"]
    got = dict(zip(cols, ncu_summary.summarise(rows)[1][0]))
    assert got["smem KB"] == "150" and got["DRAM %"] == "12.5" and got["tensor %"] == "13.2", got
    assert got["L2 %"] == "71.5", got


def test_op_totals():
    """op_totals: kinds summed over layers, ordered by the first file, ratios to it, kinds only a later file has."""
    head = "op,layer,stage,shapes,calls_per_step,ms_per_step,bytes_per_step,flops_per_step,gbps,tflops\n"

    def profile(name, rows):
        path = _tmp(name)
        with open(path, "w") as f:
            f.write(head + "".join(f'{op},{layer},s,"[1, 2]",1,{ms},0,0,0,0\n' for op, layer, ms in rows))
        return path

    base = op_totals.totals(profile("base.csv", [("scan.bwd", "a", 4.0), ("scan.bwd", "b", 2.0),
                                                  ("conv.fwd", "a", 3.0)]))
    new = op_totals.totals(profile("new.csv", [("scan.bwd", "a", 3.0), ("conv.fwd", "a", 3.0), ("cast.fwd", "a", 0.5)]))
    assert base == {"scan.bwd": 6.0, "conv.fwd": 3.0}, base
    lines = op_totals.table([("base", base), ("new", new)], top=12)
    assert lines[0] == "| op kind | base ms | new ms | new / base |", lines
    assert lines[2] == "| scan.bwd | 6.00 | 3.00 | 0.500 |", lines
    assert lines[3] == "| conv.fwd | 3.00 | 3.00 | 1.000 |", lines
    assert lines[4] == "| cast.fwd | 0.00 | 0.50 | - |", lines
    assert lines[5] == "| all ops | 9.00 | 6.50 | 0.722 |", lines
    assert len(op_totals.table([("base", base), ("new", new)], top=1)) == 5  # scan.bwd, cast.fwd (new only), sums


def test_conv_totals():
    """conv_totals: per-step totals (ms x count), cuDNN ratios and the rows below 0.7, and a comparison's changes."""
    head = ("| config | layer (count) | input | weight | stride | role | ours bf16 ms | TFLOP/s (% bf16) "
            "| cuDNN bf16 ms | ratio | ours tf32 ms | cuDNN tf32 ms | ratio |\n" + "|---" * 13 + "|\n")

    def table(rows):
        path = _tmp("convs.md")
        with open(path, "w") as f:
            f.write("GPU: test\n\n" + head + "".join(
                f"| flare-3d | {layer} | [1] | [1] | [1] | {role} | {ours} | 1.0 (0.1%) | {cudnn} | {ratio} "
                "| - | - | - |\n" for layer, role, ours, cudnn, ratio in rows))
        return path

    before = table([("a (6)", "wgrad", 1.0, 0.5, 0.5), ("b (1)", "wgrad", 2.0, 4.0, 2.0),
                    ("a (6)", "fprop", 0.5, "-", "-")])
    rows = conv_totals.read_table(before)
    assert rows[("flare-3d", "a (6)", "wgrad")] == {"count": 6, "ours": 1.0, "cudnn": 0.5, "ratio": 0.5}, rows
    lines = conv_totals.summary_lines(rows)
    assert lines[0] == "flare-3d fprop: ours 3.00 ms", lines
    assert lines[1] == ("flare-3d wgrad: ours 8.00 ms, cuDNN 7.00 ms; cuDNN/ours median 1.25 (min 0.50), "
                        "1 of 2 below 0.7"), lines
    assert lines[2] == "below 0.7: 1 of 2 rows", lines
    after = table([("a (6)", "wgrad", 0.9, 0.5, 0.56), ("b (1)", "wgrad", 2.01, 4.0, 2.0),
                   ("a (6)", "fprop", 0.5, "-", "-")])
    lines = conv_totals.comparison_lines(rows, conv_totals.read_table(after), 0.05)
    assert "flare-3d wgrad: 8.00 -> 7.41 ms" in lines, lines
    assert "  flare-3d a (6) wgrad: 1.000 -> 0.900 ms" in lines and not any("b (1)" in x for x in lines), lines


def main(argv):
    if argv[:1] == ["--engine-names"]:
        check_engine_names(argv[1], argv[2])
        return 0
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    failed = 0
    for t in tests:
        try:
            t()
            print(f"ok   {t.__name__}")
        except BaseException as e:  # report every test (the CLI code exits with SystemExit)
            failed += 1
            print(f"FAIL {t.__name__}: {type(e).__name__}: {e}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
