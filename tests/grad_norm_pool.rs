//! Instance norm, layer norm, average pooling and nearest upsampling: gradient checks, forward values against
//! independently written formulas and hand-worked cases, and argument errors.

use lkm_engine::autograd::gradcheck::{assert_gradients, randn64};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::activation::{leaky_relu, Activation};
use lkm_engine::ops::add::add;
use lkm_engine::ops::avg_pool::avg_pool;
use lkm_engine::ops::conv::conv;
use lkm_engine::ops::instance_norm::{instance_norm, instance_norm_act, instance_norm_add_act, Normalized, IN_EPS};
use lkm_engine::ops::layer_norm::{layer_norm, LN_EPS};
use lkm_engine::ops::pim::{partition, Partitioned, PimLayout};
use lkm_engine::ops::upsample::upsample_nearest;
use lkm_engine::{DType, Tensor};

mod common;
use common::max_abs_diff;

/// 3 randn + 2: a nonzero mean and a scale other than 1, so the normalisation has work to do.
fn shifted(shape: &[usize], seed: u64) -> Tensor {
    let v = randn64(shape, seed).to_vec_f64().unwrap().iter().map(|x| 3.0 * x + 2.0).collect();
    Tensor::from_vec::<f64>(v, shape).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// Mean and biased variance, the textbook one-pass way (fine in f64 for these small inputs).
fn mean_var(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| x * x).sum::<f64>() / n - mean * mean;
    (mean, var)
}

// ---------------------------------------------------------------------------------------------------------------
// Instance norm

fn check_instance_norm_grad(shape: &[usize]) {
    let c = shape[1];
    let inputs = [shifted(shape, 11), randn64(&[c], 12), randn64(&[c], 13)];
    assert_gradients(&inputs, 1e-6, |t, x| instance_norm(t, &x[0], &x[1], &x[2], IN_EPS));
}

fn norm_then_leaky_relu(t: &mut Tape, x: &[Tensor]) -> lkm_engine::Result<Tensor> {
    let y = instance_norm(t, &x[0], &x[1], &x[2], IN_EPS)?;
    leaky_relu(t, &y)
}

fn fused_norm_leaky_relu(t: &mut Tape, x: &[Tensor]) -> lkm_engine::Result<Tensor> {
    instance_norm_act(t, &x[0], &x[1], &x[2], IN_EPS, Some(Activation::LeakyRelu))
}

#[test]
fn grad_instance_norm_leaky_relu() {
    let inputs = [shifted(&[2, 3, 3, 4, 5], 14), randn64(&[3], 15), randn64(&[3], 16)];
    assert_gradients(&inputs, 1e-6, fused_norm_leaky_relu);
}

/// The fused op is instance_norm then leaky_relu, to the bit, in both dtypes (its backward recomputes the
/// activation's input exactly as the forward formed it).
#[test]
fn instance_norm_leaky_relu_equals_the_two_ops() {
    for dtype in [DType::F32, DType::F64] {
        let inputs: Vec<Tensor> = [shifted(&[2, 5, 3, 6, 7], 17), randn64(&[5], 18), randn64(&[5], 19)]
            .iter()
            .map(|t| t.to_dtype(dtype).unwrap())
            .collect();
        let name = format!("instance_norm_leaky_relu {dtype:?}");
        common::assert_same_bits(&name, &inputs, &Device::Cpu, &fused_norm_leaky_relu, &norm_then_leaky_relu);
    }
}

