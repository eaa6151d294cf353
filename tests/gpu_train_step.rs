//! One whole training step of a small LKM-UNet on the GPU matches the same step on the CPU: the loss over every
//! deep-supervision output, every parameter's gradient, gradient clipping and the SGD update.
//!
//! The reference is the CPU in float32, the GPU's precision: measured on the CPU, float32 and float64 steps differ by
//! up to 5% in the gradients of Mamba's step-size path (x_proj, dt_proj, A_log: sums over tokens that cancel), so a
//! float64 reference would measure that conditioning, not the kernels.

mod common;

use common::{gpu, rel_err};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::nn::{LkmUnet, ModelConfig, Params};
use lkm_engine::optim::{clip_present_grad_norm, Sgd};
use lkm_engine::tensor::DType;
use lkm_engine::train::dump::randomise_norms_and_biases;
use lkm_engine::train::loss::{deep_supervision_loss, downsample_labels};
use lkm_engine::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

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
    let targets: Vec<Tensor> = outs.iter().map(|o| downsample_labels(labels, &o.shape()[2..]).unwrap()).collect();
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
    let mut cfg = ModelConfig::tiny_3d();
    cfg.patch = vec![16, 16, 16];
    cfg.pim_windows = vec![vec![4, 4, 4], vec![2, 4, 4], vec![2, 2, 2], vec![1, 1, 1]];
    cfg.pam_pools = vec![vec![2, 2, 2], vec![2, 2, 2], vec![1, 1, 1], vec![1, 1, 1]];
    let (model, params) = LkmUnet::new(cfg, 3).unwrap();
    // At initialisation the last norm of every residual branch has scale 0, which makes the gradients of the whole
    // branch exactly 0 (rounding noise on both sides): draw norm scales and biases as the parity check does.
    let params = randomise_norms_and_biases(&params, 3).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let x = Tensor::randn(&[2, 1, 16, 16, 16], DType::F32, &mut rng).unwrap();
    let labels: Vec<f32> = x.to_vec_f32().unwrap().iter().map(|v| ((v * 2.0).abs() as usize).min(3) as f32).collect();
    let labels = Tensor::from_vec(labels, &[2, 1, 16, 16, 16]).unwrap();

    let cpu = step(&model, &params.to(DType::F32, &Device::Cpu).unwrap(), &x, &labels);
    let dev = Device::Cuda(gpu());
    let gpu = step(
        &model,
        &params.to(DType::F32, &dev).unwrap(),
        &x.to_device(&dev).unwrap(),
        &labels.to_device(&dev).unwrap(),
    );

    let before: Vec<Vec<f64>> = params.tensors().iter().map(|t| t.to_vec_f64().unwrap()).collect();
    let loss_err = (gpu.loss - cpu.loss).abs() / cpu.loss.abs();
    assert!(loss_err < 1e-4, "loss {} vs {}", gpu.loss, cpu.loss);
    let mut worst = (0.0, String::new());
    let names = params.names();
    for (i, name) in names.iter().enumerate() {
        // A conv bias followed by InstanceNorm has a gradient of exactly 0 in exact arithmetic, so both sides hold
        // rounding noise: judge it against the scale of its conv weight's gradient (as tools/parity.py does).
        let scale_of = |j: usize| cpu.grads[j].iter().map(|v| v * v).sum::<f64>().sqrt();
        let weight =
            name.strip_suffix("conv.bias").and_then(|p| names.iter().position(|n| *n == format!("{p}conv.weight")));
        let e = match weight {
            Some(j) => {
                let diff: f64 = gpu.grads[i].iter().zip(&cpu.grads[i]).map(|(a, b)| (a - b) * (a - b)).sum();
                diff.sqrt() / scale_of(j)
            }
            None => rel_err(&gpu.grads[i], &cpu.grads[i]),
        };
        if e > worst.0 {
            worst = (e, name.clone());
        }
        // The update is lr (1 + mu) g for a first step: compare it, not the parameter, so tiny updates of large
        // parameters are still checked.
        let update =
            |r: &StepResult| r.params_after[i].iter().zip(&before[i]).map(|(a, b)| a - b).collect::<Vec<f64>>();
        if weight.is_none() && !cpu.grads[i].is_empty() {
            let p = rel_err(&update(&gpu), &update(&cpu));
            assert!(p < 1e-3, "{name}: the SGD update differs by {p:e}");
        }
    }
    eprintln!("loss {} (cpu {}), worst gradient error {:.2e} at {}", gpu.loss, cpu.loss, worst.0, worst.1);
    assert!(worst.0 < 1e-3, "gradient of {} differs by {:e}", worst.1, worst.0);
}
