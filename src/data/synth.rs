//! The built-in synthetic dataset: deterministic CT-like abdominal phantoms, so that a newcomer can watch LKM-UNet
//! learn in minutes on a small CPU without downloading anything.
//!
//! Geometry. Voxel coordinates p = (z, y, x) are the array indices (D, H, W), spacing 1.5 mm isotropic; sizes are
//! fractions of each axis' extent, so any shape works (below about 16 voxels per axis the small organs may vanish).
//! Directions (cosmetic; the cases carry no affine): small z is cranial, small y anterior and small x the patient's
//! right, as a radiological display of the array would show them. Each case holds, painted in this order (a later
//! structure overwrites an earlier one; organs only inside the body):
//! 1. the body: an ellipsoid of soft tissue (~40 HU) with a subcutaneous fat rim (~-100 HU), in air (-1000 HU);
//! 2. two unlabelled distractors: a spleen (~50 HU, soft-tissue-like) on the left and a contrast-filled aorta (~170 HU,
//!    kidney-like) in front of the spine, so that intensity alone cannot tell the classes apart;
//! 3. the liver (class 1, ~120 HU, contrast-enhanced): a union of 2-3 overlapping ellipsoids on the right;
//! 4. the kidneys (class 2, ~230 HU, brighter cortex, darker medulla): two bent ellipsoids with a medial notch;
//! 5. the spine (class 3, 320-740 HU): a vertical tube whose radius swells periodically (vertebrae) between narrower
//!    discs, with a bright cortical shell; its axis tilts and curves gently.
//!
//! An ellipsoid with centre c, rotation R (rows = local axes) and semi-axes a contains p when
//! q(p) = sum_i ((R (p - c))_i / a_i)^2 < 1 + d(p), where d is a smooth deformation field. Deformation fields,
//! tissue textures and the bias field are all sums of a few random plane waves
//! f(p) = sum_k A_k sin(k_k . p + phi_k) with long wavelengths.
//!
//! Image formation: the clean image v (tissue value + texture per structure) is blurred with a 3x3x3 box filter
//! (edge-replicating; partial volume at boundaries; the label is not blurred), then
//! I = (blur(v) + 1000) (1 + b(p)) - 1000 + n, with b a smooth bias field of a few percent (multiplicative on the
//! attenuation, so air stays at -1000) and n near-Gaussian noise (see `bias_and_noise`) with sigma drawn per case in
//! [25, 40] HU.
//!
//! Speed: a plane wave factors as e^{i(k.p + phi)} = e^{i(k_z z + phi)} e^{i k_y y} e^{i k_x x}, so each field keeps
//! per-axis tables of cos/sin, forms the (z, y) factor once per row and costs two multiplies per wave per voxel.
//! Each structure is evaluated only inside its bounding box.
//!
//! Determinism: case `index` draws everything from `StdRng::seed_from_u64(seed ^ splitmix64(index))` in a fixed
//! order and uses no global state, so a case depends only on (index, seed, shape) (for a given `rand` version and
//! platform libm).

use super::Case;
use crate::{ensure, Result};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Class names and label values of the phantoms, in label order.
pub const PHANTOM_LABELS: &[(&str, u8)] = &[("background", 0), ("liver", 1), ("kidneys", 2), ("spine", 3)];

/// Voxel spacing of the phantoms [D, H, W] in millimetres.
pub const PHANTOM_SPACING: [f64; 3] = [1.5, 1.5, 1.5];

const BACKGROUND: u8 = 0;
const LIVER: u8 = 1;
const KIDNEYS: u8 = 2;
const SPINE: u8 = 3;

const AIR_HU: f32 = -1000.0;
const FAT_HU: f64 = -100.0;

/// Size and seed of the synthetic phantom dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthConfig {
    /// Number of cases.
    pub cases: usize,
    /// Spatial size [D, H, W] of every case.
    pub shape: [usize; 3],
    /// Base seed; case `i` is seeded with `seed ^ splitmix64(i)`.
    pub seed: u64,
}

impl Default for SynthConfig {
    /// 24 cases of 48 x 48 x 48 voxels (72 mm cubes at 1.5 mm), seed 1.
    fn default() -> Self {
        SynthConfig { cases: 24, shape: [48, 48, 48], seed: 1 }
    }
}

