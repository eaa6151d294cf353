//! Training patches: nnU-Net's sampling, then its augmentation ([`super::augment`]).
//!
//! - A patch of the model's size is cut at a uniformly random position; with probability `fg_fraction` (1/3) it is
//!   instead centred on a random voxel of a random foreground class present in the case (nnU-Net's oversampling).
//!   Volumes smaller than the patch are zero-padded (label 0).
//! - 2D models train on 2D patches cut from a random slice along D.
//! - Augmented patches are read through one rotation/scaling/mirroring map around the patch centre (trilinear image,
//!   nearest label), then the intensity transforms run; unaugmented patches are plain crops.

use rand::rngs::StdRng;
use rand::RngExt;

use super::augment::{patch_box, Augmenter, PatchGrid, IDENTITY};
use super::Case;
use crate::tensor::{DType, Tensor};
use crate::{ensure, Result};

/// The foreground voxels of each class of one case, for oversampling (at most `MAX_FG` kept per class).
pub struct ForegroundIndex {
    /// `voxels[k - 1]`: flat (D, H, W) indices of class k.
    voxels: Vec<Vec<usize>>,
}

const MAX_FG: usize = 10_000;

impl ForegroundIndex {
    /// Indexes the label map of `case` (an evenly strided subset when a class has more than 10,000 voxels).
    pub fn new(case: &Case, num_classes: usize) -> ForegroundIndex {
        let mut voxels = vec![Vec::new(); num_classes.saturating_sub(1)];
        if let Some(label) = &case.label {
            for (i, &l) in label.iter().enumerate() {
                if l > 0 && (l as usize) < num_classes {
                    voxels[l as usize - 1].push(i);
                }
            }
        }
        for v in &mut voxels {
            if v.len() > MAX_FG {
                let step = v.len() as f64 / MAX_FG as f64;
                *v = (0..MAX_FG).map(|i| v[(i as f64 * step) as usize]).collect();
            }
        }
        ForegroundIndex { voxels }
    }
}

/// How patches are drawn.
#[derive(Clone, Debug)]
pub struct PatchSampler {
    /// Patch size per spatial axis of the model (2 or 3 entries).
    pub patch: Vec<usize>,
    /// Fraction of samples centred on foreground.
    pub fg_fraction: f64,
    /// Whether to augment (training) or not (validation patches).
    pub augment: bool,
    /// Whether augmentation mirrors along the axes (off for data whose classes are left/right pairs).
    pub mirror: bool,
}

/// One sampled patch: image (channels, patch...) and labels (patch...).
pub struct Patch {
    /// Intensities, channels first.
    pub image: Vec<f32>,
    /// Class per voxel.
    pub label: Vec<u8>,
}

impl PatchSampler {
    /// Draws one patch from `case`.
    pub fn sample(&self, case: &Case, fg: &ForegroundIndex, rng: &mut StdRng) -> Result<Patch> {
        ensure!(matches!(self.patch.len(), 2 | 3), Config, "patch {:?} must have 2 or 3 axes", self.patch);
        let label =
            case.label.as_ref().ok_or_else(|| crate::Error::Data(format!("case {} has no label map", case.name)))?;
        let p = patch_box(&self.patch);
        let s = case.shape;
        let present: Vec<&Vec<usize>> = fg.voxels.iter().filter(|v| !v.is_empty()).collect();
        let center = if !present.is_empty() && rng.random::<f64>() < self.fg_fraction {
            let class = present[rng.random_range(0..present.len())];
            let i = class[rng.random_range(0..class.len())];
            Some([i / (s[1] * s[2]), (i / s[2]) % s[1], i % s[2]])
        } else {
            None
        };
        // Patch origin per axis (may be negative: padding when the volume is smaller than the patch).
        let mut origin = [0i64; 3];
        for a in 0..3 {
            let (size, len) = (s[a] as i64, p[a] as i64);
            let (lo, hi) = if size >= len { (0, size - len) } else { ((size - len) / 2, (size - len) / 2) };
            origin[a] = match center {
                Some(c) => (c[a] as i64 - len / 2).clamp(lo, hi),
                None => rng.random_range(lo..=hi),
            };
        }
        let augmenter = self.augment.then(|| Augmenter::new(&self.patch, self.mirror));
        let grid = PatchGrid {
            patch: p,
            centre: [0, 1, 2].map(|a| origin[a] as f64 + (p[a] as f64 - 1.0) / 2.0),
            matrix: augmenter.as_ref().map_or(IDENTITY, |aug| aug.draw_spatial(rng)),
        };
        let mut image = Vec::with_capacity(case.channels * p.iter().product::<usize>());
        for channel in case.image.chunks_exact(case.voxels()) {
            image.extend(grid.sample_linear(channel, s));
        }
        let lab = grid.sample_nearest(label, s);
        if let Some(aug) = &augmenter {
            aug.augment_intensity(&mut image, p, rng);
        }
        Ok(Patch { image, label: lab })
    }

    /// A batch of `n` patches from randomly chosen cases: x (n, channels, patch...) and labels (n, 1, patch...) as
    /// float32 host tensors.
    pub fn batch(
        &self,
        cases: &[Case],
        fg: &[ForegroundIndex],
        n: usize,
        rng: &mut StdRng,
    ) -> Result<(Tensor, Tensor)> {
        ensure!(!cases.is_empty(), Data, "no training cases to sample from");
        let channels = cases[0].channels;
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let i = rng.random_range(0..cases.len());
            ensure!(
                cases[i].channels == channels,
                Data,
                "case {} has {} channels, others {channels}",
                cases[i].name,
                cases[i].channels
            );
            let patch = self.sample(&cases[i], &fg[i], rng)?;
            xs.extend(patch.image);
            ys.extend(patch.label.iter().map(|&l| l as f32));
        }
        let mut xshape = vec![n, channels];
        xshape.extend_from_slice(&self.patch);
        let mut yshape = vec![n, 1];
        yshape.extend_from_slice(&self.patch);
        Ok((Tensor::from_vec(xs, &xshape)?, Tensor::from_vec(ys, &yshape)?.to_dtype(DType::F32)?))
    }
}
