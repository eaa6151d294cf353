//! Planning a dataset like nnU-Net: from its fingerprint to a network, a patch, a batch and a preprocessing.
//!
//! The rules, in order (nnU-Net v2's `ExperimentPlanner`, with this engine's memory model):
//! 1. Target spacing: the median spacing per axis. Anisotropy rule: when the coarsest axis's median spacing is more
//!    than 3 times the finest other axis's and that axis also has fewer than a third of the voxels of the other axes
//!    (median cropped shape), its target is the 10th percentile of its spacings instead (but not finer than the other
//!    axes), so that thick-slice outliers do not force interpolating most cases across slices.
//! 2. Median shape: the per-axis median of every case's cropped shape after resampling to the target.
//! 3. Dimensionality: 3D, unless the median shape is one slice deep (or `--dims 2d`): a 2D plan works on the in-plane
//!    axes and leaves the slice axis unresampled.
//! 4. Patch: start from a box with the aspect of the target spacing and the volume of 256^3 (3D) or 2048^2 (2D) voxels,
//!    clipped to the median shape; derive strides and kernels from it (`topology`), padding it to a multiple of
//!    2^(pools); while the estimated peak of a batch of 2 exceeds the memory budget, shrink the axis that is largest
//!    relative to the median shape by one divisibility step and derive the topology again.
//! 5. Batch: as many samples as the budget holds, capped so that one batch covers at most 5% of the dataset's voxels,
//!    and at least 2.
//! 6. Network: features `min(32 * 2^s, 320)` (3D) or `min(.., 512)` (2D), two residual blocks per stage in encoder and
//!    decoder (the reference configurations'), PiM windows and PaM factors from the stage maps (`topology`).
//! 7. Normalisation per channel: CT clips to the foreground's 0.5 / 99.5 percentiles and z-scores with its mean and
//!    std; any other channel is z-scored per image, over the nonzero voxels only when cropping to the nonzero region
//!    keeps less than three quarters of the median case (nnU-Net's `use_mask_for_norm`).
//!
//! The memory budget is the card's memory times [`USABLE_MEMORY_FRACTION`], and the memory model's estimates are those
//! of the precision the run will train in ([`PlanOptions::precision`]: bf16 by default, as a GPU run). Differences from
//! nnU-Net: no axis transposition (volumes keep their (D, H, W) = (z, y, x) order, so a 2D plan slices along z), no
//! low-resolution cascade, and the batch is the floor, not the rounding, of what fits (the model is an absolute
//! estimate in bytes).

pub mod memory;
pub mod topology;

use std::path::Path;

use crate::data::fingerprint::{median, percentile_of, Fingerprint};
use crate::data::normalize::{ChannelNorm, Normalization};
use crate::data::resample::resampled_shape;
use crate::device::Precision;
use crate::nn::mamba::MambaConfig;
use crate::nn::ModelConfig;
use crate::ops::pim::PimLayout;
use crate::{bail, ensure, Error, Result};
use topology::{pam_pools, pim_windows, topology};

/// nnU-Net's anisotropy threshold: a spacing ratio (and inverse voxel-count ratio) above which an axis is
/// "low resolution".
pub const ANISOTROPY_THRESHOLD: f64 = 3.0;

/// The share of the card's memory a plan may fill. The model predicts the pool's high-water mark of allocated
/// bytes; the rest is for the CUDA context and cuBLAS workspaces (about 1 GiB), the pool's fragmentation (its
/// reserved memory exceeds the allocated peak) and validation by sliding window during training.
pub const USABLE_MEMORY_FRACTION: f64 = 0.85;

/// One batch covers at most this fraction of the dataset's voxels (nnU-Net's overfitting precaution).
const MAX_DATASET_COVERED: f64 = 0.05;

/// The smallest batch a plan uses (instance norm statistics and batch Dice need more than one sample).
const MIN_BATCH: usize = 2;

/// 3D or 2D.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Dims {
    /// Volumetric patches.
    #[serde(rename = "3d")]
    ThreeD,
    /// In-plane patches of single slices along z.
    #[serde(rename = "2d")]
    TwoD,
}

impl Dims {
    /// Parses `3d` or `2d`.
    pub fn parse(s: &str) -> Result<Dims> {
        match s {
            "3d" => Ok(Dims::ThreeD),
            "2d" => Ok(Dims::TwoD),
            s => bail!(Config, "--dims must be 3d or 2d, not {s:?}"),
        }
    }
}