/// Sizes allowed per axis of a phantom: below 8 voxels the organs vanish, above 512 a case no longer fits the memory
/// of a small machine.
pub const SHAPE_RANGE: (usize, usize) = (8, 512);

impl SynthConfig {
    /// Checks the settings against their allowed ranges, naming `lkm-engine synth`'s flags.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.cases >= 1, Config, "--cases must be at least 1, got {}", self.cases);
        let (lo, hi) = SHAPE_RANGE;
        ensure!(
            self.shape.iter().all(|s| (lo..=hi).contains(s)),
            Config,
            "--shape {:?}: each size must be {lo} to {hi}",
            self.shape
        );
        Ok(())
    }
}

/// All `cfg.cases` phantoms, named `phantom_0000`, `phantom_0001`, ..., generated on all available cores (each case
/// depends only on its index, so the result does not depend on the thread count).
pub fn phantom_dataset(cfg: &SynthConfig) -> Vec<Case> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(cfg.cases);
    if threads <= 1 {
        return (0..cfg.cases).map(|i| phantom_case(i, cfg)).collect();
    }
    let chunk = cfg.cases.div_ceil(threads);
    let mut out: Vec<Option<Case>> = (0..cfg.cases).map(|_| None).collect();
    std::thread::scope(|scope| {
        for (t, slots) in out.chunks_mut(chunk).enumerate() {
            scope.spawn(move || {
                for (j, slot) in slots.iter_mut().enumerate() {
                    *slot = Some(phantom_case(t * chunk + j, cfg));
                }
            });
        }
    });
    out.into_iter().flatten().collect()
}

/// Phantom number `index` of the dataset `cfg` (`cfg.cases` is not consulted): one channel of CT-like intensities in
/// HU, a label map with the classes of [`PHANTOM_LABELS`], spacing [`PHANTOM_SPACING`].
pub fn phantom_case(index: usize, cfg: &SynthConfig) -> Case {
    let shape = cfg.shape;
    let n = shape.iter().product::<usize>();
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ splitmix64(index as u64));

    let structures = layout(&mut rng, shape);
    let bias = Field::random(&mut rng, shape, 2, 0.025, 1.5 * max3(shape), 3.0 * max3(shape));
    let sigma = uni(&mut rng, 25.0, 40.0);

    let mut img = vec![AIR_HU; n];
    let mut label = vec![BACKGROUND; n];
    let mut in_body = vec![false; n];
    for s in &structures {
        paint(s, shape, &mut img, &mut label, &mut in_body);
    }

    let mut scratch = vec![0f32; n];
    box_blur3(&mut img, &mut scratch, shape);
    bias_and_noise(&mut img, shape, &bias, sigma, &mut rng);

    Case {
        name: format!("phantom_{index:04}"),
        image: img,
        channels: 1,
        shape,
        label: Some(label),
        spacing: PHANTOM_SPACING,
    }
}

/// The splitmix64 finaliser: decorrelates consecutive case indices before they are mixed into the seed.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn uni(rng: &mut StdRng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

fn max3(s: [usize; 3]) -> f64 {
    s.iter().copied().max().unwrap_or(0) as f64
}

// ---------------------------------------------------------------------------------------------------------------
// Smooth random fields: sums of plane waves with separable per-axis tables.

const MAX_WAVES: usize = 4;

/// One plane wave A sin(k.p + phi), stored as e^{i(k_z z + phi)}, e^{i k_y y}, e^{i k_x x} per axis.
struct Wave {
    amp: f64,
    tz: Vec<[f64; 2]>,
    ty: Vec<[f64; 2]>,
    tx: Vec<[f64; 2]>,
}

/// A sum of at most `MAX_WAVES` plane waves.
struct Field {
    waves: Vec<Wave>,
}

/// The (z, y) factors A e^{i(k_z z + k_y y + phi)} of each wave for one row.
struct Row {
    c: [[f64; 2]; MAX_WAVES],
}

