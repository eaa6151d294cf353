//! Fully connected layer over the last axis (Mamba's in_proj, x_proj, dt_proj and the layer's out_proj).
//!
//! With the leading axes of `x` flattened to M rows, x (M, K), weight W (N, K) in PyTorch's layout (out, in) and an
//! optional bias b (N):
//!
//! ```text
//!   y[i, j] = sum_k x[i, k] W[j, k] + b[j]              y = x W^T + b,  (M, N)
//!
//!   dL/dx[i, k] = sum_j g[i, j] W[j, k]                 dx = g W
//!   dL/dW[j, k] = sum_i g[i, j] x[i, k]                 dW = g^T x  (summed over all M rows)
//!   dL/db[j]    = sum_i g[i, j]
//! ```
//!
//! CPU: every loop runs over contiguous rows: the forward takes dot products of rows of x with rows of W, four rows of
//! x at a time so that each load of W serves four of them; dx adds rows of W scaled by g[i, j]; dW adds the outer
//! product g[i, :] x[i, :] one row i at a time.
//!
//! The CPU passes run on rayon's thread pool, split over what each pass writes: the forward over blocks of four rows
//! of y, dx over rows of dx, dW over blocks of its rows j (each block sums its rows over all M rows i in order).
//! Every output value is computed by one thread in the same order as a single-threaded run, so the results are the
//! same bits for any number of threads.
//!
//! GPU: the three products read their operands through strides, so x W^T, g W and g^T x need no transposed copies.
//! They run on the tensor cores (cuda/gemm.cu, `linear_fprop_tf32`, `linear_dgrad_tf32`, `linear_wgrad_tf32`: tf32
//! operands, float32 accumulation, the cp.async pipeline and warp tiles of cuda/mma.cuh that the convolutions
//! share), or, when the GPU's math is exact float32 ([`Gpu::set_exact_f32`], `--math exact`, the parity checks),
//! on float32 SIMT tiles whose rounding matches the CPU's (`linear_*_f32`). Operands stored as bf16 (x, the gradient,
//! and W and b as read, a float32 master's bf16 copy: [`Weight`]) run on `linear_*_bf16` (mma.sync m16n8k16, float32
//! accumulation) and give bf16 activations; over many tokens with short reductions (Mamba's projections: K and the
//! output rows of dW at most 128, rows of an even number of elements) they run on the streaming products instead
//! (`linear_*_stream_bf16_*`: each block keeps its slice of W, or its dW tile, for its whole life and walks the token
//! tiles with three in flight, where the tiled products wait on memory between load, product and store), and a layer of
//! at most 64 inputs whose dx and dW both stream takes them from one read of g (`linear_backward_stream_bf16_*`,
//! `fused_backward`: the same tiles and sums, so the same bits); the bf16 products they do not take (the deep layers'
//! reductions beyond 128, weight gradients beyond 128 x 128) run on Hopper's warpgroup products (`linear_*_wgmma_bf16`,
//! cuda/gemm_wgmma.cu: 128-row tiles, each operand staged as it lies through wgmma's transpose bits) where the GPU has
//! them, else on the mma.sync tiles; dW and db are summed in float32 and returned in the masters' type (a float32
//! master's gradient is never rounded). dW reduces over all M tokens while its output is small, so that reduction is
//! split into fixed slices of M whose partial products are summed afterwards in a fixed order (`sum_rows`, also used
//! for db); results are the same bits from run to run.
//!
//! Cost per element of y (M rows, N outputs, K inputs; the counting rules are in [`ops`](crate::ops)): forward 2K
//! FLOPs and at least 4 (1 + K/N + K/M) bytes, about 4 (1 + K/N) for many tokens; backward 4K FLOPs (dL/dx and
//! dL/dW 2K each) and at least 4 (1 + 2K/N) bytes. The 3D reference's stage-0 in_proj (K = 32, N = 128) has 64 FLOPs
//! per 5 bytes, 13 per byte: bound by memory in float32.

use std::sync::Arc;

use cudarc::driver::{CudaView, LaunchConfig};
use rayon::prelude::*;

use crate::autograd::{Backward, Tape};
use half::bf16;

use crate::device::cuda::{Gpu, GpuBuffer, GpuElement};
use crate::device::params::{
    kernel, ConstPtr, GemmParams, Kernel, LinearBackwardParams, MutPtr, SumRowsParams, GEMM_STREAM_BM,
    GEMM_STREAM_MAX_K, GEMM_STREAM_STAGES, GEMM_STREAM_THREADS, GEMM_TC_BK, GEMM_TC_BM, GEMM_TC_BN, GEMM_TC_BN_NARROW,
    GEMM_TC_THREADS, GEMM_THREADS, GEMM_TK, GEMM_TM, GEMM_TN, GEMM_WGMMA_BK, GEMM_WGMMA_BM, GEMM_WGMMA_BN,
    SUM_ROWS_COLS, SUM_ROWS_LANES,
};
use crate::ops::cast::{params_in, Weight};
use crate::ops::conv::gemm_wgmma_config;
use crate::profile;
use crate::tensor::{DType, Real, Tensor};
use crate::{by_dtype, by_gpu_type, ensure, Result};

/// `y = x W^T + b` over the last axis of `x` (..., Cin), with `w` (Cout, Cin) and `bias` (Cout); returns (..., Cout).
pub fn linear(tape: &mut Tape, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let w = Weight::like(tape, w, x)?;
    linear_of(tape, x, &w, bias)
}

/// [`linear`] with the weight as [`Weight::like`] gave it.
fn linear_of(tape: &mut Tape, x: &Tensor, weight: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    let bias = bias.map(|b| Weight::like(tape, b, x)).transpose()?;
    let (w, b_value) = (&weight.value, bias.as_ref().map(|b| &b.value));
    let d = LinearDims::of(x, w, b_value)?;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("rank checked") = d.n;
    let range = profile::forward("linear", &[x, w], d.flops());
    fn gpu<T: LinearElement>(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        d: LinearDims,
        out: &[usize],
    ) -> Result<Tensor> {
        let b = b.map(|b| b.gpu_operand::<T>("linear bias")).transpose()?;
        let y = forward_gpu(x.gpu_operand::<T>("linear input")?, w.gpu_operand::<T>("linear weight")?, b, d)?;
        Tensor::from_gpu(y, out)
    }
    let y = match by_gpu_type!(x, gpu(x, w, b_value, d, &out_shape)) {
        Some(y) => y?,
        None => by_dtype!(x.dtype(), forward_cpu(x, w, b_value, d))?.with_shape(&out_shape)?,
    };
    let saved =
        || LinearBackward { x: x.clone(), w: w.clone(), has_bias: bias.is_some(), grad_dtype: weight.dtype(), dims: d };
    range.done([&y]);
    match &bias {
        Some(b) => tape.record(&[x, &weight.master, &b.master], &y, saved()),
        None => tape.record(&[x, &weight.master], &y, saved()),
    }
    Ok(y)
}