/// What the planner may choose within.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// The GPU's memory in GiB (the budget is [`USABLE_MEMORY_FRACTION`] of it).
    pub gpu_memory_gib: f64,
    /// 3D or 2D; `None`: 3D unless the data is a single slice deep.
    pub dims: Option<Dims>,
    /// Features of stage 0 (doubling per stage up to 320 in 3D, 512 in 2D); 32 in nnU-Net. Smaller values make
    /// small models for tests and CPU experiments.
    pub base_features: usize,
    /// Residual blocks per stage, encoder and decoder.
    pub blocks_per_stage: usize,
    /// Mamba hyper-parameters.
    pub mamba: MambaConfig,
    /// The storage the run will train in, which sets the memory model ([`memory`]): bf16 activations take about
    /// half the memory of float32 ones.
    pub precision: Precision,
}

impl Default for PlanOptions {
    /// nnU-Net's default 8 GiB target, nnU-Net's widths, two blocks per stage, Mamba's defaults, and bf16 (the
    /// default of a GPU run).
    fn default() -> Self {
        PlanOptions {
            gpu_memory_gib: 8.0,
            dims: None,
            base_features: 32,
            blocks_per_stage: 2,
            mamba: MambaConfig::default(),
            precision: Precision::Bf16,
        }
    }
}

/// A training plan: preprocessing, network and batch.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// 3D or 2D.
    pub dims: Dims,
    /// Target spacing [z, y, x] in mm (2D: z is the median; slices are not resampled along it).
    pub spacing: [f64; 3],
    /// Whether the anisotropy rule set the target of the coarsest axis.
    pub anisotropic: bool,
    /// Median [D, H, W] of the cases after cropping and resampling.
    pub median_shape: [usize; 3],
    /// Patches per batch.
    pub batch: usize,
    /// The network (its `patch` is the training patch).
    pub model: ModelConfig,
    /// Per-channel normalisation.
    pub normalization: Normalization,
    /// Estimated peak GiB of a training step.
    pub estimated_gib: f64,
    /// The memory budget planned for, GiB.
    pub budget_gib: f64,
    /// The storage the estimate is for (plans written before it was recorded were made for fp32).
    #[serde(default)]
    pub precision: Precision,
}

impl Plan {
    /// The spacing a case of spacing `case_spacing` is resampled to: the plan's, except along the slice axis of a
    /// 2D plan, which keeps the case's own.
    pub fn target_spacing_for(&self, case_spacing: [f64; 3]) -> [f64; 3] {
        match self.dims {
            Dims::ThreeD => self.spacing,
            Dims::TwoD => [case_spacing[0], self.spacing[1], self.spacing[2]],
        }
    }
}

/// The content of a plans file: the fingerprint and the plan made from it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plans {
    /// What the planner read.
    pub fingerprint: Fingerprint,
    /// What it chose.
    pub plan: Plan,
}

impl Plans {
    /// Writes the plans as pretty JSON, atomically (a temporary file renamed over `path`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(|e| Error::Io(format!("{}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))
    }

    /// Reads plans written by [`Plans::save`], checking that the network fits its patch.
    pub fn load(path: &Path) -> Result<Plans> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        let plans: Plans = serde_json::from_str(&text).map_err(|e| {
            Error::Data(format!("{}: not a plans file written by `lkm-engine plan`: {e}", path.display()))
        })?;
        let m = &plans.plan.model;
        m.validate(&m.patch).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(plans)
    }
}

/// Target spacing by rule 1 of the module header, and whether the anisotropy rule applied.
pub fn target_spacing(fp: &Fingerprint) -> ([f64; 3], bool) {
    let mut target = [0, 1, 2].map(|a| median(fp.cases.iter().map(|c| c.spacing[a]).collect()));
    let size = [0, 1, 2].map(|a| median(fp.cases.iter().map(|c| c.shape_after_crop[a] as f64).collect()));
    let worst = (0..3).max_by(|&a, &b| target[a].total_cmp(&target[b]).then(b.cmp(&a))).expect("three axes");
    let others: Vec<usize> = (0..3).filter(|&a| a != worst).collect();
    let other_spacing = others.iter().map(|&a| target[a]).fold(f64::MIN, f64::max);
    let other_size = others.iter().map(|&a| size[a]).fold(f64::MAX, f64::min);
    let anisotropic =
        target[worst] > ANISOTROPY_THRESHOLD * other_spacing && size[worst] * ANISOTROPY_THRESHOLD < other_size;
    if anisotropic {
        let p10 = percentile_of(fp.cases.iter().map(|c| c.spacing[worst]).collect(), 10.0);
        target[worst] = if p10 < other_spacing { other_spacing.max(p10) + 1e-5 } else { p10 };
    }
    (target, anisotropic)
}

