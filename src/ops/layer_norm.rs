//! Layer normalisation over the last axis (PyTorch `LayerNorm(C)`), for token sequences (G, L, C) or any tensor
//! whose last axis holds the C channels.
//!
//! Each row r (one token: C contiguous values) is normalised with its own mean and biased variance, then scaled and
//! shifted per channel:
//!
//! ```text
//!   mu_r   = (1/C) sum_c x_rc
//!   var_r  = (1/C) sum_c (x_rc - mu_r)^2
//!   rstd_r = 1 / sqrt(var_r + eps)
//!   xhat_rc = (x_rc - mu_r) * rstd_r
//!   y_rc    = gamma_c * xhat_rc + beta_c
//! ```
//!
//! Backward, with g = dL/dy, h_rc = gamma_c g_rc (the gradient reaching xhat) and the row means
//! `<h>_r = (1/C) sum_c h_rc`, `<h xhat>_r = (1/C) sum_c h_rc xhat_rc`:
//!
//! ```text
//!   dL/dx_rc    = rstd_r * (h_rc - <h>_r - xhat_rc * <h xhat>_r)
//!   dL/dgamma_c = sum_r g_rc xhat_rc
//!   dL/dbeta_c  = sum_r g_rc
//! ```
//!
//! As in instance norm, the statistics use two passes with float64 accumulation, mu and rstd are saved per row in
//! float64, and xhat is formed in float64 in both passes, so only the final rounding to the tensor's dtype remains.
//!
//! On the GPU (kernels in `cuda/norm.cu`, x and y stored as float32 or bf16, computed in float32) a team of lanes
//! normalises one row (the smallest power of two, at most a warp, that gives each lane 8 channels: 4 lanes for 32
//! channels), holding it in registers for the same two passes (mean, then squared deviations); mu and rstd are saved
//! as float32 GPU tensors. With bf16 activations (x, y, dL/dy, dL/dx) gamma, beta, the statistics, the partial sums
//! and dL/dgamma, dL/dbeta stay float32 (the precision policy: normalisation statistics in float32). The backward
//! kernel forms dL/dx and, from the same reads, the parameter gradients' per-block partial sums (each team adds its
//! rows in order, then the teams of a block in a fixed order); one block per channel then adds the blocks' partials in
//! a fixed order, so dL/dgamma and dL/dbeta are deterministic. The GPU kernels take rows of up to
//! `LN_WIDE_CHANNELS` (512) channels.
//!
//! Cost per element, in units of the storage size E (4 bytes float32, 2 bf16; the counting rules are in
//! [`ops`](crate::ops)): forward 2E bytes (read x, write y; a row stays in registers between the passes) and about 8
//! FLOPs; backward 3E bytes (read x and dL/dy, write dL/dx) and about 15 FLOPs (10 for dL/dx, 5 for dL/dgamma and
//! dL/dbeta). Memory-bound.

use cudarc::driver::LaunchConfig;

use crate::autograd::{Backward, Tape};
use crate::device::cuda::GpuElement;
use crate::device::params::{
    kernel, LayerNormParams, NormSumRowsParams, LN_GROUP, LN_NARROW_CHANNELS, LN_THREADS, LN_WIDE_CHANNELS,
};
use crate::ops::check_param_kind;
use crate::ops::instance_norm::moments;
use crate::ops::operand::{Kept, Operand};
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, by_gpu_type, ensure, Error, Result};

/// The eps of the LayerNorm in front of every Mamba layer (PyTorch's default).
pub const LN_EPS: f64 = 1e-5;

/// Layer normalisation of `x` over its last axis (size C) with `eps`, then `gamma[c] * xhat + beta[c]` (`gamma`,
/// `beta` of shape (C), of x's dtype, or float32 for a bf16 `x`). `x` may have any rank; every position of the
/// leading axes is one row.
pub fn layer_norm<'a>(
    tape: &mut Tape,
    x: impl Into<Operand<'a>>,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (x, kept) = {
        let x = x.into();
        (x.value(), x.keep())
    };
    let c = x.shape().last().copied().unwrap_or(0);
    ensure!(c > 0, Shape, "layer_norm: the last axis (channels) of x is empty, shape {:?}", x.shape());
    check_param_kind(x, gamma, "layer_norm gamma")?;
    check_param_kind(x, beta, "layer_norm beta")?;
    gamma.check_shape(&[c], "layer_norm gamma (one per element of the last axis of the input)")?;
    beta.check_shape(&[c], "layer_norm beta (one per element of the last axis of the input)")?;
    ensure!(eps.is_finite() && eps > 0.0, Shape, "layer_norm: eps must be positive and finite, got {eps}");

    let range = profile::forward("layer_norm", &[x], 0.0);
    let (y, mean, rstd) = match by_gpu_type!(x, forward_gpu(x, gamma, beta, eps)) {
        Some(out) => out?,
        None => by_dtype!(x.dtype(), forward_cpu(x, gamma, beta, eps))?,
    };
    range.done([&y]);
    tape.record(&[x, gamma, beta], &y, LayerNormBackward { x: kept, gamma: gamma.clone(), mean, rstd });
    Ok(y)
}

