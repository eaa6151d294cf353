//! Parameter initialisation, as PyTorch and nnU-Net do it, on the CPU in float32 (moved to the device afterwards).

use rand::rngs::StdRng;

use crate::tensor::{DType, Tensor};

/// PyTorch's default for Linear and Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform
/// with a = sqrt(5) gives exactly this bound for the weight).
pub fn default_uniform(shape: &[usize], fan_in: usize, rng: &mut StdRng) -> Tensor {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Tensor::uniform(shape, -bound, bound, DType::F32, rng).expect("valid shape")
}

/// nnU-Net's InitWeights_He(neg_slope = 1e-2) for convolutions: normal with std = sqrt(2 / ((1 + a^2) fan_in)),
/// fan_in = in_channels * kernel volume (PyTorch's kaiming_normal_, mode fan_in).
pub fn he_normal(shape: &[usize], fan_in: usize, rng: &mut StdRng) -> Tensor {
    let a: f64 = 1e-2;
    let std = (2.0 / ((1.0 + a * a) * fan_in as f64)).sqrt();
    let t = Tensor::randn(shape, DType::F32, rng).expect("valid shape");
    crate::tensor::scale(&t, std).expect("CPU tensor")
}

/// A float32 CPU tensor filled with `value`.
pub fn constant(shape: &[usize], value: f64) -> Tensor {
    Tensor::full(shape, value, DType::F32, &crate::device::Device::Cpu).expect("valid shape")
}
