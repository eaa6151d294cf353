//! Softmax cross-entropy over the class axis, averaged over every voxel of the batch (nnU-Net's
//! `RobustCrossEntropyLoss`, i.e. PyTorch's `CrossEntropyLoss` with mean reduction).
//!
//! Logits x are `(N, K, [D,] H, W)`; the target t is `(N, 1, [D,] H, W)` holding class indices as floats. With
//! V = N * D * H * W voxels and, per voxel v, m_v = max_k x_kv:
//!
//! ```text
//!   L = (1/V) sum_v [ m_v + ln sum_k e^(x_kv - m_v) - x_(t_v) v ]       (log-sum-exp shifted by the max: no overflow)
//!   dL/dx_kv = (p_kv - [k == t_v]) / V,     p_kv = e^(x_kv - m_v) / sum_j e^(x_jv - m_v)
//! ```
//! The backward recomputes the softmax from the saved logits rather than keeping a K-times-larger tensor alive
//! between the passes. The target receives no gradient.
//!
//! The label checks and the per-voxel softmax here are shared with the soft Dice loss.
//!
//! On the GPU (kernels in `cuda/loss.cu`) the loss stays on the device as a `[1]` tensor: the forward pass sums the
//! voxels' terms in per-block partial sums and adds those in a fixed order (deterministic), and nothing is read
//! back.
//!
//! Bad labels. The CPU path rejects a label that is not an integer class index in [0, K) at once, with an
//! [`Error::Data`](crate::Error::Data) naming it. The GPU path cannot do that without copying the target back every
//! step, so it relies on the data loader, which validates every label map before upload. As a last line of
//! defence the kernels never index with a bad label (no out-of-bounds read) and flag it in band instead: the
//! voxel's loss term and its gradient become NaN. A device-side error word would have no reader, since these
//! losses never synchronise; the NaN reaches the loss and the gradients, which a training step's clipping status
//! reads back at the end of every step ([`Clip::finish`](crate::optim::Clip::finish)): the step changes no parameter
//! and training stops with [`Error::NonFinite`](crate::Error::NonFinite). Nothing is clamped. The soft Dice loss
//! follows the same rule.
//!
//! Cost per voxel with K classes (the counting rules are in [`ops`](crate::ops)): forward 4 (K + 1) bytes (read K
//! logits and the label) and about 4K FLOPs (max, shift, exponential, sum; one logarithm); backward 4 (2K + 1) bytes
//! (read logits and label, write dL/dx) and about 6K FLOPs (the softmax again, then (p - onehot) g / V).
//! Memory-bound.

use cudarc::driver::LaunchConfig;

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_1d, GpuBuffer};
use crate::device::params::{kernel, ConstPtr, LossParams};
use crate::ops::MapDims;
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{bail, by_dtype, ensure, Result};

/// The most blocks a partial-sum kernel of the losses launches: a fixed number (not the GPU's multiprocessor
/// count), so the summation order, and thus the result, depends only on the shapes.
pub(crate) const MAX_PARTIAL_BLOCKS: usize = 1024;

/// Threads per block of the loss kernels.
const BLOCK: u32 = 256;