/// Returns y and the per-row mean and rstd, each of shape (rows) in float64.
fn forward_cpu<T: Real>(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let (xs, gs, bs) = (x.cpu::<T>()?, gamma.cpu::<T>()?, beta.cpu::<T>()?);
    let c = gs.len();
    let rows = xs.len() / c;
    let mut y = vec![T::zero(); xs.len()];
    let mut mean = Vec::with_capacity(rows);
    let mut rstd = Vec::with_capacity(rows);
    for (xr, yr) in xs.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        let (m, r) = moments(xr, eps);
        for (((yv, &xv), &g), &b) in yr.iter_mut().zip(xr).zip(gs).zip(bs) {
            *yv = T::from_f64((xv.to_f64() - m) * r * g.to_f64() + b.to_f64());
        }
        mean.push(m);
        rstd.push(r);
    }
    // A tensor with no rows still needs a valid (non-empty) shape for its statistics.
    let stats_shape = [rows];
    Ok((Tensor::from_vec(y, x.shape())?, Tensor::from_vec(mean, &stats_shape)?, Tensor::from_vec(rstd, &stats_shape)?))
}

struct LayerNormBackward {
    /// The input, or what rebuilds it.
    x: Kept,
    gamma: Tensor,
    /// Per-row mean, shape (rows): float64 on the CPU, float32 on the GPU.
    mean: Tensor,
    /// Per-row 1/sqrt(var + eps), shape (rows): float64 on the CPU, float32 on the GPU.
    rstd: Tensor,
}

impl Backward for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer_norm"
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let x = &self.x.get()?;
        x.check_same_kind(grad_out, "layer_norm backward")?;
        grad_out.check_shape(x.shape(), "layer_norm backward gradient")?;
        match by_gpu_type!(x, backward_gpu(self, x, grad_out, needs)) {
            Some(grads) => grads,
            None => by_dtype!(x.dtype(), backward_cpu(self, x, grad_out, needs)),
        }
    }
}

fn backward_cpu<T: Real>(
    b: &LayerNormBackward,
    x: &Tensor,
    grad_out: &Tensor,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let (xs, gs, gamma) = (x.cpu::<T>()?, grad_out.cpu::<T>()?, b.gamma.cpu::<T>()?);
    let (ms, rs) = (b.mean.cpu::<f64>()?, b.rstd.cpu::<f64>()?);
    let c = gamma.len();
    let inv_c = 1.0 / c as f64;
    let gamma64: Vec<f64> = gamma.iter().map(|&w| w.to_f64()).collect();
    let want_params = needs[1] || needs[2];
    let mut dx = if needs[0] { vec![T::zero(); xs.len()] } else { Vec::new() };
    let mut dgamma = vec![0.0f64; if want_params { c } else { 0 }];
    let mut dbeta = vec![0.0f64; if want_params { c } else { 0 }];
    // One row's xhat, reused by both sums and dL/dx.
    let mut xhat = vec![0.0f64; c];
    for (row, (xr, gr)) in xs.chunks_exact(c).zip(gs.chunks_exact(c)).enumerate() {
        let (m, r) = (ms[row], rs[row]);
        for (xh, &xv) in xhat.iter_mut().zip(xr) {
            *xh = (xv.to_f64() - m) * r;
        }
        if want_params {
            for (((dgv, dbv), &xh), &gv) in dgamma.iter_mut().zip(dbeta.iter_mut()).zip(&xhat).zip(gr) {
                let g = gv.to_f64();
                *dgv += g * xh;
                *dbv += g;
            }
        }
        if needs[0] {
            let (mut sum_h, mut sum_hx) = (0.0f64, 0.0f64);
            for ((&xh, &gv), &w) in xhat.iter().zip(gr).zip(&gamma64) {
                let h = gv.to_f64() * w;
                sum_h += h;
                sum_hx += h * xh;
            }
            let (mean_h, mean_hx) = (sum_h * inv_c, sum_hx * inv_c);
            let dxr = &mut dx[row * c..(row + 1) * c];
            for (((d, &xh), &gv), &w) in dxr.iter_mut().zip(&xhat).zip(gr).zip(&gamma64) {
                *d = T::from_f64(r * (gv.to_f64() * w - mean_h - xh * mean_hx));
            }
        }
    }
    let per_channel = |s: Vec<f64>| Tensor::from_vec(s.into_iter().map(T::from_f64).collect::<Vec<T>>(), &[c]);
    Ok(vec![
        if needs[0] { Some(Tensor::from_vec(dx, x.shape())?) } else { None },
        if needs[1] { Some(per_channel(dgamma)?) } else { None },
        if needs[2] { Some(per_channel(dbeta)?) } else { None },
    ])
}

