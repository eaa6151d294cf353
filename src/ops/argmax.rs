//! The predicted class of every voxel: the index of the largest logit over the class axis.
//!
//! ```text
//!   y_nv = min { k : x_nkv = max_j x_njv }        (ties go to the lowest class index)
//! ```
//! Logits are `(N, K, spatial)`, the result `(N, 1, spatial)` holds class indices as floats of the logits' dtype,
//! like a label map. It is piecewise constant, so it is not differentiable and records nothing on a tape.
//!
//! On the GPU (`argmax_classes` in `cuda/loss.cu`) one thread per voxel scans the classes in the same order with the
//! same strict comparison, so its result equals the CPU's exactly, ties and NaN included.
//!
//! Cost per voxel with K classes (the counting rules are in [`ops`](crate::ops)): 4 (K + 1) bytes (read K logits,
//! write one index) and K - 1 comparisons.

use crate::device::cuda::grid_1d;
use crate::device::params::{kernel, LossParams};
use crate::ops::cross_entropy::loss_params;
use crate::ops::MapDims;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, ensure, Result};

/// The class index (as a float) of the largest logit per voxel of `logits` `(N, K, spatial)`, shape
/// `(N, 1, spatial)`; ties go to the lowest index. A NaN logit never wins against a number (comparisons with NaN are
/// false), except in class 0, which is the starting candidate.
pub fn argmax(logits: &Tensor) -> Result<Tensor> {
    let dims = MapDims::of(logits, "argmax")?;
    ensure!(dims.c > 0, Shape, "argmax: logits of shape {:?} have no classes", logits.shape());
    let Some(x) = logits.gpu_buffer() else {
        return by_dtype!(logits.dtype(), argmax_cpu(logits, dims));
    };
    let gpu = &x.gpu;
    let nv = dims.n * dims.voxels();
    let mut y = gpu.alloc(nv, "argmax")?;
    let p = LossParams { out: y.ptr_mut(), ..loss_params(x, None, dims) };
    gpu.launch(kernel::argmax_classes, grid_1d(nv), &p, &format!("argmax {:?}", logits.shape()))?;
    Tensor::from_gpu(y, &dims.shape_with(1, dims.s))
}

fn argmax_cpu<T: Real>(logits: &Tensor, dims: MapDims) -> Result<Tensor> {
    let x = logits.cpu::<T>()?;
    let v = dims.voxels();
    let mut best = vec![T::zero(); v];
    let mut out = vec![T::zero(); dims.n * v];
    let shape = dims.shape_with(1, dims.s);
    if v == 0 {
        return Tensor::from_vec(out, &shape);
    }
    for (xn, yn) in x.chunks_exact(dims.c * v).zip(out.chunks_exact_mut(v)) {
        // Rows are scanned in class order with a strict comparison, so the first maximum is kept.
        best.copy_from_slice(&xn[..v]);
        for (k, xk) in xn.chunks_exact(v).enumerate().skip(1) {
            let class = T::from_f64(k as f64);
            for ((b, y), &xi) in best.iter_mut().zip(yn.iter_mut()).zip(xk) {
                if xi > *b {
                    *b = xi;
                    *y = class;
                }
            }
        }
    }
    Tensor::from_vec(out, &shape)
}
