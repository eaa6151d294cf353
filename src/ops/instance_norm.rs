//! Instance normalisation with a learnable per-channel scale and shift (PyTorch `InstanceNorm{2,3}d(affine=True)`).
//!
//! For a feature map x of shape (N, C, \[D,\] H, W), each plane p = (n, c) of V = D*H*W voxels is normalised with its
//! own mean and biased variance:
//!
//! ```text
//!   mu_p   = (1/V) sum_i x_pi
//!   var_p  = (1/V) sum_i (x_pi - mu_p)^2
//!   rstd_p = 1 / sqrt(var_p + eps)
//!   xhat_pi = (x_pi - mu_p) * rstd_p
//!   y_pi    = gamma_c * xhat_pi + beta_c
//! ```
//!
//! Backward, with g = dL/dy and the plane means `<g>_p = (1/V) sum_i g_pi`, `<g xhat>_p = (1/V) sum_i g_pi xhat_pi`
//! (the derivatives of mu and rstd with respect to every x_pi make the two correction terms):
//!
//! ```text
//!   dL/dx_pi    = gamma_c * rstd_p * (g_pi - <g>_p - xhat_pi * <g xhat>_p)
//!   dL/dgamma_c = sum_n sum_i g_pi xhat_pi
//!   dL/dbeta_c  = sum_n sum_i g_pi
//! ```
//!
//! Fused activation ([`instance_norm_act`], nnU-Net's InstanceNorm -> LeakyReLU): out = act(y) is computed by the
//! same kernel, and the backward recomputes y from the saved x and statistics to form dL/dy = dL/dout act'(y), so y
//! is never stored: one full-size tensor less per conv block, and one read and write of it less each way. y is
//! formed by the same expression in the forward and the backward, so the results are the same bits as
//! instance_norm followed by the activation op.
//!
//! Fused residual ([`instance_norm_add_act`], a residual block's end: InstanceNorm, the shortcut added, LeakyReLU):
//! out = act(y + s) by the same kernel, y and y + s rounded to the storage type on the way as the three unfused ops
//! store them (the same bits), so neither y nor y + s is written and read back. The backward takes act' from the
//! kept output (LeakyReLU's derivative has its output's sign; the next op keeps that output anyway), which gives the
//! shortcut's gradient dL/ds = dL/dout act', and runs the norm's backward on it.
//!
//! The statistics are computed in two passes (mean, then the mean squared deviation) with float64 accumulation for
//! both dtypes, so a large common offset in x does not cancel the variance away. mu and rstd are saved per plane in
//! float64 (N*C numbers), and xhat is formed in float64 in both passes: rounding mu to float32 would shift a map
//! with mean 1000 by up to half an ulp of 1000 (3e-5 after normalisation), while this way only the final rounding
//! of y and dL/dx to the tensor's dtype remains. The backward recomputes exactly the xhat of the forward.
//!
//! On the GPU (kernels in `cuda/norm.cu`, x and y stored as float32 or bf16, computed in float32) each plane is cut
//! into chunks of `IN_CHUNK` voxels, one warp per (plane, chunk), each lane reading 16-byte vectors where the plane
//! size allows it. The statistics are the exact two-pass ones regrouped by chunk: each chunk's mean m_k and squared
//! deviation M2_k (two passes over the chunk held in registers), then per plane mu = (1/V) sum_k n_k m_k and
//! var = (1/V) sum_k (M2_k + n_k (m_k - mu)^2), sums of squares that no common offset can cancel. mu and rstd are
//! saved as float32 GPU tensors. The backward's plane sums of g and g xhat are per-chunk warp sums added per plane in
//! a fixed order; dgamma, dbeta add the planes over n in order. With bf16 activations (x, y, dL/dy, dL/dx in bf16)
//! gamma, beta, the statistics, every sum and dL/dgamma, dL/dbeta stay float32 (the precision policy: normalisation
//! statistics in float32); each bf16 output is rounded once.
//!
//! Cost per element, in units of the storage size E (4 bytes float32, 2 bf16; the counting rules are in
//! [`ops`](crate::ops)): forward at least 2E bytes (read x, write y) and about 8 FLOPs (mean 1, squared deviation 3,
//! normalise, scale and shift 4); backward at least 3E bytes (read x and dL/dy, write dL/dx) and about 12 FLOPs. A
//! plane does not fit in cache, so the GPU reads x twice in the forward (statistics, then apply: 3E bytes) and x and
//! dL/dy twice in the backward (plane sums, then dL/dx: 5E bytes). Memory-bound.

