//! Gradient checks and forward checks of the losses (cross-entropy, soft Dice) and of argmax. The checks that hold
//! alike on every device (shape errors, a single class, huge logits, a perfect prediction, argmax's ties) are device
//! tests (`common::device_test!`; `NAME::gpu` with `cargo test --release --test grad_loss -- --ignored` on a GPU
//! machine). Bad label values are not among them: the CPU refuses them, the GPU flags them as NaN (tests/gpu_loss.rs).

use lkm_engine::autograd::gradcheck::{assert_gradients, randn64};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::argmax::argmax;
use lkm_engine::ops::cross_entropy::cross_entropy;
use lkm_engine::ops::dice::{soft_dice_loss, DICE_SMOOTH};
use lkm_engine::{DType, Error, Tensor};

mod common;
use common::{assert_close, device_test, randn_on, tensor_on};

/// Logits spread wide enough that the softmax is far from uniform.
fn logits(shape: &[usize], seed: u64) -> Tensor {
    let v: Vec<f64> = randn64(shape, seed).to_vec_f64().unwrap().iter().map(|x| 2.0 * x).collect();
    Tensor::from_vec(v, shape).unwrap()
}

/// A label map of `shape` (N, 1, spatial) drawing its classes from `classes`, deterministic in `seed`.
fn labels(shape: &[usize], classes: &[usize], seed: u64) -> Tensor {
    let v: Vec<f64> = randn64(shape, seed)
        .to_vec_f64()
        .unwrap()
        .iter()
        .map(|x| classes[(x.abs() * 1000.0) as usize % classes.len()] as f64)
        .collect();
    Tensor::from_vec(v, shape).unwrap()
}

/// The loss and the gradient of the logits from one forward and backward pass.
fn loss_and_grad(x: &Tensor, f: impl Fn(&mut Tape, &Tensor) -> lkm_engine::Result<Tensor>) -> (f64, Vec<f64>) {
    let mut tape = Tape::new();
    tape.watch(x);
    let loss = f(&mut tape, x).unwrap();
    assert_eq!(loss.shape(), &[1]);
    let grads = tape.backward(&loss).unwrap();
    (loss.scalar().unwrap(), grads.get(x).unwrap().to_vec_f64().unwrap())
}

#[test]
fn grad_cross_entropy_2d_k3() {
    let t = labels(&[2, 1, 5, 7], &[0, 1, 2], 11);
    assert_gradients(&[logits(&[2, 3, 5, 7], 1)], 1e-6, |tape, x| cross_entropy(tape, &x[0], &t));
}

#[test]
fn grad_cross_entropy_3d_k4() {
    let t = labels(&[2, 1, 3, 5, 3], &[0, 1, 2, 3], 12);
    assert_gradients(&[logits(&[2, 4, 3, 5, 3], 2)], 1e-6, |tape, x| cross_entropy(tape, &x[0], &t));
}

#[test]
fn grad_soft_dice_per_sample_2d_k4_class_absent() {
    // Class 2 never appears in the target, so its groups have G = I = 0.
    let t = labels(&[2, 1, 5, 7], &[0, 1, 3], 13);
    assert_gradients(&[logits(&[2, 4, 5, 7], 3)], 1e-6, |tape, x| soft_dice_loss(tape, &x[0], &t, false));
}

#[test]
fn grad_soft_dice_batch_2d_k4_class_absent() {
    let t = labels(&[2, 1, 5, 7], &[0, 1, 3], 14);
    assert_gradients(&[logits(&[2, 4, 5, 7], 4)], 1e-6, |tape, x| soft_dice_loss(tape, &x[0], &t, true));
}

/// Sample 0 holds only classes 0 and 1, sample 1 only 0 and 2: each foreground class is absent from one sample.
fn split_classes_target() -> Tensor {
    let a = labels(&[1, 1, 3, 5, 3], &[0, 1], 15).to_vec_f64().unwrap();
    let b = labels(&[1, 1, 3, 5, 3], &[0, 2], 16).to_vec_f64().unwrap();
    Tensor::from_vec([a, b].concat(), &[2, 1, 3, 5, 3]).unwrap()
}

#[test]
fn grad_soft_dice_per_sample_3d_k3() {
    let t = split_classes_target();
    assert_gradients(&[logits(&[2, 3, 3, 5, 3], 5)], 1e-6, |tape, x| soft_dice_loss(tape, &x[0], &t, false));
}

