//! Elementwise addition of two tensors of the same shape (residual connections).
//!
//! ```text
//!   y = a + b        dL/da = dL/dy,  dL/db = dL/dy
//! ```
//!
//! Cost per element (the counting rules are in [`ops`](crate::ops)): forward 12 bytes (read a and b, write y) and
//! 1 FLOP; backward nothing (dL/dy itself is handed to both inputs).

use crate::autograd::{Backward, Tape};
use crate::profile;
use crate::tensor::{self, Tensor};
use crate::Result;

/// `a + b`.
pub fn add(tape: &mut Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let range = profile::forward("add", &[a, b], 0.0);
    let y = tensor::add(a, b)?;
    range.done([&y]);
    tape.record(&[a, b], &y, AddBackward);
    Ok(y)
}

struct AddBackward;

impl Backward for AddBackward {
    fn name(&self) -> &'static str {
        "add"
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(needs.iter().map(|&n| n.then(|| grad_out.clone())).collect())
    }
}
