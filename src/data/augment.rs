//! Data augmentation with nnU-Net v2's default probabilities and ranges (`nnUNetTrainer.get_training_transforms` with
//! batchgeneratorsv2's transforms), drawn per sample:
//!
//! | transform | probability | range |
//! |---|---|---|
//! | rotation | 0.2 | each axis U(-30°, 30°) in 3D; in-plane only, U(-180°, 180°), for 2D and anisotropic 3D |
//! | scaling | 0.2 | one factor U(0.7, 1.4) for all (in-plane) axes; > 1 shows more of the volume |
//! | Gaussian noise | 0.1 | standard deviation U(0, 0.1), one noise field for all channels |
//! | Gaussian blur | 0.2 | per channel with p 0.5, sigma U(0.5, 1) drawn per axis |
//! | brightness | 0.15 | per channel, x f with f from [`bg_contrast`] (0.75, 1.25) |
//! | contrast | 0.15 | per channel, (x - mean) f + mean, f from [`bg_contrast`] (0.75, 1.25), range kept |
//! | low resolution | 0.25 | per channel with p 0.5, downsample by U(0.5, 1) (nearest), upsample back (linear) |
//! | inverted gamma | 0.1 | per channel, -gamma(-x), gamma from [`bg_contrast`] (0.7, 1.5), mean and std kept |
//! | gamma | 0.3 | per channel, gamma from [`bg_contrast`] (0.7, 1.5), mean and std kept |
//! | mirroring | 0.5 per axis | every axis of the patch (`--no-mirror` turns it off) |
//!
//! Rotation ranges and the anisotropic rule are nnU-Net's `configure_rotation_dummyDA_mirroring_and_inital_patch_size`:
//! a 2D patch rotates by up to 180° when its sides differ by at most 1.5x, else 15°; a 3D patch whose largest side is
//! more than 3x its first (D, the low-resolution axis) is "dummy 2D": rotated and scaled in the (H, W) plane only, by
//! up to 180°, and low-resolution simulation leaves D alone; other 3D patches rotate about all three axes by up to 30°.
//!
//! Rotation, scaling and mirroring are one linear map M of patch coordinates: the patch voxel v reads the volume at
//! `centre + M (v - (p - 1)/2)` ([`PatchGrid`]), trilinearly for the image and by nearest neighbour for the label, with
//! zeros outside the volume. The region read is thus larger or smaller than the patch, as nnU-Net's larger initial
//! patch is, but the volume is resampled once and the patch directly, with no intermediate crop. Two differences
//! from batchgeneratorsv2, both deliberate: M rotates in voxel space (grid_sample's normalised coordinates stretch a
//! rotation when the sampled region is not a cube), and labels are read by nearest neighbour (nnU-Net interpolates
//! each label's indicator linearly and keeps values above 0.7, else the largest); nearest keeps every label an
//! integer of the input. Mirroring is folded into M instead of running last: the intensity transforms after it are
//! statistically symmetric under flips, so the distribution of patches is the same.

use rand::rngs::StdRng;
use rand::RngExt;

use super::resample::{resample_linear, resample_nearest};

/// A 3x3 matrix acting on [D, H, W] coordinates.
pub type Mat3 = [[f64; 3]; 3];

/// The identity map: a plain crop.
pub const IDENTITY: Mat3 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

const P_ROTATION: f64 = 0.2;
const P_SCALING: f64 = 0.2;
const SCALING: (f64, f64) = (0.7, 1.4);
const P_NOISE: f64 = 0.1;
const NOISE_STD: (f64, f64) = (0.0, 0.1);
const P_BLUR: f64 = 0.2;
const BLUR_SIGMA: (f64, f64) = (0.5, 1.0);
const P_BRIGHTNESS: f64 = 0.15;
const P_CONTRAST: f64 = 0.15;
const INTENSITY_FACTOR: (f64, f64) = (0.75, 1.25);
const P_LOW_RES: f64 = 0.25;
const LOW_RES_SCALE: (f64, f64) = (0.5, 1.0);
const P_INVERTED_GAMMA: f64 = 0.1;
const P_GAMMA: f64 = 0.3;
const GAMMA: (f64, f64) = (0.7, 1.5);
/// Per-channel probability of blur and low-resolution simulation once the transform is chosen.
const P_PER_CHANNEL: f64 = 0.5;
/// nnU-Net's ANISO_THRESHOLD: a 3D patch with max(patch) / patch[0] above this is augmented as 2D slices.
const ANISOTROPY_THRESHOLD: f64 = 3.0;

