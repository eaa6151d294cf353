//! 2D and 3D convolution (cross-correlation, as PyTorch's Conv2d/Conv3d) with "same"-style zero padding k/2, odd
//! kernels and any positive stride per axis. A 2D map is run as a 3D map of depth 1 with kernel depth 1.
//!
//! Shapes: x (N, Cin, D, H, W), w (Cout, Cin, kd, kh, kw), b (Cout), y (N, Cout, Do, Ho, Wo). Per spatial axis with
//! input size I, kernel k (odd), stride s and padding p = k/2 (so 2p = k - 1):
//!
//! ```text
//!   O = (I + 2p - k)/s + 1 = (I - 1)/s + 1                          (integer division)
//!   i(o, t) = o*s + t - p                                           input index read by output o at tap t in [0, k)
//! ```
//!
//! Forward (terms whose input index falls outside [0, I) on any axis are zero: that is the zero padding):
//!
//! ```text
//!   y[n,co,od,oh,ow] = b[co] + sum_{ci,a,b,c} w[co,ci,a,b,c] * x[n,ci, i(od,a), i(oh,b), i(ow,c)]
//! ```
//!
//! Backward, with g = dL/dy:
//!
//! ```text
//!   dx[n,ci,id,ih,iw] = sum_{co,a,b,c} g[n,co,od,oh,ow] * w[co,ci,a,b,c]
//!                       over the (a, od), (b, oh), (c, ow) with i(od,a) = id, i(oh,b) = ih, i(ow,c) = iw,
//!                       i.e. od = (id + p_d - a)/s_d when that division is exact and od in [0, Do) (same for h, w)
//!   dw[co,ci,a,b,c]   = sum_{n,od,oh,ow} g[n,co,od,oh,ow] * x[n,ci, i(od,a), i(oh,b), i(ow,c)]   (in-bounds terms)
//!   db[co]            = sum_{n,od,oh,ow} g[n,co,od,oh,ow]
//! ```
//!
//! CPU layout of the work: every loop ends in a contiguous run over the W axis. For a fixed output row
//! (n, co, od, oh) and a fixed tap (ci, a, b, c), the output positions ow whose input column i(ow, c) is in bounds
//! form one interval [lo, hi), and the input columns they read are lo*s_w + c - p_w, stepping by s_w: all of one
//! residue ("phase") modulo s_w. With s_w > 1 the input rows (and the input-gradient rows) are held regrouped by
//! phase, a copy of the input's size, so these columns are adjacent. Then the forward adds a scaled input row into
//! an output row that stays in cache; dx adds a scaled gradient row into an input-gradient row (gathering over the
//! taps that reach that input row); dw takes the dot product of a gradient row and an input row. No im2col buffer
//! is built.

use std::borrow::Cow;

use crate::autograd::{Backward, Tape};
use crate::ops::{per_axis, MapDims};
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, ensure, Result};

/// Cross-correlation of `x` (N, Cin, [D,] H, W) with `w` (Cout, Cin, [kd,] kh, kw) plus an optional `bias` (Cout),
/// zero-padded by k/2 per axis (kernel sizes must be odd), with `stride` given for each spatial axis of the map.
/// The output is (N, Cout, [Do,] Ho, Wo) with O = (I - 1)/s + 1 per axis, as PyTorch's Conv2d/Conv3d with
/// `padding = k // 2`.
pub fn conv(tape: &mut Tape, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: &[usize]) -> Result<Tensor> {
    let geom = ConvGeom::new(x, w, bias, stride)?;
    let y = by_dtype!(x.dtype(), forward_cpu(x, w, bias, &geom))?;
    let saved = ConvBackward { x: x.clone(), w: w.clone(), has_bias: bias.is_some(), geom };
    match bias {
        Some(b) => tape.record(&[x, w, b], &y, saved),
        None => tape.record(&[x, w], &y, saved),
    }
    Ok(y)
}

/// The sizes of one convolution, spatial axes as [D, H, W].
#[derive(Clone, Copy, Debug)]
struct ConvGeom {
    dims: MapDims,
    cout: usize,
    k: [usize; 3],
    stride: [usize; 3],
    pad: [usize; 3],
    out: [usize; 3],
}

