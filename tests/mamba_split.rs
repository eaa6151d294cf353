//! Mamba's in_proj split through its weight equals the split of its output that it replaced.
//!
//! [`Mamba::forward`] computes x = u W[0..di]^T and z = u W[di..2di]^T from two row slices of in_proj's weight W
//! (2 d_inner, d_model). The computation it replaced, written out here op by op, made xz = u W^T (G, L, 2 d_inner)
//! and copied its halves out with a slice of the last axis. The two are the same dot products, so in float64 the
//! output and every gradient (the input's and every parameter's, W's being the sum of its two slices' gradients in
//! the new path) must agree to rounding: the gradients are sums taken in another order, nothing more.

mod common;

use common::assert_rel_err;
use lkm_engine::autograd::gradcheck::randn64;
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::nn::mamba::{Mamba, MambaConfig};
use lkm_engine::nn::Params;
use lkm_engine::ops::activation::silu;
use lkm_engine::ops::causal_conv1d::causal_conv1d;
use lkm_engine::ops::flip::Order;
use lkm_engine::ops::linear::linear;
use lkm_engine::ops::narrow::narrow;
use lkm_engine::ops::operand::Operand;
use lkm_engine::ops::reshape::reshape;
use lkm_engine::ops::selective_scan::{selective_scan, ScanInputs};
use lkm_engine::tensor::DType;
use lkm_engine::{Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

const PREFIX: &str = "m";

/// The parameter `PREFIX.name` of `p`.
fn param<'a>(p: &'a Params, name: &str) -> &'a Tensor {
    let full = format!("{PREFIX}.{name}");
    let i = p.names().iter().position(|n| *n == full).unwrap_or_else(|| panic!("no parameter {full}"));
    &p.tensors()[i]
}

/// The Mamba block as it was before in_proj's weight was split: one product, then two copies of its halves.
fn old_forward(tape: &mut Tape, p: &Params, u: &Tensor, cfg: MambaConfig) -> Result<Tensor> {
    let last = u.rank() - 1;
    let di = cfg.expand * u.shape()[last];
    let (r, n) = (param(p, "dt_proj.weight").shape()[1], cfg.d_state);
    let xz = linear(tape, u, param(p, "in_proj.weight"), None)?;
    let x = narrow(tape, &xz, last, 0, di)?;
    let z = narrow(tape, &xz, last, di, di)?;
    let conv_w = reshape(tape, param(p, "conv1d.weight"), &[di, cfg.d_conv])?;
    let x = causal_conv1d(tape, &x, &conv_w, param(p, "conv1d.bias"))?;
    let x = silu(tape, &x)?;
    let dbc = linear(tape, &x, param(p, "x_proj.weight"), None)?;
    let dt = narrow(tape, &dbc, last, 0, r)?;
    let b = narrow(tape, &dbc, last, r, n)?;
    let c = narrow(tape, &dbc, last, r + n, n)?;
    let delta = linear(tape, &dt, param(p, "dt_proj.weight"), None)?;
    let inputs = ScanInputs {
        u: &x,
        delta: Operand::Tensor(&delta),
        a_log: param(p, "A_log"),
        b: (&b).into(),
        c: (&c).into(),
        d_skip: param(p, "D"),
        z: Operand::Tensor(&z),
        delta_bias: param(p, "dt_proj.bias"),
        order: Order::Stored,
    };
    selective_scan(tape, &inputs)
}

/// The output of `f` and the gradients of `u` and of every parameter (in `p`'s order) for one fixed random
/// gradient of the output, all as float64 host vectors.
fn step(p: &Params, u: &Tensor, f: impl Fn(&mut Tape) -> Result<Tensor>) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut tape = Tape::new();
    tape.watch(u);
    p.watch(&mut tape);
    let y = f(&mut tape).unwrap();
    let seed = randn64(y.shape(), 99);
    let grads = tape.backward_from(&y, seed).unwrap();
    let of = |t: &Tensor| grads.get(t).expect("every input gets a gradient").to_vec_f64().unwrap();
    let mut all = vec![of(u)];
    all.extend(p.tensors().iter().map(of));
    (y.to_vec_f64().unwrap(), all)
}

#[test]
fn in_proj_weight_split_matches_output_split() {
    // d_model 20 gives dt_rank 2, as at the reference's stage 0 (d_model 32); G = 3 sequences of L = 9 tokens.
    let cfg = MambaConfig { d_state: 5, d_conv: 4, expand: 2, recompute: false };
    let d_model = 20;
    let mut params = Params::new();
    let block = Mamba::new(&mut params, PREFIX, d_model, cfg, &mut StdRng::seed_from_u64(3));
    let p = params.to(DType::F64, &Device::Cpu).unwrap();
    let u = randn64(&[3, 9, d_model], 4);

    let (y_new, g_new) = step(&p, &u, |t| block.forward(t, &p, &u, Order::Stored));
    let (y_old, g_old) = step(&p, &u, |t| old_forward(t, &p, &u, cfg));

    // The forward products are the same dot products in the same order: the same bits.
    assert_eq!(y_new, y_old, "forward");
    let mut names = vec!["u".to_string()];
    names.extend(p.names().iter().cloned());
    let mut worst = 0.0f64;
    for ((name, new), old) in names.iter().zip(&g_new).zip(&g_old) {
        assert!(old.iter().any(|&v| v != 0.0), "{name}: the old path's gradient is all zeros, the test is void");
        worst = worst.max(assert_rel_err(&format!("gradient of {name}"), new, old, 1e-14));
    }
    eprintln!("worst relative error of a gradient: {worst:.1e}");
    // Both halves of in_proj's weight are reached: rows [0, di) through x, rows [di, 2 di) through z.
    let w = &g_new[1 + p.names().iter().position(|n| n == "m.in_proj.weight").unwrap()];
    let half = w.len() / 2;
    assert!(w[..half].iter().any(|&v| v != 0.0) && w[half..].iter().any(|&v| v != 0.0));
}
