//! The optimiser: SGD with Nesterov momentum against hand-computed steps, momentum checkpoints, gradient clipping and
//! the learning-rate schedule. SGD's refusals and clipping's no-op and non-finite cases are device tests
//! (`common::device_test!`; `NAME::gpu` with `cargo test --release --test optim -- --ignored` on a GPU machine).

use lkm_engine::device::Device;
use lkm_engine::optim::{clip_for_step, clip_grad_norm, poly_lr, Sgd, DEFAULT_GRAD_CLIP, DEFAULT_LR, DEFAULT_MOMENTUM};
use lkm_engine::{DType, Error, Tensor};

mod common;
use common::{assert_close, device_test};

fn t(v: &[f64]) -> Tensor {
    Tensor::from_vec(v.to_vec(), &[v.len()]).unwrap()
}

fn values(x: &Tensor) -> Vec<f64> {
    x.to_vec_f64().unwrap()
}

const G1: [f64; 2] = [1.0, -0.5];
const G2: [f64; 2] = [-2.0, 0.25];
const G3: [f64; 2] = [0.5, 1.0];

#[test]
fn sgd_nesterov_three_steps_by_hand() {
    // lr 0.1, momentum 0.9, no weight decay, p = (1, -2).
    let mut sgd = Sgd::new(0.1, 0.9, 0.0);
    let mut p = [t(&[1.0, -2.0])];
    // Step 1: b = g1 = (1, -0.5); d = g1 + 0.9 b = (1.9, -0.95); p = (1 - 0.19, -2 + 0.095) = (0.81, -1.905).
    sgd.step(&mut p, &[t(&G1)]).unwrap();
    assert_close("parameter", &values(&p[0]), &[0.81, -1.905], 0.0, 1e-12);
    assert_close("momentum buffer", &values(sgd.momentum_buffers()[0].as_ref().unwrap()), &[1.0, -0.5], 0.0, 1e-12);
    // Step 2: b = 0.9 (1, -0.5) + (-2, 0.25) = (-1.1, -0.2); d = (-2, 0.25) + 0.9 b = (-2.99, 0.07);
    // p = (0.81 + 0.299, -1.905 - 0.007) = (1.109, -1.912).
    sgd.step(&mut p, &[t(&G2)]).unwrap();
    assert_close("parameter", &values(&p[0]), &[1.109, -1.912], 0.0, 1e-12);
    // Step 3: b = 0.9 (-1.1, -0.2) + (0.5, 1) = (-0.49, 0.82); d = (0.5, 1) + 0.9 b = (0.059, 1.738);
    // p = (1.109 - 0.0059, -1.912 - 0.1738) = (1.1031, -2.0858).
    sgd.step(&mut p, &[t(&G3)]).unwrap();
    assert_close("parameter", &values(&p[0]), &[1.1031, -2.0858], 0.0, 1e-12);
    assert_close("momentum buffer", &values(sgd.momentum_buffers()[0].as_ref().unwrap()), &[-0.49, 0.82], 0.0, 1e-12);
}

#[test]
fn sgd_weight_decay_shrinks_toward_zero() {
    // Zero gradient, wd 0.1: g = 0.1 p = (0.1, -0.2); b = g; d = g + 0.9 b = 1.9 g = (0.19, -0.38);
    // p = (1 - 0.019, -2 + 0.038) = (0.981, -1.962).
    let mut p = [t(&[1.0, -2.0])];
    Sgd::new(0.1, 0.9, 0.1).step(&mut p, &[t(&[0.0, 0.0])]).unwrap();
    assert_close("parameter", &values(&p[0]), &[0.981, -1.962], 0.0, 1e-12);
    // Without weight decay a zero gradient moves nothing.
    let mut q = [t(&[1.0, -2.0])];
    Sgd::new(0.1, 0.9, 0.0).step(&mut q, &[t(&[0.0, 0.0])]).unwrap();
    assert_eq!(values(&q[0]), vec![1.0, -2.0]);
}

#[test]
fn sgd_float32_matches_float64_roughly() {
    let mut p64 = [t(&[1.0, -2.0])];
    let mut p32 = [Tensor::from_vec(vec![1.0f32, -2.0], &[2]).unwrap()];
    let (mut a, mut b) = (Sgd::default(), Sgd::default());
    for g in [G1, G2, G3] {
        a.step(&mut p64, &[t(&g)]).unwrap();
        b.step(&mut p32, &[Tensor::from_vec(vec![g[0] as f32, g[1] as f32], &[2]).unwrap()]).unwrap();
    }
    assert_close("float32 vs float64 parameters", &values(&p32[0]), &values(&p64[0]), 0.0, 1e-6);
}

