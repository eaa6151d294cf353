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
//!
//! The CPU passes run on rayon's thread pool, split over what each pass writes: the forward over output rows, dx
//! over input-gradient rows, dw over weight slices (co, ci). Each of these is computed whole by one thread in the
//! same order as a single-threaded run, so the results are the same bits for any number of threads.
//!
//! GPU: every pass is one of three implicit matrix products of cuda/conv.cu on the `Pairing` of the wide map x
//! with the narrow map y (forward: narrow from wide; dx: wide from narrow, one launch per stride phase; dw: the
//! weight gradient, split deterministically over the reduction), and db is a two-level per-channel sum.
//! conv_transpose runs on the same three products with the roles of its maps swapped.
//!
//! Cost per element of y, with k = k_d k_h k_w taps and a stride of s = s_d s_h s_w (the counting rules are in
//! [`ops`](crate::ops)): forward 2 Cin k FLOPs (a multiply and an add per input channel and tap) and at least
//! 4 (1 + Cin / (Cout s)) bytes (x read once, y written once; the weights are small); backward 4 Cin k FLOPs (dL/dx
//! and dL/dw each as many as the forward) and at least 4 (1 + 2 Cin / (Cout s)) bytes (read dL/dy and x, write
//! dL/dx). At stage 0 of the 3D reference (32 to 32 channels, 3x3x3) that is 1728 FLOPs per 8 bytes, 216 per byte:
//! bound by arithmetic, not by memory.

use std::borrow::Cow;

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_1d, GpuBuffer};
use crate::device::params::{
    kernel, ConvTcParams, ConvWgradTcParams, Kernel, CONV_TC_BK, CONV_TC_BM, CONV_TC_BN, CONV_TC_BN_NARROW,
    CONV_TC_MAX_TAPS, CONV_TC_THREADS,
};
use crate::device::Gpu;
use crate::ops::{channel_sums_cpu, per_axis, MapDims};
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, ensure, launch, Error, Result};