/// nnU-Net's default augmentation for one patch shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Augmenter {
    /// Rotation angles are drawn from U(-max_angle, max_angle), radians.
    pub max_angle: f64,
    /// Rotate and scale in the (H, W) plane only and keep D's resolution: 2D patches and anisotropic 3D patches.
    pub in_plane: bool,
    /// Which axes [D, H, W] may be mirrored.
    pub mirror_axes: [bool; 3],
}

impl Augmenter {
    /// The augmentation nnU-Net chooses for `patch` (2 or 3 spatial sizes); `mirror` false disables mirroring.
    pub fn new(patch: &[usize], mirror: bool) -> Augmenter {
        let max = *patch.iter().max().unwrap_or(&1) as f64;
        let min = *patch.iter().min().unwrap_or(&1) as f64;
        let (max_angle_deg, in_plane) = match patch.len() {
            2 => (if max / min > 1.5 { 15.0 } else { 180.0 }, true),
            _ if max / patch[0] as f64 > ANISOTROPY_THRESHOLD => (180.0, true),
            _ => (30.0, false),
        };
        let box3 = patch_box(patch);
        Augmenter {
            max_angle: f64::to_radians(max_angle_deg),
            in_plane,
            mirror_axes: [0, 1, 2].map(|a| mirror && box3[a] > 1),
        }
    }

    /// Draws rotation, scaling and mirroring as one map of patch coordinates (see the module header).
    pub fn draw_spatial(&self, rng: &mut StdRng) -> Mat3 {
        let rotate = rng.random::<f64>() < P_ROTATION;
        let scale = rng.random::<f64>() < P_SCALING;
        let mut m = IDENTITY;
        if rotate {
            let mut angle = || rng.random_range(-self.max_angle..=self.max_angle);
            m = if self.in_plane {
                rotation(0, angle())
            } else {
                let (d, h, w) = (angle(), angle(), angle());
                matmul(&matmul(&rotation(0, d), &rotation(1, h)), &rotation(2, w))
            };
        }
        let s = if scale { rng.random_range(SCALING.0..SCALING.1) } else { 1.0 };
        let scaled_from = if self.in_plane { 1 } else { 0 };
        for a in 0..3 {
            let mirrored = self.mirror_axes[a] && rng.random::<f64>() < 0.5;
            let f = if a >= scaled_from { s } else { 1.0 } * if mirrored { -1.0 } else { 1.0 };
            // M = R S F: column a maps output axis a.
            m.iter_mut().for_each(|row| row[a] *= f);
        }
        m
    }

