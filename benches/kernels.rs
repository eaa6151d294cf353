//! Kernel benchmark at the reference shapes of lkm-unet.md section 5 (3D configuration, stage 0).
//!
//! Each kernel is timed with CUDA events (median of several runs after warm-up) forward and forward + backward, and
//! reported with its minimum memory traffic or FLOPs, the fraction of the machine's ceilings, and the time PyTorch
//! took on the same shapes (from `tools/bench_torch.py`, run in the same session on the same GPU).
//!
//! Usage: `kernels [--torch torch_bench.json] [--out table.md] [--only SUBSTRING]`.
//!
//! Per-shape convolutions (the tensor-core convolution issue's table): `kernels --list-convs convs.json` writes every
//! distinct convolution of a flare-3d (batch 2) and an amos-2d (batch 12) training step (`ModelConfig::convolutions`;
//! no GPU needed), `tools/bench_torch.py --convs convs.json --out DIR` times cuDNN on them (bf16 channels-last and
//! tf32, `cudnn.benchmark` on; `--variants bf16_cl` for one), and `kernels --convs convs.json [--torch
//! DIR/torch_convs.json] [--out conv.md] [--maths bf16]` times ours, each role alone: forward, input gradient and
//! weight gradient (+ bias), the gradients as (forward + that backward) - forward, in bf16 and tf32 (or the maths
//! given), and prints the table with cuDNN time / ours per row and per role. Both time only the shapes the list
//! holds: cut it to some configurations or layers to time a part.
//! The copy-bandwidth ceiling is measured here (device-to-device copy of 1 GiB, bytes read + written); the bf16 matrix
//! rate (the ceiling the TFLOP/s columns are set against) is PyTorch's 8192^3 bf16 product in the same run.

use std::sync::Arc;

use lkm_engine::autograd::Tape;
use lkm_engine::device::{Device, Gpu};
use lkm_engine::ops;
use lkm_engine::tensor::DType;
use lkm_engine::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

/// An op under test: builds its output from the inputs on the given tape.
type OpFn = Box<dyn Fn(&mut Tape, &[Tensor]) -> Result<Tensor>>;

struct Case {
    name: &'static str,
    shape: String,
    /// Minimum bytes moved by the forward (each input read once, each output written once).
    bytes: f64,
    /// Floating-point operations of the forward (0 when memory-bound).
    flops: f64,
    inputs: Vec<Tensor>,
    f: OpFn,
    backward: bool,
    /// The float32 math of the matrix products it runs (the other kernels ignore it).
    math: Math,
}

/// Exact float32 SIMT products, tf32 tensor-core ones ([`Gpu::set_exact_f32`]), or bf16 tensor-core ones (the
/// inputs stored as bf16).
#[derive(Clone, Copy)]
enum Math {
    Exact,
    Tf32,
    Bf16,
}

struct Row {
    name: String,
    shape: String,
    fwd_ms: f64,
    fwd_bwd_ms: Option<f64>,
    bytes: f64,
    flops: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Normal samples times `scale` (float32, Box-Muller as `Tensor::randn`) on `dev`, drawn in parallel chunks of
/// 2^20, each from its own generator seeded by (seed, chunk): one sample at a time, the 3D configuration's full-size
/// maps (110 M elements) took seconds each, device time spent waiting on the host.
fn randn(dev: &Device, shape: &[usize], scale: f64, seed: u64) -> Tensor {
    let mut v = vec![0.0f32; shape.iter().product()];
    v.par_chunks_mut(1 << 20).enumerate().for_each(|(chunk, out)| {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ chunk as u64);
        for x in out {
            let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1], so ln is finite
            let u2: f64 = rng.random();
            *x = (scale * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32;
        }
    });
    Tensor::from_vec(v, shape).unwrap().to_device(dev).unwrap()
}

