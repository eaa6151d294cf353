//! Nearest-neighbour upsampling by an integer factor f per spatial axis, over 2D (N, C, H, W) and 3D
//! (N, C, D, H, W) maps (PyTorch `interpolate(mode="nearest", scale_factor=f)` for integer f).
//!
//! The output has f_a S_a positions along each spatial axis a, and every output voxel copies the input voxel it
//! falls in; the backward sums the gradient over each f_d x f_h x f_w block:
//!
//! ```text
//!   y_(i_d, i_h, i_w) = x_(i_d / f_d, i_h / f_h, i_w / f_w)        (integer division)
//!   dL/dx_j = sum_{i : i / f = j} g_i
//! ```
//!
//! Upsampling by f is the adjoint of summing over f-blocks, so `avg_pool(upsample_nearest(x, f), f) = x`.
//!
//! On the GPU (`cuda/pool.cu`) each thread writes a chunk of 16 bytes of the result (4 float32 or 8 bf16 values, one
//! vector store): the forward copies each element's source, and the backward sums each input-gradient element's
//! f-block of the gradient in a fixed order (its rows read as 16-byte vectors where f_w is 1, 2 or 4 and the rows are
//! whole vectors; a gather: no atomics).
//!
//! x may be float32 or bf16 on the GPU; y and dL/dx have its storage type: the forward is a bit-exact copy, the
//! backward sums in float32 and rounds once.
//!
//! Cost per element of y, with f = f_d f_h f_w and E the storage size (4 bytes float32, 2 bf16; the counting rules
//! are in [`ops`](crate::ops)): forward E (1 + 1/f) bytes (read x once, write y) and no FLOPs; backward
//! E (1 + 1/f) bytes (read dL/dy, write one dL/dx per block) and 1 FLOP (an add).

use crate::autograd::{Backward, Tape};
use crate::device::cuda::GpuElement;
use crate::device::params::kernel;
use crate::ops::avg_pool::resample_gpu;
use crate::ops::{per_axis, MapDims};
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, by_gpu_type, Result};

/// Repeats every voxel of `x` (N, C, H, W) or (N, C, D, H, W) `factor[a]` times along each spatial axis a (one
/// positive value per spatial axis).
pub fn upsample_nearest(tape: &mut Tape, x: &Tensor, factor: &[usize]) -> Result<Tensor> {
    let dims = MapDims::of(x, "upsample_nearest")?;
    let f = per_axis(factor, dims.spatial_rank, "upsample_nearest factor")?;
    let mut out = [0; 3];
    for a in 0..3 {
        out[a] = dims.s[a].checked_mul(f[a]).ok_or_else(|| {
            crate::Error::Shape(format!("upsample_nearest: factor {factor:?} on spatial sizes {:?} overflows", dims.s))
        })?;
    }
    let plan = Upsample { dims, f, out };
    let range = profile::forward("upsample_nearest", &[x], 0.0);
    let y = match by_gpu_type!(x, forward_gpu(x, &plan)) {
        Some(y) => y?,
        None => by_dtype!(x.dtype(), forward_cpu(x, &plan))?,
    };
    range.done([&y]);
    tape.record(&[x], &y, UpsampleBackward { plan });
    Ok(y)
}

/// The sizes of one upsampling: input map, factors, output spatial sizes.
#[derive(Clone, Copy, Debug)]
struct Upsample {
    dims: MapDims,
    f: [usize; 3],
    out: [usize; 3],
}

impl Upsample {
    fn out_voxels(&self) -> usize {
        self.out.iter().product()
    }

    fn in_shape(&self) -> Vec<usize> {
        self.dims.shape_with(self.dims.c, self.dims.s)
    }

    fn out_shape(&self) -> Vec<usize> {
        self.dims.shape_with(self.dims.c, self.out)
    }
}

