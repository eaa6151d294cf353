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
//! statistics: `x -> (x - mean_c) / max(std_c, 1e-8)` over all voxels of channel c. With a nonzero mask (nnU-Net's
//! `use_mask_for_norm`, chosen by the planner when cropping to the nonzero region shrinks the median case by a quarter
//! or more) the statistics are taken over the voxels where any channel is nonzero, and the voxels outside stay 0: the
//! zero background of a skull-stripped brain then no longer decides the scale of the brain's intensities.
//!
//! With several channels and channel 0 CT (PET/CT), channel 0 gets the CT mapping and the others the per-image
//! z-score; a plan gives every channel its own scheme ([`Normalization::PerChannel`]). Sums run in f64 so that
//! millions of voxels do not lose precision.

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

/// How one image channel is normalised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ChannelNorm {
    /// Clip to the dataset's foreground percentiles and z-score with its foreground mean and std.
    Ct(CtStats),
    /// Z-score with the image's own statistics; with `nonzero_mask`, over the voxels where any channel is nonzero
    /// only, the others set to 0.
    ZScore {
        /// Whether statistics and mapping are restricted to the nonzero voxels.
        nonzero_mask: bool,
    },
}

/// How the images of a dataset are normalised (stored with a checkpoint so inference does the same).
#[derive(Clone, Debug, PartialEq)]
pub enum Normalization {
    /// Channel 0 is CT: clip and z-score it with dataset statistics; other channels per-image z-score.
    Ct(CtStats),
    /// Every channel z-scored with its own per-image statistics.
    ZScore,
    /// One scheme per channel (from a plan).
    PerChannel(Vec<ChannelNorm>),
}

