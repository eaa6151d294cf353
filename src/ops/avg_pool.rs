//! Average pooling with kernel = stride = k per spatial axis, over 2D (N, C, H, W) and 3D (N, C, D, H, W) maps
//! (PyTorch `AvgPool{2,3}d(k, k, ceil_mode=True, count_include_pad=False)`).
//!
//! Along an axis of size S the output has O = ceil(S / k) positions; output position o covers the input positions
//! [o k, min((o + 1) k, S)), so the last window is short when k does not divide S and averages only what it covers.
//! With the window W(o) = W_d(o_d) x W_h(o_h) x W_w(o_w) and its voxel count |W(o)|:
//!
//! ```text
//!   y_o = (1 / |W(o)|) sum_{i in W(o)} x_i
//!   dL/dx_i = g_{o(i)} / |W(o(i))|,     o(i) = (i_d / k_d, i_h / k_h, i_w / k_w)   (integer division)
//! ```
//!
//! Every input voxel lies in exactly one window, so the backward is a scatter without overlap.
//!
//! On the GPU (`cuda/pool.cu`) each thread writes a chunk of 16 bytes of the result (4 float32 or 8 bf16 values, one
//! vector store): the forward sums each output's window (its rows read as 16-byte vectors where k_w is 1, 2 or 4 and
//! the rows are whole vectors), in the same order as one output at a time, and the backward reads each element's
//! window gradient (a gather: no atomics).
//!
//! x may be float32 or bf16 on the GPU; y and dL/dx have its storage type, computed in float32 and rounded once.
//!
//! Cost per input voxel, with windows of k = k_d k_h k_w voxels and E the storage size (4 bytes float32, 2 bf16; the
//! counting rules are in [`ops`](crate::ops)): forward E (1 + 1/k) bytes (read x, write one y per window) and
//! 1 + 1/k FLOPs (an add per voxel, a division per window); backward E (1 + 1/k) bytes (read one dL/dy per window,
//! write dL/dx) and 1 FLOP.

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_vec, GpuElement};
use crate::device::params::{kernel, Kernel, PoolParams};
use crate::ops::{per_axis, MapDims};
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, by_gpu_type, Result};

/// Averages `x` (N, C, H, W) or (N, C, D, H, W) over non-overlapping windows of `factor` voxels per spatial axis
/// (one value per spatial axis, each positive). Output size per axis is ceil(size / factor); a window that
/// overhangs the edge averages only its in-bounds voxels.
pub fn avg_pool(tape: &mut Tape, x: &Tensor, factor: &[usize]) -> Result<Tensor> {
    let dims = MapDims::of(x, "avg_pool")?;
    let k = per_axis(factor, dims.spatial_rank, "avg_pool factor")?;
    let plan = Pool::new(dims, k);
    let range = profile::forward("avg_pool", &[x], 0.0);
    let y = match by_gpu_type!(x, forward_gpu(x, &plan)) {
        Some(y) => y?,
        None => by_dtype!(x.dtype(), forward_cpu(x, &plan))?,
    };
    range.done([&y]);
    tape.record(&[x], &y, AvgPoolBackward { plan });
    Ok(y)
}

/// The sizes of one pooling: input map, factors, output sizes.
#[derive(Clone, Copy, Debug)]
struct Pool {
    dims: MapDims,
    k: [usize; 3],
    out: [usize; 3],
}

impl Pool {
    fn new(dims: MapDims, k: [usize; 3]) -> Pool {
        let out = [0, 1, 2].map(|a| dims.s[a].div_ceil(k[a]));
        Pool { dims, k, out }
    }

    fn in_voxels(&self) -> usize {
        self.dims.voxels()
    }

    fn out_voxels(&self) -> usize {
        self.out.iter().product()
    }

    fn out_shape(&self) -> Vec<usize> {
        self.dims.shape_with(self.dims.c, self.out)
    }

    fn in_shape(&self) -> Vec<usize> {
        self.dims.shape_with(self.dims.c, self.dims.s)
    }

    /// 1 / |W(o)| for every output voxel of one plane.
    fn inverse_counts<T: Real>(&self) -> Vec<T> {
        let count = |a: usize, o: usize| self.k[a].min(self.dims.s[a] - o * self.k[a]);
        let mut inv = Vec::with_capacity(self.out_voxels());
        for od in 0..self.out[0] {
            for oh in 0..self.out[1] {
                let cdh = count(0, od) * count(1, oh);
                inv.extend((0..self.out[2]).map(|ow| T::from_f64(1.0 / (cdh * count(2, ow)) as f64)));
            }
        }
        inv
    }
}

