//! Every CUDA kernel against its CPU reference: forward and backward, fresh random inputs, odd sizes, NaN-poisoned
//! outputs. Run on a GPU machine with `cargo test --release -- --ignored`.

mod common;

use common::{check_op, check_op_bf16, randn32};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::activation::{leaky_relu, silu, softplus};
use lkm_engine::ops::add::add;
use lkm_engine::tensor::{self, DType};
use lkm_engine::Tensor;

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

/// The elementwise kernels on sizes around their 16-byte vectors (4 float32, 8 bf16 elements per thread): less than
/// one vector, whole vectors only, a partial last one. float32 against the host's float32 arithmetic and bf16 against
/// the float32 kernels rounded once, both bit for bit; the in-place add (the tape's gradient accumulation) gives the
/// out-of-place add's bits; the activations forward and backward against the CPU.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_elementwise_vector_tails() {
    let dev = Device::Cuda(common::gpu());
    for n in [1usize, 3, 4, 7, 8, 9, 16, 1029, 4101] {
        let on = |seed: u64| randn32(&[n], 1.0, seed).to_device(&dev).unwrap();
        let (a, b) = (on(100 + n as u64), on(200 + n as u64));
        let (av, bv) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
        let host = |f: &dyn Fn(f32, f32) -> f32| -> Vec<f32> { av.iter().zip(&bv).map(|(&x, &y)| f(x, y)).collect() };
        for (name, got, want) in [
            ("add", tensor::add(&a, &b), host(&|x, y| x + y)),
            ("mul", tensor::mul(&a, &b), host(&|x, y| x * y)),
            ("scale", tensor::scale(&a, 0.5), host(&|x, _| 0.5 * x)),
        ] {
            assert_eq!(got.unwrap().to_vec_f32().unwrap(), want, "{name} float32, n = {n}");
        }
        let to = |t: &Tensor, dtype| t.to_dtype(dtype).unwrap();
        let (a16, b16) = (to(&a, DType::BF16), to(&b, DType::BF16));
        let (a32, b32) = (to(&a16, DType::F32), to(&b16, DType::F32));
        let rounded = |t: Tensor| to(&t, DType::BF16).to_vec_f64().unwrap();
        for (name, got, want) in [
            ("add", tensor::add(&a16, &b16), tensor::add(&a32, &b32)),
            ("mul", tensor::mul(&a16, &b16), tensor::mul(&a32, &b32)),
            ("scale", tensor::scale(&a16, 0.5), tensor::scale(&a32, 0.5)),
        ] {
            assert_eq!(got.unwrap().to_vec_f64().unwrap(), rounded(want.unwrap()), "{name} bf16, n = {n}");
        }
        for (x, y) in [(&a, &b), (&a16, &b16)] {
            // A fresh tensor that nothing else holds, so the sum is formed in place.
            let mut acc = tensor::scale(x, 1.0).unwrap();
            tensor::add_assign(&mut acc, y).unwrap();
            let want = tensor::add(x, y).unwrap().to_vec_f64().unwrap();
            assert_eq!(acc.to_vec_f64().unwrap(), want, "in-place add {:?}, n = {n}", x.dtype());
        }
        let x = [randn32(&[n], 10.0, 300 + n as u64)];
        for (name, f) in [
            ("leaky_relu", leaky_relu as fn(&mut Tape, &Tensor) -> lkm_engine::Result<Tensor>),
            ("silu", silu),
            ("softplus", softplus),
        ] {
            check_op(&format!("{name} n = {n}"), &x, 1e-5, |t, x| f(t, &x[0]));
            check_op_bf16(&format!("{name} n = {n}"), &x, &[true], &[true], 1e-2, |t, x| f(t, &x[0]));
        }
    }
}
