//! Every CUDA kernel against its CPU reference: forward and backward, fresh random inputs, odd sizes, NaN-poisoned
//! outputs. Run on a GPU machine with `cargo test --release -- --ignored`.

mod common;

use common::{check_op, check_op_bf16, randn32};
use lkm_engine::ops::activation::{leaky_relu, silu, softplus};
use lkm_engine::ops::add::add;
use lkm_engine::tensor::{self, DType};

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

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_elementwise() {
    let x = [randn32(&[3, 5, 7, 11], 10.0, 1)];
    check_op_bf16("leaky_relu", &x, &[true], &[true], 1e-2, |t, x| leaky_relu(t, &x[0]));
    check_op_bf16("silu", &x, &[true], &[true], 1e-2, |t, x| silu(t, &x[0]));
    check_op_bf16("softplus", &x, &[true], &[true], 1e-2, |t, x| softplus(t, &x[0]));
    let ab = [randn32(&[2, 3, 5, 7, 9], 1.0, 2), randn32(&[2, 3, 5, 7, 9], 1.0, 3)];
    check_op_bf16("add", &ab, &[true; 2], &[true; 2], 1e-2, |t, x| add(t, &x[0], &x[1]));
    // tensor::mul and tensor::scale (the optimiser's and the gradients' arithmetic), no autograd.
    let dev = lkm_engine::device::Device::Cuda(common::gpu());
    let (a, b) = (ab[0].to_device(&dev).unwrap(), ab[1].to_device(&dev).unwrap());
    let (a16, b16) = (a.to_dtype(DType::BF16).unwrap(), b.to_dtype(DType::BF16).unwrap());
    let (av, bv) = (a16.to_vec_f64().unwrap(), b16.to_vec_f64().unwrap());
    let prod = tensor::mul(&a16, &b16).unwrap();
    assert_eq!(prod.dtype(), DType::BF16);
    let want: Vec<f64> = av.iter().zip(&bv).map(|(x, y)| x * y).collect();
    common::assert_rel_err("mul bf16", &prod.to_vec_f64().unwrap(), &want, 1e-2);
    let want: Vec<f64> = av.iter().map(|x| 0.5 * x).collect();
    common::assert_rel_err("scale bf16", &tensor::scale(&a16, 0.5).unwrap().to_vec_f64().unwrap(), &want, 1e-2);
    // Operands of different storage types are refused by name.
    let err = tensor::add(&a16, &b).unwrap_err().to_string();
    assert!(err.contains("add") && err.contains("BF16") && err.contains("F32"), "{err}");
}