/// A linear product `x w^T` (no bias) made by [`Product::new`] together with its operands, for an op that takes it as
/// an [`Operand`]: the op keeps `x` and `w` instead of the product and rebuilds the product in its backward pass (the
/// same kernel on the same operands: the same bits). For products wider than their input, whose input the product's
/// own node keeps anyway (Mamba's in_proj halves and dt_proj), the op then keeps nothing of its own for that operand,
/// for one more product in the backward pass. Drop the `Product` after the op: its value is then freed.
///
/// [`Operand`]: crate::ops::operand::Operand
#[derive(Debug)]
pub struct Product {
    pub(crate) value: Tensor,
    pub(crate) x: Tensor,
    pub(crate) w: Tensor,
}

impl Product {
    /// `x w^T` by [`linear`], recorded on `tape` as usual; the product keeps the weight as the kernels read it (a
    /// float32 weight's bf16 copy in a bf16 step), so rebuilding it casts nothing.
    pub fn new(tape: &mut Tape, x: &Tensor, w: &Tensor) -> Result<Product> {
        let w = Weight::like(tape, w, x)?;
        Ok(Product { value: linear_of(tape, x, &w, None)?, x: x.clone(), w: w.value })
    }

    /// The product.
    pub fn value(&self) -> &Tensor {
        &self.value
    }
}

/// Rows M, input features K, output features N.
#[derive(Clone, Copy, Debug)]
struct LinearDims {
    m: usize,
    k: usize,
    n: usize,
}

impl LinearDims {
    /// Forward FLOPs, 2 M N K (each of dx and dW costs the same).
    fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64
    }

    fn of(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<LinearDims> {
        let xs = x.shape();
        ensure!(xs.len() >= 2, Shape, "linear: input must have rank >= 2 (..., Cin), got shape {xs:?}");
        let k = xs[xs.len() - 1];
        let m = xs[..xs.len() - 1].iter().product();
        ensure!(
            w.rank() == 2 && w.shape()[1] == k,
            Shape,
            "linear: weight must be (Cout, Cin) with Cin = {k} (the input's last axis of {xs:?}), got shape {:?}",
            w.shape()
        );
        x.check_same_kind(w, "linear")?;
        let n = w.shape()[0];
        if let Some(b) = bias {
            x.check_same_kind(b, "linear")?;
            b.check_shape(&[n], "linear: bias (Cout)")?;
        }
        Ok(LinearDims { m, k, n })
    }
}

/// sum_i a[i] b[i] with eight independent partial sums, which the compiler keeps in vector lanes.
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = T::zero();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += *x * *y;
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    s + tail
}

/// The dot products of four rows `x` with one row `w`, with four partial sums per row (vector lanes).
fn dot4<T: Real>(x: [&[T]; 4], w: &[T]) -> [T; 4] {
    let mut acc = [[T::zero(); 4]; 4];
    let k4 = w.len() / 4 * 4;
    for c in (0..k4).step_by(4) {
        let wc = &w[c..c + 4];
        for r in 0..4 {
            let xc = &x[r][c..c + 4];
            for l in 0..4 {
                acc[r][l] += xc[l] * wc[l];
            }
        }
    }
    std::array::from_fn(|r| {
        let mut s = (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]);
        for c in k4..w.len() {
            s += x[r][c] * w[c];
        }
        s
    })
}

/// y += a x.
fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

fn forward_cpu<T: Real>(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, d: LinearDims) -> Result<Tensor> {
    let (xv, wv) = (x.cpu::<T>()?, w.cpu::<T>()?);
    let bv = bias.map(|b| b.cpu::<T>()).transpose()?;
    let mut y = vec![T::zero(); d.m * d.n];
    if d.k > 0 && d.n > 0 {
        // Four rows of x at a time share each load of a row of W; the last block may hold fewer rows.
        y.par_chunks_mut(4 * d.n).zip(xv.par_chunks(4 * d.k)).for_each(|(yb, xb)| {
            if yb.len() == 4 * d.n {
                let x4: [&[T]; 4] = std::array::from_fn(|r| &xb[r * d.k..(r + 1) * d.k]);
                for (j, wr) in wv.chunks_exact(d.k).enumerate() {
                    let s = dot4(x4, wr);
                    for r in 0..4 {
                        yb[r * d.n + j] = s[r];
                    }
                }
            } else {
                for (yr, xr) in yb.chunks_exact_mut(d.n).zip(xb.chunks_exact(d.k)) {
                    for (yj, wr) in yr.iter_mut().zip(wv.chunks_exact(d.k)) {
                        *yj = dot(xr, wr);
                    }
                }
            }
        });
    }
    if let Some(bv) = bv {
        for yr in y.chunks_exact_mut(d.n) {
            for (yj, &bj) in yr.iter_mut().zip(bv) {
                *yj += bj;
            }
        }
    }
    Tensor::from_vec(y, &[d.m, d.n])
}

struct LinearBackward {
    x: Tensor,
    /// The weight as the kernels read it.
    w: Tensor,
    has_bias: bool,
    /// The masters' type, which dW and db are returned in.
    grad_dtype: DType,
    dims: LinearDims,
}

/// dx (M, K), dW (N, K) and db (N), each computed only when wanted.
type LinearGrads<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

fn backward_cpu<T: Real>(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    d: LinearDims,
    needs: [bool; 3],
) -> Result<LinearGrads<T>> {
    let (xv, wv, gv) = (x.cpu::<T>()?, w.cpu::<T>()?, g.cpu::<T>()?);
    let LinearDims { m, k, n } = d;
    let dx = needs[0].then(|| {
        let mut dx = vec![T::zero(); m * k];
        if k > 0 && n > 0 {
            dx.par_chunks_mut(k).zip(gv.par_chunks(n)).for_each(|(dxr, gr)| {
                for (&gj, wr) in gr.iter().zip(wv.chunks_exact(k)) {
                    axpy(dxr, gj, wr);
                }
            });
        }
        dx
    });
    let dw = needs[1].then(|| {
        let mut dw = vec![T::zero(); n * k];
        if k > 0 && n > 0 {
            // One block of rows j per thread, so that each thread reads g and x once; how the rows are blocked does
            // not change any value.
            let rows = n.div_ceil(rayon::current_num_threads());
            dw.par_chunks_mut(rows * k).enumerate().for_each(|(blk, dwb)| {
                let j0 = blk * rows;
                for (gr, xr) in gv.chunks_exact(n).zip(xv.chunks_exact(k)) {
                    for (&gj, dwr) in gr[j0..].iter().zip(dwb.chunks_exact_mut(k)) {
                        axpy(dwr, gj, xr);
                    }
                }
            });
        }
        dw
    });
    let db = needs[2].then(|| {
        let mut db = vec![T::zero(); n];
        if n > 0 {
            for gr in gv.chunks_exact(n) {
                for (dbj, &gj) in db.iter_mut().zip(gr) {
                    *dbj += gj;
                }
            }
        }
        db
    });
    Ok((dx, dw, db))
}

