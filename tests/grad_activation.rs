//! Gradient checks of the pointwise activations and the residual add.

use lkm_engine::autograd::gradcheck::{assert_gradients, randn64};
use lkm_engine::ops::activation::{leaky_relu, silu, softplus};
use lkm_engine::ops::add::add;
use lkm_engine::Tensor;

/// Inputs spread over both sides of 0 and past softplus's threshold of 20, away from LeakyReLU's kink at 0.
fn wide_input() -> Tensor {
    let v: Vec<f64> = randn64(&[3, 5, 7], 1).to_vec_f64().unwrap().iter().map(|x| 12.0 * x + 0.05).collect();
    Tensor::from_vec(v, &[3, 5, 7]).unwrap()
}

#[test]
fn grad_leaky_relu() {
    assert_gradients(&[wide_input()], 1e-6, |t, x| leaky_relu(t, &x[0]));
}

#[test]
fn grad_silu() {
    assert_gradients(&[wide_input()], 1e-6, |t, x| silu(t, &x[0]));
}

#[test]
fn grad_softplus() {
    assert_gradients(&[wide_input()], 1e-6, |t, x| softplus(t, &x[0]));
}

#[test]
fn grad_add() {
    assert_gradients(&[randn64(&[2, 3, 4, 5], 2), randn64(&[2, 3, 4, 5], 3)], 1e-6, |t, x| add(t, &x[0], &x[1]));
}

#[test]
fn grad_add_same_tensor_twice_accumulates() {
    // y = x + x: the tape must sum both contributions (dL/dx = 2 r).
    assert_gradients(&[randn64(&[4, 6], 4)], 1e-6, |t, x| add(t, &x[0], &x[0]));
}

#[test]
fn add_rejects_different_shapes() {
    let err = add(&mut lkm_engine::autograd::Tape::new(), &randn64(&[2, 3], 0), &randn64(&[3, 2], 0)).unwrap_err();
    assert!(err.to_string().contains("[2, 3]"), "{err}");
}

#[test]
fn grad_scale() {
    assert_gradients(&[randn64(&[3, 4], 5)], 1e-6, |t, x| lkm_engine::ops::scale::scale(t, &x[0], -2.5));
}