fn forward_cpu<T: Real>(x: &Tensor, plan: &Pool) -> Result<Tensor> {
    let xs = x.cpu::<T>()?;
    let [d, h, w] = plan.dims.s;
    let [kd, kh, kw] = plan.k;
    let [_, oh, ow] = plan.out;
    let (vin, vout) = (plan.in_voxels(), plan.out_voxels());
    let inv = plan.inverse_counts::<T>();
    let mut y = vec![T::zero(); plan.dims.n * plan.dims.c * vout];
    // An empty map has an empty buffer, so `.max(1)` only keeps chunks_exact_mut from a zero size.
    for (p, yp) in y.chunks_exact_mut(vout.max(1)).enumerate() {
        let xp = &xs[p * vin..(p + 1) * vin];
        // Sum each input row's kw-chunks into the output row its (d, h) position falls in.
        for zd in 0..d {
            for zh in 0..h {
                let xrow = &xp[(zd * h + zh) * w..(zd * h + zh + 1) * w];
                let o = (zd / kd * oh + zh / kh) * ow;
                for (yv, chunk) in yp[o..o + ow].iter_mut().zip(xrow.chunks(kw)) {
                    *yv += chunk.iter().copied().sum::<T>();
                }
            }
        }
        for (yv, &s) in yp.iter_mut().zip(&inv) {
            *yv *= s;
        }
    }
    Tensor::from_vec(y, &plan.out_shape())
}

struct AvgPoolBackward {
    plan: Pool,
}

impl Backward for AvgPoolBackward {
    fn name(&self) -> &'static str {
        "avg_pool"
    }

    fn backward(&self, grad_out: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        grad_out.check_shape(&self.plan.out_shape(), "avg_pool backward gradient")?;
        let dx = match by_gpu_type!(grad_out, backward_gpu(grad_out, &self.plan)) {
            Some(dx) => dx?,
            None => by_dtype!(grad_out.dtype(), backward_cpu(grad_out, &self.plan))?,
        };
        Ok(vec![Some(dx)])
    }
}

fn backward_cpu<T: Real>(grad_out: &Tensor, plan: &Pool) -> Result<Tensor> {
    let gs = grad_out.cpu::<T>()?;
    let [d, h, w] = plan.dims.s;
    let [kd, kh, kw] = plan.k;
    let [_, oh, ow] = plan.out;
    let (vin, vout) = (plan.in_voxels(), plan.out_voxels());
    let inv = plan.inverse_counts::<T>();
    let mut dx = vec![T::zero(); plan.dims.n * plan.dims.c * vin];
    for (p, dxp) in dx.chunks_exact_mut(vin.max(1)).enumerate() {
        let gp = &gs[p * vout..(p + 1) * vout];
        for zd in 0..d {
            for zh in 0..h {
                let o = (zd / kd * oh + zh / kh) * ow;
                let (grow, irow) = (&gp[o..o + ow], &inv[o..o + ow]);
                let dxrow = &mut dxp[(zd * h + zh) * w..(zd * h + zh + 1) * w];
                for ((chunk, &g), &s) in dxrow.chunks_mut(kw).zip(grow).zip(irow) {
                    chunk.fill(g * s);
                }
            }
        }
    }
    Tensor::from_vec(dx, &plan.in_shape())
}

fn forward_gpu<T: GpuElement>(x: &Tensor, plan: &Pool) -> Result<Tensor> {
    resample_gpu(kernel::avg_pool_forward::<T>(), x, plan.dims, plan.k, plan.out, false, "avg_pool")
}

fn backward_gpu<T: GpuElement>(grad_out: &Tensor, plan: &Pool) -> Result<Tensor> {
    resample_gpu(kernel::avg_pool_backward::<T>(), grad_out, plan.dims, plan.k, plan.out, true, "avg_pool backward")
}

/// Runs a kernel of cuda/pool.cu between a map of spatial size `dims.s` and one of size `out`, `factor` per axis (the
/// pooling window or the upsampling repeat): forward (`backward` false) it writes the `out`-sized map from `src`,
/// backward the `dims.s`-sized gradient from the `out`-sized `src`; `src` and the result are stored as `T`. `what`
/// names the op and the new buffer.
pub(crate) fn resample_gpu<T: GpuElement>(
    k: Kernel<PoolParams<T>>,
    src: &Tensor,
    dims: MapDims,
    factor: [usize; 3],
    out: [usize; 3],
    backward: bool,
    what: &str,
) -> Result<Tensor> {
    let sb = src.gpu_operand::<T>(what)?;
    let shape = dims.shape_with(dims.c, if backward { dims.s } else { out });
    let numel: usize = shape.iter().product();
    let gpu = &sb.gpu;
    let mut dst = gpu.alloc_of::<T>(numel, what)?;
    let sizes = |a: [usize; 3]| a.map(|v| v as i64);
    let p = PoolParams {
        src: sb.ptr(),
        dst: dst.ptr_mut(),
        total: numel as i64,
        in_size: sizes(dims.s),
        out_size: sizes(out),
        factor: sizes(factor),
    };
    gpu.launch(k, grid_vec::<T>(numel), &p, &format!("{what} {:?} factor {factor:?}", src.shape()))?;
    Tensor::from_gpu(dst, &shape)
}
