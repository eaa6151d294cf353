//! Resampling cases to a common voxel spacing.
//!
//! When: the network sees all cases at one spacing, the dataset's median spacing ([`median_spacing`], per axis over
//! the training cases). A case is resampled when its spacing differs from that target by more than 1% relative on
//! any axis ([`needs_resampling`]); otherwise it is used as is (resampling would only blur it). Predictions are
//! resampled back to the original shape before they are written.
//!
//! Geometry: the new size along an axis of n voxels at spacing s is n' = max(1, round(n · s / t)) for target
//! spacing t. Output voxel i has its centre at input coordinate u = (i + 1/2) · n / n' - 1/2 (voxel centres, the
//! `align_corners = false` convention), so the first and last voxel edges of both grids coincide; the effective
//! spacing s · n / n' differs from t by less than half a voxel over the extent, and the case records t (as nnU-Net
//! does).
//!
//! Images: trilinear, done as three separable 1-D linear passes (W, then H, then D), exact for trilinear; u is
//! clamped to [0, n - 1] (edge voxels are replicated). Labels: nearest, source voxel floor(u + 1/2) clamped, so
//! label values are never mixed.

use super::Case;
use crate::Result;

/// Relative spacing difference above which a case is resampled to the dataset's target spacing.
pub const RESAMPLE_RTOL: f64 = 0.01;

/// True when `spacing` differs from `target` by more than [`RESAMPLE_RTOL`] (relative) on any axis.
pub fn needs_resampling(spacing: [f64; 3], target: [f64; 3]) -> bool {
    spacing.iter().zip(&target).any(|(&s, &t)| (s - t).abs() > RESAMPLE_RTOL * t.abs())
}

/// Per-axis median of the spacings of `cases` (the mean of the two middle values for an even count).
pub fn median_spacing(cases: &[Case]) -> Result<[f64; 3]> {
    crate::ensure!(!cases.is_empty(), Data, "median_spacing: no cases given");
    let mut out = [0.0; 3];
    for (a, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f64> = cases.iter().map(|c| c.spacing[a]).collect();
        v.sort_by(f64::total_cmp);
        let m = v.len() / 2;
        *o = if v.len() % 2 == 1 { v[m] } else { 0.5 * (v[m - 1] + v[m]) };
    }
    Ok(out)
}

/// The shape a case of `shape` at `spacing` has after resampling to `target`: round(shape · spacing / target),
/// at least 1 per axis.
pub fn resampled_shape(shape: [usize; 3], spacing: [f64; 3], target: [f64; 3]) -> [usize; 3] {
    [0, 1, 2].map(|a| ((shape[a] as f64 * spacing[a] / target[a]).round() as usize).max(1))
}

/// Resamples `case` to `target_spacing` [z, y, x]: images trilinearly, the label map (if any) by nearest neighbour.
pub fn resample_case(case: &Case, target_spacing: [f64; 3]) -> Result<Case> {
    crate::ensure!(
        target_spacing.iter().all(|&t| t.is_finite() && t > 0.0)
            && case.spacing.iter().all(|&s| s.is_finite() && s > 0.0),
        Shape,
        "resample_case: case \"{}\" spacing {:?} and target {:?} must be positive",
        case.name,
        case.spacing,
        target_spacing
    );
    let n = case.voxels();
    crate::ensure!(
        n > 0 && case.image.len() == case.channels * n,
        Shape,
        "resample_case: case \"{}\" has {} image values for {} channel(s) of shape {:?}",
        case.name,
        case.image.len(),
        case.channels,
        case.shape
    );
    let new_shape = resampled_shape(case.shape, case.spacing, target_spacing);
    let label = match &case.label {
        Some(l) => {
            crate::ensure!(
                l.len() == n,
                Shape,
                "resample_case: case \"{}\" has {} label values for shape {:?}",
                case.name,
                l.len(),
                case.shape
            );
            Some(resample_nearest(l, case.shape, new_shape))
        }
        None => None,
    };
    let mut image = Vec::with_capacity(case.channels * new_shape.iter().product::<usize>());
    for channel in case.image.chunks(n) {
        image.extend(resample_linear(channel, case.shape, new_shape));
    }
    Ok(Case {
        name: case.name.clone(),
        image,
        channels: case.channels,
        shape: new_shape,
        label,
        spacing: target_spacing,
    })
}