fn grads_to_tensors<T: Real>(grads: LinearGrads<T>, x: &Tensor, w: &Tensor, n: usize) -> Result<[Option<Tensor>; 3]> {
    let (dx, dw, db) = grads;
    Ok([
        dx.map(|v| Tensor::from_vec(v, x.shape())).transpose()?,
        dw.map(|v| Tensor::from_vec(v, w.shape())).transpose()?,
        db.map(|v| Tensor::from_vec(v, &[n])).transpose()?,
    ])
}

impl Backward for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn flops(&self) -> f64 {
        2.0 * self.dims.flops()
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        fn cpu<T: Real>(op: &LinearBackward, g: &Tensor, needs: [bool; 3]) -> Result<[Option<Tensor>; 3]> {
            let grads = backward_cpu::<T>(&op.x, &op.w, g, op.dims, needs)?;
            grads_to_tensors(grads, &op.x, &op.w, op.dims.n)
        }
        self.x.check_same_kind(grad_out, "linear backward")?;
        let want = [needs[0], needs[1], self.has_bias && needs.get(2).copied().unwrap_or(false)];
        let [dx, dw, db] = match by_gpu_type!(self.x, backward_on_gpu(self, grad_out, want)) {
            Some(grads) => grads?,
            None => by_dtype!(self.x.dtype(), cpu(self, grad_out, want))?,
        };
        let mut out = vec![dx, dw];
        if self.has_bias {
            out.push(db);
        }
        Ok(out)
    }
}

/// The wanted gradients of `op` on the GPU, every operand stored as `T`: dx in `T`, dW and db (summed in float32)
/// in the masters' type.
fn backward_on_gpu<T: LinearElement>(op: &LinearBackward, g: &Tensor, want: [bool; 3]) -> Result<[Option<Tensor>; 3]> {
    let (xb, wb, gb) = (
        op.x.gpu_operand::<T>("linear backward: x")?,
        op.w.gpu_operand::<T>("linear backward: the weight")?,
        g.gpu_operand::<T>("linear backward: the gradient")?,
    );
    let (dx, dw, db) = backward_gpu(xb, wb, gb, op.dims, want)?;
    let grads = vec![
        dx.map(|dx| Tensor::from_gpu(dx, op.x.shape())).transpose()?,
        dw.map(|dw| Tensor::from_gpu(dw, op.w.shape())).transpose()?,
        db.map(|db| Tensor::from_gpu(db, &[op.dims.n])).transpose()?,
    ];
    let [dx, dw, db] = params_in(op.grad_dtype, grads)?.try_into().expect("three gradients");
    Ok([dx, dw, db])
}

// ---------------------------------------------------------------------------------------------------------------
// GPU

/// The weight gradient's split over M aims at about this many blocks (a few waves on an H100's 132 SMs) ...
const GEMM_SPLIT_BLOCKS: usize = 1024;
/// ... with at least this many rows of M per slice, so each block does real work.
const GEMM_MIN_SLICE: usize = 256;
/// The wgmma weight gradient's split aims at about two waves of its one-block-per-SM tiles on 132 SMs: its float32
/// slices are written and summed again, 64 KB per 128 x 128 tile, so it takes fewer than the mma.sync tiles.
const GEMM_WGMMA_SPLIT_BLOCKS: usize = 264;

/// Which product of a linear layer a [`Gemm`] computes: each role has its own kernel names (cuda/gemm.cu).
#[derive(Clone, Copy)]
enum GemmRole {
    /// y = x W^T (+ b).
    Forward,
    /// dx = g W.
    InputGrad,
    /// dW = g^T x (split over tokens).
    WeightGrad,
}

/// A storage type the linear kernels take: its kernels per role (forward, input gradient, weight gradient), each as
/// [exact float32 SIMT, tensor cores, tensor cores for at most 32 output columns]; bf16 has only tensor-core kernels
/// (its exact entry is the tensor-core one).
trait LinearElement: GpuElement {
    const KERNELS: [[Kernel<GemmParams<Self>>; 3]; 3];
    /// The streaming products for many tokens and short reductions (cuda/gemm.cu's `linear_*_stream_*`), where this
    /// type has them.
    const STREAM: Option<StreamKernels<Self>>;
    /// The wgmma products per role (forward, input gradient, weight gradient) in 64- and 128-column tiles
    /// (cuda/gemm_wgmma.cu's `linear_*_wgmma_*`, sm_90), where this type has them: the products the streaming kernels
    /// do not take.
    const WGMMA: Option<[[Kernel<GemmParams<Self>>; 2]; 3]>;
    /// Whether `--math exact` can select float32 SIMT kernels for this type.
    const HAS_EXACT: bool;
    /// The column sums of g (M, N) in float32: the bias gradient.
    fn column_sums(g: &GpuBuffer<Self>, m: usize, n: usize) -> Result<GpuBuffer>;
}

impl LinearElement for f32 {
    const KERNELS: [[Kernel<GemmParams<f32>>; 3]; 3] = [
        [kernel::linear_fprop_f32, kernel::linear_fprop_tf32, kernel::linear_fprop_tf32_n32],
        [kernel::linear_dgrad_f32, kernel::linear_dgrad_tf32, kernel::linear_dgrad_tf32_n32],
        [kernel::linear_wgrad_f32, kernel::linear_wgrad_tf32, kernel::linear_wgrad_tf32_n32],
    ];
    const STREAM: Option<StreamKernels<f32>> = None;
    const WGMMA: Option<[[Kernel<GemmParams<f32>>; 2]; 3]> = None;
    const HAS_EXACT: bool = true;
    fn column_sums(g: &GpuBuffer, m: usize, n: usize) -> Result<GpuBuffer> {
        sum_rows(&g.gpu, &g.slice.slice(..), m, n, n, "linear db")
    }
}

