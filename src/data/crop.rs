//! Cropping to the nonzero region, as nnU-Net does before anything else.
//!
//! Many scans are surrounded by zero-filled padding (skull-stripped brain MR, registered or defaced volumes). The
//! nonzero region is the bounding box of the voxels where any channel is nonzero; the network never needs to see what
//! lies outside it, so training cases are cropped to it and a prediction is made inside it and written back into a
//! full-size label map (background outside). A CT scan (air at -1000 HU) is nonzero everywhere and keeps its shape.
//!
//! The fraction of voxels the crop keeps also decides the normalisation: when cropping shrinks the median case by a
//! quarter or more, the zero background is a large, meaningless part of the image and z-scores are taken over the
//! nonzero voxels only (nnU-Net's `use_mask_for_norm`, see `normalize`). nnU-Net also fills holes in the nonzero mask
//! before taking its box; holes cannot change a bounding box, so for cropping that step is not needed.

use super::Case;
use crate::{ensure, Result};

/// A box of voxels `[start, end)` per axis (D, H, W).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BoundingBox {
    /// First voxel inside the box per axis.
    pub start: [usize; 3],
    /// One past the last voxel inside the box per axis.
    pub end: [usize; 3],
}

impl BoundingBox {
    /// The whole volume of `shape`.
    pub fn full(shape: [usize; 3]) -> BoundingBox {
        BoundingBox { start: [0; 3], end: shape }
    }

    /// The box's size per axis.
    pub fn shape(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.end[a] - self.start[a])
    }
}

/// The bounding box of the voxels where any channel of `case` is nonzero; the whole volume when every voxel is zero
/// (nothing to crop to; such a case is kept as it is).
pub fn nonzero_bbox(case: &Case) -> BoundingBox {
    let [_, h, w] = case.shape;
    let n = case.voxels();
    let mut lo = case.shape;
    let mut hi = [0usize; 3];
    for i in 0..n {
        if (0..case.channels).all(|c| case.image[c * n + i] == 0.0) {
            continue;
        }
        let p = [i / (h * w), (i / w) % h, i % w];
        for a in 0..3 {
            lo[a] = lo[a].min(p[a]);
            hi[a] = hi[a].max(p[a] + 1);
        }
    }
    if hi.contains(&0) {
        return BoundingBox::full(case.shape);
    }
    BoundingBox { start: lo, end: hi }
}

/// Copies the box `b` out of a (channels, D, H, W) volume of `shape`.
fn crop_values<T: Copy>(x: &[T], channels: usize, shape: [usize; 3], b: &BoundingBox) -> Vec<T> {
    let n = shape.iter().product::<usize>();
    let s = b.shape();
    let mut out = Vec::with_capacity(channels * s.iter().product::<usize>());
    for c in 0..channels {
        for z in b.start[0]..b.end[0] {
            for y in b.start[1]..b.end[1] {
                let row = c * n + (z * shape[1] + y) * shape[2];
                out.extend_from_slice(&x[row + b.start[2]..row + b.end[2]]);
            }
        }
    }
    out
}

/// `case` cropped to the box `b` (image and label map).
pub fn crop_case(case: &Case, b: &BoundingBox) -> Result<Case> {
    ensure!(
        (0..3).all(|a| b.start[a] < b.end[a] && b.end[a] <= case.shape[a]),
        Shape,
        "crop_case: box {b:?} does not lie inside case \"{}\" of shape {:?}",
        case.name,
        case.shape
    );
    Ok(Case {
        name: case.name.clone(),
        image: crop_values(&case.image, case.channels, case.shape, b),
        channels: case.channels,
        shape: b.shape(),
        label: case.label.as_ref().map(|l| crop_values(l, 1, case.shape, b)),
        spacing: case.spacing,
    })
}

/// `case` cropped to its nonzero bounding box, and the box.
pub fn crop_to_nonzero(case: &Case) -> Result<(Case, BoundingBox)> {
    let b = nonzero_bbox(case);
    if b == BoundingBox::full(case.shape) {
        return Ok((case.clone(), b));
    }
    Ok((crop_case(case, &b)?, b))
}

/// A label map of the box `b` put back into a full volume of `shape`, background (0) outside the box.
pub fn uncrop_labels(labels: &[u8], b: &BoundingBox, shape: [usize; 3]) -> Vec<u8> {
    let s = b.shape();
    let mut out = vec![0u8; shape.iter().product()];
    for (i, row) in labels.chunks_exact(s[2]).enumerate() {
        let (z, y) = (b.start[0] + i / s[1], b.start[1] + i % s[1]);
        let at = (z * shape[1] + y) * shape[2] + b.start[2];
        out[at..at + s[2]].copy_from_slice(row);
    }
    out
}