/// A conv of a normalised map given as [`Normalized`] (kept: the norm's input and statistics; the map rebuilt in the
/// conv's backward pass) against the map kept: the same bits, output and every gradient, in both dtypes; and finite
/// differences agree.
#[test]
fn conv_of_a_normalized_map_rebuilds_it() {
    let act = Some(Activation::LeakyRelu);
    let rebuilt = |t: &mut Tape, x: &[Tensor]| {
        let n = Normalized::new(t, &x[0], &x[1], &x[2], IN_EPS, act)?;
        conv(t, &n, &x[3], Some(&x[4]), &[1, 2, 1])
    };
    let kept = |t: &mut Tape, x: &[Tensor]| {
        let y = instance_norm_act(t, &x[0], &x[1], &x[2], IN_EPS, act)?;
        conv(t, &y, &x[3], Some(&x[4]), &[1, 2, 1])
    };
    // x, gamma, beta, the conv's weight (strided along H) and bias.
    let inputs = [
        shifted(&[2, 3, 3, 6, 5], 20),
        randn64(&[3], 21),
        randn64(&[3], 22),
        randn64(&[4, 3, 1, 3, 3], 23),
        randn64(&[4], 24),
    ];
    for dtype in [DType::F32, DType::F64] {
        let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
        let name = format!("conv of a normalised map {dtype:?}");
        common::assert_same_bits(&name, &inputs, &Device::Cpu, &rebuilt, &kept);
    }
    assert_gradients(&inputs, 1e-6, rebuilt);
}

/// instance_norm_add_act (one op) against instance_norm, add and LeakyReLU: the same bits, output and every gradient
/// (x, gamma, beta and the skip), in both dtypes; finite differences agree; an activation whose derivative cannot be
/// taken from its output is refused.
#[test]
fn instance_norm_add_act_equals_the_three_ops() {
    let fused = |t: &mut Tape, x: &[Tensor]| {
        instance_norm_add_act(t, &x[0], &x[1], &x[2], IN_EPS, &x[3], Activation::LeakyRelu)
    };
    let three = |t: &mut Tape, x: &[Tensor]| {
        let y = instance_norm(t, &x[0], &x[1], &x[2], IN_EPS)?;
        let y = add(t, &y, &x[3])?;
        leaky_relu(t, &y)
    };
    // x, gamma, beta and the skip (a map of x's shape).
    let inputs = [shifted(&[2, 3, 3, 6, 5], 30), randn64(&[3], 31), randn64(&[3], 32), randn64(&[2, 3, 3, 6, 5], 33)];
    for dtype in [DType::F32, DType::F64] {
        let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
        let name = format!("instance_norm_add_act {dtype:?}");
        common::assert_same_bits(&name, &inputs, &Device::Cpu, &fused, &three);
    }
    assert_gradients(&inputs, 1e-6, fused);
    let [x, gamma, beta, skip] = &inputs;
    let err = instance_norm_add_act(&mut Tape::new(), x, gamma, beta, IN_EPS, skip, Activation::Silu).unwrap_err();
    assert!(err.to_string().contains("LeakyReLU"), "{err}");
    let wrong = randn64(&[2, 3, 3, 6, 4], 34);
    let err = instance_norm_add_act(&mut Tape::new(), x, gamma, beta, IN_EPS, &wrong, Activation::LeakyRelu);
    assert!(err.unwrap_err().to_string().contains("skip"));
}

/// A layer norm of a map's PiM sequences given as [`Partitioned`] (kept: the map; the sequences cut again in the
/// norm's backward pass) against the sequences kept: the same bits, output and every gradient, in both dtypes; and
/// finite differences agree.
#[test]
fn layer_norm_of_partitioned_sequences_rebuilds_them() {
    let rebuilt = |t: &mut Tape, x: &[Tensor]| {
        let sequences = Partitioned::new(t, &x[0], &[1, 2, 3], PimLayout::Strided)?;
        layer_norm(t, &sequences, &x[1], &x[2], LN_EPS)
    };
    let kept = |t: &mut Tape, x: &[Tensor]| {
        let sequences = partition(t, &x[0], &[1, 2, 3], PimLayout::Strided)?;
        layer_norm(t, &sequences, &x[1], &x[2], LN_EPS)
    };
    // The map (N, C, D, H, W), gamma and beta over its 4 channels.
    let inputs = [shifted(&[2, 4, 3, 4, 6], 25), randn64(&[4], 26), randn64(&[4], 27)];
    for dtype in [DType::F32, DType::F64] {
        let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
        let name = format!("layer norm of partitioned sequences {dtype:?}");
        common::assert_same_bits(&name, &inputs, &Device::Cpu, &rebuilt, &kept);
    }
    assert_gradients(&inputs, 1e-6, rebuilt);
}

