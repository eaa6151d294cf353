//! One whole training step of a small LKM-UNet on the GPU matches the same step on the CPU: the loss over every
//! deep-supervision output, every parameter's gradient, gradient clipping and the SGD update.
//!
//! The reference is the CPU in float64 on the same float32 weights and inputs, and the CPU's own float32 step measures
//! how well-conditioned each tensor is. Two things make a float32 step legitimately differ from float64:
//! - Ill-conditioning: some gradients of this network are ill-conditioned in float32 for some weights (Mamba's
//!   step-size path, and the norms that feed it: with seeds 3 / 4 the CPU's float32 step differs from float64 by
//!   3.6e-3 on a dt_proj.bias gradient and 5% on its SGD update). Each tensor's GPU error against float64 must be
//!   below 1e-4 or at most 3 times the CPU's float32 error on that tensor.
//! - LeakyReLU's kink: an input within float32 rounding of 0 may land on the other side of 0 than in float64, where
//!   the derivative is 0.01 instead of 1 (on an H200, seed 7 has one of the ~3 million LeakyReLU inputs crossed, at
//!   the last decoder block; that one voxel moves every gradient upstream by up to 4e-3). Such a step differentiates
//!   another branch of the network than float64 does, so the seeds whose GPU forward crosses a kink
//!   (`common::leaky_relu_flips`) are skipped, and at least one seed must be left. tests/gpu_model_probe.rs checks the
//!   skipped ones node by node up to the crossing.

mod common;

use common::{gpu, leaky_relu_flips, rel_err, traced_model_step};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::nn::{LkmUnet, ModelConfig, Params};
use lkm_engine::optim::{clip_present_grad_norm, Sgd};
use lkm_engine::tensor::DType;
use lkm_engine::train::dump::{random_batch, randomise_norms_and_biases};
use lkm_engine::train::loss::{deep_supervision_loss, downsample_labels};
use lkm_engine::train::step::train_step;
use lkm_engine::Tensor;

struct StepResult {
    loss: f64,
    grads: Vec<Vec<f64>>,
    params_after: Vec<Vec<f64>>,
}

