//! Activation checkpointing: a piece of the forward pass whose saved tensors are not kept but recomputed in the
//! backward pass, memory traded for time.
//!
//! [`checkpoint`]`(tape, name, inputs, f)` runs `y = f(inputs)` on a tape that records nothing, so none of `f`'s ops
//! keeps anything, and records one node that keeps only `inputs`. Its backward runs `f` again on a fresh tape that
//! watches the inputs wanting gradients and back-propagates dL/dy through it:
//!
//! ```text
//!   kept:  the inputs of f (instead of everything f's ops save)      extra work: f's forward once more
//!   dL/d(inputs) = backward of f's ops, from dL/dy, on the recomputed graph
//! ```
//!
//! `f` must compute from `inputs` alone (parameters included, given as inputs: a tensor it captured would get no
//! gradient) and be deterministic, so that the second run rebuilds the same values; every op of the engine is.
//!
//! ```
//! use lkm_engine::autograd::{checkpoint::checkpoint, Tape};
//! use lkm_engine::ops::activation::silu;
//! use lkm_engine::ops::linear::linear;
//! use lkm_engine::Tensor;
//!
//! # fn main() -> lkm_engine::Result<()> {
//! let x = Tensor::from_vec(vec![0.5f64, -1.0, 2.0], &[1, 3])?;
//! let w = Tensor::from_vec(vec![1.0f64, 2.0, -1.0, 0.5, 0.5, 0.5], &[2, 3])?;
//! let f = |t: &mut Tape, v: &[Tensor]| -> lkm_engine::Result<Tensor> {
//!     let h = linear(t, &v[0], &v[1], None)?;
//!     silu(t, &h)
//! };
//! let grads = |kept: bool| -> lkm_engine::Result<Vec<f64>> {
//!     let mut tape = Tape::new();
//!     tape.watch(&w);
//!     let y = match kept {
//!         true => f(&mut tape, &[x.clone(), w.clone()])?,
//!         false => checkpoint(&mut tape, "silu(xW)", &[&x, &w], f)?,
//!     };
//!     assert_eq!(tape.len(), if kept { 2 } else { 1 }); // one node, keeping x and w only
//!     let seed = Tensor::from_vec(vec![1.0f64, 1.0], &[1, 2])?;
//!     tape.backward_from(&y, seed)?.get(&w).expect("w is watched").to_vec_f64()
//! };
//! assert_eq!(grads(true)?, grads(false)?); // the same gradients, bit for bit
//! # Ok(())
//! # }
//! ```

use super::{Backward, Tape};
use crate::tensor::Tensor;
use crate::Result;

/// The piece of forward pass a checkpoint recomputes.
type Piece = Box<dyn Fn(&mut Tape, &[Tensor]) -> Result<Tensor>>;

/// `f(inputs)`, recorded as one node that keeps only `inputs` and recomputes `f` in the backward pass (see the module
/// documentation); `name` names the node in errors and profiles.
pub fn checkpoint(
    tape: &mut Tape,
    name: &'static str,
    inputs: &[&Tensor],
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor> + 'static,
) -> Result<Tensor> {
    let xs: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
    let y = f(&mut Tape::no_grad(), &xs)?;
    if tape.needs_grad(inputs) {
        tape.record(inputs, &y, Checkpoint { name, inputs: xs, f: Box::new(f) });
    }
    Ok(y)
}

struct Checkpoint {
    name: &'static str,
    inputs: Vec<Tensor>,
    f: Piece,
}

impl Backward for Checkpoint {
    fn name(&self) -> &'static str {
        self.name
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut tape = Tape::new();
        for (x, &need) in self.inputs.iter().zip(needs) {
            if need {
                tape.watch(x);
            }
        }
        let y = (self.f)(&mut tape, &self.inputs)?;
        y.check_shape(grad_out.shape(), self.name)?;
        let mut grads = tape.backward_from(&y, grad_out.clone())?;
        // An input given twice gets its (summed) gradient once; the outer tape adds the entries per input.
        Ok(self.inputs.iter().zip(needs).map(|(x, &need)| if need { grads.take(x) } else { None }).collect())
    }
}
