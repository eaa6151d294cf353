//! Pointwise activations.
//!
//! ```text
//!   LeakyReLU(x) = x if x > 0 else 0.01 x        d/dx = 1 if x > 0 else 0.01
//!   SiLU(x)      = x * s(x), s = 1/(1+e^-x)      d/dx = s(x) * (1 + x * (1 - s(x)))
//!   softplus(x)  = ln(1 + e^x), = x for x > 20   d/dx = s(x), = 1 for x > 20
//! ```
//! The backward pass needs only the input; LeakyReLU's derivative is also that function of its output (same sign), so
//! LeakyReLU saves its output, which the next op usually keeps anyway, and its input can be freed.
//!
//! Cost per element (the counting rules are in [`ops`](crate::ops)): forward 8 bytes (read x, write y) and 2 FLOPs
//! (LeakyReLU), 4 (SiLU) or 3 (softplus); backward 12 bytes (read x and dL/dy, write dL/dx) and 2, 8 or 5 FLOPs.
//! Memory-bound.

use crate::autograd::{Backward, Tape};
use crate::device::cuda::GpuElement;
use crate::device::params::{kernel, EltwiseParams, Kernel};
use crate::profile;
use crate::tensor::{eltwise_gpu, map, zip_map, Real, Tensor};
use crate::{by_dtype, by_gpu_type, Result};

/// The pointwise functions of this file. The discriminants are the codes of `cuda/common.cuh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// LeakyReLU with negative slope 0.01 (nnU-Net's nonlinearity).
    LeakyRelu = 0,
    /// x * sigmoid(x) (Mamba's gate and conv nonlinearity).
    Silu = 1,
    /// ln(1 + e^x), linear above 20 as in PyTorch (Mamba's step size).
    Softplus = 2,
}

/// The negative slope of LeakyReLU.
pub const LEAKY_SLOPE: f64 = 0.01;
/// Above this input softplus returns its input (as PyTorch's threshold does).
pub const SOFTPLUS_THRESHOLD: f64 = 20.0;

fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

impl Activation {
    fn name(self) -> &'static str {
        match self {
            Activation::LeakyRelu => "leaky_relu",
            Activation::Silu => "silu",
            Activation::Softplus => "softplus",
        }
    }

    /// The forward and backward kernels of cuda/elementwise.cu for storage type `T`.
    fn kernels<T: GpuElement>(self) -> (Kernel<EltwiseParams<T>>, Kernel<EltwiseParams<T>>) {
        match self {
            Activation::LeakyRelu => (kernel::leaky_relu_forward::<T>(), kernel::leaky_relu_backward::<T>()),
            Activation::Silu => (kernel::silu_forward::<T>(), kernel::silu_backward::<T>()),
            Activation::Softplus => (kernel::softplus_forward::<T>(), kernel::softplus_backward::<T>()),
        }
    }

    /// f(x).
    pub fn value<T: Real>(self, x: T) -> T {
        match self {
            Activation::LeakyRelu => {
                if x > T::zero() {
                    x
                } else {
                    x * T::from_f64(LEAKY_SLOPE)
                }
            }
            Activation::Silu => x * sigmoid(x),
            Activation::Softplus => {
                if x > T::from_f64(SOFTPLUS_THRESHOLD) {
                    x
                } else {
                    x.exp().ln_1p()
                }
            }
        }
    }

    /// f'(x).
    pub fn derivative<T: Real>(self, x: T) -> T {
        match self {
            Activation::LeakyRelu => {
                if x > T::zero() {
                    T::one()
                } else {
                    T::from_f64(LEAKY_SLOPE)
                }
            }
            Activation::Silu => {
                let s = sigmoid(x);
                s * (T::one() + x * (T::one() - s))
            }
            Activation::Softplus => {
                if x > T::from_f64(SOFTPLUS_THRESHOLD) {
                    T::one()
                } else {
                    sigmoid(x)
                }
            }
        }
    }
}

/// Applies `act` to every element of `x`.
pub fn activation(tape: &mut Tape, x: &Tensor, act: Activation) -> Result<Tensor> {
    fn cpu<T: Real>(x: &Tensor, act: Activation) -> Result<Tensor> {
        map::<T>(x, |v| act.value(v))
    }
    fn gpu<T: GpuElement>(x: &Tensor, act: Activation) -> Result<Tensor> {
        let shapes = format!("{} {:?}", act.name(), x.shape());
        let xb = x.gpu_operand::<T>(act.name())?;
        Tensor::from_gpu(eltwise_gpu(act.kernels::<T>().0, xb, None, 1.0, act.name(), &shapes)?, x.shape())
    }
    let range = profile::forward(act.name(), &[x], 0.0);
    let y = match by_gpu_type!(x, gpu(x, act)) {
        Some(y) => y?,
        None => by_dtype!(x.dtype(), cpu(x, act))?,
    };
    range.done([&y]);
    // LeakyReLU's derivative is the same function of its output as of its input (the output has the input's sign,
    // 0 and NaN included), and the output is usually kept anyway (the next convolution saves its input), so saving
    // it lets the input be freed after the forward pass. SiLU and softplus need their input.
    let saved = if act == Activation::LeakyRelu { y.clone() } else { x.clone() };
    tape.record(&[x], &y, ActivationBackward { saved, act });
    Ok(y)
}

/// LeakyReLU(x), slope 0.01.
pub fn leaky_relu(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    activation(tape, x, Activation::LeakyRelu)
}

/// SiLU(x) = x * sigmoid(x).
pub fn silu(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    activation(tape, x, Activation::Silu)
}

/// softplus(x) = ln(1 + e^x), linear above 20.
pub fn softplus(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    activation(tape, x, Activation::Softplus)
}

struct ActivationBackward {
    /// Where the derivative is taken: the output for LeakyReLU, the input otherwise (see [`activation`]).
    saved: Tensor,
    act: Activation,
}

impl Backward for ActivationBackward {
    fn name(&self) -> &'static str {
        self.act.name()
    }

    fn backward(&self, grad_out: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(activation_grad(&self.saved, grad_out, self.act)?)])
    }
}

/// `grad_out * act'(at)`: an activation's backward, with `at` where its derivative is taken (the output for
/// LeakyReLU, the input otherwise; see [`activation`]).
pub(crate) fn activation_grad(at: &Tensor, grad_out: &Tensor, act: Activation) -> Result<Tensor> {
    fn cpu<T: Real>(x: &Tensor, g: &Tensor, act: Activation) -> Result<Tensor> {
        zip_map::<T>(x, g, |x, g| g * act.derivative(x))
    }
    fn gpu<T: GpuElement>(x: &Tensor, g: &Tensor, act: Activation) -> Result<Tensor> {
        let shapes = format!("{} {:?}", act.name(), x.shape());
        let (xb, gb) = (x.gpu_operand::<T>(act.name())?, g.gpu_operand::<T>(act.name())?);
        Tensor::from_gpu(eltwise_gpu(act.kernels::<T>().1, xb, Some(gb), 1.0, act.name(), &shapes)?, x.shape())
    }
    at.check_same_kind(grad_out, "activation backward")?;
    match by_gpu_type!(at, gpu(at, grad_out, act)) {
        Some(dx) => dx,
        None => by_dtype!(at.dtype(), cpu(at, grad_out, act)),
    }
}
