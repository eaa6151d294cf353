//! Multiplication by a constant (loss weights).
//!
//! ```text
//!   y = s x        dL/dx = s dL/dy
//! ```

use crate::autograd::{Backward, Tape};
use crate::tensor::{self, Tensor};
use crate::Result;

/// `s * x`.
pub fn scale(tape: &mut Tape, x: &Tensor, s: f64) -> Result<Tensor> {
    let y = tensor::scale(x, s)?;
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
