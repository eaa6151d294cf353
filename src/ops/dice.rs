//! Soft Dice loss on softmax probabilities, without the background class: nnU-Net v2's `MemoryEfficientSoftDiceLoss`
//! with `apply_nonlin = softmax`, `do_bg = False`, `smooth = 1e-5`.
//!
//! Logits x are `(N, K, spatial)`, the target t `(N, 1, spatial)` holds class indices. With p = softmax over k of x
//! and the one-hot target y_kv = [t_v == k], each group j is a class k >= 1 and a sample n (or, with batch Dice, a
//! class k over the whole batch), and the sums run over the voxels v of that group:
//!
//! ```text
//!   I_j = sum_v p_kv y_kv      P_j = sum_v p_kv      G_j = sum_v y_kv
//!   D_j = max(P_j + G_j + s, 1e-8)      dc_j = (2 I_j + s) / D_j      L = -(1/M) sum_j dc_j
//! ```
//! with M groups: N (K - 1), or K - 1 with batch Dice. Since P_j, G_j >= 0 and s > 1e-8, the clip never binds and
//! dD_j/dP_j = 1. The gradient with respect to the probabilities of a voxel in group j is, for k >= 1,
//!
//! ```text
//!   dL/dp_kv = -(1/M) (2 y_kv - dc_j) / D_j          (and 0 for the background, k = 0)
//! ```
//! and the softmax backward gives dL/dx_cv = p_cv (dL/dp_cv - sum_k p_kv dL/dp_kv). The backward recomputes the
//! softmax from the saved logits and keeps only the per-group dc_j and D_j from the forward. Sums are accumulated
//! in f64. The target receives no gradient.
//!
//! On the GPU (kernels in `cuda/loss.cu`) a first kernel computes per-block partial sums of (I, P, G) for every
//! foreground class of a sample, with the softmax of each voxel computed in registers; a second, single-block kernel
//! adds them in a fixed order, forms dc_j and D_j (kept on the device, M x 2 floats, for the backward) and the loss,
//! which stays on the device as a `[1]` tensor. Sums are float32 in a fixed tree order (deterministic). A label that
//! is not a class index in [0, K) is not used as an index: it makes the loss and the gradient NaN (the in-band flag
//! explained in [`cross_entropy`](crate::ops::cross_entropy)); the CPU path rejects it at once.
//!
//! Cost per voxel with K classes (the counting rules are in [`ops`](crate::ops)): forward 4 (K + 1) bytes (read K
//! logits and the label) and about 8K FLOPs (the softmax, 5K, and the three sums I, P, G); backward 4 (2K + 1) bytes
//! (read logits and label, write dL/dx) and about 12K FLOPs. Memory-bound.

use cudarc::driver::LaunchConfig;

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_1d, GpuBuffer};
use crate::device::params::{kernel, LossParams};
use crate::ops::cross_entropy::{
    check_labels, check_loss_grad, check_loss_operands, class_of, loss_params, one_block, softmax_stats,
    MAX_PARTIAL_BLOCKS,
};
use crate::ops::MapDims;
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, ensure, Result};

/// The smoothing term s of the Dice ratio (nnU-Net's default), which makes a class absent from both the target and
/// the prediction score 1 rather than 0/0.
pub const DICE_SMOOTH: f64 = 1e-5;

/// Lower clip of the Dice denominator (nnU-Net's `torch.clip(..., 1e-8)`).
const DENOMINATOR_FLOOR: f64 = 1e-8;

/// The soft Dice loss -mean(dc) of the softmax of `logits` `(N, K, spatial)` against the class indices in `target`
/// `(N, 1, spatial)`, over the foreground classes 1..K and, unless `batch_dice`, the samples (with `batch_dice` each
/// class's sums run over the whole batch). A tensor of shape `[1]`; needs K >= 2. Differentiable in the logits only.
pub fn soft_dice_loss(tape: &mut Tape, logits: &Tensor, target: &Tensor, batch_dice: bool) -> Result<Tensor> {
    let dims = check_loss_operands(logits, target, 2, "soft_dice_loss")?;
    let range = profile::forward("soft_dice_loss", &[logits, target], 0.0);
    let (y, groups) = match (logits.gpu_buffer(), target.gpu_buffer()) {
        (Some(x), Some(t)) => {
            let (y, stats) = forward_gpu(x, t, dims, batch_dice, logits.shape())?;
            (y, Saved::Gpu(stats))
        }
        _ => {
            let groups = by_dtype!(logits.dtype(), group_sums_cpu(logits, target, dims))?.into_groups(dims, batch_dice);
            let loss = -groups.iter().map(|g| g.dc).sum::<f64>() / groups.len() as f64;
            (Tensor::from_fn(&[1], logits.dtype(), |_| loss)?, Saved::Cpu(groups))
        }
    };
    range.done([&y]);
    tape.record(
        &[logits, target],
        &y,
        DiceBackward { logits: logits.clone(), target: target.clone(), dims, batch_dice, groups },
    );
    Ok(y)
}