/// Cross-correlation of `x` (N, Cin, \[D,\] H, W) with `w` (Cout, Cin, \[kd,\] kh, kw) plus an optional `bias` (Cout),
/// zero-padded by k/2 per axis (kernel sizes must be odd), with `stride` given for each spatial axis of the map.
/// The output is (N, Cout, \[Do,\] Ho, Wo) with O = (I - 1)/s + 1 per axis, as PyTorch's Conv2d/Conv3d with
/// `padding = k // 2`.
pub fn conv(tape: &mut Tape, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: &[usize]) -> Result<Tensor> {
    let geom = ConvGeom::new(x, w, bias, stride)?;
    let range = profile::forward(geom.kind(), &[x, w], geom.flops());
    let y = match x.gpu_buffer() {
        Some(xb) => {
            let b = bias.map(|b| gpu_operand(b, "conv bias")).transpose()?;
            let y = geom.pairing().narrow_from_wide(xb, gpu_operand(w, "conv weight")?, b, &geom.describe())?;
            Tensor::from_gpu(y, &geom.out_shape())?
        }
        None => by_dtype!(x.dtype(), forward_cpu(x, w, bias, &geom))?,
    };
    let saved = ConvBackward { x: x.clone(), w: w.clone(), has_bias: bias.is_some(), geom };
    range.done([&y]);
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
    /// `conv2d` or `conv3d`: the op's name in profiles.
    fn kind(&self) -> &'static str {
        if self.dims.spatial_rank == 2 {
            "conv2d"
        } else {
            "conv3d"
        }
    }

    /// Forward FLOPs, 2 N Cout prod(out) Cin prod(k) (each of the input and weight gradients costs the same).
    fn flops(&self) -> f64 {
        2.0 * (self.dims.n * self.cout * self.out_voxels() * self.dims.c * self.taps()) as f64
    }

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

    /// The input is the wide map, the output the narrow one.
    fn pairing(&self) -> Pairing {
        Pairing {
            batch: self.dims.n,
            c_wide: self.dims.c,
            c_narrow: self.cout,
            wide: self.dims.s,
            narrow: self.out,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
            transposed: false,
        }
    }

    /// The sizes, for error messages.
    fn describe(&self) -> String {
        format!(
            "conv (N {}, Cin {}, Cout {}, input {:?}, kernel {:?}, stride {:?})",
            self.dims.n, self.dims.c, self.cout, self.dims.s, self.k, self.stride
        )
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

/// The (map, d, h) of row `row` of a stack of maps of `depth` x `height` rows: the rows of a map (n, c) come in
/// (d, h) raster order and the maps one after another.
fn row_coords(row: usize, depth: usize, height: usize) -> (usize, usize, usize) {
    (row / (depth * height), row / height % depth, row % height)
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
    let (in_vox, taps) = (g.dims.voxels(), g.taps());
    let runs = g.w_runs();
    let mut y = vec![T::zero(); g.dims.n * g.cout * g.out_voxels()];
    y.par_chunks_mut(wout).enumerate().for_each(|(row, yrow)| {
        let (nco, od, oh) = row_coords(row, dout, hout);
        let (n, co) = (nco / g.cout, nco % g.cout);
        if let Some(b) = bs {
            yrow.fill(b[co]);
        }
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
    });
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
    let (out_vox, taps) = (g.out_voxels(), g.taps());
    let runs = g.w_runs();
    let mut dx = vec![T::zero(); batch * cin * g.dims.voxels()];
    dx.par_chunks_mut(wi).enumerate().for_each(|(row, dxrow)| {
        let (nci, id, ih) = row_coords(row, di, hi);
        let (n, ci) = (nci / cin, nci % cin);
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
    });
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
    dw.par_chunks_mut(taps).enumerate().for_each(|(coci, dwc)| {
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
    });
    Tensor::from_vec(dw, w_shape)
}

struct ConvBackward {
    x: Tensor,
    w: Tensor,
    has_bias: bool,
    geom: ConvGeom,
}

impl Backward for ConvBackward {
    fn name(&self) -> &'static str {
        self.geom.kind()
    }

    fn flops(&self) -> f64 {
        2.0 * self.geom.flops()
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let g = &self.geom;
        grad_out.check_shape(&g.out_shape(), "conv backward: output gradient")?;
        grad_out.check_same_kind(&self.x, "conv backward")?;
        if let Some(gb) = grad_out.gpu_buffer() {
            let (p, what) = (g.pairing(), format!("{} backward", g.describe()));
            let mut grads = vec![None, None];
            if needs[0] {
                let dx = p.wide_from_narrow(gb, gpu_operand(&self.w, "conv weight")?, None, &what)?;
                grads[0] = Some(Tensor::from_gpu(dx, self.x.shape())?);
            }
            if needs[1] {
                let dw = p.weight_grad(gb, gpu_operand(&self.x, "conv input")?, &what)?;
                grads[1] = Some(Tensor::from_gpu(dw, self.w.shape())?);
            }
            if self.has_bias {
                let db = needs[2].then(|| channel_sums(gb, g.dims.n, g.cout, g.out_voxels(), &what)).transpose()?;
                grads.push(db.map(|db| Tensor::from_gpu(db, &[g.cout])).transpose()?);
            }
            return Ok(grads);
        }
        let dtype = self.x.dtype();
        let dx = if needs[0] { Some(by_dtype!(dtype, grad_input_cpu(grad_out, &self.w, g))?) } else { None };
        let dw = if needs[1] {
            Some(by_dtype!(dtype, grad_weight_cpu(grad_out, &self.x, self.w.shape(), g))?)
        } else {
            None
        };
        let mut grads = vec![dx, dw];
        if self.has_bias {
            grads.push(if needs[2] {
                Some(by_dtype!(dtype, channel_sums_cpu(grad_out, g.cout, g.out_voxels()))?)
            } else {
                None
            });
        }
        Ok(grads)
    }
}

// The tile of cuda/conv.cu (BM, BN, BK, THREADS there): rows and columns of the output per block, reduction indices
// per shared-memory stage, threads per block.
const TILE_M: usize = 128;
const TILE_N: usize = 32;
const TILE_K: usize = 16;
// Weight-gradient slices are whole stages of both the exact and the tensor-core kernels.
const _: () = assert!(TILE_K % CONV_TC_BK == 0);
const TILE_THREADS: u32 = 256;
/// The weight gradient's reduction is split into enough slices for about this many blocks (a few per SM)...
const WGRAD_TARGET_BLOCKS: usize = 1024;
/// ... and into slices of at most this many terms, which bounds the float32 rounding of each partial sum.
const WGRAD_MAX_SLICE: usize = 16384;
/// Terms per block of the first level of [`channel_sums`].
const CHANNEL_SUM_CHUNK: usize = 8192;