use std::borrow::Cow;

use cudarc::driver::LaunchConfig;

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_1d, GpuElement};
use crate::device::params::{kernel, ConstPtr, InstanceNormParams, NormSumRowsParams, IN_CHUNK, IN_THREADS, IN_WARPS};
use crate::ops::activation::{activation_grad, Activation};
use crate::ops::{check_param_kind, MapDims};
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, by_gpu_type, ensure, Error, Result};

/// The eps of every InstanceNorm in LKM-UNet (PyTorch's default).
pub const IN_EPS: f64 = 1e-5;

/// Instance normalisation of a feature map `x` (N, C, H, W) or (N, C, D, H, W): each (n, c) plane is normalised
/// over its spatial axes with its biased variance and `eps`, then scaled by `gamma[c]` and shifted by `beta[c]`
/// (`gamma`, `beta` of shape (C), of x's dtype, or float32 for a bf16 `x`).
pub fn instance_norm(tape: &mut Tape, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    instance_norm_act(tape, x, gamma, beta, eps, None)
}

/// [`instance_norm`] followed by `act` (when given) in one op: the activation's input is recomputed in the backward
/// pass instead of being stored (see the module docs).
pub fn instance_norm_act(
    tape: &mut Tape,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Option<Activation>,
) -> Result<Tensor> {
    Ok(Normalized::new(tape, x, gamma, beta, eps, act)?.value)
}

/// `act(instance_norm(x) + skip)` in one op (see the module docs): a residual block's second norm, its shortcut
/// `skip` (x's shape and dtype) and the block's LeakyReLU. `act` must be LeakyReLU, whose derivative the backward
/// pass takes from the output.
pub fn instance_norm_add_act(
    tape: &mut Tape,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    skip: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    ensure!(
        act == Activation::LeakyRelu,
        Config,
        "instance_norm_add_act: the backward pass takes the activation's derivative from its output, which only \
         LeakyReLU allows; got {act:?}"
    );
    x.check_same_kind(skip, "instance_norm_add_act (input vs skip)")?;
    skip.check_shape(x.shape(), "instance_norm_add_act skip (the shortcut, of the input's shape)")?;
    let dims = check_instance_norm(x, gamma, beta, eps)?;
    let range = profile::forward(ADD_ACT_NAME, &[x, skip], 0.0);
    let n = normalization(x, gamma, beta, dims, eps, None)?;
    let out = n.apply_with(Some(skip), Some(act))?;
    range.done([&out]);
    let saved = InstanceNormAddActBackward { n, out: out.clone(), act };
    tape.record(&[x, gamma, beta, skip], &out, saved);
    Ok(out)
}

/// The output of [`instance_norm_act`] together with what makes it, for an op that takes it as an [`Operand`] (a
/// residual block's second convolution): that op keeps the norm's input, parameters and statistics, which the norm's
/// own node keeps anyway, instead of the output, and rebuilds the output in its backward pass by the same kernel on
/// the same values (the same bits). Drop the `Normalized` after the op: its value is then freed.
///
/// [`Operand`]: crate::ops::operand::Operand
#[derive(Debug)]
pub struct Normalized {
    value: Tensor,
    normalization: Normalization,
}

impl Normalized {
    /// [`instance_norm_act`], recorded on `tape` as usual.
    pub fn new(
        tape: &mut Tape,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
        act: Option<Activation>,
    ) -> Result<Normalized> {
        let dims = check_instance_norm(x, gamma, beta, eps)?;
        let name = op_name(act);
        let range = profile::forward(name, &[x], 0.0);
        let normalization = normalization(x, gamma, beta, dims, eps, act)?;
        let value = normalization.apply()?;
        range.done([&value]);
        let n = &normalization;
        tape.record(&[x, &n.gamma, &n.beta], &value, InstanceNormBackward { n: normalization.clone(), name });
        Ok(Normalized { value, normalization })
    }