#[test]
fn grad_instance_norm_2d() {
    check_instance_norm_grad(&[2, 3, 5, 7]);
}

#[test]
fn grad_instance_norm_3d() {
    check_instance_norm_grad(&[2, 3, 3, 4, 5]);
}

#[test]
fn instance_norm_forward_stats_and_values() {
    let shape = [2, 3, 3, 4, 5];
    let (x, gamma, beta) = (shifted(&shape, 21), randn64(&[3], 22), randn64(&[3], 23));
    let y = values(&instance_norm(&mut Tape::no_grad(), &x, &gamma, &beta, IN_EPS).unwrap());
    let (xs, g, b) = (values(&x), values(&gamma), values(&beta));
    let v = 3 * 4 * 5;
    for p in 0..6 {
        let c = p % 3;
        let (mx, vx) = mean_var(&xs[p * v..(p + 1) * v]);
        let (my, vy) = mean_var(&y[p * v..(p + 1) * v]);
        assert!((my - b[c]).abs() < 1e-12, "plane {p}: mean {my} vs beta {}", b[c]);
        // std(y) = |gamma| sqrt(var / (var + eps)), slightly below |gamma| because of eps.
        let expected_std = g[c].abs() * (vx / (vx + IN_EPS)).sqrt();
        assert!((vy.sqrt() - expected_std).abs() < 1e-10, "plane {p}: std {} vs {expected_std}", vy.sqrt());
        for i in 0..v {
            let naive = g[c] * (xs[p * v + i] - mx) / (vx + IN_EPS).sqrt() + b[c];
            assert!((y[p * v + i] - naive).abs() < 1e-12, "plane {p} voxel {i}: {} vs {naive}", y[p * v + i]);
        }
    }
}

/// In f32, a large common offset must not destroy the variance (as E[x^2] - E[x]^2 in f32 would).
#[test]
fn instance_norm_f32_large_offset() {
    let shape = [1, 2, 4, 6, 5];
    let x64: Vec<f64> = values(&randn64(&shape, 31)).iter().map(|v| 1000.0 + v).collect();
    // Round to f32 first so both runs see the same input.
    let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
    let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
    let (gamma, beta) = (vec![1.5, -0.5], vec![0.25, 2.0]);
    let y32 = instance_norm(
        &mut Tape::no_grad(),
        &Tensor::from_vec(x32, &shape).unwrap(),
        &Tensor::from_vec(gamma.iter().map(|&v| v as f32).collect::<Vec<f32>>(), &[2]).unwrap(),
        &Tensor::from_vec(beta.iter().map(|&v| v as f32).collect::<Vec<f32>>(), &[2]).unwrap(),
        IN_EPS,
    )
    .unwrap();
    let y64 = instance_norm(
        &mut Tape::no_grad(),
        &Tensor::from_vec(x64, &shape).unwrap(),
        &Tensor::from_vec(gamma, &[2]).unwrap(),
        &Tensor::from_vec(beta, &[2]).unwrap(),
        IN_EPS,
    )
    .unwrap();
    let err = max_abs_diff(&values(&y32), &values(&y64));
    assert!(err < 1e-5, "f32 instance norm with offset 1000 is off by {err}");
}

