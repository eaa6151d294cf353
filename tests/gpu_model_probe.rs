//! The tiny model on the GPU, op by op, module by module and node by node, against float64 on the CPU.
//!
//! These tests found what looked like a GPU precision defect (2026-11-27, H200): the tiny-3d step's gradients were up
//! to 3.6e-3 off float64 on the GPU where the CPU's float32 step was within 5e-6, although every op alone matched to
//! 1e-7. The node-by-node trace (`trace_tiny_model`) showed the cause: one of the step's 3.3 million LeakyReLU inputs
//! lay 3e-8 below 0 in float64 and the GPU's float32 forward (error ~1e-6, like the CPU's) rounded it to +9e-7. At
//! that voxel the derivative is 1 instead of 0.01, and that one voxel moves every gradient upstream by up to 4e-3.
//! Every node before the crossing, and every node of the seeds with no crossing, matches float64 as closely as the
//! CPU's float32 step does. It is a property of LeakyReLU (its derivative jumps at 0), not an error of the engine.
//!
//! Each probe compares the GPU (float32) and the CPU in float32 against the CPU in float64 on the same float32 inputs
//! and requires the GPU's error on every output and gradient to be at most 1e-5 or 10 times the CPU's float32 error
//! (conv biases that feed an InstanceNorm are left out: their exact gradient is 0).
mod common;