    /// The norm's (activated) output.
    pub fn value(&self) -> &Tensor {
        &self.value
    }

    /// What makes the output again.
    pub(crate) fn normalization(&self) -> &Normalization {
        &self.normalization
    }
}

/// One instance norm as its backward pass and [`Normalized`]'s consumers see it: the input, the parameters, the
/// per-plane statistics and the activation. [`Normalization::apply`] makes the output from them.
#[derive(Clone, Debug)]
pub(crate) struct Normalization {
    x: Tensor,
    gamma: Tensor,
    /// Read by the backward pass only with a fused activation (to recompute its input).
    beta: Tensor,
    /// Per-plane mean, shape (N, C): float64 on the CPU, float32 on the GPU.
    mean: Tensor,
    /// Per-plane 1/sqrt(var + eps), shape (N, C): float64 on the CPU, float32 on the GPU.
    rstd: Tensor,
    dims: MapDims,
    act: Option<Activation>,
}

impl Normalization {
    /// `act(gamma (x - mean) rstd + beta)`, stored like x: the forward pass's output, made the same way each time.
    pub(crate) fn apply(&self) -> Result<Tensor> {
        self.apply_with(None, self.act)
    }

    /// `act(y + skip)` with y = `gamma (x - mean) rstd + beta`, y and y + skip rounded to x's type first (as the
    /// norm, add and activation ops store them); without `skip`, `act(y)`.
    fn apply_with(&self, skip: Option<&Tensor>, act: Option<Activation>) -> Result<Tensor> {
        match by_gpu_type!(self.x, apply_gpu(self, skip, act)) {
            Some(y) => y,
            None => by_dtype!(self.x.dtype(), apply_cpu(self, skip, act)),
        }
    }

    /// [dL/dx, dL/dgamma, dL/dbeta] from dL/d(output) `grad_out`, each where `needs` asks.
    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        self.x.check_same_kind(grad_out, "instance_norm backward")?;
        grad_out.check_shape(self.x.shape(), "instance_norm backward gradient")?;
        match by_gpu_type!(self.x, backward_gpu(self, grad_out, needs)) {
            Some(grads) => grads,
            None => by_dtype!(self.x.dtype(), backward_cpu(self, grad_out, needs)),
        }
    }
}

/// Checks an instance norm's operands; returns x's dimensions.
fn check_instance_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<MapDims> {
    let dims = MapDims::of(x, "instance_norm")?;
    check_param_kind(x, gamma, "instance_norm gamma")?;
    check_param_kind(x, beta, "instance_norm beta")?;
    gamma.check_shape(&[dims.c], "instance_norm gamma (one per channel of the input)")?;
    beta.check_shape(&[dims.c], "instance_norm beta (one per channel of the input)")?;
    ensure!(eps.is_finite() && eps > 0.0, Shape, "instance_norm: eps must be positive and finite, got {eps}");
    Ok(dims)
}

/// The per-plane statistics of `x` with what the output is made from.
fn normalization(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    dims: MapDims,
    eps: f64,
    act: Option<Activation>,
) -> Result<Normalization> {
    let (mean, rstd) = match by_gpu_type!(x, moments_gpu(x, dims, eps)) {
        Some(stats) => stats?,
        None => by_dtype!(x.dtype(), moments_cpu(x, dims, eps))?,
    };
    Ok(Normalization { x: x.clone(), gamma: gamma.clone(), beta: beta.clone(), mean, rstd, dims, act })
}

/// [`instance_norm_add_act`]'s name in traces and profiles.
const ADD_ACT_NAME: &str = "instance_norm_add_leaky_relu";

/// The op's name in traces and profiles.
fn op_name(act: Option<Activation>) -> &'static str {
    match act {
        None => "instance_norm",
        Some(Activation::LeakyRelu) => "instance_norm_leaky_relu",
        Some(Activation::Silu) => "instance_norm_silu",
        Some(Activation::Softplus) => "instance_norm_softplus",
    }
}

