//! bf16 storage on the GPU: the float32 -> bf16 kernel rounds exactly as the `half` crate does on the host (nearest,
//! ties to even, NaN, infinities, overflow, subnormals), bf16 -> float32 is exact, the cast op carries gradients back
//! to float32, and an op without a bf16 kernel refuses a bf16 tensor with its name in the error. Run on a GPU machine
//! with `cargo test --release --test gpu_cast -- --ignored`.

mod common;

use common::{gpu, randn32};
use half::bf16;
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::cast::cast;
use lkm_engine::ops::cross_entropy::cross_entropy;
use lkm_engine::tensor::DType;
use lkm_engine::Tensor;

/// Values where rounding to bf16 is delicate: ties in both directions, the largest finite bf16 and beyond it,
/// subnormals, signed zeros, infinities, NaN; then ordinary random values.
fn hard_values() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        1.0 + 1.0 / 256.0,                // exactly halfway between two bf16: ties to even (down)
        1.0 + 3.0 / 256.0,                // halfway, rounds up to even
        1.0 + 1.0 / 256.0 + f32::EPSILON, // just above halfway: up
        f32::MAX,
        -f32::MAX,
        f32::from_bits(0x7F7F_8000), // halfway above the largest finite bf16: overflows to infinity
        f32::MIN_POSITIVE,
        f32::from_bits(1), // the smallest subnormal
        f32::from_bits(0x0000_8000),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    v.extend(randn32(&[4093], 100.0, 1).to_vec_f32().unwrap());
    v
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_rounding_matches_the_host_bit_for_bit() {
    let dev = Device::Cuda(gpu());
    let v = hard_values();
    let x = Tensor::from_vec(v.clone(), &[v.len()]).unwrap().to_device(&dev).unwrap();
    let y = x.to_dtype(DType::BF16).unwrap();
    assert_eq!((y.dtype(), y.shape()), (DType::BF16, x.shape()));
    let got = y.to_vec_f32().unwrap();
    for (i, (&g, &x)) in got.iter().zip(&v).enumerate() {
        let want = f32::from(bf16::from_f32(x));
        let same = g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan());
        assert!(
            same,
            "element {i}: bf16({x:e}) = {g:e} ({:#x}) on the GPU, {want:e} ({:#x}) on the host",
            g.to_bits(),
            want.to_bits()
        );
    }
    // Back to float32 is exact: the bf16 values themselves.
    let back = y.to_dtype(DType::F32).unwrap();
    assert_eq!(back.dtype(), DType::F32);
    let back = back.to_vec_f32().unwrap();
    assert!(back.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
}

/// The kernels convert chunks of 8 elements (two 16-byte float32 vectors, one bf16 vector) and the short last chunk
/// element by element: every length from 1 to 17, and one past a multiple of 8, round as the host does both ways.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_rounding_at_every_chunk_tail() {
    let dev = Device::Cuda(gpu());
    let all = hard_values();
    for n in (1..=17).chain([4097]) {
        let v = &all[..n];
        let x = Tensor::from_vec(v.to_vec(), &[n]).unwrap().to_device(&dev).unwrap();
        let y = x.to_dtype(DType::BF16).unwrap();
        let got = y.to_vec_f32().unwrap();
        let back = y.to_dtype(DType::F32).unwrap().to_vec_f32().unwrap();
        for (i, &x) in v.iter().enumerate() {
            let want = f32::from(bf16::from_f32(x));
            let same = |g: f32| g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan());
            assert!(
                same(got[i]) && same(back[i]),
                "length {n}, element {i}: bf16({x:e}) = {} / {} on the GPU, {want:e} on the host",
                got[i],
                back[i]
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_cast_op_carries_the_gradient_back_to_float32() {
    let dev = Device::Cuda(gpu());
    let x = randn32(&[3, 5, 7], 1.0, 2).to_device(&dev).unwrap();
    let mut tape = Tape::new();
    tape.watch(&x);
    let y = cast(&mut tape, &x, DType::BF16).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let seed = randn32(y.shape(), 1.0, 3).to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
    let mut grads = tape.backward_from(&y, seed.clone()).unwrap();
    let dx = grads.take(&x).expect("a gradient for x");
    assert_eq!(dx.dtype(), DType::F32, "the gradient of a float32 input is float32");
    assert_eq!(dx.to_vec_f32().unwrap(), seed.to_vec_f32().unwrap());
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_ops_without_a_bf16_kernel_refuse_bf16_by_name() {
    let dev = Device::Cuda(gpu());
    let x = randn32(&[2, 3, 4, 5], 1.0, 4).to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
    // The losses compute in float32 by design (the model hands them float32 logits).
    let target = Tensor::zeros(&[2, 1, 4, 5], DType::BF16, &dev).unwrap();
    let err = cross_entropy(&mut Tape::no_grad(), &x, &target).unwrap_err().to_string();
    assert!(err.contains("cross_entropy") && err.contains("no bf16 kernel"), "{err}");
    // And a bf16 GPU tensor is 2 bytes per element on the host side of the accounting.
    assert_eq!(lkm_engine::profile::tensor_bytes(&x), 2.0 * x.numel() as f64);
}
