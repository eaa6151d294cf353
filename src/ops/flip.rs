//! Reversal of token sequences, for the backward-direction Mamba of a bidirectional layer.
//!
//! ```text
//!   y[g, l, c] = x[g, L - 1 - l, c]        dL/dx = flip(dL/dy)    (the flip is its own inverse and transpose)
//! ```
//! Each token's C channels are contiguous, so a flip copies whole rows of C.

use crate::autograd::{Backward, Tape};
use crate::ops::seq_dims;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, Result};

/// Reverses the L axis of token sequences (G, L, C).
pub fn flip_seq(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    seq_dims(x, "flip_seq")?;
    let y = by_dtype!(x.dtype(), flip_cpu(x))?;
    tape.record(&[x], &y, FlipBackward);
    Ok(y)
}

/// The flip of a (G, L, C) tensor whose shape is already checked.
fn flip_cpu<T: Real>(x: &Tensor) -> Result<Tensor> {
    let (g, l, c) = seq_dims(x, "flip_seq")?;
    let src = x.cpu::<T>()?;
    let mut out = Vec::with_capacity(src.len());
    for seq in 0..g {
        for tok in (0..l).rev() {
            let start = (seq * l + tok) * c;
            out.extend_from_slice(&src[start..start + c]);
        }
    }
    Tensor::from_vec(out, x.shape())
}

struct FlipBackward;

impl Backward for FlipBackward {
    fn name(&self) -> &'static str {
        "flip_seq"
    }

    fn backward(&self, grad_out: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(by_dtype!(grad_out.dtype(), flip_cpu(grad_out))?)])
    }
}
