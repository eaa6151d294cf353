//! Intensity normalisation, as nnU-Net v2 does it.
//!
//! CT (channel 0 named "CT"): intensities in Hounsfield units mean the same thing in every scan, so one global
//! mapping is learned from the training set. Over the foreground voxels (label > 0) of all training cases, at most
//! [`CT_SAMPLES_PER_CASE`] per case taken evenly spread in raster order (deterministic), compute
//! - lo, hi: the 0.5 and 99.5 percentiles (linear interpolation between order statistics, like `numpy.percentile`),
//! - mean, std: the mean and population standard deviation of the same (unclipped) samples;
//!
//! then every image maps `x -> (clamp(x, lo, hi) - mean) / max(std, 1e-8)`.
//!
//! Other modalities (MR, ...): intensities are arbitrary per scan, so each image channel is z-scored with its own
//! statistics: `x -> (x - mean_c) / max(std_c, 1e-8)` over all voxels of channel c.
//!
//! With several channels and channel 0 CT (PET/CT), channel 0 gets the CT mapping and the others the per-image
//! z-score. Sums run in f64 so that millions of voxels do not lose precision.

use serde_json::{json, Value};

use super::Case;
use crate::{Error, Result};

/// At most this many foreground voxels per case enter the CT statistics.
pub const CT_SAMPLES_PER_CASE: usize = 100_000;

/// Floor of the standard deviation in a z-score (a constant image maps to 0, not to NaN).
const STD_FLOOR: f64 = 1e-8;

/// Dataset-wide CT intensity statistics of the foreground.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CtStats {
    /// 0.5th percentile of foreground intensities (lower clip).
    pub lo: f32,
    /// 99.5th percentile of foreground intensities (upper clip).
    pub hi: f32,
    /// Mean of the foreground intensities.
    pub mean: f32,
    /// Population standard deviation of the foreground intensities.
    pub std: f32,
}

/// How the images of a dataset are normalised (stored with a checkpoint so inference does the same).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Normalization {
    /// Channel 0 is CT: clip and z-score it with dataset statistics; other channels per-image z-score.
    Ct(CtStats),
    /// Every channel z-scored with its own per-image statistics.
    ZScore,
}

impl CtStats {
    /// Computes the statistics over channel 0 of labelled cases (foreground = label > 0). For datasets too large to
    /// hold in memory at once, feed the cases one by one to a [`CtSampler`] instead.
    pub fn from_cases(cases: &[Case]) -> Result<CtStats> {
        let mut sampler = CtSampler::default();
        for case in cases {
            sampler.add_case(case)?;
        }
        sampler.finish()
    }

    /// Statistics of a sample of foreground intensities (reordered in place by the percentile selection).
    pub fn from_samples(samples: &mut [f32]) -> CtStats {
        let n = samples.len() as f64;
        let mean = samples.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = samples.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        CtStats {
            lo: percentile(samples, 0.5) as f32,
            hi: percentile(samples, 99.5) as f32,
            mean: mean as f32,
            std: var.sqrt() as f32,
        }
    }

    /// The statistics as JSON: `{"lo": .., "hi": .., "mean": .., "std": ..}`.
    pub fn to_json(&self) -> Value {
        json!({ "lo": self.lo, "hi": self.hi, "mean": self.mean, "std": self.std })
    }

    /// Reads statistics written by [`CtStats::to_json`].
    pub fn from_json(v: &Value) -> Result<CtStats> {
        let get = |k: &str| -> Result<f32> {
            v.get(k)
                .and_then(Value::as_f64)
                .filter(|x| x.is_finite())
                .map(|x| x as f32)
                .ok_or_else(|| Error::Data(format!("CT statistics: missing or non-numeric \"{k}\" in {v}")))
        };
        let s = CtStats { lo: get("lo")?, hi: get("hi")?, mean: get("mean")?, std: get("std")? };
        crate::ensure!(
            s.lo <= s.hi && s.std >= 0.0,
            Data,
            "CT statistics: lo {} > hi {} or std {} < 0 in {v}",
            s.lo,
            s.hi,
            s.std
        );
        Ok(s)
    }
}

/// Collects the foreground samples of CT cases one at a time (see [`CtStats::from_cases`]), so that the training
/// set never has to be in memory at once.
#[derive(Clone, Debug, Default)]
pub struct CtSampler {
    samples: Vec<f32>,
    cases: usize,
}