impl CtStats {
    /// Computes the statistics over channel 0 of labelled cases (foreground = label > 0). For datasets too large to
    /// hold in memory at once, feed the cases one by one to a [`ForegroundSampler`] instead.
    pub fn from_cases(cases: &[Case]) -> Result<CtStats> {
        let mut sampler = ForegroundSampler::default();
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

/// Collects the foreground intensities of one channel of cases one at a time (for [`CtStats::from_cases`] and the
/// dataset fingerprint), so that the training set never has to be in memory at once.
#[derive(Clone, Debug, Default)]
pub struct ForegroundSampler {
    channel: usize,
    samples: Vec<f32>,
    cases: usize,
}

impl ForegroundSampler {
    /// A sampler of channel `channel` (the default samples channel 0).
    pub fn for_channel(channel: usize) -> ForegroundSampler {
        ForegroundSampler { channel, ..ForegroundSampler::default() }
    }

    /// Adds at most [`CT_SAMPLES_PER_CASE`] foreground intensities of the sampled channel of `case`, evenly spread
    /// in raster order (non-finite values are skipped).
    pub fn add_case(&mut self, case: &Case) -> Result<()> {
        let label = case.label.as_ref().ok_or_else(|| {
            Error::Data(format!(
                "case \"{}\" has no label map; CT statistics are computed over labelled foreground",
                case.name
            ))
        })?;
        let n = case.voxels();
        crate::ensure!(
            label.len() == n && case.image.len() >= (self.channel + 1) * n,
            Shape,
            "case \"{}\": {} label values and {} image values for shape {:?} (channel {} sampled)",
            case.name,
            label.len(),
            case.image.len(),
            case.shape,
            self.channel
        );
        self.cases += 1;
        let image = &case.image[self.channel * n..(self.channel + 1) * n];
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
    pub fn finish(self) -> Result<CtStats> {
        Ok(CtStats::from_samples(&mut self.into_samples()?))
    }

    /// The samples collected (at least one, or an error).
    pub fn into_samples(self) -> Result<Vec<f32>> {
        crate::ensure!(
            !self.samples.is_empty(),
            Data,
            "no foreground voxels (label > 0) with finite intensities in channel {} of the {} case(s); CT statistics \
             need labelled foreground",
            self.channel,
            self.cases
        );
        Ok(self.samples)
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

    /// The scheme of channel `c`.
    pub fn channel(&self, c: usize) -> ChannelNorm {
        match self {
            Normalization::Ct(s) if c == 0 => ChannelNorm::Ct(*s),
            Normalization::PerChannel(v) => v.get(c).copied().unwrap_or(ChannelNorm::ZScore { nonzero_mask: false }),
            _ => ChannelNorm::ZScore { nonzero_mask: false },
        }
    }

    /// As JSON: `{"scheme": "ct", "lo": .., "hi": .., "mean": .., "std": ..}`, `{"scheme": "zscore"}` or
    /// `{"scheme": "per_channel", "channels": [{"scheme": "ct", ..}, {"scheme": "zscore", "nonzero_mask": true}]}`.
    pub fn to_json(&self) -> Value {
        match self {
            Normalization::Ct(s) => ChannelNorm::Ct(*s).to_json(),
            Normalization::ZScore => json!({ "scheme": "zscore" }),
            Normalization::PerChannel(v) => {
                json!({ "scheme": "per_channel", "channels": v.iter().map(ChannelNorm::to_json).collect::<Vec<_>>() })
            }
        }
    }

    /// Reads a scheme written by [`Normalization::to_json`].
    pub fn from_json(v: &Value) -> Result<Normalization> {
        match v.get("scheme").and_then(Value::as_str) {
            Some("ct") => Ok(Normalization::Ct(CtStats::from_json(v)?)),
            Some("zscore") => Ok(Normalization::ZScore),
            Some("per_channel") => {
                let channels = v.get("channels").and_then(Value::as_array).ok_or_else(|| {
                    Error::Data(format!("normalisation: \"per_channel\" needs a \"channels\" list in {v}"))
                })?;
                Ok(Normalization::PerChannel(channels.iter().map(ChannelNorm::from_json).collect::<Result<_>>()?))
            }
            _ => crate::bail!(Data, "normalisation: \"scheme\" must be \"ct\", \"zscore\" or \"per_channel\" in {v}"),
        }
    }
}

impl ChannelNorm {
    /// As JSON: `{"scheme": "ct", "lo": .., "hi": .., "mean": .., "std": ..}` or
    /// `{"scheme": "zscore", "nonzero_mask": ..}`.
    pub fn to_json(&self) -> Value {
        match self {
            ChannelNorm::Ct(s) => {
                let mut v = s.to_json();
                v["scheme"] = json!("ct");
                v
            }
            ChannelNorm::ZScore { nonzero_mask } => json!({ "scheme": "zscore", "nonzero_mask": nonzero_mask }),
        }
    }

    /// Reads a scheme written by [`ChannelNorm::to_json`] (`nonzero_mask` defaults to false).
    pub fn from_json(v: &Value) -> Result<ChannelNorm> {
        match v.get("scheme").and_then(Value::as_str) {
            Some("ct") => Ok(ChannelNorm::Ct(CtStats::from_json(v)?)),
            Some("zscore") => Ok(ChannelNorm::ZScore {
                nonzero_mask: v.get("nonzero_mask").and_then(Value::as_bool).unwrap_or(false),
            }),
            _ => crate::bail!(Data, "normalisation of a channel: \"scheme\" must be \"ct\" or \"zscore\" in {v}"),
        }
    }
}

impl serde::Serialize for Normalization {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Normalization {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Normalization::from_json(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
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
    // The nonzero mask is taken from the raw image, before any channel is changed.
    let masked = (0..case.channels).any(|c| norm.channel(c) == ChannelNorm::ZScore { nonzero_mask: true });
    let mask: Option<Vec<bool>> =
        masked.then(|| (0..n).map(|i| (0..case.channels).any(|c| case.image[c * n + i] != 0.0)).collect());
    for (c, channel) in case.image.chunks_mut(n).enumerate() {
        match norm.channel(c) {
            ChannelNorm::Ct(s) => {
                let inv = 1.0 / (s.std as f64).max(STD_FLOOR);
                let (lo, hi, mean) = (s.lo, s.hi, s.mean as f64);
                for x in channel.iter_mut() {
                    *x = ((x.clamp(lo, hi) as f64 - mean) * inv) as f32;
                }
            }
            ChannelNorm::ZScore { nonzero_mask } => zscore(channel, mask.as_deref().filter(|_| nonzero_mask)),
        }
    }
    Ok(())
}

/// In-place z-score of one channel with its own mean and population std (floored); with a mask, over the masked
/// voxels only, the others set to 0.
fn zscore(x: &mut [f32], mask: Option<&[bool]>) {
    let inside = |i: usize| mask.is_none_or(|m| m[i]);
    let values = || x.iter().enumerate().filter(|&(i, _)| inside(i)).map(|(_, &v)| v as f64);
    let n = values().count() as f64;
    if n == 0.0 {
        return;
    }
    let mean = values().sum::<f64>() / n;
    let var = values().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / var.sqrt().max(STD_FLOOR);
    for (i, v) in x.iter_mut().enumerate() {
        *v = if inside(i) { ((*v as f64 - mean) * inv) as f32 } else { 0.0 };
    }
}

/// The p-th percentile (0..=100) with linear interpolation between the order statistics at ranks floor(h) and
/// floor(h) + 1, h = p/100 * (n - 1) (numpy's default); O(n) by selection. `v` must be non-empty and NaN-free.
pub fn percentile(v: &mut [f32], p: f64) -> f64 {
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
