//! Convolution and transposed convolution: gradient checks (input, weight and bias together), forward values
//! against direct sums written here, and shape errors. The shape errors, output sizes, a hand-worked transposed
//! convolution and run-to-run determinism are device tests (`common::device_test!`): `NAME::cpu` here, `NAME::gpu`
//! (and `NAME::tf32`) with `cargo test --release --test grad_conv -- --ignored` on a GPU machine.

use lkm_engine::autograd::gradcheck::{assert_gradients, randn64};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::conv::conv;
use lkm_engine::ops::conv_transpose::conv_transpose;
use lkm_engine::DType;

mod common;
use common::{assert_close, assert_conv_repeats, device_test, randn_on, tensor_on};

/// Gradient check of conv for input shape `x`, weight shape `w` and `stride`, with or without bias.
fn check_conv(x: &[usize], w: &[usize], stride: &[usize], with_bias: bool, seed: u64) {
    let mut inputs = vec![randn64(x, seed), randn64(w, seed + 1)];
    if with_bias {
        inputs.push(randn64(&[w[0]], seed + 2));
    }
    let stride = stride.to_vec();
    assert_gradients(&inputs, 1e-6, |t, v| conv(t, &v[0], &v[1], v.get(2), &stride));
}

/// Gradient check of conv_transpose for input shape `x` and weight shape `w`, with or without bias.
fn check_conv_transpose(x: &[usize], w: &[usize], with_bias: bool, seed: u64) {
    let mut inputs = vec![randn64(x, seed), randn64(w, seed + 1)];
    if with_bias {
        inputs.push(randn64(&[w[1]], seed + 2));
    }
    assert_gradients(&inputs, 1e-6, |t, v| conv_transpose(t, &v[0], &v[1], v.get(2)));
}

#[test]
fn grad_conv2d_k3() {
    check_conv(&[2, 3, 5, 7], &[4, 3, 3, 3], &[1, 1], true, 10);
}

#[test]
fn grad_conv2d_stride2() {
    check_conv(&[2, 3, 5, 7], &[4, 3, 3, 3], &[2, 2], true, 11);
}

#[test]
fn grad_conv2d_stride21_no_bias() {
    check_conv(&[2, 3, 7, 5], &[2, 3, 3, 3], &[2, 1], false, 12);
}

#[test]
fn grad_conv2d_k1() {
    check_conv(&[2, 3, 5, 7], &[4, 3, 1, 1], &[1, 1], false, 13);
}

#[test]
fn grad_conv2d_k1_stride2() {
    check_conv(&[2, 3, 5, 7], &[4, 3, 1, 1], &[2, 2], true, 14);
}

#[test]
fn grad_conv2d_k53_stride3() {
    // A non-square kernel wider than the stride-3 step, so taps overlap and both edges are ragged.
    check_conv(&[1, 2, 8, 7], &[3, 2, 5, 3], &[3, 3], true, 15);
}

#[test]
fn grad_conv2d_stride_beyond_size() {
    // Strides larger than the map (and a kernel larger than the map): one output per axis, most taps in padding.
    check_conv(&[2, 2, 2, 3], &[3, 2, 5, 5], &[3, 4], true, 16);
}

#[test]
fn grad_conv3d_k3() {
    check_conv(&[2, 3, 5, 6, 7], &[4, 3, 3, 3, 3], &[1, 1, 1], true, 20);
}

#[test]
fn grad_conv3d_stride2() {
    check_conv(&[2, 3, 5, 6, 7], &[4, 3, 3, 3, 3], &[2, 2, 2], true, 21);
}

#[test]
fn grad_conv3d_stride2_no_bias() {
    check_conv(&[1, 2, 5, 5, 7], &[3, 2, 3, 3, 3], &[2, 2, 2], false, 22);
}

#[test]
fn grad_conv3d_k133() {
    check_conv(&[2, 3, 5, 6, 7], &[4, 3, 1, 3, 3], &[1, 1, 1], false, 23);
}

#[test]
fn grad_conv3d_k133_stride122() {
    check_conv(&[2, 3, 5, 6, 7], &[4, 3, 1, 3, 3], &[1, 2, 2], true, 24);
}

