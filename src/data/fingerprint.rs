//! The dataset fingerprint: what the planner needs to know about a dataset, gathered in one pass over its training
//! cases (one case in memory at a time), as nnU-Net's fingerprint extractor does.
//!
//! Per case: its shape and spacing, and its shape after cropping to the nonzero region (`crop`). Over the dataset:
//! the voxel count of every class, the median fraction of voxels the crop keeps, and per channel the statistics of
//! the foreground intensities (label > 0; at most `CT_SAMPLES_PER_CASE` evenly spread samples per case): mean, std,
//! median, min, max and the 0.5 / 99.5 percentiles (the CT normalisation's clip range).

use std::path::Path;

use super::crop::crop_to_nonzero;
use super::dataset::Dataset;
use super::normalize::{percentile, CtStats, ForegroundSampler};
use super::Case;
use crate::{ensure, Result};

/// Shape and spacing of one training case.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CaseFingerprint {
    /// Case name.
    pub name: String,
    /// Spatial size [D, H, W] as stored.
    pub shape: [usize; 3],
    /// Size after cropping to the nonzero region.
    pub shape_after_crop: [usize; 3],
    /// Voxel spacing [z, y, x] in mm.
    pub spacing: [f64; 3],
}

/// Statistics of one channel's foreground intensities.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntensityStats {
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Median.
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// 0.5th percentile.
    pub p00_5: f64,
    /// 99.5th percentile.
    pub p99_5: f64,
}

impl IntensityStats {
    /// The CT normalisation's statistics (clip to the percentiles, z-score with mean and std).
    pub fn ct_stats(&self) -> CtStats {
        CtStats { lo: self.p00_5 as f32, hi: self.p99_5 as f32, mean: self.mean as f32, std: self.std as f32 }
    }

    /// The statistics of a non-empty sample (reordered in place).
    pub fn from_samples(samples: &mut [f32]) -> IntensityStats {
        let ct = CtStats::from_samples(samples);
        let (min, max) = samples.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        IntensityStats {
            mean: ct.mean as f64,
            std: ct.std as f64,
            median: percentile(samples, 50.0),
            min: min as f64,
            max: max as f64,
            p00_5: ct.lo as f64,
            p99_5: ct.hi as f64,
        }
    }
}

/// Everything the planner reads about a dataset.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    /// Channel names from dataset.json ("CT", "T1", ...).
    pub channel_names: Vec<String>,
    /// Class names, background first.
    pub class_names: Vec<String>,
    /// The training cases.
    pub cases: Vec<CaseFingerprint>,
    /// Foreground intensity statistics per channel.
    pub intensity: Vec<IntensityStats>,
    /// Voxels of each class over all training cases (background first).
    pub class_voxels: Vec<u64>,
    /// Median over cases of (voxels after cropping to nonzero) / (voxels before).
    pub median_relative_size_after_crop: f64,
}

impl Fingerprint {
    /// Reads every training case of the nnU-Net raw dataset at `dir`, one at a time.
    pub fn of_dataset(dir: &Path) -> Result<Fingerprint> {
        let ds = Dataset::open(dir)?;
        let mut acc = Accumulator::new(ds.channel_names().len(), ds.num_classes());
        for name in ds.training_cases() {
            acc.add(&ds.load_case(name)?)?;
        }
        acc.finish(ds.channel_names().to_vec(), ds.label_names().to_vec(), &dir.display().to_string())
    }

    /// Whether channel `channel` is named CT (which selects the CT normalisation for it).
    pub fn is_ct(&self, channel: usize) -> bool {
        self.channel_names.get(channel).is_some_and(|n| n.eq_ignore_ascii_case("ct"))
    }
}

/// The fingerprint under construction.
struct Accumulator {
    cases: Vec<CaseFingerprint>,
    samplers: Vec<ForegroundSampler>,
    class_voxels: Vec<u64>,
    kept: Vec<f64>,
}

impl Accumulator {
    fn new(channels: usize, classes: usize) -> Accumulator {
        Accumulator {
            cases: Vec::new(),
            samplers: (0..channels).map(ForegroundSampler::for_channel).collect(),
            class_voxels: vec![0; classes],
            kept: Vec::new(),
        }
    }

    fn add(&mut self, case: &Case) -> Result<()> {
        ensure!(
            case.channels == self.samplers.len(),
            Data,
            "case \"{}\" has {} channel(s), dataset.json declares {}",
            case.name,
            case.channels,
            self.samplers.len()
        );
        let (cropped, bbox) = crop_to_nonzero(case)?;
        for s in &mut self.samplers {
            s.add_case(&cropped)?;
        }
        for &l in cropped.label.iter().flatten() {
            if let Some(v) = self.class_voxels.get_mut(l as usize) {
                *v += 1;
            }
        }
        // Voxels cut away by the crop are background (a cropped label map holds all foreground).
        self.class_voxels[0] += (case.voxels() - cropped.voxels()) as u64;
        self.kept.push(cropped.voxels() as f64 / case.voxels().max(1) as f64);
        self.cases.push(CaseFingerprint {
            name: case.name.clone(),
            shape: case.shape,
            shape_after_crop: bbox.shape(),
            spacing: case.spacing,
        });
        Ok(())
    }

    fn finish(self, channel_names: Vec<String>, class_names: Vec<String>, source: &str) -> Result<Fingerprint> {
        ensure!(!self.cases.is_empty(), Data, "{source}: no training cases to fingerprint");
        let intensity = self
            .samplers
            .into_iter()
            .map(|s| Ok(IntensityStats::from_samples(&mut s.into_samples()?)))
            .collect::<Result<Vec<_>>>()?;
        let median = median(self.kept);
        Ok(Fingerprint {
            channel_names,
            class_names,
            cases: self.cases,
            intensity,
            class_voxels: self.class_voxels,
            median_relative_size_after_crop: median,
        })
    }
}

/// The p-th percentile (0..=100) of a non-empty list, interpolating linearly between order statistics like
/// `numpy.percentile` (so the 50th is `numpy.median`).
pub fn percentile_of(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let h = p / 100.0 * (v.len() - 1) as f64;
    let (k, frac) = (h.floor() as usize, h - h.floor());
    match v.get(k + 1) {
        Some(&above) if frac > 0.0 => v[k] + frac * (above - v[k]),
        _ => v[k],
    }
}

/// The median of a non-empty list (the mean of the two middle values for an even count).
pub fn median(v: Vec<f64>) -> f64 {
    percentile_of(v, 50.0)
}