impl LinearElement for bf16 {
    const KERNELS: [[Kernel<GemmParams<bf16>>; 3]; 3] = [
        [kernel::linear_fprop_bf16, kernel::linear_fprop_bf16, kernel::linear_fprop_bf16_n32],
        [kernel::linear_dgrad_bf16, kernel::linear_dgrad_bf16, kernel::linear_dgrad_bf16_n32],
        [kernel::linear_wgrad_bf16, kernel::linear_wgrad_bf16, kernel::linear_wgrad_bf16_n32],
    ];
    const STREAM: Option<StreamKernels<bf16>> = Some(StreamKernels {
        fprop: [
            kernel::linear_fprop_stream_bf16_n32,
            kernel::linear_fprop_stream_bf16_n64,
            kernel::linear_fprop_stream_bf16_n128,
        ],
        dgrad: [
            kernel::linear_dgrad_stream_bf16_n32,
            kernel::linear_dgrad_stream_bf16_n64,
            kernel::linear_dgrad_stream_bf16_n128,
        ],
        wgrad: [
            [kernel::linear_wgrad_stream_bf16_m32_n32, kernel::linear_wgrad_stream_bf16_m32_n64],
            [kernel::linear_wgrad_stream_bf16_m64_n32, kernel::linear_wgrad_stream_bf16_m64_n64],
            [kernel::linear_wgrad_stream_bf16_m128_n32, kernel::linear_wgrad_stream_bf16_m128_n64],
        ],
        backward: [
            [
                kernel::linear_backward_stream_bf16_k32_m32,
                kernel::linear_backward_stream_bf16_k32_m64,
                kernel::linear_backward_stream_bf16_k32_m128,
            ],
            [
                kernel::linear_backward_stream_bf16_k64_m32,
                kernel::linear_backward_stream_bf16_k64_m64,
                kernel::linear_backward_stream_bf16_k64_m128,
            ],
        ],
    });
    const WGMMA: Option<[[Kernel<GemmParams<bf16>>; 2]; 3]> = Some([
        [kernel::linear_fprop_wgmma_bf16_n64, kernel::linear_fprop_wgmma_bf16],
        [kernel::linear_dgrad_wgmma_bf16_n64, kernel::linear_dgrad_wgmma_bf16],
        [kernel::linear_wgrad_wgmma_bf16_n64, kernel::linear_wgrad_wgmma_bf16],
    ]);
    const HAS_EXACT: bool = false;
    fn column_sums(g: &GpuBuffer<bf16>, m: usize, n: usize) -> Result<GpuBuffer> {
        f32::column_sums(&crate::tensor::cast::to_f32(g)?, m, n)
    }
}

/// The streaming kernels of a storage type: forward and input gradient for 32, 64 and 128 output columns per block,
/// the weight gradient for dW tiles of 32, 64 or 128 rows by 32 or 64 columns, and both gradients from one read of g
/// ([`fused_backward`]) for 32 or 64 inputs by 32, 64 or 128 outputs.
struct StreamKernels<T> {
    fprop: [Kernel<GemmParams<T>>; 3],
    dgrad: [Kernel<GemmParams<T>>; 3],
    wgrad: [[Kernel<GemmParams<T>>; 2]; 3],
    backward: [[Kernel<LinearBackwardParams<T>>; 3]; 2],
}

/// A streaming product chosen for one [`Gemm`]: its kernel, the output tile of a block (rows, columns) and its
/// dynamic shared memory in bytes.
struct StreamKernel<T> {
    kernel: Kernel<GemmParams<T>>,
    tile: (usize, usize),
    shared: usize,
}

/// A product's kernel and the block tile it covers.
struct GemmKernel<T> {
    kernel: Kernel<GemmParams<T>>,
    /// Rows and columns of C per block.
    tile: (usize, usize),
    /// Reduction indices per stage (the split of the weight gradient is a multiple of it).
    depth: usize,
    threads: usize,
}

impl GemmRole {
    /// The product as errors name it.
    fn what(self) -> &'static str {
        match self {
            GemmRole::Forward => "linear forward",
            GemmRole::InputGrad => "linear dx = g W",
            GemmRole::WeightGrad => "linear dW = g^T x",
        }
    }

    /// The role's kernel for storage `T` and the GPU's math ([`Gpu::exact_f32`]: exact float32 SIMT tiles for
    /// float32; otherwise the tensor cores, tf32 or bf16, 32 columns wide for at most 32 output columns), and its
    /// description for errors.
    fn kernel<T: LinearElement>(self, gpu: &Gpu, n: usize) -> (GemmKernel<T>, &'static str) {
        let [exact, tf32, tf32_n32] = T::KERNELS[self as usize];
        let what = self.what();
        let tc =
            |kernel, bn| GemmKernel { kernel, tile: (GEMM_TC_BM, bn), depth: GEMM_TC_BK, threads: GEMM_TC_THREADS };
        let k = if gpu.exact_f32() && T::HAS_EXACT {
            GemmKernel { kernel: exact, tile: (GEMM_TM, GEMM_TN), depth: GEMM_TK, threads: GEMM_THREADS }
        } else if n <= GEMM_TC_BN_NARROW {
            tc(tf32_n32, GEMM_TC_BN_NARROW)
        } else {
            tc(tf32, GEMM_TC_BN)
        };
        (k, what)
    }
}

/// One product C = A B (+ bias): A(i, k) = a[i * a_si + k * a_sk], B(k, j) = b[k * b_sk + j * b_sj], C (m, n)
/// row-major; no bias when `bias` is null. Each role reads its operands with the strides its kernels expect (see
/// cuda/gemm.cuh).
struct Gemm<T> {
    a: ConstPtr<T>,
    a_si: usize,
    a_sk: usize,
    b: ConstPtr<T>,
    b_sk: usize,
    b_sj: usize,
    bias: ConstPtr<T>,
    m: usize,
    n: usize,
    k: usize,
    role: GemmRole,
}