/// How a convolution pairs a "wide" map (N, Cw, I) with a "narrow" map (N, Cn, O) through a weight (Cn, Cw, k),
/// spatial axes as [D, H, W]: narrow position o meets wide position o*s + a - p at tap a. conv (x wide, y narrow)
/// and conv_transpose (x narrow, y wide, s = k, p = 0) run every pass on the GPU as one of its three products,
/// whose formulas open cuda/conv.cu.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pairing {
    /// Batch size N.
    pub(crate) batch: usize,
    /// Channels of the wide map.
    pub(crate) c_wide: usize,
    /// Channels of the narrow map.
    pub(crate) c_narrow: usize,
    /// Spatial sizes of the wide map.
    pub(crate) wide: [usize; 3],
    /// Spatial sizes of the narrow map.
    pub(crate) narrow: [usize; 3],
    /// Kernel size.
    pub(crate) k: [usize; 3],
    /// Stride.
    pub(crate) stride: [usize; 3],
    /// Padding.
    pub(crate) pad: [usize; 3],
    /// Whether the pairing serves the transposed conv (x narrow, y wide) rather than the conv (x wide, y narrow):
    /// it picks the kernel names, so that a profile tells the six passes apart.
    pub(crate) transposed: bool,
}

/// The arguments of `conv_gemm` (the struct `GemmGeom` of cuda/conv.cu, same fields in the same order): one implicit
/// product out[(n, r), col] = sum_{(c, q)} src[n, c, src_mul*r + src_add + src_tap*q] w[col*w_dst + c*w_src + tap(a)]
/// with a = tap_mul*q + tap_add, written at out[n, col, dst_mul*r + dst_add].
#[derive(Clone, Copy, Debug)]
struct GemmGeom {
    batch: usize,
    c_src: usize,
    c_dst: usize,
    w_src: usize,
    w_dst: usize,
    has_bias: bool,
    src: [usize; 3],
    dst: [usize; 3],
    kernel: [usize; 3],
    rows: [usize; 3],
    src_mul: [usize; 3],
    src_add: [i64; 3],
    dst_mul: [usize; 3],
    dst_add: [usize; 3],
    taps: [usize; 3],
    src_tap: [i64; 3],
    tap_mul: [usize; 3],
    tap_add: [usize; 3],
}

impl GemmGeom {
    /// The kernel's argument: 42 ints in the C struct's order. Every value fits (see [`Pairing::check_sizes`]).
    fn to_args(self) -> [i32; 42] {
        let head =
            [self.batch, self.c_src, self.c_dst, self.w_src, self.w_dst, self.has_bias as usize].map(|x| x as i32);
        let axes = [
            ints(self.src),
            ints(self.dst),
            ints(self.kernel),
            ints(self.rows),
            ints(self.src_mul),
            signed_ints(self.src_add),
            ints(self.dst_mul),
            ints(self.dst_add),
            ints(self.taps),
            signed_ints(self.src_tap),
            ints(self.tap_mul),
            ints(self.tap_add),
        ];
        let flat: Vec<i32> = head.into_iter().chain(axes.into_iter().flatten()).collect();
        let mut args = [0; 42];
        args.copy_from_slice(&flat);
        args
    }

