//! End-to-end gradient check of a small stack with every kind of layer of LKM-UNet's encoder:
//! conv -> InstanceNorm -> LeakyReLU -> PiM (bidirectional Mamba over windows) -> PaM (pooled, global sequence).
//! Every parameter and the input are checked against central differences in float64.

use lkm_engine::autograd::gradcheck::{assert_gradients, randn64};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::nn::init::{constant, he_normal};
use lkm_engine::nn::mamba::{BiMambaLayer, Grouping, MambaConfig};
use lkm_engine::nn::Params;
use lkm_engine::ops::activation::leaky_relu;
use lkm_engine::ops::conv::conv;
use lkm_engine::ops::instance_norm::{instance_norm, IN_EPS};
use lkm_engine::ops::pim::PimLayout;
use lkm_engine::tensor::DType;
use lkm_engine::{Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

struct Stack {
    params: Params,
    pim: BiMambaLayer,
    pam: BiMambaLayer,
}

const C: usize = 4;

fn build(layout: PimLayout) -> Stack {
    let mut rng = StdRng::seed_from_u64(7);
    let mut params = Params::new();
    params.add("conv.weight", he_normal(&[C, 2, 3, 3, 3], 2 * 27, &mut rng));
    params.add("conv.bias", constant(&[C], 0.1));
    params.add("norm.weight", constant(&[C], 1.3));
    params.add("norm.bias", constant(&[C], -0.2));
    let cfg = MambaConfig { d_state: 3, d_conv: 4, expand: 2, recompute: false };
    let pixel = Grouping::Pixel { window: vec![2, 2, 4], layout };
    let pim = BiMambaLayer::new(&mut params, "pim", C, pixel, cfg, &mut rng);
    let pam = BiMambaLayer::new(&mut params, "pam", C, Grouping::Patch { pool: vec![1, 2, 2] }, cfg, &mut rng);
    let params = params.to(DType::F64, &Device::Cpu).unwrap();
    Stack { params, pim, pam }
}

fn forward(s: &Stack, tape: &mut Tape, p: &Params, x: &Tensor) -> Result<Tensor> {
    let t = p.tensors();
    let y = conv(tape, x, &t[0], Some(&t[1]), &[1, 1, 1])?;
    let y = instance_norm(tape, &y, &t[2], &t[3], IN_EPS)?;
    let y = leaky_relu(tape, &y)?;
    let y = s.pim.forward(tape, p, &y)?;
    s.pam.forward(tape, p, &y)
}

fn check(layout: PimLayout) {
    let s = build(layout);
    // A map of 2 x 4 x 4: PiM windows 2x2x4 give 4 sequences of 16 tokens per sample; PaM pools to 2 x 2 x 2.
    let x = randn64(&[1, 2, 2, 4, 4], 11);
    let mut inputs = vec![x];
    inputs.extend(s.params.tensors().iter().cloned());
    assert!(s.params.count() > 500, "the stack should exercise every parameter kind");
    assert_gradients(&inputs, 1e-5, |tape, xs| {
        let p = s.params.with_tensors(xs[1..].to_vec())?;
        forward(&s, tape, &p, &xs[0])
    });
}

#[test]
fn grad_composed_conv_in_lrelu_pim_window_pam() {
    check(PimLayout::Window);
}

#[test]
fn grad_composed_conv_in_lrelu_pim_strided_pam() {
    check(PimLayout::Strided);
}

/// A traced backward pass (`Tape::trace`, what the GPU probes compare node by node) returns the same gradients as an
/// untraced one, and hands back every node once, last first, with the gradient the next node down received.
#[test]
fn traced_backward_matches_untraced() {
    let s = build(PimLayout::Window);
    let x = randn64(&[1, 2, 2, 4, 4], 12);
    let run = |trace: bool| {
        let mut tape = Tape::new();
        tape.trace(trace);
        tape.watch(&x);
        s.params.watch(&mut tape);
        let y = forward(&s, &mut tape, &s.params, &x).unwrap();
        let nodes = tape.len();
        let seed = randn64(y.shape(), 13);
        let g = tape.backward_from(&y, seed.clone()).unwrap();
        (nodes, seed, g)
    };
    let (nodes, seed, traced) = run(true);
    let (_, _, plain) = run(false);
    assert!(plain.trace().is_empty(), "an untraced tape keeps nothing");
    let trace = traced.trace();
    assert_eq!(trace.len(), nodes, "every node of this stack receives a gradient");
    assert!(trace.windows(2).all(|w| w[0].index == w[1].index + 1), "nodes come last first");
    assert_eq!(trace[0].grad.to_vec_f64().unwrap(), seed.to_vec_f64().unwrap(), "the last node gets the seed");
    assert_eq!(trace.last().unwrap().op, "conv3d");
    assert!(trace.iter().any(|n| n.op == "leaky_relu" && n.output.shape() == [1, C, 2, 4, 4]));
    for n in trace {
        assert_eq!(n.output.shape(), n.grad.shape(), "node {} ({})", n.index, n.op);
    }
    for t in std::iter::once(&x).chain(s.params.tensors()) {
        let (a, b) = (traced.get(t).unwrap().to_vec_f64().unwrap(), plain.get(t).unwrap().to_vec_f64().unwrap());
        assert_eq!(a, b, "tracing changed a gradient");
    }
}