/// The f32 backward agrees with the f64 one, and skipping dL/dx (x not watched) leaves dgamma and dbeta unchanged.
#[test]
fn instance_norm_backward_f32_and_params_only() {
    let shape = [2, 3, 3, 5];
    let (x, gamma, beta) = (shifted(&shape, 41), randn64(&[3], 42), randn64(&[3], 43));
    let seed = randn64(&shape, 44);
    let run = |dt: DType, watch_x: bool| {
        let (x, gamma, beta, seed) = (
            x.to_dtype(dt).unwrap(),
            gamma.to_dtype(dt).unwrap(),
            beta.to_dtype(dt).unwrap(),
            seed.to_dtype(dt).unwrap(),
        );
        let mut tape = Tape::new();
        if watch_x {
            tape.watch(&x);
        }
        tape.watch(&gamma);
        tape.watch(&beta);
        let y = instance_norm(&mut tape, &x, &gamma, &beta, IN_EPS).unwrap();
        let grads = tape.backward_from(&y, seed).unwrap();
        let dx = if watch_x { values(grads.get(&x).unwrap()) } else { vec![] };
        (dx, values(grads.get(&gamma).unwrap()), values(grads.get(&beta).unwrap()))
    };
    let (dx64, dg64, db64) = run(DType::F64, true);
    let (dx32, dg32, db32) = run(DType::F32, true);
    let (dx_none, dg_only, db_only) = run(DType::F64, false);
    assert!(dx_none.is_empty());
    assert!(max_abs_diff(&dx32, &dx64) < 1e-5, "dx f32 vs f64: {}", max_abs_diff(&dx32, &dx64));
    assert!(max_abs_diff(&dg32, &dg64) < 1e-4, "dgamma f32 vs f64: {}", max_abs_diff(&dg32, &dg64));
    assert!(max_abs_diff(&db32, &db64) < 1e-4, "dbeta f32 vs f64: {}", max_abs_diff(&db32, &db64));
    assert_eq!(dg_only, dg64);
    assert_eq!(db_only, db64);
}

#[test]
fn instance_norm_rejects_wrong_gamma_length() {
    let x = randn64(&[1, 3, 4, 5], 0);
    let err = instance_norm(&mut Tape::new(), &x, &randn64(&[4], 1), &randn64(&[3], 2), IN_EPS).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("gamma") && msg.contains("[3]") && msg.contains("[4]"), "{msg}");
    let err = instance_norm(&mut Tape::new(), &x, &randn64(&[3], 1), &randn64(&[2], 2), IN_EPS).unwrap_err();
    assert!(err.to_string().contains("beta"), "{err}");
}

#[test]
fn instance_norm_rejects_non_map_and_bad_eps() {
    let err = instance_norm(&mut Tape::new(), &randn64(&[3, 4, 5], 0), &randn64(&[4], 1), &randn64(&[4], 2), IN_EPS)
        .unwrap_err();
    assert!(err.to_string().contains("instance_norm") && err.to_string().contains("[3, 4, 5]"), "{err}");
    let x = randn64(&[1, 2, 3, 3], 0);
    let err = instance_norm(&mut Tape::new(), &x, &randn64(&[2], 1), &randn64(&[2], 2), 0.0).unwrap_err();
    assert!(err.to_string().contains("eps"), "{err}");
}

