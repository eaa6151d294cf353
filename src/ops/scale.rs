//! Multiplication by a constant (loss weights).
//!
//! ```text
//!   y = s x        dL/dx = s dL/dy
//! ```
//!
//! Cost per element (the counting rules are in [`ops`](crate::ops)): 8 bytes and 1 FLOP, in both directions.

use crate::autograd::{Backward, Tape};
use crate::profile;
use crate::tensor::{self, Tensor};
use crate::Result;

/// `s * x`.
pub fn scale(tape: &mut Tape, x: &Tensor, s: f64) -> Result<Tensor> {
    let range = profile::forward("scale", &[x], 0.0);
    let y = tensor::scale(x, s)?;
    range.done([&y]);
    tape.record(&[x], &y, ScaleBackward(s));
    Ok(y)
}

struct ScaleBackward(f64);

impl Backward for ScaleBackward {
    fn name(&self) -> &'static str {
        "scale"
    }

    fn backward(&self, grad_out: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(tensor::scale(grad_out, self.0)?)])
    }
}