#[test]
fn sgd_restored_momentum_gives_identical_steps() {
    let mut a = Sgd::new(0.05, 0.99, 3e-5);
    let mut pa = [t(&[0.3, -0.7]), t(&[1.5])];
    a.step(&mut pa, &[t(&G1), t(&[0.2])]).unwrap();
    a.step(&mut pa, &[t(&G2), t(&[-0.4])]).unwrap();
    // A checkpoint: the parameter values and (shared) clones of the momentum buffers.
    let saved_params: Vec<Vec<f64>> = pa.iter().map(values).collect();
    let saved_buffers = a.momentum_buffers().to_vec();
    let saved_values: Vec<Vec<f64>> = saved_buffers.iter().map(|b| values(b.as_ref().unwrap())).collect();

    let step3 = [t(&G3), t(&[0.9])];
    a.step(&mut pa, &step3).unwrap();
    let mut b = Sgd::new(0.05, 0.99, 3e-5);
    b.set_momentum_buffers(saved_buffers.clone());
    let mut pb: Vec<Tensor> = saved_params.iter().map(|v| t(v)).collect();
    b.step(&mut pb, &step3).unwrap();
    for (x, y) in pa.iter().zip(&pb) {
        assert_eq!(values(x), values(y));
    }
    for (x, y) in a.momentum_buffers().iter().zip(b.momentum_buffers()) {
        assert_eq!(values(x.as_ref().unwrap()), values(y.as_ref().unwrap()));
    }
    // The checkpoint itself was not written by either optimiser's later step (copy-on-write).
    for (buf, want) in saved_buffers.iter().zip(&saved_values) {
        assert_eq!(&values(buf.as_ref().unwrap()), want);
    }
    // Without the momentum history the same step lands elsewhere.
    let mut pc: Vec<Tensor> = saved_params.iter().map(|v| t(v)).collect();
    Sgd::new(0.05, 0.99, 3e-5).step(&mut pc, &step3).unwrap();
    assert_ne!(values(&pc[0]), values(&pa[0]));
}

/// `v` as a float32 vector on `dev`.
fn t_on(dev: &Device, v: &[f32]) -> Tensor {
    common::tensor_on(dev, v.to_vec(), &[v.len()])
}

fn sgd_rejects_shared_and_mismatched_parameters(dev: &Device) {
    let t = |v: &[f32]| t_on(dev, v);
    let p = t(&[1.0, 2.0]);
    let mut params = [p.clone()];
    let err = Sgd::default().step(&mut params, &[t(&[0.1, 0.1])]).unwrap_err();
    assert!(matches!(err, Error::Mismatch(_)) && err.to_string().contains("shared"), "{err}");
    drop(p);

    let err = Sgd::default().step(&mut params, &[]).unwrap_err();
    assert!(err.to_string().contains("1 parameters but 0 gradients"), "{err}");
    let err = Sgd::default().step(&mut params, &[t(&[0.1, 0.1, 0.1])]).unwrap_err();
    assert!(matches!(err, Error::Shape(_)) && err.to_string().contains("[3]"), "{err}");
    assert_eq!(values(&params[0]), vec![1.0, 2.0], "a failed step must not change the parameters");

    let mut sgd = Sgd::default();
    sgd.set_momentum_buffers(vec![Some(t(&[0.0])), None]);
    let err = sgd.step(&mut params, &[t(&[0.1, 0.1])]).unwrap_err();
    assert!(err.to_string().contains("momentum buffers for 2"), "{err}");
    let err = Sgd::new(-0.1, 0.9, 0.0).step(&mut params, &[t(&[0.1, 0.1])]).unwrap_err();
    assert!(matches!(err, Error::Config(_)) && err.to_string().contains("lr"), "{err}");
}
device_test!(sgd_rejects_shared_and_mismatched_parameters);

#[test]
fn clip_grad_norm_scales_above_max() {
    // Global norm over a float64 and a float32 gradient: sqrt(3^2 + 0^2 + 4^2) = 5.
    let mut grads = [t(&[3.0, 0.0]), Tensor::from_vec(vec![4.0f32], &[1]).unwrap()];
    let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
    assert_eq!(norm, 5.0);
    let ratio = 1.0 / (5.0 + 1e-6);
    assert_close("clipped gradient", &values(&grads[0]), &[3.0 * ratio, 0.0], 0.0, 1e-12);
    assert!((values(&grads[1])[0] - 4.0 * ratio).abs() < 1e-6);
    // After clipping the norm is max_norm (up to the 1e-6 guard).
    let after = clip_grad_norm(&mut grads, 100.0).unwrap();
    assert!((after - 1.0).abs() < 1e-6, "{after}");
}

