//! Concatenation of tensors along axis 1 (the channels of feature maps): the decoder's [upsampled, skip].
//!
//! Inputs x_k of shapes (N, C_k, rest...) with equal N and rest give y of shape (N, sum C_k, rest...):
//!
//! ```text
//!   y[n, o_k + c, r] = x_k[n, c, r],    o_k = C_0 + ... + C_(k-1)
//!   dL/dx_k[n, c, r] = dL/dy[n, o_k + c, r]      (the gradient split back at the same offsets)
//! ```
//! For each n the inputs' blocks of C_k * prod(rest) elements are contiguous, so both directions copy whole blocks
//! (on the GPU one `copy_rows` launch per input, each writing its own blocks, so every output element is written).
//!
//! On the GPU the inputs are all float32 or all bf16, and the output and the gradients have their storage type; the
//! copies do no arithmetic, so they are bit-exact in either type.
//!
//! Cost per element (the counting rules are in [`ops`](crate::ops)), with E the storage size (4 bytes float32, 2
//! bf16): 2E bytes (one read, one write) and no FLOPs, in both directions.

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_vec, GpuBuffer, GpuElement};
use crate::device::params::{kernel, CopyRowsParams};
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, by_gpu_type, ensure, Result};

/// Concatenates tensors of rank >= 2 along axis 1; all other axes must be equal.
pub fn concat_channels(tape: &mut Tape, xs: &[&Tensor]) -> Result<Tensor> {
    ensure!(!xs.is_empty(), Shape, "concat_channels: no inputs");
    let first = xs[0];
    ensure!(first.rank() >= 2, Shape, "concat_channels: inputs need rank >= 2, got shape {:?}", first.shape());
    for x in &xs[1..] {
        first.check_same_kind(x, "concat_channels")?;
        let same_rest =
            x.rank() == first.rank() && x.shape()[0] == first.shape()[0] && x.shape()[2..] == first.shape()[2..];
        ensure!(
            same_rest,
            Shape,
            "concat_channels: shapes must agree on every axis but 1: {:?}",
            xs.iter().map(|x| x.shape()).collect::<Vec<_>>()
        );
    }
    let channels: Vec<usize> = xs.iter().map(|x| x.shape()[1]).collect();
    let mut shape = first.shape().to_vec();
    shape[1] = channels.iter().sum();
    let range = profile::forward("concat_channels", &[first], 0.0);
    let y = match by_gpu_type!(first, forward_gpu(xs, &shape)) {
        Some(y) => y?,
        None => by_dtype!(first.dtype(), forward_cpu(xs, &shape))?,
    };
    range.done([&y]);
    tape.record(xs, &y, ConcatBackward { shape, channels });
    Ok(y)
}

/// The elements per channel: the product of the axes after axis 1.
fn inner_size(shape: &[usize]) -> usize {
    shape[2..].iter().product()
}

fn forward_cpu<T: Real>(xs: &[&Tensor], shape: &[usize]) -> Result<Tensor> {
    let inner = inner_size(shape);
    let srcs = xs.iter().map(|x| x.cpu::<T>()).collect::<Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(shape.iter().product());
    for n in 0..shape[0] {
        for (src, x) in srcs.iter().zip(xs) {
            let block = x.shape()[1] * inner;
            out.extend_from_slice(&src[n * block..(n + 1) * block]);
        }
    }
    Tensor::from_vec(out, shape)
}

/// Copies `rows` runs of `len` elements from `src` (run r at `r * src_row + src_off`) to `dst` (at
/// `r * dst_row + dst_off`), with the `copy_rows` kernel for storage type `T`.
pub(crate) fn copy_rows_gpu<T: GpuElement>(
    src: &GpuBuffer<T>,
    dst: &mut GpuBuffer<T>,
    rows: usize,
    len: usize,
    (src_row, src_off): (usize, usize),
    (dst_row, dst_off): (usize, usize),
    shapes: &str,
) -> Result<()> {
    let [rows_, len_, src_row, src_off, dst_row, dst_off] =
        [rows, len, src_row, src_off, dst_row, dst_off].map(|v| v as i64);
    let p = CopyRowsParams {
        src: src.ptr(),
        dst: dst.ptr_mut(),
        rows: rows_,
        len: len_,
        src_row,
        src_off,
        dst_row,
        dst_off,
    };
    src.gpu.launch(kernel::copy_rows::<T>(), grid_vec::<T>(rows * len), &p, shapes)
}

/// The GPU forward, for storage type `T`: each input's block of each sample goes to its channel offset in the output.
fn forward_gpu<T: GpuElement>(xs: &[&Tensor], shape: &[usize]) -> Result<Tensor> {
    let inner = inner_size(shape);
    let out_row = shape[1] * inner;
    let gpu = &xs[0].gpu_operand::<T>("concat_channels")?.gpu;
    let mut y = gpu.alloc_of::<T>(shape.iter().product(), "concat_channels")?;
    let mut offset = 0;
    for x in xs {
        // check_same_kind has put every input on the first one's GPU, in its storage type.
        let xb = x.gpu_operand::<T>("concat_channels")?;
        let block = x.shape()[1] * inner;
        let shapes = format!("concat_channels {:?} into {shape:?}", x.shape());
        copy_rows_gpu(xb, &mut y, shape[0], block, (block, 0), (out_row, offset), &shapes)?;
        offset += block;
    }
    Tensor::from_gpu(y, shape)
}

struct ConcatBackward {
    /// The output's shape.
    shape: Vec<usize>,
    /// C_k of each input.
    channels: Vec<usize>,
}

impl Backward for ConcatBackward {
    fn name(&self) -> &'static str {
        "concat_channels"
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut offset = 0;
        let mut grads = Vec::with_capacity(self.channels.len());
        for (&c, &need) in self.channels.iter().zip(needs) {
            grads.push(if !need {
                None
            } else {
                Some(match by_gpu_type!(grad_out, split_gpu(grad_out, &self.shape, offset, c)) {
                    Some(g) => g?,
                    None => by_dtype!(grad_out.dtype(), split_cpu(grad_out, &self.shape, offset, c))?,
                })
            });
            offset += c;
        }
        Ok(grads)
    }
}

/// Channels [offset, offset + c) of `g` (shape `shape`), as a tensor of shape (N, c, rest...).
fn split_cpu<T: Real>(g: &Tensor, shape: &[usize], offset: usize, c: usize) -> Result<Tensor> {
    let src = g.cpu::<T>()?;
    let inner = inner_size(shape);
    let (row, block) = (shape[1] * inner, c * inner);
    let mut out = Vec::with_capacity(shape[0] * block);
    for n in 0..shape[0] {
        let start = n * row + offset * inner;
        out.extend_from_slice(&src[start..start + block]);
    }
    let mut part = shape.to_vec();
    part[1] = c;
    Tensor::from_vec(out, &part)
}

/// The GPU version of [`split_cpu`], for storage type `T`.
fn split_gpu<T: GpuElement>(g: &Tensor, shape: &[usize], offset: usize, c: usize) -> Result<Tensor> {
    let g = g.gpu_operand::<T>("concat_channels backward")?;
    let inner = inner_size(shape);
    let (row, block) = (shape[1] * inner, c * inner);
    let mut part = shape.to_vec();
    part[1] = c;
    let mut out = g.gpu.alloc_of::<T>(shape[0] * block, "concat_channels gradient")?;
    let shapes = format!("concat_channels backward {shape:?} channels [{offset}, {})", offset + c);
    copy_rows_gpu(g, &mut out, shape[0], block, (row, offset * inner), (block, 0), &shapes)?;
    Tensor::from_gpu(out, &part)
}
