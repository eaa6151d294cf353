//! How much GPU memory a training step of this engine needs: the planner's memory model.
//!
//! A training step holds the weights, their gradients and the momentum (12 bytes per parameter, float32 in either
//! precision; a bf16 step also keeps the weights rounded to bf16 that its products read: 14), and the activations the
//! backward pass needs, which grow with the patch voxels times the batch. The model is
//!
//! ```text
//! peak bytes = (12 or 14) P + batch * k * E(config, patch)
//! ```
//!
//! with P the parameter count ([`parameter_count`], exact) and E the number of activation values one sample keeps
//! for the backward pass, counted from the network's structure ([`activation_elements`]): per residual block three
//! maps of its width (the two conv outputs, which the norms keep, and the block's output; the first norm's output is
//! rebuilt by the second conv, `Operand::Normalized`), plus its shortcut's pooled input and projection's conv output;
//! per Mamba layer, for every token, five values per channel of the layer (norm, partition, projection back,
//! unpartition, residual; four for PiM, whose LayerNorm rebuilds its sequences from the map, `Operand::Partitioned`;
//! the backward direction reads the norm's tokens in place, `Order::Reversed`)
//! and per direction two of the inner width (SiLU of the convolution, the scan output: in_proj's halves and delta are
//! rebuilt by the ops that take them, `Operand::Product`) and x_proj's outputs; per decoder level the upsampled map,
//! the concatenation and its blocks; the logits and the loss's softmax. The count is a proxy: the engine's temporaries,
//! the pool's rounding and anything the count misses are absorbed by k, the bytes per counted value, which is fitted
//! per configuration family (3D, 2D) to one measured peak of the engine:
//!
//! - 3D: the FLARE reference configuration, batch 2, patch 40 x 224 x 192, fp32 storage with tf32 products: 21.28
//!   GiB (H200, 2026-12-05, `dump-step --precision fp32 --math tf32`, strided PiM; `benches/step.json`);
//! - 2D: the AMOS reference configuration, batch 12, patch 320 x 320: 9.15 GiB (same card and call).
//!
//! So the model is linear in voxels x batch within a family, exact at the two measured points, and its structure
//! decides how it extrapolates to other depths, widths and windows. The two float32 fits give k = 2.95 bytes (3D) and
//! 2.81 (2D), 5.0% apart (the test `memory_model_counts_parameters_exactly_and_is_exact_at_the_measured_peaks` holds
//! them within 5%), which is what makes the extrapolation credible. A third check, on another architecture (tiny-3d:
//! 4 stages, one block per stage, d_state 8): on the CPU one more sample raises the heap's peak during a training step
//! by 37.9 MB, and the model predicts 39.4 MB (`tests/plan_memory.rs`, a counting allocator, within 15%).
//!
//! The peaks were measured with every input that is cheap to rebuild rebuilt instead of kept (`ops::operand`: Mamba's
//! in_proj halves and delta, a residual block's first normalised map, PiM's sequences) and a block's end as one op
//! (`instance_norm_add_act`): 33.19 and 14.24 GiB in fp32, 17.19 and 7.57 in bf16 before those, in the same call.
//!
//! bf16 storage (a GPU run's default) has its own two calibration points, so that a bf16 plan gets the patch and batch
//! that bf16 holds rather than half of them: flare-3d batch 2 11.26 GiB and amos-2d batch 12 5.07 GiB (H200,
//! 2026-12-05, `dump-step --precision bf16 --math tf32`, strided PiM; `benches/step.json`), which give k = 1.50 bytes
//! (3D) and 1.37 (2D) per counted value of the same count E. They agree to 9.3%, less closely than the fp32 pair: E
//! counts the float32 tensors of a bf16 step (the loss's, the norms' statistics, the weight gradients' float32 slices)
//! like bf16 ones, and those weigh more where the maps are small (2D's deep stages). The planner takes the precision
//! the run will use ([`crate::plan::PlanOptions::precision`]); a plans file records it.

use crate::device::Precision;
use crate::nn::mamba::{x_proj_width, MambaConfig};
use crate::nn::ModelConfig;

/// One GiB in bytes.
pub const GIB: f64 = (1u64 << 30) as f64;

/// A measured peak of the engine's training step.
struct Measured {
    config: fn() -> ModelConfig,
    batch: usize,
    peak_gib: f64,
}

/// The calibration point of a family (`rank` 3 or 2) and precision (see the module header).
fn measured(rank: usize, precision: Precision) -> Measured {
    let (config, batch): (fn() -> ModelConfig, usize) =
        if rank == 2 { (ModelConfig::amos_2d, 12) } else { (ModelConfig::flare_3d, 2) };
    let peak_gib = match (rank == 2, precision) {
        (false, Precision::Fp32) => 21.28,
        (true, Precision::Fp32) => 9.15,
        (false, Precision::Bf16) => 11.26,
        (true, Precision::Bf16) => 5.07,
    };
    Measured { config, batch, peak_gib }
}

/// Bytes per parameter held during training: the weight, its gradient and its momentum, float32; in bf16 also the
/// weight rounded to bf16, which the conv or linear op that reads it keeps for its backward pass.
fn bytes_per_parameter(precision: Precision) -> f64 {
    match precision {
        Precision::Fp32 => 12.0,
        Precision::Bf16 => 14.0,
    }
}

