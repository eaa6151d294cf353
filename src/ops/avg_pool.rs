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

use crate::autograd::{Backward, Tape};
use crate::ops::{per_axis, MapDims};
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, Result};

/// Averages `x` (N, C, H, W) or (N, C, D, H, W) over non-overlapping windows of `factor` voxels per spatial axis
/// (one value per spatial axis, each positive). Output size per axis is ceil(size / factor); a window that
/// overhangs the edge averages only its in-bounds voxels.
pub fn avg_pool(tape: &mut Tape, x: &Tensor, factor: &[usize]) -> Result<Tensor> {
    let dims = MapDims::of(x, "avg_pool")?;
    let k = per_axis(factor, dims.spatial_rank, "avg_pool factor")?;
    let plan = Pool::new(dims, k);
    let y = by_dtype!(x.dtype(), forward_cpu(x, &plan))?;
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
        Ok(vec![Some(by_dtype!(grad_out.dtype(), backward_cpu(grad_out, &self.plan))?)])
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
    let shape = plan.dims.shape_with(plan.dims.c, plan.dims.s);
    Tensor::from_vec(dx, &shape)
}
