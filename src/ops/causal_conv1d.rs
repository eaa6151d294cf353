//! Depthwise causal convolution along the sequence axis (Mamba's conv1d, kernel 4, left padding K - 1).
//!
//! Tokens x (G, L, C), weight w (C, K) (PyTorch's `Conv1d(groups=C)` weight (C, 1, K) squeezed), bias b (C). Each
//! output sees its own token and the K - 1 before it; tokens before the start of a sequence are zero:
//!
//! ```text
//!   y[g, t, c] = b[c] + sum_{k<K} w[c, k] x[g, t - (K-1) + k, c]       (terms with t - (K-1) + k < 0 dropped)
//!
//!   dL/dx[g, s, c] = sum_{k<K, t = s + (K-1) - k < L} w[c, k] g[g, t, c]
//!   dL/dw[c, k]    = sum_{g, t} g[g, t, c] x[g, t - (K-1) + k, c]
//!   dL/db[c]       = sum_{g, t} g[g, t, c]
//! ```
//!
//! CPU: the loops keep the channel axis innermost, where tokens are contiguous; the weight is used transposed to
//! (K, C) so that its rows are contiguous too.
//!
//! GPU (cuda/conv1d.cu): the forward and dx run one thread per element; dw and db reduce over all G L tokens in two
//! fixed-order stages (per-slice partials, then `sum_rows`), so they are deterministic. The tokens (x, y, dL/dy,
//! dL/dx) are stored as float32 or bf16 and computed on in float32; the weight, the bias and their gradients are
//! float32 for both (the precision policy, README "GPU").
//!
//! Cost per element of x (G L C), with K taps, in units of the storage size E of the tokens (4 bytes float32, 2 bf16;
//! the counting rules are in [`ops`](crate::ops)): forward 2E bytes (read x, write y) and 2K FLOPs; backward 3E bytes
//! (read x and dL/dy, write dL/dx) and 4K + 1 FLOPs (2K for dL/dx, 2K for dL/dw, 1 for dL/db); the GPU's two backward
//! kernels read dL/dy twice (4E bytes).

use cudarc::driver::LaunchConfig;

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_1d, GpuElement};
use crate::device::params::{kernel, Conv1dParams, CONV1D_COLS, CONV1D_LANES, CONV1D_MAX_K};
use crate::ops::linear::sum_rows;
use crate::ops::{check_param_kind, seq_dims};
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, by_gpu_type, ensure, Result};

/// Causal depthwise conv of tokens `x` (G, L, C) with `w` (C, K) and `bias` (C); returns (G, L, C) of x's dtype. `w`
/// and `bias` have x's dtype, or float32 for bf16 tokens.
pub fn causal_conv1d(tape: &mut Tape, x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let d = ConvDims::of(x, w, bias)?;
    let range = profile::forward("causal_conv1d", &[x, w, bias], d.flops());
    let y = match by_gpu_type!(x, forward_gpu(x, w, bias, d)) {
        Some(y) => y?,
        None => by_dtype!(x.dtype(), forward_cpu(x, w, bias, d))?,
    };
    range.done([&y]);
    tape.record(&[x, w, bias], &y, CausalConv1dBackward { x: x.clone(), w: w.clone(), dims: d });
    Ok(y)
}

/// Sequences G, length L, channels C, kernel size K.
#[derive(Clone, Copy, Debug)]
struct ConvDims {
    g: usize,
    l: usize,
    c: usize,
    k: usize,
}

impl ConvDims {
    /// Forward FLOPs, 2 G L C k.
    fn flops(&self) -> f64 {
        2.0 * (self.g * self.l * self.c * self.k) as f64
    }