fn clip_grad_norm_is_a_no_op_below_max(dev: &Device) {
    // 3^2 + 0^2 + 4^2 = 25 exactly in float32, so the norm is exactly 5 on every device.
    let mut grads = [t_on(dev, &[3.0, 0.0]), t_on(dev, &[4.0])];
    assert_eq!(clip_grad_norm(&mut grads, DEFAULT_GRAD_CLIP).unwrap(), 5.0);
    assert_eq!(values(&grads[0]), vec![3.0, 0.0]);
    assert_eq!(values(&grads[1]), vec![4.0]);
}
device_test!(clip_grad_norm_is_a_no_op_below_max);

#[test]
fn clip_grad_norm_leaves_shared_gradients_alone() {
    let g = t(&[30.0, 40.0]);
    let mut grads = [g.clone()];
    clip_grad_norm(&mut grads, 5.0).unwrap();
    assert_eq!(values(&g), vec![30.0, 40.0]);
    assert_close(
        "clipped gradient",
        &values(&grads[0]),
        &[30.0 * 5.0 / (50.0 + 1e-6), 40.0 * 5.0 / (50.0 + 1e-6)],
        0.0,
        1e-12,
    );
}

fn clip_grad_norm_rejects_non_finite_and_keeps_gradients(dev: &Device) {
    for bad in [f32::NAN, f32::INFINITY] {
        let mut grads = [t_on(dev, &[30.0, 40.0]), t_on(dev, &[1.0, bad])];
        let err = clip_grad_norm(&mut grads, 1.0).unwrap_err();
        match &err {
            Error::NonFinite(m) => {
                assert!(m.starts_with("gradient norm is NaN") && m.contains("gradient 1"), "{m}")
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        assert_eq!(values(&grads[0]), vec![30.0, 40.0]);
        assert_eq!(values(&grads[1])[0], 1.0);
        assert!(values(&grads[1])[1].is_nan() || values(&grads[1])[1].is_infinite());
    }
}
device_test!(clip_grad_norm_rejects_non_finite_and_keeps_gradients);

/// A training step's clipping and SGD where the loss, or the gradient norm, is not finite: nothing changes (on the GPU
/// the kernels read that from the clipping status, with no read-back before `finish`), `finish` reports it, and the
/// next finite step moves the parameters exactly as a fresh optimiser's first step would.
fn a_non_finite_step_changes_nothing(dev: &Device) {
    let start = [t_on(dev, &[1.0, -2.0]), t_on(dev, &[0.5])];
    let grads = || vec![Some(t_on(dev, &[30.0, 40.0])), Some(t_on(dev, &[1.0]))];
    let loss = |v: f32| t_on(dev, &[v]);
    let fresh_step = |params: &mut [Tensor]| {
        let mut g = grads();
        let clip = clip_for_step(&mut g, 5.0, &loss(0.5)).unwrap();
        let mut sgd = Sgd::new(0.1, 0.9, 0.01);
        sgd.step_clipped(params, &mut [], &g, &clip).unwrap();
        let report = clip.finish().unwrap();
        assert_eq!((report.loss, report.norm().unwrap()), (0.5, (30f64 * 30.0 + 40.0 * 40.0 + 1.0).sqrt()));
    };
    let mut reference: Vec<Tensor> = start.iter().map(|p| p.deep_copy().unwrap()).collect();
    fresh_step(&mut reference);
    for (bad_loss, bad_grad) in [(f32::NAN, 1.0), (f32::INFINITY, 1.0), (0.5, f32::NAN)] {
        let mut params: Vec<Tensor> = start.iter().map(|p| p.deep_copy().unwrap()).collect();
        let mut sgd = Sgd::new(0.1, 0.9, 0.01);
        let mut g = vec![Some(t_on(dev, &[30.0, 40.0])), Some(t_on(dev, &[bad_grad]))];
        let clip = clip_for_step(&mut g, 5.0, &loss(bad_loss)).unwrap();
        sgd.step_clipped(&mut params, &mut [], &g, &clip).unwrap();
        let report = clip.finish().unwrap();
        let what = format!("loss {bad_loss}, gradient {bad_grad}");
        assert_eq!(report.loss.is_finite(), bad_loss.is_finite(), "{what}");
        assert_eq!(report.norm().is_ok(), bad_grad.is_finite(), "{what}");
        for (p, s) in params.iter().zip(&start) {
            assert_eq!(values(p), values(s), "{what}: a parameter changed");
        }
        assert_eq!(values(g[0].as_ref().unwrap()), vec![30.0, 40.0], "{what}: a gradient was scaled");
        // The next step, finite, from the optimiser that skipped: as the first step of a fresh one.
        let mut g = grads();
        let clip = clip_for_step(&mut g, 5.0, &loss(0.5)).unwrap();
        sgd.step_clipped(&mut params, &mut [], &g, &clip).unwrap();
        clip.finish().unwrap().norm().unwrap();
        for (p, r) in params.iter().zip(&reference) {
            assert_eq!(values(p), values(r), "{what}: the step after the skipped one");
        }
    }
}
device_test!(a_non_finite_step_changes_nothing);

#[test]
fn poly_lr_schedule() {
    assert_eq!(poly_lr(DEFAULT_LR, 0, 1000), 0.01);
    // 0.01 * (1 - 500/1000)^0.9 = 0.01 * 0.5^0.9 = 0.01 * 0.5358867312681466.
    assert!((poly_lr(DEFAULT_LR, 500, 1000) - 0.005358867312681466).abs() < 1e-15);
    // 0.01 * 0.75^0.9 = 0.007718895067235705.
    assert!((poly_lr(DEFAULT_LR, 250, 1000) - 0.007718895067235705).abs() < 1e-15);
    // The last epoch still trains: 0.01 * 0.001^0.9 = 1.995262314968881e-05.
    assert!((poly_lr(DEFAULT_LR, 999, 1000) - 1.995262314968881e-05).abs() < 1e-18);
    assert_eq!(poly_lr(DEFAULT_LR, 1000, 1000), 0.0);
    assert_eq!(poly_lr(DEFAULT_LR, 1200, 1000), 0.0);
    assert_eq!(DEFAULT_MOMENTUM, 0.99);
}

/// The bf16 copies the optimiser keeps beside float32 GPU parameters ([`Sgd::step_clipped`]'s `copies`): after a step
/// each is the updated parameter rounded to bf16, the same bits as the cast; a shared copy is replaced, so its other
/// holder keeps the old values; a step that the clipping status skips leaves parameter and copy as they were; a copy
/// of the wrong type or shape is refused.
#[test]
#[ignore = "needs a CUDA device"]
fn sgd_rewrites_bf16_copies() {
    let dev = Device::Cuda(common::gpu());
    let start: Vec<f64> = (0..1000).map(|i| ((i * 37 % 101) as f64 - 50.0) * 0.0123).collect();
    let p0 = Tensor::from_vec(start.clone(), &[1000]).unwrap().to_dtype(DType::F32).unwrap().to_device(&dev).unwrap();
    let bf16_of = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap().to_vec_f64().unwrap();
    let grad = || vec![Some(Tensor::from_vec(start.iter().map(|v| v.sin()).collect(), &[1000]).unwrap())];
    let grad = || grad().into_iter().map(|g| g.map(|g| g.to_dtype(DType::F32).unwrap().to_device(&dev).unwrap()));
    let loss = |v: f32| Tensor::from_vec(vec![v], &[1]).unwrap().to_device(&dev).unwrap();
    let mut params = vec![p0.deep_copy().unwrap()];
    let first_copy = p0.to_dtype(DType::BF16).unwrap();
    let other_holder = first_copy.clone();
    let mut copies = vec![Some(first_copy)];
    let mut sgd = Sgd::new(0.1, 0.9, 0.01);
    for step in 0..3 {
        let mut g: Vec<Option<Tensor>> = grad().collect();
        let clip = clip_for_step(&mut g, 100.0, &loss(0.5)).unwrap();
        sgd.step_clipped(&mut params, &mut copies, &g, &clip).unwrap();
        clip.finish().unwrap();
        let copy = copies[0].as_ref().unwrap();
        assert_eq!(copy.dtype(), DType::BF16);
        let copy = copy.to_dtype(DType::F32).unwrap().to_vec_f64().unwrap();
        assert_eq!(copy, bf16_of(&params[0]), "step {step}: the copy is not the parameter rounded to bf16");
        assert_ne!(values(&params[0]), values(&p0), "step {step}: the parameter did not move");
    }
    assert_eq!(bf16_of(&other_holder), bf16_of(&p0), "the shared copy was written over");
    // A skipped step (non-finite loss): neither moves.
    let (p_before, c_before) = (values(&params[0]), values(copies[0].as_ref().unwrap()));
    let mut g: Vec<Option<Tensor>> = grad().collect();
    let clip = clip_for_step(&mut g, 100.0, &loss(f32::NAN)).unwrap();
    sgd.step_clipped(&mut params, &mut copies, &g, &clip).unwrap();
    clip.finish().unwrap();
    assert_eq!((values(&params[0]), values(copies[0].as_ref().unwrap())), (p_before, c_before));
    // Refusals: a float32 "copy", a copy of another shape, a count that does not match.
    let g: Vec<Option<Tensor>> = grad().collect();
    let clip = clip_for_step(&mut g.clone(), 100.0, &loss(0.5)).unwrap();
    for (bad, what) in [
        (vec![Some(params[0].deep_copy().unwrap())], "bf16 copy"),
        (vec![Some(params[0].to_dtype(DType::BF16).unwrap().with_shape(&[10, 100]).unwrap())], "shape"),
        (vec![None, None], "2 bf16 copies"),
    ] {
        let mut bad = bad;
        let err = sgd.step_clipped(&mut params, &mut bad, &g, &clip).unwrap_err().to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
}