#[test]
fn grad_soft_dice_batch_3d_k3() {
    let t = split_classes_target();
    assert_gradients(&[logits(&[2, 3, 3, 5, 3], 6)], 1e-6, |tape, x| soft_dice_loss(tape, &x[0], &t, true));
}

/// Two voxels, two classes, (N, K, H, W) = (1, 2, 1, 2): class-0 logits [0, 0], class-1 logits [ln 3, 0],
/// labels [1, 0]. Voxel 0: p = (1/4, 3/4), voxel 1: p = (1/2, 1/2).
fn two_voxel_case() -> (Tensor, Tensor) {
    let x = Tensor::from_vec(vec![0.0, 0.0, 3f64.ln(), 0.0], &[1, 2, 1, 2]).unwrap();
    let t = Tensor::from_vec(vec![1.0, 0.0], &[1, 1, 1, 2]).unwrap();
    (x, t)
}

#[test]
fn cross_entropy_two_voxels_by_hand() {
    let (x, t) = two_voxel_case();
    let (loss, grad) = loss_and_grad(&x, |tape, x| cross_entropy(tape, x, &t));
    // L = (-ln(3/4) - ln(1/2)) / 2 = (ln(4/3) + ln 2) / 2 = ln(8/3) / 2.
    assert_close("cross-entropy", &[loss], &[(8.0f64 / 3.0).ln() / 2.0], 1e-14, 1e-14);
    // dL/dx = (p - onehot) / 2: voxel 0 (1/4 - 0, 3/4 - 1) / 2 = (1/8, -1/8); voxel 1 (1/2 - 1, 1/2 - 0) / 2 =
    // (-1/4, 1/4). Layout [class 0: v0, v1; class 1: v0, v1].
    let expected = [0.125, -0.25, -0.125, 0.25];
    assert_close("cross-entropy gradient", &grad, &expected, 1e-14, 1e-14);
}

#[test]
fn cross_entropy_matches_naive_formula() {
    let x = logits(&[2, 4, 3, 2, 5], 21);
    let t = labels(&[2, 1, 3, 2, 5], &[0, 1, 2, 3], 22);
    let (xv, tv) = (x.to_vec_f64().unwrap(), t.to_vec_f64().unwrap());
    // -ln softmax(x)_t per voxel, without any shift, averaged.
    let v = 3 * 2 * 5;
    let mut sum = 0.0;
    for n in 0..2 {
        for i in 0..v {
            let at = |k: usize| xv[(n * 4 + k) * v + i];
            let z: f64 = (0..4).map(|k| at(k).exp()).sum();
            sum -= (at(tv[n * v + i] as usize).exp() / z).ln();
        }
    }
    let loss = cross_entropy(&mut Tape::no_grad(), &x, &t).unwrap().scalar().unwrap();
    assert_close("cross-entropy vs naive", &[loss], &[sum / (2 * v) as f64], 1e-13, 1e-13);
    // The float32 path agrees to float32 accuracy.
    let loss32 =
        cross_entropy(&mut Tape::no_grad(), &x.to_dtype(DType::F32).unwrap(), &t.to_dtype(DType::F32).unwrap())
            .unwrap()
            .scalar()
            .unwrap();
    assert_close("float32 cross-entropy", &[loss32], &[loss], 1e-6, 1e-6);
}

#[test]
fn cross_entropy_uniform_logits_is_ln_k() {
    for k in [2usize, 3, 4] {
        let x = Tensor::full(&[2, k, 3, 5], 0.7, DType::F64, &lkm_engine::device::Device::Cpu).unwrap();
        let t = labels(&[2, 1, 3, 5], &(0..k).collect::<Vec<_>>(), 23);
        let loss = cross_entropy(&mut Tape::no_grad(), &x, &t).unwrap().scalar().unwrap();
        assert_close(&format!("uniform cross-entropy, K = {k}"), &[loss], &[(k as f64).ln()], 1e-14, 1e-14);
    }
}

fn cross_entropy_is_stable_for_huge_logits(dev: &Device) {
    // Logits 1000 apart would overflow e^x without the max shift. Voxel 0 is labelled with the winning class (loss
    // ~ 0), voxel 1 with the losing one (loss ~ 1000).
    let x = tensor_on(dev, vec![1000.0, 1000.0, 0.0, 0.0], &[1, 2, 1, 2]);
    let t = tensor_on(dev, vec![0.0, 1.0], &[1, 1, 1, 2]);
    let (loss, grad) = loss_and_grad(&x, |tape, x| cross_entropy(tape, x, &t));
    assert_close("cross-entropy of logits 1000 apart", &[loss], &[500.0], 1e-6, 1e-6);
    assert!(grad.iter().all(|g| g.is_finite()), "{grad:?}");
}
device_test!(cross_entropy_is_stable_for_huge_logits);