/// The per-axis median shape of the cropped cases after resampling to `target` (rounded to voxels).
pub fn median_shape(fp: &Fingerprint, target: [f64; 3]) -> [usize; 3] {
    let shapes: Vec<[usize; 3]> =
        fp.cases.iter().map(|c| resampled_shape(c.shape_after_crop, c.spacing, target)).collect();
    [0, 1, 2].map(|a| median(shapes.iter().map(|s| s[a] as f64).collect()).round().max(1.0) as usize)
}

/// The normalisation of rule 7 of the module header.
pub fn normalization(fp: &Fingerprint) -> Normalization {
    let masked = fp.median_relative_size_after_crop < 0.75;
    Normalization::PerChannel(
        (0..fp.channel_names.len())
            .map(|c| {
                if fp.is_ct(c) {
                    ChannelNorm::Ct(fp.intensity[c].ct_stats())
                } else {
                    ChannelNorm::ZScore { nonzero_mask: masked }
                }
            })
            .collect(),
    )
}

/// The network for `patch` at `spacing` (2 or 3 axes), with the patch padded to its divisibility.
fn network(spacing: &[f64], patch: &[usize], fp: &Fingerprint, opts: &PlanOptions) -> (ModelConfig, Vec<usize>) {
    let topo = topology(spacing, patch);
    let n = topo.strides.len();
    let max_features = if spacing.len() == 3 { 320 } else { 512 };
    let mut cfg = ModelConfig {
        in_channels: fp.channel_names.len(),
        num_classes: fp.class_names.len(),
        features: (0..n).map(|s| (opts.base_features << s).min(max_features)).collect(),
        kernels: topo.kernels,
        strides: topo.strides,
        blocks_enc: vec![opts.blocks_per_stage; n],
        blocks_dec: vec![opts.blocks_per_stage; n - 1],
        deep_supervision: true,
        pim_windows: Vec::new(),
        pim_layout: PimLayout::Window,
        pam_pools: Vec::new(),
        mamba: opts.mamba,
        patch: topo.patch,
    };
    let maps = cfg.stage_sizes(&cfg.patch);
    cfg.pim_windows = pim_windows(&maps);
    cfg.pam_pools = pam_pools(&maps);
    (cfg, topo.divisor)
}

/// Rule 4's loop: the network for `start`, its patch shrunk until a batch of 2 fits `budget` GiB.
fn fit_to_budget(
    sp: &[f64],
    med: &[usize],
    start: &[usize],
    budget: f64,
    fp: &Fingerprint,
    opts: &PlanOptions,
) -> Result<ModelConfig> {
    let (mut cfg, mut divisor) = network(sp, start, fp, opts);
    while memory::estimate_gib(&cfg, MIN_BATCH, opts.precision) > budget {
        // Shrink the axis largest relative to the median shape (ties: the last), by the divisibility step of the
        // shrunk patch (nnU-Net subtracts, re-derives the step, and subtracts that, so that no valid size is skipped).
        let ratio = |a: usize| cfg.patch[a] as f64 / med[a] as f64;
        let a = (0..sp.len()).max_by(|&x, &y| ratio(x).total_cmp(&ratio(y)).then(x.cmp(&y))).expect("an axis");
        let too_small = || {
            Error::Config(format!(
                "--gpu-memory {} GiB: even a batch of {MIN_BATCH} patches of {:?} needs about {:.3} GiB; give more memory",
                opts.gpu_memory_gib,
                cfg.patch,
                memory::estimate_gib(&cfg, MIN_BATCH, opts.precision)
            ))
        };
        let mut smaller = cfg.patch.clone();
        if smaller[a] <= divisor[a] {
            return Err(too_small());
        }
        smaller[a] -= divisor[a];
        let step = topology(sp, &smaller).divisor[a];
        let mut patch = cfg.patch.clone();
        patch[a] -= step;
        let next = network(sp, &patch, fp, opts);
        if next.0.features.len() < 2 {
            return Err(too_small());
        }
        (cfg, divisor) = next;
    }
    Ok(cfg)
}