/// The number of parameters of the network `cfg` builds (equal to `LkmUnet::new(cfg)`'s count).
pub fn parameter_count(cfg: &ModelConfig) -> usize {
    let conv = |cin: usize, cout: usize, k: &[usize], bias: bool| {
        cin * cout * k.iter().product::<usize>() + bias as usize * cout
    };
    let conv_norm = |cin, cout, k: &[usize]| conv(cin, cout, k, true) + 2 * cout;
    let ones = vec![1; cfg.spatial_rank()];
    let block = |cin, cout, k: &[usize]| {
        let projection = if cin != cout { conv(cin, cout, &ones, false) + 2 * cout } else { 0 };
        conv_norm(cin, cout, k) + conv_norm(cout, cout, k) + projection
    };
    let stage = |n_blocks: usize, cin, cout, k: &[usize]| {
        (0..n_blocks).map(|i| block(if i == 0 { cin } else { cout }, cout, k)).sum::<usize>()
    };
    let m = cfg.mamba;
    let mamba = |f: usize| {
        let (d, r, n) = (m.expand * f, f.div_ceil(16), m.d_state);
        2 * d * f + d * m.d_conv + d + (r + 2 * n) * d + d * r + d + d * n + d
    };
    let bi_mamba = |f: usize| 2 * f + 2 * mamba(f) + f * m.expand * f;
    let f = &cfg.features;
    let mut total = conv_norm(cfg.in_channels, f[0], &cfg.kernels[0]);
    for s in 0..f.len() {
        let cin = if s == 0 { f[0] } else { f[s - 1] };
        total += stage(cfg.blocks_enc[s], cin, f[s], &cfg.kernels[s]) + 2 * bi_mamba(f[s]);
    }
    for s in 0..f.len() - 1 {
        let up = f[s + 1] * f[s] * cfg.strides[s + 1].iter().product::<usize>() + f[s];
        let head = cfg.num_classes * f[s] + cfg.num_classes;
        total += up + stage(cfg.blocks_dec[s], 2 * f[s], f[s], &cfg.kernels[s]) + head;
    }
    total
}

/// Values one Mamba layer keeps per token at width `f` (see the module header).
fn mamba_values_per_token(f: usize, m: MambaConfig) -> usize {
    let d = m.expand * f;
    5 * f + 2 * (2 * d + x_proj_width(f.div_ceil(16), m.d_state)) + 2 * d
}

/// Values one residual block keeps per voxel: three maps of `cout`, the pooled input of a strided block, the
/// projection's conv output when the width changes.
fn block_values_per_voxel(cin: usize, cout: usize, strided: bool) -> usize {
    3 * cout + if strided { cin } else { 0 } + if cin != cout { cout } else { 0 }
}

/// Activation values one sample keeps for the backward pass at `cfg.patch` (see the module header).
pub fn activation_elements(cfg: &ModelConfig) -> f64 {
    let maps = cfg.stage_sizes(&cfg.patch);
    let voxels: Vec<f64> = maps.iter().map(|m| m.iter().product::<usize>() as f64).collect();
    let f = &cfg.features;
    let k = cfg.num_classes as f64;
    let n = f.len();
    let stage_blocks = |n_blocks: usize, cin: usize, cout: usize, strided: bool| {
        (0..n_blocks)
            .map(|i| {
                let first = i == 0;
                block_values_per_voxel(if first { cin } else { cout }, cout, first && strided) as f64
            })
            .sum::<f64>()
    };
    // Input, stem (conv, norm, activation).
    let mut total = voxels[0] * (cfg.in_channels + 3 * f[0]) as f64;
    for s in 0..n {
        let cin = if s == 0 { f[0] } else { f[s - 1] };
        let strided = cfg.strides[s].iter().any(|&x| x != 1);
        total += voxels[s] * stage_blocks(cfg.blocks_enc[s], cin, f[s], strided);
        let per_token = mamba_values_per_token(f[s], cfg.mamba) as f64;
        // PiM's LayerNorm keeps the map, not its sequences.
        total += voxels[s] * (per_token - f[s] as f64);
        let pool = cfg.pam_pools[s].iter().product::<usize>() as f64;
        total += if pool > 1.0 {
            // Pooled tokens, the pooled map, the upsampled map and the sum.
            voxels[s] / pool * (per_token + f[s] as f64) + voxels[s] * 2.0 * f[s] as f64
        } else {
            voxels[s] * per_token
        };
    }
    for s in 0..n - 1 {
        let emits = cfg.deep_supervision || s == 0;
        // The upsampled map, the concatenation, the blocks, and the logits with the loss's softmax and gradient.
        total += voxels[s] * (3 * f[s]) as f64 + voxels[s] * stage_blocks(cfg.blocks_dec[s], 2 * f[s], f[s], false);
        total += if emits { voxels[s] * 3.0 * k } else { 0.0 };
    }
    total
}

/// The fitted bytes per counted activation value of a family (3D or 2D, by `rank`) in `precision`: its measured
/// peak less the parameters' share, over batch x values.
pub fn bytes_per_value(rank: usize, precision: Precision) -> f64 {
    let m = measured(rank, precision);
    let cfg = (m.config)();
    (m.peak_gib * GIB - fixed_bytes(&cfg, precision)) / (m.batch as f64 * activation_elements(&cfg))
}

/// Estimated peak GiB of a training step of `cfg` (at its patch) with `batch` samples in `precision`.
pub fn estimate_gib(cfg: &ModelConfig, batch: usize, precision: Precision) -> f64 {
    (fixed_bytes(cfg, precision) + batch as f64 * sample_bytes(cfg, precision)) / GIB
}

/// Bytes independent of the batch: weights, gradients, momentum (and the bf16 weights).
pub fn fixed_bytes(cfg: &ModelConfig, precision: Precision) -> f64 {
    bytes_per_parameter(precision) * parameter_count(cfg) as f64
}

/// Bytes each sample of the batch adds in `precision`.
pub fn sample_bytes(cfg: &ModelConfig, precision: Precision) -> f64 {
    bytes_per_value(cfg.spatial_rank(), precision) * activation_elements(cfg)
}
