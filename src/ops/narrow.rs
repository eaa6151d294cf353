//! A slice of the last axis: splits Mamba's in_proj output into x and z, and x_proj's output into dt, B and C.
//!
//! For x of shape (..., K) and 0 <= start, start + len <= K:
//!
//! ```text
//!   y[..., k] = x[..., start + k],  k < len          y: (..., len)
//!   dL/dx[..., j] = dL/dy[..., j - start] for start <= j < start + len, else 0
//! ```
//! On the GPU the backward writes every element of dL/dx, zeros included, so it needs no zero-filled buffer.
//!
//! Cost (the counting rules are in [`ops`](crate::ops)): forward 8 bytes per element of y and no FLOPs; backward
//! 4 (1 + len/K) bytes per element of dL/dx (all K columns written, zeros included; dL/dy read once) and no FLOPs.

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_1d, GpuBuffer};
use crate::device::params::{kernel, CopyRowsParams};
use crate::ops::concat::copy_rows_gpu;
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, ensure, Result};

/// Elements [start, start + len) of the last axis of `x` (any rank).
pub fn narrow_last(tape: &mut Tape, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    let k = *x.shape().last().expect("tensors have rank >= 1");
    ensure!(
        len > 0 && start <= k && len <= k - start,
        Shape,
        "narrow_last: slice [{start}, {}) is empty or outside the last axis of size {k} (shape {:?})",
        start.saturating_add(len),
        x.shape()
    );
    let range = profile::forward("narrow_last", &[x], 0.0);
    let y = match x.gpu_buffer() {
        Some(xb) => narrow_gpu(xb, x.shape(), start, len)?,
        None => by_dtype!(x.dtype(), narrow_cpu(x, start, len))?,
    };
    range.done([&y]);
    tape.record(&[x], &y, NarrowBackward { shape: x.shape().to_vec(), start });
    Ok(y)
}

fn narrow_cpu<T: Real>(x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    let src = x.cpu::<T>()?;
    let k = x.shape()[x.rank() - 1];
    let rows = x.numel() / k;
    let mut out = Vec::with_capacity(rows * len);
    for r in 0..rows {
        out.extend_from_slice(&src[r * k + start..r * k + start + len]);
    }
    let mut shape = x.shape().to_vec();
    shape[x.rank() - 1] = len;
    Tensor::from_vec(out, &shape)
}

fn narrow_gpu(x: &GpuBuffer, shape: &[usize], start: usize, len: usize) -> Result<Tensor> {
    let k = shape[shape.len() - 1];
    let rows = x.slice.len() / k;
    let mut out_shape = shape.to_vec();
    out_shape[shape.len() - 1] = len;
    let mut y = x.gpu.alloc(rows * len, "narrow_last")?;
    let shapes = format!("narrow_last {shape:?} [{start}, {})", start + len);
    copy_rows_gpu(x, &mut y, rows, len, (k, start), (len, 0), &shapes)?;
    Tensor::from_gpu(y, &out_shape)
}

struct NarrowBackward {
    /// The input's shape.
    shape: Vec<usize>,
    start: usize,
}

impl Backward for NarrowBackward {
    fn name(&self) -> &'static str {
        "narrow_last"
    }

    fn backward(&self, grad_out: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let dx = match grad_out.gpu_buffer() {
            Some(gb) => widen_gpu(gb, grad_out.shape(), &self.shape, self.start)?,
            None => by_dtype!(grad_out.dtype(), widen_cpu(grad_out, &self.shape, self.start))?,
        };
        Ok(vec![Some(dx)])
    }
}

/// The gradient `g` of the slice written at `start` into zeros of the input's shape.
fn widen_cpu<T: Real>(g: &Tensor, shape: &[usize], start: usize) -> Result<Tensor> {
    let src = g.cpu::<T>()?;
    let len = g.shape()[g.rank() - 1];
    let k = shape[shape.len() - 1];
    let mut out = vec![T::zero(); shape.iter().product()];
    for (r, row) in src.chunks_exact(len).enumerate() {
        out[r * k + start..r * k + start + len].copy_from_slice(row);
    }
    Tensor::from_vec(out, shape)
}

/// The GPU version of [`widen_cpu`]: the `narrow_backward` kernel writes the slice and the zeros around it.
fn widen_gpu(g: &GpuBuffer, g_shape: &[usize], shape: &[usize], start: usize) -> Result<Tensor> {
    let len = g_shape[g_shape.len() - 1];
    let k = shape[shape.len() - 1];
    let numel: usize = shape.iter().product();
    let gpu = &g.gpu;
    let mut dx = gpu.alloc(numel, "narrow_last gradient")?;
    let [rows, k, start, len] = [numel / k, k, start, len].map(|v| v as i64);
    // dx is rows x k; g, rows x len, lands at column `start`.
    let p = CopyRowsParams {
        src: g.ptr(),
        dst: dx.ptr_mut(),
        rows,
        len,
        src_row: len,
        src_off: 0,
        dst_row: k,
        dst_off: start,
    };
    let shapes = format!("narrow_last backward {g_shape:?} into {shape:?}");
    gpu.launch(kernel::narrow_backward, grid_1d(numel), &p, &shapes)?;
    Tensor::from_gpu(dx, shape)
}