/// Plans training for the dataset of `fp` (see the module header).
pub fn plan(fp: &Fingerprint, opts: &PlanOptions) -> Result<Plan> {
    ensure!(!fp.cases.is_empty(), Data, "plan: the fingerprint has no cases");
    ensure!(
        opts.gpu_memory_gib.is_finite() && opts.gpu_memory_gib > 0.0,
        Config,
        "--gpu-memory must be a positive number of GiB, got {}",
        opts.gpu_memory_gib
    );
    ensure!(opts.base_features > 0 && opts.blocks_per_stage > 0, Config, "plan: features and blocks must be positive");
    let (spacing, anisotropic) = target_spacing(fp);
    let shape = median_shape(fp, spacing);
    let dims = match opts.dims {
        Some(Dims::ThreeD) if shape[0] == 1 => {
            bail!(Config, "--dims 3d: the cases are one slice deep (median shape {shape:?}); plan them in 2D")
        }
        Some(d) => d,
        None if shape[0] == 1 => Dims::TwoD,
        None => Dims::ThreeD,
    };
    let (sp, med): (Vec<f64>, Vec<usize>) = match dims {
        Dims::ThreeD => (spacing.to_vec(), shape.to_vec()),
        Dims::TwoD => (spacing[1..].to_vec(), shape[1..].to_vec()),
    };
    // Rule 4: a box of the spacing's aspect with nnU-Net's starting volume, clipped to the median shape.
    let start_volume = if sp.len() == 3 { 256f64.powi(3) } else { 2048f64.powi(2) };
    let aspect: Vec<f64> = sp.iter().map(|s| 1.0 / s).collect();
    let scale = (start_volume / aspect.iter().product::<f64>()).powf(1.0 / sp.len() as f64);
    let start: Vec<usize> = aspect.iter().zip(&med).map(|(a, &m)| ((a * scale).round() as usize).clamp(1, m)).collect();
    let budget = opts.gpu_memory_gib * USABLE_MEMORY_FRACTION;
    let cfg = fit_to_budget(&sp, &med, &start, budget, fp, opts)?;
    cfg.validate(&cfg.patch).map_err(|e| {
        Error::Config(format!(
            "the median case after cropping and resampling, {med:?} voxels, is too small for a U-Net: {e}"
        ))
    })?;
    // Rule 5.
    let p = opts.precision;
    let fits = ((budget * memory::GIB - memory::fixed_bytes(&cfg, p)) / memory::sample_bytes(&cfg, p)).floor() as usize;
    let dataset_voxels = med.iter().product::<usize>() as f64 * fp.cases.len() as f64;
    let covered = (dataset_voxels * MAX_DATASET_COVERED / cfg.patch.iter().product::<usize>() as f64).round() as usize;
    let batch = fits.min(covered).max(MIN_BATCH);
    Ok(Plan {
        dims,
        spacing,
        anisotropic,
        median_shape: shape,
        batch,
        estimated_gib: memory::estimate_gib(&cfg, batch, p),
        budget_gib: budget,
        precision: p,
        model: cfg,
        normalization: normalization(fp),
    })
}

/// Sets PiM windows (`pim`) and PaM factors (`pam`) of single stages: (stage, sizes) with one size per spatial axis
/// or one for all; the result is validated against the patch (a size that does not divide its map is an error
/// naming stage, axis and sizes).
pub fn override_stages(cfg: &mut ModelConfig, pim: &[(usize, Vec<usize>)], pam: &[(usize, Vec<usize>)]) -> Result<()> {
    let r = cfg.spatial_rank();
    let stages = cfg.features.len();
    for (what, list, table) in [("--pim-window", pim, &mut cfg.pim_windows), ("--pam-factor", pam, &mut cfg.pam_pools)]
    {
        for (s, sizes) in list {
            ensure!(*s < stages, Config, "{what} {s}=...: the model has stages 0..{}", stages - 1);
            ensure!(
                sizes.len() == 1 || sizes.len() == r,
                Config,
                "{what} {s}={sizes:?}: give one size or {r} (one per spatial axis)"
            );
            ensure!(sizes.iter().all(|&v| v > 0), Config, "{what} {s}={sizes:?}: sizes must be positive");
            table[*s] = if sizes.len() == 1 { vec![sizes[0]; r] } else { sizes.clone() };
        }
    }
    cfg.validate(&cfg.patch)
}

