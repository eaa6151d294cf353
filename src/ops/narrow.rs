//! A slice along one axis: splits Mamba's in_proj weight into the rows that make x and those that make z (the first
//! axis), and x_proj's output into dt, B and C (the last axis).
//!
//! For x of shape (s_0, ..., s_{r-1}), an axis a and 0 <= start, start + len <= s_a, with the axes before a flattened
//! to `outer` and those after it to `inner` (1 for the last axis, and `outer` is 1 for the first):
//!
//! ```text
//!   y[o, k, i] = x[o, start + k, i],  k < len            y: s_a replaced by len
//!   dL/dx[o, j, i] = dL/dy[o, j - start, i] for start <= j < start + len, else 0
//! ```
//! In memory x is `outer` rows of K = s_a * inner contiguous elements, and the slice is the contiguous run
//! [start * inner, (start + len) * inner) of each row, so one row copy serves every axis: a slice of the last axis
//! is a short run of every row, a slice of the first axis (rows of a weight (Cout, Cin)) one contiguous range.
//! On the GPU the backward writes every element of dL/dx, zeros included, so it needs no zero-filled buffer. When
//! several slices of one tensor are used (in_proj's x and z rows; x_proj's dt, B and C), only the first of them to
//! run in the backward pass makes that full gradient: every later one adds its slice into it in place
//! (`Backward::add_into`, kernel `narrow_add_backward`), so no further full-size gradient is made, zero-filled or
//! added by the tape.
//!
//! On the GPU x may be float32 or bf16; y and dL/dx have its storage type, and both directions are bit-exact copies.
//!
//! Cost (the counting rules are in [`ops`](crate::ops)), with E the storage size (4 bytes float32, 2 bf16): forward
//! 2E bytes per element of y and no FLOPs; backward E (1 + len/s_a) bytes per element of dL/dx (all of dL/dx
//! written, zeros included; dL/dy read once) and no FLOPs, or, added into an existing gradient, 3E bytes per element
//! of the slice and one FLOP.

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_1d, grid_vec, GpuElement};
use crate::device::params::{kernel, ConstPtr, CopyRowsParams, MutPtr};
use crate::ops::concat::copy_rows_gpu;
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, by_gpu_type, ensure, Result};

/// Elements [start, start + len) of axis `axis` of `x` (any rank); the other axes are kept whole.
pub fn narrow(tape: &mut Tape, x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    ensure!(
        axis < x.rank(),
        Shape,
        "narrow: axis {axis} is outside a tensor of rank {} (shape {:?}); axes count from 0",
        x.rank(),
        x.shape()
    );
    let size = x.shape()[axis];
    ensure!(
        len > 0 && start <= size && len <= size - start,
        Shape,
        "narrow: slice [{start}, {}) is empty or outside axis {axis} of size {size} (shape {:?})",
        start.saturating_add(len),
        x.shape()
    );
    let slice = RowSlice::of(x.shape(), axis, start, len);
    let range = profile::forward("narrow", &[x], 0.0);
    let y = match by_gpu_type!(x, narrow_gpu(x, &slice)) {
        Some(y) => y?,
        None => by_dtype!(x.dtype(), narrow_cpu(x, &slice))?,
    };
    range.done([&y]);
    tape.record(&[x], &y, NarrowBackward { slice });
    Ok(y)
}

/// A slice seen in memory: `rows` rows of `row` elements, of which the run [`start`, `start + len`) is kept.
struct RowSlice {
    /// The input's shape.
    shape: Vec<usize>,
    /// The output's shape: the input's with the sliced axis shortened.
    out_shape: Vec<usize>,
    /// outer: the product of the sizes before the axis.
    rows: usize,
    /// K = s_a * inner: elements per row of the input.
    row: usize,
    /// start * inner.
    start: usize,
    /// len * inner: elements per row of the output.
    len: usize,
}

impl RowSlice {
    fn of(shape: &[usize], axis: usize, start: usize, len: usize) -> RowSlice {
        let inner: usize = shape[axis + 1..].iter().product();
        let mut out_shape = shape.to_vec();
        out_shape[axis] = len;
        RowSlice {
            shape: shape.to_vec(),
            out_shape,
            rows: shape[..axis].iter().product(),
            row: shape[axis] * inner,
            start: start * inner,
            len: len * inner,
        }
    }

    /// The rows of a slice's gradient `src` (rows x len) at column `start` of the rows of the input's gradient `dst`
    /// (rows x row): the narrow backward kernels' parameters.
    fn gradient_params<T>(&self, src: ConstPtr<T>, dst: MutPtr<T>) -> CopyRowsParams<T> {
        let [rows, row, start, len] = [self.rows, self.row, self.start, self.len].map(|v| v as i64);
        CopyRowsParams { src, dst, rows, len, src_row: len, src_off: 0, dst_row: row, dst_off: start }
    }

    /// The input's and output's shapes with the slice, for GPU error messages.
    fn describe(&self, what: &str) -> String {
        let (s, l) = (self.start, self.len);
        format!("{what} {:?} -> {:?} (rows of {}, run [{s}, {}))", self.shape, self.out_shape, self.row, s + l)
    }
}