/// K = 1: every voxel's softmax is 1 on its only class, so the loss is exactly 0 and so is its gradient.
fn cross_entropy_of_one_class_is_zero(dev: &Device) {
    let x = randn_on(dev, &[2, 1, 7, 9], 2.0, 7);
    let t = Tensor::zeros(&[2, 1, 7, 9], DType::F32, dev).unwrap();
    let (loss, grad) = loss_and_grad(&x, |tape, x| cross_entropy(tape, x, &t));
    assert_eq!(loss, 0.0);
    assert!(grad.iter().all(|&v| v == 0.0), "{grad:?}");
}
device_test!(cross_entropy_of_one_class_is_zero);

#[test]
fn soft_dice_two_voxels_by_hand() {
    let (x, t) = two_voxel_case();
    let s = DICE_SMOOTH;
    // Class 1 only: p_1 = (3/4, 1/2), y_1 = (1, 0): I = 3/4, P = 5/4, G = 1, dc = (3/2 + s) / (9/4 + s).
    let dc = (1.5 + s) / (2.25 + s);
    for batch_dice in [false, true] {
        let (loss, grad) = loss_and_grad(&x, |tape, x| soft_dice_loss(tape, x, &t, batch_dice));
        assert_close(&format!("soft Dice, batch_dice {batch_dice}"), &[loss], &[-dc], 1e-14, 1e-14);
        // dL/dp_1 = -(2 y - dc) / D with D = 9/4 + s; dL/dx_1 = p_0 p_1 (dL/dp_1), dL/dx_0 = -dL/dx_1 (softmax of
        // two classes). Voxel 0: p_0 p_1 = 3/16; voxel 1: 1/4.
        let d = 2.25 + s;
        let g1 = [-(2.0 - dc) / d * 3.0 / 16.0, -(0.0 - dc) / d * 0.25];
        let expected = [-g1[0], -g1[1], g1[0], g1[1]];
        assert_close(&format!("soft Dice gradient, batch_dice {batch_dice}"), &grad, &expected, 1e-12, 1e-12);
    }
}

#[test]
fn soft_dice_batch_and_per_sample_by_hand() {
    // N = 2 samples of one voxel, K = 2. Sample 0: logits (0, ln 3), label 1, so p_1 = 3/4. Sample 1: logits (0, 0),
    // label 0, so p_1 = 1/2.
    let x = Tensor::from_vec(vec![0.0, 3f64.ln(), 0.0, 0.0], &[2, 2, 1, 1]).unwrap();
    let t = Tensor::from_vec(vec![1.0, 0.0], &[2, 1, 1, 1]).unwrap();
    let s = DICE_SMOOTH;
    // Per sample: dc_0 = (2 * 3/4 + s) / (3/4 + 1 + s), dc_1 = (0 + s) / (1/2 + 0 + s); L = -(dc_0 + dc_1) / 2.
    let per_sample = -((1.5 + s) / (1.75 + s) + s / (0.5 + s)) / 2.0;
    // Batch: I = 3/4, P = 3/4 + 1/2, G = 1: dc = (3/2 + s) / (9/4 + s).
    let batch = -(1.5 + s) / (2.25 + s);
    let f = |b| soft_dice_loss(&mut Tape::no_grad(), &x, &t, b).unwrap().scalar().unwrap();
    assert_close("per-sample soft Dice", &[f(false)], &[per_sample], 1e-14, 1e-14);
    assert_close("batch soft Dice", &[f(true)], &[batch], 1e-14, 1e-14);
}

/// Soft Dice computed straight from the definition, with the one-hot target and softmax written out per voxel.
fn naive_dice(x: &[f64], t: &[f64], n: usize, k: usize, v: usize, batch_dice: bool) -> f64 {
    let p = |b: usize, c: usize, i: usize| {
        let z: f64 = (0..k).map(|j| x[(b * k + j) * v + i].exp()).sum();
        x[(b * k + c) * v + i].exp() / z
    };
    let groups: Vec<Vec<usize>> = if batch_dice { vec![(0..n).collect()] } else { (0..n).map(|b| vec![b]).collect() };
    let mut dcs = Vec::new();
    for samples in &groups {
        for c in 1..k {
            let (mut i2, mut den) = (0.0, DICE_SMOOTH);
            for &b in samples {
                for i in 0..v {
                    let y = if t[b * v + i] as usize == c { 1.0 } else { 0.0 };
                    i2 += 2.0 * p(b, c, i) * y;
                    den += p(b, c, i) + y;
                }
            }
            dcs.push((i2 + DICE_SMOOTH) / den);
        }
    }
    -dcs.iter().sum::<f64>() / dcs.len() as f64
}

