//! Data: volumes in memory, nnU-Net raw datasets on disk (NIfTI), the synthetic phantom dataset, normalisation,
//! patch sampling and augmentation.
//!
//! Axis convention: a NIfTI array is indexed [x, y, z] and stored with x fastest; our arrays are (D, H, W) row-major
//! with W fastest, so D = z, H = y, W = x and the bytes are in the same order (no transposition). Spacings are kept
//! in our order: [z, y, x] in millimetres.

pub mod augment;
pub mod crop;
pub mod dataset;
pub mod fingerprint;
pub mod nifti;
pub mod normalize;
pub mod resample;
pub mod sampler;
pub mod synth;

/// One case in memory: an image with one or more channels and, for training data, its label map.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// The case identifier (the nnU-Net file stem without `_0000`).
    pub name: String,
    /// Intensities, (channels, D, H, W) row-major.
    pub image: Vec<f32>,
    /// Number of image channels (modalities).
    pub channels: usize,
    /// Spatial size [D, H, W].
    pub shape: [usize; 3],
    /// Class index per voxel, (D, H, W) row-major; `None` for unlabelled (test) images.
    pub label: Option<Vec<u8>>,
    /// Voxel spacing [D, H, W] in millimetres.
    pub spacing: [f64; 3],
}

impl Case {
    /// Voxels per channel.
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }
}