impl Field {
    /// `count` waves with amplitudes uniform in [amp/2, amp] (so |f| <= count amp), isotropic random directions,
    /// wavelengths uniform in [lambda_lo, lambda_hi] voxels and random phases.
    fn random(rng: &mut StdRng, shape: [usize; 3], count: usize, amp: f64, lambda_lo: f64, lambda_hi: f64) -> Field {
        // e^{i(k i + phase)} by repeated multiplication with e^{ik}: the rounding error grows only like i * 1e-16.
        let table = |len: usize, k: f64, phase: f64| -> Vec<[f64; 2]> {
            let (step_s, step_c) = k.sin_cos();
            let (s0, c0) = phase.sin_cos();
            let mut v = [c0, s0];
            let mut t = Vec::with_capacity(len);
            for _ in 0..len {
                t.push(v);
                v = [v[0] * step_c - v[1] * step_s, v[0] * step_s + v[1] * step_c];
            }
            t
        };
        let waves = (0..count.min(MAX_WAVES))
            .map(|_| {
                let a = amp * uni(rng, 0.5, 1.0);
                let k = std::f64::consts::TAU / uni(rng, lambda_lo, lambda_hi).max(1.0);
                let cz = uni(rng, -1.0, 1.0);
                let az = uni(rng, 0.0, std::f64::consts::TAU);
                let sz = (1.0 - cz * cz).sqrt();
                let dir = [cz, sz * az.cos(), sz * az.sin()];
                let phase = uni(rng, 0.0, std::f64::consts::TAU);
                Wave {
                    amp: a,
                    tz: table(shape[0], k * dir[0], phase),
                    ty: table(shape[1], k * dir[1], 0.0),
                    tx: table(shape[2], k * dir[2], 0.0),
                }
            })
            .collect();
        Field { waves }
    }

    fn row(&self, z: usize, y: usize) -> Row {
        let mut c = [[0.0; 2]; MAX_WAVES];
        for (w, cw) in self.waves.iter().zip(c.iter_mut()) {
            let [a, b] = w.tz[z];
            let [e, f] = w.ty[y];
            *cw = [w.amp * (a * e - b * f), w.amp * (a * f + b * e)];
        }
        Row { c }
    }