impl ConvGeom {
    fn new(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: &[usize]) -> Result<ConvGeom> {
        x.check_same_kind(w, "conv (input vs weight)")?;
        let dims = MapDims::of(x, "conv")?;
        ensure!(
            w.rank() == x.rank(),
            Shape,
            "conv: weight shape {:?} must have the input's rank {} ((Cout, Cin{}) for input shape {:?})",
            w.shape(),
            x.rank(),
            if dims.spatial_rank == 2 { ", kh, kw" } else { ", kd, kh, kw" },
            x.shape()
        );
        let cout = w.shape()[0];
        ensure!(
            w.shape()[1] == dims.c,
            Shape,
            "conv: weight shape {:?} expects {} input channels, but the input {:?} has {}",
            w.shape(),
            w.shape()[1],
            x.shape(),
            dims.c
        );
        let k = per_axis(&w.shape()[2..], dims.spatial_rank, "conv kernel")?;
        ensure!(
            k.iter().all(|&k| k % 2 == 1),
            Shape,
            "conv: kernel sizes must be odd (padding is k/2), got weight shape {:?}",
            w.shape()
        );
        let stride = per_axis(stride, dims.spatial_rank, "conv stride")?;
        // Spatial sizes of at least 1 keep every output size (I - 1)/s + 1 defined and every row non-empty.
        ensure!(dims.s.iter().all(|&s| s > 0), Shape, "conv: empty spatial axis in input shape {:?}", x.shape());
        if let Some(b) = bias {
            x.check_same_kind(b, "conv (input vs bias)")?;
            b.check_shape(&[cout], "conv bias")?;
        }
        let pad = k.map(|k| k / 2);
        let out = [0, 1, 2].map(|i| (dims.s[i] - 1) / stride[i] + 1);
        Ok(ConvGeom { dims, cout, k, stride, pad, out })
    }

    fn taps(&self) -> usize {
        self.k.iter().product()
    }

    fn out_voxels(&self) -> usize {
        self.out.iter().product()
    }

    fn out_shape(&self) -> Vec<usize> {
        self.dims.shape_with(self.cout, self.out)
    }

    /// For each tap t of the W axis: the output columns [lo, hi) whose input column lo*s + t - p.. is in bounds,
    /// and that first input column.
    fn w_runs(&self) -> Vec<Run> {
        (0..self.k[2]).map(|t| Run::new(t, self.pad[2], self.stride[2], self.dims.s[2], self.out[2])).collect()
    }

    /// The input index read by output index `o` at tap `t` on `axis`, if in bounds.
    fn input_index(&self, axis: usize, o: usize, t: usize) -> Option<usize> {
        (o * self.stride[axis] + t).checked_sub(self.pad[axis]).filter(|&i| i < self.dims.s[axis])
    }

    /// The output index whose tap `t` reads input index `i` on `axis`, if there is one.
    fn output_index(&self, axis: usize, i: usize, t: usize) -> Option<usize> {
        let shifted = (i + self.pad[axis]).checked_sub(t)?;
        let s = self.stride[axis];
        (shifted % s == 0 && shifted / s < self.out[axis]).then_some(shifted / s)
    }
}

/// The output columns [lo, hi) that read in-bounds input columns at one tap of the W axis. The first of them reads
/// input column `start` and the next ones step by the stride, so in a row regrouped by phase (see [`to_phases`])
/// they are the contiguous values from position `at`.
#[derive(Clone, Copy, Debug)]
struct Run {
    lo: usize,
    hi: usize,
    at: usize,
}

impl Run {
    /// Solves 0 <= o*s + t - p < len_in for o in [0, len_out).
    fn new(t: usize, p: usize, s: usize, len_in: usize, len_out: usize) -> Run {
        let lo = if p > t { (p - t).div_ceil(s) } else { 0 };
        let hi = if len_in + p > t { ((len_in + p - t - 1) / s + 1).min(len_out) } else { 0 };
        let lo = lo.min(hi);
        let start = (lo * s + t).saturating_sub(p);
        Run { lo, hi, at: if lo < hi { phase_pos(start, len_in, s) } else { 0 } }
    }

    fn len(&self) -> usize {
        self.hi - self.lo
    }
}

/// Where column i of a row of `len` values lands when the row is regrouped by phase i mod s: the columns of phase 0
/// (0, s, 2s, ...) come first, then those of phase 1, and so on. Phase q holds ceil((len - q)/s) columns.
fn phase_pos(i: usize, len: usize, s: usize) -> usize {
    (0..i % s).map(|q| (len - q).div_ceil(s)).sum::<usize>() + i / s
}