/// The kernels' code for `act` (-1 for none; else the ActivationCode of cuda/common.cuh).
fn act_code(act: Option<Activation>) -> i32 {
    act.map_or(-1, |a| a as i32)
}

/// Mean and 1/sqrt(var + eps) of one plane or row, in two passes with float64 accumulation (empty: 0 and
/// 1/sqrt(eps)).
pub(crate) fn moments<T: Real>(v: &[T], eps: f64) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| x.to_f64()).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| {
            let d = x.to_f64() - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The per-plane mean and rstd, each of shape (N, C) in float64.
fn moments_cpu<T: Real>(x: &Tensor, dims: MapDims, eps: f64) -> Result<(Tensor, Tensor)> {
    let xs = x.cpu::<T>()?;
    let v = dims.voxels();
    let (mean, rstd): (Vec<f64>, Vec<f64>) =
        (0..dims.n * dims.c).map(|p| moments(&xs[p * v..(p + 1) * v], eps)).unzip();
    let stats_shape = [dims.n, dims.c];
    Ok((Tensor::from_vec(mean, &stats_shape)?, Tensor::from_vec(rstd, &stats_shape)?))
}

/// The output from the saved statistics (see [`Normalization::apply_with`]).
fn apply_cpu<T: Real>(n: &Normalization, skip: Option<&Tensor>, act: Option<Activation>) -> Result<Tensor> {
    let (xs, gs, bs) = (n.x.cpu::<T>()?, n.gamma.cpu::<T>()?, n.beta.cpu::<T>()?);
    let skip = skip.map(|s| s.cpu::<T>()).transpose()?;
    let (ms, rs) = (n.mean.cpu::<f64>()?, n.rstd.cpu::<f64>()?);
    let (dims, v) = (n.dims, n.dims.voxels());
    let mut y = vec![T::zero(); xs.len()];
    for p in 0..dims.n * dims.c {
        let c = p % dims.c;
        let (m, scale, shift) = (ms[p], gs[c].to_f64() * rs[p], bs[c].to_f64());
        for (i, (yv, &xv)) in y[p * v..(p + 1) * v].iter_mut().zip(&xs[p * v..(p + 1) * v]).enumerate() {
            let normed = T::from_f64((xv.to_f64() - m) * scale + shift);
            *yv = activated(act, skip.map_or(normed, |s| normed + s[p * v + i]));
        }
    }
    Tensor::from_vec(y, n.x.shape())
}

/// `act(y)`, or y without an activation.
fn activated<T: Real>(act: Option<Activation>, y: T) -> T {
    act.map_or(y, |a| a.value(y))
}

struct InstanceNormBackward {
    n: Normalization,
    name: &'static str,
}

impl Backward for InstanceNormBackward {
    fn name(&self) -> &'static str {
        self.name
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        self.n.backward(grad_out, needs)
    }
}

/// [`instance_norm_add_act`]'s backward: dL/d(y + skip) = dL/dout act' from the kept output, which is the skip's
/// gradient and, through the norm's backward (no activation), gives dx, dgamma, dbeta.
struct InstanceNormAddActBackward {
    /// The norm, without the activation.
    n: Normalization,
    out: Tensor,
    act: Activation,
}

impl Backward for InstanceNormAddActBackward {
    fn name(&self) -> &'static str {
        ADD_ACT_NAME
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let g = activation_grad(&self.out, grad_out, self.act)?;
        let mut grads = self.n.backward(&g, &needs[..3])?;
        grads.push(needs[3].then_some(g));
        Ok(grads)
    }
}

