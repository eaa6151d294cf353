//! Gradient and forward checks of the Mamba block's ops: linear, causal depthwise conv1d and the selective scan.

use lkm_engine::autograd::gradcheck::{assert_gradients, randn64};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::activation::silu;
use lkm_engine::ops::causal_conv1d::{causal_conv1d, causal_conv1d_silu};
use lkm_engine::ops::flip::Order;
use lkm_engine::ops::linear::{linear, Product};
use lkm_engine::ops::operand::Operand;
use lkm_engine::ops::selective_scan::{selective_scan, Columns, ScanInputs};
use lkm_engine::{DType, Tensor};

mod common;
use common::mamba::{on_flipped, projected_scan, projected_scan_inputs, scan, scan_reversed, SCAN_TOKENS};
use common::{assert_close, assert_rel_err, device_test, seeded_step};

/// `f(randn)` elementwise, as a new f64 tensor.
fn randn_map(shape: &[usize], seed: u64, f: impl Fn(usize, f64) -> f64) -> Tensor {
    let v: Vec<f64> =
        randn64(shape, seed).to_vec_f64().unwrap().into_iter().enumerate().map(|(i, x)| f(i, x)).collect();
    Tensor::from_vec(v, shape).unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// linear

#[test]
fn grad_linear_bias() {
    // Cin = 11 exercises both the 8-wide blocks and the tail of the dot product.
    let inputs = [randn64(&[2, 3, 11], 1), randn64(&[4, 11], 2), randn64(&[4], 3)];
    assert_gradients(&inputs, 1e-6, |t, x| linear(t, &x[0], &x[1], Some(&x[2])));
}

#[test]
fn grad_linear_no_bias() {
    let inputs = [randn64(&[3, 5, 7], 4), randn64(&[5, 7], 5)];
    assert_gradients(&inputs, 1e-6, |t, x| linear(t, &x[0], &x[1], None));
}

#[test]
fn linear_forward_matches_naive() {
    let (x, w, b) = (randn64(&[3, 4, 19], 6), randn64(&[6, 19], 7), randn64(&[6], 8));
    let (xv, wv, bv) = (x.to_vec_f64().unwrap(), w.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    let mut want = vec![0.0; 12 * 6];
    for i in 0..12 {
        for j in 0..6 {
            let mut s = bv[j];
            for k in 0..19 {
                s += xv[i * 19 + k] * wv[j * 19 + k];
            }
            want[i * 6 + j] = s;
        }
    }
    let y = linear(&mut Tape::new(), &x, &w, Some(&b)).unwrap();
    assert_eq!(y.shape(), &[3, 4, 6]);
    assert_close("linear f64", &y.to_vec_f64().unwrap(), &want, 1e-12, 1e-12);
    // The float32 path against the same float64 reference.
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let y32 = linear(&mut Tape::new(), &f(&x), &f(&w), Some(&f(&b))).unwrap();
    assert_eq!(y32.dtype(), DType::F32);
    assert_close("linear f32", &y32.to_vec_f64().unwrap(), &want, 1e-5, 1e-5);
}

#[test]
fn linear_rejects_wrong_cin() {
    // An x_proj-style weight whose input size does not match the tokens' channels.
    let err = linear(&mut Tape::new(), &randn64(&[2, 5, 8], 0), &randn64(&[6, 7], 0), None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("linear") && msg.contains("Cin = 8") && msg.contains("[6, 7]"), "{msg}");
}

#[test]
fn linear_rejects_wrong_bias_and_rank1() {
    let err = linear(&mut Tape::new(), &randn64(&[2, 8], 0), &randn64(&[6, 8], 0), Some(&randn64(&[5], 0)));
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains("bias") && msg.contains("[6]") && msg.contains("[5]"), "{msg}");
    let msg = linear(&mut Tape::new(), &randn64(&[8], 0), &randn64(&[6, 8], 0), None).unwrap_err().to_string();
    assert!(msg.contains("rank >= 2"), "{msg}");
}

// ---------------------------------------------------------------------------------------------------------------
// causal_conv1d

#[test]
fn grad_causal_conv1d() {
    let inputs = [randn64(&[2, 7, 3], 10), randn64(&[3, 4], 11), randn64(&[3], 12)];
    assert_gradients(&inputs, 1e-6, |t, x| causal_conv1d(t, &x[0], &x[1], &x[2]));
}

#[test]
fn grad_causal_conv1d_shorter_than_kernel() {
    // L = 2 < K = 4: every output reads padding.
    let inputs = [randn64(&[3, 2, 5], 13), randn64(&[5, 4], 14), randn64(&[5], 15)];
    assert_gradients(&inputs, 1e-6, |t, x| causal_conv1d(t, &x[0], &x[1], &x[2]));
}

#[test]
fn grad_causal_conv1d_silu() {
    // The fused op's backward recomputes the conv's output; L = 2 < K reads padding.
    for (shape, seed) in [([2, 7, 3], 16), ([3, 2, 5], 19)] {
        let c = shape[2];
        let inputs = [randn64(&shape, seed), randn64(&[c, 4], seed + 1), randn64(&[c], seed + 2)];
        assert_gradients(&inputs, 1e-6, |t, x| {
            causal_conv1d_silu(t, Operand::Tensor(&x[0]), &x[1], &x[2], Order::Stored)
        });
    }
}

#[test]
fn causal_conv1d_silu_of_a_product_rebuilds_it() {
    // x = v w^T given as the product (kept: v and w, x rebuilt in the backward pass) against x made by linear and kept:
    // the same bits, output and every gradient; and finite differences agree.
    let inputs = [randn64(&[3, 11, 5], 26), randn64(&[6, 5], 27), randn64(&[6, 4], 28), randn64(&[6], 29)];
    let all = [true; 4];
    let product = |t: &mut Tape, x: &[Tensor]| {
        let made = Product::new(t, &x[0], &x[1])?;
        causal_conv1d_silu(t, Operand::Product(&made), &x[2], &x[3], Order::Stored)
    };
    let kept = |t: &mut Tape, x: &[Tensor]| {
        let made = linear(t, &x[0], &x[1], None)?;
        causal_conv1d_silu(t, Operand::Tensor(&made), &x[2], &x[3], Order::Stored)
    };
    assert_eq!(
        seeded_step("product", &inputs, &all, &Device::Cpu, &product),
        seeded_step("kept", &inputs, &all, &Device::Cpu, &kept)
    );
    assert_gradients(&inputs, 1e-6, product);
}

#[test]
fn causal_conv1d_silu_is_silu_of_the_conv() {
    // One op against the two, forward and every gradient, in float64 (the same arithmetic up to rounding).
    let inputs = [randn64(&[3, 11, 6], 22), randn64(&[6, 4], 23), randn64(&[6], 24)];
    let all = [true; 3];
    let fused = seeded_step("fused", &inputs, &all, &Device::Cpu, &|t, x| {
        causal_conv1d_silu(t, Operand::Tensor(&x[0]), &x[1], &x[2], Order::Stored)
    });
    let two = seeded_step("two ops", &inputs, &all, &Device::Cpu, &|t, x| {
        let y = causal_conv1d(t, &x[0], &x[1], &x[2])?;
        silu(t, &y)
    });
    assert_close("output", &fused.0, &two.0, 1e-12, 1e-12);
    for (i, (a, b)) in fused.1.iter().zip(&two.1).enumerate() {
        assert_close(&format!("gradient of input {i}"), a.as_ref().unwrap(), b.as_ref().unwrap(), 1e-12, 1e-12);
    }
}

#[test]
fn causal_conv1d_forward_hand_worked() {
    // G = 1, L = 3, C = 2, K = 3. Channel 0 reads 1, 2, 3 with taps (1, 10, 100) oldest first, bias 0.5;
    // channel 1 reads 10, 20, 30 with taps (0.5, -1, 2), bias -1:
    //   c0: t0 = 0.5 + 100*1 = 100.5, t1 = 0.5 + 10*1 + 100*2 = 210.5, t2 = 0.5 + 1 + 20 + 300 = 321.5
    //   c1: t0 = -1 + 2*10 = 19, t1 = -1 - 10 + 40 = 29, t2 = -1 + 5 - 20 + 60 = 44
    let x = Tensor::from_vec(vec![1.0, 10.0, 2.0, 20.0, 3.0, 30.0], &[1, 3, 2]).unwrap();
    let w = Tensor::from_vec(vec![1.0, 10.0, 100.0, 0.5, -1.0, 2.0], &[2, 3]).unwrap();
    let b = Tensor::from_vec(vec![0.5, -1.0], &[2]).unwrap();
    let y = causal_conv1d(&mut Tape::new(), &x, &w, &b).unwrap();
    assert_eq!(y.shape(), &[1, 3, 2]);
    assert_close("causal_conv1d", &y.to_vec_f64().unwrap(), &[100.5, 19.0, 210.5, 29.0, 321.5, 44.0], 1e-14, 1e-14);
}

#[test]
fn causal_conv1d_rejects_wrong_channels() {
    let err = causal_conv1d(&mut Tape::new(), &randn64(&[2, 7, 3], 0), &randn64(&[4, 4], 0), &randn64(&[3], 0));
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains("causal_conv1d") && msg.contains("C = 3") && msg.contains("[4, 4]"), "{msg}");
    let err = causal_conv1d(&mut Tape::new(), &randn64(&[2, 7, 3], 0), &randn64(&[3, 4], 0), &randn64(&[4], 0));
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains("bias") && msg.contains("[4]"), "{msg}");
}