impl<T: LinearElement> Gemm<T> {
    /// Runs the product into `c` (forward, input gradient) or `c_acc` (the weight gradient's float32 partial
    /// products), its reduction cut into `slices` slices of `k_slice` (slice z written at c_acc + z m n).
    fn run(&self, gpu: &Arc<Gpu>, c: MutPtr<T>, c_acc: MutPtr<f32>, k_slice: usize, slices: usize) -> Result<()> {
        if let Some(s) = self.stream_kernel(gpu) {
            return self.run_stream(gpu, &s, c, c_acc, slices);
        }
        if let Some(w) = self.wgmma_kernel(gpu) {
            return self.run_wgmma(gpu, w, c, c_acc, k_slice, slices);
        }
        let (k, what) = self.role.kernel::<T>(gpu, self.n);
        let (bm, bn) = k.tile;
        ensure!(
            self.n.div_ceil(bn) <= 65_535 && slices <= 65_535,
            Shape,
            "{what}: {} output columns exceed the GPU grid (at most {})",
            self.n,
            65_535 * bn
        );
        let cfg = LaunchConfig {
            grid_dim: (self.m.div_ceil(bm) as u32, self.n.div_ceil(bn) as u32, slices as u32),
            block_dim: (k.threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let p = self.params(c, c_acc, k_slice);
        let shapes = format!("{what}: ({}, {}) x ({}, {}), {slices} slice(s)", self.m, self.k, self.k, self.n);
        gpu.launch(k.kernel, cfg, &p, &shapes)
    }

    /// The kernels' parameters for this product, writing `c` or `c_acc` (slices of `k_slice` reduction indices, slice
    /// z at c_acc + z m n).
    fn params(&self, c: MutPtr<T>, c_acc: MutPtr<f32>, k_slice: usize) -> GemmParams<T> {
        GemmParams {
            a: self.a,
            b: self.b,
            bias: self.bias,
            c,
            c_acc,
            a_si: self.a_si as i64,
            a_sk: self.a_sk as i64,
            b_sk: self.b_sk as i64,
            b_sj: self.b_sj as i64,
            M: self.m as i64,
            N: self.n as i64,
            K: self.k as i64,
            k_slice: k_slice as i64,
            c_slice: (self.m * self.n) as i64,
            ..GemmParams::default()
        }
    }

    /// The streaming product that takes this one, if any (cuda/gemm.cu says why they gain): not `--math exact`, a
    /// type that has them, operands whose rows are whole 16-byte pieces or pairs; the forward and input gradient for
    /// reductions of at most GEMM_STREAM_MAX_K, the weight gradient for at most 128 x 128 outputs.
    fn stream_kernel(&self, gpu: &Gpu) -> Option<StreamKernel<T>> {
        let kernels = T::STREAM.filter(|_| !gpu.exact_f32())?;
        // Rows the kernels copy by cp.async: whole 16-byte pieces or whole pairs (cuda/gemm.cu's copy_mode).
        let whole = |p: ConstPtr<T>, ld: usize| p.address() % 4 == 0 && (ld * size_of::<T>()) % 4 == 0;
        match self.role {
            GemmRole::Forward | GemmRole::InputGrad => {
                let fits = self.a_sk == 1 && whole(self.a, self.a_si) && self.k <= GEMM_STREAM_MAX_K;
                if !fits {
                    return None;
                }
                let width = stream_width(self.n);
                let dgrad = matches!(self.role, GemmRole::InputGrad);
                let kernel = if dgrad { kernels.dgrad } else { kernels.fprop }[width];
                let bn = 32 << width;
                Some(StreamKernel {
                    kernel,
                    tile: (GEMM_STREAM_BM, bn),
                    shared: stream_shared_bytes(self.k, bn, dgrad, false),
                })
            }
            GemmRole::WeightGrad => {
                let fits = self.a_si == 1 && self.b_sj == 1 && whole(self.a, self.a_sk) && whole(self.b, self.b_sk);
                if !fits || self.m > 128 || self.n > 128 {
                    return None;
                }
                let (rows, cols) = (stream_width(self.m), usize::from(self.n > 32));
                let tile = (32 << rows, 32 << cols);
                let shared = stream_wgrad_shared_bytes(tile);
                Some(StreamKernel { kernel: kernels.wgrad[rows][cols], tile, shared })
            }
        }
    }

    /// The wgmma product that takes this one, if the streaming kernels do not ([`Gemm::stream_kernel`] first), and its
    /// tile's columns: not `--math exact`, a type and GPU that have them (sm_90), the role's unit strides, and both
    /// operands' rows whole 16-byte pieces from 16-byte aligned starts (cuda/gemm_wgmma.cuh); 64 columns per block up
    /// to 64 outputs (x_proj's forward, in_proj's dx and dW at 64 channels), else 128. Where it does not apply, the
    /// mma.sync tiles of [`GemmRole::kernel`] run the product.
    fn wgmma_kernel(&self, gpu: &Gpu) -> Option<(Kernel<GemmParams<T>>, usize)> {
        let [fprop, dgrad, wgrad] = T::WGMMA.filter(|_| !gpu.exact_f32())?;
        let rows = |p: ConstPtr<T>, ld: usize| p.address() % 16 == 0 && (ld * size_of::<T>()) % 16 == 0;
        let (kernels, fits) = match self.role {
            GemmRole::Forward => {
                (fprop, self.a_sk == 1 && self.b_sk == 1 && rows(self.a, self.a_si) && rows(self.b, self.b_sj))
            }
            GemmRole::InputGrad => {
                (dgrad, self.a_sk == 1 && self.b_sj == 1 && rows(self.a, self.a_si) && rows(self.b, self.b_sk))
            }
            GemmRole::WeightGrad => {
                (wgrad, self.a_si == 1 && self.b_sj == 1 && rows(self.a, self.a_sk) && rows(self.b, self.b_sk))
            }
        };
        let wide = usize::from(self.n > 64);
        let small = self.m.max(self.n) < i32::MAX as usize;
        (fits && small && gpu.has_kernel(kernels[wide])).then_some((kernels[wide], 64 << wide))
    }

    /// Runs the wgmma product (`kernel`, `columns` per block) into `c`, or for the weight gradient into `slices`
    /// float32 partial products of `k_slice` reduction indices at `c_acc`.
    fn run_wgmma(
        &self,
        gpu: &Arc<Gpu>,
        (kernel, columns): (Kernel<GemmParams<T>>, usize),
        c: MutPtr<T>,
        c_acc: MutPtr<f32>,
        k_slice: usize,
        slices: usize,
    ) -> Result<()> {
        let what = self.role.what();
        let shapes = format!("{what} (wgmma): ({}, {}) x ({}, {}), {slices} slice(s)", self.m, self.k, self.k, self.n);
        ensure!(
            self.n.div_ceil(columns) <= 65_535 && slices <= 65_535,
            Shape,
            "{shapes}: too many output columns or slices for the GPU grid"
        );
        let cfg = gemm_wgmma_config(self.m, self.n, columns, slices);
        gpu.launch(kernel, cfg, &self.params(c, c_acc, k_slice), &shapes)
    }

    /// Runs the streaming product `s` into `c` (forward, input gradient: as many blocks as the GPU holds at once,
    /// each walking row tiles) or, for the weight gradient, into `slices` float32 partial sums at `c_acc`.
    fn run_stream(
        &self,
        gpu: &Arc<Gpu>,
        s: &StreamKernel<T>,
        c: MutPtr<T>,
        c_acc: MutPtr<f32>,
        slices: usize,
    ) -> Result<()> {
        let what = self.role.what();
        let shapes = format!("{what} (streaming): ({}, {}) x ({}, {})", self.m, self.k, self.k, self.n);
        let tiles = self.m.div_ceil(s.tile.0) * self.n.div_ceil(s.tile.1);
        let cfg = match self.role {
            GemmRole::WeightGrad => stream_config((slices, tiles), s.shared, &shapes)?,
            _ => stream_tile_config(gpu, s, self.m.div_ceil(GEMM_STREAM_BM), self.n, &shapes)?,
        };
        let p = self.params(c, c_acc, GEMM_STREAM_BM);
        gpu.launch(s.kernel, cfg, &p, &shapes)
    }

    /// The split of the reduction (k_slice, slices) that gives about GEMM_SPLIT_BLOCKS blocks, in slices of at least
    /// GEMM_MIN_SLICE rows and a multiple of the kernel's stage depth: a function of the shapes and the math alone,
    /// so the summation order is the same on every run.
    /// A streaming weight gradient interleaves token tiles instead: slice s takes tiles s, s + slices, ...
    fn split(&self, gpu: &Gpu) -> (usize, usize) {
        if let Some(s) = self.stream_kernel(gpu) {
            let tiles = self.m.div_ceil(s.tile.0) * self.n.div_ceil(s.tile.1);
            let slices = self.k.div_ceil(GEMM_STREAM_BM).min((GEMM_SPLIT_BLOCKS / tiles).max(1));
            return (GEMM_STREAM_BM, slices);
        }
        let ((tile, depth), blocks) = match self.wgmma_kernel(gpu) {
            Some((_, bn)) => (((GEMM_WGMMA_BM, bn), GEMM_WGMMA_BK), GEMM_WGMMA_SPLIT_BLOCKS),
            None => {
                let (k, _) = self.role.kernel::<T>(gpu, self.n);
                ((k.tile, k.depth), GEMM_SPLIT_BLOCKS)
            }
        };
        let tiles = self.m.div_ceil(tile.0) * self.n.div_ceil(tile.1);
        let want = (blocks / tiles).max(1);
        let k_slice = self.k.div_ceil(want).next_multiple_of(depth).max(GEMM_MIN_SLICE);
        (k_slice, self.k.div_ceil(k_slice))
    }
}

/// The width w of the streaming tile (32 << w output columns, or dW rows) for `n` of them: 32 up to 32, 64 up to 64,
/// else 128.
fn stream_width(n: usize) -> usize {
    usize::from(n > 32) + usize::from(n > 64)
}

/// The launch of a streaming product whose blocks walk `row_tiles` row tiles for `n` output columns (forward, input
/// gradient): as many blocks as the GPU holds at once, spread over the column tiles.
fn stream_tile_config<T>(
    gpu: &Gpu,
    s: &StreamKernel<T>,
    row_tiles: usize,
    n: usize,
    shapes: &str,
) -> Result<LaunchConfig> {
    let columns = n.div_ceil(s.tile.1);
    let resident = gpu.resident_blocks(s.kernel, GEMM_STREAM_THREADS as u32, s.shared as u32, shapes)?;
    stream_config((row_tiles.min((resident / columns).max(1)), columns), s.shared, shapes)
}

/// A streaming product's launch of `grid` blocks with `shared` bytes of dynamic shared memory.
fn stream_config(grid: (usize, usize), shared: usize, shapes: &str) -> Result<LaunchConfig> {
    ensure!(grid.1 <= 65_535, Shape, "{shapes}: too many output tiles for the GPU grid");
    Ok(LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, 1),
        block_dim: (GEMM_STREAM_THREADS as u32, 1, 1),
        shared_mem_bytes: shared as u32,
    })
}