#[test]
fn soft_dice_matches_naive_formula() {
    let x = logits(&[3, 4, 2, 3, 5], 31);
    let t = labels(&[3, 1, 2, 3, 5], &[0, 1, 3], 32);
    let (xv, tv) = (x.to_vec_f64().unwrap(), t.to_vec_f64().unwrap());
    for batch_dice in [false, true] {
        let loss = soft_dice_loss(&mut Tape::no_grad(), &x, &t, batch_dice).unwrap().scalar().unwrap();
        let want = naive_dice(&xv, &tv, 3, 4, 30, batch_dice);
        assert_close(&format!("soft Dice vs naive, batch_dice {batch_dice}"), &[loss], &[want], 1e-13, 1e-13);
        let (x32, t32) = (x.to_dtype(DType::F32).unwrap(), t.to_dtype(DType::F32).unwrap());
        let loss32 = soft_dice_loss(&mut Tape::no_grad(), &x32, &t32, batch_dice).unwrap().scalar().unwrap();
        assert_close(&format!("float32 soft Dice, batch_dice {batch_dice}"), &[loss32], &[loss], 1e-6, 1e-6);
    }
}

fn soft_dice_of_perfect_confident_prediction_is_minus_one(dev: &Device) {
    // Logits 30 on the labelled class and 0 elsewhere: p = 1 - O(e^-30) on the label. Class 3 is absent from the
    // target and predicted nowhere, so its ratio is s / (P + s) ~ 1 as well.
    let t = labels(&[2, 1, 3, 4, 5], &[0, 1, 2], 41);
    let tv = t.to_vec_f64().unwrap();
    let t = t.to_dtype(DType::F32).unwrap().to_device(dev).unwrap();
    let v = 3 * 4 * 5;
    let x = Tensor::from_fn(&[2, 4, 3, 4, 5], DType::F32, |j| {
        let (n, k, i) = (j / (4 * v), j / v % 4, j % v);
        if tv[n * v + i] as usize == k {
            30.0
        } else {
            0.0
        }
    })
    .unwrap()
    .to_device(dev)
    .unwrap();
    for batch_dice in [false, true] {
        let loss = soft_dice_loss(&mut Tape::no_grad(), &x, &t, batch_dice).unwrap().scalar().unwrap();
        assert_close(&format!("soft Dice, batch_dice {batch_dice}"), &[loss], &[-1.0], 1e-6, 1e-6);
    }
    // The same prediction has cross-entropy ~ 3 e^-30.
    let ce = cross_entropy(&mut Tape::no_grad(), &x, &t).unwrap().scalar().unwrap();
    assert!(ce < 1e-12, "{ce}");
}
device_test!(soft_dice_of_perfect_confident_prediction_is_minus_one);

fn argmax_small_case_with_ties(dev: &Device) {
    // (N, K, H, W) = (1, 3, 1, 4); per voxel the logits of classes 0, 1, 2:
    // v0 (1, 5, 2) -> 1; v1 (4, 4, 0) -> 0 (tie, lowest wins); v2 (-1, 2, 2) -> 1 (tie); v3 (-3, -2, -1) -> 2.
    let x = tensor_on(dev, vec![1.0, 4.0, -1.0, -3.0, 5.0, 4.0, 2.0, -2.0, 2.0, 0.0, 2.0, -1.0], &[1, 3, 1, 4]);
    let y = argmax(&x).unwrap();
    assert_eq!(y.shape(), &[1, 1, 1, 4]);
    assert_eq!(y.dtype(), DType::F32);
    assert_eq!(y.to_vec_f64().unwrap(), vec![1.0, 0.0, 1.0, 2.0]);
}
device_test!(argmax_small_case_with_ties);

#[test]
fn argmax_3d_matches_naive() {
    let x = logits(&[2, 4, 3, 2, 5], 51);
    let xv = x.to_vec_f64().unwrap();
    let y = argmax(&x).unwrap();
    assert_eq!(y.shape(), &[2, 1, 3, 2, 5]);
    let v = 30;
    let want: Vec<f64> = (0..2 * v)
        .map(|j| {
            let (n, i) = (j / v, j % v);
            let vals: Vec<f64> = (0..4).map(|k| xv[(n * 4 + k) * v + i]).collect();
            let max = vals.iter().cloned().fold(f64::MIN, f64::max);
            vals.iter().position(|&a| a == max).unwrap() as f64
        })
        .collect();
    assert_eq!(y.to_vec_f64().unwrap(), want);
}