// ---------------------------------------------------------------------------------------------------------------
// selective_scan

/// The eight scan inputs (u, delta, a_log, b, c, d_skip, z, delta_bias) with moderate step sizes: delta ~ 0.5 randn,
/// a_log ~ log(n + 1) + 0.1 randn, so dt ~ 0.7 and exp(dt A) spans roughly 0.05 to 0.5.
fn scan_inputs(g: usize, l: usize, dch: usize, n: usize, seed: u64) -> Vec<Tensor> {
    vec![
        randn64(&[g, l, dch], seed),
        randn_map(&[g, l, dch], seed + 1, |_, v| 0.5 * v),
        randn_map(&[dch, n], seed + 2, |i, v| ((i % n + 1) as f64).ln() + 0.1 * v),
        randn64(&[g, l, n], seed + 3),
        randn64(&[g, l, n], seed + 4),
        randn64(&[dch], seed + 5),
        randn64(&[g, l, dch], seed + 6),
        randn_map(&[dch], seed + 7, |_, v| 0.3 * v),
    ]
}

#[test]
fn grad_selective_scan() {
    assert_gradients(&scan_inputs(2, 9, 3, 4, 20), 1e-6, scan);
}

#[test]
fn grad_selective_scan_long() {
    assert_gradients(&scan_inputs(1, 40, 2, 3, 30), 1e-6, scan);
}

