//! Inputs and the call of the selective scan shared by its tests (tests/grad_mamba_ops.rs, the GPU tests of
//! tests/gpu_mamba_ops.rs in float32 and tests/gpu_bf16_mamba.rs in bf16).

use lkm_engine::autograd::Tape;
use lkm_engine::ops::flip::{flip_seq, Order};
use lkm_engine::ops::linear::{linear, Product};
use lkm_engine::ops::operand::Operand;
use lkm_engine::ops::selective_scan::{selective_scan, ScanInputs};
use lkm_engine::{Result, Tensor};

use super::randn32;

/// Mamba-like inputs in the order of `ScanInputs`: u, z, B, C ~ N(0, 1); delta ~ 0.5 N(0, 1) - 1 before the bias;
/// delta_bias = softplus^-1(dt) with dt log-uniform in [0.001, 0.1] (Mamba's dt_proj bias init); a_log[d, n] =
/// ln(n + 1) (S4D-real init, A = -(n + 1)); D ~ 1 + 0.1 N(0, 1).
pub fn scan_inputs(g: usize, l: usize, d: usize, n: usize, seed: u64) -> Vec<Tensor> {
    let map = |t: Tensor, f: &dyn Fn(usize, f64) -> f64| {
        let v: Vec<f32> = t.to_vec_f64().unwrap().iter().enumerate().map(|(i, &x)| f(i, x) as f32).collect();
        Tensor::from_vec(v, t.shape()).unwrap()
    };
    let u = randn32(&[g, l, d], 1.0, seed);
    let delta = map(randn32(&[g, l, d], 1.0, seed + 1), &|_, x| 0.5 * x - 1.0);
    let a_log = map(randn32(&[d, n], 1.0, seed + 2), &|i, _| ((i % n) as f64 + 1.0).ln());
    let b = randn32(&[g, l, n], 1.0, seed + 3);
    let c = randn32(&[g, l, n], 1.0, seed + 4);
    let d_skip = map(randn32(&[d], 1.0, seed + 5), &|_, x| 1.0 + 0.1 * x);
    let z = randn32(&[g, l, d], 1.0, seed + 6);
    let (lo, hi) = (0.001f64.ln(), 0.1f64.ln());
    let delta_bias = map(randn32(&[d], 1.0, seed + 7), &|i, _| {
        // Evenly spread over the log range (deterministic), then the inverse softplus: dt + ln(1 - e^-dt).
        let dt = (lo + (hi - lo) * (i as f64 + 0.5) / d as f64).exp();
        dt + (-(-dt).exp_m1()).ln()
    });
    vec![u, delta, a_log, b, c, d_skip, z, delta_bias]
}

/// The selective scan of `x`, the eight inputs in the order of `ScanInputs` (as [`scan_inputs`] makes them).
pub fn scan(t: &mut Tape, x: &[Tensor]) -> Result<Tensor> {
    scan_in(t, x, Order::Stored)
}

/// [`scan`] walking each sequence from its last token ([`Order::Reversed`]).
pub fn scan_reversed(t: &mut Tape, x: &[Tensor]) -> Result<Tensor> {
    scan_in(t, x, Order::Reversed)
}

/// What an op with [`Order::Reversed`] must give: `f` on the inputs with `tokens[i]` (the (G, L, C) ones) reversed
/// along L by `flip_seq`, its output reversed back; the gradients flow back through the flips.
pub fn on_flipped(
    t: &mut Tape,
    x: &[Tensor],
    tokens: &[bool],
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) -> Result<Tensor> {
    let flipped: Vec<Tensor> = x
        .iter()
        .zip(tokens)
        .map(|(x, &tok)| if tok { flip_seq(t, x) } else { Ok(x.clone()) })
        .collect::<Result<_>>()?;
    let y = f(t, &flipped)?;
    flip_seq(t, &y)
}

/// Which of the scan's eight inputs (the order of `ScanInputs`) are token-shaped: u, delta, B, C, z.
pub const SCAN_TOKENS: [bool; 8] = [true, true, false, true, true, false, true, false];

fn scan_in(t: &mut Tape, x: &[Tensor], order: Order) -> Result<Tensor> {
    let inp = ScanInputs {
        u: &x[0],
        delta: Operand::Tensor(&x[1]),
        a_log: &x[2],
        b: (&x[3]).into(),
        c: (&x[4]).into(),
        d_skip: &x[5],
        z: Operand::Tensor(&x[6]),
        delta_bias: &x[7],
        order,
    };
    selective_scan(t, &inp)
}

/// The inputs of a scan whose step sizes and gate come from Mamba's products, delta = dt w^T with dt (G, L, R) and
/// w (Dch, R), z = v wz^T with v (G, L, K) and wz (Dch, K): u, dt, w, a_log, B, C, D, v, wz, delta_bias (the others
/// as [`scan_inputs`] makes them; dt, v ~ N(0, 1) and the weights ~ N(0, 0.25 / R), N(0, 1 / K), so delta ~ 0.5 N(0, 1)
/// and z ~ N(0, 1)).
pub fn projected_scan_inputs(g: usize, l: usize, d: usize, n: usize, r: usize, seed: u64) -> Vec<Tensor> {
    let k = 5;
    let x = scan_inputs(g, l, d, n, seed);
    let (dt, w) = (randn32(&[g, l, r], 1.0, seed + 9), randn32(&[d, r], 0.5 / (r as f64).sqrt(), seed + 8));
    let (v, wz) = (randn32(&[g, l, k], 1.0, seed + 10), randn32(&[d, k], 1.0 / (k as f64).sqrt(), seed + 11));
    let [u, _, a_log, b, c, d_skip, _, delta_bias] = <[Tensor; 8]>::try_from(x).unwrap();
    vec![u, dt, w, a_log, b, c, d_skip, v, wz, delta_bias]
}

/// The scan of [`projected_scan_inputs`]: delta and z made and rebuilt by the scan op (`Operand::Product`), or, with
/// `full`, made by `linear` beforehand and kept (`Operand::Tensor`).
pub fn projected_scan(t: &mut Tape, x: &[Tensor], full: bool) -> Result<Tensor> {
    let (made, products);
    let (delta, z) = if full {
        made = [linear(t, &x[1], &x[2], None)?, linear(t, &x[7], &x[8], None)?];
        (Operand::Tensor(&made[0]), Operand::Tensor(&made[1]))
    } else {
        products = [Product::new(t, &x[1], &x[2])?, Product::new(t, &x[7], &x[8])?];
        (Operand::Product(&products[0]), Operand::Product(&products[1]))
    };
    let (b, c) = ((&x[4]).into(), (&x[5]).into());
    let order = Order::Stored;
    let inp = ScanInputs { u: &x[0], delta, a_log: &x[3], b, c, d_skip: &x[6], z, delta_bias: &x[9], order };
    selective_scan(t, &inp)
}