fn backward_cpu<T: Real>(b: &Normalization, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let (xs, gs, gamma, beta) = (b.x.cpu::<T>()?, grad_out.cpu::<T>()?, b.gamma.cpu::<T>()?, b.beta.cpu::<T>()?);
    let (ms, rs) = (b.mean.cpu::<f64>()?, b.rstd.cpu::<f64>()?);
    let dims = b.dims;
    let v = dims.voxels();
    let inv_v = 1.0 / v.max(1) as f64;
    let mut dx = if needs[0] { vec![T::zero(); xs.len()] } else { Vec::new() };
    let mut dgamma = vec![0.0f64; dims.c];
    let mut dbeta = vec![0.0f64; dims.c];
    for p in 0..dims.n * dims.c {
        let c = p % dims.c;
        let (m, r) = (ms[p], rs[p]);
        let xp = &xs[p * v..(p + 1) * v];
        // dL/dy: the incoming gradient, through the fused activation's derivative at y (formed as the forward did).
        let (scale, shift) = (gamma[c].to_f64() * r, beta[c].to_f64());
        let gp: Cow<[T]> = match b.act {
            None => Cow::Borrowed(&gs[p * v..(p + 1) * v]),
            Some(a) => xp
                .iter()
                .zip(&gs[p * v..(p + 1) * v])
                .map(|(&xv, &gv)| gv * a.derivative(T::from_f64((xv.to_f64() - m) * scale + shift)))
                .collect(),
        };
        let gp = &gp[..];
        let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
        for (&xv, &gv) in xp.iter().zip(gp) {
            let g = gv.to_f64();
            sum_g += g;
            sum_gx += g * (xv.to_f64() - m) * r;
        }
        dgamma[c] += sum_gx;
        dbeta[c] += sum_g;
        if needs[0] {
            let k = gamma[c].to_f64() * r;
            let (mean_g, mean_gx) = (sum_g * inv_v, sum_gx * inv_v);
            for ((d, &xv), &gv) in dx[p * v..(p + 1) * v].iter_mut().zip(xp).zip(gp) {
                let xhat = (xv.to_f64() - m) * r;
                *d = T::from_f64(k * (gv.to_f64() - mean_g - xhat * mean_gx));
            }
        }
    }
    let per_channel = |s: Vec<f64>| Tensor::from_vec(s.into_iter().map(T::from_f64).collect::<Vec<T>>(), &[dims.c]);
    Ok(vec![
        if needs[0] { Some(Tensor::from_vec(dx, b.x.shape())?) } else { None },
        if needs[1] { Some(per_channel(dgamma)?) } else { None },
        if needs[2] { Some(per_channel(dbeta)?) } else { None },
    ])
}

/// Threads per block of the per-plane reductions (any multiple of 32).
const REDUCE_THREADS: u32 = 256;