fn narrow_cpu<T: Real>(x: &Tensor, s: &RowSlice) -> Result<Tensor> {
    let src = x.cpu::<T>()?;
    let mut out = Vec::with_capacity(s.rows * s.len);
    // An axis of size 0 after the sliced one makes rows of 0 elements; `max(1)` then walks the empty input once.
    for row in src.chunks_exact(s.row.max(1)) {
        out.extend_from_slice(&row[s.start..s.start + s.len]);
    }
    Tensor::from_vec(out, &s.out_shape)
}

/// The GPU version of [`narrow_cpu`], for storage type `T`.
fn narrow_gpu<T: GpuElement>(x: &Tensor, s: &RowSlice) -> Result<Tensor> {
    debug_assert_eq!(x.shape(), s.shape);
    let xb = x.gpu_operand::<T>("narrow")?;
    let mut y = xb.gpu.alloc_of::<T>(s.rows * s.len, "narrow")?;
    copy_rows_gpu(xb, &mut y, s.rows, s.len, (s.row, s.start), (s.len, 0), &s.describe("narrow"))?;
    Tensor::from_gpu(y, &s.out_shape)
}

struct NarrowBackward {
    slice: RowSlice,
}

impl Backward for NarrowBackward {
    fn name(&self) -> &'static str {
        "narrow"
    }

    fn backward(&self, grad_out: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let dx = match by_gpu_type!(grad_out, widen_gpu(grad_out, &self.slice)) {
            Some(dx) => dx?,
            None => by_dtype!(grad_out.dtype(), widen_cpu(grad_out, &self.slice))?,
        };
        Ok(vec![Some(dx)])
    }

    /// dL/dx's slice added into the input's gradient so far, in place, when nothing else holds its storage: no
    /// zero-filled (rows x K) gradient and no full-size add for the second and later slices of one tensor (x_proj's
    /// dt, B and C; in_proj's weight rows).
    fn add_into(&self, grad_out: &Tensor, grad: &mut Tensor) -> Result<bool> {
        grad.check_shape(&self.slice.shape, "narrow backward: the input's gradient")?;
        grad.check_same_kind(grad_out, "narrow backward")?;
        if grad.storage_mut().is_err() {
            return Ok(false);
        }
        match by_gpu_type!(grad_out, add_slice_gpu(grad_out, grad, &self.slice)) {
            Some(done) => done?,
            None => by_dtype!(grad_out.dtype(), add_slice_cpu(grad_out, grad, &self.slice))?,
        }
        Ok(true)
    }
}

/// `dx[r, start + k] += g[r, k]` on the host, dx unshared.
fn add_slice_cpu<T: Real>(g: &Tensor, dx: &mut Tensor, s: &RowSlice) -> Result<()> {
    let src = g.cpu::<T>()?;
    let dst = T::slice_mut(dx.storage_mut()?).expect("checked: a host tensor of g's dtype");
    for (row, grow) in dst.chunks_exact_mut(s.row.max(1)).zip(src.chunks_exact(s.len.max(1))) {
        for (d, &v) in row[s.start..s.start + s.len].iter_mut().zip(grow) {
            *d += v;
        }
    }
    Ok(())
}

/// The GPU version of [`add_slice_cpu`] (`narrow_add_backward`), for storage type `T`.
fn add_slice_gpu<T: GpuElement>(g: &Tensor, dx: &mut Tensor, s: &RowSlice) -> Result<()> {
    let g = g.gpu_operand::<T>("narrow backward")?;
    let gpu = g.gpu.clone();
    let dst = T::buffer_mut(dx.storage_mut()?).expect("checked: a GPU tensor of g's dtype");
    let p = s.gradient_params(g.ptr(), dst.ptr_mut());
    gpu.launch(kernel::narrow_add_backward::<T>(), grid_1d(s.rows * s.len), &p, &s.describe("narrow backward, added"))
}

/// The gradient `g` of the slice written into zeros of the input's shape.
fn widen_cpu<T: Real>(g: &Tensor, s: &RowSlice) -> Result<Tensor> {
    let src = g.cpu::<T>()?;
    let mut out = vec![T::zero(); s.rows * s.row];
    for (dst, row) in out.chunks_exact_mut(s.row.max(1)).zip(src.chunks_exact(s.len.max(1))) {
        dst[s.start..s.start + s.len].copy_from_slice(row);
    }
    Tensor::from_vec(out, &s.shape)
}

/// The GPU version of [`widen_cpu`], for storage type `T`: the `narrow_backward` kernel writes the slice and the
/// zeros around it.
fn widen_gpu<T: GpuElement>(g: &Tensor, s: &RowSlice) -> Result<Tensor> {
    let g = g.gpu_operand::<T>("narrow backward")?;
    let numel = s.rows * s.row;
    let gpu = &g.gpu;
    let mut dx = gpu.alloc_of::<T>(numel, "narrow gradient")?;
    let p = s.gradient_params(g.ptr(), dx.ptr_mut());
    gpu.launch(kernel::narrow_backward::<T>(), grid_vec::<T>(numel), &p, &s.describe("narrow backward"))?;
    Tensor::from_gpu(dx, &s.shape)
}