/// The dynamic shared memory of a streaming product (cuda/gemm.cu's layout, in bf16 elements): the ring of A tiles
/// [GEMM_STREAM_STAGES][GEMM_STREAM_BM][KP + 8] (channels first: [GEMM_STREAM_STAGES][KP][GEMM_STREAM_BM + 8]), the
/// block's columns of W ([bn][KP + 8], or [KP][bn + 8] for W stored [k][j]) and each warp's output rows [16][bn + 8]
/// (channels first: columns [bn][16 + 8]), with KP = k rounded up to 16.
fn stream_shared_bytes(k: usize, bn: usize, b_k_major: bool, channels_first: bool) -> usize {
    let kp = k.next_multiple_of(16);
    let b = if b_k_major { kp * (bn + 8) } else { bn * (kp + 8) };
    let (ring, out) = match channels_first {
        false => (GEMM_STREAM_BM * (kp + 8), 16 * (bn + 8)),
        true => (kp * (GEMM_STREAM_BM + 8), bn * (16 + 8)),
    };
    let warps = GEMM_STREAM_THREADS / 32;
    2 * (GEMM_STREAM_STAGES * ring + b + warps * out)
}

/// The channels-first kernels of one role's 1x1x1 products: the streaming ones (cuda/gemm.cu's
/// `conv_*_pointwise_bf16_n*`) up to GEMM_STREAM_MAX_K source channels, the wgmma one (cuda/gemm_wgmma.cu's
/// `conv_*_pointwise_wgmma_bf16`, sm_90) beyond, where the streaming kernels' whole columns of W no longer fit.
#[derive(Clone, Copy)]
pub(crate) struct PointwiseKernels<T> {
    /// The streaming kernels for 32, 64 and 128 output channels per block.
    pub streaming: [Kernel<GemmParams<T>>; 3],
    /// The wgmma kernel: tiles of GEMM_WGMMA_BM output channels x GEMM_WGMMA_BN positions, any reduction.
    pub wgmma: Kernel<GemmParams<T>>,
    /// How the role's kernels read W: stored [k][j] (true) or [j][k].
    pub w_k_major: bool,
}

/// One 1x1x1 convolution product on channels-first maps, for [`PointwiseKernels`] (the streaming kernels'
/// channels-first instances, cuda/gemm.cu, or the wgmma ones, cuda/gemm_wgmma.cu): per batch item b,
/// `dst[b, j, i] = sum_k w(k, j) src[b, k, i] (+ bias[j])` over the `positions` i, with `w(k, j) = w[j K + k]` (the
/// conv's forward, W (Cout, Cin)) or `w[k N + j]` (W stored [k][j]: the conv's input gradient and the transposed
/// conv's forward, W (Cin, Cout)).
pub(crate) struct Pointwise<T> {
    /// The role's kernels.
    pub kernels: PointwiseKernels<T>,
    /// Batch items.
    pub batch: usize,
    /// Source channels (the reduction).
    pub k: usize,
    /// Output channels.
    pub n: usize,
    /// Positions per channel of an item.
    pub positions: usize,
}