impl CtSampler {
    /// Adds at most [`CT_SAMPLES_PER_CASE`] foreground intensities of channel 0 of `case`, evenly spread in raster
    /// order (non-finite values are skipped).
    pub fn add_case(&mut self, case: &Case) -> Result<()> {
        let label = case.label.as_ref().ok_or_else(|| {
            Error::Data(format!(
                "case \"{}\" has no label map; CT statistics are computed over labelled foreground",
                case.name
            ))
        })?;
        let n = case.voxels();
        crate::ensure!(
            label.len() == n && case.image.len() >= n,
            Shape,
            "case \"{}\": {} label values and {} image values for shape {:?}",
            case.name,
            label.len(),
            case.image.len(),
            case.shape
        );
        self.cases += 1;
        let image = &case.image[..n];
        let count = label.iter().filter(|&&l| l > 0).count();
        if count == 0 {
            return Ok(());
        }
        let take = count.min(CT_SAMPLES_PER_CASE);
        // The j-th sample is foreground voxel number floor((j + 1/2) * count / take): strictly increasing in j
        // (count / take >= 1), evenly spread, and every voxel when take == count.
        let next_rank = |j: usize| ((2 * j + 1) * count) / (2 * take);
        let mut j = 0;
        let mut want = next_rank(0);
        let mut rank = 0;
        for (&l, &x) in label.iter().zip(image) {
            if l == 0 {
                continue;
            }
            if rank == want {
                if x.is_finite() {
                    self.samples.push(x);
                }
                j += 1;
                if j == take {
                    break;
                }
                want = next_rank(j);
            }
            rank += 1;
        }
        Ok(())
    }

    /// The statistics of everything added.
    pub fn finish(mut self) -> Result<CtStats> {
        crate::ensure!(
            !self.samples.is_empty(),
            Data,
            "no foreground voxels (label > 0) with finite intensities in the {} case(s); CT statistics need \
             labelled foreground",
            self.cases
        );
        Ok(CtStats::from_samples(&mut self.samples))
    }
}

impl Normalization {
    /// The scheme for a dataset of this modality (see `Dataset::modality`): CT statistics from the training cases
    /// for "CT", per-image z-score otherwise.
    pub fn for_modality(modality: &str, training_cases: &[Case]) -> Result<Normalization> {
        if modality.eq_ignore_ascii_case("ct") {
            Ok(Normalization::Ct(CtStats::from_cases(training_cases)?))
        } else {
            Ok(Normalization::ZScore)
        }
    }

    /// As JSON: `{"scheme": "ct", "lo": .., "hi": .., "mean": .., "std": ..}` or `{"scheme": "zscore"}`.
    pub fn to_json(&self) -> Value {
        match self {
            Normalization::Ct(s) => {
                let mut v = s.to_json();
                v["scheme"] = json!("ct");
                v
            }
            Normalization::ZScore => json!({ "scheme": "zscore" }),
        }
    }

    /// Reads a scheme written by [`Normalization::to_json`].
    pub fn from_json(v: &Value) -> Result<Normalization> {
        match v.get("scheme").and_then(Value::as_str) {
            Some("ct") => Ok(Normalization::Ct(CtStats::from_json(v)?)),
            Some("zscore") => Ok(Normalization::ZScore),
            _ => crate::bail!(Data, "normalisation: \"scheme\" must be \"ct\" or \"zscore\" in {v}"),
        }
    }
}

/// Normalises the image of `case` in place (see the module header).
pub fn normalize_case(case: &mut Case, norm: &Normalization) -> Result<()> {
    let n = case.voxels();
    crate::ensure!(
        case.image.len() == case.channels * n && case.channels > 0,
        Shape,
        "normalize_case: case \"{}\" has {} image values for {} channel(s) of shape {:?}",
        case.name,
        case.image.len(),
        case.channels,
        case.shape
    );
    for (c, channel) in case.image.chunks_mut(n).enumerate() {
        match norm {
            Normalization::Ct(s) if c == 0 => {
                let inv = 1.0 / (s.std as f64).max(STD_FLOOR);
                let (lo, hi, mean) = (s.lo, s.hi, s.mean as f64);
                for x in channel.iter_mut() {
                    *x = ((x.clamp(lo, hi) as f64 - mean) * inv) as f32;
                }
            }
            _ => zscore(channel),
        }
    }
    Ok(())
}

/// In-place z-score of one channel with its own mean and population std (floored).
fn zscore(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / var.sqrt().max(STD_FLOOR);
    for v in x.iter_mut() {
        *v = ((*v as f64 - mean) * inv) as f32;
    }
}

/// The p-th percentile (0..=100) with linear interpolation between the order statistics at ranks floor(h) and
/// floor(h) + 1, h = p/100 * (n - 1) (numpy's default); O(n) by selection. `v` must be non-empty and NaN-free.
fn percentile(v: &mut [f32], p: f64) -> f64 {
    let h = p / 100.0 * (v.len() - 1) as f64;
    let k = h.floor() as usize;
    let frac = h - k as f64;
    let (_, &mut below, rest) = v.select_nth_unstable_by(k, f32::total_cmp);
    let below = below as f64;
    match rest.iter().copied().min_by(f32::total_cmp) {
        Some(above) if frac > 0.0 => below + frac * (above as f64 - below),
        _ => below,
    }
}