    /// The intensity transforms, in nnU-Net's order, on a patch `image` of channels x `shape` voxels.
    pub fn augment_intensity(&self, image: &mut [f32], shape: [usize; 3], rng: &mut StdRng) {
        let vox: usize = shape.iter().product();
        if rng.random::<f64>() < P_NOISE {
            let std = rng.random_range(NOISE_STD.0..NOISE_STD.1);
            add_gaussian_noise(image, vox, std, rng);
        }
        if rng.random::<f64>() < P_BLUR {
            for ch in image.chunks_exact_mut(vox) {
                if rng.random::<f64>() < P_PER_CHANNEL {
                    let sigma = [0; 3].map(|_| rng.random_range(BLUR_SIGMA.0..BLUR_SIGMA.1));
                    gaussian_blur(ch, shape, sigma);
                }
            }
        }
        if rng.random::<f64>() < P_BRIGHTNESS {
            for ch in image.chunks_exact_mut(vox) {
                scale_brightness(ch, bg_contrast(rng, INTENSITY_FACTOR));
            }
        }
        if rng.random::<f64>() < P_CONTRAST {
            for ch in image.chunks_exact_mut(vox) {
                adjust_contrast(ch, bg_contrast(rng, INTENSITY_FACTOR));
            }
        }
        if rng.random::<f64>() < P_LOW_RES {
            for ch in image.chunks_exact_mut(vox) {
                if rng.random::<f64>() < P_PER_CHANNEL {
                    let s = rng.random_range(LOW_RES_SCALE.0..LOW_RES_SCALE.1);
                    let factors = [if self.in_plane { 1.0 } else { s }, s, s];
                    simulate_low_resolution(ch, shape, factors);
                }
            }
        }
        for (p, invert) in [(P_INVERTED_GAMMA, true), (P_GAMMA, false)] {
            if rng.random::<f64>() < p {
                for ch in image.chunks_exact_mut(vox) {
                    gamma(ch, bg_contrast(rng, GAMMA), invert);
                }
            }
        }
    }
}

/// A patch of 2 or 3 sizes as a 3D box [D, H, W] (D = 1 for 2D); panics on other lengths (model configurations are
/// validated to have 2 or 3).
pub fn patch_box(patch: &[usize]) -> [usize; 3] {
    match patch {
        [h, w] => [1, *h, *w],
        [d, h, w] => [*d, *h, *w],
        _ => panic!("a patch has 2 or 3 axes, got {patch:?}"),
    }
}