impl<T: GpuElement> Pointwise<T> {
    /// Whether the kernels take this product on these buffers on `gpu`: channels of whole 16-byte pieces (positions a
    /// multiple of 8, 16-byte aligned maps) and a reduction of at most GEMM_STREAM_MAX_K channels or one the wgmma
    /// kernel takes ([`Pointwise::on_wgmma`]).
    pub fn suits(&self, gpu: &Gpu, src: ConstPtr<T>, dst: MutPtr<T>) -> bool {
        let piece = 16 / size_of::<T>();
        let whole = self.positions % piece == 0 && src.address() % 16 == 0 && dst.address() % 16 == 0;
        whole && (self.k <= GEMM_STREAM_MAX_K || self.on_wgmma(gpu))
    }

    /// Whether the product runs on the wgmma kernel: on a GPU that has it, where [`Pointwise::wgmma_fits`].
    fn on_wgmma(&self, gpu: &Gpu) -> bool {
        self.wgmma_fits() && gpu.has_kernel(self.kernels.wgmma)
    }

    /// Whether the product is one for the wgmma kernel: a reduction beyond GEMM_STREAM_MAX_K, W's rows whole 16-byte
    /// pieces (its stored rows: N output channels for [k][j], K for [j][k]).
    pub fn wgmma_fits(&self) -> bool {
        let row = if self.kernels.w_k_major { self.n } else { self.k };
        self.k > GEMM_STREAM_MAX_K && row % (16 / size_of::<T>()) == 0
    }

    /// Runs the product (which [`Pointwise::suits`] the buffers) on `gpu`.
    pub fn run(
        &self,
        gpu: &Gpu,
        src: ConstPtr<T>,
        w: ConstPtr<T>,
        bias: ConstPtr<T>,
        dst: MutPtr<T>,
        what: &str,
    ) -> Result<()> {
        let (b_sk, b_sj) = if self.kernels.w_k_major { (self.n, 1) } else { (1, self.k) };
        let p = GemmParams {
            a: src,
            b: w,
            bias,
            c: dst,
            a_si: 1,
            a_sk: self.positions as i64,
            b_sk: b_sk as i64,
            b_sj: b_sj as i64,
            M: self.positions as i64,
            N: self.n as i64,
            K: self.k as i64,
            batch: self.batch as i64,
            a_sb: (self.k * self.positions) as i64,
            c_sb: (self.n * self.positions) as i64,
            ..GemmParams::default()
        };
        let on_wgmma = self.on_wgmma(gpu);
        let kind = if on_wgmma { "wgmma" } else { "streaming" };
        let shapes = format!(
            "{what} (channels first, {kind}): {} x ({} -> {} channels) x {} positions",
            self.batch, self.k, self.n, self.positions
        );
        if on_wgmma {
            let cfg = gemm_wgmma_config(self.n, self.positions, GEMM_WGMMA_BN, self.batch);
            return gpu.launch(self.kernels.wgmma, cfg, &p, &shapes);
        }
        let width = stream_width(self.n);
        let bn = 32 << width;
        let shared = stream_shared_bytes(self.k, bn, self.kernels.w_k_major, true);
        let s = StreamKernel { kernel: self.kernels.streaming[width], tile: (GEMM_STREAM_BM, bn), shared };
        let row_tiles = self.batch * self.positions.div_ceil(GEMM_STREAM_BM);
        let cfg = stream_tile_config(gpu, &s, row_tiles, self.n, &shapes)?;
        gpu.launch(s.kernel, cfg, &p, &shapes)
    }
}

/// The dynamic shared memory of a streaming weight gradient with dW tiles of `tile` (rows, columns) (cuda/gemm.cu's
/// layout, in bf16 elements): the rings of g's and x's token tiles, [GEMM_STREAM_STAGES][GEMM_STREAM_BM][rows + 8] and
/// [GEMM_STREAM_STAGES][GEMM_STREAM_BM][columns + 8].
fn stream_wgrad_shared_bytes((rows, cols): (usize, usize)) -> usize {
    2 * GEMM_STREAM_STAGES * GEMM_STREAM_BM * (rows + 8 + cols + 8)
}

/// Rows summed per block in the first round of `sum_rows` when one round would leave too few blocks.
const SUM_SLICE_ROWS: usize = 2048;
/// Up to this many rows `sum_rows` sums in one round (one block per 32 columns).
const SUM_ONE_ROUND_ROWS: usize = 4096;

/// Deterministic column sums on the GPU: y[q] = sum_{p < rows} x[p * ld + q] for q < cols (`x` may start at a column
/// offset of a wider buffer). Many rows are summed in two rounds, slices then slice sums; the order depends only on
/// the shapes (see `sum_rows_f32` in cuda/gemm.cu). Shared by the ops whose gradients reduce over tokens.
pub(crate) fn sum_rows(
    gpu: &Arc<Gpu>,
    x: &CudaView<'_, f32>,
    rows: usize,
    cols: usize,
    ld: usize,
    what: &str,
) -> Result<GpuBuffer> {
    let per_slice = if rows <= SUM_ONE_ROUND_ROWS { rows.max(1) } else { SUM_SLICE_ROWS.max(rows.div_ceil(65_535)) };
    let slices = rows.div_ceil(per_slice).max(1);
    let mut y = gpu.alloc(slices * cols, what)?;
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(SUM_ROWS_COLS) as u32, slices as u32, 1),
        block_dim: (SUM_ROWS_COLS as u32, SUM_ROWS_LANES as u32, 1),
        shared_mem_bytes: 0,
    };
    let p = SumRowsParams {
        x: gpu.ptr(x),
        y: y.ptr_mut(),
        rows: rows as i64,
        cols: cols as i64,
        ld: ld as i64,
        rows_per_slice: per_slice as i64,
    };
    gpu.launch(kernel::sum_rows_f32, cfg, &p, &format!("{what}: sum of {rows} rows x {cols}"))?;
    if slices == 1 {
        return Ok(y);
    }
    sum_rows(gpu, &y.slice.slice(..), slices, cols, cols, what)
}

fn check_nonempty(d: LinearDims) -> Result<()> {
    ensure!(
        d.m > 0 && d.k > 0 && d.n > 0,
        Shape,
        "linear on the GPU: empty operand (M, K, N) = ({}, {}, {})",
        d.m,
        d.k,
        d.n
    );
    Ok(())
}