#[test]
fn grad_selective_scan_softplus_linear() {
    // Channel 0 has delta + delta_bias > 20 on every other token (softplus's linear branch) and a small |A|
    // (a_log ~ -4), so exp(dt A) is still far from 0 there and the gradient flows through the recurrence.
    let (g, l, dch, n) = (2, 6, 2, 3);
    let mut x = scan_inputs(g, l, dch, n, 40);
    x[1] =
        randn_map(&[g, l, dch], 41, |i, v| if i % dch == 0 && (i / dch) % 2 == 0 { 20.5 + v.abs() } else { 0.5 * v });
    x[2] = randn_map(&[dch, n], 42, |i, v| if i < n { -4.0 + 0.1 * v } else { ((i % n + 1) as f64).ln() + 0.1 * v });
    let pre: Vec<f64> =
        x[1].to_vec_f64().unwrap().iter().enumerate().map(|(i, d)| d + x[7].to_vec_f64().unwrap()[i % dch]).collect();
    assert!(pre.iter().filter(|&&v| v > 20.0).count() == g * l / 2, "test setup: linear branch not reached");
    assert_gradients(&x, 1e-6, scan);
}

/// The scan and SiLU(conv1d) walking each sequence from its last token (`Order::Reversed`) are the ops on the
/// reversed sequences, reversed back: the same output and input gradients as with `flip_seq` around them (float64, to
/// rounding: the same terms in the same order), and their gradients pass finite differences.
#[test]
fn reversed_ops_are_the_ops_of_flipped_sequences() {
    assert_reversed_is_flipped("selective_scan", &scan_inputs(2, 9, 3, 4, 50), &SCAN_TOKENS, &scan_reversed, &scan);
    let conv =
        |order| move |t: &mut Tape, v: &[Tensor]| causal_conv1d_silu(t, Operand::Tensor(&v[0]), &v[1], &v[2], order);
    let x = [randn64(&[2, 7, 3], 60), randn64(&[3, 4], 61), randn64(&[3], 62)];
    assert_reversed_is_flipped(
        "causal_conv1d_silu",
        &x,
        &[true, false, false],
        &conv(Order::Reversed),
        &conv(Order::Stored),
    );
}