    /// Launches `kernel` writing every output position this product enumerates.
    fn launch(
        &self,
        kernel: GemmKernel,
        src: &GpuBuffer,
        w: &GpuBuffer,
        bias: Option<&GpuBuffer>,
        dst: &mut GpuBuffer,
        what: &str,
    ) -> Result<()> {
        let rows = self.batch * self.rows.iter().product::<usize>();
        let gpu = &src.gpu;
        match kernel {
            GemmKernel::Exact(name) => {
                let cfg = LaunchConfig {
                    grid_dim: (rows.div_ceil(TILE_M) as u32, self.c_dst.div_ceil(TILE_N) as u32, 1),
                    block_dim: (TILE_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let args = self.to_args();
                // Without a bias the kernel never reads its bias pointer; the weight stands in for it.
                let b = bias.unwrap_or(w);
                launch!(gpu, name, cfg, what, [&src.slice, &w.slice, &b.slice, &mut dst.slice, &args])
            }
            GemmKernel::TensorCore(pair) => {
                check_tc_taps(self.taps, what)?;
                let (kernel, bn) = pair.for_columns(self.c_dst);
                let cfg = LaunchConfig {
                    grid_dim: (rows.div_ceil(CONV_TC_BM) as u32, self.c_dst.div_ceil(bn) as u32, 1),
                    block_dim: (CONV_TC_THREADS as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                let params = ConvTcParams {
                    src: src.ptr(),
                    w: w.ptr(),
                    bias: bias.map(GpuBuffer::ptr).unwrap_or_default(),
                    dst: dst.ptr_mut(),
                    batch: self.batch as i32,
                    c_src: self.c_src as i32,
                    c_dst: self.c_dst as i32,
                    w_src: self.w_src as i32,
                    w_dst: self.w_dst as i32,
                    src_size: ints(self.src),
                    dst_size: ints(self.dst),
                    kernel: ints(self.kernel),
                    rows: ints(self.rows),
                    src_mul: ints(self.src_mul),
                    src_add: signed_ints(self.src_add),
                    dst_mul: ints(self.dst_mul),
                    dst_add: ints(self.dst_add),
                    taps: ints(self.taps),
                    src_tap: signed_ints(self.src_tap),
                    tap_mul: ints(self.tap_mul),
                    tap_add: ints(self.tap_add),
                };
                gpu.launch(kernel, cfg, &params, what)
            }
        }
    }
}

/// Per-axis sizes as the kernels' ints (every value fits: [`Pairing::check_sizes`]).
fn ints(v: [usize; 3]) -> [i32; 3] {
    v.map(|x| x as i32)
}

/// Per-axis signed offsets as the kernels' ints.
fn signed_ints(v: [i64; 3]) -> [i32; 3] {
    v.map(|x| x as i32)
}

/// The tensor-core kernels keep a mask of at most [`CONV_TC_MAX_TAPS`] taps per axis (cuda/conv_tc.cu).
fn check_tc_taps(taps: [usize; 3], what: &str) -> Result<()> {
    ensure!(
        taps.iter().all(|&t| t <= CONV_TC_MAX_TAPS),
        Shape,
        "{what}: the tensor-core convolution enumerates at most {CONV_TC_MAX_TAPS} taps per axis, this pass needs \
         {taps:?}; use --math exact for such kernels"
    );
    Ok(())
}

/// A tensor-core kernel of cuda/conv_tc.cu in its two tile widths: 64 output columns, and 32 for outputs of at most
/// 32 channels (where 64 would leave half of the tile idle).
#[derive(Clone, Copy)]
struct TcPair<P: Copy> {
    wide: Kernel<P>,
    narrow: Kernel<P>,
}

impl<P: Copy> TcPair<P> {
    /// The kernel for `columns` output columns, and its tile width.
    fn for_columns(self, columns: usize) -> (Kernel<P>, usize) {
        if columns <= CONV_TC_BN_NARROW {
            (self.narrow, CONV_TC_BN_NARROW)
        } else {
            (self.wide, CONV_TC_BN)
        }
    }
}

/// The kernel of one implicit product of cuda/conv.cu's `conv_gemm`: the exact float32 SIMT kernel (parity
/// checks), or a tensor-core pair.
#[derive(Clone, Copy)]
enum GemmKernel {
    Exact(&'static str),
    TensorCore(TcPair<ConvTcParams>),
}

/// The kernel of the weight gradient: the exact float32 SIMT kernel of cuda/conv.cu, or a tensor-core pair.
#[derive(Clone, Copy)]
enum WgradKernel {
    Exact(&'static str),
    TensorCore(TcPair<ConvWgradTcParams>),
}

/// The two `conv_gemm` products of a [`Pairing`] (the third, the weight gradient, has kernels of its own).
#[derive(Clone, Copy)]
enum Product {
    NarrowFromWide,
    WideFromNarrow,
}

impl Pairing {
    /// The kernel of a `conv_gemm` product for this pairing's op on `gpu`: one name per role (conv or transposed
    /// conv, forward or input gradient) and math (exact float32 SIMT, or tf32 tensor cores: [`Gpu::set_exact_f32`]).
    fn gemm_kernel(&self, product: Product, gpu: &Gpu) -> GemmKernel {
        let tc = |wide, narrow| GemmKernel::TensorCore(TcPair { wide, narrow });
        let exact = gpu.exact_f32();
        match (product, self.transposed) {
            (Product::NarrowFromWide, false) if exact => GemmKernel::Exact("conv_fprop"),
            (Product::NarrowFromWide, false) => tc(kernel::conv_fprop_tf32, kernel::conv_fprop_tf32_n32),
            (Product::NarrowFromWide, true) if exact => GemmKernel::Exact("conv_transpose_dgrad"),
            (Product::NarrowFromWide, true) => {
                tc(kernel::conv_transpose_dgrad_tf32, kernel::conv_transpose_dgrad_tf32_n32)
            }
            (Product::WideFromNarrow, false) if exact => GemmKernel::Exact("conv_dgrad"),
            (Product::WideFromNarrow, false) => tc(kernel::conv_dgrad_tf32, kernel::conv_dgrad_tf32_n32),
            (Product::WideFromNarrow, true) if exact => GemmKernel::Exact("conv_transpose_fprop"),
            (Product::WideFromNarrow, true) => {
                tc(kernel::conv_transpose_fprop_tf32, kernel::conv_transpose_fprop_tf32_n32)
            }
        }
    }

    /// The weight-gradient kernel for this pairing's op and math on `gpu`.
    fn wgrad_kernel(&self, gpu: &Gpu) -> WgradKernel {
        match (self.transposed, gpu.exact_f32()) {
            (false, true) => WgradKernel::Exact("conv_wgrad"),
            (false, false) => {
                WgradKernel::TensorCore(TcPair { wide: kernel::conv_wgrad_tf32, narrow: kernel::conv_wgrad_tf32_n32 })
            }
            (true, true) => WgradKernel::Exact("conv_transpose_wgrad"),
            (true, false) => {
                let (wide, narrow) = (kernel::conv_transpose_wgrad_tf32, kernel::conv_transpose_wgrad_tf32_n32);
                WgradKernel::TensorCore(TcPair { wide, narrow })
            }
        }
    }

    fn taps(&self) -> usize {
        self.k.iter().product()
    }

    /// The kernels index rows, reduction indices and weights with 32-bit ints (flat offsets are 64-bit), and launch
    /// no empty grids.
    fn check_sizes(&self, what: &str) -> Result<()> {
        ensure!(
            self.batch > 0 && self.c_wide > 0 && self.c_narrow > 0,
            Shape,
            "{what}: the GPU kernels need a non-empty batch and channel axes"
        );
        let limit = (i32::MAX / 2) as usize;
        let taps = self.taps();
        let largest = [
            self.batch * self.wide.iter().product::<usize>(),
            self.batch * self.narrow.iter().product::<usize>(),
            self.c_wide * self.wide.iter().product::<usize>(),
            self.c_narrow * self.narrow.iter().product::<usize>(),
            self.c_narrow * self.c_wide * taps,
            self.stride.iter().chain(&self.k).copied().max().unwrap_or(0),
        ];
        ensure!(
            largest.iter().all(|&v| v <= limit),
            Shape,
            "{what}: too large for the GPU kernels' 32-bit indices (N * voxels, channels * voxels, weight size and \
             kernel/stride must stay below {limit})"
        );
        Ok(())
    }

    /// `Xn[n,cn,o] = b[cn] + sum_{cw,a} W[cn,cw,a] Xw[n,cw, o*s + a - p]`: one implicit product over the narrow
    /// positions.
    pub(crate) fn narrow_from_wide(
        &self,
        wide: &GpuBuffer,
        w: &GpuBuffer,
        bias: Option<&GpuBuffer>,
        what: &str,
    ) -> Result<GpuBuffer> {
        self.check_sizes(what)?;
        let taps = self.taps();
        let geom = GemmGeom {
            batch: self.batch,
            c_src: self.c_wide,
            c_dst: self.c_narrow,
            w_src: taps,
            w_dst: self.c_wide * taps,
            has_bias: bias.is_some(),
            src: self.wide,
            dst: self.narrow,
            kernel: self.k,
            rows: self.narrow,
            src_mul: self.stride,
            src_add: self.pad.map(|p| -(p as i64)),
            dst_mul: [1; 3],
            dst_add: [0; 3],
            taps: self.k,
            src_tap: [1; 3],
            tap_mul: [1; 3],
            tap_add: [0; 3],
        };
        let len = self.batch * self.c_narrow * self.narrow.iter().product::<usize>();
        let mut out = wide.gpu.alloc(len, what)?;
        let kernel = self.gemm_kernel(Product::NarrowFromWide, &wide.gpu);
        geom.launch(kernel, wide, w, bias, &mut out, what)?;
        Ok(out)
    }

    /// One axis of the stride phase `rho` of [`Pairing::wide_from_narrow`]: the wide positions i with
    /// i + p = s*J + rho for J in [j0, j0 + rows), and the taps a = s*q + rho, q in [0, taps), that reach them (from
    /// o = J - q). `None` when no wide position has this phase.
    fn phase(&self, axis: usize, rho: usize) -> Option<(usize, usize, usize)> {
        let (s, p, k) = (self.stride[axis], self.pad[axis], self.k[axis]);
        let j0 = if p > rho { (p - rho).div_ceil(s) } else { 0 };
        let last = (self.wide[axis] - 1 + p).checked_sub(rho)? / s;
        let taps = if k > rho { (k - rho).div_ceil(s) } else { 0 };
        (last >= j0).then_some((j0, last - j0 + 1, taps))
    }

    /// `Xw[n,cw,i] = b[cw] + sum_{cn,a,o : o*s + a - p = i} W[cn,cw,a] Xn[n,cn,o]`: one implicit product per stride
    /// phase (rho_d in [0, s_d) per axis), each over the wide positions of that phase and only the taps that reach
    /// them. Together the phases write every wide position once.
    pub(crate) fn wide_from_narrow(
        &self,
        narrow: &GpuBuffer,
        w: &GpuBuffer,
        bias: Option<&GpuBuffer>,
        what: &str,
    ) -> Result<GpuBuffer> {
        self.check_sizes(what)?;
        let taps = self.taps();
        let len = self.batch * self.c_wide * self.wide.iter().product::<usize>();
        let mut out = narrow.gpu.alloc(len, what)?;
        let [s0, s1, s2] = self.stride;
        for rho in (0..s0).flat_map(|a| (0..s1).flat_map(move |b| (0..s2).map(move |c| [a, b, c]))) {
            let [Some(d), Some(h), Some(w_ax)] = [0, 1, 2].map(|axis| self.phase(axis, rho[axis])) else { continue };
            let axes = [d, h, w_ax];
            let j0 = axes.map(|a| a.0);
            let geom = GemmGeom {
                batch: self.batch,
                c_src: self.c_narrow,
                c_dst: self.c_wide,
                w_src: self.c_wide * taps,
                w_dst: taps,
                has_bias: bias.is_some(),
                src: self.narrow,
                dst: self.wide,
                kernel: self.k,
                rows: axes.map(|a| a.1),
                src_mul: [1; 3],
                src_add: j0.map(|j| j as i64),
                dst_mul: self.stride,
                dst_add: [0, 1, 2].map(|x| self.stride[x] * j0[x] + rho[x] - self.pad[x]),
                taps: axes.map(|a| a.2),
                src_tap: [-1; 3],
                tap_mul: self.stride,
                tap_add: rho,
            };
            let kernel = self.gemm_kernel(Product::WideFromNarrow, &narrow.gpu);
            geom.launch(kernel, narrow, w, bias, &mut out, what)?;
        }
        Ok(out)
    }

    /// `dW[cn,cw,a] = sum_{n,o} Xn[n,cn,o] Xw[n,cw, o*s + a - p]`, shape (Cn, Cw, k): rows (cw, a), columns cn, the
    /// reduction over (n, o) cut into fixed slices summed in order afterwards, so the result does not depend on
    /// scheduling.
    pub(crate) fn weight_grad(&self, narrow: &GpuBuffer, wide: &GpuBuffer, what: &str) -> Result<GpuBuffer> {
        self.check_sizes(what)?;
        let gpu = &narrow.gpu;
        let taps = self.taps();
        let (rows, cols) = (self.c_wide * taps, self.c_narrow);
        let k = self.batch * self.narrow.iter().product::<usize>();
        let kernel = self.wgrad_kernel(gpu);
        let (tile_m, tile_n) = match kernel {
            WgradKernel::Exact(_) => (TILE_M, TILE_N),
            WgradKernel::TensorCore(pair) => (CONV_TC_BM, pair.for_columns(cols).1),
        };
        let tiles = rows.div_ceil(tile_m) * cols.div_ceil(tile_n);
        let k_stages = k.div_ceil(TILE_K);
        let wanted = WGRAD_TARGET_BLOCKS.div_ceil(tiles).max(k.div_ceil(WGRAD_MAX_SLICE));
        let slice_len = k_stages.div_ceil(wanted.clamp(1, k_stages.min(65535))) * TILE_K;
        let slices = k.div_ceil(slice_len);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(tile_m) as u32, cols.div_ceil(tile_n) as u32, slices as u32),
            block_dim: (TILE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let numel = cols * rows;
        // One slice writes dW itself; several write partial sums that sum_slices adds in order.
        let mut out = gpu.alloc(slices * numel, what)?;
        match kernel {
            WgradKernel::Exact(name) => {
                // The kernel's argument: the 19 ints of cuda/conv.cu's WeightGradGeom, in its order.
                let head = [self.batch, self.c_narrow, self.c_wide].map(|x| x as i32);
                let axes = [ints(self.narrow), ints(self.wide), ints(self.k), ints(self.stride), ints(self.pad)];
                let flat: Vec<i32> =
                    head.into_iter().chain(axes.into_iter().flatten()).chain([slice_len as i32]).collect();
                let mut args = [0i32; 19];
                args.copy_from_slice(&flat);
                launch!(gpu, name, cfg, what, [&narrow.slice, &wide.slice, &mut out.slice, &args])?;
            }
            WgradKernel::TensorCore(pair) => {
                check_tc_taps(self.k, what)?;
                let params = ConvWgradTcParams {
                    narrow: narrow.ptr(),
                    wide: wide.ptr(),
                    partial: out.ptr_mut(),
                    batch: self.batch as i32,
                    c_narrow: self.c_narrow as i32,
                    c_wide: self.c_wide as i32,
                    narrow_size: ints(self.narrow),
                    wide_size: ints(self.wide),
                    kernel: ints(self.k),
                    stride: ints(self.stride),
                    pad: ints(self.pad),
                    slice_len: slice_len as i32,
                };
                gpu.launch(pair.for_columns(cols).0, cfg, &params, what)?;
            }
        }
        if slices == 1 {
            return Ok(out);
        }
        let mut dw = gpu.alloc(numel, what)?;
        let (n, s) = (numel as i64, slices as i32);
        launch!(gpu, "sum_slices", grid_1d(numel), what, [&out.slice, &mut dw.slice, &n, &s])?;
        Ok(dw)
    }
}

/// `out[c] = sum_{n,v} g[n,c,v]` for a map `g` of (batch, channels, voxels) (the bias gradient): fixed chunks of
/// each row are summed by one block each, then the chunk sums of each channel the same way, until one remains.
pub(crate) fn channel_sums(
    g: &GpuBuffer,
    batch: usize,
    channels: usize,
    voxels: usize,
    what: &str,
) -> Result<GpuBuffer> {
    ensure!(
        batch > 0 && channels > 0 && channels <= 65535 && voxels > 0,
        Shape,
        "{what}: the bias gradient on the GPU needs a non-empty map and at most 65535 channels"
    );
    let gpu = &g.gpu;
    let (mut rows, mut len) = (batch, voxels);
    let mut level: Option<GpuBuffer> = None;
    loop {
        let chunks = len.div_ceil(CHANNEL_SUM_CHUNK);
        let mut out = gpu.alloc(channels * rows * chunks, what)?;
        let cfg = LaunchConfig {
            grid_dim: ((rows * chunks) as u32, channels as u32, 1),
            block_dim: (TILE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (c, l, cl, ch) = (channels as i32, len as i64, CHANNEL_SUM_CHUNK as i64, chunks as i32);
        let input = level.as_ref().unwrap_or(g);
        launch!(gpu, "channel_sums", cfg, what, [&input.slice, &mut out.slice, &c, &l, &cl, &ch])?;
        if rows * chunks == 1 {
            return Ok(out);
        }
        // The chunk sums (channels, rows * chunks) are the next level's map of one row.
        (rows, len) = (1, rows * chunks);
        level = Some(out);
    }
}

/// The GPU buffer of an operand that `check_same_kind` has placed on the same GPU as the op's input.
pub(crate) fn gpu_operand<'a>(t: &'a Tensor, what: &str) -> Result<&'a GpuBuffer> {
    t.gpu_buffer().ok_or_else(|| {
        Error::Mismatch(format!("{what}: expected a GPU tensor, got {:?} on {:?}", t.shape(), t.device()))
    })
}