#[test]
fn instance_norm_rejects_mixed_dtypes() {
    let x = randn64(&[1, 2, 3, 3], 0);
    let gamma = randn64(&[2], 1).to_dtype(DType::F32).unwrap();
    let err = instance_norm(&mut Tape::new(), &x, &gamma, &randn64(&[2], 2), IN_EPS).unwrap_err();
    assert!(err.to_string().contains("gamma"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// Layer norm

#[test]
fn grad_layer_norm() {
    let inputs = [shifted(&[3, 5, 7], 51), randn64(&[7], 52), randn64(&[7], 53)];
    assert_gradients(&inputs, 1e-6, |t, x| layer_norm(t, &x[0], &x[1], &x[2], LN_EPS));
}

#[test]
fn grad_layer_norm_rank2() {
    let inputs = [shifted(&[6, 9], 54), randn64(&[9], 55), randn64(&[9], 56)];
    assert_gradients(&inputs, 1e-6, |t, x| layer_norm(t, &x[0], &x[1], &x[2], LN_EPS));
}

#[test]
fn layer_norm_forward_stats_and_values() {
    let (g_, l, c) = (3, 5, 7);
    let (x, gamma, beta) = (shifted(&[g_, l, c], 61), randn64(&[c], 62), randn64(&[c], 63));
    let y = values(&layer_norm(&mut Tape::no_grad(), &x, &gamma, &beta, LN_EPS).unwrap());
    let (xs, g, b) = (values(&x), values(&gamma), values(&beta));
    for r in 0..g_ * l {
        let row = &xs[r * c..(r + 1) * c];
        let (m, v) = mean_var(row);
        for k in 0..c {
            let naive = g[k] * (row[k] - m) / (v + LN_EPS).sqrt() + b[k];
            assert!((y[r * c + k] - naive).abs() < 1e-12, "row {r} channel {k}: {} vs {naive}", y[r * c + k]);
        }
    }
    // With gamma = s and beta = t the same for every channel, every row has mean t and std |s| (up to eps).
    let (s, t): (f64, f64) = (-1.7, 0.6);
    let y = values(
        &layer_norm(
            &mut Tape::no_grad(),
            &x,
            &Tensor::from_vec(vec![s; c], &[c]).unwrap(),
            &Tensor::from_vec(vec![t; c], &[c]).unwrap(),
            LN_EPS,
        )
        .unwrap(),
    );
    for r in 0..g_ * l {
        let (vx, (my, vy)) = (mean_var(&xs[r * c..(r + 1) * c]).1, mean_var(&y[r * c..(r + 1) * c]));
        assert!((my - t).abs() < 1e-12, "row {r}: mean {my}");
        let expected_std = s.abs() * (vx / (vx + LN_EPS)).sqrt();
        assert!((vy.sqrt() - expected_std).abs() < 1e-9, "row {r}: std {} vs {expected_std}", vy.sqrt());
    }
    // The leading axes only enumerate rows: (G, L, C) and (G * L, C) give the same values.
    let flat = layer_norm(&mut Tape::no_grad(), &x.with_shape(&[g_ * l, c]).unwrap(), &gamma, &beta, LN_EPS).unwrap();
    let y3 = layer_norm(&mut Tape::no_grad(), &x, &gamma, &beta, LN_EPS).unwrap();
    assert_eq!(values(&flat), values(&y3));
}

#[test]
fn layer_norm_rejects_wrong_gamma_length() {
    let x = randn64(&[2, 3, 5], 0);
    let err = layer_norm(&mut Tape::new(), &x, &randn64(&[3], 1), &randn64(&[5], 2), LN_EPS).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("layer_norm gamma") && msg.contains("[5]") && msg.contains("[3]"), "{msg}");
}

// ---------------------------------------------------------------------------------------------------------------
// Average pooling

/// Average pooling written per output voxel, with explicit window bounds.
fn naive_avg_pool(x: &[f64], n_c: usize, s: [usize; 3], k: [usize; 3]) -> Vec<f64> {
    let o: Vec<usize> = (0..3).map(|a| s[a].div_ceil(k[a])).collect();
    let mut out = Vec::new();
    for p in 0..n_c {
        for od in 0..o[0] {
            for oh in 0..o[1] {
                for ow in 0..o[2] {
                    let (mut sum, mut count) = (0.0, 0);
                    for id in od * k[0]..((od + 1) * k[0]).min(s[0]) {
                        for ih in oh * k[1]..((oh + 1) * k[1]).min(s[1]) {
                            for iw in ow * k[2]..((ow + 1) * k[2]).min(s[2]) {
                                sum += x[p * s[0] * s[1] * s[2] + (id * s[1] + ih) * s[2] + iw];
                                count += 1;
                            }
                        }
                    }
                    out.push(sum / count as f64);
                }
            }
        }
    }
    out
}

#[test]
fn grad_avg_pool_3d() {
    assert_gradients(&[randn64(&[2, 2, 4, 4, 6], 71)], 1e-6, |t, x| avg_pool(t, &x[0], &[2, 2, 2]));
}

#[test]
fn grad_avg_pool_3d_ragged() {
    assert_gradients(&[randn64(&[1, 2, 5, 7, 3], 72)], 1e-6, |t, x| avg_pool(t, &x[0], &[2, 2, 2]));
}

#[test]
fn grad_avg_pool_3d_anisotropic_ragged() {
    assert_gradients(&[randn64(&[2, 2, 3, 5, 7], 73)], 1e-6, |t, x| avg_pool(t, &x[0], &[1, 2, 2]));
}

#[test]
fn grad_avg_pool_2d_ragged() {
    assert_gradients(&[randn64(&[2, 3, 5, 7], 74)], 1e-6, |t, x| avg_pool(t, &x[0], &[2, 2]));
}

#[test]
fn avg_pool_hand_worked_2d_ragged() {
    // 3 x 5 map 0..15 pooled by 2 x 2 -> 2 x 3; the last column and row are short windows.
    let x = Tensor::from_vec((0..15).map(|v| v as f64).collect::<Vec<f64>>(), &[1, 1, 3, 5]).unwrap();
    let y = avg_pool(&mut Tape::no_grad(), &x, &[2, 2]).unwrap();
    assert_eq!(y.shape(), &[1, 1, 2, 3]);
    // (0+1+5+6)/4, (2+3+7+8)/4, (4+9)/2, (10+11)/2, (12+13)/2, 14/1
    assert_eq!(values(&y), vec![3.0, 5.0, 6.5, 10.5, 12.5, 14.0]);
}

#[test]
fn avg_pool_hand_worked_3d_ragged() {
    // D = 3, H = 1, W = 2 pooled by [2, 1, 2]: windows {1, 2, 3, 4} and {5, 6}.
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 1, 3, 1, 2]).unwrap();
    let y = avg_pool(&mut Tape::no_grad(), &x, &[2, 1, 2]).unwrap();
    assert_eq!(y.shape(), &[1, 1, 2, 1, 1]);
    assert_eq!(values(&y), vec![2.5, 5.5]);
}