/// Rotation by `angle` radians about axis `axis` (0 = D, 1 = H, 2 = W), in the plane of the two other axes.
pub fn rotation(axis: usize, angle: f64) -> Mat3 {
    let (b, c) = match axis {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let mut m = IDENTITY;
    m[b][b] = angle.cos();
    m[b][c] = -angle.sin();
    m[c][b] = angle.sin();
    m[c][c] = angle.cos();
    m
}

fn matmul(a: &Mat3, b: &Mat3) -> Mat3 {
    let mut m = [[0.0; 3]; 3];
    for (i, row) in m.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    m
}

/// nnU-Net's `BGContrast` draw for a range (lo < 1 < hi): with probability 1/2 U(lo, 1), else U(1, hi), so that
/// reductions and increases are equally likely although the range is asymmetric.
pub fn bg_contrast(rng: &mut StdRng, (lo, hi): (f64, f64)) -> f32 {
    let f = if rng.random::<f64>() < 0.5 && lo < 1.0 {
        rng.random_range(lo..1.0)
    } else {
        rng.random_range(lo.max(1.0)..hi)
    };
    f as f32
}

/// One N(0, 1) draw (Box-Muller).
fn standard_normal(rng: &mut StdRng) -> f64 {
    let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Where each voxel of a patch is read from in a volume: patch voxel v reads `centre + matrix (v - (patch - 1)/2)`,
/// so the patch's geometric centre lands on `centre` and `matrix` rotates, scales and mirrors around it.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchGrid {
    /// Patch size [D, H, W].
    pub patch: [usize; 3],
    /// Volume coordinate (voxel indices, fractional) of the patch centre.
    pub centre: [f64; 3],
    /// Map from patch offsets to volume offsets.
    pub matrix: Mat3,
}

impl PatchGrid {
    /// Calls `f(patch index, source coordinate)` for every patch voxel v, in memory order: the coordinate is
    /// `centre[a] + ((M[a][0] o_0 + M[a][1] o_1) + M[a][2] o_2)` with `o = v - (patch - 1)/2`, its first two terms
    /// formed once per row (the same operations in the same order as per voxel, so the same bits).
    fn for_each_source(&self, mut f: impl FnMut(usize, [f64; 3])) {
        let [pd, ph, pw] = self.patch;
        let half = self.patch.map(|p| (p as f64 - 1.0) / 2.0);
        let (m, centre) = (&self.matrix, self.centre);
        let along_w: Vec<[f64; 3]> = (0..pw).map(|w| [0, 1, 2].map(|a| m[a][2] * (w as f64 - half[2]))).collect();
        for d in 0..pd {
            let od = d as f64 - half[0];
            for h in 0..ph {
                let oh = h as f64 - half[1];
                let row = [0, 1, 2].map(|a| m[a][0] * od + m[a][1] * oh);
                let first = (d * ph + h) * pw;
                for (w, t) in along_w.iter().enumerate() {
                    f(first + w, [0, 1, 2].map(|a| centre[a] + (row[a] + t[a])));
                }
            }
        }
    }

    /// True when every patch voxel reads exactly one volume voxel (no rotation or scaling, at most mirroring, and a
    /// whole-voxel centre offset): then reading is copying.
    fn reads_whole_voxels(&self) -> bool {
        (0..3).all(|a| {
            let start = self.centre[a] - (self.patch[a] as f64 - 1.0) / 2.0;
            start.fract() == 0.0 && (0..3).all(|k| self.matrix[a][k].abs() == if a == k { 1.0 } else { 0.0 })
        })
    }

    /// One channel `x` of a volume of `shape`, read trilinearly (zero outside the volume).
    pub fn sample_linear(&self, x: &[f32], shape: [usize; 3]) -> Vec<f32> {
        if self.reads_whole_voxels() {
            return self.sample_nearest(x, shape);
        }
        let strides = [shape[1] * shape[2], shape[2], 1];
        let mut out = vec![0.0f32; self.patch.iter().product()];
        self.for_each_source(|i, u| {
            let lo = u.map(floor_index);
            // Per axis, the two neighbouring voxels' weights; the eight taps are added in the order d, h, w, each
            // from its lower neighbour, on both paths.
            let weight = [0, 1, 2].map(|a| {
                let f = (u[a] - lo[a] as f64) as f32;
                [1.0 - f, f]
            });
            let mut sum = 0.0f32;
            if (0..3).all(|a| lo[a] >= 0 && lo[a] + 1 < shape[a] as i64) {
                // Inside: all eight taps exist.
                let at = (0..3).map(|a| lo[a] as usize * strides[a]).sum::<usize>();
                for (kd, wd) in weight[0].iter().enumerate() {
                    for (kh, wh) in weight[1].iter().enumerate() {
                        for (kw, ww) in weight[2].iter().enumerate() {
                            sum += wd * wh * ww * x[at + kd * strides[0] + kh * strides[1] + kw];
                        }
                    }
                }
            } else {
                // At the border: the taps outside the volume read zero (they are left out).
                let taps = [0, 1, 2].map(|a| {
                    [0, 1].map(|k| {
                        let c = lo[a] + k as i64;
                        (c >= 0 && (c as usize) < shape[a]).then(|| (c as usize * strides[a], weight[a][k]))
                    })
                });
                for (od, wd) in taps[0].iter().flatten() {
                    for (oh, wh) in taps[1].iter().flatten() {
                        for (ow, ww) in taps[2].iter().flatten() {
                            sum += wd * wh * ww * x[od + oh + ow];
                        }
                    }
                }
            }
            out[i] = sum;
        });
        out
    }

    /// Voxel values (a label map) of a volume of `shape`, read by nearest neighbour (zero outside the volume).
    pub fn sample_nearest<T: Copy + Default>(&self, x: &[T], shape: [usize; 3]) -> Vec<T> {
        let mut out = vec![T::default(); self.patch.iter().product()];
        if self.reads_whole_voxels() {
            self.copy_rows(x, shape, &mut out);
            return out;
        }
        self.for_each_source(|i, u| {
            let c = u.map(|c| floor_index(c + 0.5));
            if (0..3).all(|a| c[a] >= 0 && c[a] < shape[a] as i64) {
                out[i] = x[(c[0] as usize * shape[1] + c[1] as usize) * shape[2] + c[2] as usize];
            }
        });
        out
    }

    /// [`PatchGrid::sample_nearest`] where every patch voxel reads one volume voxel ([`PatchGrid::reads_whole_voxels`]):
    /// along an axis a with M[a][a] = 1 the patch voxel v reads `start + v`, mirrored (-1) `start + p - 1 - v`,
    /// with `start = centre - (p - 1)/2`, so each patch row is a slice of a volume row, reversed when W is mirrored.
    fn copy_rows<T: Copy>(&self, x: &[T], shape: [usize; 3], out: &mut [T]) {
        let [pd, ph, pw] = self.patch;
        let start = [0, 1, 2].map(|a| (self.centre[a] - (self.patch[a] as f64 - 1.0) / 2.0) as i64);
        let mirrored = [0, 1, 2].map(|a| self.matrix[a][a] < 0.0);
        let source = |a: usize, v: usize| {
            let c = start[a] + if mirrored[a] { (self.patch[a] - 1 - v) as i64 } else { v as i64 };
            (c >= 0 && c < shape[a] as i64).then_some(c as usize)
        };
        // The patch voxels w whose source lies inside the volume's row (one run), and the first and last of them read.
        let inside: Vec<(usize, usize)> = (0..pw).filter_map(|w| source(2, w).map(|c| (w, c))).collect();
        let (Some(&(w0, c0)), Some(&(w1, c1))) = (inside.first(), inside.last()) else { return };
        for d in 0..pd {
            let Some(sd) = source(0, d) else { continue };
            for h in 0..ph {
                let Some(sh) = source(1, h) else { continue };
                let row = &x[(sd * shape[1] + sh) * shape[2]..][..shape[2]];
                let dst = &mut out[(d * ph + h) * pw..][w0..=w1];
                if mirrored[2] {
                    dst.iter_mut().zip(row[c1..=c0].iter().rev()).for_each(|(o, &v)| *o = v);
                } else {
                    dst.copy_from_slice(&row[c0..=c1]);
                }
            }
        }
    }
}

/// `floor(x)` as an integer, for the coordinates of a patch grid (|x| far below 2^63): the truncation, one less for
/// a negative non-integer. The same value as `x.floor()`, which on x86-64 without SSE4.1 is a call into libm: it took
/// a sixth of a flare-3d batch's time.
fn floor_index(x: f64) -> i64 {
    let t = x as i64;
    t - i64::from((t as f64) > x)
}

/// Adds one field of N(0, std^2) noise to every channel of `image` (channels of `vox` voxels), as nnU-Net with
/// synchronised channels.
pub fn add_gaussian_noise(image: &mut [f32], vox: usize, std: f64, rng: &mut StdRng) {
    let noise: Vec<f32> = (0..vox).map(|_| (std * standard_normal(rng)) as f32).collect();
    for ch in image.chunks_exact_mut(vox) {
        ch.iter_mut().zip(&noise).for_each(|(v, n)| *v += n);
    }
}

/// Multiplies every value by `f`.
pub fn scale_brightness(x: &mut [f32], f: f32) {
    x.iter_mut().for_each(|v| *v *= f);
}

/// Scales deviations from the mean by `f`, then clamps to the original [min, max] (nnU-Net's preserve_range).
pub fn adjust_contrast(x: &mut [f32], f: f32) {
    let mean = (x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64) as f32;
    let (lo, hi) = min_max(x);
    x.iter_mut().for_each(|v| *v = ((*v - mean) * f + mean).clamp(lo, hi));
}

/// Gamma with the mean and standard deviation kept: y = ((x - min) / range)^g range + min, then y is shifted and
/// scaled back to x's mean and std. `invert` applies it to -x and negates the result, which brightens where the plain
/// transform darkens.
pub fn gamma(x: &mut [f32], g: f32, invert: bool) {
    let sign = if invert { -1.0 } else { 1.0 };
    x.iter_mut().for_each(|v| *v *= sign);
    let (mean, std) = mean_std(x);
    let (lo, hi) = min_max(x);
    let range = (hi - lo).max(1e-7);
    x.iter_mut().for_each(|v| *v = ((*v - lo) / range).powf(g) * range + lo);
    let (new_mean, new_std) = mean_std(x);
    let f = std / new_std.max(1e-7);
    x.iter_mut().for_each(|v| *v = sign * ((*v - new_mean) * f + mean));
}

/// Mean and unbiased standard deviation (as torch.std), accumulated in float64.
fn mean_std(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean as f32, var.sqrt() as f32)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)))
}