    /// Im(row factor * e^{i k_x x}) summed over waves.
    #[inline]
    fn at(&self, row: &Row, x: usize) -> f64 {
        let mut s = 0.0;
        for (w, c) in self.waves.iter().zip(row.c.iter()) {
            let [cx, sx] = w.tx[x];
            s += c[0] * sx + c[1] * cx;
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Geometry.

type Mat3 = [[f64; 3]; 3];

/// Rotation by `t[0]` about the z axis (mixing y and x), then `t[1]` about y (mixing z and x), then `t[2]` about x
/// (mixing z and y), as R = R_x R_y R_z in (z, y, x) coordinates.
fn rotation(t: [f64; 3]) -> Mat3 {
    let about = |axis: usize, a: f64| -> Mat3 {
        let (i, j) = match axis {
            0 => (1, 2),
            1 => (0, 2),
            _ => (0, 1),
        };
        let mut m = [[0.0; 3]; 3];
        m[axis][axis] = 1.0;
        m[i][i] = a.cos();
        m[j][j] = a.cos();
        m[i][j] = -a.sin();
        m[j][i] = a.sin();
        m
    };
    let mul = |a: Mat3, b: Mat3| -> Mat3 {
        let mut m = [[0.0; 3]; 3];
        for r in 0..3 {
            for c in 0..3 {
                m[r][c] = (0..3).map(|k| a[r][k] * b[k][c]).sum();
            }
        }
        m
    };
    mul(about(2, t[2]), mul(about(1, t[1]), about(0, t[0])))
}

/// An oriented ellipsoid: centre, rotation (rows = local axes in (z, y, x)), semi-axes.
#[derive(Clone, Copy)]
struct Ellipsoid {
    c: [f64; 3],
    rot: Mat3,
    semi: [f64; 3],
}

impl Ellipsoid {
    /// The local coordinates along the row (z, y, .): u(x) = base + x step, affine in x.
    fn line(&self, z: usize, y: usize) -> Line {
        let d = [z as f64 - self.c[0], y as f64 - self.c[1], -self.c[2]];
        let mut line = Line::default();
        for i in 0..3 {
            let r = self.rot[i];
            line.base[i] = (r[0] * d[0] + r[1] * d[1] + r[2] * d[2]) / self.semi[i];
            line.step[i] = r[2] / self.semi[i];
        }
        line
    }

    fn max_semi(&self) -> f64 {
        self.semi.iter().copied().fold(0.0, f64::max)
    }
}

/// Local ellipsoid coordinates along one row of voxels.
#[derive(Clone, Copy, Default)]
struct Line {
    base: [f64; 3],
    step: [f64; 3],
}

impl Line {
    #[inline]
    fn at(&self, x: f64) -> [f64; 3] {
        [self.base[0] + x * self.step[0], self.base[1] + x * self.step[1], self.base[2] + x * self.step[2]]
    }

    #[inline]
    fn q(&self, x: f64) -> f64 {
        let u = self.at(x);
        u[0] * u[0] + u[1] * u[1] + u[2] * u[2]
    }
}

/// The most ellipsoids in one shape (the liver's lobes).
const MAX_PARTS: usize = 3;

/// One axial slice of a tube: centre, 1 / radius, and the vertebra profile in [0, 1] (0 = disc).
#[derive(Clone, Copy)]
struct TubeSlice {
    cy: f64,
    cx: f64,
    inv_r: f64,
    bulge: f64,
}

/// The implicit shapes; `eval` returns the intensity offset (HU) from the structure's base value where the point
/// is inside, given the local deformation `d`.
enum Geom {
    /// Body ellipsoid; fat where q > `fat_q`.
    Body { e: Ellipsoid, fat_q: f64, fat_offset: f64 },
    /// Union of ellipsoids, uniform tissue.
    Union(Vec<Ellipsoid>),
    /// Ellipsoid bent towards local -u2 (medial) by `bend` at the poles, minus a notch ball (hilum) of squared
    /// radius `notch_r2` at local (0, 0, -1); cortex (q > 0.45) brighter than medulla.
    Bean { e: Ellipsoid, bend: f64, notch_r2: f64 },
    /// Vertical tube with per-slice centre and radius; `spine` adds vertebra and cortical-shell intensities.
    Tube { slices: Vec<TubeSlice>, spine: bool },
}

impl Geom {
    /// Per-row state: the local coordinates of each ellipsoid along the row (z, y, .).
    fn lines(&self, z: usize, y: usize) -> [Line; MAX_PARTS] {
        let mut lines = [Line::default(); MAX_PARTS];
        match self {
            Geom::Body { e, .. } | Geom::Bean { e, .. } => lines[0] = e.line(z, y),
            Geom::Union(es) => {
                for (l, e) in lines.iter_mut().zip(es) {
                    *l = e.line(z, y);
                }
            }
            Geom::Tube { .. } => {}
        }
        lines
    }

    /// The intensity offset at (z, y, x) if inside, given the row state `lines` and the deformation `d`.
    #[inline]
    fn eval(&self, lines: &[Line; MAX_PARTS], z: usize, y: usize, x: usize, d: f64) -> Option<f64> {
        let xf = x as f64;
        match self {
            Geom::Body { fat_q, fat_offset, .. } => {
                let q = lines[0].q(xf);
                (q < 1.0 + d).then_some(if q > fat_q + d { *fat_offset } else { 0.0 })
            }
            Geom::Union(es) => lines.iter().take(es.len()).any(|l| l.q(xf) < 1.0 + d).then_some(0.0),
            Geom::Bean { bend, notch_r2, .. } => {
                let u = lines[0].at(xf);
                let u2 = u[2] + bend * u[0] * u[0];
                let q = u[0] * u[0] + u[1] * u[1] + u2 * u2;
                let notch = u[0] * u[0] + u[1] * u[1] + (u[2] + 1.0) * (u[2] + 1.0);
                (q < 1.0 + d && notch > *notch_r2).then_some(if q > 0.45 { 20.0 } else { -35.0 })
            }
            Geom::Tube { slices, spine } => {
                let s = slices[z];
                let dy = (y as f64 - s.cy) * s.inv_r;
                let dx = (xf - s.cx) * s.inv_r;
                let rr = dy * dy + dx * dx;
                if rr >= 1.0 + d {
                    return None;
                }
                if !spine {
                    return Some(0.0);
                }
                let shell = if rr > 0.55 { 50.0 + 250.0 * s.bulge } else { 0.0 };
                Some(120.0 * (s.bulge - 0.5) + shell)
            }
        }
    }
}

/// A structure to paint: class, tissue value, shape, deformation and texture fields, bounding box [lo, hi).
struct Structure {
    class: u8,
    marks_body: bool,
    clip_to_body: bool,
    base: f64,
    geom: Geom,
    deform: Field,
    texture: Field,
    lo: [usize; 3],
    hi: [usize; 3],
}

/// The voxel box [lo, hi) covering the ball of radius `r` around `c`, clipped to the volume.
fn ball_box(c: [f64; 3], r: f64, shape: [usize; 3]) -> ([usize; 3], [usize; 3]) {
    let mut lo = [0; 3];
    let mut hi = [0; 3];
    for a in 0..3 {
        // `as usize` saturates (negative and NaN give 0), so no underflow.
        lo[a] = ((c[a] - r).floor() as usize).min(shape[a]);
        hi[a] = ((c[a] + r).ceil() as usize + 1).min(shape[a]);
    }
    (lo, hi)
}

/// The voxel box [lo, hi) of a vertical tube: all slices, and `reach` voxels around (y, x) in-plane.
fn tube_box(y: f64, x: f64, reach: f64, shape: [usize; 3]) -> ([usize; 3], [usize; 3]) {
    let (lo, hi) = ball_box([0.0, y, x], reach, shape);
    ([0, lo[1], lo[2]], [shape[0], hi[1], hi[2]])
}

/// A texture field: three waves of `amp` HU at most, wavelengths 4-14 voxels.
fn texture(rng: &mut StdRng, shape: [usize; 3], amp: f64) -> Field {
    Field::random(rng, shape, 3, amp, 4.0, 14.0)
}

/// Draws every structure of one case, in painting order.
fn layout(rng: &mut StdRng, shape: [usize; 3]) -> Vec<Structure> {
    let [d, h, w] = shape.map(|s| s as f64);
    let mut out = Vec::with_capacity(7);

    // Body: an ellipsoid elongated beyond the volume along z, so every axial slice is a torso section.
    let body = Ellipsoid {
        c: [d * uni(rng, 0.47, 0.53), h * uni(rng, 0.46, 0.54), w * uni(rng, 0.47, 0.53)],
        rot: rotation([uni(rng, -0.08, 0.08), uni(rng, -0.03, 0.03), uni(rng, -0.03, 0.03)]),
        semi: [d * 0.9, h * uni(rng, 0.36, 0.42), w * uni(rng, 0.42, 0.47)],
    };
    let [cz, cy, cx] = body.c;
    let (ay, ax) = (body.semi[1], body.semi[2]);
    let fat = uni(rng, 0.15, 0.25);
    let base = 40.0;
    out.push(Structure {
        class: BACKGROUND,
        marks_body: true,
        clip_to_body: false,
        base,
        geom: Geom::Body { e: body, fat_q: (1.0 - fat) * (1.0 - fat), fat_offset: FAT_HU - base },
        deform: Field::random(rng, shape, 2, 0.04, 0.6 * max3(shape), 1.2 * max3(shape)),
        texture: texture(rng, shape, 9.0),
        lo: [0; 3],
        hi: shape,
    });

    // Spine parameters first: the aorta sits in front of it.
    let spine_y = cy + ay * uni(rng, 0.38, 0.48);
    let spine_x = cx + w * uni(rng, -0.02, 0.02);
    let r0 = h.min(w) * uni(rng, 0.075, 0.095);
    let tilt = [uni(rng, -0.08, 0.08), uni(rng, -0.08, 0.08)];
    let curve_amp = h * uni(rng, 0.0, 0.03);
    let curve_k = std::f64::consts::TAU / (d * uni(rng, 1.5, 3.0)).max(1.0);
    let curve_phase = uni(rng, 0.0, std::f64::consts::TAU);
    let period = (d * uni(rng, 0.17, 0.24)).max(3.0);
    let vert_phase = uni(rng, 0.0, period);

    // Spleen (unlabelled, liver-like intensity) on the patient's left.
    let spleen = Ellipsoid {
        c: [d * uni(rng, 0.3, 0.45), cy + ay * uni(rng, 0.0, 0.2), cx + ax * uni(rng, 0.5, 0.62)],
        rot: rotation([uni(rng, -0.4, 0.4), uni(rng, -0.15, 0.15), uni(rng, -0.15, 0.15)]),
        semi: [d * uni(rng, 0.13, 0.18), ay * uni(rng, 0.28, 0.36), ax * uni(rng, 0.16, 0.22)],
    };
    let (lo, hi) = ball_box(spleen.c, spleen.max_semi() * 1.1, shape);
    out.push(Structure {
        class: BACKGROUND,
        marks_body: false,
        clip_to_body: true,
        base: 50.0,
        geom: Geom::Union(vec![spleen]),
        deform: Field::random(rng, shape, 2, 0.1, 0.5 * d.max(8.0), 1.0 * d.max(8.0)),
        texture: texture(rng, shape, 4.0),
        lo,
        hi,
    });

    // Aorta (unlabelled, kidney-like intensity): a straight-ish tube in front of the spine, slightly left.
    let ar = w * uni(rng, 0.045, 0.06);
    let ay0 = spine_y - r0 - ar - h * uni(rng, 0.01, 0.04);
    let ax0 = cx + w * uni(rng, 0.03, 0.08);
    let atilt = uni(rng, -0.05, 0.05);
    let slices: Vec<TubeSlice> = (0..shape[0])
        .map(|z| TubeSlice { cy: ay0, cx: ax0 + atilt * (z as f64 - cz), inv_r: 1.0 / ar.max(0.5), bulge: 0.0 })
        .collect();
    let reach = ar * 1.2 + atilt.abs() * d + 1.0;
    out.push(Structure {
        class: BACKGROUND,
        marks_body: false,
        clip_to_body: true,
        base: 170.0,
        geom: Geom::Tube { slices, spine: false },
        deform: Field::random(rng, shape, 2, 0.1, 0.5 * d.max(8.0), 1.0 * d.max(8.0)),
        texture: texture(rng, shape, 6.0),
        lo: tube_box(ay0, ax0, reach, shape).0,
        hi: tube_box(ay0, ax0, reach, shape).1,
    });

    // Liver: a main right lobe, a left lobe reaching across the midline, and sometimes an inferior tongue.
    let main = Ellipsoid {
        c: [d * uni(rng, 0.3, 0.42), cy - ay * uni(rng, 0.05, 0.2), cx - ax * uni(rng, 0.35, 0.45)],
        rot: rotation([uni(rng, -0.3, 0.3), uni(rng, -0.15, 0.15), uni(rng, -0.15, 0.15)]),
        semi: [d * uni(rng, 0.22, 0.3), ay * uni(rng, 0.5, 0.62), ax * uni(rng, 0.38, 0.48)],
    };
    let left = Ellipsoid {
        c: [main.c[0] + d * uni(rng, -0.05, 0.05), cy - ay * uni(rng, 0.3, 0.45), cx - ax * uni(rng, 0.0, 0.12)],
        rot: rotation([uni(rng, -0.4, 0.4), uni(rng, -0.15, 0.15), uni(rng, -0.15, 0.15)]),
        semi: [d * uni(rng, 0.13, 0.18), ay * uni(rng, 0.25, 0.33), ax * uni(rng, 0.3, 0.4)],
    };
    let mut lobes = vec![main, left];
    let tongue = Ellipsoid {
        c: [
            main.c[0] + d * uni(rng, 0.15, 0.22),
            main.c[1] + ay * uni(rng, 0.0, 0.15),
            main.c[2] - ax * uni(rng, 0.0, 0.1),
        ],
        rot: rotation([uni(rng, -0.3, 0.3), uni(rng, -0.2, 0.2), uni(rng, -0.2, 0.2)]),
        semi: [d * uni(rng, 0.12, 0.17), ay * uni(rng, 0.25, 0.35), ax * uni(rng, 0.25, 0.33)],
    };
    if rng.random::<f64>() < 0.5 {
        lobes.push(tongue);
    }
    let liver_amp: f64 = 0.24; // the bound on |d|: 3 waves of at most 0.08
    let (mut lo, mut hi) = (shape, [0; 3]);
    for e in &lobes {
        let (l, u) = ball_box(e.c, e.max_semi() * (1.0 + liver_amp).sqrt(), shape);
        for a in 0..3 {
            lo[a] = lo[a].min(l[a]);
            hi[a] = hi[a].max(u[a]);
        }
    }
    out.push(Structure {
        class: LIVER,
        marks_body: false,
        clip_to_body: true,
        base: 120.0,
        geom: Geom::Union(lobes),
        deform: Field::random(rng, shape, 3, liver_amp / 3.0, 0.5 * max3(shape), 1.0 * max3(shape)),
        texture: texture(rng, shape, 4.0),
        lo,
        hi,
    });

    // Kidneys: right (s = -1, small x, slightly lower) and left; local u2 points laterally, so the bend and the
    // hilum notch face the spine.
    for s in [-1.0f64, 1.0] {
        let c = [
            d * uni(rng, 0.45, 0.6) + if s < 0.0 { 0.04 * d } else { 0.0 },
            cy + ay * uni(rng, 0.12, 0.28),
            cx + s * ax * uni(rng, 0.45, 0.58),
        ];
        let mut rot = rotation([s * uni(rng, 0.2, 0.6), s * uni(rng, 0.1, 0.3), uni(rng, -0.15, 0.15)]);
        if s < 0.0 {
            rot[2] = rot[2].map(|v| -v);
        }
        let e = Ellipsoid {
            c,
            rot,
            semi: [d * uni(rng, 0.18, 0.22), h * uni(rng, 0.105, 0.125), w * uni(rng, 0.115, 0.135)],
        };
        let amp: f64 = 0.12;
        let (lo, hi) = ball_box(c, e.max_semi() * (1.0 + amp).sqrt() * 1.1, shape);
        out.push(Structure {
            class: KIDNEYS,
            marks_body: false,
            clip_to_body: true,
            base: 230.0,
            geom: Geom::Bean { e, bend: uni(rng, 0.3, 0.5), notch_r2: uni(rng, 0.12, 0.22) },
            deform: Field::random(rng, shape, 2, amp / 2.0, 0.4 * d.max(8.0), 0.8 * d.max(8.0)),
            texture: texture(rng, shape, 5.0),
            lo,
            hi,
        });
    }

    // Spine: radius r0 (0.82 + 0.3 b(z)) with the vertebra profile b = ((cos theta + 0.4) / 1.4)_+^{1/2}.
    let slices: Vec<TubeSlice> = (0..shape[0])
        .map(|z| {
            let zf = z as f64;
            let curve = curve_amp * (curve_k * zf + curve_phase).sin();
            let theta = std::f64::consts::TAU * (zf - vert_phase) / period;
            let bulge = ((theta.cos() + 0.4) / 1.4).max(0.0).sqrt();
            TubeSlice {
                cy: spine_y + tilt[0] * (zf - cz) + curve,
                cx: spine_x + tilt[1] * (zf - cz),
                inv_r: 1.0 / (r0 * (0.82 + 0.3 * bulge)).max(0.5),
                bulge,
            }
        })
        .collect();
    let reach = r0 * 1.12 * 1.1 + curve_amp + tilt[0].abs().max(tilt[1].abs()) * d + 1.0;
    let (spine_lo, spine_hi) = tube_box(spine_y, spine_x, reach, shape);
    out.push(Structure {
        class: SPINE,
        marks_body: false,
        clip_to_body: true,
        base: 380.0,
        geom: Geom::Tube { slices, spine: true },
        deform: Field::random(rng, shape, 2, 0.08, 0.3 * d.max(8.0), 0.6 * d.max(8.0)),
        texture: texture(rng, shape, 15.0),
        lo: spine_lo,
        hi: spine_hi,
    });
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Rasterisation and image formation.

/// Writes `s` into the clean image and label inside its bounding box.
fn paint(s: &Structure, shape: [usize; 3], img: &mut [f32], label: &mut [u8], in_body: &mut [bool]) {
    let [_, h, w] = shape;
    for z in s.lo[0]..s.hi[0] {
        for y in s.lo[1]..s.hi[1] {
            let dr = s.deform.row(z, y);
            let tr = s.texture.row(z, y);
            let lines = s.geom.lines(z, y);
            let row = (z * h + y) * w;
            for x in s.lo[2]..s.hi[2] {
                let i = row + x;
                if s.clip_to_body && !in_body[i] {
                    continue;
                }
                if let Some(offset) = s.geom.eval(&lines, z, y, x, s.deform.at(&dr, x)) {
                    img[i] = (s.base + offset + s.texture.at(&tr, x)) as f32;
                    label[i] = s.class;
                    if s.marks_body {
                        in_body[i] = true;
                    }
                }
            }
        }
    }
}

/// 3x3x3 box blur with replicated edges, as three separable 3-tap means (W, then H, then D).
fn box_blur3(img: &mut [f32], tmp: &mut [f32], shape: [usize; 3]) {
    let [d, h, w] = shape;
    let third = 1.0f32 / 3.0;
    // Along W: img -> tmp.
    for (src, dst) in img.chunks_exact(w.max(1)).zip(tmp.chunks_exact_mut(w.max(1))) {
        if w < 2 {
            dst.copy_from_slice(src);
            continue;
        }
        dst[0] = (src[0] + src[0] + src[1]) * third;
        for (o, t) in dst[1..w - 1].iter_mut().zip(src.windows(3)) {
            *o = (t[0] + t[1] + t[2]) * third;
        }
        dst[w - 1] = (src[w - 2] + src[w - 1] + src[w - 1]) * third;
    }
    // Along H: tmp -> img.
    let plane = h * w;
    for (src, dst) in tmp.chunks_exact(plane.max(1)).zip(img.chunks_exact_mut(plane.max(1))) {
        for y in 0..h {
            let (ym, yp) = (y.saturating_sub(1), (y + 1).min(h - 1));
            let (r0, r1, r2) = (&src[ym * w..ym * w + w], &src[y * w..y * w + w], &src[yp * w..yp * w + w]);
            for (((o, a), b), c) in dst[y * w..y * w + w].iter_mut().zip(r0).zip(r1).zip(r2) {
                *o = (a + b + c) * third;
            }
        }
    }
    // Along D: img -> tmp, then copy back.
    for z in 0..d {
        let (zm, zp) = (z.saturating_sub(1), (z + 1).min(d - 1));
        let (p0, p1, p2) = (
            &img[zm * plane..zm * plane + plane],
            &img[z * plane..z * plane + plane],
            &img[zp * plane..zp * plane + plane],
        );
        for (((o, a), b), c) in tmp[z * plane..z * plane + plane].iter_mut().zip(p0).zip(p1).zip(p2) {
            *o = (a + b + c) * third;
        }
    }
    img.copy_from_slice(tmp);
}

/// I = (v + 1000)(1 + b) - 1000 + sigma n. The unit noise n is the Irwin-Hall sum of the four 16-bit uniforms in
/// one random u64, standardised: mean 0, variance 1, within 0.008 of the normal CDF everywhere but truncated at
/// +-3.46 sigma. (Box-Muller, with a log, a root and a sine per voxel pair, took about half the generation time.)
fn bias_and_noise(img: &mut [f32], shape: [usize; 3], bias: &Field, sigma: f64, rng: &mut StdRng) {
    let [d, h, w] = shape;
    // Each 16-bit uniform has mean (2^16 - 1) / 2 and variance (2^32 - 1) / 12.
    let mean = 2.0 * 65535.0;
    let scale = sigma / (4.0 * (4294967296.0 - 1.0) / 12.0f64).sqrt();
    for z in 0..d {
        for y in 0..h {
            let br = bias.row(z, y);
            let row = (z * h + y) * w;
            for (x, v) in img[row..row + w].iter_mut().enumerate() {
                let r: u64 = rng.random();
                let sum = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
                let noise = (sum as f64 - mean) * scale;
                *v = ((*v as f64 + 1000.0) * (1.0 + bias.at(&br, x)) - 1000.0 + noise) as f32;
            }
        }
    }
}
