//! The CUDA losses (cross-entropy, soft Dice), argmax and optimiser against their CPU references: forward and logits
//! gradient of the losses through `check_op_inputs` (labels are not differentiable), argmax bit for bit, SGD steps
//! and gradient clipping on the same parameters and gradients. Odd sizes, K = 3 and 14, 2D and 3D, both Dice modes,
//! bad labels (flagged as NaN on the GPU), and the reference shapes of lkm-unet.md section 5. Run on a GPU machine
//! with `cargo test --release --test gpu_loss -- --ignored`. The checks that hold alike on every device (shape errors,
//! K = 1, huge logits, argmax's ties) are device tests in tests/grad_loss.rs.

mod common;

use common::{assert_rel_err, check_op_inputs, gpu, randn32};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::argmax::argmax;
use lkm_engine::ops::cross_entropy::cross_entropy;
use lkm_engine::ops::dice::soft_dice_loss;
use lkm_engine::optim::{clip_grad_norm, Sgd};
use lkm_engine::{DType, Error, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// A float32 label map (N, 1, spatial) of uniformly drawn class indices in [0, `classes`).
fn labels(shape: &[usize], classes: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    Tensor::from_fn(shape, DType::F32, |_| (rng.random::<f64>() * classes as f64).floor().min(classes as f64 - 1.0))
        .unwrap()
}

/// The label shape (N, 1, spatial) for logits of shape (N, K, spatial).
fn label_shape(logits: &[usize]) -> Vec<usize> {
    let mut s = logits.to_vec();
    s[1] = 1;
    s
}

/// Checks cross-entropy and both Dice modes (when K >= 2) at logits shape `shape`, logits of scale 2 (a softmax far
/// from uniform).
fn check_losses(name: &str, shape: &[usize], seed: u64) {
    let x = randn32(shape, 2.0, seed);
    let t = labels(&label_shape(shape), shape[1], seed + 1000);
    let inputs = [x, t];
    let diff = [true, false];
    check_op_inputs(&format!("cross_entropy {name} {shape:?}"), &inputs, &diff, 1e-4, |tp, x| {
        cross_entropy(tp, &x[0], &x[1])
    });
    if shape[1] >= 2 {
        for batch_dice in [false, true] {
            check_op_inputs(
                &format!("soft_dice batch={batch_dice} {name} {shape:?}"),
                &inputs,
                &diff,
                1e-4,
                |tp, x| soft_dice_loss(tp, &x[0], &x[1], batch_dice),
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_losses_2d_k3() {
    check_losses("2d", &[3, 3, 17, 29], 1);
    // More voxels than 1024 blocks of 256 threads cover: the partial-sum kernels' grid-stride loops run several times.
    check_losses("2d many voxels", &[2, 3, 401, 409], 2);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_losses_2d_k14() {
    check_losses("2d", &[2, 14, 19, 23], 3);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_losses_3d_k3() {
    check_losses("3d", &[2, 3, 5, 9, 13], 4);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_losses_3d_k14() {
    check_losses("3d", &[3, 14, 7, 11, 5], 5);
    // A single sample and a single voxel row: the smallest grids.
    check_losses("3d tiny", &[1, 14, 1, 1, 3], 6);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_losses_reference_shapes() {
    // FLARE22 3d_fullres patch 40 x 224 x 192 with 14 classes, at batch 1 rather than 2 so that the float64 CPU
    // reference (forward and backward) stays at a few seconds; the batch does not change the kernels' indexing.
    let shape = [1, 14, 40, 224, 192];
    let inputs = [randn32(&shape, 2.0, 8), labels(&label_shape(&shape), 14, 9)];
    check_op_inputs("cross_entropy FLARE22 patch", &inputs, &[true, false], 1e-4, |tp, x| {
        cross_entropy(tp, &x[0], &x[1])
    });
    check_op_inputs("soft_dice FLARE22 patch", &inputs, &[true, false], 1e-4, |tp, x| {
        soft_dice_loss(tp, &x[0], &x[1], false)
    });
    // AMOS 2D patch 320 x 320, 14 classes, batch 2 with batch Dice (nnU-Net's 2D setting).
    let shape = [2, 14, 320, 320];
    let inputs = [randn32(&shape, 2.0, 10), labels(&label_shape(&shape), 14, 11)];
    check_op_inputs("cross_entropy AMOS 2D patch", &inputs, &[true, false], 1e-4, |tp, x| {
        cross_entropy(tp, &x[0], &x[1])
    });
    check_op_inputs("soft_dice batch AMOS 2D patch", &inputs, &[true, false], 1e-4, |tp, x| {
        soft_dice_loss(tp, &x[0], &x[1], true)
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_losses_flag_bad_labels_with_nan() {
    let g = Device::Cuda(gpu());
    let shape = [2, 3, 4, 5];
    let bad_at = 27; // sample 1, voxel 7
    for bad in [3.0f32, -1.0, 1.5, f32::NAN] {
        let mut t = labels(&label_shape(&shape), 3, 12).to_vec_f32().unwrap();
        t[bad_at] = bad;
        let t_cpu = Tensor::from_vec(t, &label_shape(&shape)).unwrap();
        let x_cpu = randn32(&shape, 2.0, 13);
        // The CPU path rejects the label at once.
        let err = cross_entropy(&mut Tape::new(), &x_cpu, &t_cpu).unwrap_err();
        assert!(matches!(err, Error::Data(_)), "CPU: {err}");

        let (x, t) = (x_cpu.to_device(&g).unwrap(), t_cpu.to_device(&g).unwrap());
        let mut tape = Tape::new();
        tape.watch(&x);
        let loss = cross_entropy(&mut tape, &x, &t).unwrap();
        assert!(loss.scalar().unwrap().is_nan(), "label {bad}: cross-entropy loss should be NaN");
        let dx = tape.backward(&loss).unwrap().get(&x).unwrap().to_vec_f64().unwrap();
        // dx is (2, 3, 20): the bad voxel's three class gradients are NaN, every other element is finite.
        for (i, v) in dx.iter().enumerate() {
            let (n, k, vox) = (i / 60, i / 20 % 3, i % 20);
            let flagged = n * 20 + vox == bad_at;
            assert_eq!(v.is_nan(), flagged, "label {bad}: gradient element {i} (n {n}, k {k}, v {vox}) = {v}");
        }

        for batch_dice in [false, true] {
            let mut tape = Tape::new();
            tape.watch(&x);
            let loss = soft_dice_loss(&mut tape, &x, &t, batch_dice).unwrap();
            assert!(loss.scalar().unwrap().is_nan(), "label {bad}: Dice loss (batch {batch_dice}) should be NaN");
            let dx = tape.backward(&loss).unwrap().get(&x).unwrap().to_vec_f64().unwrap();
            assert!(dx[60 + 7].is_nan(), "label {bad}: Dice gradient of the bad voxel should be NaN");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_argmax_matches_cpu_exactly() {
    let g = Device::Cuda(gpu());
    let check = |name: &str, x: Tensor| {
        let want = argmax(&x).unwrap();
        let got = argmax(&x.to_device(&g).unwrap()).unwrap();
        assert_eq!(got.shape(), want.shape(), "{name}: shape");
        assert_eq!(got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap(), "{name}: classes differ");
    };
    check("3d k14", randn32(&[3, 14, 7, 9, 11], 1.0, 20));
    check("2d k3", randn32(&[2, 3, 33, 65], 1.0, 21));
    check("2d k1", randn32(&[2, 1, 5, 7], 1.0, 22));
    // Logits rounded to a few integers: many ties, which must go to the lowest class on both devices.
    let rounded: Vec<f32> =
        randn32(&[2, 14, 17, 19], 1.5, 23).to_vec_f32().unwrap().iter().map(|v| v.round()).collect();
    check("2d k14 ties", Tensor::from_vec(rounded.clone(), &[2, 14, 17, 19]).unwrap());
    // NaN logits lose every comparison, on both devices alike.
    let mut with_nan = rounded;
    for i in (0..with_nan.len()).step_by(7) {
        with_nan[i] = f32::NAN;
    }
    check("2d k14 NaN", Tensor::from_vec(with_nan, &[2, 14, 17, 19]).unwrap());
}

/// Parameter shapes with odd sizes, one larger than a grid-stride pass of a small grid.
/// The parameters of the optimiser tests, stepped in one launch: odd sizes, one element, and one tensor larger than the
/// 1024 blocks of 256 threads a tensor gets (so its blocks stride over it).
const PARAM_SHAPES: [&[usize]; 5] = [&[1031], &[3, 5, 7], &[1], &[32, 17, 3, 3, 3], &[300_007]];

fn host(ts: &[Tensor]) -> Vec<Vec<f64>> {
    ts.iter().map(|t| t.to_vec_f64().unwrap()).collect()
}

/// [`assert_rel_err`] on each pair of host tensors; prints the worst error.
fn assert_all_close(what: &str, got: &[Vec<f64>], want: &[Vec<f64>], tol: f64) {
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = assert_rel_err(&format!("{what} {i}"), g, w, tol);
        worst = worst.max(e);
    }
    eprintln!("{what}: worst relative error {worst:.2e}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_sgd_three_steps_match_cpu() {
    let g = Device::Cuda(gpu());
    let mut p_cpu: Vec<Tensor> = PARAM_SHAPES.iter().zip(30..).map(|(s, seed)| randn32(s, 1.0, seed)).collect();
    let mut p_gpu: Vec<Tensor> = p_cpu.iter().map(|p| p.to_device(&g).unwrap()).collect();
    // Large settings so every term of the update shows in the result.
    let (mut cpu, mut dev) = (Sgd::new(0.1, 0.9, 0.01), Sgd::new(0.1, 0.9, 0.01));
    let mut snapshot = None;
    for step in 0..3u64 {
        let grads: Vec<Tensor> =
            PARAM_SHAPES.iter().zip(40..).map(|(s, seed)| randn32(s, 1.0, seed + 10 * step)).collect();
        let grads_gpu: Vec<Tensor> = grads.iter().map(|t| t.to_device(&g).unwrap()).collect();
        cpu.step(&mut p_cpu, &grads).unwrap();
        dev.step(&mut p_gpu, &grads_gpu).unwrap();
        assert_all_close(&format!("step {step}: parameter"), &host(&p_gpu), &host(&p_cpu), 1e-6);
        let buffers = |s: &Sgd| s.momentum_buffers().iter().map(|b| b.clone().unwrap()).collect::<Vec<_>>();
        assert_all_close(&format!("step {step}: momentum"), &host(&buffers(&dev)), &host(&buffers(&cpu)), 1e-6);
        if step == 1 {
            // Holding the buffers makes them shared: the next step must copy them, not write into them.
            let held = buffers(&dev);
            snapshot = Some((host(&held), held));
        }
    }
    let (values, held) = snapshot.unwrap();
    assert_eq!(host(&held), values, "a held momentum snapshot was written by a later step");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_sgd_rejects_mixed_devices() {
    let g = Device::Cuda(gpu());
    let mut params = vec![randn32(&[5], 1.0, 50).to_device(&g).unwrap()];
    let err = Sgd::default().step(&mut params, &[randn32(&[5], 1.0, 51)]).unwrap_err();
    assert!(matches!(err, Error::Mismatch(_)), "{err}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_clip_grad_norm_matches_cpu() {
    let g = Device::Cuda(gpu());
    // The last gradient needs more than the 512 partial sums a gradient gets, so the cap is exercised.
    let shapes: [&[usize]; 4] = [&[1031], &[3, 5, 7], &[1], &[200_003]];
    let make = || shapes.iter().zip(60..).map(|(s, seed)| randn32(s, 1.0, seed)).collect::<Vec<Tensor>>();
    for max_norm in [12.0, 1e9] {
        let mut cpu = make();
        let mut dev: Vec<Tensor> = cpu.iter().map(|t| t.to_device(&g).unwrap()).collect();
        // A second handle on gradient 0: clipping must leave its values alone (copy-on-write).
        let held = dev[0].clone();
        let held_values = held.to_vec_f64().unwrap();
        let before = host(&dev);
        let n_cpu = clip_grad_norm(&mut cpu, max_norm).unwrap();
        let n_gpu = clip_grad_norm(&mut dev, max_norm).unwrap();
        assert!((n_gpu - n_cpu).abs() <= 1e-12 * n_cpu, "norm {n_gpu} vs {n_cpu}");
        assert_all_close(&format!("max_norm {max_norm}: gradient"), &host(&dev), &host(&cpu), 1e-6);
        assert_eq!(held.to_vec_f64().unwrap(), held_values, "a shared gradient was scaled in place");
        if max_norm > n_cpu {
            assert_eq!(host(&dev), before, "below max_norm the gradients must not change");
        }
    }
    // A NaN anywhere: NonFinite, gradients untouched.
    let mut with_nan = make()[3].to_vec_f32().unwrap();
    with_nan[123_457] = f32::NAN;
    let mut dev = vec![
        randn32(&[1031], 1.0, 70).to_device(&g).unwrap(),
        Tensor::from_vec(with_nan, &[200_003]).unwrap().to_device(&g).unwrap(),
    ];
    let before = host(&dev)[0].clone();
    let err = clip_grad_norm(&mut dev, 1.0).unwrap_err();
    assert!(matches!(err, Error::NonFinite(_)), "{err}");
    assert!(err.to_string().contains("gradient 1"), "{err}");
    assert_eq!(host(&dev)[0], before);
}