/// The row kernels keep at least this many blocks (several waves on any GPU) before their teams take more than one
/// row each.
const LN_MIN_BLOCKS: usize = 2048;
/// The most rows one team takes (fewer blocks: fewer partial sums of the parameter gradients to add).
const LN_MAX_ROWS_PER_TEAM: usize = 16;
/// Threads per block of the final per-channel sums (any multiple of 32).
const REDUCE_THREADS: u32 = 256;

/// How the row kernels lay out rows of `c` channels: the lanes per row (the smallest power of two that gives each
/// lane at most one group of `LN_GROUP` channels, at most 32) and whether the `_wide` kernels (several groups per
/// lane) are needed.
struct RowLayout {
    lanes: usize,
    wide: bool,
}

impl RowLayout {
    fn of(c: usize, shape: &[usize]) -> Result<RowLayout> {
        ensure!(
            c <= LN_WIDE_CHANNELS,
            Shape,
            "layer_norm: the GPU kernels take rows of up to {LN_WIDE_CHANNELS} channels, got {c} (shape {shape:?}); \
             a model this wide needs LN_WIDE_GROUPS raised in cuda/norm.cuh (or runs on the CPU)"
        );
        Ok(RowLayout { lanes: c.div_ceil(LN_GROUP).next_power_of_two().min(32), wide: c > LN_NARROW_CHANNELS })
    }

    /// Rows per block of `LN_THREADS` threads for `rows` rows: its teams (one row each at a time) times the rows
    /// each team takes, up to `LN_MAX_ROWS_PER_TEAM` while `LN_MIN_BLOCKS` blocks remain. It depends on the shape
    /// alone, and so do the order of the parameter-gradient sums and their bits.
    fn rows_per_block(&self, rows: usize) -> usize {
        let teams = LN_THREADS / self.lanes;
        teams * (rows / (teams * LN_MIN_BLOCKS)).clamp(1, LN_MAX_ROWS_PER_TEAM)
    }
}

/// A launch of `blocks` (at least one) blocks of `threads` threads with `shared` bytes of dynamic shared memory,
/// failing cleanly past the grid limit.
fn launch_config(blocks: usize, threads: usize, shared: usize, shape: &[usize]) -> Result<LaunchConfig> {
    let grid = u32::try_from(blocks.max(1))
        .ok()
        .filter(|&g| g < (1 << 31))
        .ok_or_else(|| Error::Shape(format!("layer_norm: shape {shape:?} needs {blocks} blocks, too many")))?;
    Ok(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: shared as u32 })
}

/// Returns y (stored as `T`, like x) and the per-row mean and rstd, each of shape (rows) in float32 on the GPU.
fn forward_gpu<T: GpuElement>(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "layer_norm";
    let (xb, gb, bb) = (x.gpu_operand::<T>(op)?, gamma.gpu_operand::<f32>(op)?, beta.gpu_operand::<f32>(op)?);
    let gpu = &xb.gpu;
    let c = gamma.numel();
    let rows = x.numel() / c;
    let layout = RowLayout::of(c, x.shape())?;
    let mut y = gpu.alloc_of::<T>(x.numel(), "layer_norm output")?;
    let mut mean = gpu.alloc(rows, "layer_norm mean")?;
    let mut rstd = gpu.alloc(rows, "layer_norm rstd")?;
    let p = LayerNormParams {
        x: xb.ptr(),
        gamma: gb.ptr(),
        beta: bb.ptr(),
        out: y.ptr_mut(),
        mean_out: mean.ptr_mut(),
        rstd_out: rstd.ptr_mut(),
        rows: rows as i64,
        C: c as i64,
        rows_per_block: layout.rows_per_block(rows) as i64,
        lanes: layout.lanes as i32,
        eps: eps as f32,
        ..Default::default()
    };
    let k = if layout.wide { kernel::layer_norm_forward_wide::<T>() } else { kernel::layer_norm_forward::<T>() };
    let cfg = launch_config(rows.div_ceil(layout.rows_per_block(rows)), LN_THREADS, 0, x.shape())?;
    gpu.launch(k, cfg, &p, &format!("layer_norm {:?}", x.shape()))?;
    Ok((Tensor::from_gpu(y, x.shape())?, Tensor::from_gpu(mean, &[rows])?, Tensor::from_gpu(rstd, &[rows])?))
}

