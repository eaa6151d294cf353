//! From a data source to training-ready cases: load, resample to a common spacing, normalise, split off validation.
//!
//! Spacing policy: the target spacing is the median spacing of the training cases; a case whose spacing differs
//! from it by more than 1% on any axis is resampled (trilinear image, nearest label). `predict` applies the same
//! resampling, normalisation and, for its output, the inverse resampling, so predictions land on the input's grid.

use std::path::Path;

use crate::data::dataset::Dataset;
use crate::data::normalize::{normalize_case, Normalization};
use crate::data::resample::{median_spacing, needs_resampling, resample_case};
use crate::data::synth::{phantom_dataset, SynthConfig, PHANTOM_LABELS};
use crate::data::Case;
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
        "CT",
        class_names,
        val_fraction,
        format!("synthetic phantoms ({} cases of {:?})", cfg.cases, cfg.shape),
    )
}

/// An nnU-Net raw dataset folder: every training case loaded.
pub fn dataset(dir: &Path, val_fraction: f64) -> Result<Prepared> {
    let ds = Dataset::open(dir)?;
    let cases = ds.training_cases().iter().map(|c| ds.load_case(c)).collect::<Result<Vec<_>>>()?;
    finish(cases, ds.modality(), ds.label_names().to_vec(), val_fraction, format!("dataset {}", dir.display()))
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

/// Resamples to the training split's median spacing, normalises for `modality` with statistics of the training
/// split (CT) or per image, and splits.
fn finish(
    cases: Vec<Case>,
    modality: &str,
    class_names: Vec<String>,
    val_fraction: f64,
    source: String,
) -> Result<Prepared> {
    ensure!(!cases.is_empty(), Data, "{source}: no training cases");
    let channels = cases[0].channels;
    let spacing = median_spacing(split(&cases, val_fraction).0)?;
    let normalization = Normalization::for_modality(modality, split(&cases, val_fraction).0)?;
    let mut ready = Vec::with_capacity(cases.len());
    for case in cases {
        ensure!(
            case.channels == channels,
            Data,
            "{source}: case {} has {} channels, the first case {channels}",
            case.name,
            case.channels
        );
        let mut case = if needs_resampling(case.spacing, spacing) { resample_case(&case, spacing)? } else { case };
        normalize_case(&mut case, &normalization)?;
        ready.push(case);
    }
    let n_train = split(&ready, val_fraction).0.len();
    let val = ready.split_off(n_train);
    Ok(Prepared { train: ready, val, normalization, spacing, class_names, channels, source })
}