#[test]
fn avg_pool_matches_naive() {
    for (shape, k) in [
        (vec![2, 3, 5, 7, 3], [2, 2, 2]),
        (vec![1, 2, 3, 5, 7], [1, 2, 2]),
        (vec![1, 2, 4, 8, 8], [4, 4, 4]),
        (vec![1, 1, 2, 3, 2], [3, 5, 3]),
    ] {
        let x = randn64(&shape, 75);
        let y = avg_pool(&mut Tape::no_grad(), &x, &k).unwrap();
        let expected = naive_avg_pool(&values(&x), shape[0] * shape[1], [shape[2], shape[3], shape[4]], k);
        assert!(max_abs_diff(&values(&y), &expected) < 1e-14, "shape {shape:?} factor {k:?}");
        // The 2D op is the 3D op with D = 1.
        let x2 = randn64(&shape[..4], 76);
        let y2 = avg_pool(&mut Tape::no_grad(), &x2, &k[1..]).unwrap();
        let expected2 = naive_avg_pool(&values(&x2), shape[0] * shape[1], [1, shape[2], shape[3]], [1, k[1], k[2]]);
        assert!(max_abs_diff(&values(&y2), &expected2) < 1e-14, "2D shape {:?} factor {:?}", &shape[..4], &k[1..]);
    }
}

#[test]
fn avg_pool_f32_matches_f64() {
    let x = randn64(&[2, 3, 5, 6, 7], 77);
    let y64 = values(&avg_pool(&mut Tape::no_grad(), &x, &[2, 2, 2]).unwrap());
    let y32 = values(&avg_pool(&mut Tape::no_grad(), &x.to_dtype(DType::F32).unwrap(), &[2, 2, 2]).unwrap());
    assert!(max_abs_diff(&y32, &y64) < 1e-6);
}

