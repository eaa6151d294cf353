//! From a data source to training-ready cases: load, crop to the nonzero region, resample to a common spacing,
//! normalise, split off validation.
//!
//! Spacing and normalisation come from a plan (`plan`) when there is one. Otherwise (the named configurations) the
//! target spacing is the median spacing of the training cases and the normalisation is chosen by modality
//! (`Normalization::for_modality`). A case whose spacing differs from the target by more than 1% on any axis is
//! resampled (trilinear image, nearest label). `predict` applies the same crop, resampling and normalisation and, for
//! its output, the inverse resampling and the uncrop, so predictions land on the input's grid.

use std::path::Path;

use crate::data::crop::crop_to_nonzero;
use crate::data::dataset::Dataset;
use crate::data::normalize::{normalize_case, Normalization};
use crate::data::resample::{median_spacing, needs_resampling, resample_case};
use crate::data::synth::{phantom_dataset, SynthConfig, PHANTOM_LABELS};
use crate::data::Case;
use crate::plan::Plan;
use crate::{ensure, Result};

/// Training-ready data and what inference needs to treat new images the same way.
pub struct Prepared {
    /// Normalised training cases.
    pub train: Vec<Case>,
    /// Normalised validation cases (full volumes).
    pub val: Vec<Case>,
    /// The normalisation applied.
    pub normalization: Normalization,
    /// The spacing every case was brought to.
    pub spacing: [f64; 3],
    /// Class names, background first.
    pub class_names: Vec<String>,
    /// Image channels.
    pub channels: usize,
    /// Where the data came from, for the logs.
    pub source: String,
    /// The plan the data was prepared by, if any.
    pub plan: Option<Plan>,
}

impl Prepared {
    /// What a checkpoint must remember to preprocess new images like the training data.
    pub fn meta(&self) -> serde_json::Value {
        serde_json::json!({
            "normalization": self.normalization.to_json(),
            "spacing": self.spacing,
            "class_names": self.class_names,
            "channels": self.channels,
            "source": self.source,
            "plan": self.plan,
        })
    }

    /// The number of classes, background included.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }
}

/// The synthetic phantom dataset, generated in memory. Its intensities are HU-like, so it is normalised as CT,
/// exactly as the same data written by `lkm-engine synth` (channel "CT") and read back would be.
pub fn synthetic(cfg: &SynthConfig, val_fraction: f64) -> Result<Prepared> {
    let cases = phantom_dataset(cfg);
    let class_names = PHANTOM_LABELS.iter().map(|(n, _)| n.to_string()).collect();
    finish(
        cases,
        Recipe::Modality("CT"),
        class_names,
        val_fraction,
        format!("synthetic phantoms ({} cases of {:?})", cfg.cases, cfg.shape),
    )
}

/// An nnU-Net raw dataset folder: every training case loaded; median spacing, normalisation by modality.
pub fn dataset(dir: &Path, val_fraction: f64) -> Result<Prepared> {
    let ds = Dataset::open(dir)?;
    let cases = load_cases(&ds)?;
    let source = format!("dataset {}", dir.display());
    finish(cases, Recipe::Modality(ds.modality()), ds.label_names().to_vec(), val_fraction, source)
}

/// An nnU-Net raw dataset folder prepared by `plan` (its spacing and normalisation); the dataset must have the
/// plan's channels and classes.
pub fn planned(dir: &Path, plan: &Plan, val_fraction: f64) -> Result<Prepared> {
    let ds = Dataset::open(dir)?;
    let m = &plan.model;
    ensure!(
        ds.channel_names().len() == m.in_channels && ds.num_classes() == m.num_classes,
        Config,
        "dataset {} has {} channel(s) and {} classes, the plan {} and {}: plan this dataset with `lkm-engine plan`",
        dir.display(),
        ds.channel_names().len(),
        ds.num_classes(),
        m.in_channels,
        m.num_classes
    );
    let cases = load_cases(&ds)?;
    let source = format!("dataset {}", dir.display());
    finish(cases, Recipe::Plan(plan), ds.label_names().to_vec(), val_fraction, source)
}

/// Every training case of `ds`, cropped to its nonzero region as it is loaded.
fn load_cases(ds: &Dataset) -> Result<Vec<Case>> {
    ds.training_cases().iter().map(|c| Ok(crop_to_nonzero(&ds.load_case(c)?)?.0)).collect()
}

/// Where spacing and normalisation come from.
enum Recipe<'a> {
    /// The training split's median spacing, normalisation by this modality.
    Modality(&'a str),
    /// A plan's.
    Plan(&'a Plan),
}

/// The last `val_fraction` of the cases (at least one when the fraction is positive and there are two or more cases)
/// validate; the rest train.
fn split(cases: &[Case], val_fraction: f64) -> (&[Case], &[Case]) {
    let n_val = if cases.len() < 2 || val_fraction <= 0.0 {
        0
    } else {
        ((cases.len() as f64 * val_fraction).round() as usize).clamp(1, cases.len() - 1)
    };
    cases.split_at(cases.len() - n_val)
}

/// Resamples and normalises by `recipe` (statistics of the training split or the plan's), and splits.
fn finish(
    cases: Vec<Case>,
    recipe: Recipe,
    class_names: Vec<String>,
    val_fraction: f64,
    source: String,
) -> Result<Prepared> {
    ensure!(!cases.is_empty(), Data, "{source}: no training cases");
    let channels = cases[0].channels;
    let train = split(&cases, val_fraction).0;
    let (spacing, normalization, plan) = match recipe {
        Recipe::Modality(m) => (median_spacing(train)?, Normalization::for_modality(m, train)?, None),
        Recipe::Plan(p) => (p.spacing, p.normalization.clone(), Some(p.clone())),
    };
    let mut ready = Vec::with_capacity(cases.len());
    for case in cases {
        ensure!(
            case.channels == channels,
            Data,
            "{source}: case {} has {} channels, the first case {channels}",
            case.name,
            case.channels
        );
        let target = plan.as_ref().map_or(spacing, |p| p.target_spacing_for(case.spacing));
        let mut case = if needs_resampling(case.spacing, target) { resample_case(&case, target)? } else { case };
        normalize_case(&mut case, &normalization)?;
        ready.push(case);
    }
    let n_train = split(&ready, val_fraction).0.len();
    let val = ready.split_off(n_train);
    Ok(Prepared { train: ready, val, normalization, spacing, class_names, channels, source, plan })
}