/// Parses a per-stage override `STAGE=AxBxC` (or `STAGE=A` for every axis), e.g. `0=20x28x24`.
pub fn parse_stage_sizes(s: &str) -> std::result::Result<(usize, Vec<usize>), String> {
    let bad = |why: &str| format!("{s:?}: {why}; expected STAGE=AxBxC or STAGE=A, e.g. 0=20x28x24");
    let (stage, sizes) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
    let stage = stage.trim().parse().map_err(|_| bad("the stage is not a number"))?;
    let sizes = sizes
        .split('x')
        .map(|v| v.trim().parse::<usize>().map_err(|_| bad("a size is not a number")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((stage, sizes))
}

/// A readable account of the fingerprint and the plan.
pub fn summary(fp: &Fingerprint, plan: &Plan) -> String {
    let x = |v: &[usize]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>().join("x");
    let mm = |v: &[f64]| v.iter().map(|a| format!("{a:.3}")).collect::<Vec<_>>().join(" x ");
    let spacings: Vec<[f64; 3]> = fp.cases.iter().map(|c| c.spacing).collect();
    let median_spacing = [0, 1, 2].map(|a| median(spacings.iter().map(|s| s[a]).collect()));
    let median_crop = [0, 1, 2].map(|a| median(fp.cases.iter().map(|c| c.shape_after_crop[a] as f64).collect()));
    let total: u64 = fp.class_voxels.iter().sum();
    let mut out = format!(
        "fingerprint: {} cases, channels {:?}\n  median spacing {} mm (z, y, x); median shape after crop {} voxels; \
         the crop to nonzero keeps {:.0}% of the median case\n",
        fp.cases.len(),
        fp.channel_names,
        mm(&median_spacing),
        median_crop.map(|v| v.to_string()).join("x"),
        100.0 * fp.median_relative_size_after_crop
    );
    for (c, s) in fp.intensity.iter().enumerate() {
        out += &format!(
            "  channel {c} ({}) foreground: mean {:.4} std {:.4} median {:.4} range [{:.4}, {:.4}] percentiles 0.5/99.5 \
             {:.4} / {:.4}\n",
            fp.channel_names[c], s.mean, s.std, s.median, s.min, s.max, s.p00_5, s.p99_5
        );
    }
    let classes: Vec<String> = fp
        .class_names
        .iter()
        .zip(&fp.class_voxels)
        .map(|(n, &v)| format!("{n} {:.2}%", 100.0 * v as f64 / total.max(1) as f64))
        .collect();
    out += &format!("  class voxels: {}\n", classes.join(", "));
    let m = &plan.model;
    out += &format!(
        "plan ({}): target spacing {} mm{}; median shape after resampling {}\n  patch {}, batch {}; estimated peak \
         {:.1} GiB of a {:.1} GiB budget in {}\n",
        if plan.dims == Dims::ThreeD { "3d" } else { "2d" },
        mm(&plan.spacing),
        if plan.anisotropic { " (anisotropic: the coarse axis takes its 10th-percentile spacing)" } else { "" },
        x(&plan.median_shape),
        x(&m.patch),
        plan.batch,
        plan.estimated_gib,
        plan.budget_gib,
        plan.precision
    );
    out += "  stage  map          features  kernel  stride  PiM window  PaM pool\n";
    for (s, map) in m.stage_sizes(&m.patch).iter().enumerate() {
        out += &format!(
            "  {s:<5}  {:<11}  {:<8}  {:<6}  {:<6}  {:<10}  {}\n",
            x(map),
            m.features[s],
            x(&m.kernels[s]),
            x(&m.strides[s]),
            x(&m.pim_windows[s]),
            x(&m.pam_pools[s])
        );
    }
    for c in 0..fp.channel_names.len() {
        let how = match plan.normalization.channel(c) {
            ChannelNorm::Ct(s) => {
                format!("CT: clip to [{:.2}, {:.2}], z-score with mean {:.2} std {:.2}", s.lo, s.hi, s.mean, s.std)
            }
            ChannelNorm::ZScore { nonzero_mask: true } => {
                "z-score over the nonzero voxels (the crop removes a quarter or more)".into()
            }
            ChannelNorm::ZScore { nonzero_mask: false } => "z-score over the whole image".into(),
        };
        out += &format!("  normalisation of channel {c} ({}): {how}\n", fp.channel_names[c]);
    }
    out
}

/// Fingerprints the nnU-Net raw dataset at `dir` and plans it.
pub fn plan_dataset(dir: &Path, opts: &PlanOptions) -> Result<Plans> {
    let fingerprint = Fingerprint::of_dataset(dir)?;
    let plan = plan(&fingerprint, opts)?;
    Ok(Plans { fingerprint, plan })
}