#[test]
fn grad_conv3d_k3_stride122() {
    check_conv(&[2, 3, 5, 5, 7], &[2, 3, 3, 3, 3], &[1, 2, 2], true, 25);
}

#[test]
fn grad_conv3d_k1() {
    check_conv(&[2, 3, 5, 6, 7], &[4, 3, 1, 1, 1], &[1, 1, 1], false, 26);
}

#[test]
fn grad_conv3d_k1_stride2() {
    check_conv(&[2, 3, 5, 6, 7], &[4, 3, 1, 1, 1], &[2, 2, 2], true, 27);
}

#[test]
fn grad_conv_transpose2d() {
    check_conv_transpose(&[2, 4, 3, 5], &[4, 3, 2, 2], true, 30);
}

#[test]
fn grad_conv_transpose2d_no_bias() {
    check_conv_transpose(&[2, 3, 5, 3], &[3, 2, 2, 2], false, 31);
}

#[test]
fn grad_conv_transpose3d() {
    check_conv_transpose(&[2, 4, 3, 3, 5], &[4, 3, 2, 2, 2], true, 32);
}

#[test]
fn grad_conv_transpose3d_k122() {
    check_conv_transpose(&[2, 4, 3, 5, 3], &[4, 3, 1, 2, 2], true, 33);
}

/// PyTorch Conv3d with padding k/2, written as the definition: every output position, every tap, and an explicit
/// bounds test on the input index. Shapes are 5D; 2D cases pass depth 1.
fn naive_conv3d(
    x: &[f64],
    xs: [usize; 5],
    w: &[f64],
    ws: [usize; 5],
    b: Option<&[f64]>,
    st: [usize; 3],
) -> (Vec<f64>, [usize; 5]) {
    let [n, cin, d, h, wd] = xs;
    let [cout, _, kd, kh, kw] = ws;
    let (pd, ph, pw) = ((kd / 2) as isize, (kh / 2) as isize, (kw / 2) as isize);
    let od = (d + 2 * (kd / 2) - kd) / st[0] + 1;
    let oh = (h + 2 * (kh / 2) - kh) / st[1] + 1;
    let ow = (wd + 2 * (kw / 2) - kw) / st[2] + 1;
    let mut y = vec![0.0; n * cout * od * oh * ow];
    let xi = |ni: usize, c: usize, z: usize, r: usize, q: usize| (((ni * cin + c) * d + z) * h + r) * wd + q;
    let wi = |o: usize, c: usize, a: usize, bb: usize, cc: usize| (((o * cin + c) * kd + a) * kh + bb) * kw + cc;
    let mut idx = 0;
    for ni in 0..n {
        for o in 0..cout {
            for z in 0..od {
                for r in 0..oh {
                    for q in 0..ow {
                        let mut acc = b.map_or(0.0, |b| b[o]);
                        for c in 0..cin {
                            for a in 0..kd {
                                for bb in 0..kh {
                                    for cc in 0..kw {
                                        let iz = (z * st[0] + a) as isize - pd;
                                        let ir = (r * st[1] + bb) as isize - ph;
                                        let iq = (q * st[2] + cc) as isize - pw;
                                        if iz < 0 || ir < 0 || iq < 0 {
                                            continue;
                                        }
                                        let (iz, ir, iq) = (iz as usize, ir as usize, iq as usize);
                                        if iz >= d || ir >= h || iq >= wd {
                                            continue;
                                        }
                                        acc += w[wi(o, c, a, bb, cc)] * x[xi(ni, c, iz, ir, iq)];
                                    }
                                }
                            }
                        }
                        y[idx] = acc;
                        idx += 1;
                    }
                }
            }
        }
    }
    (y, [n, cout, od, oh, ow])
}

