//! Where does the tiny model's GPU step lose precision? On an H200 (2026-11-27) the tiny-3d step on the GPU differs from
//! float64 by up to 3.6e-3 in its gradients where the CPU's float32 step (and PyTorch's) differ by 1e-6, although every
//! op alone, at the model's shapes, matches float64 to 1e-7 on the GPU. These tests narrow it down: the whole model
//! back-propagating a random gradient from the full-resolution output (x's gradient: GPU 1.2e-3, CPU float32 1e-6) or
//! from the lowest-resolution one (both 1.5e-6), the loss alone (both 6e-8), the ops of the full-resolution decoder
//! stage alone, and the modules (a residual block, PiM and PaM layers) at stage-0 shapes.
//!
//! Each compares the GPU (float32) and the CPU in float32 against the CPU in float64 on the same float32 inputs, and
//! requires the GPU's error on every output and gradient to be at most 1e-5 or 10 times the CPU's float32 error
//! (conv biases that feed an InstanceNorm are left out: their exact gradient is 0).
mod common;

use common::{gpu, randn32, rel_err, seeded_step};
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
fn probe_tiny_model() {
    let (model, params) = LkmUnet::new(ModelConfig::tiny_3d(), 7).unwrap();
    let params = randomise_norms_and_biases(&params, 7).unwrap();
    let (x, y) = random_batch(&model.config, 2, 8).unwrap();
    let mut inputs = vec![x.clone()];
    inputs.extend(params.tensors().iter().cloned());
    let mut names = vec!["x".to_string()];
    names.extend(params.names().iter().cloned());
    for out in [0usize, 2] {
        let f = |t: &mut Tape, xs: &[Tensor]| -> Result<Tensor> {
            let p = params.with_tensors(xs[1..].to_vec())?;
            Ok(model.forward(t, &p, &xs[0])?[out].clone())
        };
        probe(&format!("model out.{out}, random seed gradient"), &names, &inputs, &f);
    }
    // The loss alone at the model's output shapes, on float32 logits.
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
    let cfg = MambaConfig { d_state: 8, d_conv: 4, expand: 2 };
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