/// Separable Gaussian blur of one channel of `shape` with standard deviation `sigma[a]` voxels along axis a. As
/// batchgeneratorsv2: kernel exp(-t^2 / 2 sigma^2) normalised to sum 1, of the odd size nearest 6 sigma + 1/2,
/// borders reflected (..., x1, x0 | x0 is not repeated: x1, x0, x1, ...). Axes of size 1 are left alone.
pub fn gaussian_blur(x: &mut [f32], shape: [usize; 3], sigma: [f64; 3]) {
    for (axis, &s) in sigma.iter().enumerate() {
        if shape[axis] < 2 || s <= 0.0 {
            continue;
        }
        let kernel = gaussian_kernel(s);
        let radius = (kernel.len() / 2) as i64;
        let n = shape[axis];
        let mut blurred = vec![0.0f32; n];
        for_each_line(x, shape, axis, |line| {
            for (i, out) in blurred.iter_mut().enumerate() {
                *out = kernel.iter().enumerate().map(|(k, w)| w * line[reflect(i as i64 + k as i64 - radius, n)]).sum();
            }
            line.copy_from_slice(&blurred);
        });
    }
}

fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let target = 6.0 * sigma + 0.5;
    let rounded = target.round();
    let size = if rounded as i64 % 2 == 1 {
        rounded
    } else if target >= rounded {
        rounded + 1.0
    } else {
        rounded - 1.0
    } as i64;
    let half = (size - 1) as f64 / 2.0;
    let pdf: Vec<f64> = (0..size).map(|k| (-0.5 * ((k as f64 - half) / sigma).powi(2)).exp()).collect();
    let total: f64 = pdf.iter().sum();
    pdf.iter().map(|p| (p / total) as f32).collect()
}

