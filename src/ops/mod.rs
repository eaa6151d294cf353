//! The ops of LKM-UNet, one per file. Each file holds the op's math (forward and backward), its CPU implementation
//! (the readable reference every CUDA kernel is checked against) and, on the GPU, the launch of its kernels.
//!
//! Every op takes the [`Tape`](crate::autograd::Tape) first and records its backward there when a gradient must
//! flow through it. Layout conventions:
//! - feature maps are `(N, C, H, W)` (2D) or `(N, C, D, H, W)` (3D); 2D ops run as 3D ops with D = 1;
//! - token sequences are `(G, L, C)`: G independent sequences of L tokens with C channels, channels last.
//!
//! For example, PiM's grouping of a 4 x 4 map into 2 x 2 windows, and its inverse:
//!
//! ```
//! use lkm_engine::autograd::Tape;
//! use lkm_engine::ops::pim::{merge, partition, PimLayout};
//! use lkm_engine::{DType, Tensor};
//!
//! # fn main() -> lkm_engine::Result<()> {
//! let x = Tensor::from_fn(&[1, 1, 4, 4], DType::F32, |i| i as f64)?; // (N, C, H, W) holding 0..16
//! let mut tape = Tape::no_grad();
//! let windows = partition(&mut tape, &x, &[2, 2], PimLayout::Window)?;
//! assert_eq!(windows.shape(), &[4, 4, 1]); // G = 4 sequences of L = 4 tokens, C = 1
//! assert_eq!(windows.to_vec_f32()?[..4], [0.0, 1.0, 4.0, 5.0]); // the top-left window
//! let strided = partition(&mut tape, &x, &[2, 2], PimLayout::Strided)?;
//! assert_eq!(strided.to_vec_f32()?[..4], [0.0, 2.0, 8.0, 10.0]); // every second pixel
//! let back = merge(&mut tape, &windows, x.shape(), &[2, 2], PimLayout::Window)?;
//! assert_eq!(back.to_vec_f32()?, x.to_vec_f32()?);
//! # Ok(())
//! # }
//! ```
//!
//! Cost. Each op's header states its cost per element, so that a benchmark row can be set against the machine's
//! ceilings without reading the benchmark: bytes are the least memory traffic, each input read once and each output
//! written once (what `benches/kernels.rs` counts), at 4 bytes per float32 element, and FLOPs count every add,
//! multiply, division, comparison, exponential and logarithm as one. An op whose FLOPs per byte lie far below the
//! machine's ratio of arithmetic rate to memory bandwidth (on an H100 about 20 for float32 FMA and 300 for bf16
//! tensor cores) is bound by memory: its ceiling is the copy bandwidth. `lkm-engine profile` ([`crate::profile`])
//! counts the same FLOPs for the ops that arithmetic can bound (convolutions, linear layers, the causal conv1d and
//! the scan's per-state work) and none for the rest.

pub mod activation;
pub mod add;
pub mod argmax;
pub mod avg_pool;
pub mod cast;
pub mod causal_conv1d;
pub mod concat;
pub mod conv;
pub mod conv_transpose;
pub mod cross_entropy;
pub mod dice;
pub mod flip;
pub mod instance_norm;
pub mod layer_norm;
pub mod linear;
pub mod narrow;
pub mod operand;
pub mod pim;
pub mod reshape;
pub mod scale;
pub mod selective_scan;
pub mod upsample;

use crate::tensor::{DType, Tensor};
use crate::{bail, ensure, Result};

/// The sizes of a feature map, with 2D maps seen as 3D maps of depth 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDims {
    /// Batch size N.
    pub n: usize,
    /// Channels C.
    pub c: usize,
    /// Spatial sizes [D, H, W] (D = 1 for 2D maps).
    pub s: [usize; 3],
    /// 2 or 3: how many spatial axes the tensor really has.
    pub spatial_rank: usize,
}

impl MapDims {
    /// Reads the dims of a `(N, C, H, W)` or `(N, C, D, H, W)` tensor; `op` names the caller in errors.
    pub fn of(x: &Tensor, op: &str) -> Result<MapDims> {
        let s = x.shape();
        match s.len() {
            4 => Ok(MapDims { n: s[0], c: s[1], s: [1, s[2], s[3]], spatial_rank: 2 }),
            5 => Ok(MapDims { n: s[0], c: s[1], s: [s[2], s[3], s[4]], spatial_rank: 3 }),
            _ => bail!(Shape, "{op}: expected a feature map (N, C, H, W) or (N, C, D, H, W), got shape {s:?}"),
        }
    }

    /// Voxels per channel: D * H * W.
    pub fn voxels(&self) -> usize {
        self.s.iter().product()
    }

    /// The tensor shape for these dims with `c` channels and spatial sizes `s` (dropping D for 2D maps).
    pub fn shape_with(&self, c: usize, s: [usize; 3]) -> Vec<usize> {
        if self.spatial_rank == 2 {
            vec![self.n, c, s[1], s[2]]
        } else {
            vec![self.n, c, s[0], s[1], s[2]]
        }
    }
}

/// Expands a per-axis setting (kernel, stride, factor, window) given for the map's spatial axes to [D, H, W],
/// with 1 for the missing depth axis of 2D maps; `what` names the setting in errors.
pub fn per_axis(values: &[usize], spatial_rank: usize, what: &str) -> Result<[usize; 3]> {
    ensure!(
        values.len() == spatial_rank,
        Shape,
        "{what}: {} values {values:?} given for a map with {spatial_rank} spatial axes",
        values.len()
    );
    ensure!(values.iter().all(|&v| v > 0), Shape, "{what}: values must be positive, got {values:?}");
    Ok(if spatial_rank == 2 { [1, values[0], values[1]] } else { [values[0], values[1], values[2]] })
}

/// The per-channel sums of a host map laid out (N, C, voxels): `out[c] = sum_{n, v} x[n, c, v]` (bias gradients).
pub(crate) fn channel_sums_cpu<T: crate::tensor::Real>(x: &Tensor, channels: usize, voxels: usize) -> Result<Tensor> {
    let mut sums = vec![T::zero(); channels];
    for (nc, plane) in x.cpu::<T>()?.chunks_exact(voxels).enumerate() {
        sums[nc % channels] += plane.iter().copied().sum::<T>();
    }
    Tensor::from_vec(sums, &[channels])
}

/// Checks that `param` (a norm's gamma or beta, conv1d's weight or bias, the scan's A, D or delta bias) may go with
/// the activations `x`: on x's device and of x's dtype, except float32 for bf16 activations (the precision policy:
/// parameters and their gradients stay float32 when activations are stored in bf16); `what` names it in the error.
pub(crate) fn check_param_kind(x: &Tensor, param: &Tensor, what: &str) -> Result<()> {
    let want = if x.dtype() == DType::BF16 { DType::F32 } else { x.dtype() };
    ensure!(
        param.dtype() == want && param.device().same(&x.device()),
        Mismatch,
        "{what}: a {:?} input on {:?} takes {want:?} parameters on the same device, got a {:?} tensor on {:?} with \
         shape {:?}",
        x.dtype(),
        x.device(),
        param.dtype(),
        param.device(),
        param.shape()
    );
    Ok(())
}

/// Reads a token-sequence tensor `(G, L, C)`; `op` names the caller in errors.
pub fn seq_dims(x: &Tensor, op: &str) -> Result<(usize, usize, usize)> {
    match x.shape() {
        &[g, l, c] => Ok((g, l, c)),
        s => bail!(Shape, "{op}: expected token sequences (G, L, C), got shape {s:?}"),
    }
}