/// What the backward keeps of the forward: (dc_j, D_j) of every group.
enum Saved {
    /// On the host.
    Cpu(Vec<Group>),
    /// On the GPU, an (M, 2) tensor of rows (dc_j, D_j).
    Gpu(Tensor),
}

/// The shared memory the partial-sum kernel may use per block without opting in to more (48 KiB).
const SHARED_BYTES: usize = 48 * 1024;

/// The number of Dice groups M: K - 1 with batch Dice, else N (K - 1).
fn group_count(dims: MapDims, batch_dice: bool) -> usize {
    if batch_dice {
        dims.c - 1
    } else {
        dims.n * (dims.c - 1)
    }
}

/// The loss and the (M, 2) tensor of (dc_j, D_j) on the GPU.
fn forward_gpu(
    x: &GpuBuffer,
    t: &GpuBuffer,
    dims: MapDims,
    batch_dice: bool,
    shape: &[usize],
) -> Result<(Tensor, Tensor)> {
    let gpu = &x.gpu;
    let fg = dims.c - 1;
    // Each thread keeps 3 (K - 1) running sums in its own column of shared memory; fewer threads per block leave
    // room for more classes.
    let block = [128usize, 64, 32].into_iter().find(|b| 3 * fg * b * 4 <= SHARED_BYTES).ok_or_else(|| {
        crate::Error::Shape(format!(
            "soft_dice_loss on the GPU supports at most {} classes, logits of shape {shape:?} have {}",
            SHARED_BYTES / (3 * 32 * 4) + 1,
            dims.c
        ))
    })?;
    ensure!(dims.n <= 65535, Shape, "soft_dice_loss on the GPU: batch of {} exceeds 65535 samples", dims.n);
    let per_sample = dims.voxels().div_ceil(block).clamp(1, (MAX_PARTIAL_BLOCKS / dims.n).max(1));
    let cfg = LaunchConfig {
        grid_dim: (per_sample as u32, dims.n as u32, 1),
        block_dim: (block as u32, 1, 1),
        shared_mem_bytes: (3 * fg * block * 4) as u32,
    };
    let shapes = format!("soft_dice_loss {shape:?}");
    let mut partial = gpu.alloc(dims.n * per_sample * 3 * fg, "soft_dice_loss partial sums")?;
    let p = LossParams { partial: partial.ptr_mut(), ..loss_params(x, Some(t), dims) };
    gpu.launch(kernel::dice_partial_sums, cfg, &p, &shapes)?;
    let groups = group_count(dims, batch_dice);
    let mut stats = gpu.alloc(2 * groups, "soft_dice_loss group ratios")?;
    let mut loss = gpu.alloc(1, "soft_dice_loss loss")?;
    let p = LossParams {
        stats_out: stats.ptr_mut(),
        out: loss.ptr_mut(),
        blocks: per_sample as i64,
        batch_dice: batch_dice as i32,
        smooth: DICE_SMOOTH as f32,
        floor_: DENOMINATOR_FLOOR as f32,
        ..p
    };
    gpu.launch(kernel::dice_finish, one_block(), &p, &shapes)?;
    Ok((Tensor::from_gpu(loss, &[1])?, Tensor::from_gpu(stats, &[groups, 2])?))
}

/// I, P and G of every (sample, foreground class), sample-major.
struct GroupSums(Vec<[f64; 3]>);

/// The ratio of one group and its denominator.
#[derive(Clone, Copy, Debug)]
struct Group {
    dc: f64,
    denominator: f64,
}

impl GroupSums {
    /// Merges the samples for batch Dice and forms dc_j and D_j.
    fn into_groups(self, dims: MapDims, batch_dice: bool) -> Vec<Group> {
        let fg = dims.c - 1;
        let sums = if batch_dice {
            let mut merged = vec![[0.0; 3]; fg];
            for (i, s) in self.0.iter().enumerate() {
                for (acc, v) in merged[i % fg].iter_mut().zip(s) {
                    *acc += v;
                }
            }
            merged
        } else {
            self.0
        };
        sums.iter()
            .map(|&[i, p, g]| {
                let denominator = (p + g + DICE_SMOOTH).max(DENOMINATOR_FLOOR);
                Group { dc: (2.0 * i + DICE_SMOOTH) / denominator, denominator }
            })
            .collect()
    }
}

fn group_sums_cpu<T: Real>(logits: &Tensor, target: &Tensor, dims: MapDims) -> Result<GroupSums> {
    let (x, t) = (logits.cpu::<T>()?, target.cpu::<T>()?);
    check_labels(t, dims.c, "soft_dice_loss")?;
    let v = dims.voxels();
    let (mut m, mut s, mut p) = (vec![T::zero(); v], vec![T::zero(); v], vec![T::zero(); dims.c * v]);
    let mut sums = Vec::with_capacity(dims.n * (dims.c - 1));
    for (xn, tn) in x.chunks_exact(dims.c * v).zip(t.chunks_exact(v)) {
        softmax_stats(xn, &mut m, &mut s, Some(&mut p));
        for (k, pk) in p.chunks_exact(v).enumerate().skip(1) {
            let label = T::from_f64(k as f64);
            let (mut inter, mut pred, mut gt) = (0.0f64, 0.0f64, 0.0f64);
            for (&pi, &ti) in pk.iter().zip(tn) {
                let pi = pi.to_f64();
                pred += pi;
                if ti == label {
                    inter += pi;
                    gt += 1.0;
                }
            }
            sums.push([inter, pred, gt]);
        }
    }
    Ok(GroupSums(sums))
}