/// Trilinear resampling of one channel from `from` to `to` ([D, H, W]); see the module header.
pub fn resample_linear(x: &[f32], from: [usize; 3], to: [usize; 3]) -> Vec<f32> {
    if from == to {
        return x.to_vec();
    }
    let [d0, h0, w0] = from;
    let [d1, h1, w1] = to;
    // Pass 1, along W: (d0, h0, w0) -> (d0, h0, w1).
    let tw = linear_taps(w0, w1);
    let mut a = vec![0.0f32; d0 * h0 * w1];
    for (src, dst) in x.chunks_exact(w0).zip(a.chunks_exact_mut(w1)) {
        for (o, &(i, j, f)) in dst.iter_mut().zip(&tw) {
            *o = src[i] + f * (src[j] - src[i]);
        }
    }
    // Pass 2, along H: whole rows of w1 values are blended, so the inner loop runs over contiguous memory.
    let th = linear_taps(h0, h1);
    let mut b = vec![0.0f32; d0 * h1 * w1];
    for (src, dst) in a.chunks_exact(h0 * w1).zip(b.chunks_exact_mut(h1 * w1)) {
        for (row, &(i, j, f)) in dst.chunks_exact_mut(w1).zip(&th) {
            blend(row, &src[i * w1..(i + 1) * w1], &src[j * w1..(j + 1) * w1], f);
        }
    }
    drop(a);
    // Pass 3, along D: whole planes of h1 * w1 values.
    let td = linear_taps(d0, d1);
    let plane = h1 * w1;
    let mut c = vec![0.0f32; d1 * plane];
    for (dst, &(i, j, f)) in c.chunks_exact_mut(plane).zip(&td) {
        blend(dst, &b[i * plane..(i + 1) * plane], &b[j * plane..(j + 1) * plane], f);
    }
    c
}

/// Nearest-neighbour resampling of a label map (or any voxel values) from `from` to `to` ([D, H, W]); see the module
/// header.
pub fn resample_nearest<T: Copy>(x: &[T], from: [usize; 3], to: [usize; 3]) -> Vec<T> {
    if from == to {
        return x.to_vec();
    }
    let [sd, sh, sw] = [0, 1, 2].map(|a| nearest_taps(from[a], to[a]));
    let (h0, w0) = (from[1], from[2]);
    let mut out = Vec::with_capacity(to.iter().product());
    for &d in &sd {
        for &h in &sh {
            let row = &x[(d * h0 + h) * w0..(d * h0 + h + 1) * w0];
            out.extend(sw.iter().map(|&w| row[w]));
        }
    }
    out
}

/// out = a + f (b - a), elementwise.
fn blend(out: &mut [f32], a: &[f32], b: &[f32], f: f32) {
    if f == 0.0 {
        out.copy_from_slice(a);
        return;
    }
    for ((o, &p), &q) in out.iter_mut().zip(a).zip(b) {
        *o = p + f * (q - p);
    }
}

/// For each output index along an axis: the two input indices and the weight of the second.
fn linear_taps(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32)> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|i| {
            let u = ((i as f64 + 0.5) * scale - 0.5).clamp(0.0, (n_in - 1) as f64);
            let lo = (u.floor() as usize).min(n_in - 1);
            let hi = (lo + 1).min(n_in - 1);
            (lo, hi, (u - lo as f64) as f32)
        })
        .collect()
}

/// For each output index along an axis: the nearest input index (by voxel centres).
fn nearest_taps(n_in: usize, n_out: usize) -> Vec<usize> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out).map(|i| (((i as f64 + 0.5) * scale).floor() as usize).min(n_in - 1)).collect()
}