/// conv against `naive_conv3d` for one configuration (2D when `x` has 4 axes).
fn check_conv_forward(x: &[usize], w: &[usize], stride: &[usize], with_bias: bool, seed: u64) {
    let (xt, wt, bt) = (randn64(x, seed), randn64(w, seed + 1), randn64(&[w[0]], seed + 2));
    let bias = with_bias.then_some(&bt);
    let y = conv(&mut Tape::new(), &xt, &wt, bias, stride).unwrap();
    let five = |s: &[usize]| -> [usize; 5] {
        if s.len() == 4 {
            [s[0], s[1], 1, s[2], s[3]]
        } else {
            [s[0], s[1], s[2], s[3], s[4]]
        }
    };
    let st = if stride.len() == 2 { [1, stride[0], stride[1]] } else { [stride[0], stride[1], stride[2]] };
    let bv = bt.to_vec_f64().unwrap();
    let (want, ys) = naive_conv3d(
        &xt.to_vec_f64().unwrap(),
        five(x),
        &wt.to_vec_f64().unwrap(),
        five(w),
        with_bias.then_some(&bv[..]),
        st,
    );
    let want_shape: Vec<usize> = if x.len() == 4 { vec![ys[0], ys[1], ys[3], ys[4]] } else { ys.to_vec() };
    assert_eq!(y.shape(), &want_shape[..], "conv {x:?} * {w:?} stride {stride:?}: output shape");
    assert_close(&format!("conv {x:?} * {w:?} stride {stride:?}"), &y.to_vec_f64().unwrap(), &want, 1e-12, 1e-12);
}

#[test]
fn conv_forward_matches_direct_sum() {
    check_conv_forward(&[2, 3, 5, 7], &[4, 3, 3, 3], &[1, 1], true, 40);
    check_conv_forward(&[2, 3, 5, 7], &[4, 3, 3, 3], &[2, 2], false, 41);
    check_conv_forward(&[1, 2, 8, 9], &[3, 2, 5, 3], &[3, 2], true, 42);
    check_conv_forward(&[1, 2, 4, 4], &[2, 2, 7, 7], &[1, 1], true, 43); // kernel larger than the map
    check_conv_forward(&[2, 3, 5, 6, 7], &[4, 3, 3, 3, 3], &[1, 1, 1], true, 44);
    check_conv_forward(&[2, 3, 5, 6, 7], &[4, 3, 3, 3, 3], &[2, 2, 2], true, 45);
    check_conv_forward(&[2, 3, 5, 6, 7], &[4, 3, 1, 3, 3], &[1, 2, 2], false, 46);
    check_conv_forward(&[2, 3, 5, 6, 7], &[4, 3, 1, 1, 1], &[2, 2, 2], true, 47);
    check_conv_forward(&[1, 1, 1, 1, 1], &[2, 1, 3, 3, 3], &[2, 2, 2], true, 48);
}

fn conv_output_sizes_match_pytorch(dev: &Device) {
    // floor((I + 2 (k/2) - k) / s) + 1: 5 -> 3 and 7 -> 4 at stride 2; 6 -> 2 at stride 3.
    let x = randn_on(dev, &[1, 1, 5, 7, 6], 1.0, 0);
    let y = conv(&mut Tape::new(), &x, &randn_on(dev, &[2, 1, 3, 3, 3], 1.0, 1), None, &[2, 2, 3]).unwrap();
    assert_eq!(y.shape(), &[1, 2, 3, 4, 2]);
    assert!(y.device().same(dev), "the output is on {:?}", y.device());
}
device_test!(conv_output_sizes_match_pytorch);

/// The reductions run in a fixed order (on the GPU no atomics, split-K slices summed in order, in both maths): two
/// runs of a conv's forward and backward give the same bits.
fn conv_twice_same_bits(dev: &Device) {
    let x = randn_on(dev, &[2, 33, 9, 19, 23], 1.0, 400);
    let w = randn_on(dev, &[37, 33, 3, 3, 3], 0.3, 401);
    let seed = randn_on(dev, &[2, 37, 9, 19, 23], 1.0, 402);
    assert_conv_repeats("conv3d 3x3x3 33 -> 37", &x, &w, &seed);
}
device_test!(conv_twice_same_bits, tf32);