fn forward_cpu<T: Real>(x: &Tensor, plan: &Upsample) -> Result<Tensor> {
    let xs = x.cpu::<T>()?;
    let [d, h, w] = plan.dims.s;
    let [fd, fh, fw] = plan.f;
    let [_, oh, ow] = plan.out;
    let (vin, vout) = (plan.dims.voxels(), plan.out_voxels());
    let mut y = vec![T::zero(); plan.dims.n * plan.dims.c * vout];
    // An empty map has an empty buffer, so `.max(1)` only keeps chunks_exact_mut from a zero size.
    for (p, yp) in y.chunks_exact_mut(vout.max(1)).enumerate() {
        let xp = &xs[p * vin..(p + 1) * vin];
        for zd in 0..d {
            for zh in 0..h {
                // Widen the input row once into the first output row of its block, then copy that row to the
                // other fd * fh - 1 rows of the block.
                let xrow = &xp[(zd * h + zh) * w..(zd * h + zh + 1) * w];
                let first = (zd * fd * oh + zh * fh) * ow;
                for (chunk, &v) in yp[first..first + ow].chunks_exact_mut(fw).zip(xrow) {
                    chunk.fill(v);
                }
                for a in 0..fd {
                    for b in 0..fh {
                        let row = ((zd * fd + a) * oh + zh * fh + b) * ow;
                        if row != first {
                            yp.copy_within(first..first + ow, row);
                        }
                    }
                }
            }
        }
    }
    Tensor::from_vec(y, &plan.out_shape())
}

struct UpsampleBackward {
    plan: Upsample,
}

impl Backward for UpsampleBackward {
    fn name(&self) -> &'static str {
        "upsample_nearest"
    }

    fn backward(&self, grad_out: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        grad_out.check_shape(&self.plan.out_shape(), "upsample_nearest backward gradient")?;
        let dx = match by_gpu_type!(grad_out, backward_gpu(grad_out, &self.plan)) {
            Some(dx) => dx?,
            None => by_dtype!(grad_out.dtype(), backward_cpu(grad_out, &self.plan))?,
        };
        Ok(vec![Some(dx)])
    }
}

fn backward_cpu<T: Real>(grad_out: &Tensor, plan: &Upsample) -> Result<Tensor> {
    let gs = grad_out.cpu::<T>()?;
    let [d, h, w] = plan.dims.s;
    let [fd, fh, fw] = plan.f;
    let [_, oh, ow] = plan.out;
    let (vin, vout) = (plan.dims.voxels(), plan.out_voxels());
    let mut dx = vec![T::zero(); plan.dims.n * plan.dims.c * vin];
    for (p, dxp) in dx.chunks_exact_mut(vin.max(1)).enumerate() {
        let gp = &gs[p * vout..(p + 1) * vout];
        for zd in 0..d {
            for zh in 0..h {
                let dxrow = &mut dxp[(zd * h + zh) * w..(zd * h + zh + 1) * w];
                for a in 0..fd {
                    for b in 0..fh {
                        let row = ((zd * fd + a) * oh + zh * fh + b) * ow;
                        for (dv, chunk) in dxrow.iter_mut().zip(gp[row..row + ow].chunks_exact(fw)) {
                            *dv += chunk.iter().copied().sum::<T>();
                        }
                    }
                }
            }
        }
    }
    Tensor::from_vec(dx, &plan.in_shape())
}

fn forward_gpu<T: GpuElement>(x: &Tensor, plan: &Upsample) -> Result<Tensor> {
    resample_gpu(kernel::upsample_nearest_forward::<T>(), x, plan.dims, plan.f, plan.out, false, "upsample_nearest")
}

fn backward_gpu<T: GpuElement>(grad_out: &Tensor, plan: &Upsample) -> Result<Tensor> {
    let k = kernel::upsample_nearest_backward::<T>();
    resample_gpu(k, grad_out, plan.dims, plan.f, plan.out, true, "upsample_nearest backward")
}
