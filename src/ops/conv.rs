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
//! weight gradient, split deterministically over the reduction), and db is a two-level per-channel sum. Each
//! product's parameters (cuda/conv.cuh's `ConvGemmParams`, `ConvWgradParams`) are built once from the pairing's
//! sizes and launched on the exact float32 kernels or, with the same fields, on the tensor-core ones: tf32 from
//! float32 storage, bf16 from bf16 storage (`ConvElement` holds each type's kernels; bf16 has no exact ones); the
//! tensor-core maths run the forward and input gradient of up to 3x3x3 taps (a strided conv's input gradient as
//! stride-1 products, one per stride phase; its forward, at strides (1 or 2, 2, 2), in boxes of 64 positions whose
//! halo is split by phase, 3x3x3 kernels from 128 source channels) and the stride-1 weight gradient on maps of at
//! least 8192 positions on the halo-tile kernels of cuda/conv_halo.cu instead (`halo_suits`,
//! `Pairing::halo_wgrad_suits`; boxes of 128 or, where they cover little more of the map, 256 positions:
//! `HaloKernels::for_product`), the rest on cuda/conv_tc.cu's gathers. On sm_90 the bf16 stride-1 products of 3D maps
//! and of 2D maps from 80x80 (other than a strided conv's input-gradient stride phases) run on Hopper's wgmma instead
//! (cuda/conv_wgmma.cu: the tensor cores read the halo tile from shared memory themselves; `wgmma_suits`,
//! `launch_wgmma`), and so does the stride-1 weight gradient of 3x3x3, 1x3x3 and 3x3 kernels
//! (`Pairing::wgmma_wgrad_kernel`); the products read their source from a channels-last copy (`channels_last`, a halo
//! voxel's 16 channels two 16-byte copies) where each source element meets enough products to pay for the copy
//! (`Pairing::wgmma_channels_last`), else from the map itself. The other products of more than one tap and 16 source
//! channels and at least 1024 positions (a strided conv's forward, the products of smaller 2D maps), and such a conv's
//! input-gradient stride phases into more than 32 channels from one tap up, run there as implicit matrix
//! products, each position's row gathered tap by tap from the copy (cuda/gemm_wgmma.cu, `implicit_suits`,
//! `launch_implicit`). The bf16 weight gradients of 3x3 kernels (1x3x3, and 3x3x3 into more than 64 channels) of stride
//! 1 or 2 between maps of at least 64 channels run on sm_90 as warpgroup products over boxes that the TMA unit copies
//! from channels-last copies of both maps, a tap's box its corner shifted by the tap (at stride 2 taken at steps of 2:
//! cuda/conv_tma.cu, `Pairing::tma_wgrad_rows`, `Pairing::weight_grad_tma`), and so do the forward and input gradient
//! of such convs between maps of at least 128 channels and 64 positions (the weight packed as the product's rows, its
//! taps in columns that share a source box; a strided forward's source at steps of the stride, a strided input gradient
//! one product per stride phase: `Pairing::tma_product_rows`, `Pairing::tma_launches`). The other weight gradients of
//! 1x1x1 kernels, of at least 320 narrow channels on small maps, of one-channel inputs and of the other strided convs
//! from 64 wide channels run as one explicit product over the wide map's columns (cuda/gemm_wgmma.cu,
//! `Pairing::gemm_wgrad_suits`, `Pairing::weight_grad_gemm`);
//! a transposed conv's backward from 64 wide channels unfolds g into such columns once (its kernel is its stride:
//! they are g rearranged) and runs dW as that product and dx as a 1x1x1 conv's forward over them
//! (`Pairing::unfolded`); the forward and input gradient of stride-1 convs of at least 512 source channels on small
//! maps run as the same product over the source map's rows (`Pairing::explicit_suits`, `Pairing::explicit_product`).
//! The bf16 1x1x1 products (a 1x1x1 conv's forward and input gradient, the transposed conv's forward with its taps as
//! channels) of at most GEMM_STREAM_MAX_K source channels on maps of whole 16-byte channels run on the linear layers'
//! streaming products in their channels-first form (cuda/gemm.cu's `conv_*_pointwise_bf16_n*`, `pointwise`): a block
//! keeps its columns of W and walks 64-position tiles with three in flight, where the gathers above load, multiply and
//! store in turn; those of more source channels on sm_90 as wgmma products in the same form (cuda/gemm_wgmma.cu's
//! `conv_*_pointwise_wgmma_bf16`: the map's channel rows and W staged MN-major as they lie, no copy). With a bf16
//! input, a float32 weight and bias are read as their bf16 copies ([`Weight`]); dW and db are summed in float32 and
//! returned in the masters' type (a float32 master's gradient is never rounded). conv_transpose runs on the same three
//! products with the roles of its maps swapped.
//!
//! Cost per element of y, with k = k_d k_h k_w taps and a stride of s = s_d s_h s_w (the counting rules are in
//! [`ops`](crate::ops)): forward 2 Cin k FLOPs (a multiply and an add per input channel and tap) and at least
//! E (1 + Cin / (Cout s)) bytes with E = 4 for float32 and 2 for bf16 storage (x read once, y written once; the
//! weights are small); backward 4 Cin k FLOPs (dL/dx and dL/dw each as many as the forward) and at least
//! E (1 + 2 Cin / (Cout s)) bytes (read dL/dy and x, write dL/dx). At stage 0 of the 3D reference (32 to 32
//! channels, 3x3x3, float32) that is 1728 FLOPs per 8 bytes, 216 per byte: bound by arithmetic, not by memory.

use std::borrow::Cow;
use std::sync::Arc;

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use crate::autograd::{Backward, Tape};
use half::bf16;

use crate::device::cuda::{grid_1d, GpuBuffer, GpuElement};
use crate::device::params::{
    kernel, ChannelSumsParams, ConstPtr, ConvGemmParams, ConvHaloParams, ConvIm2colParams, ConvIm2rowParams,
    ConvImplicitParams, ConvPackParams, ConvRowsStoreParams, ConvTmaPackParams, ConvTmaProductParams,
    ConvTransposeWgmmaParams, ConvWeightFlipParams, ConvWgmmaParams, ConvWgradHaloParams, ConvWgradParams,
    ConvWgradTmaParams, ConvWgradTmaSumParams, ConvWgradWgmmaParams, GemmWgmmaParams, Kernel, SumSlicesParams,
    TensorMap, CONV_BK, CONV_BM, CONV_BN, CONV_HALO_BM, CONV_HALO_BM_LARGE, CONV_HALO_BM_STRIDED, CONV_HALO_BN,
    CONV_HALO_BN_NARROW, CONV_HALO_MAX_TAPS, CONV_HALO_PAIR_STRIDE, CONV_HALO_PAIR_STRIDE_LARGE, CONV_HALO_THREADS,
    CONV_HALO_WG_COLS, CONV_HALO_WG_ROWS, CONV_HALO_WG_SHARED_WORDS, CONV_HALO_WORDS, CONV_TC_BK, CONV_TC_BM,
    CONV_TC_BN, CONV_TC_BN_NARROW, CONV_TC_MAX_TAPS, CONV_TC_THREADS, CONV_THREADS, CONV_TMA_COLS, CONV_TMA_MAX_TAPS,
    CONV_TMA_PIPELINE_THREADS, CONV_TMA_POSITIONS, CONV_TMA_PRODUCT_BOX_X_MAX, CONV_TMA_PRODUCT_POSITIONS,
    CONV_TMA_PRODUCT_POSITIONS_M64, CONV_TMA_PRODUCT_SHARED, CONV_TMA_SHARED_BYTES_M128, CONV_TMA_SHARED_BYTES_M64,
    CONV_TMA_SUM_PAIRS, CONV_TMA_THREADS, CONV_WGMMA_BN, CONV_WGMMA_BN_NARROW, CONV_WGMMA_CHUNK, CONV_WGMMA_MAX_HALO,
    CONV_WGMMA_THREADS, CONV_WGMMA_TILES, CONV_WGMMA_TILE_X, CONV_WGMMA_WG_COLS_K1, CONV_WGMMA_WG_COLS_K3,
    CONV_WGMMA_WG_PITCH, CONV_WGMMA_WG_ROWS, GEMM_WGMMA_BK, GEMM_WGMMA_BM, GEMM_WGMMA_BN, GEMM_WGMMA_BN_WIDE,
    GEMM_WGMMA_STAGES, GEMM_WGMMA_THREADS,
};
use crate::device::Gpu;
use crate::ops::cast::{params_in, Weight};
use crate::ops::concat::copy_rows_gpu;
use crate::ops::linear::{Pointwise, PointwiseKernels};
use crate::ops::operand::{Kept, Operand};
use crate::ops::{channel_sums_cpu, per_axis, pim, MapDims};
use crate::profile;
use crate::tensor::{DType, Real, Tensor};
use crate::{by_dtype, by_gpu_type, ensure, Error, Result};