fn run_case(gpu: &Arc<Gpu>, c: &Case) -> Result<Row> {
    let reps = 7;
    gpu.set_exact_f32(matches!(c.math, Math::Exact));
    let fwd = gpu.time_ms(2, reps, || (c.f)(&mut Tape::no_grad(), &c.inputs).map(drop))?;
    let fwd_bwd = if c.backward {
        let y = (c.f)(&mut Tape::no_grad(), &c.inputs)?;
        let seed = randn(&Device::Cuda(gpu.clone()), y.shape(), 1.0, 5).to_dtype(y.dtype())?;
        drop(y);
        Some(median(gpu.time_ms(1, reps, || {
            let mut tape = Tape::new();
            for x in &c.inputs {
                tape.watch(x);
            }
            let y = (c.f)(&mut tape, &c.inputs)?;
            tape.backward_from(&y, seed.clone()).map(drop)
        })?))
    } else {
        None
    };
    Ok(Row {
        name: c.name.into(),
        shape: c.shape.clone(),
        fwd_ms: median(fwd),
        fwd_bwd_ms: fwd_bwd,
        bytes: c.bytes,
        flops: c.flops,
    })
}

fn copy_bandwidth(gpu: &Arc<Gpu>) -> Result<f64> {
    let n = 1usize << 28;
    let src = gpu.zeros(n, "copy benchmark")?;
    let mut dst = gpu.zeros(n, "copy benchmark")?;
    let ms = median(gpu.time_ms(3, 10, || gpu.copy(&src, &mut dst))?);
    Ok(2.0 * n as f64 * 4.0 / (ms * 1e-3) / 1e9)
}