/// Index `i` reflected into [0, n) about the end voxels (period 2n - 2).
fn reflect(i: i64, n: usize) -> usize {
    let period = 2 * (n as i64 - 1);
    let j = i.rem_euclid(period);
    (if j < n as i64 { j } else { period - j }) as usize
}

/// Calls `f` on every line of `x` (of `shape`) along `axis`, gathered into a buffer and scattered back.
fn for_each_line(x: &mut [f32], shape: [usize; 3], axis: usize, mut f: impl FnMut(&mut [f32])) {
    let n = shape[axis];
    let stride: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let mut line = vec![0.0f32; n];
    for o in 0..outer {
        for inner in 0..stride {
            let base = o * n * stride + inner;
            line.iter_mut().enumerate().for_each(|(i, v)| *v = x[base + i * stride]);
            f(&mut line);
            line.iter().enumerate().for_each(|(i, &v)| x[base + i * stride] = v);
        }
    }
}

/// Simulates a coarser acquisition: one channel of `shape` is downsampled to round(shape\[a\] factor\[a\]) voxels per axis
/// by nearest neighbour and upsampled back linearly (both on voxel centres, as torch's `nearest-exact` and
/// `trilinear` with align_corners false).
pub fn simulate_low_resolution(x: &mut [f32], shape: [usize; 3], factor: [f64; 3]) {
    let coarse = [0, 1, 2].map(|a| ((shape[a] as f64 * factor[a]).round() as usize).max(1));
    let down = resample_nearest(x, shape, coarse);
    x.copy_from_slice(&resample_linear(&down, coarse, shape));
}