/// A grid-stride launch over `n` items in blocks of 256 threads, with at most [`MAX_PARTIAL_BLOCKS`] blocks (one
/// partial sum each).
fn partial_grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_PARTIAL_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One block of 256 threads, for the final fixed-order reductions.
pub(crate) fn one_block() -> LaunchConfig {
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Fails unless `grad_out`, the gradient of a loss, is a one-element tensor of the logits' dtype and device.
pub(crate) fn check_loss_grad(logits: &Tensor, grad_out: &Tensor, op: &str) -> Result<()> {
    logits.check_same_kind(grad_out, op)?;
    ensure!(
        grad_out.numel() == 1,
        Shape,
        "{op}: the loss gradient must have one element, got shape {:?}",
        grad_out.shape()
    );
    Ok(())
}

/// Checks that `logits` is a feature map `(N, K, spatial)` with at least `min_classes` classes and at least one voxel,
/// and that `target` is `(N, 1, spatial)` of the same dtype and device; `op` names the caller in errors.
pub(crate) fn check_loss_operands(logits: &Tensor, target: &Tensor, min_classes: usize, op: &str) -> Result<MapDims> {
    let dims = MapDims::of(logits, op)?;
    logits.check_same_kind(target, op)?;
    let expected = dims.shape_with(1, dims.s);
    ensure!(
        target.shape() == expected.as_slice(),
        Shape,
        "{op}: target shape {:?} does not fit logits of shape {:?}: expected (N, 1, spatial) = {expected:?}",
        target.shape(),
        logits.shape()
    );
    ensure!(
        dims.c >= min_classes,
        Shape,
        "{op}: needs at least {min_classes} classes, logits of shape {:?} have {}",
        logits.shape(),
        dims.c
    );
    ensure!(dims.n * dims.voxels() > 0, Shape, "{op}: logits of shape {:?} have no voxels", logits.shape());
    Ok(dims)
}

/// Fails with a data error unless every label is an integer class index in [0, `classes`).
pub(crate) fn check_labels<T: Real>(labels: &[T], classes: usize, op: &str) -> Result<()> {
    for (i, &t) in labels.iter().enumerate() {
        let v = t.to_f64();
        if !(v >= 0.0 && v < classes as f64 && v.fract() == 0.0) {
            bail!(
                Data,
                "{op}: label {v} at target element {i} is not a class index in [0, {classes}) for K = {classes} \
                 classes (the target must hold integer class indices)"
            );
        }
    }
    Ok(())
}

/// The class index of a checked label.
#[inline]
pub(crate) fn class_of<T: Real>(t: T) -> usize {
    t.to_f64() as usize
}

/// The softmax over classes of one sample's logits `x` (K rows of V voxels, V = `m.len()`): fills m_v = max_k x_kv
/// and s_v = sum_k e^(x_kv - m_v), and, when `p` is given, the probabilities p_kv = e^(x_kv - m_v) / s_v.
pub(crate) fn softmax_stats<T: Real>(x: &[T], m: &mut [T], s: &mut [T], p: Option<&mut [T]>) {
    let v = m.len();
    m.copy_from_slice(&x[..v]);
    for row in x.chunks_exact(v).skip(1) {
        for (mi, &xi) in m.iter_mut().zip(row) {
            *mi = mi.max(xi);
        }
    }
    s.fill(T::zero());
    match p {
        Some(p) => {
            for (prow, xrow) in p.chunks_exact_mut(v).zip(x.chunks_exact(v)) {
                for (((pi, &xi), &mi), si) in prow.iter_mut().zip(xrow).zip(m.iter()).zip(s.iter_mut()) {
                    let e = (xi - mi).exp();
                    *pi = e;
                    *si += e;
                }
            }
            for prow in p.chunks_exact_mut(v) {
                for (pi, &si) in prow.iter_mut().zip(s.iter()) {
                    *pi /= si;
                }
            }
        }
        None => {
            for xrow in x.chunks_exact(v) {
                for ((&xi, &mi), si) in xrow.iter().zip(m.iter()).zip(s.iter_mut()) {
                    *si += (xi - mi).exp();
                }
            }
        }
    }
}

/// Mean softmax cross-entropy of `logits` `(N, K, spatial)` against the class indices in `target`
/// `(N, 1, spatial)`, over all N * spatial voxels; a tensor of shape `[1]`. Differentiable in the logits only.
pub fn cross_entropy(tape: &mut Tape, logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let dims = check_loss_operands(logits, target, 1, "cross_entropy")?;
    let range = profile::forward("cross_entropy", &[logits, target], 0.0);
    let y = match (logits.gpu_buffer(), target.gpu_buffer()) {
        (Some(x), Some(t)) => forward_gpu(x, t, dims, logits.shape())?,
        _ => by_dtype!(logits.dtype(), forward_cpu(logits, target, dims))?,
    };
    range.done([&y]);
    tape.record(&[logits, target], &y, CrossEntropyBackward { logits: logits.clone(), target: target.clone(), dims });
    Ok(y)
}

fn forward_cpu<T: Real>(logits: &Tensor, target: &Tensor, dims: MapDims) -> Result<Tensor> {
    let (x, t) = (logits.cpu::<T>()?, target.cpu::<T>()?);
    check_labels(t, dims.c, "cross_entropy")?;
    let v = dims.voxels();
    let (mut m, mut s) = (vec![T::zero(); v], vec![T::zero(); v]);
    let mut total = 0.0f64;
    for (xn, tn) in x.chunks_exact(dims.c * v).zip(t.chunks_exact(v)) {
        softmax_stats(xn, &mut m, &mut s, None);
        for (i, ((&mi, &si), &ti)) in m.iter().zip(&s).zip(tn).enumerate() {
            total += (mi + si.ln() - xn[class_of(ti) * v + i]).to_f64();
        }
    }
    Tensor::from_vec(vec![T::from_f64(total / (dims.n * v) as f64)], &[1])
}

/// What every loss kernel of `cuda/loss.cu` takes for logits `x` and labels `t` (none for argmax) of sizes `dims`:
/// the operands, N V voxels, V per sample, K classes and N samples; each launch adds its own fields.
pub(crate) fn loss_params(x: &GpuBuffer, t: Option<&GpuBuffer>, dims: MapDims) -> LossParams {
    LossParams {
        x: x.ptr(),
        t: t.map_or(ConstPtr::NULL, GpuBuffer::ptr),
        NV: (dims.n * dims.voxels()) as i64,
        V: dims.voxels() as i64,
        K: dims.c as i32,
        N: dims.n as i32,
        ..Default::default()
    }
}

fn forward_gpu(x: &GpuBuffer, t: &GpuBuffer, dims: MapDims, shape: &[usize]) -> Result<Tensor> {
    let gpu = &x.gpu;
    let base = loss_params(x, Some(t), dims);
    let cfg = partial_grid(base.NV as usize);
    let blocks = cfg.grid_dim.0 as usize;
    let mut partial = gpu.alloc(blocks, "cross_entropy partial sums")?;
    let shapes = format!("cross_entropy {shape:?}");
    let p = LossParams { partial: partial.ptr_mut(), ..base };
    gpu.launch(kernel::cross_entropy_partial, cfg, &p, &shapes)?;
    let mut y = gpu.alloc(1, "cross_entropy loss")?;
    let scale = (1.0 / base.NV as f64) as f32;
    let p = LossParams { blocks: blocks as i64, scale, out: y.ptr_mut(), ..p };
    gpu.launch(kernel::loss_sum_partials, one_block(), &p, &shapes)?;
    Tensor::from_gpu(y, &[1])
}

struct CrossEntropyBackward {
    logits: Tensor,
    target: Tensor,
    dims: MapDims,
}

impl Backward for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if !needs[0] {
            return Ok(vec![None, None]);
        }
        check_loss_grad(&self.logits, grad_out, "cross_entropy backward")?;
        let dx = match (self.logits.gpu_buffer(), self.target.gpu_buffer(), grad_out.gpu_buffer()) {
            (Some(x), Some(t), Some(g)) => backward_gpu(x, t, g, self.dims, self.logits.shape())?,
            _ => by_dtype!(self.logits.dtype(), backward_cpu(&self.logits, &self.target, grad_out, self.dims))?,
        };
        Ok(vec![Some(dx), None])
    }
}