fn forward_gpu<T: LinearElement>(
    x: &GpuBuffer<T>,
    w: &GpuBuffer<T>,
    bias: Option<&GpuBuffer<T>>,
    d: LinearDims,
) -> Result<GpuBuffer<T>> {
    check_nonempty(d)?;
    let gpu = &x.gpu;
    let mut y = gpu.alloc_of::<T>(d.m * d.n, "linear output")?;
    let prod = Gemm {
        a: x.ptr(),
        a_si: d.k,
        a_sk: 1,
        b: w.ptr(),
        b_sk: 1,
        b_sj: d.k,
        bias: bias.map_or(ConstPtr::NULL, GpuBuffer::ptr),
        m: d.m,
        n: d.n,
        k: d.k,
        role: GemmRole::Forward,
    };
    prod.run(gpu, y.ptr_mut(), MutPtr::NULL, d.k, 1)?;
    Ok(y)
}

/// dx (M, K) in the storage type, dW (N, K) and db (N) in float32, on the GPU, each only when wanted.
type GpuLinearGrads<T> = (Option<GpuBuffer<T>>, Option<GpuBuffer>, Option<GpuBuffer>);

fn backward_gpu<T: LinearElement>(
    x: &GpuBuffer<T>,
    w: &GpuBuffer<T>,
    g: &GpuBuffer<T>,
    d: LinearDims,
    needs: [bool; 3],
) -> Result<GpuLinearGrads<T>> {
    check_nonempty(d)?;
    let gpu = &x.gpu;
    let LinearDims { m, k, n } = d;
    let dx_prod = Gemm {
        a: g.ptr(),
        a_si: n,
        a_sk: 1,
        b: w.ptr(),
        b_sk: k,
        b_sj: 1,
        bias: ConstPtr::NULL,
        m,
        n: k,
        k: n,
        role: GemmRole::InputGrad,
    };
    // dW = g^T x reduces over the M tokens: fixed slices of M with float32 partial products, then a fixed-order sum
    // of the slices (float32).
    let dw_prod = Gemm {
        a: g.ptr(),
        a_si: 1,
        a_sk: n,
        b: x.ptr(),
        b_sk: k,
        b_sj: 1,
        bias: ConstPtr::NULL,
        m: n,
        n: k,
        k: m,
        role: GemmRole::WeightGrad,
    };
    let fused = if needs[0] && needs[1] { fused_backward(gpu, &dx_prod, &dw_prod) } else { None };
    let (dx, dw) = if let Some((kernel, shared)) = fused {
        let (_, slices) = dw_prod.split(gpu);
        let mut dx = gpu.alloc_of::<T>(m * k, "linear dx")?;
        let mut partial = gpu.alloc(slices * n * k, "linear dW partial products")?;
        let p = LinearBackwardParams {
            g: g.ptr(),
            x: x.ptr(),
            w: w.ptr(),
            dx: dx.ptr_mut(),
            dw_acc: partial.ptr_mut(),
            g_ld: n as i64,
            x_ld: k as i64,
            M: m as i64,
            N: n as i64,
            K: k as i64,
            dw_slice: (n * k) as i64,
        };
        let shapes = format!("linear dx and dW (streaming, one read of g): g ({m}, {n}), x ({m}, {k})");
        gpu.launch(kernel, stream_config((slices, 1), shared, &shapes)?, &p, &shapes)?;
        (Some(dx), Some(sum_slices(gpu, partial, slices, n * k)?))
    } else {
        let dx = if needs[0] {
            let mut dx = gpu.alloc_of::<T>(m * k, "linear dx")?;
            dx_prod.run(gpu, dx.ptr_mut(), MutPtr::NULL, n, 1)?;
            Some(dx)
        } else {
            None
        };
        let dw = if needs[1] {
            let (k_slice, slices) = dw_prod.split(gpu);
            let mut partial = gpu.alloc(slices * n * k, "linear dW partial products")?;
            dw_prod.run(gpu, MutPtr::NULL, partial.ptr_mut(), k_slice, slices)?;
            Some(sum_slices(gpu, partial, slices, n * k)?)
        } else {
            None
        };
        (dx, dw)
    };
    let db = if needs[2] { Some(T::column_sums(g, m, n)?) } else { None };
    Ok((dx, dw, db))
}

/// dW from its `slices` float32 partial products of `numel` values each: the slices summed in order (or the one).
fn sum_slices(gpu: &Arc<Gpu>, partial: GpuBuffer, slices: usize, numel: usize) -> Result<GpuBuffer> {
    if slices == 1 {
        return Ok(partial);
    }
    sum_rows(gpu, &partial.slice.slice(..), slices, numel, numel, "linear dW")
}

/// The fused backward (cuda/gemm.cu's `linear_backward_stream_bf16_kBK_mBMW`: dx and dW from one read of g) with its
/// dynamic shared memory, where it takes a layer's two gradients: both would run on the streaming kernels
/// ([`Gemm::stream_kernel`]: the same tiles, fragments and slices, so the same bits) and the layer has at most 64
/// inputs (one dx tile per block): Mamba's in_proj, x_proj and out_proj at d_model 32 (the reference configurations'
/// stage 0).
fn fused_backward<T: LinearElement>(
    gpu: &Gpu,
    dx: &Gemm<T>,
    dw: &Gemm<T>,
) -> Option<(Kernel<LinearBackwardParams<T>>, usize)> {
    let kernels = T::STREAM.filter(|_| !gpu.exact_f32())?.backward;
    let fits = dx.n <= 64 && dx.stream_kernel(gpu).is_some() && dw.stream_kernel(gpu).is_some();
    let (inputs, outputs) = (usize::from(dx.n > 32), stream_width(dw.m));
    fits.then(|| (kernels[inputs][outputs], backward_stream_shared_bytes(32 << inputs, 32 << outputs)))
}

/// The dynamic shared memory of the fused backward for `bk` inputs and `bmw` outputs per block (cuda/gemm.cu's layout,
/// in bf16 elements): the rings of g's and x's token tiles, [GEMM_STREAM_STAGES][GEMM_STREAM_BM][bmw + 8] and
/// [GEMM_STREAM_STAGES][GEMM_STREAM_BM][bk + 8], W [bmw][bk + 8] and each warp's dx rows [16][bk + 8].
fn backward_stream_shared_bytes(bk: usize, bmw: usize) -> usize {
    let warps = GEMM_STREAM_THREADS / 32;
    stream_wgrad_shared_bytes((bmw, bk)) + 2 * (bmw + warps * 16) * (bk + 8)
}