/// Cross-correlation of `x` (N, Cin, \[D,\] H, W) with `w` (Cout, Cin, \[kd,\] kh, kw) plus an optional `bias` (Cout),
/// zero-padded by k/2 per axis (kernel sizes must be odd), with `stride` given for each spatial axis of the map.
/// The output is (N, Cout, \[Do,\] Ho, Wo) with O = (I - 1)/s + 1 per axis, as PyTorch's Conv2d/Conv3d with
/// `padding = k // 2`. `x` is a tensor, kept for the weight gradient, or an [`Operand`] that the backward pass
/// rebuilds (a residual block's normalised map, [`Operand::Normalized`]).
pub fn conv<'a>(
    tape: &mut Tape,
    x: impl Into<Operand<'a>>,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: &[usize],
) -> Result<Tensor> {
    let (x, kept) = {
        let x = x.into();
        (x.value(), x.keep())
    };
    let (weight, bias_weight) = (Weight::like(tape, w, x)?, bias.map(|b| Weight::like(tape, b, x)).transpose()?);
    let (w, bias) = (&weight.value, bias_weight.as_ref().map(|b| &b.value));
    let geom = ConvGeom::new(x, w, bias, stride)?;
    let range = profile::forward(geom.kind(), &[x, w], geom.flops());
    fn gpu<T: ConvElement>(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, geom: &ConvGeom) -> Result<Tensor> {
        let b = bias.map(|b| b.gpu_operand::<T>("conv bias")).transpose()?;
        let (xb, wb) = (x.gpu_operand::<T>("conv input")?, w.gpu_operand::<T>("conv weight")?);
        Tensor::from_gpu(geom.pairing().narrow_from_wide(xb, wb, b, &geom.describe())?, &geom.out_shape())
    }
    let y = match by_gpu_type!(x, gpu(x, w, bias, &geom)) {
        Some(y) => y?,
        None => by_dtype!(x.dtype(), forward_cpu(x, w, bias, &geom))?,
    };
    let saved = ConvBackward {
        x: kept,
        x_shape: x.shape().to_vec(),
        w: w.clone(),
        has_bias: bias.is_some(),
        grad_dtype: weight.dtype(),
        geom,
    };
    range.done([&y]);
    match &bias_weight {
        Some(b) => tape.record(&[x, &weight.master, &b.master], &y, saved),
        None => tape.record(&[x, &weight.master], &y, saved),
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
    /// The input, or what rebuilds it: read only for the weight gradient.
    x: Kept,
    x_shape: Vec<usize>,
    /// The weight as the kernels read it (in the input's dtype).
    w: Tensor,
    has_bias: bool,
    /// The masters' type, which dW and db are returned in.
    grad_dtype: DType,
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
        grad_out.check_same_kind(&self.w, "conv backward")?;
        let x = if needs[1] { Some(self.x.get()?) } else { None };
        fn gpu<T: ConvElement>(
            s: &ConvBackward,
            x: Option<&Tensor>,
            grad_out: &Tensor,
            needs: &[bool],
        ) -> Result<Vec<Option<Tensor>>> {
            let (g, what) = (&s.geom, format!("{} backward", s.geom.describe()));
            let gb = grad_out.gpu_operand::<T>("conv backward")?;
            let x = x.map(|x| x.gpu_operand::<T>("conv input")).transpose()?;
            let w = s.w.gpu_operand::<T>("conv weight")?;
            params_in(s.grad_dtype, g.pairing().backward(gb, x, w, needs, [&s.x_shape, s.w.shape()], &what)?)
        }
        if let Some(grads) = by_gpu_type!(grad_out, gpu(self, x.as_ref(), grad_out, needs)) {
            return grads;
        }
        let dtype = grad_out.dtype();
        let dx = if needs[0] { Some(by_dtype!(dtype, grad_input_cpu(grad_out, &self.w, g))?) } else { None };
        let dw = match &x {
            Some(x) => Some(by_dtype!(dtype, grad_weight_cpu(grad_out, x, self.w.shape(), g))?),
            None => None,
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

// Weight-gradient slices are whole stages of both the exact kernels (cuda/conv.cuh) and the tensor-core ones
// (cuda/conv_tc.cuh).
const _: () = assert!(CONV_BK % CONV_TC_BK == 0);
/// The halo-tile weight gradient runs on maps of at least this many positions (batch x voxels). Each block stages
/// a box of 128 positions at a time with one 16-bit load per element and no second stage, so it is bound by load
/// latency; on a large map it still beat the gathers (H200, 2026-12-03, same call, flare-3d b2 bf16: 3.83 -> 3.69 ms
/// at 64 channels x 40x112x96, 2.89 -> 2.20 ms at 32 x 40x224x192, 1.07 -> 0.95 ms at 256 x 10x28x24), on the
/// small deep maps it lost (0.45 -> 0.61 ms at 320 x 10x14x12 = 3,360 positions, 0.16 -> 0.37 at 320 x 10x7x6).
const HALO_WGRAD_MIN_POSITIONS: usize = 8192;
/// The weight gradient's reduction is split into enough slices for about this many blocks (a few per SM)...
const WGRAD_TARGET_BLOCKS: usize = 1024;
/// ... and into slices of at most this many terms, which bounds the float32 rounding of each partial sum.
const WGRAD_MAX_SLICE: usize = 16384;
/// Terms per block of the first level of [`channel_sums`].
const CHANNEL_SUM_CHUNK: usize = 8192;
/// Threads per block of [`channel_sums`] (its kernel takes any multiple of 32 up to 1024).
const CHANNEL_SUM_THREADS: u32 = 256;

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

/// A [`Pairing`]'s sizes as the kernels' 32-bit ints, made by [`Pairing::kernel_dims`] once they are known to fit.
#[derive(Clone, Copy, Debug)]
struct KernelDims {
    batch: i32,
    c_wide: i32,
    c_narrow: i32,
    wide: [i32; 3],
    narrow: [i32; 3],
    k: [i32; 3],
    stride: [i32; 3],
    pad: [i32; 3],
}

impl KernelDims {
    fn taps(&self) -> i32 {
        self.k.iter().product()
    }

    /// narrow_from_wide as one `conv_gemm` product (formula in cuda/conv.cuh; the pointers are left null for the
    /// launch to fill): rows r = o over the narrow map, reduction (c, q) = (cw, a) over every tap, source coordinate
    /// o*s - p + a, weight W[cn, cw, a] at cn*(Cw k) + cw*k + tap(a).
    fn narrow_from_wide<T: GpuElement>(&self) -> ConvGemmParams<T> {
        let taps = self.taps();
        ConvGemmParams {
            batch: self.batch,
            c_src: self.c_wide,
            c_dst: self.c_narrow,
            w_src: taps,
            w_dst: self.c_wide * taps,
            src_size: self.wide,
            dst_size: self.narrow,
            kernel: self.k,
            rows: self.narrow,
            src_mul: self.stride,
            src_add: self.pad.map(|p| -p),
            dst_mul: [1; 3],
            dst_add: [0; 3],
            taps: self.k,
            src_tap: [1; 3],
            tap_mul: [1; 3],
            tap_add: [0; 3],
            ..ConvGemmParams::default()
        }
    }

    /// wide_from_narrow as one `conv_gemm` product per stride phase rho (rho_d in [0, s_d) per axis, pointers left
    /// null): rows J in [j0, j0 + rows) per axis (see [`KernelDims::phase`]) writing wide position s*J + rho - p,
    /// reduction (c, q) = (cn, q) over the taps a = s*q + rho that reach it, from narrow position o = J - q, weight
    /// W[cn, cw, a] at cn*(Cw k) + cw*k + tap(a). Phases with no wide position are left out; the others write every
    /// wide position once.
    fn wide_from_narrow<T: GpuElement>(&self) -> Vec<ConvGemmParams<T>> {
        let taps = self.taps();
        let [s0, s1, s2] = self.stride;
        let phases = (0..s0).flat_map(|a| (0..s1).flat_map(move |b| (0..s2).map(move |c| [a, b, c])));
        phases
            .filter_map(|rho| {
                let [Some(ax0), Some(ax1), Some(ax2)] = [0, 1, 2].map(|axis| self.phase(axis, rho[axis])) else {
                    return None;
                };
                let axes = [ax0, ax1, ax2];
                let j0 = axes.map(|a| a.0);
                Some(ConvGemmParams {
                    batch: self.batch,
                    c_src: self.c_narrow,
                    c_dst: self.c_wide,
                    w_src: self.c_wide * taps,
                    w_dst: taps,
                    src_size: self.narrow,
                    dst_size: self.wide,
                    kernel: self.k,
                    rows: axes.map(|a| a.1),
                    src_mul: [1; 3],
                    src_add: j0,
                    dst_mul: self.stride,
                    dst_add: [0, 1, 2].map(|x| self.stride[x] * j0[x] + rho[x] - self.pad[x]),
                    taps: axes.map(|a| a.2),
                    src_tap: [-1; 3],
                    tap_mul: self.stride,
                    tap_add: rho,
                    ..ConvGemmParams::default()
                })
            })
            .collect()
    }

    /// One axis of a stride phase `rho` of [`KernelDims::wide_from_narrow`]: the wide positions i with
    /// i + p = s*J + rho for J in [j0, j0 + rows), and the taps a = s*q + rho, q in [0, taps), that reach them (from
    /// o = J - q), as (j0, rows, taps); `None` when no wide position has this phase. With I the wide size, j0 =
    /// ceil((p - rho) / s) when p > rho (else 0) is the first J with i >= 0, floor((I - 1 + p - rho) / s) the last
    /// with i <= I - 1, and taps = ceil((k - rho) / s) when k > rho (else 0).
    fn phase(&self, axis: usize, rho: i32) -> Option<(i32, i32, i32)> {
        let (s, p, k) = (self.stride[axis], self.pad[axis], self.k[axis]);
        let j0 = if p > rho { (p - rho + s - 1) / s } else { 0 };
        let top = self.wide[axis] - 1 + p - rho;
        if top < 0 {
            return None;
        }
        let last = top / s;
        let taps = if k > rho { (k - rho + s - 1) / s } else { 0 };
        (last >= j0).then_some((j0, last - j0 + 1, taps))
    }

    /// The weight gradient with its reduction over (n, o) cut into slices of `slice_len` terms (pointers left null).
    fn weight_grad<T: GpuElement>(&self, slice_len: i32) -> ConvWgradParams<T> {
        ConvWgradParams {
            batch: self.batch,
            c_narrow: self.c_narrow,
            c_wide: self.c_wide,
            narrow_size: self.narrow,
            wide_size: self.wide,
            kernel: self.k,
            stride: self.stride,
            pad: self.pad,
            slice_len,
            ..ConvWgradParams::default()
        }
    }

    /// The stride-1 weight gradient on the halo-tile kernel (pointers left null), and its slice count: boxes of
    /// CONV_HALO_BM narrow positions, dealt in runs of equal length to about WGRAD_TARGET_BLOCKS / tiles slices.
    fn weight_grad_halo<T: GpuElement>(&self) -> (ConvWgradHaloParams<T>, usize) {
        let (tile_x, boxes) = halo_boxes(self.batch, self.narrow, self.k, [1; 3], CONV_HALO_BM);
        let tiles =
            (self.c_wide as usize).div_ceil(CONV_HALO_WG_ROWS) * (self.c_narrow as usize).div_ceil(CONV_HALO_WG_COLS);
        let (boxes_per_slice, slices) = split_reduction(boxes, WGRAD_TARGET_BLOCKS.div_ceil(tiles));
        let params = ConvWgradHaloParams {
            batch: self.batch,
            c_narrow: self.c_narrow,
            c_wide: self.c_wide,
            narrow_size: self.narrow,
            wide_size: self.wide,
            kernel: self.k,
            pad: self.pad,
            tile_x,
            // Bounded by batch * prod(narrow), which kernel_dims bounds.
            boxes: boxes as i32,
            boxes_per_slice: boxes_per_slice as i32,
            ..ConvWgradHaloParams::default()
        };
        (params, slices)
    }
}

/// Launches one `conv_gemm` product, `product` (pointers null) on the buffers, with `kernel`: it writes every output
/// position the product enumerates. `src_last` keeps `src`'s channels-last copy once a wgmma product has made it, for
/// the next product from the same source (the input gradient's stride phases).
#[allow(clippy::too_many_arguments)]
fn launch_product<T: ConvElement>(
    kernel: GemmKernel<T>,
    product: ConvGemmParams<T>,
    src: &GpuBuffer<T>,
    src_last: &mut SourceLast<T>,
    w: &GpuBuffer<T>,
    bias: Option<&GpuBuffer<T>>,
    dst: &mut GpuBuffer<T>,
    what: &str,
) -> Result<()> {
    let p = ConvGemmParams {
        src: src.ptr(),
        w: w.ptr(),
        bias: bias.map(GpuBuffer::ptr).unwrap_or_default(),
        dst: dst.ptr_mut(),
        ..product
    };
    let rows = output_positions(&p);
    let columns = p.c_dst as usize;
    let grid = |tile_m: usize, tile_n: usize, threads: usize| LaunchConfig {
        grid_dim: (rows.div_ceil(tile_m) as u32, columns.div_ceil(tile_n) as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let gpu = &src.gpu;
    if let GemmKernel::TensorCore(_, _, Some(kernels)) = kernel {
        if let Some(pw) = pointwise(&p, kernels).filter(|pw| pw.suits(gpu, p.src, p.dst)) {
            return pw.run(gpu, p.src, p.w, p.bias, p.dst, what);
        }
    }
    match kernel {
        GemmKernel::Exact(exact) => gpu.launch(exact, grid(CONV_BM, CONV_BN, CONV_THREADS), &p, what),
        GemmKernel::TensorCore(_, Some(HaloKernels { pack, implicit: Some(implicit), .. }), _)
            if implicit_suits(&p) && gpu.has_kernel(implicit.tiles.wide) =>
        {
            launch_implicit(pack, implicit, &p, src_last, gpu, what)
        }
        GemmKernel::TensorCore(_, Some(halo), _) if halo_suits(&p) => launch_halo(halo, &p, src_last, gpu, what),
        GemmKernel::TensorCore(pair, _, _) => {
            check_tc_taps(p.taps, what)?;
            let (tc, tile_n) = pair.for_columns(columns);
            gpu.launch(tc, grid(CONV_TC_BM, tile_n, CONV_TC_THREADS), &p, what)
        }
    }
}

/// `p` as a channels-first 1x1x1 product on `kernels`, if it is one: a single tap, every output position from the
/// source position of the same index, and W laid out as the role's kernels read it.
fn pointwise<T: GpuElement>(p: &ConvGemmParams<T>, kernels: PointwiseKernels<T>) -> Option<Pointwise<T>> {
    let same = p.rows == p.src_size
        && p.rows == p.dst_size
        && p.taps == [1; 3]
        && p.kernel == [1; 3]
        && p.src_mul == [1; 3]
        && p.dst_mul == [1; 3]
        && p.src_add == [0; 3]
        && p.dst_add == [0; 3];
    let layout = match kernels.w_k_major {
        false => p.w_src == 1 && p.w_dst == p.c_src,
        true => p.w_dst == 1 && p.w_src == p.c_dst,
    };
    (same && layout).then(|| Pointwise {
        kernels,
        batch: p.batch as usize,
        k: p.c_src as usize,
        n: p.c_dst as usize,
        positions: p.rows.iter().map(|&r| r as usize).product(),
    })
}

/// Source channels per stage of the halo-tile kernels: [`CONV_HALO_WORDS`] 32-bit operand words (bf16 pairs or
/// float32 singles).
fn halo_chunk<T>() -> usize {
    CONV_HALO_WORDS * 4 / std::mem::size_of::<T>()
}

/// Whether the halo-tile kernels of cuda/conv_halo.cu compute `p`: a product of at most [`CONV_HALO_MAX_TAPS`] taps
/// per axis and more than one tap, with at least one whole stage of source channels, whose source is walked one
/// position per tap and either one per row, either way (the forward of a stride-1 conv, the input gradient's stride
/// phases of any conv: their output positions may step by the stride), or forwards by 2 along y and x and 1 or 2 along
/// z (a strided conv's forward, [`halo_strided`], where [`HALO_STRIDED_FEW_TAPS`] says it wins). The others stay on
/// conv_tc.cu's gathers: fewer channels would leave most of each product zero (the 1-channel stem), and a 1x1x1
/// product reuses no staged voxel (measured on the H200: 0.69-1.33x the gathers there, benches/RESULTS.md).
fn halo_suits<T: Copy>(p: &ConvGemmParams<T>) -> bool {
    let taps = p.taps.iter().product::<i32>() as usize;
    let strided_wins = taps <= HALO_STRIDED_FEW_TAPS || p.c_src as usize >= HALO_STRIDED_MIN_CHANNELS;
    let walk = (0..3).all(|d| p.src_mul[d] == 1 && p.src_tap[d].abs() == 1) || (halo_strided(p) && strided_wins);
    walk && (0..3).all(|d| (1..=CONV_HALO_MAX_TAPS as i32).contains(&p.taps[d]))
        && taps > 1
        && p.c_src as usize >= halo_chunk::<T>()
}

/// A strided forward of more than this many taps runs on the halo tiles only from [`HALO_STRIDED_MIN_CHANNELS`] source
/// channels on: its boxes of 64 positions then hold 176 KB of shared memory (one block per SM), and on the large maps
/// of few channels the gathers measured faster (H200, 2026-12-03, flare-3d b2 bf16, gathers against halo: 32 -> 64 at
/// 40x224x192 [1,2,2] 1.515 against 1.599 ms, 64 -> 128 [2,2,2] 0.766 against 0.816; from 128 channels the halo won:
/// 0.466 -> 0.414, 0.459 -> 0.375, 0.420 -> 0.148; every amos-2d 3x3 stride-2 forward won, 32 channels included:
/// 0.242 -> 0.233 ... 0.232 -> 0.099).
const HALO_STRIDED_FEW_TAPS: usize = 9;
/// See [`HALO_STRIDED_FEW_TAPS`].
const HALO_STRIDED_MIN_CHANNELS: usize = 128;

/// Whether `p` walks its source forwards at the strides of the halo kernels' strided boxes
/// ([`CONV_HALO_BM_STRIDED`]): 2 along y and x, 1 or 2 along z.
fn halo_strided<T: Copy>(p: &ConvGemmParams<T>) -> bool {
    matches!(p.src_mul, [1 | 2, 2, 2]) && p.src_tap == [1; 3]
}

/// The extent along the last axis of a halo box of `positions` positions: the one that stages the fewest halo voxels
/// over the map, counting the positions past its edge that a box covers for nothing. A source walked at stride s
/// (`src_mul`) is staged split by phase, s (tile + (taps - 1) / s) lines per axis; boxes of
/// [`CONV_HALO_BM_STRIDED`] take 8 or 16 (2 x 32 would stage more than their pair stride holds), the others 8, 16
/// or 32.
fn halo_tile_x(rows: [i32; 3], taps: [i32; 3], src_mul: [i32; 3], positions: usize) -> i32 {
    let cost = |tile_x: i32| {
        let tile_y = positions as i32 / tile_x;
        let along = |len: i32, tile: i32, taps: i32, s: i32| {
            ((len + tile - 1) / tile) as i64 * (s * (tile + (taps - 1) / s)) as i64
        };
        (along(rows[2], tile_x, taps[2], src_mul[2]) * along(rows[1], tile_y, taps[1], src_mul[1]), -tile_x)
    };
    let candidates: &[i32] = if positions == CONV_HALO_BM_STRIDED { &[16, 8] } else { &[32, 16, 8] };
    candidates.iter().copied().min_by_key(|&t| cost(t)).expect("a candidate")
}

/// The halo-tile launch of the product `p` ([`halo_suits`]) for tiles of `tile_n` columns and boxes of `positions`
/// positions: the weight packing's parameters (pointers left null) and the product's (its `packed` pointer null),
/// with the grid's box count.
fn halo_params<T: GpuElement>(
    p: &ConvGemmParams<T>,
    tile_n: usize,
    positions: usize,
) -> (ConvPackParams<T>, ConvHaloParams<T>, usize) {
    let taps = p.taps.iter().product::<i32>() as usize;
    let (c_src, c_dst) = (p.c_src as usize, p.c_dst as usize);
    let c_dst_pad = c_dst.next_multiple_of(tile_n);
    let chunk = halo_chunk::<T>();
    let len = c_src.div_ceil(chunk) * taps * c_dst_pad * chunk;
    let pack = ConvPackParams {
        w: p.w,
        c_src: p.c_src,
        c_dst: p.c_dst,
        c_dst_pad: c_dst_pad as i32,
        w_src: p.w_src,
        w_dst: p.w_dst,
        kernel: p.kernel,
        taps: p.taps,
        tap_mul: p.tap_mul,
        tap_add: p.tap_add,
        flip: p.src_tap.map(|t| (t < 0) as i32),
        parts: 1,
        len: len as i64,
        ..ConvPackParams::default()
    };
    let (tile_x, boxes) = halo_boxes(p.batch, p.rows, p.taps, p.src_mul, positions);
    // A tap walked backwards (src_tap -1) starts taps - 1 positions before src_add.
    let lo = [0, 1, 2].map(|d| p.src_add[d] - if p.src_tap[d] < 0 { p.taps[d] - 1 } else { 0 });
    let product = ConvHaloParams {
        src: p.src,
        bias: p.bias,
        dst: p.dst,
        batch: p.batch,
        c_src: p.c_src,
        c_dst: p.c_dst,
        c_dst_pad: c_dst_pad as i32,
        src_size: p.src_size,
        dst_size: p.dst_size,
        rows: p.rows,
        lo,
        dst_base: (p.dst_add[0] * p.dst_size[1] + p.dst_add[1]) * p.dst_size[2] + p.dst_add[2],
        dst_step: [p.dst_mul[0] * p.dst_size[1] * p.dst_size[2], p.dst_mul[1] * p.dst_size[2], p.dst_mul[2]],
        taps: p.taps,
        tile_x,
        ..ConvHaloParams::default()
    };
    (pack, product, boxes)
}

/// The halo boxes of `positions` positions over `batch` maps of `rows` for `taps` and a source walked at `src_mul`:
/// the box's extent along the last axis ([`halo_tile_x`]) and the box count.
fn halo_boxes(batch: i32, rows: [i32; 3], taps: [i32; 3], src_mul: [i32; 3], positions: usize) -> (i32, usize) {
    let tile_x = halo_tile_x(rows, taps, src_mul, positions);
    let tile_y = positions as i32 / tile_x;
    let boxes = batch as usize
        * rows[0] as usize
        * (rows[1] as usize).div_ceil(tile_y as usize)
        * (rows[2] as usize).div_ceil(tile_x as usize);
    (tile_x, boxes)
}

/// Launches the product `p` ([`halo_suits`], pointers filled) on the halo-tile kernels: packs the weight for the
/// product's taps (conv_pack_*), then runs the product from it (formulas in cuda/conv_halo.cuh).
fn launch_halo<T: ConvElement>(
    halo: HaloKernels<T>,
    p: &ConvGemmParams<T>,
    src_last: &mut SourceLast<T>,
    gpu: &Arc<Gpu>,
    what: &str,
) -> Result<()> {
    if let Some(wgmma) = halo.wgmma.filter(|w| wgmma_suits(p) && gpu.has_kernel(w.first.generic.wide.0)) {
        return launch_wgmma(halo.pack, wgmma, p, src_last, gpu, what);
    }
    let (product, tile_n, positions, pair_stride) = halo.for_product(p);
    let (pack, params, boxes) = halo_params(p, tile_n, positions);
    let mut packed = gpu.alloc_of::<T>(pack.len as usize, what)?;
    gpu.launch(halo.pack, grid_1d(pack.len as usize), &ConvPackParams { packed: packed.ptr_mut(), ..pack }, what)?;
    let taps = p.taps.iter().product::<i32>() as usize;
    let stage_bytes = 4 * CONV_HALO_WORDS * (pair_stride + taps * tile_n);
    let cfg = LaunchConfig {
        grid_dim: (boxes as u32, (p.c_dst as usize).div_ceil(tile_n) as u32, 1),
        block_dim: (CONV_HALO_THREADS as u32, 1, 1),
        shared_mem_bytes: (2 * stage_bytes) as u32,
    };
    gpu.launch(product, cfg, &ConvHaloParams { packed: packed.ptr(), ..params }, what)
}

/// Launches the stride-1 product `p` ([`halo_suits`], [`wgmma_suits`], pointers filled) on the wgmma kernels of
/// cuda/conv_wgmma.cu: the halo tiles' weight packing in two parts per column, then the product in boxes of
/// [`CONV_WGMMA_TILES`] tiles of 64 positions, `box_z` slices deep ([`wgmma_box_z`]), from the channels-first source
/// or, where `src_last` asks for it, from its channels-last copy (the _cl kernels).
fn launch_wgmma<T: ConvElement>(
    pack_kernel: Kernel<ConvPackParams<T>>,
    kernels: WgmmaLayouts<T>,
    p: &ConvGemmParams<T>,
    src_last: &mut SourceLast<T>,
    gpu: &Arc<Gpu>,
    what: &str,
) -> Result<()> {
    debug_assert_eq!(halo_chunk::<T>(), CONV_WGMMA_CHUNK, "the packing's chunk is one wgmma k-step");
    let box_z = wgmma_box_z(p.rows, p.taps);
    let tile_n = kernels.first.generic.for_columns(p.c_dst as usize).1;
    let (pack, h, _) = halo_params(p, tile_n, CONV_HALO_BM);
    let packed = pack_halves(pack_kernel, pack, gpu, what)?;
    let (pair, src) = if src_last.halo {
        (kernels.last.for_geometry(p.taps, box_z), src_last.get(p, gpu, what)?)
    } else {
        // The fixed geometries' wide tile loads a channels-first halo 4 voxels at a time from x - 1 on: rows of
        // whole 8-byte words.
        let quads = h.lo[1..] == [-1, -1] && h.src_size[2] % 4 == 0 && h.src.address() % 8 == 0;
        (if quads { kernels.first.for_geometry(p.taps, box_z) } else { kernels.first.generic }, h.src)
    };
    let product = pair.for_columns(p.c_dst as usize).0;
    let box_ = wgmma_box(box_z);
    let boxes = p.batch as usize * (0..3).map(|d| (p.rows[d] as usize).div_ceil(box_[d])).product::<usize>();
    let halo: usize = (0..3).map(|d| box_[d] + p.taps[d] as usize - 1).product();
    let taps = p.taps.iter().product::<i32>() as usize;
    debug_assert!(halo <= CONV_WGMMA_MAX_HALO, "{halo} halo voxels");
    // As many blocks as the GPU holds at once (each takes its boxes in turn, its pipeline running on from box to
    // box), at most one per box.
    let shared_mem_bytes = (2 * 16 * (2 * halo + 2 * taps * tile_n)) as u32;
    let column_tiles = (p.c_dst as usize).div_ceil(tile_n);
    let resident = gpu.resident_blocks(product, CONV_WGMMA_THREADS as u32, shared_mem_bytes, what)?;
    let cfg = LaunchConfig {
        grid_dim: (boxes.min(resident.div_ceil(column_tiles)).max(1) as u32, column_tiles as u32, 1),
        block_dim: (CONV_WGMMA_THREADS as u32, 1, 1),
        shared_mem_bytes,
    };
    let params = ConvWgmmaParams {
        src,
        packed: packed.ptr(),
        bias: h.bias,
        dst: h.dst,
        c_src: h.c_src,
        c_dst: h.c_dst,
        c_dst_pad: h.c_dst_pad,
        src_size: h.src_size,
        dst_size: h.dst_size,
        rows: h.rows,
        lo: h.lo,
        dst_base: h.dst_base,
        dst_step: h.dst_step,
        taps: h.taps,
        box_z: box_z as i32,
        boxes: boxes as i32,
    };
    gpu.launch(product, cfg, &params, what)
}

/// The weight of a wgmma product ([`launch_wgmma`], [`launch_implicit`]) packed by `pack_kernel` in two halves of 8
/// channels per tap and column, each a core-matrix row of the B operand, copied whole.
fn pack_halves<T: ConvElement>(
    pack_kernel: Kernel<ConvPackParams<T>>,
    pack: ConvPackParams<T>,
    gpu: &Arc<Gpu>,
    what: &str,
) -> Result<GpuBuffer<T>> {
    let pack = ConvPackParams { parts: 2, ..pack };
    let mut packed = gpu.alloc_of::<T>(pack.len as usize, what)?;
    gpu.launch(pack_kernel, grid_1d(pack.len as usize), &ConvPackParams { packed: packed.ptr_mut(), ..pack }, what)?;
    Ok(packed)
}

/// The channels-last copy of the source of a pass's products ([`channels_last`]): made by the first wgmma product
/// that reads it and kept for the next from the same source (the input gradient's stride phases). The implicit
/// products always read it, the halo wgmma products where `halo` says so ([`Pairing::wgmma_channels_last`]).
struct SourceLast<T: GpuElement> {
    copy: Option<GpuBuffer<T>>,
    halo: bool,
}

impl<T: ConvElement> SourceLast<T> {
    /// The copy of `p`'s source, made now unless an earlier product made it.
    fn get(&mut self, p: &ConvGemmParams<T>, gpu: &Arc<Gpu>, what: &str) -> Result<ConstPtr<T>> {
        if let Some(copy) = &self.copy {
            return Ok(copy.ptr());
        }
        let copy = channels_last(gpu, p.src, p.batch as usize, p.c_src as usize, source_voxels(p), what)?;
        Ok(self.copy.insert(copy).ptr())
    }
}

/// Whether the implicit wgmma products take `p` ([`launch_implicit`]): a product of at least one chunk of 16 source
/// channels and [`IMPLICIT_MIN_POSITIONS`] output positions whose source is walked one position per tap, and either
/// - a stride phase of a strided conv's input gradient (its output positions step by the stride, `dst_mul`; those of
///   a forward and of a stride-1 input gradient step by 1) into more than [`CONV_WGMMA_BN_NARROW`] channels, of any
///   number of taps from one, where the halo wgmma products stage the whole halo box for a phase's few taps and the
///   one-tap phases ran on the gathers. Measured on the H100 (2026-12-07, benches/RESULTS.md, against the halo
///   products and gathers in the same call): flare-3d's entries 64 -> 128 at 40x112x96 0.888 -> 0.735 ms, 128 -> 256
///   0.324 -> 0.262, 256 -> 320 0.195 -> 0.184; amos-2d's 64 -> 128 at 160x160 0.266 -> 0.222 ... 512 -> 512 at
///   20x20 0.147 -> 0.129. Into 32 channels the halo products' 32-column tile wins (flare-3d 32 -> 64 at 40x224x192:
///   1.323 ms there, 1.581 on the implicit products' 64-column tile); or
/// - another product of more than one tap that the halo products of [`launch_wgmma`] do not take ([`wgmma_suits`]):
///   a strided conv's forward, the products of 2D maps below [`WGMMA_2D_MIN_POSITIONS`] positions.
fn implicit_suits<T: Copy>(p: &ConvGemmParams<T>) -> bool {
    let positions = output_positions(p);
    let taps = p.taps.iter().product::<i32>();
    let phase = p.dst_mul != [1; 3] && p.c_dst as usize > CONV_WGMMA_BN_NARROW;
    let fewest_taps = if phase { 1 } else { 2 };
    let walk = p.src_tap.iter().all(|t| t.abs() == 1) && (phase || p.src_mul != [1; 3] || !wgmma_suits(p));
    walk && taps >= fewest_taps
        && p.c_src as usize >= CONV_WGMMA_CHUNK
        && (IMPLICIT_MIN_POSITIONS..i32::MAX as usize).contains(&positions)
        && channels_last_fits(p.c_src as usize, source_voxels(p))
}

/// The output positions of a product over the batch (the rows of its matrix product).
fn output_positions<T: Copy>(p: &ConvGemmParams<T>) -> usize {
    p.batch as usize * p.rows.iter().map(|&r| r as usize).product::<usize>()
}

/// The voxels of one batch item's source map of a product.
fn source_voxels<T: Copy>(p: &ConvGemmParams<T>) -> usize {
    p.src_size.iter().map(|&s| s as usize).product()
}

/// Launches the product `p` ([`implicit_suits`], pointers filled) as one implicit matrix product on wgmma
/// (cuda/gemm_wgmma.cu's conv_*_implicit_wgmma_bf16, formula in its header): the weight packed in two parts per
/// column as for [`launch_wgmma`], the source's channels-last copy ([`SourceLast`]), then tiles of
/// [`GEMM_WGMMA_BM`] positions and 256, 128 or 64 output channels ([`ImplicitTiles::pick`]).
fn launch_implicit<T: ConvElement>(
    pack_kernel: Kernel<ConvPackParams<T>>,
    kernels: ImplicitTiles<T>,
    p: &ConvGemmParams<T>,
    src_last: &mut SourceLast<T>,
    gpu: &Arc<Gpu>,
    what: &str,
) -> Result<()> {
    let positions = output_positions(p);
    let (product, tile_n) = kernels.pick(gpu, positions, p.c_dst as usize);
    let (pack, h, _) = halo_params(p, tile_n, CONV_HALO_BM);
    let packed = pack_halves(pack_kernel, pack, gpu, what)?;
    let src = src_last.get(p, gpu, what)?;
    let cfg = gemm_wgmma_config(positions, p.c_dst as usize, tile_n, 1);
    let params = ConvImplicitParams {
        src,
        packed: packed.ptr(),
        bias: h.bias,
        dst: h.dst,
        batch: p.batch,
        c_src: h.c_src,
        c_dst: h.c_dst,
        c_dst_pad: h.c_dst_pad,
        src_size: h.src_size,
        dst_size: h.dst_size,
        rows: h.rows,
        src_mul: p.src_mul,
        lo: h.lo,
        dst_base: h.dst_base,
        dst_step: h.dst_step,
        taps: h.taps,
    };
    gpu.launch(product, cfg, &params, what)
}

/// Whether the wgmma kernels take the halo product `p`: a stride-1 walk of a 3D source, or of a 2D one of at least
/// [`WGMMA_2D_MIN_POSITIONS`] output positions, whose channels' elements (c_src x voxels per batch item) have 32-bit
/// indices. On the H200 (2026-12-03, bf16, beside the halo tiles in the same calls; benches/RESULTS.md) they were
/// faster on almost every stride-1 product of flare-3d (stage 1's 64 -> 64 at 40x112x96 1.093 -> 0.688 ms forward,
/// 128 -> 128 at 20x56x48 0.600 -> 0.324, stage 0's 1x3x3 32 -> 32 0.834 -> 0.598) and on amos-2d's from 80x80 (32 ->
/// 32 at 320x320 0.305 -> 0.222, 256 -> 128 at 80x80 0.358 -> 0.317), slower on smaller 2D maps (512 -> 256 at 40x40
/// input gradient 0.338 -> 0.565, 512 -> 512 at 10x10 0.133 -> 0.165: boxes of 32 x 8 positions, one block per SM),
/// which stay on the halo tiles. A strided conv's input-gradient stride phases reach them only where the implicit
/// products do not take those ([`implicit_suits`]).
fn wgmma_suits<T: Copy>(p: &ConvGemmParams<T>) -> bool {
    let large_2d = (p.rows[1] * p.rows[2]) as usize >= WGMMA_2D_MIN_POSITIONS;
    !halo_strided(p) && (p.src_size[0] > 1 || large_2d) && channels_last_fits(p.c_src as usize, source_voxels(p))
}

/// Whether a channels-last map of `channels` (rounded up to 8, [`channels_last`]) x `voxels` per batch item has
/// 32-bit element indices, as the wgmma kernels compute them.
fn channels_last_fits(channels: usize, voxels: usize) -> bool {
    channels.next_multiple_of(8) * voxels < i32::MAX as usize
}

/// The channels-last copy of `batch` channels-first maps of `channels` x `voxels` at `src`, each voxel's channels
/// rounded up to a multiple of 8 with zeros: the source layout of the _cl wgmma products and the implicit products
/// (cuda/conv_wgmma.cuh), made by the PiM partition with one window over the map ([`pim::channels_last`]).
fn channels_last<T: ConvElement>(
    gpu: &Arc<Gpu>,
    src: ConstPtr<T>,
    batch: usize,
    channels: usize,
    voxels: usize,
    what: &str,
) -> Result<GpuBuffer<T>> {
    ensure!(
        channels_last_fits(channels, voxels),
        Shape,
        "{what}: maps of {channels} x {voxels} are too large for the channels-last copy of the wgmma kernels"
    );
    pim::channels_last(gpu, src, batch, channels, channels.next_multiple_of(8), voxels, what)
}

/// The fewest output positions of a 2D product on the wgmma kernels: 80x80 ([`wgmma_suits`]).
const WGMMA_2D_MIN_POSITIONS: usize = 6400;

/// The fewest multiply-adds per source element (kernel taps x output channels x output positions per source position)
/// at which the halo wgmma products read a channels-last copy of their source ([`Pairing::wgmma_channels_last`]).
/// Measured on the H100 (2026-12-06, bf16, every flare-3d and amos-2d product both ways in one call:
/// benches/tables/convs-cl-all-h100.md against convs-cl-all-base-h100.md): the copy paid from 1152 (flare-3d 3x3x3
/// 64 -> 64 at 40x112x96 forward 0.661 -> 0.610 ms, 128 -> 128 at 20x56x48 0.309 -> 0.274; amos-2d 3x3 128 -> 128 at
/// 80x80 0.170 -> 0.134, the input gradient of 128 -> 64 at 160x160 0.257 -> 0.239) and lost up to 576 (1x3x3 32 ->
/// 32 at 40x224x192 0.571 -> 0.915, 64 -> 32 0.863 -> 1.140; amos-2d 3x3 32 -> 32 at 320x320 0.210 -> 0.270, the
/// input gradient of 64 -> 64 at 160x160 0.145 -> 0.152): a full-resolution map of few channels costs as much to
/// copy as its products save.
const WGMMA_CL_MIN_USES: usize = 1024;

/// A wgmma box of `box_z` slices (1, 2 or 4): its extent per axis, [`CONV_WGMMA_TILES`] tiles of 8 rows of
/// [`CONV_WGMMA_TILE_X`].
fn wgmma_box(box_z: usize) -> [usize; 3] {
    [box_z, 8 * (CONV_WGMMA_TILES / box_z), CONV_WGMMA_TILE_X]
}

/// The slices per wgmma box for `taps` over maps of `rows`: the one that stages the fewest halo voxels over the map
/// (a deeper box shares its rows' halo along z, a flatter one along y), counting the positions past its edge. A
/// kernel of 3 taps along z takes boxes of 2 or 4 slices (one slice would stage 3 x 34 x 10 voxels, more than
/// [`CONV_WGMMA_MAX_HALO`]).
fn wgmma_box_z(rows: [i32; 3], taps: [i32; 3]) -> usize {
    let staged = |box_z: usize| {
        let b = wgmma_box(box_z);
        (0..2).map(|d| (rows[d] as usize).div_ceil(b[d]) * (b[d] + taps[d] as usize - 1)).product::<usize>()
    };
    let candidates: &[usize] = if taps[0] > 1 { &[4, 2] } else { &[4, 2, 1] };
    candidates.iter().copied().min_by_key(|&z| staged(z)).expect("a candidate")
}

/// The tensor-core kernels keep a mask of at most [`CONV_TC_MAX_TAPS`] taps per axis (cuda/conv_tc.cu).
fn check_tc_taps(taps: [i32; 3], what: &str) -> Result<()> {
    ensure!(
        taps.iter().all(|&t| t as usize <= CONV_TC_MAX_TAPS),
        Shape,
        "{what}: the tensor-core convolution enumerates at most {CONV_TC_MAX_TAPS} taps per axis, this pass needs \
         {taps:?}; use --math exact for such kernels"
    );
    Ok(())
}

/// A tensor-core kernel in its two tile widths (cuda/conv_tc.cu's 64 and 32 output columns, conv_halo.cu's the
/// same): the narrow one for outputs that fit it, where the wide one would leave half of the tile idle.
#[derive(Clone, Copy)]
pub(crate) struct TcPair<P: Copy> {
    wide: (Kernel<P>, usize),
    narrow: (Kernel<P>, usize),
}

impl<P: Copy> TcPair<P> {
    /// The kernel for `columns` output columns, and its tile width.
    fn for_columns(self, columns: usize) -> (Kernel<P>, usize) {
        if columns <= self.narrow.1 {
            self.narrow
        } else {
            self.wide
        }
    }
}

/// The halo-tile kernels of one role (cuda/conv_halo.cu): the weight packing, the product in boxes of
/// [`CONV_HALO_BM`] positions in both tile widths, and the wide tile's in boxes of [`CONV_HALO_BM_LARGE`].
#[derive(Clone, Copy)]
pub(crate) struct HaloKernels<T: Copy> {
    pack: Kernel<ConvPackParams<T>>,
    small: TcPair<ConvHaloParams<T>>,
    large: Kernel<ConvHaloParams<T>>,
    /// The forward's boxes of [`CONV_HALO_BM_STRIDED`] for sources walked at (1, 2, 2) and (2, 2, 2) (the input
    /// gradient has none: its products walk their source at stride 1).
    strided: Option<[Kernel<ConvHaloParams<T>>; 2]>,
    /// The stride-1 products on wgmma (cuda/conv_wgmma.cu, bf16 on sm_90 only): they take every stride-1 product of
    /// the halo tiles where the GPU has them ([`launch_wgmma`], [`wgmma_suits`]) and the implicit products do not
    /// ([`implicit_suits`]: the input gradient's stride phases into more than 32 channels, for one).
    wgmma: Option<WgmmaLayouts<T>>,
    /// The implicit products on wgmma (cuda/gemm_wgmma.cu, bf16 on sm_90 only) in their three tile widths: the
    /// products [`implicit_suits`] picks ([`launch_implicit`]).
    implicit: Option<ImplicitTiles<T>>,
}

/// The implicit products of one role in tiles of 128 ([`GEMM_WGMMA_BN`]) and 256 output channels, and of 64.
#[derive(Clone, Copy)]
pub(crate) struct ImplicitTiles<T: Copy> {
    tiles: GemmTiles<ConvImplicitParams<T>>,
    narrow: Kernel<ConvImplicitParams<T>>,
}

impl<T: Copy> ImplicitTiles<T> {
    /// The kernel for `positions` x `columns` output channels and its tile width: 64 up to 64 columns, 256 where
    /// they are whole 256-column tiles and [`widest_pays`], else 128 (256 columns that are not whole tiles would pad
    /// the packed weight).
    fn pick(self, gpu: &Gpu, positions: usize, columns: usize) -> (Kernel<ConvImplicitParams<T>>, usize) {
        if columns <= IMPLICIT_BN_NARROW {
            (self.narrow, IMPLICIT_BN_NARROW)
        } else if columns % GEMM_WGMMA_BN_WIDE == 0 {
            self.tiles.pick(gpu, positions, columns)
        } else {
            (self.tiles.wide, GEMM_WGMMA_BN)
        }
    }
}

/// A gemm_wgmma.cu product in its tiles of 128 ([`GEMM_WGMMA_BN`]) and 256 ([`GEMM_WGMMA_BN_WIDE`]) columns.
#[derive(Clone, Copy)]
pub(crate) struct GemmTiles<P: Copy> {
    wide: Kernel<P>,
    widest: Kernel<P>,
}

impl<P: Copy> GemmTiles<P> {
    /// The kernel for an `m` x `n` product (C's rows, columns) on `gpu`, and its tile width ([`widest_pays`]).
    fn pick(self, gpu: &Gpu, m: usize, n: usize) -> (Kernel<P>, usize) {
        if widest_pays(gpu.multiprocessors(), m, n) {
            (self.widest, GEMM_WGMMA_BN_WIDE)
        } else {
            (self.wide, GEMM_WGMMA_BN)
        }
    }
}

/// Whether an `m` x `n` product of gemm_wgmma.cu finishes sooner in 256-column tiles than in 128-column ones on a
/// GPU of `sms` multiprocessors: the blocks run in waves of one per SM either way (128 and 192 KB of stages), and a
/// 256-column block takes 1.7 times a 128-column one (twice the products from 1.5 times the bytes, both bound by
/// what L2 delivers). Fitted on the H100 (2026-12-06, bf16, both widths everywhere in one call; benches/RESULTS.md):
/// 256 columns won where they halved the waves (amos-2d 512 -> 512 at 20x20, 152 -> 76 blocks: forward 0.234 ->
/// 0.207 ms, input gradient 0.245 -> 0.221, weight gradient 0.214 -> 0.199; the strided 256 -> 512 forward at 40x40
/// 0.119 -> 0.105) and lost where the blocks were fewer than the SMs already (512 -> 512 at 10x10, 40 -> 20 blocks:
/// 0.097 -> 0.136) or the waves went from 5 to 3 (512 -> 256 at 40x40 input gradient, 600 -> 300 blocks: 0.293 ->
/// 0.315).
fn widest_pays(sms: usize, m: usize, n: usize) -> bool {
    let waves = |columns: usize| (m.div_ceil(GEMM_WGMMA_BM) * n.div_ceil(columns)).div_ceil(sms);
    10 * waves(GEMM_WGMMA_BN) > 17 * waves(GEMM_WGMMA_BN_WIDE)
}

/// The wgmma products of one role from each source layout ([`SourceLast`]).
#[derive(Clone, Copy)]
pub(crate) struct WgmmaLayouts<T: Copy> {
    /// From the channels-first map.
    first: WgmmaKernels<T>,
    /// From its channels-last copy (the _cl kernels).
    last: WgmmaKernels<T>,
}

/// The wgmma products of one role and source layout, each in its two tile widths: the generic pair (any taps, box
/// depth from the parameters) and the pairs of a fixed geometry (kernel taps, box slices), whose shared-memory offsets
/// are constants and whose wide tile loads a channels-first halo 4 voxels per load: the 3x3x3 and 1x3x3 products
/// take those (from a channels-first source, those padded by 1 in-plane over rows in whole 8-byte words;
/// [`launch_wgmma`]).
#[derive(Clone, Copy)]
pub(crate) struct WgmmaKernels<T: Copy> {
    generic: TcPair<ConvWgmmaParams<T>>,
    /// One per [`WGMMA_GEOMETRIES`] entry.
    fixed: [TcPair<ConvWgmmaParams<T>>; 5],
}

impl<T: Copy> WgmmaKernels<T> {
    /// The pair for a product of `taps` in boxes of `box_z` slices.
    fn for_geometry(&self, taps: [i32; 3], box_z: usize) -> TcPair<ConvWgmmaParams<T>> {
        fixed_geometry(taps, box_z).map_or(self.generic, |at| self.fixed[at])
    }
}

/// The geometries (kernel taps, box slices) compiled as kernels of their own, in the order of their names
/// (`_k333_z4`, `_k333_z2`, `_k133_z4`, `_k133_z2`, `_k133_z1`).
const WGMMA_GEOMETRIES: [([i32; 3], usize); 5] =
    [([3, 3, 3], 4), ([3, 3, 3], 2), ([1, 3, 3], 4), ([1, 3, 3], 2), ([1, 3, 3], 1)];

/// The index in [`WGMMA_GEOMETRIES`] of a product or weight gradient of `taps` in boxes of `box_z` slices, if it has
/// kernels of its own.
fn fixed_geometry(taps: [i32; 3], box_z: usize) -> Option<usize> {
    WGMMA_GEOMETRIES.iter().position(|&g| g == (taps, box_z))
}

/// A role's wgmma kernels from its (wide, narrow) pairs: generic first, then [`WGMMA_GEOMETRIES`]'s.
const fn wgmma_kernels<T: Copy>(pairs: [[Kernel<ConvWgmmaParams<T>>; 2]; 6]) -> WgmmaKernels<T> {
    const fn pair<T: Copy>([wide, narrow]: [Kernel<ConvWgmmaParams<T>>; 2]) -> TcPair<ConvWgmmaParams<T>> {
        TcPair { wide: (wide, CONV_WGMMA_BN), narrow: (narrow, CONV_WGMMA_BN_NARROW) }
    }
    let [generic, a, b, c, d, e] = pairs;
    WgmmaKernels { generic: pair(generic), fixed: [pair(a), pair(b), pair(c), pair(d), pair(e)] }
}

/// A wide-tile halo product takes boxes of [`CONV_HALO_BM_LARGE`] positions (twice the mma work per warp between
/// two barriers, 1.5 instead of 2 shared-memory loads per mma) where they cover at most this many percent of the
/// positions that boxes of [`CONV_HALO_BM`] cover (both counting the positions past the map's edge). Measured per
/// shape on the H200 (benches/RESULTS.md): the large boxes won at 100% (flare-3d 10x14x12, amos-2d 10x10) and 114%
/// (flare-3d 10x28x24) and lost at 120% (amos-2d 20x20) and 200% (10x7x6, 5x5). The narrow tile (at most 32
/// columns) keeps boxes of 128: in boxes of 256 it measured 14-16% slower on the 32-channel maps of 40x224x192 and
/// 320x320 (its 128-position kernel runs two blocks per SM, the large one one).
const HALO_LARGE_MAX_COVER_PERCENT: usize = 115;

impl<T: Copy> HaloKernels<T> {
    /// The product kernel for `p`, its tile width, its box's positions and its halo's pair stride.
    fn for_product(self, p: &ConvGemmParams<T>) -> (Kernel<ConvHaloParams<T>>, usize, usize, usize) {
        if halo_strided(p) {
            let kernels = self.strided.expect("only the forward's products walk their source at a stride");
            let kernel = kernels[(p.src_mul[0] == 2) as usize];
            return (kernel, CONV_HALO_BN, CONV_HALO_BM_STRIDED, CONV_HALO_PAIR_STRIDE_LARGE);
        }
        let (kernel, tile_n) = self.small.for_columns(p.c_dst as usize);
        let cover = |positions| halo_boxes(p.batch, p.rows, p.taps, p.src_mul, positions).1 * positions;
        if tile_n == CONV_HALO_BN
            && 100 * cover(CONV_HALO_BM_LARGE) <= HALO_LARGE_MAX_COVER_PERCENT * cover(CONV_HALO_BM)
        {
            (self.large, tile_n, CONV_HALO_BM_LARGE, CONV_HALO_PAIR_STRIDE_LARGE)
        } else {
            (kernel, tile_n, CONV_HALO_BM, CONV_HALO_PAIR_STRIDE)
        }
    }
}

/// The kernel of one implicit product of cuda/conv.cu's `conv_gemm`: the exact float32 SIMT kernel (parity
/// checks), or a tensor-core pair and, for a conv (not a transposed one), the halo-tile kernels that take the
/// stride-1 products ([`halo_suits`]).
// The tensor-core variant carries the role's kernel table (a few hundred bytes of names): chosen once per product and
// passed by value, so its size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy)]
enum GemmKernel<T: Copy> {
    Exact(Kernel<ConvGemmParams<T>>),
    /// The tensor-core pair, the halo-tile kernels where the role has them, and the channels-first streaming kernels
    /// of 1x1x1 products (n32, n64, n128) where the type and role have them.
    TensorCore(TcPair<ConvGemmParams<T>>, Option<HaloKernels<T>>, Option<PointwiseKernels<T>>),
}

/// The kernel of the weight gradient: the exact float32 SIMT kernel of cuda/conv.cu, or a tensor-core pair.
#[derive(Clone, Copy)]
enum WgradKernel<T: Copy> {
    Exact(Kernel<ConvWgradParams<T>>),
    TensorCore(TcPair<ConvWgradParams<T>>),
}

/// The two `conv_gemm` products of a [`Pairing`] (the third, the weight gradient, has kernels of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Product {
    NarrowFromWide,
    WideFromNarrow,
}

/// The kernels of one role: the exact float32 kernel if the type has one, and the tensor-core pair.
pub(crate) type RoleKernels<P> = (Option<Kernel<P>>, TcPair<P>);

/// A storage type the convolution kernels take, and its kernels per role: one name per role (conv or transposed
/// conv; forward, input gradient, weight gradient) so that a profile tells the six passes apart.
pub(crate) trait ConvElement: GpuElement {
    /// The products, indexed [transposed][product]: (exact float32 kernel if the type has one, tensor-core pair).
    const GEMM: [[RoleKernels<ConvGemmParams<Self>>; 2]; 2];
    /// The weight gradients, indexed [transposed].
    const WGRAD: [RoleKernels<ConvWgradParams<Self>>; 2];
    /// The halo-tile kernels of the conv's forward and input gradient, indexed by product.
    const HALO: [HaloKernels<Self>; 2];
    /// The halo-tile kernel of the conv's weight gradient.
    const HALO_WGRAD: Kernel<ConvWgradHaloParams<Self>>;
    /// The channels-first kernels of 1x1x1 products, if the type has them: the conv's forward, its input gradient and
    /// the transposed conv's forward (its taps as channels).
    const POINTWISE: Option<[PointwiseKernels<Self>; 3]>;
    /// The wgmma kernels of the conv's weight gradient, if the type has them, one per [`WGMMA_GEOMETRIES`] entry.
    const WGMMA_WGRAD: Option<[Kernel<ConvWgradWgmmaParams<Self>>; 5]>;
    /// The TMA kernels of the conv's weight gradient (cuda/conv_tma.cu), if the type has them: 3x3x3 and 1x3x3 in
    /// blocks of 128 narrow channels, 1x3x3 in blocks of 64.
    const TMA_WGRAD: Option<[Kernel<ConvWgradTmaParams>; 4]>;
    /// The TMA kernels of the stride-1 forward and input gradient (cuda/conv_tma.cu), if the type has them.
    const TMA_PRODUCT: Option<TmaProduct<Self>>;
    /// The explicit weight gradient, if the type has it: the wide map's columns (conv.cu's conv_im2col) and the wgmma
    /// product that reduces them, or a 1x1x1 conv's wide map itself, against the narrow map (gemm_wgmma.cu).
    const GEMM_WGRAD: Option<GemmWgrad<Self>>;
    /// The explicit forward and input gradient of stride-1 convs, if the type has them ([`Pairing::explicit_product`]).
    const EXPLICIT: Option<ExplicitConv<Self>>;
    /// The transposed conv's forward as one wgmma product stored straight into its output, if the type has it
    /// (cuda/gemm_wgmma.cu's conv_transpose_fprop_wgmma_bf16, sm_90).
    const TRANSPOSE_FPROP_WGMMA: Option<Kernel<ConvTransposeWgmmaParams<Self>>>;
}

/// The kernels of [`Pairing::explicit_product`]: the source map's rows (conv.cu's conv_im2row), the input gradient's
/// weight (conv_weight_flip), the product per role indexed by [`Product`] (gemm_wgmma.cu) and the store into the map.
#[derive(Clone, Copy)]
pub(crate) struct ExplicitConv<T: Copy> {
    im2row: Kernel<ConvIm2rowParams<T>>,
    flip: Kernel<ConvWeightFlipParams<T>>,
    product: [GemmTiles<GemmWgmmaParams<T>>; 2],
    store: Kernel<ConvRowsStoreParams<T>>,
}

/// One launch of the TMA product ([`Pairing::tma_launches`], cuda/conv_tma.cuh): its grid of output positions o,
/// which lie at `step` o + `phase` in the output map, its source boxes' corners `src_mul` o + a column's offset, and
/// its tap columns.
struct TmaLaunch {
    grid: [usize; 3],
    step: [usize; 3],
    phase: [usize; 3],
    src_mul: [usize; 3],
    columns: Vec<TmaColumn>,
}

/// A tap column of a [`TmaLaunch`]: the source offset (z, y, x) of its first tap and its taps (indices into the
/// conv's kernel), whose sources lie a row of the source box apart.
struct TmaColumn {
    offset: [i32; 3],
    taps: Vec<usize>,
}

/// The kernels of [`Pairing::tma_product`]: the products, and the weight packing.
#[derive(Clone, Copy)]
pub(crate) struct TmaProduct<T: Copy> {
    /// Indexed [product][tile]: the forward (NarrowFromWide) and the input gradient (WideFromNarrow), blocks of 128
    /// and of 64 output channels ([`Pairing::tma_product_rows`]): one name per role, as [`ConvElement`]'s kernels.
    products: [[Kernel<ConvTmaProductParams<T>>; 2]; 2],
    /// The input gradient into at most 32 channels, the positions as the product's m.
    dgrad_n32: Kernel<ConvTmaProductParams<T>>,
    pack: Kernel<ConvTmaPackParams<T>>,
}

/// The two kernels of [`Pairing::weight_grad_gemm`].
#[derive(Clone, Copy)]
pub(crate) struct GemmWgrad<T: Copy> {
    im2col: Kernel<ConvIm2colParams<T>>,
    product: GemmTiles<GemmWgmmaParams<T>>,
}

const fn tc<P: Copy>(wide: Kernel<P>, narrow: Kernel<P>) -> TcPair<P> {
    TcPair { wide: (wide, CONV_TC_BN), narrow: (narrow, CONV_TC_BN_NARROW) }
}

const fn halo<T: Copy>(
    pack: Kernel<ConvPackParams<T>>,
    [wide, narrow]: [Kernel<ConvHaloParams<T>>; 2],
    large: Kernel<ConvHaloParams<T>>,
    strided: Option<[Kernel<ConvHaloParams<T>>; 2]>,
    wgmma: Option<WgmmaLayouts<T>>,
    implicit: Option<ImplicitTiles<T>>,
) -> HaloKernels<T> {
    let small = TcPair { wide: (wide, CONV_HALO_BN), narrow: (narrow, CONV_HALO_BN_NARROW) };
    HaloKernels { pack, small, large, strided, wgmma, implicit }
}

/// The narrow tile of the implicit products (the _n64 kernels of cuda/gemm_wgmma.cu).
const IMPLICIT_BN_NARROW: usize = 64;

/// The fewest output positions of an implicit product ([`implicit_suits`]): below, its tiles of [`GEMM_WGMMA_BM`]
/// positions leave most SMs idle, and the halo tiles or gathers are faster. Measured on the H100 (2026-12-06, bf16,
/// beside them in one call; benches/tables/convs-cl-all-h100.md): the strided forwards of 840 positions (flare-3d
/// 320 -> 320 at 10x14x12, stride 1,2,2) 0.150 -> 0.201 ms and 300 (amos-2d 512 -> 512 at 10x10, stride 2) 0.099 ->
/// 0.124, while from 1200 (amos-2d 512 -> 512 at 20x20) they won, 0.205 -> 0.120, and on larger maps more (flare-3d
/// 32 -> 64 at 40x224x192, stride 1,2,2, 1.493 -> 0.993; 64 -> 128 at 40x112x96, stride 2, 0.753 -> 0.366). The
/// input gradient's stride phases take the same bound, not measured separately for them (amos-2d's last entry, 512
/// channels at 10x10, has phases of 300 positions, which stay on the halo tiles and the gathers).
const IMPLICIT_MIN_POSITIONS: usize = 1024;

impl ConvElement for f32 {
    const GEMM: [[RoleKernels<ConvGemmParams<f32>>; 2]; 2] = [
        [
            (Some(kernel::conv_fprop_f32), tc(kernel::conv_fprop_tf32, kernel::conv_fprop_tf32_n32)),
            (Some(kernel::conv_dgrad_f32), tc(kernel::conv_dgrad_tf32, kernel::conv_dgrad_tf32_n32)),
        ],
        [
            (
                Some(kernel::conv_transpose_dgrad_f32),
                tc(kernel::conv_transpose_dgrad_tf32, kernel::conv_transpose_dgrad_tf32_n32),
            ),
            (
                Some(kernel::conv_transpose_fprop_f32),
                tc(kernel::conv_transpose_fprop_tf32, kernel::conv_transpose_fprop_tf32_n32),
            ),
        ],
    ];
    const WGRAD: [RoleKernels<ConvWgradParams<f32>>; 2] = [
        (Some(kernel::conv_wgrad_f32), tc(kernel::conv_wgrad_tf32, kernel::conv_wgrad_tf32_n32)),
        (
            Some(kernel::conv_transpose_wgrad_f32),
            tc(kernel::conv_transpose_wgrad_tf32, kernel::conv_transpose_wgrad_tf32_n32),
        ),
    ];
    const HALO: [HaloKernels<f32>; 2] = [
        halo(
            kernel::conv_fprop_pack_tf32,
            [kernel::conv_fprop_halo_tf32, kernel::conv_fprop_halo_tf32_n32],
            kernel::conv_fprop_halo_tf32_m256,
            Some([kernel::conv_fprop_halo_tf32_s64, kernel::conv_fprop_halo_tf32_s64z2]),
            None,
            None,
        ),
        halo(
            kernel::conv_dgrad_pack_tf32,
            [kernel::conv_dgrad_halo_tf32, kernel::conv_dgrad_halo_tf32_n32],
            kernel::conv_dgrad_halo_tf32_m256,
            None,
            None,
            None,
        ),
    ];
    const HALO_WGRAD: Kernel<ConvWgradHaloParams<f32>> = kernel::conv_wgrad_halo_tf32;
    const POINTWISE: Option<[PointwiseKernels<f32>; 3]> = None;
    const WGMMA_WGRAD: Option<[Kernel<ConvWgradWgmmaParams<f32>>; 5]> = None;
    const TMA_WGRAD: Option<[Kernel<ConvWgradTmaParams>; 4]> = None;
    const TMA_PRODUCT: Option<TmaProduct<f32>> = None;
    const GEMM_WGRAD: Option<GemmWgrad<f32>> = None;
    const EXPLICIT: Option<ExplicitConv<f32>> = None;
    const TRANSPOSE_FPROP_WGMMA: Option<Kernel<ConvTransposeWgmmaParams<f32>>> = None;
}

/// bf16 has tensor-core kernels only (`--math exact` is a float32 setting).
impl ConvElement for bf16 {
    const GEMM: [[RoleKernels<ConvGemmParams<bf16>>; 2]; 2] = [
        [
            (None, tc(kernel::conv_fprop_bf16, kernel::conv_fprop_bf16_n32)),
            (None, tc(kernel::conv_dgrad_bf16, kernel::conv_dgrad_bf16_n32)),
        ],
        [
            (None, tc(kernel::conv_transpose_dgrad_bf16, kernel::conv_transpose_dgrad_bf16_n32)),
            (None, tc(kernel::conv_transpose_fprop_bf16, kernel::conv_transpose_fprop_bf16_n32)),
        ],
    ];
    const WGRAD: [RoleKernels<ConvWgradParams<bf16>>; 2] = [
        (None, tc(kernel::conv_wgrad_bf16, kernel::conv_wgrad_bf16_n32)),
        (None, tc(kernel::conv_transpose_wgrad_bf16, kernel::conv_transpose_wgrad_bf16_n32)),
    ];
    const HALO: [HaloKernels<bf16>; 2] = [
        halo(
            kernel::conv_fprop_pack_bf16,
            [kernel::conv_fprop_halo_bf16, kernel::conv_fprop_halo_bf16_n32],
            kernel::conv_fprop_halo_bf16_m256,
            Some([kernel::conv_fprop_halo_bf16_s64, kernel::conv_fprop_halo_bf16_s64z2]),
            Some(WgmmaLayouts {
                first: wgmma_kernels([
                    [kernel::conv_fprop_wgmma_bf16, kernel::conv_fprop_wgmma_bf16_n32],
                    [kernel::conv_fprop_wgmma_bf16_k333_z4, kernel::conv_fprop_wgmma_bf16_n32_k333_z4],
                    [kernel::conv_fprop_wgmma_bf16_k333_z2, kernel::conv_fprop_wgmma_bf16_n32_k333_z2],
                    [kernel::conv_fprop_wgmma_bf16_k133_z4, kernel::conv_fprop_wgmma_bf16_n32_k133_z4],
                    [kernel::conv_fprop_wgmma_bf16_k133_z2, kernel::conv_fprop_wgmma_bf16_n32_k133_z2],
                    [kernel::conv_fprop_wgmma_bf16_k133_z1, kernel::conv_fprop_wgmma_bf16_n32_k133_z1],
                ]),
                last: wgmma_kernels([
                    [kernel::conv_fprop_wgmma_cl_bf16, kernel::conv_fprop_wgmma_cl_bf16_n32],
                    [kernel::conv_fprop_wgmma_cl_bf16_k333_z4, kernel::conv_fprop_wgmma_cl_bf16_n32_k333_z4],
                    [kernel::conv_fprop_wgmma_cl_bf16_k333_z2, kernel::conv_fprop_wgmma_cl_bf16_n32_k333_z2],
                    [kernel::conv_fprop_wgmma_cl_bf16_k133_z4, kernel::conv_fprop_wgmma_cl_bf16_n32_k133_z4],
                    [kernel::conv_fprop_wgmma_cl_bf16_k133_z2, kernel::conv_fprop_wgmma_cl_bf16_n32_k133_z2],
                    [kernel::conv_fprop_wgmma_cl_bf16_k133_z1, kernel::conv_fprop_wgmma_cl_bf16_n32_k133_z1],
                ]),
            }),
            Some(ImplicitTiles {
                tiles: GemmTiles {
                    wide: kernel::conv_fprop_implicit_wgmma_bf16,
                    widest: kernel::conv_fprop_implicit_wgmma_bf16_n256,
                },
                narrow: kernel::conv_fprop_implicit_wgmma_bf16_n64,
            }),
        ),
        halo(
            kernel::conv_dgrad_pack_bf16,
            [kernel::conv_dgrad_halo_bf16, kernel::conv_dgrad_halo_bf16_n32],
            kernel::conv_dgrad_halo_bf16_m256,
            None,
            Some(WgmmaLayouts {
                first: wgmma_kernels([
                    [kernel::conv_dgrad_wgmma_bf16, kernel::conv_dgrad_wgmma_bf16_n32],
                    [kernel::conv_dgrad_wgmma_bf16_k333_z4, kernel::conv_dgrad_wgmma_bf16_n32_k333_z4],
                    [kernel::conv_dgrad_wgmma_bf16_k333_z2, kernel::conv_dgrad_wgmma_bf16_n32_k333_z2],
                    [kernel::conv_dgrad_wgmma_bf16_k133_z4, kernel::conv_dgrad_wgmma_bf16_n32_k133_z4],
                    [kernel::conv_dgrad_wgmma_bf16_k133_z2, kernel::conv_dgrad_wgmma_bf16_n32_k133_z2],
                    [kernel::conv_dgrad_wgmma_bf16_k133_z1, kernel::conv_dgrad_wgmma_bf16_n32_k133_z1],
                ]),
                last: wgmma_kernels([
                    [kernel::conv_dgrad_wgmma_cl_bf16, kernel::conv_dgrad_wgmma_cl_bf16_n32],
                    [kernel::conv_dgrad_wgmma_cl_bf16_k333_z4, kernel::conv_dgrad_wgmma_cl_bf16_n32_k333_z4],
                    [kernel::conv_dgrad_wgmma_cl_bf16_k333_z2, kernel::conv_dgrad_wgmma_cl_bf16_n32_k333_z2],
                    [kernel::conv_dgrad_wgmma_cl_bf16_k133_z4, kernel::conv_dgrad_wgmma_cl_bf16_n32_k133_z4],
                    [kernel::conv_dgrad_wgmma_cl_bf16_k133_z2, kernel::conv_dgrad_wgmma_cl_bf16_n32_k133_z2],
                    [kernel::conv_dgrad_wgmma_cl_bf16_k133_z1, kernel::conv_dgrad_wgmma_cl_bf16_n32_k133_z1],
                ]),
            }),
            Some(ImplicitTiles {
                tiles: GemmTiles {
                    wide: kernel::conv_dgrad_implicit_wgmma_bf16,
                    widest: kernel::conv_dgrad_implicit_wgmma_bf16_n256,
                },
                narrow: kernel::conv_dgrad_implicit_wgmma_bf16_n64,
            }),
        ),
    ];
    const HALO_WGRAD: Kernel<ConvWgradHaloParams<bf16>> = kernel::conv_wgrad_halo_bf16;
    const POINTWISE: Option<[PointwiseKernels<bf16>; 3]> = Some([
        PointwiseKernels {
            streaming: [
                kernel::conv_fprop_pointwise_bf16_n32,
                kernel::conv_fprop_pointwise_bf16_n64,
                kernel::conv_fprop_pointwise_bf16_n128,
            ],
            wgmma: kernel::conv_fprop_pointwise_wgmma_bf16,
            w_k_major: false,
        },
        PointwiseKernels {
            streaming: [
                kernel::conv_dgrad_pointwise_bf16_n32,
                kernel::conv_dgrad_pointwise_bf16_n64,
                kernel::conv_dgrad_pointwise_bf16_n128,
            ],
            wgmma: kernel::conv_dgrad_pointwise_wgmma_bf16,
            w_k_major: true,
        },
        PointwiseKernels {
            streaming: [
                kernel::conv_transpose_fprop_pointwise_bf16_n32,
                kernel::conv_transpose_fprop_pointwise_bf16_n64,
                kernel::conv_transpose_fprop_pointwise_bf16_n128,
            ],
            wgmma: kernel::conv_transpose_fprop_pointwise_wgmma_bf16,
            w_k_major: true,
        },
    ]);
    const WGMMA_WGRAD: Option<[Kernel<ConvWgradWgmmaParams<bf16>>; 5]> = Some([
        kernel::conv_wgrad_wgmma_bf16_k333_z4,
        kernel::conv_wgrad_wgmma_bf16_k333_z2,
        kernel::conv_wgrad_wgmma_bf16_k133_z4,
        kernel::conv_wgrad_wgmma_bf16_k133_z2,
        kernel::conv_wgrad_wgmma_bf16_k133_z1,
    ]);
    const TMA_WGRAD: Option<[Kernel<ConvWgradTmaParams>; 4]> = Some([
        kernel::conv_wgrad_tma_bf16_k333_m128,
        kernel::conv_wgrad_tma_bf16_k133_m128,
        kernel::conv_wgrad_tma_bf16_k333_m64,
        kernel::conv_wgrad_tma_bf16_k133_m64,
    ]);
    const TMA_PRODUCT: Option<TmaProduct<bf16>> = Some(TmaProduct {
        products: [
            [kernel::conv_fprop_tma_bf16, kernel::conv_fprop_tma_bf16_m64],
            [kernel::conv_dgrad_tma_bf16, kernel::conv_dgrad_tma_bf16_m64],
        ],
        dgrad_n32: kernel::conv_dgrad_tma_bf16_n32,
        pack: kernel::conv_tma_pack_bf16,
    });
    const GEMM_WGRAD: Option<GemmWgrad<bf16>> = Some(GemmWgrad {
        im2col: kernel::conv_im2col_bf16,
        product: GemmTiles {
            wide: kernel::conv_wgrad_gemm_wgmma_bf16,
            widest: kernel::conv_wgrad_gemm_wgmma_bf16_n256,
        },
    });
    const EXPLICIT: Option<ExplicitConv<bf16>> = Some(ExplicitConv {
        im2row: kernel::conv_im2row_bf16,
        flip: kernel::conv_weight_flip_bf16,
        product: [
            GemmTiles { wide: kernel::conv_fprop_gemm_wgmma_bf16, widest: kernel::conv_fprop_gemm_wgmma_bf16_n256 },
            GemmTiles { wide: kernel::conv_dgrad_gemm_wgmma_bf16, widest: kernel::conv_dgrad_gemm_wgmma_bf16_n256 },
        ],
        store: kernel::conv_rows_store_bf16,
    });
    const TRANSPOSE_FPROP_WGMMA: Option<Kernel<ConvTransposeWgmmaParams<bf16>>> =
        Some(kernel::conv_transpose_fprop_wgmma_bf16);
}

impl Pairing {
    /// The kernel of a `conv_gemm` product for this pairing's op on `gpu`: the exact float32 SIMT kernel when
    /// [`Gpu::set_exact_f32`] asks for it and the type has one, else the tensor cores (tf32 or bf16).
    fn gemm_kernel<T: ConvElement>(&self, product: Product, gpu: &Gpu) -> GemmKernel<T> {
        let (exact, pair) = T::GEMM[self.transposed as usize][product as usize];
        // The transposed conv's products (its forward's 1x1, its backward's of stride = kernel): no halo kernels.
        let halo = (!self.transposed).then_some(T::HALO[product as usize]);
        // The 1x1x1 kernels are not for `--math exact` (as the linear layers' and the explicit weight gradient).
        let pointwise = T::POINTWISE.filter(|_| !gpu.exact_f32());
        let pointwise = pointwise.and_then(|[fprop, dgrad, transpose_fprop]| match (self.transposed, product) {
            (false, Product::NarrowFromWide) => Some(fprop),
            (false, Product::WideFromNarrow) => Some(dgrad),
            (true, Product::WideFromNarrow) => Some(transpose_fprop),
            (true, Product::NarrowFromWide) => None,
        });
        match exact {
            Some(k) if gpu.exact_f32() => GemmKernel::Exact(k),
            _ => GemmKernel::TensorCore(pair, halo, pointwise),
        }
    }

    /// The weight-gradient kernel for this pairing's op and math on `gpu`.
    fn wgrad_kernel<T: ConvElement>(&self, gpu: &Gpu) -> WgradKernel<T> {
        let (exact, pair) = T::WGRAD[self.transposed as usize];
        match exact {
            Some(k) if gpu.exact_f32() => WgradKernel::Exact(k),
            _ => WgradKernel::TensorCore(pair),
        }
    }

    /// The GPU backward pass of the op this pairing serves, from dL/dy `g`, the op's input `x` (needed only for dW)
    /// and weight `w`: the gradients [dx, dW] and, when `needs` has a third entry, db (each `None` unless `needs` asks
    /// for it): dx in the storage type, dW and db summed and returned in float32 (see [`params_in`]); `shapes` are
    /// x's and W's.
    /// conv: x is the wide map, dx = wide_from_narrow(g), dW = weight_grad(g, x); transposed: x is the narrow map,
    /// dx = narrow_from_wide(g), dW = weight_grad(x, g).
    pub(crate) fn backward<T: ConvElement>(
        &self,
        g: &GpuBuffer<T>,
        x: Option<&GpuBuffer<T>>,
        w: &GpuBuffer<T>,
        needs: &[bool],
        shapes: [&[usize]; 2],
        what: &str,
    ) -> Result<Vec<Option<Tensor>>> {
        let mut grads = vec![None, None];
        // The transposed conv's g unfolded once for both gradients ([`Pairing::unfolded`]).
        let unfolded =
            if self.transposed && (needs[0] || needs[1]) { self.unfolded(g, x.unwrap_or(g), what)? } else { None };
        // The conv's g copied channels last once where both gradients run on the TMA kernels, which read it so.
        let gpu = &g.gpu;
        let tma_both = self.tma_product_kernel::<T>(Product::WideFromNarrow, gpu).is_some()
            && self.tma_wgrad_kernel::<T>(gpu).is_some();
        let g_last = match !self.transposed && needs[0] && needs[1] && tma_both {
            true => Some(self.channels_last_of(g, Product::WideFromNarrow, what)?),
            false => None,
        };
        if needs[0] {
            let dx = match (self.transposed, &unfolded) {
                (false, _) => self.product(Product::WideFromNarrow, g, g_last.as_ref(), w, None, what)?,
                (true, Some((_, col))) => self.unfolded_pairing().narrow_from_wide(col, w, None, what)?,
                (true, None) => self.narrow_from_wide(g, w, None, what)?,
            };
            grads[0] = Some(Tensor::from_gpu(dx, shapes[0])?);
        }
        if needs[1] {
            let x = x.ok_or_else(|| Error::Mismatch(format!("{what}: the weight gradient needs the input")))?;
            let (narrow, wide) = if self.transposed { (x, g) } else { (g, x) };
            let dw = match &unfolded {
                Some((kernels, col)) => {
                    self.weight_grad_of_columns(&self.kernel_dims(what)?, *kernels, narrow, col, what)?
                }
                None => self.weight_grad(narrow, g_last.as_ref(), wide, what)?,
            };
            grads[1] = Some(Tensor::from_gpu(dw, shapes[1])?);
        }
        if needs.len() > 2 {
            // The bias gradient sums g over the batch and the positions of the map it lives on.
            let (channels, map) = if self.transposed { (self.c_wide, self.wide) } else { (self.c_narrow, self.narrow) };
            let db = match needs[2] {
                true => Some(channel_sums(g, self.batch, channels, map.iter().product(), what)?),
                false => None,
            };
            grads.push(db.map(|db| Tensor::from_gpu(db, &[channels])).transpose()?);
        }
        Ok(grads)
    }

    fn taps(&self) -> usize {
        self.k.iter().product()
    }

    /// The channels and spatial size of pass `which`'s source map: the wide map for the forward, the narrow one for
    /// the input gradient.
    fn source(&self, which: Product) -> (usize, [usize; 3]) {
        match which {
            Product::NarrowFromWide => (self.c_wide, self.wide),
            Product::WideFromNarrow => (self.c_narrow, self.narrow),
        }
    }

    /// The channels and spatial size of pass `which`'s output map (the other map of [`Pairing::source`]).
    fn output(&self, which: Product) -> (usize, [usize; 3]) {
        match which {
            Product::NarrowFromWide => (self.c_narrow, self.narrow),
            Product::WideFromNarrow => (self.c_wide, self.wide),
        }
    }

    /// The transposed conv's output gradient `g` unfolded into the columns of the explicit weight gradient,
    /// col[n, (cw, a), o] = g[n, cw, o s + a] ([`Pairing::columns`]; the kernel is the stride, so col is g rearranged
    /// and no bigger), with the kernels, where they take the pairing ([`Pairing::gemm_wgrad_kernels`]; `x` the op's
    /// input, or g again where dW is not asked for): dW is then the product over col, and dx a 1x1x1 conv's forward
    /// over it ([`Pairing::unfolded_pairing`]) on the 1x1x1 products, where the gathers of a conv of stride = kernel
    /// read g's channels per tap at stride-s positions (H200, 2026-12-06: amos-2d's transposed 64 -> 32 x 2x2 input
    /// gradient 0.146 ms, cuDNN 0.038).
    fn unfolded<T: ConvElement>(
        &self,
        g: &GpuBuffer<T>,
        x: &GpuBuffer<T>,
        what: &str,
    ) -> Result<Option<(GemmWgrad<T>, GpuBuffer<T>)>> {
        match self.gemm_wgrad_kernels(&g.gpu, x, g) {
            Some(kernels) => Ok(Some((kernels, self.columns(&self.kernel_dims(what)?, kernels, g, what)?))),
            None => Ok(None),
        }
    }

    /// The 1x1x1 conv whose forward over the columns of [`Pairing::unfolded`] is the transposed conv's input
    /// gradient: dx[n, cn, o] = sum_{(cw, a)} W[cn, (cw, a)] col[n, (cw, a), o], the transposed conv's weight
    /// (Cn, Cw, k) read as (Cn, Cw k, 1).
    fn unfolded_pairing(&self) -> Pairing {
        Pairing {
            c_wide: self.c_wide * self.taps(),
            wide: self.narrow,
            k: [1; 3],
            stride: [1; 3],
            pad: [0; 3],
            transposed: false,
            ..*self
        }
    }

    /// The pairing's sizes as the kernels' ints, after checking that they fit: the kernels index rows, reduction
    /// indices and weights with 32-bit ints (flat offsets are 64-bit), and launch no empty grids.
    fn kernel_dims(&self, what: &str) -> Result<KernelDims> {
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
        // Every size is at most one of the bounded values above (a padding at most its kernel), so each cast is exact.
        let int = |v: usize| v as i32;
        Ok(KernelDims {
            batch: int(self.batch),
            c_wide: int(self.c_wide),
            c_narrow: int(self.c_narrow),
            wide: self.wide.map(int),
            narrow: self.narrow.map(int),
            k: self.k.map(int),
            stride: self.stride.map(int),
            pad: self.pad.map(int),
        })
    }

    /// `Xn[n,cn,o] = b[cn] + sum_{cw,a} W[cn,cw,a] Xw[n,cw, o*s + a - p]`: one implicit product over the narrow
    /// positions.
    pub(crate) fn narrow_from_wide<T: ConvElement>(
        &self,
        wide: &GpuBuffer<T>,
        w: &GpuBuffer<T>,
        bias: Option<&GpuBuffer<T>>,
        what: &str,
    ) -> Result<GpuBuffer<T>> {
        self.product(Product::NarrowFromWide, wide, None, w, bias, what)
    }

    /// `Xw[n,cw,i] = b[cw] + sum_{cn,a,o : o*s + a - p = i} W[cn,cw,a] Xn[n,cn,o]`: one implicit product per stride
    /// phase ([`KernelDims::wide_from_narrow`]), each over the wide positions of that phase and only the taps that
    /// reach them. Together the phases write every wide position once.
    pub(crate) fn wide_from_narrow<T: ConvElement>(
        &self,
        narrow: &GpuBuffer<T>,
        w: &GpuBuffer<T>,
        bias: Option<&GpuBuffer<T>>,
        what: &str,
    ) -> Result<GpuBuffer<T>> {
        self.product(Product::WideFromNarrow, narrow, None, w, bias, what)
    }

    /// [`Pairing::narrow_from_wide`] or [`Pairing::wide_from_narrow`] from `src` (`src_last`: its channels-last copy,
    /// if the caller made one for the TMA product): the TMA product where it takes the pass
    /// ([`Pairing::tma_product_kernel`]), the explicit product where it does ([`Pairing::explicit_kernels`]), else
    /// the implicit products, into a new map.
    fn product<T: ConvElement>(
        &self,
        which: Product,
        src: &GpuBuffer<T>,
        src_last: Option<&GpuBuffer<T>>,
        w: &GpuBuffer<T>,
        bias: Option<&GpuBuffer<T>>,
        what: &str,
    ) -> Result<GpuBuffer<T>> {
        let d = self.kernel_dims(what)?;
        let (channels, size) = self.output(which);
        let mut out = src.gpu.alloc_of::<T>(self.batch * channels * size.iter().product::<usize>(), what)?;
        if let Some((kernels, kernel, rows)) = self.tma_product_kernel::<T>(which, &src.gpu) {
            self.tma_product(kernels.pack, (kernel, rows), which, (src, src_last), w, bias, &mut out, what)?;
            return Ok(out);
        }
        if let Some(kernels) = self.explicit_kernels(which, src, w) {
            self.explicit_product(&d, kernels, which, src, w, bias, &mut out, what)?;
            return Ok(out);
        }
        let products = match which {
            Product::NarrowFromWide => vec![d.narrow_from_wide()],
            Product::WideFromNarrow => d.wide_from_narrow(),
        };
        let kernel = self.gemm_kernel(which, &src.gpu);
        let mut src_last = SourceLast { copy: None, halo: self.wgmma_channels_last(which) };
        for product in products {
            launch_product(kernel, product, src, &mut src_last, w, bias, &mut out, what)?;
        }
        Ok(out)
    }

    /// `dW[cn,cw,a] = sum_{n,o} Xn[n,cn,o] Xw[n,cw, o*s + a - p]`, shape (Cn, Cw, k): rows (cw, a), columns cn, the
    /// reduction over (n, o) cut into fixed slices summed in order afterwards, so the result does not depend on
    /// scheduling. float32 whatever the maps' storage type.
    /// `narrow_last`: the narrow map's channels-last copy, if the caller made one for the TMA kernels.
    pub(crate) fn weight_grad<T: ConvElement>(
        &self,
        narrow: &GpuBuffer<T>,
        narrow_last: Option<&GpuBuffer<T>>,
        wide: &GpuBuffer<T>,
        what: &str,
    ) -> Result<GpuBuffer> {
        let d = self.kernel_dims(what)?;
        let gpu = &narrow.gpu;
        if let Some(tma) = self.tma_wgrad_kernel::<T>(gpu) {
            return self.weight_grad_tma(tma, (narrow, narrow_last), wide, what);
        }
        if let Some(kernels) = self.gemm_wgrad_kernels(gpu, narrow, wide) {
            return self.weight_grad_gemm(&d, kernels, narrow, wide, what);
        }
        if self.halo_wgrad_suits() && !gpu.exact_f32() {
            if let Some((wgmma, box_z)) = self.wgmma_wgrad_kernel(gpu, wide) {
                return self.weight_grad_wgmma(&d, wgmma, box_z, narrow, wide, what);
            }
            return self.weight_grad_halo(&d, narrow, wide, what);
        }
        let taps = self.taps();
        let (rows, cols) = (self.c_wide * taps, self.c_narrow);
        let k = self.batch * self.narrow.iter().product::<usize>();
        let wgrad = self.wgrad_kernel(gpu);
        let (tile_m, tile_n, threads) = match wgrad {
            WgradKernel::Exact(_) => (CONV_BM, CONV_BN, CONV_THREADS),
            WgradKernel::TensorCore(pair) => (CONV_TC_BM, pair.for_columns(cols).1, CONV_TC_THREADS),
        };
        let tiles = rows.div_ceil(tile_m) * cols.div_ceil(tile_n);
        let k_stages = k.div_ceil(CONV_BK);
        let wanted = WGRAD_TARGET_BLOCKS.div_ceil(tiles).max(k.div_ceil(WGRAD_MAX_SLICE));
        let (stages_per_slice, slices) = split_reduction(k_stages, wanted);
        let slice_len = stages_per_slice * CONV_BK;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(tile_m) as u32, cols.div_ceil(tile_n) as u32, slices as u32),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let numel = cols * rows;
        // One slice writes dW itself; several write partial sums that sum_slices adds in order.
        let mut out = gpu.alloc(slices * numel, what)?;
        let params = ConvWgradParams {
            narrow: narrow.ptr(),
            wide: wide.ptr(),
            partial: out.ptr_mut(),
            // Less than k + CONV_BK, and k is bounded by kernel_dims.
            ..d.weight_grad(slice_len as i32)
        };
        match wgrad {
            WgradKernel::Exact(exact) => gpu.launch(exact, cfg, &params, what)?,
            WgradKernel::TensorCore(pair) => {
                check_tc_taps(d.k, what)?;
                gpu.launch(pair.for_columns(cols).0, cfg, &params, what)?;
            }
        }
        sum_slices(gpu, out, slices, numel, what)
    }

    /// The output channels per block of the TMA product of cuda/conv_tma.cu on pass `which` of this pairing, if it
    /// takes the pass: a conv (not transposed) of a 3x3x3 or 1x3x3 kernel ([`Pairing::tma_suits`]) of stride 1 or 2 per
    /// axis (the input gradient's stride phases each with taps: a kernel at least as long as the stride) whose
    /// products' grids (the narrow map, [`Pairing::tma_launches`]) have at least [`CONV_TMA_PRODUCT_POSITIONS`] / 2
    /// positions per item and at most i32::MAX in all (the kernel's count of boxes); blocks of 128 where the source and
    /// the output have at least [`TMA_PRODUCT_MIN_CHANNELS`] channels, of 64 (each of 256 positions) where the output
    /// has 33 to 64 and the source at least [`TMA_PRODUCT_M64_MIN_SOURCES`], and for the input gradient of 32 (the
    /// positions as the product's m) where the output has 17 to 32 ([`TMA_PRODUCT_N32_OUTPUTS`]) and the source at
    /// least [`TMA_PRODUCT_N32_MIN_SOURCES`]. Measured on the H100 (2026-12-07, one call, every
    /// stride-1 3x3 pass of flare-3d and amos-2d between maps of 64 channels and more, against the kernels before it,
    /// with 128-row blocks and a box per tap): from 128 channels faster on every shape of at least 100 positions
    /// (amos-2d 256 x 40x40 forward 0.185 -> 0.092 ms, input gradient 0.176 -> 0.092; 512 x 20x20 0.194 -> 0.106 and
    /// 0.196 -> 0.110; flare-3d 256 x 10x28x24 0.205 -> 0.133 and 0.197 -> 0.137, 512 -> 256 at 10x28x24 0.387 -> 0.243
    /// and 0.486 -> 0.276), slower at 5x5 (0.036 -> 0.055: a box of 128 positions a fifth full) and wherever a side had
    /// 64 channels (flare-3d 64 x 40x112x96 0.609 -> 1.027 and 0.572 -> 1.022, amos-2d 64 x 160x160 0.172 -> 0.224:
    /// half-empty 128-row tiles and the channels-last copies of the large maps), which the 64-row blocks are for:
    /// measured the same way (2026-12-07, H100, one call, against the kernels before them) they win from 128 sources
    /// (flare-3d 128 -> 64 at 40x112x96 forward 1.102 -> 0.920 ms, amos-2d's 128 -> 64 at 320x320 0.281 -> 0.248) and
    /// not from 64 (flare-3d 64 x 40x112x96 forward 0.623 -> 0.618, input gradient 0.581 -> 0.584; amos-2d 64 x 160x160
    /// 0.173 -> 0.179 and 0.146 -> 0.168). Strided convs (the stage entries, whose other kernels are gathers) also
    /// from 32 source channels into 33 to 64 outputs in blocks of 64, and between 64 channels and more than 64 outputs
    /// in blocks of 128 (the TMA unit fills a box's channels past the map, and a weight box's rows past the outputs,
    /// with zeros). Measured (H200, 2026-12-07, one call, against the kernels before): flare-3d's stage entries
    /// forward 0.900 -> 0.807 ms (32 -> 64), 0.344 -> 0.276 (64 -> 128), 0.171 -> 0.118, 0.148 -> 0.093, 0.156 ->
    /// 0.092; input gradient 0.690 -> 0.639 (128 -> 64 in blocks of 64), 0.270 -> 0.162, 0.188 -> 0.121, 0.184 ->
    /// 0.109; the input gradient into 32 channels was slower in blocks of 64 half empty (flare-3d 1.178 -> 1.356,
    /// amos-2d 0.387 -> 0.453) and faster in blocks of 32 (H100, 2026-12-08, one call against the gathers: flare-3d
    /// 1.326 -> 1.074 ms, amos-2d 0.443 -> 0.343), where the forward 64 -> 32 (the last decoder stage) was slower
    /// than the halo kernels (flare-3d 0.874 -> 1.032, amos-2d 0.324 -> 0.398) and stays on them.
    fn tma_product_rows(&self, which: Product) -> Option<usize> {
        let ((c_src, _), (c_out, _)) = (self.source(which), self.output(which));
        let strided = self.stride != [1, 1, 1];
        let rows = if c_src.min(c_out) >= TMA_PRODUCT_MIN_CHANNELS {
            128
        } else if c_src >= TMA_PRODUCT_M64_MIN_SOURCES && TMA_PRODUCT_M64_OUTPUTS.contains(&c_out) {
            64
        } else if strided && c_src.min(c_out) >= 64 && c_out > 64 {
            128
        } else if strided && c_src >= TMA_STRIDED_MIN_SOURCES && TMA_PRODUCT_M64_OUTPUTS.contains(&c_out) {
            64
        } else if which == Product::WideFromNarrow
            && c_src >= TMA_PRODUCT_N32_MIN_SOURCES
            && TMA_PRODUCT_N32_OUTPUTS.contains(&c_out)
        {
            32
        } else {
            return None;
        };
        // The kernel counts the boxes of output positions in 32-bit ints, which the positions bound; the largest grid
        // of a pass is the narrow map (the input gradient's first stride phase).
        let size = self.narrow;
        let positions = self.batch * size.iter().product::<usize>();
        let phases_have_taps = which == Product::NarrowFromWide || (0..3).all(|d| self.k[d] >= self.stride[d]);
        let fits = self.stride.iter().all(|&s| s <= 2)
            && phases_have_taps
            && self.tma_suits(TMA_STRIDED_MIN_SOURCES)
            && 2 * size.iter().product::<usize>() >= CONV_TMA_PRODUCT_POSITIONS
            && positions <= i32::MAX as usize;
        fits.then_some(rows)
    }

    /// What both TMA paths ask of a pairing: a conv (not transposed) of a 3x3x3 or 1x3x3 kernel between maps of at
    /// least `min_channels` channels whose channels-last copies have 32-bit element counts per batch item
    /// ([`channels_last`]).
    fn tma_suits(&self, min_channels: usize) -> bool {
        let voxels = |s: [usize; 3]| s.iter().product::<usize>();
        !self.transposed
            && (self.k == [3, 3, 3] || self.k == [1, 3, 3])
            && self.c_narrow.min(self.c_wide) >= min_channels
            && channels_last_fits(self.c_narrow, voxels(self.narrow))
            && channels_last_fits(self.c_wide, voxels(self.wide))
    }

    /// The channels-last copy ([`channels_last`]) of `src`, the source of pass `which` ([`Pairing::source`]).
    fn channels_last_of<T: ConvElement>(&self, src: &GpuBuffer<T>, which: Product, what: &str) -> Result<GpuBuffer<T>> {
        let (channels, size) = self.source(which);
        channels_last(&src.gpu, src.ptr(), self.batch, channels, size.iter().product(), what)
    }

    /// `given`, the channels-last copy of `src` that a caller made, or else that copy made here into `made`
    /// ([`Pairing::channels_last_of`]).
    fn channels_last_unless<'a, T: ConvElement>(
        &self,
        given: Option<&'a GpuBuffer<T>>,
        made: &'a mut Option<GpuBuffer<T>>,
        src: &GpuBuffer<T>,
        which: Product,
        what: &str,
    ) -> Result<&'a GpuBuffer<T>> {
        match given {
            Some(last) => Ok(last),
            None => Ok(made.insert(self.channels_last_of(src, which, what)?)),
        }
    }

    /// The TMA descriptor of `last`, the channels-last copy of this pairing's maps of `channels` x `size`: axes
    /// (channels rounded up to 8, x, y, z, batch item), strides in bytes, boxes of 64 channels x box_x x box_y
    /// positions taken at steps of (step_x, step_y) (a strided conv's wide map, read at its output positions).
    fn channels_last_map<T: ConvElement>(
        &self,
        last: &GpuBuffer<T>,
        (channels, size): (usize, [usize; 3]),
        (box_x, box_y): (usize, usize),
        (step_x, step_y): (usize, usize),
        what: &str,
    ) -> Result<TensorMap> {
        let row = channels.next_multiple_of(8) as u64;
        let [d, h, w] = size.map(|v| v as u64);
        let dims = [row, w, h, d, self.batch as u64];
        let strides = [2 * row, 2 * row * w, 2 * row * w * h, 2 * row * w * h * d];
        let (boxes, steps) = ([64, box_x as u32, box_y as u32, 1, 1], [1, step_x as u32, step_y as u32, 1, 1]);
        last.gpu.tensor_map_bf16(last.ptr().address(), &dims, &strides, (&boxes, &steps), what)
    }

    /// The TMA product kernels for this pairing on `gpu` and the one of its kernel, if the type has them, the GPU
    /// loaded them (sm_90) and they take the pass ([`Pairing::tma_product_rows`]), with its output channels per block.
    fn tma_product_kernel<T: ConvElement>(
        &self,
        which: Product,
        gpu: &Gpu,
    ) -> Option<(TmaProduct<T>, Kernel<ConvTmaProductParams<T>>, usize)> {
        let kernels = T::TMA_PRODUCT?;
        let rows = self.tma_product_rows(which)?;
        let kernel = match rows {
            32 => kernels.dgrad_n32,
            _ => kernels.products[which as usize][usize::from(rows == 64)],
        };
        gpu.has_kernel(kernel).then_some((kernels, kernel, rows))
    }

    /// The launches of the TMA product on pass `which` (cuda/conv_tma.cuh gives the math): the forward one, over the
    /// narrow map, its columns a tap (az, ax) and a residue of ay modulo the stride along y each (the source taken at
    /// steps of the stride); the input gradient one per stride phase rho (the wide positions s o + rho, o on a grid
    /// of ceil((wide - rho) / s) per axis), its columns the taps a = rho + pad (mod s) per axis, which read g at o +
    /// (rho + pad - a) / s, each column's taps along y in decreasing order (increasing rows of g). Together the
    /// launches' columns hold every tap once.
    fn tma_launches(&self, which: Product) -> Vec<TmaLaunch> {
        let [kz, ky, kx] = self.k;
        let tap = |az: usize, ay: usize, ax: usize| (az * ky + ay) * kx + ax;
        let one = [1; 3];
        if which == Product::NarrowFromWide {
            let (p, s) = (self.pad.map(|v| v as i32), self.stride);
            let mut columns = Vec::new();
            for az in 0..kz {
                for ax in 0..kx {
                    for r in 0..s[1].min(ky) {
                        let taps = (r..ky).step_by(s[1]).map(|ay| tap(az, ay, ax)).collect();
                        columns.push(TmaColumn { offset: [az as i32 - p[0], r as i32 - p[1], ax as i32 - p[2]], taps });
                    }
                }
            }
            // The kernel takes the columns of 3 taps, then of 2, then of 1 (stride 2 along y: ay = 0, 2 and ay = 1).
            columns.sort_by_key(|c| std::cmp::Reverse(c.taps.len()));
            return vec![TmaLaunch { grid: self.narrow, step: one, phase: [0; 3], src_mul: s, columns }];
        }
        // Per axis d and phase rho: the taps a with (rho + pad - a) / s exact, in decreasing order, and that offset.
        let phase_taps = |d: usize, rho: usize| -> Vec<(usize, i32)> {
            let (s, reach) = (self.stride[d] as i32, (rho + self.pad[d]) as i32);
            (0..self.k[d] as i32)
                .rev()
                .filter(|a| (reach - a).rem_euclid(s) == 0)
                .map(|a| (a as usize, (reach - a) / s))
                .collect()
        };
        let [sz, sy, sx] = self.stride;
        let mut launches = Vec::new();
        for rho in (0..sz).flat_map(|z| (0..sy).flat_map(move |y| (0..sx).map(move |x| [z, y, x]))) {
            let grid: [usize; 3] =
                std::array::from_fn(|d| self.wide[d].saturating_sub(rho[d]).div_ceil(self.stride[d]));
            if grid.contains(&0) {
                continue;
            }
            let along_y = phase_taps(1, rho[1]);
            let first_y = along_y.first().map_or(0, |&(_, offset)| offset);
            let mut columns = Vec::new();
            for &(az, oz) in &phase_taps(0, rho[0]) {
                for &(ax, ox) in &phase_taps(2, rho[2]) {
                    let taps = along_y.iter().map(|&(ay, _)| tap(az, ay, ax)).collect();
                    columns.push(TmaColumn { offset: [oz, first_y, ox], taps });
                }
            }
            launches.push(TmaLaunch { grid, step: self.stride, phase: rho, src_mul: one, columns });
        }
        launches
    }

    /// Pass `which` on the TMA product `kernel` into `out`: the weight packed by `pack` as the product's rows, its
    /// taps in the order of the launches' columns ([`Pairing::tma_launches`]; the input gradient's with its channel
    /// roles swapped), the source copied channels last (unless `src_last` is that copy), both described to the TMA
    /// unit by tensor maps (the forward's source at steps of the stride); per launch, per `rows` output channels, one
    /// block per SM walking its share of the boxes of [`tma_product_positions`] output positions ([`tma_box`]).
    #[allow(clippy::too_many_arguments)]
    fn tma_product<T: ConvElement>(
        &self,
        pack: Kernel<ConvTmaPackParams<T>>,
        (kernel, rows): (Kernel<ConvTmaProductParams<T>>, usize),
        which: Product,
        (src, src_last): (&GpuBuffer<T>, Option<&GpuBuffer<T>>),
        w: &GpuBuffer<T>,
        bias: Option<&GpuBuffer<T>>,
        out: &mut GpuBuffer<T>,
        what: &str,
    ) -> Result<()> {
        let gpu = &src.gpu;
        let positions = tma_product_positions(rows);
        let ((c_src, src_size), (c_out, size)) = (self.source(which), self.output(which));
        let launches = self.tma_launches(which);
        let tap_order: Vec<usize> =
            launches.iter().flat_map(|l| l.columns.iter().flat_map(|c| c.taps.clone())).collect();
        let (taps, k_pad) = (self.taps(), c_src.next_multiple_of(8));
        let mut tap_of = [0; CONV_TMA_MAX_TAPS];
        for (slot, &a) in tap_of.iter_mut().zip(&tap_order) {
            *slot = a as i32;
        }
        let elements = taps * c_out * k_pad;
        let mut packed = gpu.alloc_of::<T>(elements, what)?;
        let params = ConvTmaPackParams {
            w: w.ptr(),
            out: packed.ptr_mut(),
            c_out: c_out as i32,
            c_src: c_src as i32,
            k_pad: k_pad as i32,
            taps: taps as i32,
            flip: (which == Product::WideFromNarrow) as i32,
            tap_of,
            elements: elements as i64,
        };
        gpu.launch(pack, grid_1d(elements), &params, what)?;
        let k = k_pad as u64;
        // Boxes of one tap and of a column's three.
        let [weight_map, weight_map3] = [1, 3].map(|column| {
            gpu.tensor_map_bf16(
                packed.ptr().address(),
                &[k, c_out as u64, taps as u64],
                &[2 * k, 2 * k * c_out as u64],
                (&[64, rows as u32, column], &[1, 1, 1]),
                what,
            )
        });
        let (weight_map, weight_map3) = (weight_map?, weight_map3?);
        let mut made = None;
        let last = self.channels_last_unless(src_last, &mut made, src, which, what)?;
        let mut first_tap = 0;
        // One block per SM (the stages fill its shared memory), each walking its share of the boxes.
        let row_tiles = c_out.div_ceil(rows);
        let box_blocks = (gpu.multiprocessors() / row_tiles).max(1);
        for launch in launches {
            let grid = launch.grid;
            let (box_x, box_y) = tma_box(grid[2], grid[1], positions, CONV_TMA_PRODUCT_BOX_X_MAX);
            // The source box: the output box and the rows that the longest run of taps adds.
            let box_rows = box_y + launch.columns.iter().map(|c| c.taps.len()).max().unwrap_or(1) - 1;
            let steps = (launch.src_mul[2], launch.src_mul[1]);
            let src_map = self.channels_last_map(last, (c_src, src_size), (box_x, box_rows), steps, what)?;
            let (x_blocks, y_blocks) = (grid[2].div_ceil(box_x), grid[1].div_ceil(box_y));
            let boxes = self.batch * grid[0] * y_blocks * x_blocks;
            let mut params = ConvTmaProductParams {
                src_map,
                weight_map,
                weight_map3,
                out: out.ptr_mut(),
                bias: bias.map_or(ConstPtr::NULL, |b| b.ptr()),
                c_src: c_src as i32,
                c_out: c_out as i32,
                size: grid.map(|v| v as i32),
                out_size: size.map(|v| v as i32),
                out_step: launch.step.map(|v| v as i32),
                out_phase: launch.phase.map(|v| v as i32),
                src_mul: launch.src_mul.map(|v| v as i32),
                columns: launch.columns.len() as i32,
                box_x: box_x as i32,
                box_y: box_y as i32,
                box_rows: box_rows as i32,
                x_blocks: x_blocks as i32,
                y_blocks: y_blocks as i32,
                boxes: boxes as i32,
                ..Default::default()
            };
            for (c, column) in launch.columns.iter().enumerate() {
                [params.col_z[c], params.col_y[c], params.col_x[c]] = column.offset;
                params.col_taps[c] = column.taps.len() as i32;
                params.col_weight[c] = first_tap as i32;
                first_tap += column.taps.len();
            }
            // Every count is at most a map's elements per batch item, or (the boxes) the positions of all items,
            // which tma_product_kernel bounds.
            let cfg = LaunchConfig {
                grid_dim: (row_tiles as u32, boxes.min(box_blocks) as u32, 1),
                block_dim: (CONV_TMA_PIPELINE_THREADS as u32, 1, 1),
                shared_mem_bytes: CONV_TMA_PRODUCT_SHARED as u32,
            };
            gpu.launch(kernel, cfg, &params, what)?;
        }
        Ok(())
    }

    /// Whether the TMA weight gradient of cuda/conv_tma.cu takes this pairing, and in blocks of how many narrow
    /// channels: a conv of stride 1 or 2 per axis between maps of at least [`TMA_WGRAD_MIN_CHANNELS`] channels
    /// ([`Pairing::tma_suits`]) of a 1x3x3 or 3x3x3 kernel (a 2D 3x3 is 1x3x3), in blocks of 64 narrow channels where
    /// there are at most 64 (a 128-row tile would be half empty), else 128. Measured on the H100 (2026-12-07, one
    /// call, every flare-3d and amos-2d weight gradient it took against the kernels before it): faster on 20 of 22
    /// shapes (flare-3d 256 x 10x28x24 0.431 -> 0.199 ms, 128 x 20x56x48 0.561 -> 0.301, 256 -> 128 at 20x56x48
    /// 0.924 -> 0.480; amos-2d 256 x 40x40 0.254 -> 0.111, 64 x 160x160 0.248 -> 0.207), slower then on flare-3d's two
    /// 3x3x3 into 64 channels at 40x112x96 (64 -> 64 0.830 -> 0.862, 128 -> 64 1.365 -> 1.493), whose two
    /// channels-last copies of 110 and 220 MB cost more than the products saved. Timed again on 2026-12-08 (H100, one
    /// call), the two tie with the halo wgmma kernel (0.808 and 1.370 ms, no weight gradient of flare-3d 5% apart, all
    /// of them 23.20 -> 23.02 ms), so they take it and one rule serves every kernel shape. The strided stage entries take the same kernels, their wide boxes at steps of 2
    /// (cuda/conv_tma.cu), also from [`TMA_STRIDED_MIN_SOURCES`] wide channels (the TMA unit fills a box's channels
    /// past the map with zeros): their other kernels (the gathers) ran flare-3d's 32 -> 64 entry at 54 TFLOP/s.
    fn tma_wgrad_rows(&self) -> Option<usize> {
        let strided = self.stride != [1, 1, 1];
        let min_wide = if strided { TMA_STRIDED_MIN_SOURCES } else { TMA_WGRAD_MIN_CHANNELS };
        let suits = self.tma_suits(min_wide) && self.c_narrow >= TMA_WGRAD_MIN_CHANNELS;
        let fits = suits && self.stride.iter().all(|&s| s <= 2);
        fits.then_some(if self.c_narrow <= 64 { 64 } else { 128 })
    }

    /// The TMA weight-gradient kernel for this pairing on `gpu` and its narrow channels per block, if the type has
    /// it, the GPU loaded it (sm_90) and it takes the pairing ([`Pairing::tma_wgrad_rows`]).
    fn tma_wgrad_kernel<T: ConvElement>(&self, gpu: &Gpu) -> Option<(Kernel<ConvWgradTmaParams>, usize)> {
        let [k333, k133, k333_m64, k133_m64] = T::TMA_WGRAD?;
        let rows = self.tma_wgrad_rows()?;
        let kernel = match (self.k[0], rows) {
            (3, 128) => k333,
            (_, 128) => k133,
            (3, _) => k333_m64,
            _ => k133_m64,
        };
        gpu.has_kernel(kernel).then_some((kernel, rows))
    }

    /// [`Pairing::weight_grad`] on the TMA kernel `kernel`: both maps copied channels last (the narrow one unless
    /// `narrow_last` is that copy), each described to the TMA unit by a tensor map of boxes of 64 channels x 64
    /// positions ([`tma_box`]; the wide map's at the conv's stride, at most 32 wide at stride 2 along y: two boxes
    /// take the place of one), the k-blocks (boxes of narrow positions) dealt in equal runs to the slices
    /// ([`tma_slices`]), the slices summed in order into dW's layout.
    fn weight_grad_tma<T: ConvElement>(
        &self,
        (kernel, rows): (Kernel<ConvWgradTmaParams>, usize),
        (narrow, narrow_last): (&GpuBuffer<T>, Option<&GpuBuffer<T>>),
        wide: &GpuBuffer<T>,
        what: &str,
    ) -> Result<GpuBuffer> {
        let gpu = &narrow.gpu;
        let [_, sy, sx] = self.stride;
        let widest = if sy == 2 { CONV_TMA_POSITIONS / 2 } else { CONV_TMA_POSITIONS };
        let boxes = tma_box(self.narrow[2], self.narrow[1], CONV_TMA_POSITIONS, widest);
        let (box_x, box_y) = boxes;
        let mut made = None;
        let narrow_last = self.channels_last_unless(narrow_last, &mut made, narrow, Product::WideFromNarrow, what)?;
        let wide_last = self.channels_last_of(wide, Product::NarrowFromWide, what)?;
        let narrow_map = self.channels_last_map(narrow_last, (self.c_narrow, self.narrow), boxes, (1, 1), what)?;
        // The wide box: the narrow box and the two rows that the taps along y add; at stride 2 along y one of two
        // boxes, each the narrow box's rows and one more.
        let wide_box = (box_x, box_y + 2 / sy);
        let wide_map = self.channels_last_map(&wide_last, (self.c_wide, self.wide), wide_box, (sx, sy), what)?;
        let (x_blocks, y_blocks) = (self.narrow[2].div_ceil(box_x), self.narrow[1].div_ceil(box_y));
        let kblocks = self.batch * self.narrow[0] * y_blocks * x_blocks;
        let (row_tiles, col_tiles) =
            (self.c_narrow.div_ceil(rows), self.c_wide.div_ceil(CONV_TMA_COLS) * self.k[0] * 3);
        let (per_slice, slices) = tma_slices(row_tiles * col_tiles, kblocks, gpu.multiprocessors());
        let (pairs, taps) = (self.c_narrow * self.c_wide, self.taps());
        let mut partial = gpu.alloc(slices * pairs * taps, what)?;
        // Every count is at most a map's elements per batch item, which tma_wgrad_kernel bounds.
        let params = ConvWgradTmaParams {
            narrow_map,
            wide_map,
            partial: partial.ptr_mut(),
            c_narrow: self.c_narrow as i32,
            c_wide: self.c_wide as i32,
            depth: self.narrow[0] as i32,
            pad: self.pad.map(|v| v as i32),
            stride: self.stride.map(|v| v as i32),
            box_x: box_x as i32,
            box_y: box_y as i32,
            x_blocks: x_blocks as i32,
            y_blocks: y_blocks as i32,
            kblocks: kblocks as i32,
            kblocks_per_slice: per_slice as i32,
        };
        let cfg = LaunchConfig {
            grid_dim: (row_tiles as u32, col_tiles as u32, slices as u32),
            block_dim: (CONV_TMA_PIPELINE_THREADS as u32, 1, 1),
            shared_mem_bytes: if rows == 128 { CONV_TMA_SHARED_BYTES_M128 } else { CONV_TMA_SHARED_BYTES_M64 } as u32,
        };
        gpu.launch(kernel, cfg, &params, what)?;
        let mut out = gpu.alloc(pairs * taps, what)?;
        let sum = ConvWgradTmaSumParams {
            partial: partial.ptr(),
            out: out.ptr_mut(),
            pairs: pairs as i64,
            taps: taps as i32,
            slices: slices as i32,
        };
        let cfg = LaunchConfig {
            grid_dim: (pairs.div_ceil(CONV_TMA_SUM_PAIRS) as u32, 1, 1),
            block_dim: (CONV_TMA_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        gpu.launch(kernel::conv_wgrad_tma_sum, cfg, &sum, what)?;
        Ok(out)
    }

    /// Whether the halo wgmma products of pass `which` read their source from its channels-last copy ([`SourceLast`])
    /// rather than from the channels-first map: where each source element meets at least [`WGMMA_CL_MIN_USES`]
    /// multiply-adds, so that the copy (one read and one write of the source) costs less than its 16-byte halo loads
    /// save. Counted over the whole pass, as the input gradient's stride phases share one copy.
    fn wgmma_channels_last(&self, which: Product) -> bool {
        let voxels = |s: [usize; 3]| s.iter().product::<usize>();
        let ((_, src), (c_dst, dst)) = (self.source(which), self.output(which));
        self.taps() * c_dst * voxels(dst) >= WGMMA_CL_MIN_USES * voxels(src)
    }

    /// Whether the halo-tile weight gradient of cuda/conv_halo.cu computes this pairing's: a stride-1 conv (not
    /// transposed) of at most [`CONV_HALO_MAX_TAPS`] taps per axis and more than one tap, with at least one row
    /// tile of wide channels (the 1-channel stem stays on the gathers) and at least [`HALO_WGRAD_MIN_POSITIONS`]
    /// narrow positions.
    fn halo_wgrad_suits(&self) -> bool {
        !self.transposed
            && self.stride.iter().all(|&s| s == 1)
            && self.k.iter().all(|&k| k <= CONV_HALO_MAX_TAPS)
            && self.taps() > 1
            && self.c_wide >= CONV_HALO_WG_ROWS
            && self.batch * self.narrow.iter().product::<usize>() >= HALO_WGRAD_MIN_POSITIONS
    }

    /// [`Pairing::weight_grad`] on the halo-tile kernel: boxes of narrow positions, dealt in fixed runs to the
    /// slices (formula in cuda/conv_halo.cuh), the slices summed in order.
    fn weight_grad_halo<T: ConvElement>(
        &self,
        d: &KernelDims,
        narrow: &GpuBuffer<T>,
        wide: &GpuBuffer<T>,
        what: &str,
    ) -> Result<GpuBuffer> {
        let gpu = &narrow.gpu;
        let (product, slices) = d.weight_grad_halo::<T>();
        let numel = self.c_narrow * self.c_wide * self.taps();
        let mut out = gpu.alloc(slices * numel, what)?;
        let params = ConvWgradHaloParams { narrow: narrow.ptr(), wide: wide.ptr(), partial: out.ptr_mut(), ..product };
        let (row_tiles, col_tiles) =
            (self.c_wide.div_ceil(CONV_HALO_WG_ROWS), self.c_narrow.div_ceil(CONV_HALO_WG_COLS));
        let cfg = LaunchConfig {
            grid_dim: (row_tiles as u32, col_tiles as u32, slices as u32),
            block_dim: (CONV_HALO_THREADS as u32, 1, 1),
            shared_mem_bytes: (4 * CONV_HALO_WG_SHARED_WORDS) as u32,
        };
        gpu.launch(T::HALO_WGRAD, cfg, &params, what)?;
        sum_slices(gpu, out, slices, numel, what)
    }

    /// The kernels of the explicit weight gradient for this pairing on `gpu`, if the type has them, the GPU loaded
    /// them (sm_90), the pairing suits them ([`Pairing::gemm_wgrad_suits`]) and both maps are 16-byte aligned (the
    /// product copies 8 positions at a time).
    fn gemm_wgrad_kernels<T: ConvElement>(
        &self,
        gpu: &Gpu,
        narrow: &GpuBuffer<T>,
        wide: &GpuBuffer<T>,
    ) -> Option<GemmWgrad<T>> {
        let kernels = T::GEMM_WGRAD?;
        let aligned = narrow.ptr().address() % 16 == 0 && wide.ptr().address() % 16 == 0;
        let loaded = gpu.has_kernel(kernels.im2col) && gpu.has_kernel(kernels.product.wide);
        (!gpu.exact_f32() && aligned && loaded && self.gemm_wgrad_suits()).then_some(kernels)
    }

    /// Whether the explicit weight gradient takes this pairing and beats the other kernels on it: a transposed conv's
    /// narrow rows of positions are whole 16-byte pieces (its columns feed its input gradient too; the others' rows
    /// are padded, [`Pairing::column_row`]), and a 1x1x1 kernel of stride 1 (no columns: the wide map is the
    /// product's operand as it is), a transposed conv of at least [`UNFOLD_MIN_WIDE_CHANNELS`] wide channels (its
    /// kernel is its stride: the columns are the wide map rearranged, no bigger), a strided conv from as many with
    /// columns of at most [`GEMM_WGRAD_MAX_STRIDED_COLUMN_BYTES`], or bf16 columns of at most
    /// [`GEMM_WGRAD_MAX_COLUMN_BYTES`] for at least [`GEMM_WGRAD_MIN_CHANNELS`] narrow channels or from one wide
    /// channel.
    fn gemm_wgrad_suits(&self) -> bool {
        let (taps, positions) = (self.taps(), self.narrow.iter().product::<usize>());
        let columns = self.batch * self.c_wide * taps * positions * std::mem::size_of::<bf16>();
        let fits = |v: usize| v < i32::MAX as usize;
        let strided = self.stride.iter().any(|&s| s > 1);
        let wide_enough = self.c_wide >= UNFOLD_MIN_WIDE_CHANNELS;
        let pays = match self.transposed {
            true => wide_enough,
            false => {
                taps == 1
                    || (strided && wide_enough && columns <= GEMM_WGRAD_MAX_STRIDED_COLUMN_BYTES)
                    || (columns <= GEMM_WGRAD_MAX_COLUMN_BYTES
                        && (self.c_narrow >= GEMM_WGRAD_MIN_CHANNELS || self.c_wide == 1))
            }
        };
        (taps > 1 || self.stride.iter().all(|&s| s == 1))
            && (positions % 8 == 0 || !self.transposed)
            && fits(self.c_wide * taps)
            && fits(positions)
            && self.batch * positions / WGRAD_MAX_SLICE < 65535
            && pays
    }

    /// [`Pairing::weight_grad`] as one explicit product, dW[cn, (cw, a)] = sum_{n, o} Xn[n, cn, o]
    /// col[n, (cw, a), o] with col[n, (cw, a), o] = Xw[n, cw, o s + a - p] written out first ([`Pairing::columns`];
    /// a 1x1x1 conv's col is Xw itself), on gemm_wgmma.cu's wgmma tiles: the reduction over the batch and the
    /// positions cut into fixed slices, summed in order.
    fn weight_grad_gemm<T: ConvElement>(
        &self,
        d: &KernelDims,
        kernels: GemmWgrad<T>,
        narrow: &GpuBuffer<T>,
        wide: &GpuBuffer<T>,
        what: &str,
    ) -> Result<GpuBuffer> {
        let columns = (self.taps() > 1).then(|| self.columns(d, kernels, wide, what)).transpose()?;
        self.weight_grad_of_columns(d, kernels, narrow, columns.as_ref().unwrap_or(wide), what)
    }

    /// The length of the explicit weight gradient's operand rows: the narrow map's positions rounded up to whole
    /// 16-byte pieces (the product copies 8 positions at a time and reads none past the positions: the padding is
    /// never summed). Measured on the H100 (2026-12-07, ncu): amos-2d's 512-channel weight gradients at 10x10 (100
    /// positions) and 5x5 ran on the mma.sync gathers for want of whole pieces, 0.123 ms of 0.162 at 10x10; padded
    /// (same day, one call) 512 x 10x10 0.162 -> 0.105 ms, 1024 -> 512 at 20x20 0.273 -> 0.139, flare-3d's 320 x
    /// 5x7x6 0.151 -> 0.096.
    fn column_row(&self) -> usize {
        self.narrow.iter().product::<usize>().next_multiple_of(8)
    }

    /// The wide map's columns, col[n, (cw, a), o] = Xw[n, cw, o s + a - p] (0 outside the map), by conv.cu's
    /// conv_im2col: taps times the narrow map's positions per wide channel, each row [`Pairing::column_row`] long.
    fn columns<T: ConvElement>(
        &self,
        d: &KernelDims,
        kernels: GemmWgrad<T>,
        wide: &GpuBuffer<T>,
        what: &str,
    ) -> Result<GpuBuffer<T>> {
        let row = self.column_row();
        let pieces = self.batch * self.c_wide * self.taps() * row / 8;
        let mut col = wide.gpu.alloc_of::<T>(8 * pieces, what)?;
        let params = ConvIm2colParams {
            src: wide.ptr(),
            col: col.ptr_mut(),
            src_size: d.wide,
            narrow_size: d.narrow,
            kernel: d.k,
            stride: d.stride,
            pad: d.pad,
            // At most the map's positions plus 7 (kernel_dims).
            row: row as i32,
            pieces: pieces as i64,
        };
        wide.gpu.launch(kernels.im2col, grid_1d(pieces), &params, what)?;
        Ok(col)
    }

    /// The product of [`Pairing::weight_grad_gemm`] over the columns `b` (or a 1x1x1 conv's wide map).
    fn weight_grad_of_columns<T: ConvElement>(
        &self,
        d: &KernelDims,
        kernels: GemmWgrad<T>,
        narrow: &GpuBuffer<T>,
        b: &GpuBuffer<T>,
        what: &str,
    ) -> Result<GpuBuffer> {
        let gpu = &narrow.gpu;
        let (taps, positions, row) = (self.taps(), self.narrow.iter().product::<usize>(), self.column_row());
        let (rows, cols) = (self.c_narrow, self.c_wide * taps);
        // The operands' rows `row` long: the columns are written so; the narrow map, and a 1x1x1 conv's wide map
        // (its own columns), are copied so where their rows are shorter.
        let padded = |map: &GpuBuffer<T>, channels: usize| -> Result<Option<GpuBuffer<T>>> {
            if row == positions {
                return Ok(None);
            }
            let mut out = gpu.alloc_of::<T>(self.batch * channels * row, what)?;
            copy_rows_gpu(map, &mut out, self.batch * channels, positions, (positions, 0), (row, 0), what)?;
            Ok(Some(out))
        };
        let narrow_rows = padded(narrow, rows)?;
        let wide_rows = if taps == 1 { padded(b, cols)? } else { None };
        let (a, b) = (narrow_rows.as_ref().unwrap_or(narrow), wide_rows.as_ref().unwrap_or(b));
        let product = kernels.product.pick(gpu, rows, cols);
        let tiles = rows.div_ceil(GEMM_WGMMA_BM) * cols.div_ceil(product.1);
        let shared = gemm_wgmma_shared_bytes(product.1);
        let resident = gpu.resident_blocks(product.0, GEMM_WGMMA_THREADS as u32, shared, what)?;
        // The reduction runs over (item, position) in steps of GEMM_WGMMA_BK positions of one item, cut into slices
        // of whole steps: enough for about two blocks per block the GPU holds at once, each of at most
        // WGRAD_MAX_SLICE terms.
        let steps = self.batch * positions.div_ceil(GEMM_WGMMA_BK);
        let wanted = (2 * resident).div_ceil(tiles).max(steps.div_ceil(WGRAD_MAX_SLICE / GEMM_WGMMA_BK));
        let (slice_steps, slices) = split_reduction(steps, wanted);
        let numel = rows * cols;
        let mut out = gpu.alloc(slices * numel, what)?;
        // Every count below is at most a map's or the weight's elements, which kernel_dims and
        // gemm_wgrad_kernels bound.
        let params = GemmWgmmaParams {
            a: a.ptr(),
            b: b.ptr(),
            c: out.ptr_mut(),
            a_ld: row as i64,
            b_ld: row as i64,
            a_item: (rows * row) as i64,
            b_item: (cols * row) as i64,
            m: rows as i32,
            n: cols as i32,
            k: positions as i32,
            items: d.batch,
            slice_steps: slice_steps as i32,
        };
        launch_gemm_wgmma(gpu, product, &params, slices, what)?;
        sum_slices(gpu, out, slices, numel, what)
    }

    /// The kernels of the explicit `product` for this pairing from `src`, if the type has them, its GPU loaded them
    /// (sm_90), the pairing suits them ([`Pairing::explicit_suits`]) and the source map and the weight are 16-byte
    /// aligned (the product copies 8 reduction indices at a time). Not under `--math exact`, as the other products of
    /// gemm_wgmma.cu.
    fn explicit_kernels<T: ConvElement>(
        &self,
        product: Product,
        src: &GpuBuffer<T>,
        w: &GpuBuffer<T>,
    ) -> Option<ExplicitConv<T>> {
        let (kernels, gpu) = (T::EXPLICIT?, &src.gpu);
        let aligned = src.ptr().address() % 16 == 0 && w.ptr().address() % 16 == 0;
        let loaded = gpu.has_kernel(kernels.im2row)
            && gpu.has_kernel(kernels.flip)
            && gpu.has_kernel(kernels.product[product as usize].wide)
            && gpu.has_kernel(kernels.store);
        (!gpu.exact_f32() && aligned && loaded && self.explicit_suits(product)).then_some(kernels)
    }

    /// Whether the explicit product takes this pairing's forward (`NarrowFromWide`) or input gradient: a conv (not
    /// transposed) of stride 1 and more than one tap whose source has at least [`EXPLICIT_MIN_CHANNELS`] channels
    /// (its rows whole 16-byte pieces) on at most [`EXPLICIT_MAX_POSITIONS`] positions per batch item, the rows at most
    /// [`EXPLICIT_MAX_ROWS_BYTES`]: the deep 2D stages' small maps, where the implicit products have few positions
    /// to share out and reload the map per channel tile.
    fn explicit_suits(&self, product: Product) -> bool {
        let (src_channels, _) = self.source(product);
        let (row, positions) = (src_channels * self.taps(), self.narrow.iter().product::<usize>());
        let rows_bytes = self.batch * positions * row * std::mem::size_of::<bf16>();
        !self.transposed
            && self.taps() > 1
            && self.stride.iter().all(|&s| s == 1)
            && row % 8 == 0
            && src_channels >= EXPLICIT_MIN_CHANNELS
            && positions <= EXPLICIT_MAX_POSITIONS
            && rows_bytes <= EXPLICIT_MAX_ROWS_BYTES
    }

    /// The forward (`NarrowFromWide`) or input gradient of a stride-1 conv as one explicit product on gemm_wgmma.cu's
    /// tiles: the source map written out as rows, rows[(n, o), (c, a)] = src[n, c, o + a - p] (conv_im2row), then
    /// out[c', (n, o)] = sum_{(c, a)} W'[c', (c, a)] rows[(n, o), (c, a)] in float32, the reduction cut into
    /// [`explicit_slices`] slices whose partial sums conv_rows_store adds in order, stored into the map with the bias.
    /// The forward's W' is W itself (Cout, Cin, taps); the input gradient's is W flipped, W'[cw, (cn, a)] = W[cn, cw,
    /// taps - 1 - a] (conv_weight_flip), the transposed correlation of a stride-1 conv with padding (k - 1) / 2 on
    /// both sides.
    #[allow(clippy::too_many_arguments)]
    fn explicit_product<T: ConvElement>(
        &self,
        d: &KernelDims,
        kernels: ExplicitConv<T>,
        product: Product,
        src: &GpuBuffer<T>,
        w: &GpuBuffer<T>,
        bias: Option<&GpuBuffer<T>>,
        out: &mut GpuBuffer<T>,
        what: &str,
    ) -> Result<()> {
        let gpu = &src.gpu;
        let (taps, positions) = (self.taps(), self.narrow.iter().product::<usize>());
        let ((src_channels, _), (dst_channels, _)) = (self.source(product), self.output(product));
        let (row, columns) = (src_channels * taps, self.batch * positions);
        let mut rows = gpu.alloc_of::<T>(columns * row, what)?;
        let pieces = columns * row / 8;
        let im2row = ConvIm2rowParams {
            src: src.ptr(),
            rows: rows.ptr_mut(),
            size: d.narrow,
            kernel: d.k,
            pad: d.pad,
            channels: src_channels as i32,
            pieces: pieces as i64,
        };
        gpu.launch(kernels.im2row, grid_1d(pieces), &im2row, what)?;
        let flipped = match product {
            Product::NarrowFromWide => None,
            Product::WideFromNarrow => {
                let len = self.c_narrow * self.c_wide * taps;
                let mut flipped = gpu.alloc_of::<T>(len, what)?;
                let params = ConvWeightFlipParams {
                    w: w.ptr(),
                    out: flipped.ptr_mut(),
                    c_narrow: d.c_narrow,
                    c_wide: d.c_wide,
                    taps: taps as i32,
                    len: len as i64,
                };
                gpu.launch(kernels.flip, grid_1d(len), &params, what)?;
                Some(flipped)
            }
        };
        let a = flipped.as_ref().unwrap_or(w);
        let tiles = kernels.product[product as usize].pick(gpu, dst_channels, columns);
        let steps = row.div_ceil(GEMM_WGMMA_BK);
        let blocks = dst_channels.div_ceil(GEMM_WGMMA_BM) * columns.div_ceil(tiles.1);
        let (slice_steps, slices) = split_reduction(steps, explicit_slices(gpu.multiprocessors(), blocks, steps));
        let len = dst_channels * columns;
        let mut c_rows = gpu.alloc(slices * len, what)?;
        // Every count below is at most a map's or the weight's elements (kernel_dims, explicit_suits).
        let params = GemmWgmmaParams {
            a: a.ptr(),
            b: rows.ptr(),
            c: c_rows.ptr_mut(),
            a_ld: row as i64,
            b_ld: row as i64,
            a_item: 0,
            b_item: 0,
            m: dst_channels as i32,
            n: columns as i32,
            k: row as i32,
            items: 1,
            slice_steps: slice_steps as i32,
        };
        launch_gemm_wgmma(gpu, tiles, &params, slices, what)?;
        drop(rows);
        let store = ConvRowsStoreParams {
            c_rows: c_rows.ptr(),
            bias: bias.map(GpuBuffer::ptr).unwrap_or_default(),
            dst: out.ptr_mut(),
            channels: dst_channels as i32,
            positions: positions as i32,
            batch: d.batch,
            len: len as i64,
            slices: slices as i32,
        };
        gpu.launch(kernels.store, grid_1d(len), &store, what)
    }

    /// The wgmma weight-gradient kernel for this pairing ([`Pairing::halo_wgrad_suits`] assumed) on `gpu` and its
    /// box slices, if the type has them, the GPU loaded them (sm_90) and they take it: a 3x3x3 or 1x3x3 kernel (a 2D
    /// 3x3 is 1x3x3) padded by 1 in-plane, each map's elements per batch item (channels x voxels) with 32-bit
    /// indices, and the wide map's rows in whole 8-byte words (width a multiple of 4, `wide` 8-byte aligned: the
    /// kernel loads its halo 4 voxels at a time). It reads the wide map channels first: from a channels-last copy
    /// (as the products may, [`Pairing::wgmma_channels_last`]) it was slower on 21 of 24 shapes of flare-3d and
    /// amos-2d (H100, 2026-12-06: flare-3d 1x3x3 32 -> 32 at 40x224x192 0.842 -> 1.030 ms, 3x3x3 64 -> 64 at
    /// 40x112x96 0.832 -> 0.877), the copy costing more than the 16-byte halo loads saved.
    fn wgmma_wgrad_kernel<T: ConvElement>(
        &self,
        gpu: &Gpu,
        wide: &GpuBuffer<T>,
    ) -> Option<(Kernel<ConvWgradWgmmaParams<T>>, usize)> {
        let fits = |c: usize, s: [usize; 3]| c * s.iter().product::<usize>() < i32::MAX as usize;
        let quads = self.wide[2] % 4 == 0 && wide.ptr().address() % 8 == 0;
        if !fits(self.c_narrow, self.narrow) || !fits(self.c_wide, self.wide) || !quads || self.pad[1..] != [1, 1] {
            return None;
        }
        let (narrow, k) = (self.narrow.map(|v| v as i32), self.k.map(|v| v as i32));
        let box_z = wgmma_box_z(narrow, k);
        let at = fixed_geometry(k, box_z)?;
        let kernel = T::WGMMA_WGRAD?[at];
        gpu.has_kernel(kernel).then_some((kernel, box_z))
    }

    /// [`Pairing::weight_grad`] on the wgmma kernel `kernel` of cuda/conv_wgmma.cu: boxes of
    /// [`CONV_WGMMA_TILES`] x 64 narrow positions, `box_z` slices deep (the kernel's), dealt in fixed runs to
    /// about two slices per block the GPU holds at once over the channel tiles, the slices summed in order.
    fn weight_grad_wgmma<T: ConvElement>(
        &self,
        d: &KernelDims,
        kernel: Kernel<ConvWgradWgmmaParams<T>>,
        box_z: usize,
        narrow: &GpuBuffer<T>,
        wide: &GpuBuffer<T>,
        what: &str,
    ) -> Result<GpuBuffer> {
        let gpu = &narrow.gpu;
        let box_ = wgmma_box(box_z);
        let boxes = self.batch * (0..3).map(|a| self.narrow[a].div_ceil(box_[a])).product::<usize>();
        let halo: usize = (0..3).map(|a| box_[a] + self.k[a] - 1).product();
        debug_assert!(halo <= CONV_WGMMA_MAX_HALO, "{halo} halo voxels");
        // The kernel's wide channels per block, by its depth.
        let cols = if self.k[0] == 3 { CONV_WGMMA_WG_COLS_K3 } else { CONV_WGMMA_WG_COLS_K1 };
        let shared_mem_bytes = (2 * 16 * (cols / 8 * halo + CONV_WGMMA_WG_ROWS * CONV_WGMMA_WG_PITCH)) as u32;
        let (row_tiles, col_tiles) = (self.c_narrow.div_ceil(CONV_WGMMA_WG_ROWS), self.c_wide.div_ceil(cols));
        let resident = gpu.resident_blocks(kernel, CONV_WGMMA_THREADS as u32, shared_mem_bytes, what)?;
        let (boxes_per_slice, slices) = split_reduction(boxes, (2 * resident).div_ceil(row_tiles * col_tiles));
        let numel = self.c_narrow * self.c_wide * self.taps();
        let mut out = gpu.alloc(slices * numel, what)?;
        let params = ConvWgradWgmmaParams {
            narrow: narrow.ptr(),
            wide: wide.ptr(),
            partial: out.ptr_mut(),
            c_narrow: d.c_narrow,
            c_wide: d.c_wide,
            narrow_size: d.narrow,
            wide_size: d.wide,
            pad: d.pad,
            // At most batch * prod(narrow), which kernel_dims bounds.
            boxes: boxes as i32,
            boxes_per_slice: boxes_per_slice as i32,
        };
        let cfg = LaunchConfig {
            grid_dim: (row_tiles as u32, col_tiles as u32, slices as u32),
            block_dim: (CONV_WGMMA_THREADS as u32, 1, 1),
            shared_mem_bytes,
        };
        gpu.launch(kernel, cfg, &params, what)?;
        sum_slices(gpu, out, slices, numel, what)
    }
}

/// The explicit weight gradient ([`Pairing::weight_grad_gemm`]) takes a map whose columns (batch x wide channels x
/// taps x narrow positions, bf16) fit in this many bytes; a 1x1x1 conv needs none.
const GEMM_WGRAD_MAX_COLUMN_BYTES: usize = 1 << 28;
/// ... and, for a kernel of more than one tap, at least this many narrow channels, each column element meeting that
/// many in the product (or a wide map of one channel, whose columns are few). Measured on the H200 (2026-12-04,
/// flare-3d b2 and amos-2d b12 bf16, beside the wgmma weight gradient in the same call): at 320 and 512 channels it
/// took 0.39 -> 0.26 ms (320 x 10x14x12), 0.74 -> 0.46 (640 -> 320 at 10x14x12), 0.45 -> 0.26 (512 x 20x20); at 256
/// it lost (0.40 -> 0.58 ms at 256 x 10x28x24, 0.28 -> 0.30 at 256 x 40x40): writing the columns (0.22 ms of the
/// 0.58) and reading them again cost more than the product saves; the stems (1 channel, 3x3) 1.12 -> 0.73 ms.
const GEMM_WGRAD_MIN_CHANNELS: usize = 320;
/// A strided conv's weight gradient takes the explicit product for any narrow channel count where its columns fit in
/// this many bytes (and the wide map has [`UNFOLD_MIN_WIDE_CHANNELS`]): the other kernel for it is the conv_tc
/// gathers (the halo and wgmma weight gradients are stride 1 only). H100, 2026-12-06, beside the gathers in one call:
/// flare-3d 64 -> 128 at 40x112x96, stride 2 (372 MB of columns), 0.890 -> 0.732 ms; 128 -> 256 at 20x56x48 0.503 ->
/// 0.267; amos-2d 64 -> 128 at 160x160 0.281 -> 0.212, 128 -> 256 at 80x80 0.248 -> 0.152.
const GEMM_WGRAD_MAX_STRIDED_COLUMN_BYTES: usize = 1 << 29;
/// The fewest wide channels at which a strided conv's weight gradient and a transposed conv's backward unfold the
/// wide map into columns ([`Pairing::gemm_wgrad_suits`], [`Pairing::unfolded`]). From 32 the columns cost more than
/// the gathers they replace (H100, 2026-12-06, one call: amos-2d's strided 32 -> 64 at 320x320 weight gradient 0.349
/// -> 0.382 ms; the transposed 64 -> 32 x 1x2x2 at 40x112x96 input gradient 0.389 -> 0.410, weight gradient 0.535 ->
/// 0.604, 64 -> 32 x 2x2 at 160x160 0.146 -> 0.156); from 64 they won (the transposed 128 -> 64 x 2x2x2 at 20x56x48
/// 0.268 -> 0.216 and 0.388 -> 0.321, 256 -> 128 at 10x28x24 0.147 -> 0.072 and 0.203 -> 0.119; amos-2d 512 -> 256
/// at 20x20 0.121 -> 0.050 and 0.144 -> 0.077).
const UNFOLD_MIN_WIDE_CHANNELS: usize = 64;

/// The explicit forward and input gradient ([`Pairing::explicit_product`]) take sources of at least this many
/// channels ... Measured on the H100 (2026-12-06, amos-2d b12 and flare-3d b2 bf16, beside the implicit kernels in the
/// same call; benches/RESULTS.md): faster from 512 channels on at most 20x20 positions (1024 -> 512 at 10x10 input
/// gradient 0.286 -> 0.132 ms, forward 0.245 -> 0.180; at 20x20 0.490 -> 0.338 and 0.501 -> 0.462; 512 x 10x10
/// forward 0.130 -> 0.099), slower on 256 channels at 40x40 (0.189 -> 0.333), on 512 -> 256 at 40x40 (input gradient
/// 0.332 -> 0.442) and on flare-3d's 320 channels at 10x14x12 (0.128 -> 0.245), where the implicit products have
/// positions enough.
const EXPLICIT_MIN_CHANNELS: usize = 512;
/// ... on at most this many positions per batch item ...
const EXPLICIT_MAX_POSITIONS: usize = 400;
/// ... whose rows fit in this many bytes (bf16).
const EXPLICIT_MAX_ROWS_BYTES: usize = 1 << 27;

/// The slices of an explicit forward's or input gradient's reduction of `steps` k-steps over `blocks` output tiles on
/// a GPU of `sms` multiprocessors: as many as fill about two waves of one block per SM, with at least
/// [`EXPLICIT_MIN_SLICE_STEPS`] k-steps each. The deep 2D stages' products have few tiles (amos-2d 512 -> 512 at 10x10,
/// batch 12: 4 x 10 = 40 tiles of 128 x 128 on 132 SMs; at 5x5, 12), so in one slice most SMs idle while a few run
/// the whole reduction of 72 k-steps (H200, 2026-12-06: 0.097 and 0.084 ms against cuDNN's 0.023 and 0.018). A
/// function of the shapes and the GPU's SM count, so the sum's order is the same on every run on that GPU.
fn explicit_slices(sms: usize, blocks: usize, steps: usize) -> usize {
    (2 * sms / blocks.max(1)).clamp(1, (steps / EXPLICIT_MIN_SLICE_STEPS).max(1))
}

/// The fewest k-steps of an explicit product's slice ([`explicit_slices`]).
const EXPLICIT_MIN_SLICE_STEPS: usize = 8;

/// Cuts a weight gradient's reduction of `units` (k-stages, boxes, steps: at least one) into runs of whole units for
/// about `wanted` slices, at most the grid's 65535: (units per slice, slices). A function of the shapes alone, so
/// the summation order is the same on every run.
fn split_reduction(units: usize, wanted: usize) -> (usize, usize) {
    let per_slice = units.div_ceil(wanted.clamp(1, units.min(65535)));
    (per_slice, units.div_ceil(per_slice))
}

/// Shared memory of a gemm_wgmma.cu block of `columns`-column tiles: its stages of A and B rows (bf16).
fn gemm_wgmma_shared_bytes(columns: usize) -> u32 {
    (GEMM_WGMMA_STAGES * (GEMM_WGMMA_BM + columns) * GEMM_WGMMA_BK * 2) as u32
}

/// The launch of a gemm_wgmma.cu kernel over an `m` x `n` result in tiles of [`GEMM_WGMMA_BM`] rows and `columns`
/// columns, `z` deep (slices or batch items): one block per tile and z, its stages in dynamic shared memory.
pub(crate) fn gemm_wgmma_config(m: usize, n: usize, columns: usize, z: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (m.div_ceil(GEMM_WGMMA_BM) as u32, n.div_ceil(columns) as u32, z as u32),
        block_dim: (GEMM_WGMMA_THREADS as u32, 1, 1),
        shared_mem_bytes: gemm_wgmma_shared_bytes(columns),
    }
}

/// Launches gemm_wgmma.cu's product `kernel` of `columns`-column tiles ([`GemmTiles::pick`]) on `params` (pointers
/// filled): one block per tile of C and slice.
fn launch_gemm_wgmma<T: GpuElement>(
    gpu: &Arc<Gpu>,
    (kernel, columns): (Kernel<GemmWgmmaParams<T>>, usize),
    params: &GemmWgmmaParams<T>,
    slices: usize,
    what: &str,
) -> Result<()> {
    let cfg = gemm_wgmma_config(params.m as usize, params.n as usize, columns, slices);
    gpu.launch(kernel, cfg, params, what)
}

/// The fewest channels on either side of a conv whose weight gradient runs on the TMA kernel
/// ([`Pairing::tma_wgrad_kernel`]): its boxes are 64 channels wide.
const TMA_WGRAD_MIN_CHANNELS: usize = 64;

/// The fewest channels of the source of a strided conv's pass on the TMA kernels (the wide map of its weight gradient,
/// the source of its products): a box's 64 channels then hold zeros past the map's ([`Pairing::tma_wgrad_rows`],
/// [`Pairing::tma_product_rows`]).
const TMA_STRIDED_MIN_SOURCES: usize = 32;

/// The fewest channels on either side of a conv whose forward and input gradient run on the TMA product in blocks of
/// 128 output channels ([`Pairing::tma_product_rows`]).
const TMA_PRODUCT_MIN_CHANNELS: usize = 128;

/// The output channels of a pass that runs on the TMA product in blocks of 64 (from at least
/// [`TMA_PRODUCT_M64_MIN_SOURCES`] source channels): fewer than 33 would leave more than half of a block's rows empty
/// ([`Pairing::tma_product_rows`]).
const TMA_PRODUCT_M64_OUTPUTS: std::ops::RangeInclusive<usize> = 33..=64;

/// The fewest source channels of a pass on the TMA product in blocks of 64 outputs: from 64 (two k-blocks per tap)
/// the halo and implicit kernels were as fast or faster (H100, [`Pairing::tma_product_rows`]).
const TMA_PRODUCT_M64_MIN_SOURCES: usize = 128;

/// The output channels of an input gradient on the TMA product in one block of 32 (conv_dgrad_tma_bf16_n32: the
/// positions as the product's m, the channels as its n): fewer than 17 would leave more than half of its n empty. (The
/// TMA paths take maps of at least [`TMA_STRIDED_MIN_SOURCES`] channels, so only 32 reaches it today.)
const TMA_PRODUCT_N32_OUTPUTS: std::ops::RangeInclusive<usize> = 17..=32;

/// The fewest source channels of an input gradient on conv_dgrad_tma_bf16_n32: a box's 64 channels are then all the
/// map's.
const TMA_PRODUCT_N32_MIN_SOURCES: usize = 64;

/// The output positions per block of the TMA product in blocks of `rows` output channels (cuda/conv_tma.cuh).
fn tma_product_positions(rows: usize) -> usize {
    if rows == 128 {
        CONV_TMA_PRODUCT_POSITIONS
    } else {
        CONV_TMA_PRODUCT_POSITIONS_M64
    }
}

/// The fewest k-blocks of a slice of the TMA weight gradient ([`tma_slices`]).
const TMA_MIN_SLICE: usize = 16;

/// The box of `positions` (a power of two: box_x along x, box_y along y) of a TMA kernel over a map `width` x
/// `height` ([`CONV_TMA_POSITIONS`] narrow positions of the weight gradient, [`CONV_TMA_PRODUCT_POSITIONS`] output
/// positions of the products): of the shapes from `widest` x (positions / widest) to 8 x (positions / 8), the one
/// that covers the map in the fewest boxes (the positions past the map are zeros the products still multiply), the
/// widest of equals. Its width is a multiple of 8 so that each of its rows is whole swizzle atoms (cuda/conv_tma.cu:
/// the taps along y shift a box by whole rows).
fn tma_box(width: usize, height: usize, positions: usize, widest: usize) -> (usize, usize) {
    let shapes = (3..=widest.trailing_zeros()).rev().map(|i| (1usize << i, positions >> i));
    shapes.min_by_key(|&(x, y)| width.div_ceil(x) * height.div_ceil(y)).expect("boxes 8 wide and wider")
}

/// The slices of the TMA weight gradient's `kblocks` among `tiles` blocks each, on `multiprocessors` that hold one
/// block at a time: (k-blocks per slice, slices). Of 1 to 64 slices, the count whose blocks fill their waves best, the
/// fewest of equals: each slice adds a partial sum of dW to write and add (a block's sums are as many bytes as 2.4
/// k-blocks of its boxes), so a slice has at least [`TMA_MIN_SLICE`] k-blocks. (The few tiles of a large map of 64
/// channels, 9 of 3x3x3, need dozens of slices to fill the GPU.)
fn tma_slices(tiles: usize, kblocks: usize, multiprocessors: usize) -> (usize, usize) {
    let most = (kblocks / TMA_MIN_SLICE).clamp(1, 64);
    let fill = |s: usize| {
        let blocks = tiles * s;
        blocks as f64 / (blocks.div_ceil(multiprocessors) * multiprocessors) as f64
    };
    let best = (1..=most).fold(1, |best, s| if fill(s) > fill(best) + 1e-9 { s } else { best });
    let per_slice = kblocks.div_ceil(best);
    (per_slice, kblocks.div_ceil(per_slice))
}

/// The weight gradient from its `slices` partial sums of `numel` each: `partial` itself for one slice, else their
/// sum in slice order (conv.cu's sum_slices).
fn sum_slices(gpu: &Arc<Gpu>, partial: GpuBuffer, slices: usize, numel: usize, what: &str) -> Result<GpuBuffer> {
    if slices == 1 {
        return Ok(partial);
    }
    let mut dw = gpu.alloc(numel, what)?;
    let sums = SumSlicesParams { partial: partial.ptr(), out: dw.ptr_mut(), n: numel as i64, slices: slices as i32 };
    gpu.launch(kernel::sum_slices, grid_1d(numel), &sums, what)?;
    Ok(dw)
}

/// `out[c] = sum_{n,v} g[n,c,v]` for a map `g` of (batch, channels, voxels) (the bias gradient): fixed chunks of
/// each row are summed by one block each, then the chunk sums of each channel the same way, until one remains.
pub(crate) fn channel_sums<T: GpuElement>(
    g: &GpuBuffer<T>,
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
    let chunks = voxels.div_ceil(CHANNEL_SUM_CHUNK);
    let mut out = gpu.alloc(channels * batch * chunks, what)?;
    let cfg = LaunchConfig {
        grid_dim: ((batch * chunks) as u32, channels as u32, 1),
        block_dim: (CHANNEL_SUM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let params = ChannelSumsParams {
        x: g.ptr(),
        out: out.ptr_mut(),
        channels: channels as i32,
        len: voxels as i64,
        chunk_len: CHANNEL_SUM_CHUNK as i64,
        chunks: chunks as i32,
    };
    gpu.launch(kernel::channel_sums::<T>(), cfg, &params, what)?;
    if batch * chunks == 1 {
        return Ok(out);
    }
    // The chunk sums (channels, batch * chunks) are the next level's map of one row.
    channel_sums(&out, 1, channels, batch * chunks, what)
}

#[cfg(test)]
mod tests {
    //! The GPU products' parameters, checked on the CPU: each `ConvGemmParams` / `ConvWgradParams` that
    //! [`KernelDims`] builds is evaluated here by the formula of cuda/conv.cuh (what the kernels compute, in float64)
    //! and compared with the three products of a [`Pairing`] written out directly from their definitions.
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    fn pairing(
        batch: usize,
        c_wide: usize,
        c_narrow: usize,
        wide: [usize; 3],
        k: [usize; 3],
        s: [usize; 3],
    ) -> Pairing {
        // conv: padding k/2, narrow size (I - 1)/s + 1.
        let pad = k.map(|k| k / 2);
        let narrow = [0, 1, 2].map(|d| (wide[d] - 1) / s[d] + 1);
        Pairing { batch, c_wide, c_narrow, wide, narrow, k, stride: s, pad, transposed: false }
    }

    fn transposed(batch: usize, c_wide: usize, c_narrow: usize, narrow: [usize; 3], k: [usize; 3]) -> Pairing {
        // conv_transpose: stride = kernel, no padding, wide size O k.
        let wide = [0, 1, 2].map(|d| narrow[d] * k[d]);
        Pairing { batch, c_wide, c_narrow, wide, narrow, k, stride: k, pad: [0; 3], transposed: true }
    }

    fn voxels(s: [usize; 3]) -> usize {
        s.iter().product()
    }

    fn flat(c: [usize; 3], s: [usize; 3]) -> usize {
        (c[0] * s[1] + c[1]) * s[2] + c[2]
    }

    /// Every point of the box `s`, in raster order.
    fn points(s: [usize; 3]) -> impl Iterator<Item = [usize; 3]> {
        (0..s[0]).flat_map(move |a| (0..s[1]).flat_map(move |b| (0..s[2]).map(move |c| [a, b, c])))
    }

    /// The wide coordinate o*s + a - p, if inside the wide map.
    fn wide_at(p: &Pairing, o: [usize; 3], a: [usize; 3]) -> Option<[usize; 3]> {
        let i = [0, 1, 2].map(|d| (o[d] * p.stride[d] + a[d]).checked_sub(p.pad[d]).filter(|&i| i < p.wide[d]));
        Some([i[0]?, i[1]?, i[2]?])
    }

    fn random(len: usize, rng: &mut StdRng) -> Vec<f64> {
        (0..len).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect()
    }

    /// `Xn[n,cn,o] = b[cn] + sum_{cw,a} W[cn,cw,a] Xw[n,cw, o*s + a - p]`.
    fn narrow_from_wide_direct(p: &Pairing, xw: &[f64], w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
        let (vw, vn, taps) = (voxels(p.wide), voxels(p.narrow), voxels(p.k));
        let mut out = vec![0.0; p.batch * p.c_narrow * vn];
        for n in 0..p.batch {
            for cn in 0..p.c_narrow {
                for o in points(p.narrow) {
                    let mut acc = b.map_or(0.0, |b| b[cn]);
                    for cw in 0..p.c_wide {
                        for a in points(p.k) {
                            if let Some(i) = wide_at(p, o, a) {
                                acc += w[(cn * p.c_wide + cw) * taps + flat(a, p.k)]
                                    * xw[(n * p.c_wide + cw) * vw + flat(i, p.wide)];
                            }
                        }
                    }
                    out[(n * p.c_narrow + cn) * vn + flat(o, p.narrow)] = acc;
                }
            }
        }
        out
    }

    /// `Xw[n,cw,i] = b[cw] + sum_{cn,a,o : o*s + a - p = i} W[cn,cw,a] Xn[n,cn,o]`, scattered from each (o, a).
    fn wide_from_narrow_direct(p: &Pairing, xn: &[f64], w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
        let (vw, vn, taps) = (voxels(p.wide), voxels(p.narrow), voxels(p.k));
        let mut out = vec![0.0; p.batch * p.c_wide * vw];
        for n in 0..p.batch {
            for cw in 0..p.c_wide {
                out[(n * p.c_wide + cw) * vw..][..vw].fill(b.map_or(0.0, |b| b[cw]));
                for cn in 0..p.c_narrow {
                    for o in points(p.narrow) {
                        for a in points(p.k) {
                            if let Some(i) = wide_at(p, o, a) {
                                out[(n * p.c_wide + cw) * vw + flat(i, p.wide)] += w
                                    [(cn * p.c_wide + cw) * taps + flat(a, p.k)]
                                    * xn[(n * p.c_narrow + cn) * vn + flat(o, p.narrow)];
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// `dW[cn,cw,a] = sum_{n,o} Xn[n,cn,o] Xw[n,cw, o*s + a - p]`.
    fn weight_grad_direct(p: &Pairing, xn: &[f64], xw: &[f64]) -> Vec<f64> {
        let (vw, vn, taps) = (voxels(p.wide), voxels(p.narrow), voxels(p.k));
        let mut out = vec![0.0; p.c_narrow * p.c_wide * taps];
        for cn in 0..p.c_narrow {
            for cw in 0..p.c_wide {
                for a in points(p.k) {
                    let mut acc = 0.0;
                    for n in 0..p.batch {
                        for o in points(p.narrow) {
                            if let Some(i) = wide_at(p, o, a) {
                                acc += xn[(n * p.c_narrow + cn) * vn + flat(o, p.narrow)]
                                    * xw[(n * p.c_wide + cw) * vw + flat(i, p.wide)];
                            }
                        }
                    }
                    out[(cn * p.c_wide + cw) * taps + flat(a, p.k)] = acc;
                }
            }
        }
        out
    }

    fn usize3(v: [i32; 3]) -> [usize; 3] {
        v.map(|x| usize::try_from(x).expect("a size or coordinate the product enumerates is not negative"))
    }

    /// What `conv_gemm` computes for `p` (cuda/conv.cuh): out[m, col] = b[col] + sum_k A[m, k] B[k, col], written at
    /// dst[n, col, dst_mul*r + dst_add]; counts the writes of each output element in `writes`. Panics on a weight tap
    /// or an output coordinate outside its box.
    fn conv_gemm(
        p: &ConvGemmParams<f32>,
        src: &[f64],
        w: &[f64],
        b: Option<&[f64]>,
        dst: &mut [f64],
        writes: &mut [u32],
    ) {
        let (src_size, dst_size, kernel) = (usize3(p.src_size), usize3(p.dst_size), usize3(p.kernel));
        let (vs, vd) = (voxels(src_size), voxels(dst_size));
        let (c_src, c_dst) = (p.c_src as usize, p.c_dst as usize);
        for n in 0..p.batch as usize {
            for r in points(usize3(p.rows)) {
                let r = r.map(|x| x as i32);
                let out_at = usize3([0, 1, 2].map(|d| p.dst_mul[d] * r[d] + p.dst_add[d]));
                assert!((0..3).all(|d| out_at[d] < dst_size[d]), "output {out_at:?} outside {dst_size:?}");
                for col in 0..c_dst {
                    let mut acc = 0.0;
                    for c in 0..c_src {
                        for q in points(usize3(p.taps)) {
                            let q = q.map(|x| x as i32);
                            let at = [0, 1, 2].map(|d| p.src_mul[d] * r[d] + p.src_add[d] + p.src_tap[d] * q[d]);
                            if (0..3).any(|d| at[d] < 0 || at[d] >= p.src_size[d]) {
                                continue;
                            }
                            let a = usize3([0, 1, 2].map(|d| p.tap_mul[d] * q[d] + p.tap_add[d]));
                            assert!((0..3).all(|d| a[d] < kernel[d]), "tap {a:?} outside the kernel {kernel:?}");
                            acc += src[(n * c_src + c) * vs + flat(usize3(at), src_size)]
                                * w[col * p.w_dst as usize + c * p.w_src as usize + flat(a, kernel)];
                        }
                    }
                    let e = (n * c_dst + col) * vd + flat(out_at, dst_size);
                    dst[e] = acc + b.map_or(0.0, |b| b[col]);
                    writes[e] += 1;
                }
            }
        }
    }

    /// What `conv_wgrad` and `sum_slices` compute for `p`: partial[z, cn, j] over rows j = (cw, a), reduction
    /// (n, o) in slice z, then the slices added in order.
    fn conv_wgrad(p: &ConvWgradParams<f32>, xn: &[f64], xw: &[f64]) -> Vec<f64> {
        let (narrow, wide, kernel) = (usize3(p.narrow_size), usize3(p.wide_size), usize3(p.kernel));
        let (vn, vw, taps) = (voxels(narrow), voxels(wide), voxels(kernel));
        let (c_narrow, c_wide) = (p.c_narrow as usize, p.c_wide as usize);
        let positions: Vec<(usize, [usize; 3])> =
            (0..p.batch as usize).flat_map(|n| points(narrow).map(move |o| (n, o))).collect();
        let mut dw = vec![0.0; c_narrow * c_wide * taps];
        for slice in positions.chunks(p.slice_len as usize) {
            for (cn, j) in (0..c_narrow).flat_map(|cn| (0..c_wide * taps).map(move |j| (cn, j))) {
                let (cw, a) = (j / taps, usize3(split(j % taps, p.kernel)));
                let mut acc = 0.0;
                for &(n, o) in slice {
                    let at = [0, 1, 2].map(|d| (o[d] * p.stride[d] as usize + a[d]) as i32 - p.pad[d]);
                    if (0..3).any(|d| at[d] < 0 || at[d] >= p.wide_size[d]) {
                        continue;
                    }
                    acc += xn[(n * c_narrow + cn) * vn + flat(o, narrow)]
                        * xw[(n * c_wide + cw) * vw + flat(usize3(at), wide)];
                }
                dw[cn * c_wide * taps + j] += acc;
            }
        }
        dw
    }

    fn split(i: usize, s: [i32; 3]) -> [i32; 3] {
        let s = usize3(s);
        [i / (s[1] * s[2]), i / s[2] % s[1], i % s[2]].map(|x| x as i32)
    }

    fn assert_near(got: &[f64], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (e, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-12 * (1.0 + w.abs()), "{what}: element {e} is {g}, expected {w}");
        }
    }

    /// conv shapes (odd kernels, padding k/2, strides up to 3, a stride above its kernel, depth-1 maps) and
    /// transposed-conv shapes (stride = kernel, even kernels).
    fn pairings() -> Vec<Pairing> {
        vec![
            pairing(2, 3, 2, [3, 4, 5], [3, 3, 3], [1, 1, 1]),
            pairing(1, 2, 3, [5, 4, 7], [3, 3, 3], [2, 2, 2]),
            pairing(2, 2, 2, [1, 7, 6], [1, 3, 3], [1, 2, 1]),
            pairing(1, 3, 2, [2, 5, 6], [1, 1, 1], [1, 2, 2]),
            pairing(1, 2, 2, [4, 7, 8], [3, 3, 5], [3, 3, 2]),
            pairing(1, 2, 3, [1, 9, 4], [1, 5, 3], [1, 4, 3]),
            transposed(2, 2, 3, [2, 3, 2], [2, 2, 2]),
            transposed(1, 3, 2, [1, 2, 3], [1, 2, 3]),
        ]
    }

    #[test]
    fn gemm_products_compute_the_pairing_products() {
        let mut rng = StdRng::seed_from_u64(12);
        for p in pairings() {
            let d = p.kernel_dims("test").unwrap();
            let (vw, vn, taps) = (voxels(p.wide), voxels(p.narrow), voxels(p.k));
            let xw = random(p.batch * p.c_wide * vw, &mut rng);
            let xn = random(p.batch * p.c_narrow * vn, &mut rng);
            let w = random(p.c_narrow * p.c_wide * taps, &mut rng);
            let (b_narrow, b_wide) = (random(p.c_narrow, &mut rng), random(p.c_wide, &mut rng));

            let mut got = vec![f64::NAN; xn.len()];
            let mut writes = vec![0; xn.len()];
            conv_gemm(&d.narrow_from_wide(), &xw, &w, Some(&b_narrow), &mut got, &mut writes);
            assert!(writes.iter().all(|&n| n == 1), "{p:?}: narrow_from_wide writes each output once");
            assert_near(&got, &narrow_from_wide_direct(&p, &xw, &w, Some(&b_narrow)), &format!("{p:?} narrow"));

            let mut got = vec![f64::NAN; xw.len()];
            let mut writes = vec![0; xw.len()];
            for product in d.wide_from_narrow() {
                conv_gemm(&product, &xn, &w, Some(&b_wide), &mut got, &mut writes);
            }
            assert!(writes.iter().all(|&n| n == 1), "{p:?}: the phases of wide_from_narrow write each output once");
            assert_near(&got, &wide_from_narrow_direct(&p, &xn, &w, Some(&b_wide)), &format!("{p:?} wide"));

            let want = weight_grad_direct(&p, &xn, &xw);
            for slice_len in [CONV_BK, 2 * CONV_BK, p.batch * vn] {
                let got = conv_wgrad(&d.weight_grad(slice_len as i32), &xn, &xw);
                assert_near(&got, &want, &format!("{p:?} weight gradient, slices of {slice_len}"));
            }
        }
    }

    /// What conv_pack_* and the halo product compute for `p` (cuda/conv_halo.cuh), in float64: the packed weight,
    /// then out[n, col, dst_base + dst_step . r] = b[col] + sum_{c, q} src[n, c, src_mul r + lo + q] Wp[c, q, col]
    /// (src_mul: the product's, a constant of the kernel that takes it).
    fn conv_halo(
        (pack, h): (&ConvPackParams<f32>, &ConvHaloParams<f32>),
        src_mul: [i32; 3],
        src: &[f64],
        w: &[f64],
        b: Option<&[f64]>,
        dst: &mut [f64],
    ) {
        let chunk = halo_chunk::<f32>();
        let (taps, c_pad) = (voxels(usize3(pack.taps)), pack.c_dst_pad as usize);
        let packed: Vec<f64> = (0..pack.len as usize)
            .map(|e| {
                let (parts, part_len) = (pack.parts as usize, chunk / pack.parts as usize);
                let (k_in, rest) = (e % part_len, e / part_len);
                let (col, rest) = (rest % c_pad, rest / c_pad);
                let (part, rest) = (rest % parts, rest / parts);
                let (q, c) = (rest % taps, rest / taps * chunk + part * part_len + k_in);
                if c >= pack.c_src as usize || col >= pack.c_dst as usize {
                    return 0.0;
                }
                let qd = split(q, pack.taps);
                let a = usize3([0, 1, 2].map(|d| {
                    let walked = if pack.flip[d] != 0 { pack.taps[d] - 1 - qd[d] } else { qd[d] };
                    pack.tap_mul[d] * walked + pack.tap_add[d]
                }));
                w[col * pack.w_dst as usize + c * pack.w_src as usize + flat(a, usize3(pack.kernel))]
            })
            .collect();
        let (src_size, dst_size) = (usize3(h.src_size), usize3(h.dst_size));
        let (c_src, c_dst) = (h.c_src as usize, h.c_dst as usize);
        for n in 0..h.batch as usize {
            for r in points(usize3(h.rows)) {
                let out_at = (0..3).map(|d| h.dst_step[d] * r[d] as i32).sum::<i32>() + h.dst_base;
                for col in 0..c_dst {
                    let mut acc = b.map_or(0.0, |b| b[col]);
                    for c in 0..c_src {
                        for (q, qd) in points(usize3(h.taps)).enumerate() {
                            let at = [0, 1, 2].map(|d| src_mul[d] * r[d] as i32 + h.lo[d] + qd[d] as i32);
                            if (0..3).all(|d| at[d] >= 0 && at[d] < h.src_size[d]) {
                                let wp = ((c / chunk * taps + q) * c_pad + col) * chunk + c % chunk;
                                acc +=
                                    src[(n * c_src + c) * voxels(src_size) + flat(usize3(at), src_size)] * packed[wp];
                            }
                        }
                    }
                    dst[(n * c_dst + col) * voxels(dst_size) + out_at as usize] = acc;
                }
            }
        }
    }

    /// The halo-tile kernels' parameters ([`halo_params`]) compute the products they take: the forward of every
    /// pairing (the strided ones' in boxes of 64 positions, their halo within the pair stride) and the input gradient
    /// (its taps walked backwards, the kernel flipped by the packing; a strided pairing's stride phases writing every
    /// stride-th position), in every tile width and box size a product may take; and so do a strided input
    /// gradient's one-tap phases, which only the implicit products take, from the same parameters.
    #[test]
    fn halo_products_compute_the_pairing_products_they_take() {
        let mut rng = StdRng::seed_from_u64(13);
        let pairings = [
            pairing(2, 19, 21, [3, 4, 5], [3, 3, 3], [1, 1, 1]),
            pairing(1, 9, 40, [1, 7, 6], [1, 3, 3], [1, 1, 1]),
            pairing(1, 10, 3, [4, 1, 9], [3, 1, 3], [1, 1, 1]),
            pairing(2, 7, 18, [3, 9, 10], [3, 3, 3], [1, 2, 2]),
            pairing(1, 5, 17, [3, 4, 5], [1, 3, 3], [1, 2, 2]),
            pairing(1, 6, 11, [5, 6, 7], [3, 3, 3], [2, 2, 2]),
            pairing(1, 4, 9, [1, 37, 70], [1, 3, 3], [1, 2, 2]),
        ];
        for p in pairings {
            let d = p.kernel_dims("test").unwrap();
            let (vw, vn, taps) = (voxels(p.wide), voxels(p.narrow), voxels(p.k));
            let xw = random(p.batch * p.c_wide * vw, &mut rng);
            let xn = random(p.batch * p.c_narrow * vn, &mut rng);
            let w = random(p.c_narrow * p.c_wide * taps, &mut rng);
            let b = random(p.c_narrow.max(p.c_wide), &mut rng);
            let forward = d.narrow_from_wide::<f32>();
            let wide_forward = ConvGemmParams { c_src: HALO_STRIDED_MIN_CHANNELS as i32, ..forward };
            assert!(halo_suits(&wide_forward), "{p:?}: forward");
            if p.stride != [1; 3] && taps > HALO_STRIDED_FEW_TAPS {
                assert!(!halo_suits(&ConvGemmParams { c_src: 127, ..forward }), "{p:?}: few channels, many taps");
            }
            assert_eq!(halo_strided(&forward), p.stride != [1; 3], "{p:?}: forward at a stride");
            let roles = [
                (d.wide_from_narrow(), &xn, wide_from_narrow_direct(&p, &xn, &w, Some(&b[..p.c_wide]))),
                (vec![forward], &xw, narrow_from_wide_direct(&p, &xw, &w, Some(&b[..p.c_narrow]))),
            ];
            for (products, src, want) in &roles {
                let shapes = if products.iter().any(halo_strided) {
                    vec![(CONV_HALO_BN, CONV_HALO_BM_STRIDED)]
                } else {
                    vec![
                        (CONV_HALO_BN_NARROW, CONV_HALO_BM),
                        (CONV_HALO_BN, CONV_HALO_BM),
                        (CONV_HALO_BN, CONV_HALO_BM_LARGE),
                    ]
                };
                for (tile_n, positions) in shapes {
                    let mut got = vec![f64::NAN; want.len()];
                    for product in products {
                        // A phase of one tap (kernel 3, stride 2: the odd positions' phase) is not the halo tiles':
                        // the implicit products take it (into more than 32 channels) from the same parameters
                        // (launch_implicit), whose formula is conv_halo's over a channels-last source.
                        let many = ConvGemmParams { c_src: HALO_STRIDED_MIN_CHANNELS as i32, ..*product };
                        if !halo_suits(&many) {
                            assert_eq!(product.taps.iter().product::<i32>(), 1, "{p:?}: {product:?}");
                            let (batch, c_dst) = (IMPLICIT_MIN_POSITIONS as i32, 2 * CONV_WGMMA_BN_NARROW as i32);
                            assert!(implicit_suits(&ConvGemmParams { batch, c_dst, ..many }), "{p:?}: {product:?}");
                        }
                        let (pack, h, boxes) = halo_params(product, tile_n, positions);
                        let box_rows = positions as i32 / h.tile_x;
                        assert!(
                            boxes as i32
                                == h.batch
                                    * h.rows[0]
                                    * ((h.rows[1] + box_rows - 1) / box_rows)
                                    * ((h.rows[2] + h.tile_x - 1) / h.tile_x)
                                && h.tile_x * box_rows == positions as i32,
                            "{p:?}: whole boxes of {positions} positions cover the rows"
                        );
                        if halo_strided(product) {
                            // The phase-split halo (cuda/conv_halo.cu) of the largest kernel fits the pair stride.
                            let extent = |tile: i32| 2 * (tile + (CONV_HALO_MAX_TAPS as i32 - 1) / 2);
                            let halo = CONV_HALO_MAX_TAPS as i32 * extent(box_rows) * extent(h.tile_x);
                            assert!(halo as usize <= CONV_HALO_PAIR_STRIDE_LARGE, "{p:?}: tile_x {}", h.tile_x);
                        }
                        conv_halo((&pack, &h), product.src_mul, src, &w, Some(&b[..product.c_dst as usize]), &mut got);
                    }
                    assert_near(&got, want, &format!("{p:?} halo, {tile_n} columns, boxes of {positions}"));
                }
            }
        }
        // The strided forward's kernels: z stride 1 or 2.
        for (stride, name) in [([1, 2, 2], "_s64"), ([2, 2, 2], "_s64z2")] {
            let d = pairing(1, 16, 64, [6, 20, 20], [3, 3, 3], stride).kernel_dims("test").unwrap();
            let (kernel, tile_n, positions, pair_stride) = bf16::HALO[0].for_product(&d.narrow_from_wide::<bf16>());
            assert!(kernel.name().ends_with(name), "{stride:?}: {}", kernel.name());
            assert_eq!(
                (tile_n, positions, pair_stride),
                (CONV_HALO_BN, CONV_HALO_BM_STRIDED, CONV_HALO_PAIR_STRIDE_LARGE)
            );
        }
        let one_tap = pairing(1, 16, 16, [5, 4, 7], [1, 1, 1], [1, 1, 1]).kernel_dims("test").unwrap();
        assert!(!halo_suits(&one_tap.narrow_from_wide::<f32>()), "a 1x1x1 product is conv_tc.cu's");
    }

    /// The wide-tile halo products take boxes of 256 positions exactly where those cover at most 15% more positions
    /// than boxes of 128 (the shapes measured on the H200), and the narrow tiles always boxes of 128.
    #[test]
    fn halo_products_take_large_boxes_where_they_cover_little_more() {
        let chosen = |batch, c, rows: [usize; 3], k| {
            let d = pairing(batch, c, c, rows, k, [1, 1, 1]).kernel_dims("test").unwrap();
            let (kernel, tile_n, positions, stride) = bf16::HALO[0].for_product(&d.narrow_from_wide::<bf16>());
            let large = kernel.name().ends_with("_m256");
            assert_eq!(large, positions == CONV_HALO_BM_LARGE && stride == CONV_HALO_PAIR_STRIDE_LARGE);
            (large, tile_n)
        };
        for (batch, rows, k, large) in [
            (2, [40, 112, 96], [3, 3, 3], true),
            (2, [10, 28, 24], [3, 3, 3], true),
            (2, [10, 14, 12], [3, 3, 3], true),
            (12, [1, 10, 10], [1, 3, 3], true),
            (12, [1, 20, 20], [1, 3, 3], false),
            (2, [10, 7, 6], [3, 3, 3], false),
            (12, [1, 5, 5], [1, 3, 3], false),
        ] {
            assert_eq!(chosen(batch, 64, rows, k), (large, CONV_HALO_BN), "{rows:?}");
        }
        assert_eq!(chosen(2, 32, [40, 224, 192], [1, 3, 3]), (false, CONV_HALO_BN_NARROW), "32 columns");
    }

    /// The wgmma kernels' boxes ([`wgmma_box_z`], cuda/conv_wgmma.cu): every output position in exactly one box's
    /// tile row, and the halo voxel that the tile's operand descriptor reads for row m and tap q (((z + qz) h_y + 8
    /// (tile's row group) + m / 8 + qy) h_x + m % 8 + qx) is inside the staged halo, at most
    /// [`CONV_WGMMA_MAX_HALO`] voxels, and holds the source position the product needs (output + lo + q).
    #[test]
    fn wgmma_boxes_cover_every_output_once_within_their_halo() {
        for (rows, taps) in [
            ([40, 112, 96], [3, 3, 3]),
            ([10, 14, 12], [3, 3, 3]),
            ([5, 9, 37], [3, 3, 3]),
            ([1, 20, 20], [1, 3, 3]),
            ([3, 70, 13], [1, 3, 3]),
            ([4, 3, 70], [3, 1, 3]),
            ([7, 5, 11], [2, 2, 1]),
        ] {
            let box_z = wgmma_box_z(rows, taps);
            let b = wgmma_box(box_z);
            let h = [0, 1, 2].map(|d| b[d] + taps[d] as usize - 1);
            assert!(h.iter().product::<usize>() <= CONV_WGMMA_MAX_HALO, "{rows:?} {taps:?}: halo {h:?}");
            let rows = usize3(rows);
            let tiles = [0, 1, 2].map(|d| rows[d].div_ceil(b[d]));
            let mut seen = vec![0; voxels(rows)];
            for boxed in 0..voxels(tiles) {
                let t = [boxed / tiles[2] / tiles[1], boxed / tiles[2] % tiles[1], boxed % tiles[2]];
                let origin = [0, 1, 2].map(|d| t[d] * b[d]);
                for tile in 0..CONV_WGMMA_TILES {
                    let (tz, ty) = (tile / (CONV_WGMMA_TILES / box_z), tile % (CONV_WGMMA_TILES / box_z));
                    for m in 0..64 {
                        let o = [origin[0] + tz, origin[1] + 8 * ty + m / 8, origin[2] + m % 8];
                        if (0..3).any(|d| o[d] >= rows[d]) {
                            continue;
                        }
                        seen[flat(o, rows)] += 1;
                        for q in points(usize3(taps)) {
                            let v = ((tz + q[0]) * h[1] + 8 * ty + m / 8 + q[1]) * h[2] + m % 8 + q[2];
                            assert!(v < voxels(h), "{rows:?} {taps:?}: voxel {v} of {h:?}");
                            // The staged voxel v holds source position origin + lo + (v's place in the halo).
                            let staged = [v / (h[1] * h[2]), v / h[2] % h[1], v % h[2]];
                            assert_eq!([0, 1, 2].map(|d| origin[d] + staged[d]), [0, 1, 2].map(|d| o[d] + q[d]));
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{rows:?} {taps:?}: every position once");
        }
    }

    /// Every kernel and map the wgmma weight gradient and the fixed-geometry products take find their kernel: the box
    /// depth [`wgmma_box_z`] picks for a 3x3x3 or 1x3x3 kernel is one of [`WGMMA_GEOMETRIES`].
    #[test]
    fn wgmma_box_depths_have_fixed_geometry_kernels() {
        for k in [[3, 3, 3], [1, 3, 3]] {
            for rows in
                [[40, 224, 192], [40, 112, 96], [10, 14, 12], [10, 7, 6], [1, 320, 320], [1, 10, 10], [5, 9, 37]]
            {
                let box_z = wgmma_box_z(rows, k);
                assert!(WGMMA_GEOMETRIES.contains(&(k, box_z)), "{k:?} over {rows:?}: boxes of {box_z} slices");
            }
        }
    }

    /// The quad staging of cuda/conv_wgmma.cu (store_quads): item it of a halo of `rows` rows is (plane it / (4 rows),
    /// row it / 4 % rows, quad it % 4), whose 4 voxels from x0 - 4 + 4 quad are kept in columns 0 .. 9 (x0 - 1 ..
    /// x0 + 8): every voxel of both planes once, holding source column x0 - 1 + column.
    #[test]
    fn wgmma_quads_stage_every_halo_voxel_once() {
        const HX: usize = CONV_WGMMA_TILE_X + 2;
        for rows in [10, 34, 36, 40, 60, 72] {
            let mut seen = vec![0; 2 * rows * HX];
            for it in 0..8 * rows {
                let (plane, row, quad) = (it / (4 * rows), it / 4 % rows, it % 4);
                for k in 0..4 {
                    // Source column x0 - 4 + 4 quad + k is halo column 4 quad + k - 3.
                    let Some(column) = (4 * quad + k).checked_sub(3).filter(|&c| c < HX) else { continue };
                    seen[(plane * rows + row) * HX + column] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{rows} rows: every voxel once");
        }
    }

    /// What conv_wgrad_halo and sum_slices compute for `h` (cuda/conv_halo.cuh), in float64: per slice, its run of
    /// boxes (1 x (CONV_HALO_BM / tile_x) x tile_x narrow positions, enumerated over batch x narrow), every position of
    /// a box inside the narrow map adding narrow[n, cn, o] wide[n, cw, o + a - pad]; then the slices in order.
    fn conv_wgrad_halo(h: &ConvWgradHaloParams<f32>, slices: usize, xn: &[f64], xw: &[f64]) -> Vec<f64> {
        let (narrow, wide, kernel) = (usize3(h.narrow_size), usize3(h.wide_size), usize3(h.kernel));
        let (c_narrow, c_wide, taps) = (h.c_narrow as usize, h.c_wide as usize, voxels(kernel));
        let (tile_x, boxes, per) = (h.tile_x as usize, h.boxes as usize, h.boxes_per_slice as usize);
        let tile_y = CONV_HALO_BM / tile_x;
        let (x_tiles, y_tiles) = (narrow[2].div_ceil(tile_x), narrow[1].div_ceil(tile_y));
        let mut dw = vec![0.0; c_narrow * c_wide * taps];
        for z in 0..slices {
            let mut partial = vec![0.0; dw.len()];
            for b in z * per..boxes.min((z + 1) * per) {
                let (x0, y0) = (b % x_tiles * tile_x, b / x_tiles % y_tiles * tile_y);
                let (d0, n) = (b / x_tiles / y_tiles % narrow[0], b / x_tiles / y_tiles / narrow[0]);
                for o in (0..CONV_HALO_BM).map(|m| [d0, y0 + m / tile_x, x0 + m % tile_x]) {
                    if o[1] >= narrow[1] || o[2] >= narrow[2] {
                        continue;
                    }
                    for (j, a) in points(kernel).enumerate() {
                        let at = [0, 1, 2].map(|d| (o[d] + a[d]) as i32 - h.pad[d]);
                        if (0..3).any(|d| at[d] < 0 || at[d] >= h.wide_size[d]) {
                            continue;
                        }
                        for (cn, cw) in (0..c_narrow).flat_map(|cn| (0..c_wide).map(move |cw| (cn, cw))) {
                            partial[cn * c_wide * taps + cw * taps + j] += xn
                                [(n * c_narrow + cn) * voxels(narrow) + flat(o, narrow)]
                                * xw[(n * c_wide + cw) * voxels(wide) + flat(usize3(at), wide)];
                        }
                    }
                }
            }
            dw.iter_mut().zip(partial).for_each(|(d, p)| *d += p);
        }
        dw
    }

    /// The explicit weight gradient takes the shapes it was measured faster on (1x1x1 kernels, the deep 320- and
    /// 512-channel maps, the one-channel stems, the transposed convs) and leaves the rest to the implicit kernels; the
    /// GPU tests' shapes (tests/gpu_conv.rs) fall on the side their names say.
    #[test]
    fn explicit_weight_gradient_takes_the_shapes_it_pays_on() {
        let one = [1, 1, 1];
        let cases = [
            ("flare-3d stage 4", pairing(2, 320, 320, [10, 14, 12], [3, 3, 3], one), true),
            ("flare-3d stage 3", pairing(2, 256, 256, [10, 28, 24], [3, 3, 3], one), false),
            ("flare-3d stem", pairing(2, 1, 32, [40, 224, 192], [1, 3, 3], one), true),
            ("flare-3d stage 0", pairing(2, 32, 32, [40, 224, 192], [1, 3, 3], one), false),
            ("flare-3d segmentation head", pairing(2, 32, 14, [40, 224, 192], one, one), true),
            ("amos-2d stage 4", pairing(12, 512, 512, [1, 20, 20], [1, 3, 3], one), true),
            ("amos-2d stage 5: 100 positions, rows of 104", pairing(12, 512, 512, [1, 10, 10], [1, 3, 3], one), true),
            ("flare-3d stage 4 entry, strided", pairing(2, 256, 320, [10, 28, 24], [3, 3, 3], [1, 2, 2]), true),
            ("flare-3d stage 3 entry, strided", pairing(2, 128, 256, [20, 56, 48], [3, 3, 3], [2, 2, 2]), true),
            (
                "flare-3d stage 1 entry: 1.5 GB of columns",
                pairing(2, 32, 64, [40, 224, 192], [3, 3, 3], [1, 2, 2]),
                false,
            ),
            (
                "amos-2d stage 1 entry: 32 wide channels",
                pairing(12, 32, 64, [1, 320, 320], [1, 3, 3], [1, 2, 2]),
                false,
            ),
            ("gpu_conv3d_k333 strided 64 -> 24", pairing(2, 64, 24, [8, 16, 32], [3, 3, 3], [2, 2, 2]), true),
            ("1x1x1 strided", pairing(2, 64, 32, [10, 28, 24], one, [1, 2, 2]), false),
            ("gpu_conv_wgrad_gemm strided", pairing(2, 21, 320, [5, 12, 16], [3, 3, 3], [1, 2, 2]), true),
            ("transposed: the columns are g rearranged", transposed(2, 320, 320, [10, 14, 12], [2, 2, 2]), true),
            (
                "transposed, 25 positions: its columns feed dx too",
                transposed(12, 512, 512, [1, 5, 5], [1, 2, 2]),
                false,
            ),
            ("gpu_conv_wgrad_gemm 3x3x3", pairing(2, 37, 330, [4, 6, 10], [3, 3, 3], one), true),
            ("gpu_conv_wgrad_gemm 1x1x1", pairing(2, 20, 9, [3, 6, 44], one, one), true),
            ("gpu_conv_wgrad_gemm 2D", pairing(3, 24, 320, [1, 18, 12], [1, 3, 3], one), true),
            ("gpu_conv_wgrad_wgmma 3x3x3", pairing(1, 24, 70, [5, 20, 96], [3, 3, 3], one), false),
            ("gpu_conv_wgrad_wgmma 1x3x3", pairing(2, 40, 33, [3, 26, 64], [1, 3, 3], one), false),
            ("gpu_conv_wgrad_wgmma 2D", pairing(1, 17, 66, [1, 90, 96], [1, 3, 3], one), false),
        ];
        for (name, p, want) in cases {
            assert_eq!(p.gemm_wgrad_suits(), want, "{name}: {p:?}");
        }
    }

    /// The TMA product's launches compute the conv (cuda/conv_tma.cuh's formula, evaluated here in float64): the
    /// forward and the input gradient of stride-1, strided and mixed-stride 3D and 2D convs over odd sizes match the
    /// direct sums, every output position is written by exactly one launch (a stride phase without taps, as of a
    /// 1x3x3 kernel at stride 2 along z, by a launch of no columns: zeros), every tap is packed once, and the columns
    /// run from 3 taps down (the kernel's order).
    #[test]
    fn tma_launches_compute_the_conv() {
        let mut rng = StdRng::seed_from_u64(31);
        let cases = [
            pairing(1, 2, 3, [3, 5, 6], [3, 3, 3], [1, 1, 1]),
            pairing(1, 2, 3, [5, 7, 9], [3, 3, 3], [2, 2, 2]),
            pairing(2, 3, 2, [4, 8, 7], [3, 3, 3], [1, 2, 2]),
            pairing(1, 2, 2, [1, 9, 8], [1, 3, 3], [1, 2, 2]),
            pairing(1, 2, 2, [3, 6, 7], [1, 3, 3], [2, 2, 1]),
        ];
        for p in cases {
            let (vw, vn, taps) = (voxels(p.wide), voxels(p.narrow), voxels(p.k));
            let xw = random(p.batch * p.c_wide * vw, &mut rng);
            let xn = random(p.batch * p.c_narrow * vn, &mut rng);
            let w = random(p.c_narrow * p.c_wide * taps, &mut rng);
            let at = |size: [usize; 3], pos: [i64; 3]| -> Option<usize> {
                let inside = (0..3).all(|d| pos[d] >= 0 && (pos[d] as usize) < size[d]);
                inside.then(|| (pos[0] as usize * size[1] + pos[1] as usize) * size[2] + pos[2] as usize)
            };
            let tap_pos = |t: usize| [t / (p.k[1] * p.k[2]), t / p.k[2] % p.k[1], t % p.k[2]];
            // Direct sums: y = conv(x), dx = conv's input gradient of g = xn.
            let mut y = vec![0.0; xn.len()];
            let mut dx = vec![0.0; xw.len()];
            for n in 0..p.batch {
                for o in 0..vn {
                    let oc = [o / (p.narrow[1] * p.narrow[2]), o / p.narrow[2] % p.narrow[1], o % p.narrow[2]];
                    for t in 0..taps {
                        let a = tap_pos(t);
                        let src = [0, 1, 2].map(|d| (oc[d] * p.stride[d] + a[d]) as i64 - p.pad[d] as i64);
                        let Some(i) = at(p.wide, src) else { continue };
                        for cn in 0..p.c_narrow {
                            for cw in 0..p.c_wide {
                                let wv = w[(cn * p.c_wide + cw) * taps + t];
                                y[(n * p.c_narrow + cn) * vn + o] += wv * xw[(n * p.c_wide + cw) * vw + i];
                                dx[(n * p.c_wide + cw) * vw + i] += wv * xn[(n * p.c_narrow + cn) * vn + o];
                            }
                        }
                    }
                }
            }
            for (which, src, want) in [(Product::NarrowFromWide, &xw, &y), (Product::WideFromNarrow, &xn, &dx)] {
                let ((c_src, src_size), (c_out, out_size)) = (p.source(which), p.output(which));
                let (vs, vo) = (voxels(src_size), voxels(out_size));
                let launches = p.tma_launches(which);
                let mut packed: Vec<usize> =
                    launches.iter().flat_map(|l| l.columns.iter().flat_map(|c| c.taps.clone())).collect();
                packed.sort();
                assert_eq!(packed, (0..taps).collect::<Vec<_>>(), "{p:?} {which:?}: each tap packed once");
                let mut got = vec![0.0; want.len()];
                let mut writes = vec![0; want.len()];
                for l in &launches {
                    let runs: Vec<usize> = l.columns.iter().map(|c| c.taps.len()).collect();
                    let ordered = runs.windows(2).all(|r| r[0] >= r[1]) && runs.iter().all(|&r| r <= 3);
                    assert!(ordered, "{p:?} {which:?}: runs {runs:?}");
                    for n in 0..p.batch {
                        for o in 0..voxels(l.grid) {
                            let oc = [o / (l.grid[1] * l.grid[2]), o / l.grid[2] % l.grid[1], o % l.grid[2]];
                            let dst = at(out_size, [0, 1, 2].map(|d| (l.step[d] * oc[d] + l.phase[d]) as i64)).unwrap();
                            for m in 0..c_out {
                                let mut sum = 0.0;
                                for c in &l.columns {
                                    for (i, &t) in c.taps.iter().enumerate() {
                                        // The source box's rows along y step by the map's step, src_mul[1].
                                        let pos = [0, 1, 2].map(|d| {
                                            let row = if d == 1 { (i * l.src_mul[1]) as i64 } else { 0 };
                                            (l.src_mul[d] * oc[d]) as i64 + c.offset[d] as i64 + row
                                        });
                                        let Some(si) = at(src_size, pos) else { continue };
                                        for k in 0..c_src {
                                            let wv = match which {
                                                Product::NarrowFromWide => w[(m * p.c_wide + k) * taps + t],
                                                Product::WideFromNarrow => w[(k * p.c_wide + m) * taps + t],
                                            };
                                            sum += wv * src[(n * c_src + k) * vs + si];
                                        }
                                    }
                                }
                                got[(n * c_out + m) * vo + dst] += sum;
                                writes[(n * c_out + m) * vo + dst] += 1;
                            }
                        }
                    }
                }
                assert!(writes.iter().all(|&k| k == 1), "{p:?} {which:?}: every output written once");
                let worst = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(worst < 1e-12, "{p:?} {which:?}: off by {worst}");
            }
        }
    }

    /// The TMA weight gradient takes the stride-1 3x3 convs it was measured faster on, in blocks of 64 narrow channels
    /// where there are no more, and the TMA product the forwards and input gradients it was faster on; its boxes
    /// cover a map in the fewest k-blocks and its slices fill the GPU's waves; the GPU tests' shapes
    /// (tests/gpu_conv.rs) fall on the side their names say.
    #[test]
    fn tma_kernels_take_the_shapes_they_pay_on() {
        let (one, k333, k133) = ([1, 1, 1], [3, 3, 3], [1, 3, 3]);
        let cases = [
            ("flare-3d stage 3", pairing(2, 256, 256, [10, 28, 24], k333, one), Some(128)),
            ("flare-3d decoder stage 2", pairing(2, 256, 128, [20, 56, 48], k333, one), Some(128)),
            ("flare-3d stage 1: 3x3x3 into 64", pairing(2, 64, 64, [40, 112, 96], k333, one), Some(64)),
            ("flare-3d decoder stage 3: 3x3x3 into 64", pairing(2, 128, 64, [40, 112, 96], k333, one), Some(64)),
            ("flare-3d stage 0: 32 channels", pairing(2, 32, 32, [40, 224, 192], k133, one), None),
            ("amos-2d stage 1: 64 rows", pairing(12, 64, 64, [1, 160, 160], k133, one), Some(64)),
            ("amos-2d stage 4", pairing(12, 512, 512, [1, 20, 20], k133, one), Some(128)),
            ("flare-3d stage 3 entry, strided", pairing(2, 128, 256, [20, 56, 48], k333, [2, 2, 2]), Some(128)),
            ("flare-3d stage 4 entry, strided", pairing(2, 256, 320, [10, 28, 24], k333, [1, 2, 2]), Some(128)),
            ("flare-3d stage 1 entry: 32 wide, 64 rows", pairing(2, 32, 64, [40, 224, 192], k333, [1, 2, 2]), Some(64)),
            ("amos-2d stage 1 entry: 32 wide", pairing(12, 32, 64, [1, 320, 320], k133, [1, 2, 2]), Some(64)),
            ("strided 16 wide", pairing(2, 16, 64, [4, 16, 16], k333, [2, 2, 2]), None),
            ("strided into 32", pairing(2, 64, 32, [4, 16, 16], k333, [2, 2, 2]), None),
            ("gpu_conv_tma strided 40 -> 64", pairing(1, 40, 64, [3, 10, 12], k333, [1, 2, 2]), Some(64)),
            ("gpu_conv_tma strided 2D 32 -> 64", pairing(2, 32, 64, [1, 18, 37], k133, [1, 2, 2]), Some(64)),
            ("amos-2d stage 2 entry, strided", pairing(12, 64, 128, [1, 160, 160], k133, [1, 2, 2]), Some(128)),
            ("stride 3", pairing(2, 128, 256, [20, 56, 48], k333, [1, 3, 3]), None),
            ("gpu_conv_tma strided 3x3x3", pairing(2, 72, 136, [5, 13, 21], k333, [2, 2, 2]), Some(128)),
            ("gpu_conv_tma strided (1, 2, 2)", pairing(1, 64, 130, [3, 10, 12], k333, [1, 2, 2]), Some(128)),
            ("gpu_conv_tma strided 2D, 64 rows", pairing(2, 64, 64, [1, 18, 37], k133, [1, 2, 2]), Some(64)),
            ("transposed", transposed(2, 320, 320, [10, 14, 12], [2, 2, 2]), None),
            ("1x1x1", pairing(2, 256, 128, [10, 28, 24], one, one), None),
            ("gpu_conv_tma 3x3x3", pairing(2, 65, 67, [3, 6, 10], k333, one), Some(128)),
            ("gpu_conv_tma 1x3x3", pairing(1, 64, 130, [2, 9, 20], k133, one), Some(128)),
            ("gpu_conv_tma 2D, 64 rows", pairing(2, 96, 64, [1, 40, 48], k133, one), Some(64)),
            ("gpu_conv_wgrad_gemm 3x3x3 48 -> 320", pairing(2, 48, 320, [4, 6, 10], k333, one), None),
            ("gpu_conv_wgrad_wgmma 3x3x3", pairing(1, 24, 70, [5, 20, 96], k333, one), None),
        ];
        for (name, p, want) in cases {
            assert_eq!(p.tma_wgrad_rows(), want, "{name}: {p:?}");
        }
        // (forward, input gradient): output channels per block.
        let m128 = [Some(128), Some(128)];
        let products = [
            ("flare-3d stage 3", pairing(2, 256, 256, [10, 28, 24], k333, one), m128),
            ("flare-3d stage 5: 420 positions", pairing(2, 320, 320, [10, 7, 6], k333, one), m128),
            ("flare-3d stage 1: 64 channels", pairing(2, 64, 64, [40, 112, 96], k333, one), [None, None]),
            ("flare-3d decoder stage 3: into 64", pairing(2, 128, 64, [40, 112, 96], k333, one), [Some(64), None]),
            ("flare-3d decoder stage 4: into 32", pairing(2, 64, 32, [40, 224, 192], k133, one), [None, None]),
            ("amos-2d stage 5: 100 positions", pairing(12, 512, 512, [1, 10, 10], k133, one), m128),
            ("amos-2d stage 6: 25 positions", pairing(12, 512, 512, [1, 5, 5], k133, one), [None, None]),
            ("flare-3d stage 3 entry, strided", pairing(2, 128, 256, [20, 56, 48], k333, [2, 2, 2]), m128),
            ("flare-3d stage 2 entry", pairing(2, 64, 128, [40, 112, 96], k333, [2, 2, 2]), [Some(128), Some(64)]),
            ("flare-3d stage 1 entry", pairing(2, 32, 64, [40, 224, 192], k333, [1, 2, 2]), [Some(64), Some(32)]),
            ("amos-2d stage 1 entry", pairing(12, 32, 64, [1, 320, 320], k133, [1, 2, 2]), [Some(64), Some(32)]),
            ("strided 16 -> 64", pairing(2, 16, 64, [4, 16, 16], k333, [2, 2, 2]), [None, None]),
            (
                "1x3x3 of stride 2 along z: phases without taps",
                pairing(2, 128, 128, [4, 16, 16], k133, [2, 2, 2]),
                [Some(128), None],
            ),
            ("stride 3", pairing(2, 128, 128, [9, 9, 9], k333, [3, 3, 3]), [None, None]),
            ("gpu_conv_tma strided 136 -> 130", pairing(2, 136, 130, [5, 13, 21], k333, [2, 2, 2]), m128),
            ("gpu_conv_tma strided 2D 128 -> 40", pairing(2, 128, 40, [1, 30, 37], k133, [1, 2, 2]), [Some(64), None]),
            ("gpu_conv_tma strided 2D 40 -> 128", pairing(2, 40, 128, [1, 30, 37], k133, [1, 2, 2]), [None, Some(64)]),
            ("gpu_conv_tma 3x3x3 130 -> 136", pairing(2, 130, 136, [3, 6, 10], k333, one), m128),
            ("gpu_conv_tma 2D 128 -> 128", pairing(1, 128, 128, [1, 9, 20], k133, one), m128),
            ("gpu_conv_tma 3x3x3 136 -> 40", pairing(2, 136, 40, [3, 6, 20], k333, one), [Some(64), None]),
            ("gpu_conv_tma 3x3x3 40 -> 136", pairing(2, 40, 136, [3, 6, 20], k333, one), [None, Some(64)]),
            ("gpu_conv_tma 3x3x3 32 -> 72", pairing(2, 32, 72, [3, 6, 20], k333, one), [None, Some(32)]),
            ("64 -> 32: no forward into 32", pairing(2, 64, 32, [3, 6, 20], k333, one), [None, None]),
            ("3x3x3 72 -> 40: 72 sources", pairing(2, 72, 40, [3, 6, 20], k333, one), [None, None]),
            ("gpu_conv_explicit_products 5x7", pairing(2, 512, 520, [1, 5, 7], k133, one), [None, None]),
            (
                "2 x 96x256x256: 98304 boxes, walked by one block per SM",
                pairing(2, 128, 128, [96, 256, 256], k333, one),
                m128,
            ),
        ];
        for (name, p, want) in products {
            let got = [Product::NarrowFromWide, Product::WideFromNarrow].map(|which| p.tma_product_rows(which));
            assert_eq!(got, want, "{name}: {p:?}");
        }
        // The weight gradient's: 10 x 6 in 16 x 4 boxes (2 k-blocks, as 8 x 8); 24 x 28 in 8 x 8 (12); 12 x 14 in 16 x
        // 4 (4, as 8 x 8).
        assert_eq!(
            [10, 6, 24, 28, 12, 14].chunks(2).map(|s| tma_box(s[0], s[1], 64, 64)).collect::<Vec<_>>(),
            [(16, 4), (8, 8), (16, 4)]
        );
        // The products' boxes: flare-3d 48 x 56 in 16 x 8 (21 boxes, 24 as 8 x 16, 28 as 32 x 4), 24 x 28 in 8 x 16 (6,
        // 8 as 16 x 8), 12 x 14 in 16 x 8 (2, 4 as 32 x 4); amos-2d 80 x 80 in 16 x 8 (50 as 8 x 16 too), 20 x 20 in 32
        // x 4 (5, 6 as 16 x 8).
        assert_eq!(
            [48, 56, 24, 28, 12, 14, 80, 80, 20, 20]
                .chunks(2)
                .map(|s| tma_box(s[0], s[1], CONV_TMA_PRODUCT_POSITIONS, CONV_TMA_PRODUCT_BOX_X_MAX))
                .collect::<Vec<_>>(),
            [(16, 8), (8, 16), (16, 8), (16, 8), (32, 4)]
        );
        // flare-3d stage 3: 72 tiles, 240 k-blocks: 11 slices of 22 fill 6 waves of 132; stage 5's 20 k-blocks
        // are one slice.
        assert_eq!(tma_slices(72, 240, 132), (22, 11));
        assert_eq!(tma_slices(135, 20, 132), (20, 1));
    }

    /// The explicit forward and input gradient take the shapes they were measured faster on (512 and more source
    /// channels on small 2D maps) and leave the rest to the implicit kernels; the GPU test's shapes
    /// (tests/gpu_conv.rs) take them.
    #[test]
    fn explicit_product_takes_the_shapes_it_pays_on() {
        let one = [1, 1, 1];
        let k33 = [1, 3, 3];
        let both = |p: &Pairing| [Product::NarrowFromWide, Product::WideFromNarrow].map(|r| p.explicit_suits(r));
        let cases = [
            ("amos-2d stage 4", pairing(12, 512, 512, [1, 20, 20], k33, one), [true, true]),
            ("amos-2d stage 5", pairing(12, 512, 512, [1, 10, 10], k33, one), [true, true]),
            ("amos-2d decoder 1024 -> 512", pairing(12, 1024, 512, [1, 20, 20], k33, one), [true, true]),
            ("amos-2d decoder 512 -> 256 at 40x40", pairing(12, 512, 256, [1, 40, 40], k33, one), [false, false]),
            ("amos-2d stage 3", pairing(12, 256, 256, [1, 40, 40], k33, one), [false, false]),
            ("flare-3d stage 4", pairing(2, 320, 320, [10, 14, 12], [3, 3, 3], one), [false, false]),
            ("amos-2d stage 5 entry, strided", pairing(12, 512, 512, [1, 20, 20], k33, [1, 2, 2]), [false, false]),
            ("1x1 of 1024 channels", pairing(12, 1024, 512, [1, 20, 20], one, one), [false, false]),
            ("transposed", transposed(12, 1024, 512, [1, 10, 10], [1, 2, 2]), [false, false]),
            ("gpu_conv_explicit_products 2D", pairing(2, 512, 520, [1, 5, 7], k33, one), [true, true]),
            ("gpu_conv_explicit_products 3D", pairing(3, 512, 8, [2, 3, 4], [3, 3, 3], one), [true, false]),
        ];
        for (name, p, want) in cases {
            assert_eq!(both(&p), want, "{name}: {p:?}");
        }
    }

    /// The explicit products split their reduction where their tiles leave SMs idle (the deep 2D stages: amos-2d's
    /// 512 channels at 20x20 in 76 tiles of 128 x 256, at 10x10 in 40 of 128 x 128, at 5x5 in 12), never below
    /// [`EXPLICIT_MIN_SLICE_STEPS`] k-steps a slice, and not where the tiles fill two waves.
    #[test]
    fn explicit_products_split_where_sms_would_idle() {
        assert_eq!(explicit_slices(132, 76, 72), 3);
        assert_eq!(explicit_slices(132, 40, 72), 6);
        assert_eq!(explicit_slices(132, 12, 72), 9);
        assert_eq!(explicit_slices(132, 300, 72), 1);
        assert_eq!(explicit_slices(132, 5, 7), 1);
        for (blocks, steps) in [(1, 72), (12, 144), (40, 9), (76, 200)] {
            let (per_slice, slices) = split_reduction(steps, explicit_slices(132, blocks, steps));
            assert!(per_slice >= EXPLICIT_MIN_SLICE_STEPS.min(steps) && per_slice * slices >= steps);
            assert!(blocks * slices <= 2 * 132 || slices == 1, "{blocks} tiles, {slices} slices");
        }
    }

    /// The halo weight gradient's boxes and slices ([`KernelDims::weight_grad_halo`]) cover every narrow position
    /// once: its sum equals the pairing's weight gradient on maps that no box divides, in one slice and in several.
    #[test]
    fn halo_weight_gradient_covers_every_position_once() {
        let mut rng = StdRng::seed_from_u64(14);
        for p in [
            pairing(2, 3, 2, [3, 9, 37], [3, 3, 3], [1, 1, 1]),
            pairing(1, 2, 3, [1, 20, 12], [1, 3, 3], [1, 1, 1]),
            pairing(3, 2, 2, [2, 3, 6], [3, 1, 3], [1, 1, 1]),
        ] {
            let d = p.kernel_dims("test").unwrap();
            let xw = random(p.batch * p.c_wide * voxels(p.wide), &mut rng);
            let xn = random(p.batch * p.c_narrow * voxels(p.narrow), &mut rng);
            let (h, slices) = d.weight_grad_halo::<f32>();
            assert!(slices > 1 || h.boxes == 1, "{p:?}: small tiles spread the boxes over slices");
            let want = weight_grad_direct(&p, &xn, &xw);
            assert_near(&conv_wgrad_halo(&h, slices, &xn, &xw), &want, &format!("{p:?} halo weight gradient"));
            let one = ConvWgradHaloParams { boxes_per_slice: h.boxes, ..h };
            assert_near(&conv_wgrad_halo(&one, 1, &xn, &xw), &want, &format!("{p:?} in one slice"));
        }
    }

    /// A stride above the kernel leaves wide positions that no tap reaches: their phases have no taps, and the
    /// product writes them with the bias alone.
    #[test]
    fn phases_without_taps_still_cover_the_wide_map() {
        let d = pairing(1, 1, 1, [1, 1, 7], [1, 1, 1], [1, 1, 3]).kernel_dims("test").unwrap();
        let phases: Vec<(i32, i32, i32)> = (0..3).filter_map(|rho| d.phase(2, rho)).collect();
        // Wide positions 0, 3, 6 (phase 0, the one tap), 1, 4 and 2, 5 (no tap).
        assert_eq!(phases, vec![(0, 3, 1), (0, 2, 0), (0, 2, 0)]);
    }

    /// A strided conv's input-gradient stride phases into more than 32 channels take the implicit products from one
    /// tap up wherever they have [`CONV_WGMMA_CHUNK`] source channels and [`IMPLICIT_MIN_POSITIONS`] positions, the 3D
    /// and large 2D ones that the halo wgmma products took before included; phases without taps, into 32 channels,
    /// of too few channels or positions do not, and the stride-1 products and the forwards keep their routes.
    #[test]
    fn strided_input_gradient_phases_take_the_implicit_products() {
        let (one, k333) = ([1, 1, 1], [3, 3, 3]);
        let phases = |p: Pairing| p.kernel_dims("test").unwrap().wide_from_narrow::<bf16>();
        let stride2 = vec![8, 4, 4, 2, 4, 2, 2, 1];
        // (name, pairing, each phase's taps): every phase implicit, the one-tap ones included.
        for (name, p, taps) in [
            ("flare-3d stage 2 entry", pairing(2, 64, 128, [40, 112, 96], k333, [2, 2, 2]), stride2.clone()),
            ("flare-3d stage 4 entry", pairing(2, 256, 320, [10, 28, 24], k333, [1, 2, 2]), vec![12, 6, 6, 3]),
            ("amos-2d stage 2 entry", pairing(12, 64, 128, [1, 160, 160], [1, 3, 3], [1, 2, 2]), vec![4, 2, 2, 1]),
            (
                "gpu_conv3d_k333 64 -> 24: 1024 positions a phase",
                pairing(2, 64, 24, [8, 16, 32], k333, [2; 3]),
                stride2,
            ),
        ] {
            let phases = phases(p);
            assert_eq!(phases.iter().map(|q| q.taps.iter().product::<i32>()).collect::<Vec<_>>(), taps, "{name}");
            for q in &phases {
                assert!(implicit_suits(q), "{name}: {q:?}");
            }
        }
        // A 1x1x1 kernel at stride (1, 2, 2): its one-tap phase is implicit (not a channels-first 1x1x1 product, which
        // launch_product tries first), its phases without taps are not.
        let strided_1x1 = phases(pairing(2, 64, 32, [10, 28, 24], one, [1, 2, 2]));
        assert_eq!(strided_1x1.iter().map(implicit_suits).collect::<Vec<_>>(), [true, false, false, false]);
        let [_, dgrad, _] = <bf16 as ConvElement>::POINTWISE.unwrap();
        assert!(pointwise(&strided_1x1[0], dgrad).is_none(), "a phase writes every stride-th position");
        assert!(!phases(pairing(2, 64, 8, [40, 112, 96], k333, [2; 3])).iter().any(implicit_suits), "8 channels");
        // Into 32 channels (the stage-1 entries) the phases keep the halo products and the gathers.
        for p in [
            pairing(2, 32, 64, [40, 224, 192], k333, [1, 2, 2]),
            pairing(12, 32, 64, [1, 320, 320], [1, 3, 3], [1, 2, 2]),
        ] {
            assert!(!phases(p).iter().any(implicit_suits), "32 output channels");
        }
        assert!(!phases(pairing(2, 64, 24, [8, 16, 30], k333, [2; 3])).iter().any(implicit_suits), "960 positions");
        // Only the bf16 input gradient has implicit kernels.
        assert!(bf16::HALO[1].implicit.is_some() && f32::HALO[1].implicit.is_none());

        // The stride-1 products and the forwards as before: a 3D stride-1 input gradient on the halo wgmma products,
        // a 2D one below 80x80 and a strided forward on the implicit ones, 1x1x1 products on neither.
        let d = pairing(2, 64, 64, [40, 112, 96], k333, one).kernel_dims("test").unwrap();
        let dgrad = d.wide_from_narrow::<bf16>()[0];
        assert!(!implicit_suits(&dgrad) && halo_suits(&dgrad) && wgmma_suits(&dgrad), "3D stride-1 input gradient");
        assert!(!implicit_suits(&d.narrow_from_wide::<bf16>()), "3D stride-1 forward");
        let d = pairing(12, 256, 256, [1, 40, 40], [1, 3, 3], one).kernel_dims("test").unwrap();
        assert!(implicit_suits(&d.wide_from_narrow::<bf16>()[0]), "2D stride-1 input gradient at 40x40");
        assert!(implicit_suits(&d.narrow_from_wide::<bf16>()), "2D stride-1 forward at 40x40");
        let d = pairing(2, 64, 128, [40, 112, 96], k333, [2; 3]).kernel_dims("test").unwrap();
        assert!(implicit_suits(&d.narrow_from_wide::<bf16>()), "strided forward");
        for (stride, what) in [(one, "stride 1"), ([2; 3], "stride 2")] {
            let d = pairing(2, 64, 64, [10, 28, 24], one, stride).kernel_dims("test").unwrap();
            assert!(!implicit_suits(&d.narrow_from_wide::<bf16>()), "1x1x1 forward, {what}");
        }
        let d = pairing(2, 64, 64, [10, 28, 24], one, one).kernel_dims("test").unwrap();
        assert!(!implicit_suits(&d.wide_from_narrow::<bf16>()[0]), "1x1x1 stride-1 input gradient");
    }

    /// The products of the GPU test gpu_conv_pointwise_wgmma that exist to run the channels-first wgmma kernels are
    /// ones they take (so that the test does not pass on the streaming kernels or the gathers instead), and the others
    /// are not.
    #[test]
    fn pointwise_products_beyond_the_streaming_reduction_are_wgmma_products() {
        let [fprop, dgrad, transpose_fprop] = <bf16 as ConvElement>::POINTWISE.unwrap();
        let fits = |kernels, k, n| Pointwise { kernels, batch: 1, k, n, positions: 64 }.wgmma_fits();
        // 200 -> 136 both ways, 256 -> 24 forward, 24 -> 264 input gradient, the transposed 192 -> 40 x 4 taps and
        // 144 -> 36 x 4 taps.
        let wgmma = [
            (fprop, 200, 136),
            (dgrad, 136, 200),
            (fprop, 256, 24),
            (dgrad, 264, 24),
            (transpose_fprop, 192, 160),
            (transpose_fprop, 144, 144),
        ];
        for (kernels, k, n) in wgmma {
            assert!(fits(kernels, k, n), "{k} -> {n}: a wgmma product");
        }
        // Reductions the streaming kernels take; W's rows of 130 channels, not whole 16-byte pieces.
        for (kernels, k, n) in [(dgrad, 24, 256), (fprop, 24, 264), (fprop, 128, 512), (fprop, 130, 64)] {
            assert!(!fits(kernels, k, n), "{k} -> {n}: not a wgmma product");
        }
    }

    /// The transposed conv's backward unfolds g where the explicit weight gradient takes the pairing: from
    /// [`UNFOLD_MIN_WIDE_CHANNELS`] wide channels on input positions of whole 16-byte pieces, as gpu_conv's
    /// transposed 24 -> 64 case (so that the GPU test runs the unfolded path); the unfolded input gradient is a 1x1x1
    /// conv over Cw k channels.
    #[test]
    fn transposed_backward_unfolds_g_from_enough_wide_channels() {
        // (c_wide, c_narrow, narrow, k): gpu_conv's 24 -> 64 x 2x2x2 at 2x4x8, flare-3d's 256 -> 128 and amos-2d's
        // 512 -> 256; then amos-2d's 64 -> 32 and gpu_conv's 5 -> 7 (too few wide channels), 24 -> 64 at 3x5x7.
        for (c_wide, c_narrow, narrow, k) in
            [(64, 24, [2, 4, 8], [2; 3]), (128, 256, [10, 28, 24], [2; 3]), (256, 512, [1, 20, 20], [1, 2, 2])]
        {
            let p = transposed(2, c_wide, c_narrow, narrow, k);
            assert!(p.gemm_wgrad_suits(), "{c_narrow} -> {c_wide} at {narrow:?}: unfolded");
            let one = p.unfolded_pairing();
            assert_eq!((one.c_wide, one.c_narrow, one.wide, one.k), (c_wide * p.taps(), c_narrow, narrow, [1; 3]));
        }
        for (c_wide, c_narrow, narrow, k) in
            [(32, 64, [1, 160, 160], [1, 2, 2]), (7, 5, [2, 4, 8], [2; 3]), (64, 24, [3, 5, 7], [2; 3])]
        {
            assert!(!transposed(2, c_wide, c_narrow, narrow, k).gemm_wgrad_suits(), "{c_narrow} -> {c_wide}");
        }
    }

    /// [`widest_pays`] on the H100's 132 SMs: 256 columns for the products where they won on the H100
    /// (benches/RESULTS.md, "256-column wgmma tiles"), 128 where they lost, and 256 for the GPU tests' cases that
    /// exist to run them.
    #[test]
    fn widest_tiles_where_the_waves_halve() {
        let sms = 132;
        // (M, N) of C: amos-2d b12's 512 -> 512 at 20x20 (explicit: channels x positions), its weight gradient
        // (channels x channels taps), the strided 256 -> 512 forward (implicit: positions x channels), flare-3d's
        // 320 -> 320 weight gradient; then gpu_conv's cases.
        let wins =
            [(512, 4800), (512, 4608), (4800, 512), (320, 8640), (8, 17200), (64, 17000), (9240, 256), (10800, 256)];
        // 512 -> 512 at 10x10 (explicit), the strided entries' input-gradient phases (implicit), a 1x1 weight
        // gradient, the amos-2d stem's, 512 -> 256 at 40x40's input gradient (implicit, 5 waves to 3).
        let losses = [(512, 1200), (4800, 256), (256, 512), (32, 9), (19200, 512)];
        for (m, n) in wins {
            assert!(widest_pays(sms, m, n), "{m} x {n}: 256 columns won on the H100");
        }
        for (m, n) in losses {
            assert!(!widest_pays(sms, m, n), "{m} x {n}: 256 columns lost on the H100");
        }
    }
}