use common::{gpu, leaky_relu_flips, randn32, rel_err, seeded_step, traced_model_step, TraceRow};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::nn::blocks::ResidualBlock;
use lkm_engine::nn::mamba::{BiMambaLayer, Grouping, MambaConfig};
use lkm_engine::nn::Params;
use lkm_engine::nn::{LkmUnet, ModelConfig};
use lkm_engine::ops::pim::PimLayout;
use lkm_engine::ops::{
    activation::leaky_relu, concat::concat_channels, conv::conv, conv_transpose::conv_transpose,
    instance_norm::instance_norm,
};
use lkm_engine::tensor::DType;
use lkm_engine::train::dump::{random_batch, randomise_norms_and_biases};
use lkm_engine::train::loss::{deep_supervision_loss, downsample_labels};
use lkm_engine::{Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn probe(name: &str, names: &[String], inputs: &[Tensor], f: &dyn Fn(&mut Tape, &[Tensor]) -> Result<Tensor>) {
    let gdev = Device::Cuda(gpu());
    let all = vec![true; inputs.len()];
    let step = |dtype: DType, dev: &Device| {
        let xs: Vec<Tensor> = inputs.iter().map(|x| x.to_dtype(dtype).unwrap().to_device(dev).unwrap()).collect();
        let (out, grads) = seeded_step(name, &xs, &all, dev, f);
        (out, grads.into_iter().map(Option::unwrap_or_default).collect::<Vec<_>>())
    };
    let (e_out, e_g) = step(DType::F64, &Device::Cpu);
    let (c_out, c_g) = step(DType::F32, &Device::Cpu);
    let (g_out, g_g) = step(DType::F32, &gdev);
    eprintln!("{name}: output gpu {:.2e} cpu32 {:.2e}", rel_err(&g_out, &e_out), rel_err(&c_out, &e_out));
    let mut rows: Vec<(f64, f64, &str)> = (0..inputs.len())
        .filter(|&i| !e_g[i].is_empty())
        .map(|i| (rel_err(&g_g[i], &e_g[i]), rel_err(&c_g[i], &e_g[i]), names[i].as_str()))
        .collect();
    rows.retain(|r| !r.2.ends_with("conv.bias"));
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    for r in rows.iter().take(12) {
        eprintln!("  {name}: gpu {:.2e} cpu32 {:.2e} {}", r.0, r.1, r.2);
    }
    let out_err = rel_err(&g_out, &e_out);
    let mut bad: Vec<String> = rows
        .iter()
        .filter(|r| r.0 > (10.0 * r.1).max(1e-5))
        .map(|r| format!("{} (GPU {:.1e}, CPU float32 {:.1e})", r.2, r.0, r.1))
        .collect();
    if out_err > (10.0 * rel_err(&c_out, &e_out)).max(1e-5) {
        bad.insert(0, format!("output (GPU {out_err:.1e})"));
    }
    assert!(
        bad.is_empty(),
        "{name}: {} tensors less precise on the GPU: {}",
        bad.len(),
        bad[..bad.len().min(8)].join(", ")
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn probe_loss() {
    let (model, _) = LkmUnet::new(ModelConfig::tiny_3d(), 7).unwrap();
    let (_, y) = random_batch(&model.config, 2, 8).unwrap();
    // The deep-supervision loss alone at the model's output shapes, on float32 logits.
    let sizes = model.config.output_sizes(&model.config.patch);
    let logits: Vec<Tensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut shape = vec![2, 4];
            shape.extend_from_slice(s);
            randn32(&shape, 1.0, 200 + i as u64)
        })
        .collect();
    let f = |t: &mut Tape, xs: &[Tensor]| -> Result<Tensor> {
        let targets = sizes
            .iter()
            .map(|s| downsample_labels(&y, s)?.to_dtype(xs[0].dtype())?.to_device(&xs[0].device()))
            .collect::<Result<Vec<_>>>()?;
        deep_supervision_loss(t, xs, &targets, true)
    };
    let lnames: Vec<String> = (0..logits.len()).map(|i| format!("logits.{i}")).collect();
    probe("loss", &lnames, &logits, &f);
}

#[test]
#[ignore = "needs a CUDA device"]
fn probe_full_res_ops() {
    let n = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let x8 = randn32(&[2, 8, 32, 32, 32], 1.0, 1);
    let x16 = randn32(&[2, 16, 32, 32, 32], 1.0, 2);
    let w48 = randn32(&[4, 8, 1, 1, 1], 0.3, 3);
    let b4 = randn32(&[4], 0.1, 4);
    probe("conv1x1 8->4", &n(&["x", "w", "b"]), &[x8.clone(), w48, b4], &|t, xs| {
        conv(t, &xs[0], &xs[1], Some(&xs[2]), &[1, 1, 1])
    });
    let w816 = randn32(&[8, 16, 3, 3, 3], 0.1, 5);
    let b8 = randn32(&[8], 0.1, 6);
    probe("conv3 16->8", &n(&["x", "w", "b"]), &[x16.clone(), w816, b8.clone()], &|t, xs| {
        conv(t, &xs[0], &xs[1], Some(&xs[2]), &[1, 1, 1])
    });
    let w1 = randn32(&[8, 16, 1, 1, 1], 0.3, 7);
    probe("conv1x1 16->8", &n(&["x", "w"]), &[x16.clone(), w1], &|t, xs| conv(t, &xs[0], &xs[1], None, &[1, 1, 1]));
    let xs16 = randn32(&[2, 16, 16, 16, 16], 1.0, 8);
    let wt = randn32(&[16, 8, 2, 2, 2], 0.3, 9);
    probe("conv_transpose 16->8", &n(&["x", "w", "b"]), &[xs16, wt, b8.clone()], &|t, xs| {
        conv_transpose(t, &xs[0], &xs[1], Some(&xs[2]))
    });
    let g8 = randn32(&[8], 0.5, 10);
    probe("instance_norm 8", &n(&["x", "g", "b"]), &[x8.clone(), g8, b8.clone()], &|t, xs| {
        instance_norm(t, &xs[0], &xs[1], &xs[2], 1e-5)
    });
    let x8b = randn32(&[2, 8, 32, 32, 32], 1.0, 11);
    probe("concat", &n(&["a", "b"]), &[x8.clone(), x8b], &|t, xs| concat_channels(t, &[&xs[0], &xs[1]]));
    probe("leaky_relu", &n(&["x"]), &[x8], &|t, xs| leaky_relu(t, &xs[0]));
}

fn module_probe(name: &str, x: Tensor, params: Params, f: &dyn Fn(&mut Tape, &Params, &Tensor) -> Result<Tensor>) {
    let params = randomise_norms_and_biases(&params, 5).unwrap();
    let mut inputs = vec![x];
    inputs.extend(params.tensors().iter().cloned());
    let mut names = vec!["x".to_string()];
    names.extend(params.names().iter().cloned());
    let g = |t: &mut Tape, xs: &[Tensor]| -> Result<Tensor> {
        let p = params.with_tensors(xs[1..].to_vec())?;
        f(t, &p, &xs[0])
    };
    probe(name, &names, &inputs, &g);
}

#[test]
#[ignore = "needs a CUDA device"]
fn probe_modules() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut p = Params::new();
    let block = ResidualBlock::new(&mut p, "blk", 16, 8, &[3, 3, 3], &[1, 1, 1], &mut rng);
    module_probe("residual block 16->8", randn32(&[2, 16, 32, 32, 32], 1.0, 20), p, &|t, p, x| block.forward(t, p, x));
    let cfg = MambaConfig { d_state: 8, d_conv: 4, expand: 2, recompute: false };
    for (name, grouping) in [
        ("PiM window 4", Grouping::Pixel { window: vec![4, 4, 4], layout: PimLayout::Window }),
        ("PiM strided 4", Grouping::Pixel { window: vec![4, 4, 4], layout: PimLayout::Strided }),
        ("PaM pool 4", Grouping::Patch { pool: vec![4, 4, 4] }),
    ] {
        let mut p = Params::new();
        let layer = BiMambaLayer::new(&mut p, "m", 8, grouping, cfg, &mut rng);
        module_probe(name, randn32(&[2, 8, 32, 32, 32], 1.0, 21), p, &|t, p, x| layer.forward(t, p, x));
    }
}

