//! A change of storage type, with autograd: float32 <-> bf16 on the GPU (the mixed-precision boundary, as autocast
//! casts around the ops that run in bf16), float32 <-> float64 on the host.
//!
//! ```text
//!   y = round(x)          to bf16: nearest, ties to even; to a wider type: exact
//!   dL/dx = dL/dy converted back to x's type (the rounding's derivative is taken as 1, as autocast does)
//! ```
//!
//! The kernels (`cuda/cast.cu`) and the host conversions are [`Tensor::to_dtype`]'s; the CPU reference of the bf16
//! rounding is the `half` crate's `bf16::from_f32`, which the GPU tests compare against bit for bit.
//!
//! Cost per element (the counting rules are in [`ops`](crate::ops)): the input's and the output's element sizes in
//! bytes (6 for float32 <-> bf16), no FLOPs, in both directions. Memory-bound.

use crate::autograd::{Backward, Tape};
use crate::profile;
use crate::tensor::{DType, Tensor};
use crate::Result;

/// `x` stored as `dtype` (a cheap clone when it already is).
pub fn cast(tape: &mut Tape, x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    let range = profile::forward("cast", &[x], 0.0);
    let y = x.to_dtype(dtype)?;
    range.done([&y]);
    tape.record(&[x], &y, CastBackward(x.dtype()));
    Ok(y)
}

/// A weight or bias as a convolution or linear layer takes it ([`Weight::like`]): `value`, what the kernels read, in
/// the storage type of the op's input, and `master`, the parameter itself, which the op records on the tape and whose
/// gradient it returns in the master's type.
///
/// autocast's rule for these ops, with one difference: a float32 master's bf16 copy (the value) is made once per step,
/// not once per use (the tape keeps it, [`Tape::bf16_copy`]; in training the optimiser writes it with the update,
/// [`crate::nn::Params`]), and no cast is recorded: the op's weight gradient, which its kernels sum in float32, goes
/// to the float32 master as it is instead of being rounded to bf16 and widened again.
#[derive(Clone, Debug)]
pub struct Weight {
    /// The tensor the kernels read: `master`, or its bf16 copy when the op's input is bf16.
    pub value: Tensor,
    /// The parameter: the tape's input of the op, the gradient's type.
    pub master: Tensor,
}

impl Weight {
    /// `t` as the op whose input is `x` takes it: a float32 `t` beside a bf16 `x` reads as its bf16 copy; otherwise
    /// `t` itself. The one place where the precision policy turns a weight into the activations' storage type.
    pub fn like(tape: &mut Tape, t: &Tensor, x: &Tensor) -> Result<Weight> {
        let value = if x.dtype() == DType::BF16 && t.dtype() == DType::F32 { tape.bf16_copy(t)? } else { t.clone() };
        Ok(Weight { value, master: t.clone() })
    }

    /// The type of the master and of its gradient.
    pub fn dtype(&self) -> DType {
        self.master.dtype()
    }
}

/// The gradients [dx, dW, db?] of a convolution's or linear layer's GPU backward pass with dW and db (float32, as the
/// kernels sum them) in `dtype`, the type of the op's masters ([`Weight::dtype`]): unchanged for float32 masters,
/// rounded once for bf16 ones.
pub(crate) fn params_in(dtype: DType, mut grads: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
    for g in grads.iter_mut().skip(1) {
        *g = g.take().map(|g| g.to_dtype(dtype)).transpose()?;
    }
    Ok(grads)
}

/// The input's dtype, which the gradient is converted back to.
struct CastBackward(DType);

impl Backward for CastBackward {
    fn name(&self) -> &'static str {
        "cast"
    }

    fn backward(&self, grad_out: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad_out.to_dtype(self.0)?)])
    }
}
