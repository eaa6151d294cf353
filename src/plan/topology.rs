//! The network's shape for a patch: nnU-Net's pooling and kernel rules, and LKM-UNet's PiM windows and PaM factors.
//!
//! Pooling (nnU-Net v2's `get_pool_and_conv_props`): starting from the patch and the target spacing, each round pools
//! (stride 2) every axis that is still at least 2 x 4 voxels long and whose current spacing is within a factor 2 of
//! the finest such axis; a lone axis is pooled only while at least 3 x 4 voxels long. Pooling an axis doubles its
//! spacing, so a coarse axis (2.5 mm beside 0.8 mm) waits until the fine ones have caught up. The kernel of a stage is
//! 3 along every axis whose spacing is within a factor 2 of the finest, 1 before that (and stays 3 once it is 3);
//! the bottleneck's kernel is 3 everywhere. The patch is then padded up to a multiple of 2^(pools) per axis, so that
//! every stride divides its map. (nnU-Net's current code compares a filtered list by the wrong index when it sets
//! kernels; this follows the rule as written in its comment.)
//!
//! PiM windows: the public code uses, at stage s of n, `q(s) = 2^(ceil((n - s) / 2) - 1)` times a base that is the
//! bottleneck's map (5, 7, 6 for the 3D reference patch, 5 for the 2D one): the window stays the same over two stages
//! while the map halves, so the deepest stage is one window and the top stages hold 8 windows per axis. Here the
//! base is the bottleneck map of the planned patch and each window is the largest divisor of its stage's map not above
//! `q(s)` times the base, so every window divides its map (for the two reference patches this gives exactly the public
//! code's windows). PaM factors: the public code's `q(s)` (4, 4, 2, 2, 1, 1 for 6 stages), lowered per axis to the
//! largest divisor of the map.

use crate::nn::lkm_unet::{pam_factor, pim_base};

/// nnU-Net's minimum edge length of a bottleneck feature map.
pub const MIN_FEATURE_MAP_EDGE: usize = 4;

/// Strides and kernels of every stage for a patch, and the patch padded to fit them.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    /// Stride per stage per axis (stage 0: all 1).
    pub strides: Vec<Vec<usize>>,
    /// Convolution kernel per stage per axis.
    pub kernels: Vec<Vec<usize>>,
    /// The patch, padded up to a multiple of `divisor`.
    pub patch: Vec<usize>,
    /// 2^(number of poolings) per axis: what every patch size must be a multiple of.
    pub divisor: Vec<usize>,
}

/// nnU-Net's pooling and kernel rules for a patch of `patch` voxels at `spacing` mm (see the module header).
pub fn topology(spacing: &[f64], patch: &[usize]) -> Topology {
    let dim = spacing.len();
    let mut cur_spacing = spacing.to_vec();
    let mut cur_size = patch.to_vec();
    let mut strides = vec![vec![1; dim]];
    let mut kernels = Vec::new();
    let mut kernel = vec![1; dim];
    let mut divisor = vec![1; dim];
    loop {
        let long: Vec<usize> = (0..dim).filter(|&a| cur_size[a] >= 2 * MIN_FEATURE_MAP_EDGE).collect();
        let Some(finest) = long.iter().map(|&a| cur_spacing[a]).min_by(f64::total_cmp) else { break };
        let pool: Vec<usize> = long.into_iter().filter(|&a| cur_spacing[a] / finest < 2.0).collect();
        if pool.is_empty() || (pool.len() == 1 && cur_size[pool[0]] < 3 * MIN_FEATURE_MAP_EDGE) {
            break;
        }
        let finest_all = cur_spacing.iter().copied().fold(f64::INFINITY, f64::min);
        for a in 0..dim {
            if cur_spacing[a] / finest_all < 2.0 {
                kernel[a] = 3;
            }
        }
        let mut stride = vec![1; dim];
        for &a in &pool {
            stride[a] = 2;
            divisor[a] *= 2;
            cur_spacing[a] *= 2.0;
            cur_size[a] = cur_size[a].div_ceil(2);
        }
        strides.push(stride);
        kernels.push(kernel.clone());
    }
    kernels.push(vec![3; dim]);
    let patch = patch.iter().zip(&divisor).map(|(&p, &d)| p.div_ceil(d) * d).collect();
    Topology { strides, kernels, patch, divisor }
}

/// The largest divisor of `n` that is at most `limit` (at least 1).
fn largest_divisor_up_to(n: usize, limit: usize) -> usize {
    (1..=limit.min(n)).rev().find(|d| n % d == 0).unwrap_or(1)
}

/// PiM window per stage per axis for these stage maps (see the module header).
pub fn pim_windows(maps: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = maps.len();
    let bottleneck = &maps[n - 1];
    maps.iter()
        .enumerate()
        .map(|(s, map)| {
            map.iter().zip(bottleneck).map(|(&m, &b)| largest_divisor_up_to(m, b * pim_base(n, s))).collect()
        })
        .collect()
}

/// PaM pooling factor per stage per axis for these stage maps (see the module header).
pub fn pam_pools(maps: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = maps.len();
    maps.iter()
        .enumerate()
        .map(|(s, map)| map.iter().map(|&m| largest_divisor_up_to(m, pam_factor(n, s))).collect())
        .collect()
}
