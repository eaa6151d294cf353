//! Every CUDA kernel against its CPU reference: forward and backward, fresh random inputs, odd sizes, NaN-poisoned
//! outputs. Run on a GPU machine with `cargo test --release -- --ignored`.

mod common;

use common::{check_op, randn32};
use lkm_engine::ops::activation::{leaky_relu, silu, softplus};
use lkm_engine::ops::add::add;

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_activations() {
    let x = randn32(&[3, 5, 7, 11], 10.0, 1);
    let inputs = [x];
    check_op("leaky_relu", &inputs, 1e-5, |t, x| leaky_relu(t, &x[0]));
    check_op("silu", &inputs, 1e-5, |t, x| silu(t, &x[0]));
    check_op("softplus", &inputs, 1e-5, |t, x| softplus(t, &x[0]));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_add() {
    check_op("add", &[randn32(&[2, 3, 5, 7, 9], 1.0, 2), randn32(&[2, 3, 5, 7, 9], 1.0, 3)], 1e-6, |t, x| {
        add(t, &x[0], &x[1])
    });
}