/// Every row of `len` values of `v` regrouped by phase modulo `s` (borrowed unchanged when s = 1). A strided
/// convolution reads each input row at one phase per tap, so in this order every read is contiguous.
fn to_phases<T: Copy>(v: &[T], len: usize, s: usize) -> Cow<'_, [T]> {
    if s == 1 {
        return Cow::Borrowed(v);
    }
    let mut out = Vec::with_capacity(v.len());
    for row in v.chunks_exact(len) {
        for q in 0..s.min(len) {
            out.extend(row[q..].iter().step_by(s));
        }
    }
    Cow::Owned(out)
}

/// The inverse of [`to_phases`].
fn from_phases<T: Copy + Default>(v: Vec<T>, len: usize, s: usize) -> Vec<T> {
    if s == 1 {
        return v;
    }
    let mut out = vec![T::default(); v.len()];
    for (src, dst) in v.chunks_exact(len).zip(out.chunks_exact_mut(len)) {
        let mut src = src.iter();
        for q in 0..s.min(len) {
            for (d, &x) in dst[q..].iter_mut().step_by(s).zip(&mut src) {
                *d = x;
            }
        }
    }
    out
}

/// `dst[j] += a * src[j]`.
fn axpy<T: Real>(dst: &mut [T], a: T, src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += a * s;
    }
}

/// `sum_j a[j] * b[j]` over the shorter length, with four partial sums so that it vectorises.
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 4];
    for (ca, cb) in a.chunks_exact(4).zip(b.chunks_exact(4)) {
        for l in 0..4 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail = n - n % 4;
    let rest: T = a[tail..].iter().zip(&b[tail..]).map(|(&p, &q)| p * q).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + rest
}