fn argmax_rejects_non_map(dev: &Device) {
    let err = argmax(&randn_on(dev, &[3, 4], 1.0, 0)).unwrap_err();
    assert!(err.to_string().contains("argmax") && err.to_string().contains("[3, 4]"), "{err}");
}
device_test!(argmax_rejects_non_map);

fn data_error(r: lkm_engine::Result<Tensor>) -> String {
    match r {
        Err(Error::Data(m)) => m,
        other => panic!("expected a data error, got {other:?}"),
    }
}

#[test]
fn losses_reject_label_out_of_range() {
    let x = logits(&[1, 3, 2, 2], 61);
    let t = Tensor::from_vec(vec![0.0, 2.0, 3.0, 1.0], &[1, 1, 2, 2]).unwrap();
    let m = data_error(cross_entropy(&mut Tape::new(), &x, &t));
    assert!(m.contains("label 3") && m.contains("K = 3") && m.contains("[0, 3)"), "{m}");
    let m = data_error(soft_dice_loss(&mut Tape::new(), &x, &t, false));
    assert!(m.contains("label 3") && m.contains("K = 3"), "{m}");
    let t = Tensor::from_vec(vec![0.0, -1.0, 0.0, 1.0], &[1, 1, 2, 2]).unwrap();
    let m = data_error(cross_entropy(&mut Tape::new(), &x, &t));
    assert!(m.contains("label -1"), "{m}");
}

#[test]
fn losses_reject_non_integer_label() {
    let x = logits(&[1, 3, 2, 2], 62);
    let t = Tensor::from_vec(vec![0.0, 1.5, 2.0, 1.0], &[1, 1, 2, 2]).unwrap();
    let m = data_error(cross_entropy(&mut Tape::new(), &x, &t));
    assert!(m.contains("label 1.5") && m.contains("K = 3"), "{m}");
    let m = data_error(soft_dice_loss(&mut Tape::new(), &x, &t, true));
    assert!(m.contains("label 1.5"), "{m}");
    let t = Tensor::from_vec(vec![0.0, f64::NAN, 2.0, 1.0], &[1, 1, 2, 2]).unwrap();
    let m = data_error(cross_entropy(&mut Tape::new(), &x, &t));
    assert!(m.contains("label NaN"), "{m}");
}

fn losses_reject_target_shape_mismatch(dev: &Device) {
    let x = randn_on(dev, &[2, 3, 4, 5], 2.0, 63);
    for bad in [&[2, 1, 5, 4][..], &[2, 3, 4, 5], &[1, 1, 4, 5], &[2, 1, 1, 4, 5]] {
        let t = Tensor::zeros(bad, DType::F32, dev).unwrap();
        for err in [
            cross_entropy(&mut Tape::new(), &x, &t).unwrap_err(),
            soft_dice_loss(&mut Tape::new(), &x, &t, false).unwrap_err(),
        ] {
            let m = err.to_string();
            assert!(matches!(err, Error::Shape(_)), "{m}");
            assert!(m.contains(&format!("{bad:?}")) && m.contains("[2, 3, 4, 5]"), "{m}");
        }
    }
}
device_test!(losses_reject_target_shape_mismatch);

fn losses_reject_bad_logits(dev: &Device) {
    let t = Tensor::zeros(&[2, 1, 4, 5], DType::F32, dev).unwrap();
    // Soft Dice without background needs a foreground class.
    let err = soft_dice_loss(&mut Tape::new(), &randn_on(dev, &[2, 1, 4, 5], 2.0, 64), &t, false).unwrap_err();
    assert!(err.to_string().contains("at least 2 classes"), "{err}");
    // Mixed kinds: a float64 host target (on the GPU the devices differ too).
    let t64 = Tensor::zeros(&[2, 1, 4, 5], DType::F64, &Device::Cpu).unwrap();
    let err = cross_entropy(&mut Tape::new(), &randn_on(dev, &[2, 3, 4, 5], 2.0, 65), &t64).unwrap_err();
    assert!(matches!(err, Error::Mismatch(_)), "{err}");
    // Not a feature map.
    let err = cross_entropy(&mut Tape::new(), &randn_on(dev, &[2, 3, 4], 2.0, 66), &t).unwrap_err();
    assert!(err.to_string().contains("[2, 3, 4]"), "{err}");
}
device_test!(losses_reject_bad_logits);