fn cases(dev: &Device) -> Vec<Case> {
    let (n, c, d, h, w) = (2, 32, 40, 224, 192);
    let map = [n, c, d, h, w];
    let vox = (n * d * h * w) as f64;
    let map_bytes = vox * c as f64 * 4.0;
    let x = randn(dev, &map, 1.0, 1);
    let mut v = Vec::new();
    // The three maths of our convolutions, named as cuDNN's rows of the same math: fp32 (exact SIMT against cuDNN
    // with TF32 off), tf32 (tensor cores against cuDNN with TF32 on) and bf16 (bf16 storage and tensor cores against
    // cuDNN bf16).
    let all_maths = |k| [(k, Math::Exact), (k, Math::Tf32), (k, Math::Bf16)];
    for (k, math) in [[3usize, 3, 3], [1, 3, 3]].into_iter().flat_map(all_maths) {
        let wt = randn(dev, &[c, c, k[0], k[1], k[2]], 0.05, 2);
        let b = randn(dev, &[c], 0.1, 3);
        let name = match (k[0], math) {
            (3, Math::Exact) => "conv3d 3x3x3 fp32",
            (3, Math::Tf32) => "conv3d 3x3x3 tf32",
            (3, Math::Bf16) => "conv3d 3x3x3 bf16",
            (_, Math::Exact) => "conv3d 1x3x3 fp32",
            (_, Math::Tf32) => "conv3d 1x3x3 tf32",
            (_, Math::Bf16) => "conv3d 1x3x3 bf16",
        };
        let dtype = if matches!(math, Math::Bf16) { DType::BF16 } else { DType::F32 };
        v.push(Case {
            name,
            shape: "2x32x40x224x192->32".into(),
            bytes: 2.0 * map_bytes * dtype.size() as f64 / 4.0,
            flops: 2.0 * vox * (c * c * k.iter().product::<usize>()) as f64,
            inputs: [&x, &wt, &b].iter().map(|t| t.to_dtype(dtype).unwrap()).collect(),
            f: Box::new(|t, i| ops::conv::conv(t, &i[0], &i[1], Some(&i[2]), &[1, 1, 1])),
            backward: true,
            math,
        });
    }
    let gamma = randn(dev, &[c], 1.0, 4);
    let beta = randn(dev, &[c], 1.0, 5);
    v.push(Case {
        name: "instance_norm",
        shape: "2x32x40x224x192".into(),
        bytes: 2.0 * map_bytes,
        flops: 0.0,
        inputs: vec![x.clone(), gamma.clone(), beta.clone()],
        f: Box::new(|t, i| ops::instance_norm::instance_norm(t, &i[0], &i[1], &i[2], 1e-5)),
        backward: true,
        math: Math::Exact,
    });
    v.push(Case {
        name: "leaky_relu",
        shape: "2x32x40x224x192".into(),
        bytes: 2.0 * map_bytes,
        flops: 0.0,
        inputs: vec![x.clone()],
        f: Box::new(|t, i| ops::activation::leaky_relu(t, &i[0])),
        backward: true,
        math: Math::Exact,
    });
    let tokens = n * d * h * w;
    let tok = randn(dev, &[2, tokens / 2, c], 1.0, 6);
    v.push(Case {
        name: "layer_norm",
        shape: format!("{tokens}x32"),
        bytes: 2.0 * map_bytes,
        flops: 0.0,
        inputs: vec![tok.clone(), gamma.clone(), beta.clone()],
        f: Box::new(|t, i| ops::layer_norm::layer_norm(t, &i[0], &i[1], &i[2], 1e-5)),
        backward: true,
        math: Math::Exact,
    });
    // The memory-bound ops of a bf16 training step at the same shapes: bf16 activations, float32 norm parameters
    // (bytes: each activation read once, each output written once, 2 bytes an element).
    let (x16, tok16) = (x.to_dtype(DType::BF16).unwrap(), tok.to_dtype(DType::BF16).unwrap());
    let bf16_cases: [(&'static str, String, f64, Vec<Tensor>, OpFn); 5] = [
        (
            "instance_norm bf16",
            "2x32x40x224x192".into(),
            map_bytes / 2.0,
            vec![x16.clone(), gamma.clone(), beta.clone()],
            Box::new(|t, i| ops::instance_norm::instance_norm(t, &i[0], &i[1], &i[2], 1e-5)),
        ),
        (
            "instance_norm_leaky_relu bf16",
            "2x32x40x224x192".into(),
            map_bytes / 2.0,
            vec![x16.clone(), gamma.clone(), beta.clone()],
            Box::new(|t, i| {
                let act = Some(ops::activation::Activation::LeakyRelu);
                ops::instance_norm::instance_norm_act(t, &i[0], &i[1], &i[2], 1e-5, act)
            }),
        ),
        (
            "layer_norm bf16",
            format!("{tokens}x32"),
            map_bytes / 2.0,
            vec![tok16, gamma, beta],
            Box::new(|t, i| ops::layer_norm::layer_norm(t, &i[0], &i[1], &i[2], 1e-5)),
        ),
        (
            "add bf16",
            "2x32x40x224x192".into(),
            0.75 * map_bytes,
            vec![x16.clone(), randn(dev, &map, 1.0, 19).to_dtype(DType::BF16).unwrap()],
            Box::new(|t, i| ops::add::add(t, &i[0], &i[1])),
        ),
        (
            "silu bf16",
            "2x32x40x224x192".into(),
            map_bytes / 2.0,
            vec![x16],
            Box::new(|t, i| ops::activation::silu(t, &i[0])),
        ),
    ];
    for (name, shape, bytes, inputs, f) in bf16_cases {
        v.push(Case { name, shape, bytes, flops: 0.0, inputs, f, backward: true, math: Math::Bf16 });
    }
    v.push(Case {
        name: "pim partition strided",
        shape: "2x32x40x224x192 / (20,28,24)".into(),
        bytes: 2.0 * map_bytes,
        flops: 0.0,
        inputs: vec![x.clone()],
        f: Box::new(|t, i| ops::pim::partition(t, &i[0], &[20, 28, 24], ops::pim::PimLayout::Strided)),
        backward: true,
        math: Math::Exact,
    });
    // Stage 0's Mamba projections: in_proj (32 -> 2 x 64), x_proj (64 -> dt_rank 2 + 2 x 16), dt_proj (2 -> 64) and
    // out_proj (64 -> 32), named as PyTorch's rows of the same math (fp32: cuBLAS with TF32 off; tf32: on).
    let tok64 = randn(dev, &[tokens, 64], 1.0, 11);
    let tok2 = randn(dev, &[tokens, 2], 1.0, 12);
    let projections = [
        (&tok, 128usize, ["linear in_proj fp32", "linear in_proj tf32", "linear in_proj bf16"]),
        (&tok64, 34, ["linear x_proj fp32", "linear x_proj tf32", "linear x_proj bf16"]),
        (&tok2, 64, ["linear dt_proj fp32", "linear dt_proj tf32", "linear dt_proj bf16"]),
        (&tok64, 32, ["linear out_proj fp32", "linear out_proj tf32", "linear out_proj bf16"]),
    ];
    for (x_in, n_out, names) in projections {
        for (name, math) in names.into_iter().zip([Math::Exact, Math::Tf32, Math::Bf16]) {
            let k_in = x_in.shape()[1];
            let dtype = if matches!(math, Math::Bf16) { DType::BF16 } else { DType::F32 };
            let inputs = [x_in.clone(), randn(dev, &[n_out, k_in], 0.1, 7)];
            v.push(Case {
                name,
                shape: format!("{tokens}x{k_in}->{n_out}"),
                bytes: tokens as f64 * (k_in + n_out) as f64 * dtype.size() as f64,
                flops: 2.0 * (tokens * k_in * n_out) as f64,
                inputs: inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect(),
                f: Box::new(|t, i| ops::linear::linear(t, &i[0], &i[1], None)),
                backward: true,
                math,
            });
        }
    }
    let (g, l, din, ns) = (26880usize, 128usize, 64usize, 16usize);
    let xs = randn(dev, &[g, l, din], 1.0, 8);
    let wc = randn(dev, &[din, 4], 0.5, 9);
    let bc = randn(dev, &[din], 0.1, 10);
    v.push(Case {
        name: "causal_conv1d depthwise",
        shape: format!("{g}x{l}x{din} k4"),
        bytes: 2.0 * (g * l * din) as f64 * 4.0,
        flops: 0.0,
        inputs: vec![xs, wc, bc],
        f: Box::new(|t, i| ops::causal_conv1d::causal_conv1d(t, &i[0], &i[1], &i[2])),
        backward: true,
        math: Math::Exact,
    });
    for (name, g, l) in [
        ("selective_scan PiM stage 0", 26880usize, 128usize),
        ("selective_scan PiM stage 0 (quarter)", 6720, 128),
        ("selective_scan PaM stage 0", 2, 26880),
    ] {
        let a_log: Vec<f32> = (0..din * ns).map(|i| ((i % ns + 1) as f32).ln()).collect();
        let a_log = Tensor::from_vec(a_log, &[din, ns]).unwrap().to_device(dev).unwrap();
        let delta = lkm_engine::tensor::add(
            &randn(dev, &[g, l, din], 0.5, 11),
            &Tensor::full(&[g, l, din], -1.0, DType::F32, dev).unwrap(),
        )
        .unwrap();
        let inputs = vec![
            randn(dev, &[g, l, din], 1.0, 12),
            delta,
            a_log,
            randn(dev, &[g, l, ns], 1.0, 13),
            randn(dev, &[g, l, ns], 1.0, 14),
            randn(dev, &[din], 1.0, 15),
            randn(dev, &[g, l, din], 1.0, 16),
            randn(dev, &[din], 0.1, 17),
        ];
        v.push(Case {
            name,
            shape: format!("{g}x{din}x{l}x{ns}"),
            bytes: ((4 * g * l * din) + 2 * g * l * ns) as f64 * 4.0,
            flops: 0.0,
            inputs,
            f: Box::new(|t, i| {
                let s = ops::selective_scan::ScanInputs {
                    u: &i[0],
                    delta: ops::operand::Operand::Tensor(&i[1]),
                    a_log: &i[2],
                    b: (&i[3]).into(),
                    c: (&i[4]).into(),
                    d_skip: &i[5],
                    z: ops::operand::Operand::Tensor(&i[6]),
                    delta_bias: &i[7],
                    order: ops::flip::Order::Stored,
                };
                ops::selective_scan::selective_scan(t, &s)
            }),
            backward: true,
            math: Math::Exact,
        });
    }
    let k = 14;
    let logits = randn(dev, &[n, k, d, h, w], 1.0, 18);
    let labels: Vec<f32> = (0..n * d * h * w).map(|i| ((i * 7919) % k) as f32).collect();
    let labels = Tensor::from_vec(labels, &[n, 1, d, h, w]).unwrap().to_device(dev).unwrap();
    v.push(Case {
        name: "cross_entropy",
        shape: format!("{n}x{k}x40x224x192"),
        bytes: vox * (k as f64 + 1.0) * 4.0,
        flops: 0.0,
        inputs: vec![logits.clone(), labels.clone()],
        f: Box::new(|t, i| ops::cross_entropy::cross_entropy(t, &i[0], &i[1])),
        backward: false,
        math: Math::Exact,
    });
    v.push(Case {
        name: "soft_dice",
        shape: format!("{n}x{k}x40x224x192"),
        bytes: vox * (k as f64 + 1.0) * 4.0,
        flops: 0.0,
        inputs: vec![logits, labels],
        f: Box::new(|t, i| ops::dice::soft_dice_loss(t, &i[0], &i[1], true)),
        backward: false,
        math: Math::Exact,
    });
    v
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let result = match (arg("--list-convs"), arg("--convs")) {
        (Some(path), _) => convs::write_list(&path),
        (None, Some(list)) => convs::run(&list, arg("--torch"), arg("--out"), arg("--maths")),
        (None, None) => run(arg("--torch"), arg("--out"), arg("--only")),
    };
    if let Err(e) = result {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn run(torch: Option<String>, out: Option<String>, only: Option<String>) -> Result<()> {
    let gpu = Gpu::new(0)?;
    let dev = Device::Cuda(gpu.clone());
    let copy_gbs = copy_bandwidth(&gpu)?;
    let torch: Option<serde_json::Value> =
        torch.map(|p| serde_json::from_str(&std::fs::read_to_string(&p).expect("torch json readable")).expect("json"));
    let bf16_tflops = torch.as_ref().and_then(|t| t["ceilings"]["bf16_TFLOPs"].as_f64());
    // PyTorch rows carry the same names as ours (tools/bench_torch.py), so only the same shapes are compared.
    let torch_ms = |name: &str| -> Option<(f64, Option<f64>)> {
        torch.as_ref()?["rows"].as_array()?.iter().find_map(|r| {
            (r["name"].as_str()? == name).then(|| (r["fwd_ms"].as_f64().unwrap_or(f64::NAN), r["fwd_bwd_ms"].as_f64()))
        })
    };
    let mut rows = Vec::new();
    for case in cases(&dev) {
        if only.as_ref().is_some_and(|o| !case.name.contains(o.as_str())) {
            continue;
        }
        match run_case(&gpu, &case) {
            Ok(r) => {
                eprintln!("{:40} fwd {:8.3} ms  fwd+bwd {:?}", r.name, r.fwd_ms, r.fwd_bwd_ms);
                rows.push(r);
            }
            Err(e) => eprintln!("{:40} FAILED: {e}", case.name),
        }
    }
    let mut md = format!(
        "GPU: {}; copy ceiling {copy_gbs:.0} GB/s (measured here); bf16 matrix ceiling {} (from PyTorch, same run)\n\n",
        gpu.name(),
        bf16_tflops.map_or("n/a".into(), |t| format!("{t:.0} TFLOP/s"))
    );
    md += "| kernel | shape | fwd ms | fwd GB/s (% copy) | fwd TFLOP/s (% bf16) | fwd+bwd ms | PyTorch fwd ms | PyTorch fwd+bwd ms | fwd ratio (torch/ours) |\n|---|---|---|---|---|---|---|---|---|\n";
    for r in &rows {
        let gbs = r.bytes / (r.fwd_ms * 1e-3) / 1e9;
        let tf = r.flops / (r.fwd_ms * 1e-3) / 1e12;
        let (tf_s, gb_s) = (
            if r.flops > 0.0 {
                format!("{tf:.1} ({:.1}%)", bf16_tflops.map_or(f64::NAN, |p| 100.0 * tf / p))
            } else {
                "-".into()
            },
            format!("{gbs:.0} ({:.0}%)", 100.0 * gbs / copy_gbs),
        );
        let t = torch_ms(&r.name);
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
        md += &format!(
            "| {} | {} | {:.3} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.shape,
            r.fwd_ms,
            gb_s,
            tf_s,
            fmt(r.fwd_bwd_ms),
            fmt(t.map(|t| t.0)),
            fmt(t.and_then(|t| t.1)),
            t.map_or("-".into(), |t| format!("{:.2}", t.0 / r.fwd_ms))
        );
    }
    println!("{md}");
    if let Some(p) = out {
        std::fs::write(&p, &md).map_err(|e| lkm_engine::Error::Io(format!("{p}: {e}")))?;
    }
    Ok(())
}

#[path = "kernels/convs.rs"]
mod convs;