#[test]
fn avg_pool_rejects_bad_factors() {
    let x = randn64(&[1, 2, 3, 4, 5], 0);
    let err = avg_pool(&mut Tape::new(), &x, &[2, 2]).unwrap_err();
    assert!(err.to_string().contains("avg_pool factor") && err.to_string().contains("3 spatial axes"), "{err}");
    let err = avg_pool(&mut Tape::new(), &x, &[2, 0, 2]).unwrap_err();
    assert!(err.to_string().contains("avg_pool factor") && err.to_string().contains("positive"), "{err}");
    let err = avg_pool(&mut Tape::new(), &randn64(&[2, 3, 4], 0), &[2]).unwrap_err();
    assert!(err.to_string().contains("avg_pool") && err.to_string().contains("[2, 3, 4]"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// Nearest upsampling

#[test]
fn grad_upsample_3d() {
    assert_gradients(&[randn64(&[1, 2, 3, 2, 3], 81)], 1e-6, |t, x| upsample_nearest(t, &x[0], &[2, 2, 2]));
}

#[test]
fn grad_upsample_3d_anisotropic() {
    assert_gradients(&[randn64(&[2, 2, 3, 3, 5], 82)], 1e-6, |t, x| upsample_nearest(t, &x[0], &[1, 2, 2]));
}

#[test]
fn grad_upsample_2d() {
    assert_gradients(&[randn64(&[2, 3, 3, 5], 83)], 1e-6, |t, x| upsample_nearest(t, &x[0], &[3, 2]));
}

#[test]
fn upsample_hand_worked_2d() {
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2]).unwrap();
    let y = upsample_nearest(&mut Tape::no_grad(), &x, &[3, 2]).unwrap();
    assert_eq!(y.shape(), &[1, 1, 6, 4]);
    #[rustfmt::skip]
    let expected = vec![
        1.0, 1.0, 2.0, 2.0,
        1.0, 1.0, 2.0, 2.0,
        1.0, 1.0, 2.0, 2.0,
        3.0, 3.0, 4.0, 4.0,
        3.0, 3.0, 4.0, 4.0,
        3.0, 3.0, 4.0, 4.0,
    ];
    assert_eq!(values(&y), expected);
}

#[test]
fn upsample_matches_index_formula() {
    let (shape, f) = ([2, 3, 2, 3, 4], [3, 1, 2]);
    let x = randn64(&shape, 84);
    let y = upsample_nearest(&mut Tape::no_grad(), &x, &f).unwrap();
    let out = [shape[2] * f[0], shape[3] * f[1], shape[4] * f[2]];
    assert_eq!(y.shape(), &[2, 3, out[0], out[1], out[2]]);
    let (xs, ys) = (values(&x), values(&y));
    let vin = shape[2] * shape[3] * shape[4];
    let mut i = 0;
    for p in 0..6 {
        for d in 0..out[0] {
            for h in 0..out[1] {
                for w in 0..out[2] {
                    let src = p * vin + ((d / f[0]) * shape[3] + h / f[1]) * shape[4] + w / f[2];
                    assert_eq!(ys[i], xs[src], "plane {p} at ({d}, {h}, {w})");
                    i += 1;
                }
            }
        }
    }
}

/// avg_pool(upsample(x, f), f) = x, and for a map that is constant on f-blocks, upsample(avg_pool(z, f), f) = z.
#[test]
fn upsample_avg_pool_identities() {
    for (shape, f) in
        [(vec![2, 3, 3, 2, 3], vec![2, 2, 2]), (vec![1, 2, 3, 3, 5], vec![1, 2, 2]), (vec![2, 3, 3, 5], vec![3, 2])]
    {
        let x = randn64(&shape, 85);
        let z = upsample_nearest(&mut Tape::no_grad(), &x, &f).unwrap();
        let back = avg_pool(&mut Tape::no_grad(), &z, &f).unwrap();
        assert_eq!(back.shape(), x.shape());
        assert!(max_abs_diff(&values(&back), &values(&x)) < 1e-14, "pool(up(x)) != x for {shape:?} {f:?}");
        let again = upsample_nearest(&mut Tape::no_grad(), &back, &f).unwrap();
        assert!(max_abs_diff(&values(&again), &values(&z)) < 1e-14, "up(pool(z)) != z for {shape:?} {f:?}");
    }
    // Where the factor divides the size, pooling keeps the mean of the whole map.
    let x = randn64(&[1, 1, 4, 6, 8], 86);
    let y = avg_pool(&mut Tape::no_grad(), &x, &[2, 3, 4]).unwrap();
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    assert!((mean(values(&x)) - mean(values(&y))).abs() < 1e-14);
}

#[test]
fn upsample_rejects_bad_factors() {
    let x = randn64(&[1, 2, 3, 4], 0);
    let err = upsample_nearest(&mut Tape::new(), &x, &[2, 2, 2]).unwrap_err();
    assert!(err.to_string().contains("upsample_nearest factor") && err.to_string().contains("2 spatial axes"), "{err}");
    let err = upsample_nearest(&mut Tape::new(), &x, &[0, 2]).unwrap_err();
    assert!(err.to_string().contains("positive"), "{err}");
}