#[test]
fn conv_f32_matches_f64() {
    let (x, w, b) = (randn64(&[2, 3, 5, 6, 7], 50), randn64(&[4, 3, 3, 3, 3], 51), randn64(&[4], 52));
    let y64 = conv(&mut Tape::new(), &x, &w, Some(&b), &[1, 2, 2]).unwrap().to_vec_f64().unwrap();
    let [x32, w32, b32] = [&x, &w, &b].map(|t| t.to_dtype(DType::F32).unwrap());
    let y32 = conv(&mut Tape::new(), &x32, &w32, Some(&b32), &[1, 2, 2]).unwrap();
    assert_eq!(y32.dtype(), DType::F32);
    assert_close("conv f32 vs f64", &y32.to_vec_f64().unwrap(), &y64, 1e-5, 1e-5);
}

fn conv_transpose_hand_worked(dev: &Device) {
    // Cin 2, Cout 1, kernel 2x2, one row of two pixels: each input pixel i becomes the 2x2 block at columns
    // 2i..2i+2 with value 0.5 + x0[i] w0 + x1[i] w1.
    //   x0 = [1, 2], x1 = [3, -1], w0 = [[1, 2], [3, 4]], w1 = [[0, 1], [-1, 2]]
    //   i = 0: [[1+0, 2+3], [3-3, 4+6]] = [[1, 5], [0, 10]]   i = 1: [[2-0, 4-1], [6+1, 8-2]] = [[2, 3], [7, 6]]
    // Every value is a small multiple of 1/2: exact in float32 and in tf32 (10 mantissa bits).
    let x = tensor_on(dev, vec![1.0, 2.0, 3.0, -1.0], &[1, 2, 1, 2]);
    let w = tensor_on(dev, vec![1.0, 2.0, 3.0, 4.0, 0.0, 1.0, -1.0, 2.0], &[2, 1, 2, 2]);
    let b = tensor_on(dev, vec![0.5], &[1]);
    let y = conv_transpose(&mut Tape::new(), &x, &w, Some(&b)).unwrap();
    assert_eq!(y.shape(), &[1, 1, 2, 4]);
    assert_eq!(y.to_vec_f64().unwrap(), vec![1.5, 5.5, 2.5, 3.5, 0.5, 10.5, 7.5, 6.5]);
}
device_test!(conv_transpose_hand_worked, tf32);