/// An op of the Mamba block on a tape.
type Op<'a> = &'a dyn Fn(&mut Tape, &[Tensor]) -> lkm_engine::Result<Tensor>;

/// `reversed` on `x` against `stored` on `x` with its token-shaped inputs (`tokens`) flipped and its output flipped
/// back: output and every gradient (float64, CPU), then finite differences of `reversed`.
fn assert_reversed_is_flipped(name: &str, x: &[Tensor], tokens: &[bool], reversed: Op, stored: Op) {
    let all = vec![true; x.len()];
    let (out, grads) = seeded_step(name, x, &all, &Device::Cpu, reversed);
    let flipped = |t: &mut Tape, v: &[Tensor]| on_flipped(t, v, tokens, stored);
    let (want_out, want_grads) = seeded_step(name, x, &all, &Device::Cpu, &flipped);
    assert_rel_err(&format!("{name} reversed: output"), &out, &want_out, 1e-13);
    for (i, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
        let (g, w) = (g.as_ref().unwrap(), w.as_ref().unwrap());
        assert_rel_err(&format!("{name} reversed: gradient of input {i}"), g, w, 1e-13);
    }
    assert_gradients(x, 1e-6, reversed);
}

/// The scan of `x` = [u, delta, a_log, bc, d_skip, z, delta_bias] with B and C the N columns of bc (G, L, W) from
/// columns `at[0]` and `at[1]`.
fn packed_scan(t: &mut Tape, x: &[Tensor], at: [usize; 2]) -> lkm_engine::Result<Tensor> {
    let inp = ScanInputs {
        u: &x[0],
        delta: Operand::Tensor(&x[1]),
        a_log: &x[2],
        b: Columns { t: &x[3], at: at[0] },
        c: Columns { t: &x[3], at: at[1] },
        d_skip: &x[4],
        z: Operand::Tensor(&x[5]),
        delta_bias: &x[6],
        order: Order::Stored,
    };
    selective_scan(t, &inp)
}

/// B and C read as columns of one wider tensor, as Mamba's x_proj output [dt | B | C] (and in the other order): the
/// same output, the same bits, as from tensors of their own, and one gradient holding dB and dC in their columns and
/// zeros in the others; finite differences agree (CPU). On the GPU the second shape's backward splits its 100
/// channels over several blocks (the dB, dC sums then added in split order, as for PaM's layers).
fn selective_scan_of_packed_columns(dev: &Device) {
    for (g, l, dch) in [(2, 70, 5), (1, 70, 100)] {
        packed_columns_case(dev, g, l, dch);
    }
}
device_test!(selective_scan_of_packed_columns);