fn step(model: &LkmUnet, params: &Params, x: &Tensor, labels: &Tensor) -> StepResult {
    let mut params = params.deep_copy().unwrap();
    let mut tape = Tape::new();
    params.watch(&mut tape);
    let outs = model.forward(&mut tape, &params, x).unwrap();
    let targets: Vec<Tensor> =
        outs.iter().map(|o| downsample_labels(labels, &o.shape()[2..]).unwrap().to_dtype(x.dtype()).unwrap()).collect();
    let loss = deep_supervision_loss(&mut tape, &outs, &targets, true).unwrap();
    let mut grads = tape.backward(&loss).unwrap();
    // The deepest seg head's output has loss weight 0: no gradient reaches it and SGD leaves it alone.
    let mut g: Vec<Option<Tensor>> = params.tensors().iter().map(|p| grads.take(p)).collect();
    assert_eq!(
        g.iter().filter(|t| t.is_none()).count(),
        2,
        "only decoder.seg_layers.0.{{weight,bias}} lack a gradient"
    );
    let grads_f64 = g.iter().map(|t| t.as_ref().map_or(Vec::new(), |t| t.to_vec_f64().unwrap())).collect();
    clip_present_grad_norm(&mut g, 12.0).unwrap();
    let mut sgd = Sgd::new(1e-2, 0.99, 3e-5);
    drop(outs);
    sgd.step_partial(params.tensors_mut(), &g).unwrap();
    StepResult {
        loss: loss.scalar().unwrap(),
        grads: grads_f64,
        params_after: params.tensors().iter().map(|t| t.to_vec_f64().unwrap()).collect(),
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_training_step_matches_cpu() {
    let dev = Device::Cuda(gpu());
    let mut checked = Vec::new();
    for seed in 7..=10u64 {
        let (model, params) = LkmUnet::new(ModelConfig::tiny_3d(), seed).unwrap();
        // At initialisation the last norm of every residual branch has scale 0, which makes the gradients of the
        // whole branch exactly 0 (rounding noise on both sides): draw norm scales and biases as the parity check does.
        let params = randomise_norms_and_biases(&params, seed).unwrap();
        let (x, labels) = random_batch(&model.config, 2, seed + 1).unwrap();
        let traced = |dtype, d: &Device| traced_model_step(&model, &params, &x, dtype, d);
        let flips = leaky_relu_flips(&traced(DType::F32, &dev), &traced(DType::F64, &Device::Cpu));
        if !flips.is_empty() {
            eprintln!("seed {seed}: skipped, the GPU forward rounds {} LeakyReLU inputs across 0", flips.len());
            continue;
        }
        check_step(seed, &model, &params, &x, &labels, &dev);
        checked.push(seed);
    }
    assert!(!checked.is_empty(), "every seed crosses a LeakyReLU kink on the GPU: nothing was checked");
    eprintln!("checked seeds {checked:?}");
}

/// One step on the GPU against float64, with the CPU's float32 step as the floor (see the file's comment).
fn check_step(seed: u64, model: &LkmUnet, params: &Params, x: &Tensor, labels: &Tensor, dev: &Device) {
    let exact = step(model, &params.to(DType::F64, &Device::Cpu).unwrap(), &x.to_dtype(DType::F64).unwrap(), labels);
    let cpu32 = step(model, &params.to(DType::F32, &Device::Cpu).unwrap(), x, labels);
    let gpu =
        step(model, &params.to(DType::F32, dev).unwrap(), &x.to_device(dev).unwrap(), &labels.to_device(dev).unwrap());
    let before: Vec<Vec<f64>> = params.tensors().iter().map(|t| t.to_vec_f64().unwrap()).collect();
    let loss_err = (gpu.loss - exact.loss).abs() / exact.loss.abs();
    assert!(loss_err < 1e-4, "seed {seed}: loss {} vs {}", gpu.loss, exact.loss);
    let names = params.names();
    let (gpu_errs, floor_errs) = (errors(&gpu, &exact, names, &before), errors(&cpu32, &exact, names, &before));
    let mut worst = (0.0, 0.0, String::new());
    for ((name, e), f) in gpu_errs.iter().zip(&floor_errs) {
        // The allowed error: TOL, or FLOOR_FACTOR times the CPU's own float32 error on the same tensor.
        let limit = TOL.max(FLOOR_FACTOR * f.1);
        assert!(
            e < &limit,
            "seed {seed}: {name}: GPU error {e:.3e} against float64, the CPU's float32 error {:.3e}",
            f.1
        );
        if *e > worst.0 {
            worst = (*e, f.1, name.clone());
        }
    }
    eprintln!(
        "seed {seed}: loss {} (float64 {}); worst GPU error {:.2e} at {} (CPU float32 there {:.2e})",
        gpu.loss, exact.loss, worst.0, worst.2, worst.1
    );
}

const TOL: f64 = 1e-4;
const FLOOR_FACTOR: f64 = 3.0;

/// Per parameter, the relative error of `got` against `exact`: "grad <name>" for every gradient (a conv bias before
/// an InstanceNorm, zero in exact arithmetic, against the norm of its conv weight's gradient, as tools/parity.py
/// does) and "update <name>" for the SGD step (p_after - p_before: for a first step lr (1 + mu) (g + wd p) after
/// clipping, so tiny updates of large parameters are still checked).
fn errors(got: &StepResult, exact: &StepResult, names: &[String], before: &[Vec<f64>]) -> Vec<(String, f64)> {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let update = |r: &StepResult, i: usize| r.params_after[i].iter().zip(&before[i]).map(|(a, b)| a - b).collect();
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if exact.grads[i].is_empty() {
            continue;
        }
        let weight =
            name.strip_suffix("conv.bias").and_then(|p| names.iter().position(|n| *n == format!("{p}conv.weight")));
        let e = match weight {
            Some(j) => {
                let diff: Vec<f64> = got.grads[i].iter().zip(&exact.grads[i]).map(|(a, b)| a - b).collect();
                norm(&diff) / norm(&exact.grads[j])
            }
            None => rel_err(&got.grads[i], &exact.grads[i]),
        };
        out.push((format!("grad {name}"), e));
        if weight.is_none() {
            let (u, v): (Vec<f64>, Vec<f64>) = (update(got, i), update(exact, i));
            out.push((format!("update {name}"), rel_err(&u, &v)));
        }
    }
    out
}

/// Two bf16 training steps that read the weights' bf16 copies kept by the optimiser (`Params::keep_copies`,
/// `Sgd::step_clipped`) give the same bits, loss and parameters, as steps that cast every weight afresh
/// (`Params::tensors_mut` drops the copies before each step).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_weight_copies_change_no_bit() {
    let gpu = common::tf32_gpu();
    gpu.set_precision(lkm_engine::device::Precision::Bf16);
    let dev = Device::Cuda(gpu);
    let (model, params) = LkmUnet::new(ModelConfig::tiny_3d(), 3).unwrap();
    let params = randomise_norms_and_biases(&params, 3).unwrap().to(DType::F32, &dev).unwrap();
    let (x, labels) = random_batch(&model.config, 1, 4).unwrap();
    let x = x.to_device(&dev).unwrap();
    let targets: Vec<Tensor> = model
        .config
        .output_sizes(&model.config.patch)
        .iter()
        .map(|s| downsample_labels(&labels, s).unwrap().to_device(&dev).unwrap())
        .collect();
    let run = |keep: bool| {
        let mut params = params.deep_copy().unwrap();
        let mut sgd = Sgd::new(1e-2, 0.99, 3e-5);
        let mut losses = Vec::new();
        // Two steps: the second reads the copies the first step's optimiser wrote (or, fresh, casts again).
        for step in 0..2 {
            if !keep {
                params.tensors_mut();
                assert_eq!(params.copy_count(), 0, "step {step}: copies left after tensors_mut");
            }
            losses.push(train_step(&model, &mut params, &mut sgd, &x, &targets, true, 12.0).unwrap());
            // The step's tape made the copies it lacked and the parameters keep them.
            assert!(params.copy_count() > 0, "step {step}: no bf16 copy kept");
        }
        let values: Vec<Vec<f64>> = params.tensors().iter().map(|t| t.to_vec_f64().unwrap()).collect();
        (losses, values, params.copy_count())
    };
    let (kept, fresh) = (run(true), run(false));
    assert_eq!(kept.0, fresh.0, "the losses differ");
    for (i, (a, b)) in kept.1.iter().zip(&fresh.1).enumerate() {
        assert!(a == b, "parameter {} differs after two steps", params.names()[i]);
    }
    eprintln!("{} bf16 copies kept for {} parameters", kept.2, params.len());
}