struct DiceBackward {
    logits: Tensor,
    target: Tensor,
    dims: MapDims,
    batch_dice: bool,
    groups: Saved,
}

impl Backward for DiceBackward {
    fn name(&self) -> &'static str {
        "soft_dice_loss"
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if !needs[0] {
            return Ok(vec![None, None]);
        }
        check_loss_grad(&self.logits, grad_out, "soft_dice_loss backward")?;
        let dx = match (&self.groups, self.logits.gpu_buffer(), self.target.gpu_buffer(), grad_out.gpu_buffer()) {
            (Saved::Gpu(stats), Some(x), Some(t), Some(g)) => self.backward_gpu(x, t, stats, g)?,
            (Saved::Cpu(groups), ..) => by_dtype!(self.logits.dtype(), backward_cpu(self, groups, grad_out))?,
            _ => crate::bail!(Mismatch, "soft_dice_loss backward: operands left the device of the forward pass"),
        };
        Ok(vec![Some(dx), None])
    }
}

impl DiceBackward {
    fn backward_gpu(&self, x: &GpuBuffer, t: &GpuBuffer, stats: &Tensor, g: &GpuBuffer) -> Result<Tensor> {
        let gpu = &x.gpu;
        let stats = stats
            .gpu_buffer()
            .ok_or_else(|| crate::Error::Mismatch("soft_dice_loss backward: group ratios are not on the GPU".into()))?;
        let mut dx = gpu.alloc(x.slice.len(), "soft_dice_loss gradient")?;
        let p = LossParams {
            stats: stats.ptr(),
            g: g.ptr(),
            out: dx.ptr_mut(),
            batch_dice: self.batch_dice as i32,
            scale: (1.0 / group_count(self.dims, self.batch_dice) as f64) as f32,
            ..loss_params(x, Some(t), self.dims)
        };
        let shapes = format!("soft_dice_loss backward {:?}", self.logits.shape());
        gpu.launch(kernel::dice_backward, grid_1d(p.NV as usize), &p, &shapes)?;
        Tensor::from_gpu(dx, self.logits.shape())
    }
}

fn backward_cpu<T: Real>(op: &DiceBackward, groups: &[Group], grad_out: &Tensor) -> Result<Tensor> {
    let (x, t) = (op.logits.cpu::<T>()?, op.target.cpu::<T>()?);
    let (dims, v, fg) = (op.dims, op.dims.voxels(), op.dims.c - 1);
    let g = grad_out.cpu::<T>()?[0].to_f64() / groups.len() as f64;
    // dL/dp_kv = c_k + e_k y_kv for the group of sample n and class k >= 1; index 0 (background) stays 0.
    let (mut c, mut e) = (vec![T::zero(); dims.c], vec![T::zero(); dims.c]);
    let (mut m, mut s, mut dot) = (vec![T::zero(); v], vec![T::zero(); v], vec![T::zero(); v]);
    let mut dx = vec![T::zero(); x.len()];
    for (n, ((xn, tn), dn)) in
        x.chunks_exact(dims.c * v).zip(t.chunks_exact(v)).zip(dx.chunks_exact_mut(dims.c * v)).enumerate()
    {
        for k in 1..dims.c {
            let group = groups[if op.batch_dice { k - 1 } else { n * fg + k - 1 }];
            c[k] = T::from_f64(g * group.dc / group.denominator);
            e[k] = T::from_f64(-2.0 * g / group.denominator);
        }
        // dn holds the probabilities until it is overwritten with the gradient.
        softmax_stats(xn, &mut m, &mut s, Some(&mut *dn));
        dot.fill(T::zero());
        for (k, pk) in dn.chunks_exact(v).enumerate().skip(1) {
            for (di, &pi) in dot.iter_mut().zip(pk) {
                *di += pi * c[k];
            }
        }
        for ((di, &ti), i) in dot.iter_mut().zip(tn).zip(0..) {
            let k = class_of(ti);
            *di += dn[k * v + i] * e[k];
        }
        for (k, dk) in dn.chunks_exact_mut(v).enumerate() {
            let label = T::from_f64(k as f64);
            for ((d, &di), &ti) in dk.iter_mut().zip(&dot).zip(tn) {
                let on_label = if ti == label { e[k] } else { T::zero() };
                *d *= c[k] + on_label - di;
            }
        }
    }
    Tensor::from_vec(dx, op.logits.shape())
}