    fn of(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<ConvDims> {
        let (g, l, c) = seq_dims(x, "causal_conv1d")?;
        ensure!(
            w.rank() == 2 && w.shape()[0] == c && w.shape()[1] > 0,
            Shape,
            "causal_conv1d: weight must be (C, K) with C = {c} channels of the input {:?} and K >= 1, got shape {:?}",
            x.shape(),
            w.shape()
        );
        check_param_kind(x, w, "causal_conv1d weight")?;
        check_param_kind(x, bias, "causal_conv1d bias")?;
        bias.check_shape(&[c], "causal_conv1d: bias (C)")?;
        Ok(ConvDims { g, l, c, k: w.shape()[1] })
    }
}

/// w (C, K) as (K, C).
fn transpose_weight<T: Real>(w: &[T], c: usize, k: usize) -> Vec<T> {
    let mut wt = vec![T::zero(); k * c];
    for ci in 0..c {
        for ki in 0..k {
            wt[ki * c + ci] = w[ci * k + ki];
        }
    }
    wt
}

fn forward_cpu<T: Real>(x: &Tensor, w: &Tensor, bias: &Tensor, d: ConvDims) -> Result<Tensor> {
    let ConvDims { g, l, c, k } = d;
    let (xv, bv) = (x.cpu::<T>()?, bias.cpu::<T>()?);
    let wt = transpose_weight(w.cpu::<T>()?, c, k);
    let mut y = vec![T::zero(); g * l * c];
    for gi in 0..g {
        let xs = &xv[gi * l * c..(gi + 1) * l * c];
        for t in 0..l {
            let yr = &mut y[(gi * l + t) * c..(gi * l + t + 1) * c];
            yr.copy_from_slice(bv);
            // Tap k reads token t - (K-1) + k; the first valid tap is K-1-t when t < K-1.
            for ki in (k - 1).saturating_sub(t)..k {
                let s = t + ki + 1 - k;
                let (xr, wr) = (&xs[s * c..(s + 1) * c], &wt[ki * c..(ki + 1) * c]);
                for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(wr) {
                    *yv += wv * xv;
                }
            }
        }
    }
    Tensor::from_vec(y, x.shape())
}

struct CausalConv1dBackward {
    x: Tensor,
    w: Tensor,
    dims: ConvDims,
}

fn backward_cpu<T: Real>(
    x: &Tensor,
    w: &Tensor,
    gout: &Tensor,
    d: ConvDims,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let ConvDims { g, l, c, k } = d;
    let (xv, gv) = (x.cpu::<T>()?, gout.cpu::<T>()?);
    let wt = transpose_weight(w.cpu::<T>()?, c, k);
    let mut dx = needs[0].then(|| vec![T::zero(); g * l * c]);
    let mut dwt = needs[1].then(|| vec![T::zero(); k * c]);
    let mut db = needs[2].then(|| vec![T::zero(); c]);
    for gi in 0..g {
        let base = gi * l * c;
        for t in 0..l {
            let gr = &gv[base + t * c..base + (t + 1) * c];
            if let Some(db) = db.as_mut() {
                for (dbv, &gvv) in db.iter_mut().zip(gr) {
                    *dbv += gvv;
                }
            }
            for ki in (k - 1).saturating_sub(t)..k {
                let s = base + (t + ki + 1 - k) * c;
                if let Some(dx) = dx.as_mut() {
                    let wr = &wt[ki * c..(ki + 1) * c];
                    for ((dxv, &wv), &gvv) in dx[s..s + c].iter_mut().zip(wr).zip(gr) {
                        *dxv += wv * gvv;
                    }
                }
                if let Some(dwt) = dwt.as_mut() {
                    let xr = &xv[s..s + c];
                    for ((dwv, &xvv), &gvv) in dwt[ki * c..(ki + 1) * c].iter_mut().zip(xr).zip(gr) {
                        *dwv += xvv * gvv;
                    }
                }
            }
        }
    }
    let dw = dwt.map(|dwt| transpose_weight(&dwt, k, c));
    Ok(vec![
        dx.map(|v| Tensor::from_vec(v, x.shape())).transpose()?,
        dw.map(|v| Tensor::from_vec(v, w.shape())).transpose()?,
        db.map(|v| Tensor::from_vec(v, &[c])).transpose()?,
    ])
}

impl Backward for CausalConv1dBackward {
    fn name(&self) -> &'static str {
        "causal_conv1d"
    }