fn packed_columns_case(dev: &Device, g: usize, l: usize, dch: usize) {
    let (n, r) = (4, 2);
    let host = scan_inputs(g, l, dch, n, 90);
    let x: Vec<Tensor> = host.iter().map(|t| t.to_dtype(DType::F32).unwrap().to_device(dev).unwrap()).collect();
    let cols = |t: &Tensor| t.to_vec_f64().unwrap();
    let (b, c) = (cols(&host[3]), cols(&host[4]));
    let extra = randn64(&[g, l, r], 91).to_vec_f64().unwrap();
    let apart = seeded_step("apart", &x, &[true; 8], dev, &scan);
    for (b_at, c_at) in [(r, r + n), (r + n, r)] {
        let w = r + 2 * n;
        let mut bc = vec![0.0; g * l * w];
        for row in 0..g * l {
            bc[row * w..row * w + r].copy_from_slice(&extra[row * r..(row + 1) * r]);
            bc[row * w + b_at..][..n].copy_from_slice(&b[row * n..(row + 1) * n]);
            bc[row * w + c_at..][..n].copy_from_slice(&c[row * n..(row + 1) * n]);
        }
        let bc = Tensor::from_vec(bc, &[g, l, w]).unwrap().to_dtype(DType::F32).unwrap().to_device(dev).unwrap();
        let packed_inputs = [&x[0], &x[1], &x[2], &bc, &x[5], &x[6], &x[7]].map(Tensor::clone);
        let what = format!("{g} x {l} x {dch}, B at column {b_at}, C at {c_at}");
        let (out, grads) = seeded_step(&what, &packed_inputs, &[true; 7], dev, &|t, v| packed_scan(t, v, [b_at, c_at]));
        assert!(out == apart.0, "{what}: the output differs");
        let gbc = grads[3].as_ref().expect("a gradient for B and C's tensor");
        let (gb, gc) = (apart.1[3].as_ref().unwrap(), apart.1[4].as_ref().unwrap());
        for row in 0..g * l {
            let at = |k: usize| gbc[row * w + k];
            assert!((0..r).all(|k| at(k) == 0.0), "{what}: row {row}: the dt columns' gradient is not zero");
            assert!((0..n).all(|k| at(b_at + k) == gb[row * n + k]), "{what}: row {row}: dB differs");
            assert!((0..n).all(|k| at(c_at + k) == gc[row * n + k]), "{what}: row {row}: dC differs");
        }
        for (i, j) in [(0, 0), (1, 1), (2, 2), (4, 5), (5, 6), (6, 7)] {
            assert!(grads[i] == apart.1[j], "{what}: the gradient of input {j} differs");
        }
        if matches!(dev, Device::Cpu) && dch < 10 {
            let small = scan_inputs(2, 5, 3, 2, 92);
            let bc = randn64(&[2, 5, 5], 93);
            let x = [&small[0], &small[1], &small[2], &bc, &small[5], &small[6], &small[7]].map(Tensor::clone);
            let at = if b_at < c_at { [1, 3] } else { [3, 1] };
            assert_gradients(&x, 1e-6, |t, v| packed_scan(t, v, at));
        }
    }
}

#[test]
fn selective_scan_projected_delta_is_the_product_then_the_scan() {
    // Operand::Product keeps the products' operands and rebuilds delta and z in the backward pass: the same output and
    // the same gradients, bit for bit, as delta and z made by linear and kept (Operand::Tensor), for all ten inputs;
    // and finite differences agree.
    let x: Vec<Tensor> =
        projected_scan_inputs(3, 11, 5, 4, 2, 52).iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
    let all = [true; 10];
    let projected = seeded_step("projected", &x, &all, &Device::Cpu, &|t, v| projected_scan(t, v, false));
    let full = seeded_step("full", &x, &all, &Device::Cpu, &|t, v| projected_scan(t, v, true));
    assert_eq!(projected, full);
    assert_gradients(
        &projected_scan_inputs(2, 7, 3, 4, 2, 53).iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect::<Vec<_>>(),
        1e-6,
        |t, v| projected_scan(t, v, false),
    );
}

#[test]
fn selective_scan_partial_gradients_match_full() {
    // Only u and a_log watched: the backward must give the same gradients as when all eight are watched.
    let x = scan_inputs(2, 5, 3, 4, 50);
    let seed = randn64(&[2, 5, 3], 51);
    let mut full = Tape::new();
    x.iter().for_each(|t| full.watch(t));
    let y = scan(&mut full, &x).unwrap();
    let gf = full.backward_from(&y, seed.clone()).unwrap();
    let mut part = Tape::new();
    part.watch(&x[0]);
    part.watch(&x[2]);
    let y = scan(&mut part, &x).unwrap();
    let gp = part.backward_from(&y, seed).unwrap();
    assert_eq!(gp.len(), 2);
    for i in [0, 2] {
        let (a, b) = (gf.get(&x[i]).unwrap().to_vec_f64().unwrap(), gp.get(&x[i]).unwrap().to_vec_f64().unwrap());
        assert_close("partial gradient", &a, &b, 1e-14, 1e-14);
    }
}

