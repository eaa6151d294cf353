//! A new shape for the same row-major data (e.g. (G, L, C) tokens seen as (G L, C) rows for a linear layer).
//!
//! ```text
//!   y = x viewed with shape s (same elements, same order)      dL/dx = dL/dy viewed with x's shape
//! ```
//! Tensors are contiguous, so both directions share the storage and copy nothing.
//!
//! Cost (the counting rules are in [`ops`](crate::ops)): no bytes and no FLOPs in either direction.

use crate::autograd::{Backward, Tape};
use crate::tensor::Tensor;
use crate::Result;

/// `x` with shape `shape` (same number of elements).
pub fn reshape(tape: &mut Tape, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let y = x.with_shape(shape)?;
    tape.record(&[x], &y, ReshapeBackward { shape: x.shape().to_vec() });
    Ok(y)
}

struct ReshapeBackward {
    /// The input's shape.
    shape: Vec<usize>,
}

impl Backward for ReshapeBackward {
    fn name(&self) -> &'static str {
        "reshape"
    }

    fn backward(&self, grad_out: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad_out.with_shape(&self.shape)?)])
    }
}