    fn flops(&self) -> f64 {
        2.0 * self.dims.flops()
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        self.x.check_same_kind(grad_out, "causal_conv1d backward")?;
        match by_gpu_type!(self.x, backward_gpu(&self.x, &self.w, grad_out, self.dims, needs)) {
            Some(grads) => grads,
            None => by_dtype!(self.x.dtype(), backward_cpu(&self.x, &self.w, grad_out, self.dims, needs)),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// GPU

/// Token rows per block of the weight- and bias-gradient partial sums.
const PARAM_SLICE_ROWS: usize = 1024;

fn check_gpu(d: ConvDims) -> Result<()> {
    let ConvDims { g, l, c, k } = d;
    ensure!(g * l * c > 0, Shape, "causal_conv1d on the GPU: empty input (G, L, C) = ({g}, {l}, {c})");
    ensure!(
        k <= CONV1D_MAX_K,
        Shape,
        "causal_conv1d on the GPU supports kernels up to {CONV1D_MAX_K} taps, got K = {k}"
    );
    Ok(())
}

/// The parameters shared by the kernels of one conv1d on the GPU; each launch fills in its own pointers.
fn gpu_params<T: GpuElement>(d: ConvDims) -> Conv1dParams<T> {
    let ConvDims { g, l, c, k } = d;
    Conv1dParams { G: g as i64, L: l as i64, C: c as i64, K: k as i32, ..Default::default() }
}

/// y (G, L, C) stored as `T`, like x.
fn forward_gpu<T: GpuElement>(x: &Tensor, w: &Tensor, bias: &Tensor, d: ConvDims) -> Result<Tensor> {
    check_gpu(d)?;
    let ConvDims { g, l, c, .. } = d;
    let op = "causal_conv1d";
    let (xb, wb, bb) = (x.gpu_operand::<T>(op)?, w.gpu_operand::<f32>(op)?, bias.gpu_operand::<f32>(op)?);
    let gpu = &xb.gpu;
    let mut y = gpu.alloc_of::<T>(g * l * c, "causal_conv1d output")?;
    let p = Conv1dParams { x: xb.ptr(), w: wb.ptr(), bias: bb.ptr(), out: y.ptr_mut(), ..gpu_params(d) };
    gpu.launch(kernel::causal_conv1d_forward::<T>(), grid_1d(g * l * c), &p, &format!("causal_conv1d {d:?}"))?;
    Tensor::from_gpu(y, x.shape())
}

/// dx (G, L, C) stored as `T`, like x, and the float32 dw (C, K) and db (C), each only when wanted.
fn backward_gpu<T: GpuElement>(
    x: &Tensor,
    w: &Tensor,
    grad_out: &Tensor,
    d: ConvDims,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    check_gpu(d)?;
    let ConvDims { g, l, c, k } = d;
    let op = "causal_conv1d backward";
    let (xb, wb, gy) = (x.gpu_operand::<T>(op)?, w.gpu_operand::<f32>(op)?, grad_out.gpu_operand::<T>(op)?);
    let gpu = &xb.gpu;
    let shapes = format!("causal_conv1d backward {d:?}");
    let dx = if needs[0] {
        let mut dx = gpu.alloc_of::<T>(g * l * c, "causal_conv1d dx")?;
        let p = Conv1dParams { gy: gy.ptr(), w: wb.ptr(), out: dx.ptr_mut(), ..gpu_params(d) };
        gpu.launch(kernel::causal_conv1d_backward_input::<T>(), grid_1d(g * l * c), &p, &shapes)?;
        Some(Tensor::from_gpu(dx, x.shape())?)
    } else {
        None
    };
    let (mut dw, mut db) = (None, None);
    if needs[1] || needs[2] {
        // One partial row [dw (C K) | db (C)] per fixed slice of token rows, then fixed-order sums over the slices.
        let rows = g * l;
        let per_slice = PARAM_SLICE_ROWS.max(rows.div_ceil(65_535));
        let slices = rows.div_ceil(per_slice);
        let width = c * k + c;
        let mut part = gpu.alloc(slices * width, "causal_conv1d parameter partial sums")?;
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(CONV1D_COLS) as u32, slices as u32, 1),
            block_dim: (CONV1D_COLS as u32, CONV1D_LANES as u32, 1),
            shared_mem_bytes: 0,
        };
        let p = Conv1dParams {
            x: xb.ptr(),
            gy: gy.ptr(),
            part: part.ptr_mut(),
            rows_per_slice: per_slice as i64,
            ..gpu_params(d)
        };
        gpu.launch(kernel::causal_conv1d_param_partials::<T>(), cfg, &p, &shapes)?;
        if needs[1] {
            let sums = sum_rows(gpu, &part.slice.slice(..), slices, c * k, width, "causal_conv1d dw")?;
            dw = Some(Tensor::from_gpu(sums, w.shape())?);
        }
        if needs[2] {
            let sums = sum_rows(gpu, &part.slice.slice(c * k..), slices, c, width, "causal_conv1d db")?;
            db = Some(Tensor::from_gpu(sums, &[c])?);
        }
    }
    Ok(vec![dx, dw, db])
}