/// The scan through its closed form h_t = sum_{s<=t} (prod_{s<r<=t} exp(dt_r A)) dt_s B_s u_s, with softplus and
/// SiLU written out, no recurrence.
fn scan_closed_form(x: &[Tensor], g: usize, l: usize, dch: usize, n: usize) -> Vec<f64> {
    let v: Vec<Vec<f64>> = x.iter().map(|t| t.to_vec_f64().unwrap()).collect();
    let (u, delta, a_log, b, c, dsk, z, bias) = (&v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
    let tok = |gi: usize, t: usize, d: usize| (gi * l + t) * dch + d;
    let st = |gi: usize, t: usize, k: usize| (gi * l + t) * n + k;
    let mut y = vec![0.0; g * l * dch];
    for gi in 0..g {
        for d in 0..dch {
            let dt: Vec<f64> = (0..l).map(|t| (1.0 + (delta[tok(gi, t, d)] + bias[d]).exp()).ln()).collect();
            for t in 0..l {
                let mut out = dsk[d] * u[tok(gi, t, d)];
                for k in 0..n {
                    let a = -a_log[d * n + k].exp();
                    let mut h = 0.0;
                    for s in 0..=t {
                        let decay: f64 = (s + 1..=t).map(|r| (dt[r] * a).exp()).product();
                        h += decay * dt[s] * b[st(gi, s, k)] * u[tok(gi, s, d)];
                    }
                    out += c[st(gi, t, k)] * h;
                }
                let zz = z[tok(gi, t, d)];
                y[tok(gi, t, d)] = out * zz / (1.0 + (-zz).exp());
            }
        }
    }
    y
}

#[test]
fn selective_scan_forward_matches_closed_form() {
    let (g, l, dch, n) = (2, 5, 2, 3);
    let mut x = scan_inputs(g, l, dch, n, 60);
    // One step in softplus's linear range: softplus(25) and 25 differ by 1.4e-11.
    x[1] = randn_map(&[g, l, dch], 61, |i, v| if i == 3 { 25.0 } else { 0.5 * v });
    let want = scan_closed_form(&x, g, l, dch, n);
    let y = scan(&mut Tape::new(), &x).unwrap();
    assert_eq!(y.shape(), &[g, l, dch]);
    assert_close("selective_scan f64", &y.to_vec_f64().unwrap(), &want, 1e-10, 1e-10);
    let x32: Vec<Tensor> = x.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
    let y32 = scan(&mut Tape::new(), &x32).unwrap();
    assert_eq!(y32.dtype(), DType::F32);
    assert_close("selective_scan f32", &y32.to_vec_f64().unwrap(), &want, 1e-4, 1e-4);
}

#[test]
fn selective_scan_rejects_wrong_state_size() {
    let mut x = scan_inputs(2, 5, 3, 4, 70);
    x[3] = randn64(&[2, 5, 3], 0);
    let msg = scan(&mut Tape::new(), &x).unwrap_err().to_string();
    assert!(msg.contains("selective_scan: b must be N = 4 columns") && msg.contains("[2, 5, 3]"), "{msg}");
    // B and C as columns of one tensor: past its last column, or overlapping, is refused.
    let x = scan_inputs(2, 5, 3, 4, 71);
    let bc = randn64(&[2, 5, 9], 72);
    let packed = [&x[0], &x[1], &x[2], &bc, &x[5], &x[6], &x[7]].map(Tensor::clone);
    let msg = packed_scan(&mut Tape::new(), &packed, [1, 6]).unwrap_err().to_string();
    assert!(msg.contains("c must be N = 4 columns (from column 6)"), "{msg}");
    let msg = packed_scan(&mut Tape::new(), &packed, [1, 3]).unwrap_err().to_string();
    assert!(msg.contains("overlap"), "{msg}");
}

#[test]
fn selective_scan_rejects_wrong_channels() {
    let mut x = scan_inputs(2, 5, 3, 4, 80);
    x[5] = randn64(&[4], 0);
    let msg = scan(&mut Tape::new(), &x).unwrap_err().to_string();
    assert!(msg.contains("d_skip") && msg.contains("[3]") && msg.contains("[4]"), "{msg}");
    let mut x = scan_inputs(2, 5, 3, 4, 81);
    x[2] = randn64(&[2, 4], 0);
    let msg = scan(&mut Tape::new(), &x).unwrap_err().to_string();
    assert!(msg.contains("a_log") && msg.contains("Dch = 3"), "{msg}");
}