fn backward_cpu<T: Real>(logits: &Tensor, target: &Tensor, grad_out: &Tensor, dims: MapDims) -> Result<Tensor> {
    let (x, t) = (logits.cpu::<T>()?, target.cpu::<T>()?);
    let v = dims.voxels();
    let scale = T::from_f64(grad_out.cpu::<T>()?[0].to_f64() / (dims.n * v) as f64);
    let (mut m, mut s) = (vec![T::zero(); v], vec![T::zero(); v]);
    let mut dx = vec![T::zero(); x.len()];
    for ((xn, tn), dn) in x.chunks_exact(dims.c * v).zip(t.chunks_exact(v)).zip(dx.chunks_exact_mut(dims.c * v)) {
        softmax_stats(xn, &mut m, &mut s, Some(&mut *dn));
        for d in dn.iter_mut() {
            *d *= scale;
        }
        for (i, &ti) in tn.iter().enumerate() {
            dn[class_of(ti) * v + i] -= scale;
        }
    }
    Tensor::from_vec(dx, logits.shape())
}

fn backward_gpu(x: &GpuBuffer, t: &GpuBuffer, g: &GpuBuffer, dims: MapDims, shape: &[usize]) -> Result<Tensor> {
    let gpu = &x.gpu;
    let base = loss_params(x, Some(t), dims);
    let mut dx = gpu.alloc(x.slice.len(), "cross_entropy gradient")?;
    let p = LossParams { g: g.ptr(), out: dx.ptr_mut(), scale: (1.0 / base.NV as f64) as f32, ..base };
    let shapes = format!("cross_entropy backward {shape:?}");
    gpu.launch(kernel::cross_entropy_backward, grid_1d(base.NV as usize), &p, &shapes)?;
    Tensor::from_gpu(dx, shape)
}