/// A launch of `blocks` blocks of `threads` threads, failing cleanly past the grid limit.
fn blocks_of(blocks: usize, threads: u32, shape: &[usize]) -> Result<LaunchConfig> {
    let grid = u32::try_from(blocks.max(1))
        .ok()
        .filter(|&g| g < (1 << 31))
        .ok_or_else(|| Error::Shape(format!("instance_norm: shape {shape:?} needs {blocks} blocks, too many")))?;
    Ok(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// The sizes every instance-norm kernel of one map takes; each launch adds its pointers.
fn gpu_params<T: GpuElement>(dims: MapDims, chunks: usize) -> InstanceNormParams<T> {
    InstanceNormParams {
        V: dims.voxels() as i64,
        C: dims.c as i64,
        N: dims.n as i64,
        chunks: chunks as i64,
        act: act_code(None),
        ..Default::default()
    }
}

/// The chunk layout of a map: (planes, chunks per plane). An empty plane still has one (empty) chunk.
fn chunking(dims: MapDims) -> (usize, usize) {
    (dims.n * dims.c, dims.voxels().div_ceil(IN_CHUNK).max(1))
}

/// The launch of the chunk kernels: one warp per chunk, `IN_WARPS` per block.
fn chunk_blocks(planes: usize, chunks: usize, shape: &[usize]) -> Result<LaunchConfig> {
    blocks_of((planes * chunks).div_ceil(IN_WARPS), IN_THREADS as u32, shape)
}

/// The per-plane mean and rstd, each of shape (N, C) in float32 on the GPU.
fn moments_gpu<T: GpuElement>(x: &Tensor, dims: MapDims, eps: f64) -> Result<(Tensor, Tensor)> {
    let xb = x.gpu_operand::<T>("instance_norm")?;
    let gpu = &xb.gpu;
    let (planes, chunks) = chunking(dims);
    let stats_shape = [dims.n, dims.c];
    let mut mean = gpu.alloc(planes, "instance_norm mean")?;
    let mut rstd = gpu.alloc(planes, "instance_norm rstd")?;
    if planes > 0 {
        // (With no plane there is nothing to launch: a grid of zero blocks is not a valid launch.)
        let shapes = format!("instance_norm {:?}", x.shape());
        let mut chunk_mean = gpu.alloc(planes * chunks, "instance_norm chunk means")?;
        let mut chunk_m2 = gpu.alloc(planes * chunks, "instance_norm chunk squared deviations")?;
        let (chunk_mean, chunk_m2) = (chunk_mean.ptr_mut(), chunk_m2.ptr_mut());
        let p = InstanceNormParams { x: xb.ptr(), chunk_mean, chunk_m2, ..gpu_params(dims, chunks) };
        gpu.launch(kernel::instance_norm_chunk_moments::<T>(), chunk_blocks(planes, chunks, x.shape())?, &p, &shapes)?;
        // The combine reads only float32 chunk statistics: its one instance takes the float32 struct.
        let p = InstanceNormParams::<f32> {
            chunk_mean,
            chunk_m2,
            mean_out: mean.ptr_mut(),
            rstd_out: rstd.ptr_mut(),
            eps: eps as f32,
            ..gpu_params(dims, chunks)
        };
        gpu.launch(kernel::instance_norm_combine, blocks_of(planes, REDUCE_THREADS, x.shape())?, &p, &shapes)?;
    }
    Ok((Tensor::from_gpu(mean, &stats_shape)?, Tensor::from_gpu(rstd, &stats_shape)?))
}

/// The output (stored as `T`, like x) from the saved statistics (see [`Normalization::apply_with`]).
fn apply_gpu<T: GpuElement>(n: &Normalization, skip: Option<&Tensor>, act: Option<Activation>) -> Result<Tensor> {
    let op = "instance_norm";
    let (xb, gb, bb) = (n.x.gpu_operand::<T>(op)?, n.gamma.gpu_operand::<f32>(op)?, n.beta.gpu_operand::<f32>(op)?);
    let skip = skip.map(|s| s.gpu_operand::<T>("instance_norm skip")).transpose()?;
    let (mb, rb) = (n.mean.gpu_operand::<f32>(op)?, n.rstd.gpu_operand::<f32>(op)?);
    let gpu = &xb.gpu;
    let (planes, chunks) = chunking(n.dims);
    let mut y = gpu.alloc_of::<T>(n.x.numel(), "instance_norm output")?;
    if planes > 0 {
        let p = InstanceNormParams {
            x: xb.ptr(),
            mean: mb.ptr(),
            rstd: rb.ptr(),
            gamma: gb.ptr(),
            beta: bb.ptr(),
            skip: skip.map_or(ConstPtr::NULL, |s| s.ptr()),
            out: y.ptr_mut(),
            act: act_code(act),
            ..gpu_params(n.dims, chunks)
        };
        let (launch, shapes) = (chunk_blocks(planes, chunks, n.x.shape())?, format!("instance_norm {:?}", n.x.shape()));
        gpu.launch(kernel::instance_norm_apply::<T>(), launch, &p, &shapes)?;
    }
    Tensor::from_gpu(y, n.x.shape())
}

/// dL/dx (stored as `T`, like x) and the float32 dL/dgamma, dL/dbeta, each when `needs` asks.
fn backward_gpu<T: GpuElement>(b: &Normalization, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let op = "instance_norm backward";
    let (xb, gb) = (b.x.gpu_operand::<T>(op)?, grad_out.gpu_operand::<T>(op)?);
    let (gammab, mb, rb) =
        (b.gamma.gpu_operand::<f32>(op)?, b.mean.gpu_operand::<f32>(op)?, b.rstd.gpu_operand::<f32>(op)?);
    let gpu = &xb.gpu;
    let dims = b.dims;
    let (planes, chunks) = chunking(dims);
    if planes == 0 {
        // No plane: an empty input gradient, and zero parameter gradients.
        let zeros =
            |what| -> Result<Option<Tensor>> { Ok(Some(Tensor::from_gpu(gpu.zeros(dims.c, what)?, &[dims.c])?)) };
        return Ok(vec![
            if needs[0] {
                Some(Tensor::from_gpu(gpu.alloc_of::<T>(0, "instance_norm input gradient")?, b.x.shape())?)
            } else {
                None
            },
            if needs[1] { zeros("instance_norm gamma gradient")? } else { None },
            if needs[2] { zeros("instance_norm beta gradient")? } else { None },
        ]);
    }
    let shapes = format!("instance_norm backward {:?}", b.x.shape());
    let chunked = chunk_blocks(planes, chunks, b.x.shape())?;
    // gamma and beta are read by the gradient sums only to recompute a fused activation's input.
    let beta = b.beta.gpu_operand::<f32>(op)?;
    let base = InstanceNormParams {
        x: xb.ptr(),
        g: gb.ptr(),
        mean: mb.ptr(),
        rstd: rb.ptr(),
        gamma: gammab.ptr(),
        beta: beta.ptr(),
        act: act_code(b.act),
        ..gpu_params(dims, chunks)
    };

    // Plane sums of g and g * xhat: per chunk, then the chunks of each plane in order. One buffer holds the chunk
    // sums of g, then those of g xhat, so that one launch of 2 * planes rows adds both into the plane sums of g, then
    // those of g xhat.
    let mut chunk_sums = gpu.alloc(2 * planes * chunks, "instance_norm chunk sums of g and g xhat")?;
    let chunk_g = chunk_sums.ptr_mut();
    let p = InstanceNormParams { chunk_g, chunk_gx: chunk_g.offset(planes * chunks), ..base };
    gpu.launch(kernel::instance_norm_chunk_grad_sums::<T>(), chunked, &p, &shapes)?;
    let mut plane_sums = gpu.alloc(2 * planes, "instance_norm plane sums of g and g xhat")?;
    let p = NormSumRowsParams { a: chunk_sums.ptr(), out: plane_sums.ptr_mut(), len: chunks as i64 };
    gpu.launch(kernel::instance_norm_sum_chunks, blocks_of(2 * planes, REDUCE_THREADS, b.x.shape())?, &p, &shapes)?;
    let (sum_g, sum_gx) = (plane_sums.ptr(), plane_sums.ptr().offset(planes));
    let base = InstanceNormParams { sum_g, sum_gx, ..base };

    let dx = if needs[0] {
        let mut dx = gpu.alloc_of::<T>(b.x.numel(), "instance_norm input gradient")?;
        let p = InstanceNormParams { out: dx.ptr_mut(), ..base };
        gpu.launch(kernel::instance_norm_backward_dx::<T>(), chunked, &p, &shapes)?;
        Some(Tensor::from_gpu(dx, b.x.shape())?)
    } else {
        None
    };
    let (dgamma, dbeta) = if needs[1] || needs[2] {
        let mut dgamma = gpu.alloc(dims.c, "instance_norm gamma gradient")?;
        let mut dbeta = gpu.alloc(dims.c, "instance_norm beta gradient")?;
        // Reads only the float32 plane sums: its one instance takes the float32 struct.
        let p = InstanceNormParams::<f32> {
            sum_g,
            sum_gx,
            dgamma: dgamma.ptr_mut(),
            dbeta: dbeta.ptr_mut(),
            ..gpu_params(dims, chunks)
        };
        gpu.launch(kernel::instance_norm_param_grads, grid_1d(dims.c), &p, &shapes)?;
        (Some(Tensor::from_gpu(dgamma, &[dims.c])?), Some(Tensor::from_gpu(dbeta, &[dims.c])?))
    } else {
        (None, None)
    };
    Ok(vec![dx, if needs[1] { dgamma } else { None }, if needs[2] { dbeta } else { None }])
}