/// dL/dx (stored as `T`, like x) and the float32 dL/dgamma, dL/dbeta, each when `needs` asks.
fn backward_gpu<T: GpuElement>(
    b: &LayerNormBackward,
    x: &Tensor,
    grad_out: &Tensor,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let op = "layer_norm backward";
    let (xb, gb) = (x.gpu_operand::<T>(op)?, grad_out.gpu_operand::<T>(op)?);
    let (gammab, mb, rb) =
        (b.gamma.gpu_operand::<f32>(op)?, b.mean.gpu_operand::<f32>(op)?, b.rstd.gpu_operand::<f32>(op)?);
    let gpu = &xb.gpu;
    let c = b.gamma.numel();
    let rows = x.numel() / c;
    let shapes = format!("layer_norm backward {:?}", x.shape());
    let layout = RowLayout::of(c, x.shape())?;
    let want_params = needs[1] || needs[2];
    if !needs[0] && !want_params {
        return Ok(vec![None, None, None]);
    }
    let rows_per_block = layout.rows_per_block(rows);
    let blocks = rows.div_ceil(rows_per_block).max(1);
    let mut dx = if needs[0] { Some(gpu.alloc_of::<T>(x.numel(), "layer_norm input gradient")?) } else { None };
    // Per-(channel, block) partial sums, laid out (c, blocks) so that the final sums read each channel's partials
    // contiguously. A tensor without rows still gets one block, which writes zeros.
    let mut partials = if want_params {
        Some((
            gpu.alloc(c * blocks, "layer_norm gamma gradient partials")?,
            gpu.alloc(c * blocks, "layer_norm beta gradient partials")?,
        ))
    } else {
        None
    };
    let (pgamma, pbeta) = partials.as_mut().map_or(Default::default(), |(g, b)| (g.ptr_mut(), b.ptr_mut()));
    let p = LayerNormParams {
        x: xb.ptr(),
        g: gb.ptr(),
        gamma: gammab.ptr(),
        mean: mb.ptr(),
        rstd: rb.ptr(),
        out: dx.as_mut().map_or(Default::default(), |d| d.ptr_mut()),
        pgamma,
        pbeta,
        rows: rows as i64,
        C: c as i64,
        rows_per_block: rows_per_block as i64,
        lanes: layout.lanes as i32,
        ..Default::default()
    };
    // The blocks add their warps' parameter sums through shared memory: (warps, c) floats.
    let shared = if want_params { LN_THREADS / 32 * c * std::mem::size_of::<f32>() } else { 0 };
    let k = if layout.wide { kernel::layer_norm_backward_wide::<T>() } else { kernel::layer_norm_backward::<T>() };
    gpu.launch(k, launch_config(blocks, LN_THREADS, shared, x.shape())?, &p, &shapes)?;
    let dx = dx.map(|d| Tensor::from_gpu(d, x.shape())).transpose()?;
    let (dgamma, dbeta) = if let Some((pgamma, pbeta)) = &partials {
        // One block per channel adds its partials in a fixed order.
        let per_channel = launch_config(c, REDUCE_THREADS as usize, 0, x.shape())?;
        let mut dgamma = gpu.alloc(c, "layer_norm gamma gradient")?;
        let mut dbeta = gpu.alloc(c, "layer_norm beta gradient")?;
        for (partials, sums) in [(pgamma, &mut dgamma), (pbeta, &mut dbeta)] {
            let p = NormSumRowsParams { a: partials.ptr(), out: sums.ptr_mut(), len: blocks as i64 };
            gpu.launch(kernel::layer_norm_sum_partials, per_channel, &p, &shapes)?;
        }
        (Some(Tensor::from_gpu(dgamma, &[c])?), Some(Tensor::from_gpu(dbeta, &[c])?))
    } else {
        (None, None)
    };
    Ok(vec![dx, if needs[1] { dgamma } else { None }, if needs[2] { dbeta } else { None }])
}
