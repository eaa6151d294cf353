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
    let cfg = MambaConfig { d_state: 3, d_conv: 4, expand: 2 };
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