#[test]
fn conv_transpose3d_matches_direct_sum() {
    // Scatter form of the definition: every input voxel adds x * w[ci, co, :, :, :] into its output block.
    let (n, cin, cout, [d, h, wd], [kd, kh, kw]) = (2, 3, 2, [3, 2, 5], [1, 2, 2]);
    let (x, w, b) = (randn64(&[n, cin, d, h, wd], 60), randn64(&[cin, cout, kd, kh, kw], 61), randn64(&[cout], 62));
    let y = conv_transpose(&mut Tape::new(), &x, &w, Some(&b)).unwrap();
    let (od, oh, ow) = (d * kd, h * kh, wd * kw);
    assert_eq!(y.shape(), &[n, cout, od, oh, ow]);
    let (xv, wv, bv) = (x.to_vec_f64().unwrap(), w.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    let mut want = vec![0.0; n * cout * od * oh * ow];
    for ni in 0..n {
        for o in 0..cout {
            for p in 0..od * oh * ow {
                want[(ni * cout + o) * od * oh * ow + p] = bv[o];
            }
        }
    }
    for ni in 0..n {
        for c in 0..cin {
            for z in 0..d {
                for r in 0..h {
                    for q in 0..wd {
                        let xval = xv[(((ni * cin + c) * d + z) * h + r) * wd + q];
                        for o in 0..cout {
                            for a in 0..kd {
                                for bb in 0..kh {
                                    for cc in 0..kw {
                                        let wval = wv[(((c * cout + o) * kd + a) * kh + bb) * kw + cc];
                                        let (yz, yr, yq) = (z * kd + a, r * kh + bb, q * kw + cc);
                                        want[(((ni * cout + o) * od + yz) * oh + yr) * ow + yq] += xval * wval;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert_close("conv_transpose3d", &y.to_vec_f64().unwrap(), &want, 1e-12, 1e-12);
}

/// The message of conv's error on float32 operands of these shapes on `dev`: the same checks run before either
/// device's kernels, so both refuse alike.
fn conv_err(dev: &Device, x: &[usize], w: &[usize], bias: Option<&[usize]>, stride: &[usize]) -> String {
    let b = bias.map(|s| randn_on(dev, s, 1.0, 2));
    let (x, w) = (randn_on(dev, x, 1.0, 0), randn_on(dev, w, 1.0, 1));
    conv(&mut Tape::new(), &x, &w, b.as_ref(), stride).unwrap_err().to_string()
}

fn conv_rejects_channel_mismatch(dev: &Device) {
    let err = conv_err(dev, &[1, 3, 5, 5], &[4, 2, 3, 3], None, &[1, 1]);
    assert!(err.contains("input channels") && err.contains("[4, 2, 3, 3]"), "{err}");
}
device_test!(conv_rejects_channel_mismatch);

fn conv_rejects_even_kernel(dev: &Device) {
    let err = conv_err(dev, &[1, 3, 5, 5, 5], &[4, 3, 3, 2, 3], None, &[1, 1, 1]);
    assert!(err.contains("odd") && err.contains("[4, 3, 3, 2, 3]"), "{err}");
}
device_test!(conv_rejects_even_kernel);

fn conv_rejects_wrong_stride_count(dev: &Device) {
    let err = conv_err(dev, &[1, 3, 5, 5, 5], &[4, 3, 3, 3, 3], None, &[2, 2]);
    assert!(err.contains("conv stride") && err.contains("3 spatial axes"), "{err}");
    let err = conv_err(dev, &[1, 3, 5, 5], &[4, 3, 3, 3], None, &[1, 0]);
    assert!(err.contains("conv stride") && err.contains("positive"), "{err}");
}
device_test!(conv_rejects_wrong_stride_count);

fn conv_rejects_rank_mismatch(dev: &Device) {
    let err = conv_err(dev, &[1, 3, 5, 5], &[4, 3, 3, 3, 3], None, &[1, 1]);
    assert!(err.contains("rank") && err.contains("[4, 3, 3, 3, 3]"), "{err}");
    let err = conv_err(dev, &[3, 5, 5], &[4, 3, 3, 3], None, &[1, 1]);
    assert!(err.contains("feature map") && err.contains("[3, 5, 5]"), "{err}");
}
device_test!(conv_rejects_rank_mismatch);

fn conv_rejects_bad_bias(dev: &Device) {
    let err = conv_err(dev, &[1, 3, 5, 5], &[4, 3, 3, 3], Some(&[3]), &[1, 1]);
    assert!(err.contains("conv bias") && err.contains("[4]"), "{err}");
}
device_test!(conv_rejects_bad_bias);

#[test]
fn conv_rejects_mixed_dtypes() {
    let x = randn64(&[1, 3, 5, 5], 0).to_dtype(DType::F32).unwrap();
    let err = conv(&mut Tape::new(), &x, &randn64(&[4, 3, 3, 3], 1), None, &[1, 1]).unwrap_err().to_string();
    assert!(err.contains("conv") && err.contains("F64"), "{err}");
}

/// As [`conv_err`], for conv_transpose.
fn conv_transpose_err(dev: &Device, x: &[usize], w: &[usize], bias: Option<&[usize]>) -> String {
    let b = bias.map(|s| randn_on(dev, s, 1.0, 2));
    let (x, w) = (randn_on(dev, x, 1.0, 0), randn_on(dev, w, 1.0, 1));
    conv_transpose(&mut Tape::new(), &x, &w, b.as_ref()).unwrap_err().to_string()
}

fn conv_transpose_rejects_bad_shapes(dev: &Device) {
    let err = conv_transpose_err(dev, &[1, 3, 4, 4], &[2, 4, 2, 2], None);
    assert!(err.contains("input channels") && err.contains("[2, 4, 2, 2]"), "{err}");
    let err = conv_transpose_err(dev, &[1, 3, 4, 4, 4], &[3, 4, 2, 2], None);
    assert!(err.contains("rank") && err.contains("[3, 4, 2, 2]"), "{err}");
    let err = conv_transpose_err(dev, &[1, 3, 4, 4], &[3, 4, 2, 2], Some(&[3]));
    assert!(err.contains("conv_transpose bias") && err.contains("[4]"), "{err}");
}
device_test!(conv_transpose_rejects_bad_shapes);
