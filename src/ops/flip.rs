//! Reversal of token sequences, and the order ([`Order`]) in which the sequence ops walk them. The backward-direction
//! Mamba of a bidirectional layer no longer copies its tokens reversed: its conv1d and scan take
//! [`Order::Reversed`]. `flip_seq` stays the op that defines what they must give (`flip_seq(op(flip_seq(x)))`, which
//! their tests check them against).
//!
//! ```text
//!   y[g, l, c] = x[g, L - 1 - l, c]        dL/dx = flip(dL/dy)    (the flip is its own inverse and transpose)
//! ```
//! Each token's C channels are contiguous, so a flip copies whole rows of C (on the GPU, a thread per 16 bytes of
//! the output: one aligned vector copy when C is a multiple of 16 bytes' elements, else an element-wise gather
//! stored as one vector; `cuda/layout.cu`).
//!
//! On the GPU x may be float32 or bf16; y and dL/dx have its storage type, and the flip is a bit-exact copy.
//!
//! Cost per element (the counting rules are in [`ops`](crate::ops)), with E the storage size (4 bytes float32, 2
//! bf16): 2E bytes (one read, one write) and no FLOPs, in both directions.

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_vec, GpuElement};
use crate::device::params::{kernel, FlipParams};
use crate::ops::seq_dims;
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, by_gpu_type, Result};

/// The order in which a sequence op (the causal conv1d, the selective scan) walks each sequence's tokens: as stored,
/// or from the last token to the first. `Reversed` gives the op on reversed sequences, written back in stored order,
/// `flip_seq(op(flip_seq(x)))`, without the two copies: the backward-direction Mamba of a bidirectional layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// Token t is the sequence's t-th stored token.
    #[default]
    Stored,
    /// Token t is the sequence's (L - 1 - t)-th stored token.
    Reversed,
}

impl Order {
    /// Where token `t` of a sequence of `len` tokens is stored.
    pub fn position(self, t: usize, len: usize) -> usize {
        match self {
            Order::Stored => t,
            Order::Reversed => len - 1 - t,
        }
    }

    /// The kernels' `flip` field (cuda/conv1d.cuh's Conv1dParams, cuda/scan.cuh's ScanParams): 1 for `Reversed`.
    pub(crate) fn kernel_flip(self) -> i32 {
        (self == Order::Reversed) as i32
    }
}

/// Reverses the L axis of token sequences (G, L, C).
pub fn flip_seq(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    let range = profile::forward("flip_seq", &[x], 0.0);
    let y = flip(x)?;
    range.done([&y]);
    tape.record(&[x], &y, FlipBackward);
    Ok(y)
}

/// The flip of `x` (G, L, C) on its device.
fn flip(x: &Tensor) -> Result<Tensor> {
    let dims = seq_dims(x, "flip_seq")?;
    match by_gpu_type!(x, flip_gpu(x, dims)) {
        Some(y) => y,
        None => by_dtype!(x.dtype(), flip_cpu(x)),
    }
}

/// The flip of a GPU tensor of storage type `T` with sizes `(G, L, C)`: the `flip_seq` kernel.
fn flip_gpu<T: GpuElement>(x: &Tensor, (g, l, c): (usize, usize, usize)) -> Result<Tensor> {
    let xb = x.gpu_operand::<T>("flip_seq")?;
    let gpu = &xb.gpu;
    let mut y = gpu.alloc_of::<T>(x.numel(), "flip_seq")?;
    let [g, l, c] = [g, l, c].map(|v| v as i64);
    let p = FlipParams { x: xb.ptr(), y: y.ptr_mut(), G: g, L: l, C: c };
    gpu.launch(kernel::flip_seq::<T>(), grid_vec::<T>(x.numel()), &p, &format!("{:?}", x.shape()))?;
    Tensor::from_gpu(y, x.shape())
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
        Ok(vec![Some(flip(grad_out)?)])
    }
}