/// The whole tiny model, node by node: its forward pass and the backward pass of a random gradient from the
/// full-resolution output are traced on the GPU (float32), the CPU (float32) and the CPU (float64), for both PiM
/// layouts and weight seeds 7..=12 (batch seed + 1, as `lkm-engine dump-step --seed` draws them).
///
/// Every node's output and incoming gradient on the GPU must be within 1e-5 or 10 times the CPU's float32 error of
/// float64, in backward order up to the first LeakyReLU whose input the GPU rounded across 0 (where float64 takes the
/// other branch: the exact derivative there is 1 on one side and 0.01 on the other). The node below such a LeakyReLU
/// must still match on every other element; past it the two runs differentiate different branches of the network
/// and nothing is compared. Each layout must have at least one seed without such a crossing (checked to the end).
/// The seeds without one are the ones `tools/gpu-parity.sh` may use for tiny-3d.
#[test]
#[ignore = "needs a CUDA device"]
fn trace_tiny_model() {
    let gdev = Device::Cuda(gpu());
    let mut failures = Vec::new();
    for layout in [PimLayout::Window, PimLayout::Strided] {
        let mut clean = Vec::new();
        for seed in 7..=12u64 {
            let mut config = ModelConfig::tiny_3d();
            config.pim_layout = layout;
            let (model, params) = LkmUnet::new(config, seed).unwrap();
            let params = randomise_norms_and_biases(&params, seed).unwrap();
            let (x, _) = random_batch(&model.config, 2, seed + 1).unwrap();
            let exact = traced_model_step(&model, &params, &x, DType::F64, &Device::Cpu);
            let cpu = traced_model_step(&model, &params, &x, DType::F32, &Device::Cpu);
            let gpu = traced_model_step(&model, &params, &x, DType::F32, &gdev);
            let flips = leaky_relu_flips(&gpu, &exact);
            let relu: usize = exact.iter().filter(|r| r.op.ends_with("leaky_relu")).map(|r| r.output.len()).sum();
            let case = format!("{layout:?} seed {seed} ({relu} LeakyReLU inputs)");
            match compare_trace(&case, &exact, &cpu, &gpu, &flips) {
                Ok(()) if flips.is_empty() => clean.push(seed),
                Ok(()) => {}
                Err(e) => failures.push(e),
            }
        }
        eprintln!("{layout:?}: seeds whose GPU forward crosses no LeakyReLU kink: {clean:?}");
        if clean.is_empty() {
            failures.push(format!("{layout:?}: every seed crosses a LeakyReLU kink, nothing was checked end to end"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Compares one traced run (see [`trace_tiny_model`]); prints every crossing and the worst node.
fn compare_trace(
    case: &str,
    exact: &[TraceRow],
    cpu: &[TraceRow],
    gpu: &[TraceRow],
    flips: &[(usize, usize)],
) -> std::result::Result<(), String> {
    let limit = |cpu_err: f64| (10.0 * cpu_err).max(1e-5);
    let first_flip = flips.iter().map(|f| f.0).min();
    for &(r, i) in flips {
        eprintln!(
            "{case}: node {} ({}) element {i}: float64 {:.3e}, GPU {:.3e}, CPU float32 {:.3e}",
            exact[r].index, exact[r].op, exact[r].output[i], gpu[r].output[i], cpu[r].output[i]
        );
    }
    let mut worst = (0.0, String::new());
    // Past the node that feeds the first crossed LeakyReLU, the runs differentiate different functions.
    let end = first_flip.map_or(exact.len(), |f| (f + 2).min(exact.len()));
    for r in 0..end {
        let (e, c, g) = (&exact[r], &cpu[r], &gpu[r]);
        // The node feeding the first crossed LeakyReLU: its gradient is wrong exactly at the crossed elements.
        let keep: Vec<bool> = if let Some(f) = first_flip.filter(|f| r == f + 1) {
            let relu = &exact[f];
            if e.index + 1 != relu.index || e.shape != relu.shape {
                return Err(format!("{case}: the LeakyReLU at node {} is not fed by node {}", relu.index, e.index));
            }
            let crossed: Vec<usize> = flips.iter().filter(|x| x.0 == f).map(|x| x.1).collect();
            (0..e.grad.len()).map(|i| !crossed.contains(&i)).collect()
        } else {
            vec![true; e.grad.len()]
        };
        let masked = |v: &[f64]| v.iter().zip(&keep).filter(|(_, k)| **k).map(|(x, _)| *x).collect::<Vec<_>>();
        let (eg, cg, gg) = (masked(&e.grad), masked(&c.grad), masked(&g.grad));
        let checks = [
            ("output", rel_err(&g.output, &e.output), rel_err(&c.output, &e.output)),
            ("gradient", rel_err(&gg, &eg), rel_err(&cg, &eg)),
        ];
        for (what, gpu_err, cpu_err) in checks {
            let at = format!("node {} {} {:?} {what}", e.index, e.op, e.shape);
            if gpu_err > limit(cpu_err) {
                return Err(format!("{case}: {at}: GPU {gpu_err:.2e}, CPU float32 {cpu_err:.2e}"));
            }
            if gpu_err > worst.0 {
                worst = (gpu_err, format!("{at} (CPU float32 {cpu_err:.2e})"));
            }
        }
    }
    let span =
        if flips.is_empty() { "whole trace".to_string() } else { format!("up to the crossing, {} flips", flips.len()) };
    eprintln!("{case}: {span}: worst GPU error {:.2e} at {}", worst.0, worst.1);
    Ok(())
}