fn forward_cpu<T: Real>(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, g: &ConvGeom) -> Result<Tensor> {
    let MapDims { c: cin, s: [_, hi, wi], .. } = g.dims;
    let xs = to_phases(x.cpu::<T>()?, wi, g.stride[2]);
    let ws = w.cpu::<T>()?;
    let bs = bias.map(|b| b.cpu::<T>()).transpose()?;
    let [kd, kh, kw] = g.k;
    let [dout, hout, wout] = g.out;
    let (in_vox, out_vox, taps) = (g.dims.voxels(), g.out_voxels(), g.taps());
    let runs = g.w_runs();
    let mut y = vec![T::zero(); g.dims.n * g.cout * out_vox];
    for (nco, yc) in y.chunks_exact_mut(out_vox).enumerate() {
        let (n, co) = (nco / g.cout, nco % g.cout);
        if let Some(b) = bs {
            yc.fill(b[co]);
        }
        for od in 0..dout {
            for oh in 0..hout {
                let yrow = &mut yc[(od * hout + oh) * wout..][..wout];
                for ci in 0..cin {
                    let xc = &xs[(n * cin + ci) * in_vox..][..in_vox];
                    let wc = &ws[(co * cin + ci) * taps..][..taps];
                    for a in 0..kd {
                        let Some(id) = g.input_index(0, od, a) else { continue };
                        for b in 0..kh {
                            let Some(ih) = g.input_index(1, oh, b) else { continue };
                            let xrow = &xc[(id * hi + ih) * wi..][..wi];
                            let wtap = &wc[(a * kh + b) * kw..][..kw];
                            for (run, &wv) in runs.iter().zip(wtap) {
                                if run.len() > 0 {
                                    axpy(&mut yrow[run.lo..run.hi], wv, &xrow[run.at..]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Tensor::from_vec(y, &g.out_shape())
}

/// dx: for each input row (n, ci, id, ih), gather every (co, a, b) whose output row reads it, and for each tap c
/// add the scaled gradient row into the input-gradient columns it came from (contiguous in phase order; the
/// result is put back in column order at the end).
fn grad_input_cpu<T: Real>(gy: &Tensor, w: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    let (gs, ws) = (gy.cpu::<T>()?, w.cpu::<T>()?);
    let MapDims { n: batch, c: cin, s: [di, hi, wi], .. } = g.dims;
    let [kd, kh, kw] = g.k;
    let [_, hout, wout] = g.out;
    let (in_vox, out_vox, taps) = (g.dims.voxels(), g.out_voxels(), g.taps());
    let runs = g.w_runs();
    let mut dx = vec![T::zero(); batch * cin * in_vox];
    for (nci, dxc) in dx.chunks_exact_mut(in_vox).enumerate() {
        let (n, ci) = (nci / cin, nci % cin);
        for id in 0..di {
            for ih in 0..hi {
                let dxrow = &mut dxc[(id * hi + ih) * wi..][..wi];
                for co in 0..g.cout {
                    let gc = &gs[(n * g.cout + co) * out_vox..][..out_vox];
                    let wc = &ws[(co * cin + ci) * taps..][..taps];
                    for a in 0..kd {
                        let Some(od) = g.output_index(0, id, a) else { continue };
                        for b in 0..kh {
                            let Some(oh) = g.output_index(1, ih, b) else { continue };
                            let grow = &gc[(od * hout + oh) * wout..][..wout];
                            let wtap = &wc[(a * kh + b) * kw..][..kw];
                            for (run, &wv) in runs.iter().zip(wtap) {
                                if run.len() > 0 {
                                    axpy(&mut dxrow[run.at..], wv, &grow[run.lo..run.hi]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Tensor::from_vec(from_phases(dx, wi, g.stride[2]), &g.dims.shape_with(cin, g.dims.s))
}

/// dw: for each weight slice (co, ci), the dot products of every gradient row with the input rows its taps read.
fn grad_weight_cpu<T: Real>(gy: &Tensor, x: &Tensor, w_shape: &[usize], g: &ConvGeom) -> Result<Tensor> {
    let MapDims { n: batch, c: cin, s: [_, hi, wi], .. } = g.dims;
    let gs = gy.cpu::<T>()?;
    let xs = to_phases(x.cpu::<T>()?, wi, g.stride[2]);
    let [kd, kh, kw] = g.k;
    let [dout, hout, wout] = g.out;
    let (in_vox, out_vox, taps) = (g.dims.voxels(), g.out_voxels(), g.taps());
    let runs = g.w_runs();
    let mut dw = vec![T::zero(); g.cout * cin * taps];
    for (coci, dwc) in dw.chunks_exact_mut(taps).enumerate() {
        let (co, ci) = (coci / cin, coci % cin);
        for n in 0..batch {
            let gc = &gs[(n * g.cout + co) * out_vox..][..out_vox];
            let xc = &xs[(n * cin + ci) * in_vox..][..in_vox];
            for od in 0..dout {
                for oh in 0..hout {
                    let grow = &gc[(od * hout + oh) * wout..][..wout];
                    for a in 0..kd {
                        let Some(id) = g.input_index(0, od, a) else { continue };
                        for b in 0..kh {
                            let Some(ih) = g.input_index(1, oh, b) else { continue };
                            let xrow = &xc[(id * hi + ih) * wi..][..wi];
                            let dwtap = &mut dwc[(a * kh + b) * kw..][..kw];
                            for (run, dwv) in runs.iter().zip(dwtap) {
                                if run.len() > 0 {
                                    *dwv += dot(&grow[run.lo..run.hi], &xrow[run.at..]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Tensor::from_vec(dw, w_shape)
}

/// db[co]: the sum of the gradient over the batch and all output positions of channel co.
fn grad_bias_cpu<T: Real>(gy: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    let gs = gy.cpu::<T>()?;
    let out_vox = g.out_voxels();
    let mut db = vec![T::zero(); g.cout];
    for (nco, gc) in gs.chunks_exact(out_vox).enumerate() {
        db[nco % g.cout] += gc.iter().copied().sum::<T>();
    }
    Tensor::from_vec(db, &[g.cout])
}

struct ConvBackward {
    x: Tensor,
    w: Tensor,
    has_bias: bool,
    geom: ConvGeom,
}

impl Backward for ConvBackward {
    fn name(&self) -> &'static str {
        "conv"
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let g = &self.geom;
        grad_out.check_shape(&g.out_shape(), "conv backward: output gradient")?;
        grad_out.check_same_kind(&self.x, "conv backward")?;
        let dtype = self.x.dtype();
        let dx = if needs[0] { Some(by_dtype!(dtype, grad_input_cpu(grad_out, &self.w, g))?) } else { None };
        let dw = if needs[1] {
            Some(by_dtype!(dtype, grad_weight_cpu(grad_out, &self.x, self.w.shape(), g))?)
        } else {
            None
        };
        let mut grads = vec![dx, dw];
        if self.has_bias {
            grads.push(if needs[2] { Some(by_dtype!(dtype, grad_bias_cpu(grad_out, g))?) } else { None });
        }
        Ok(grads)
    }
}
