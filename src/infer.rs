//! Sliding-window prediction of a whole (normalised) volume with a network trained on patches, as nnU-Net does it.
//!
//! Tiling. Along each spatial axis of size S with patch P and step fraction f, nnU-Net's
//! `compute_steps_for_sliding_window` places n = ceil((S - P) / (P f)) + 1 tiles at the starts
//! round(i (S - P) / (n - 1)), i = 0..n, rounded half to even like NumPy (a single tile at 0 when S = P). An axis
//! smaller than the patch is zero-padded, centred (floor(d / 2) before, the rest after, d = P - S), to the patch, and
//! the result is cropped back; the padding here is virtual (tiles read zeros outside the image, and only voxels
//! inside it are accumulated), which gives the same numbers without copying the volume.
//!
//! Weighting. Every tile's output is multiplied by nnU-Net's Gaussian importance map g (`compute_gaussian`): per axis
//! exp(-(i - c)^2 / (2 sigma^2)) with c = floor(P / 2) and sigma = P / 8, zero beyond scipy's truncation radius
//! floor(4 sigma + 0.5), the separable product normalised to max 1 and its zeros raised to its smallest nonzero
//! value. The prediction at voxel v is sum_t g_t(v) z_t(v) / sum_t g_t(v) over the tiles t covering v.
//!
//! What is aggregated: the logits z, as nnU-Net v2 (which the public LKM-UNet code is built on) does; the
//! probabilities are the softmax of the aggregated logits, and the labels their argmax (softmax is monotone, so no
//! probabilities are formed for labels). Blending logits, not probabilities (nnU-Net v1), keeps our predictions
//! comparable with those of the public code.
//!
//! Mirroring (test-time augmentation): the tile logits are the mean over all 2^r subsets A of the r spatial axes of
//! flip_A(net(flip_A(x))), r = 3 for 3D models and 2 for 2D ones; the empty subset is the plain prediction.
//!
//! 2D models (a patch with 2 axes) predict the volume slice by slice along D: the tiles are (1, Ph, Pw) boxes, every
//! slice is a start along D, and tiles of different slices share batches.

use crate::autograd::Tape;
use crate::device::Device;
use crate::nn::{LkmUnet, ModelConfig, Params};
use crate::tensor::{DType, Tensor};
use crate::{bail, ensure, Result};

/// How to predict a volume.
#[derive(Clone, Debug, PartialEq)]
pub struct InferConfig {
    /// Tile size per spatial axis (2 or 3 entries, as the model's patch); normally the training patch.
    pub patch: Vec<usize>,
    /// Step between tiles as a fraction of the patch, in (0, 1]; nnU-Net uses 0.5.
    pub step_fraction: f64,
    /// Whether to average over all axis flips (test-time mirroring).
    pub mirror: bool,
    /// Tiles per network call.
    pub batch: usize,
}

impl InferConfig {
    /// nnU-Net's defaults for a model: its training patch, half-patch steps, mirroring on, one tile per call.
    pub fn for_model(config: &ModelConfig) -> InferConfig {
        InferConfig { patch: config.patch.clone(), step_fraction: 0.5, mirror: true, batch: 1 }
    }
}

/// Tile starts along one axis of `size` voxels for tiles of `patch` voxels and steps of `step_fraction * patch`
/// (nnU-Net's `compute_steps_for_sliding_window`); an axis no longer than the patch (padded to it) has one tile at 0.
pub fn sliding_window_steps(size: usize, patch: usize, step_fraction: f64) -> Result<Vec<usize>> {
    ensure!(patch > 0, Config, "sliding window: patch size must be positive, got {patch}");
    ensure!(
        step_fraction > 0.0 && step_fraction <= 1.0,
        Config,
        "sliding window: step fraction must be in (0, 1], got {step_fraction}"
    );
    if size <= patch {
        return Ok(vec![0]);
    }
    let target = patch as f64 * step_fraction;
    let room = (size - patch) as f64;
    let n = (room / target).ceil() as usize + 1;
    let actual = room / (n - 1) as f64;
    Ok((0..n).map(|i| (actual * i as f64).round_ties_even() as usize).collect())
}

/// One axis of the Gaussian importance map: exp(-(i - c)^2 / (2 sigma^2)), c = floor(p / 2), sigma = p / 8, zero
/// beyond scipy's truncation radius floor(4 sigma + 0.5).
fn gaussian_axis(p: usize) -> Vec<f64> {
    let sigma = p as f64 / 8.0;
    let radius = (4.0 * sigma + 0.5).floor();
    let c = (p / 2) as f64;
    (0..p)
        .map(|i| {
            let d = i as f64 - c;
            if d.abs() > radius {
                0.0
            } else {
                (-d * d / (2.0 * sigma * sigma)).exp()
            }
        })
        .collect()
}

/// nnU-Net's Gaussian importance map for a tile of size `patch` (row-major, last axis fastest): the separable
/// Gaussian with sigma = patch / 8 centred at floor(patch / 2), scaled to max 1, zeros raised to the smallest nonzero
/// value.
pub fn gaussian_importance(patch: &[usize]) -> Vec<f32> {
    let mut map = vec![1.0f64];
    for &p in patch {
        let axis = gaussian_axis(p);
        map = map.iter().flat_map(|&m| axis.iter().map(move |&a| m * a)).collect();
    }
    let max = map.iter().cloned().fold(0.0, f64::max);
    let min_nonzero = map.iter().cloned().filter(|&v| v > 0.0).fold(f64::INFINITY, f64::min);
    map.iter().map(|&v| if v > 0.0 { (v / max) as f32 } else { (min_nonzero / max) as f32 }).collect()
}

/// `data` of row-major `shape` reversed along each axis in `axes` (a set: an axis listed twice is reversed once).
pub fn flip(data: &[f32], shape: &[usize], axes: &[usize]) -> Result<Vec<f32>> {
    let n: usize = shape.iter().product();
    ensure!(data.len() == n, Shape, "flip: {} values for shape {shape:?} ({n} elements)", data.len());
    let rank = shape.len();
    let mut flipped = vec![false; rank];
    for &a in axes {
        ensure!(a < rank, Shape, "flip: axis {a} out of range for shape {shape:?}");
        flipped[a] = true;
    }
    if n == 0 || rank == 0 {
        return Ok(data.to_vec());
    }
    let last = shape[rank - 1];
    let mut strides = vec![1; rank];
    for a in (0..rank - 1).rev() {
        strides[a] = strides[a + 1] * shape[a + 1];
    }
    let mut out = Vec::with_capacity(n);
    // `idx` counts over every axis but the last; each step copies one contiguous row, reversed if the last axis flips.
    let mut idx = vec![0usize; rank - 1];
    for _ in 0..n / last {
        let src: usize =
            (0..rank - 1).map(|a| if flipped[a] { shape[a] - 1 - idx[a] } else { idx[a] } * strides[a]).sum();
        let row = &data[src..src + last];
        if flipped[rank - 1] {
            out.extend(row.iter().rev());
        } else {
            out.extend_from_slice(row);
        }
        for a in (0..rank - 1).rev() {
            idx[a] += 1;
            if idx[a] < shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    Ok(out)
}

/// Where the tiles go in a volume: tile extent and starts in padded coordinates, as (D, H, W).
struct Plan {
    /// Tile size; (1, Ph, Pw) for a 2D model.
    tile: [usize; 3],
    /// Virtual zero padding before each axis (the padded axis is max(size, tile) long).
    pad_lo: [usize; 3],
    /// Tile starts per axis, in padded coordinates.
    starts: [Vec<usize>; 3],
}

impl Plan {
    fn new(shape: [usize; 3], patch: &[usize], step_fraction: f64) -> Result<Plan> {
        let (tile, tiled_from) = match patch.len() {
            3 => ([patch[0], patch[1], patch[2]], 0),
            2 => ([1, patch[0], patch[1]], 1),
            r => bail!(Config, "sliding window: patch {patch:?} has {r} axes; 2 or 3 expected"),
        };
        let mut pad_lo = [0; 3];
        let mut starts: [Vec<usize>; 3] = [(0..shape[0]).collect(), vec![0], vec![0]];
        for a in tiled_from..3 {
            let padded = shape[a].max(tile[a]);
            pad_lo[a] = (padded - shape[a]) / 2;
            starts[a] = sliding_window_steps(padded, tile[a], step_fraction)?;
        }
        Ok(Plan { tile, pad_lo, starts })
    }

    /// Every tile's start (D, H, W), D slowest.
    fn tiles(&self) -> Vec<[usize; 3]> {
        let mut out = Vec::new();
        for &z in &self.starts[0] {
            for &y in &self.starts[1] {
                for &x in &self.starts[2] {
                    out.push([z, y, x]);
                }
            }
        }
        out
    }
}

/// The tile coordinates [lo, hi) along one axis that fall inside the image (tile coordinate t is image coordinate
/// start + t - pad_lo).
fn inside(start: usize, pad_lo: usize, size: usize, tile: usize) -> (usize, usize) {
    let lo = pad_lo.saturating_sub(start);
    let hi = (pad_lo + size).saturating_sub(start).min(tile);
    (lo, hi.max(lo))
}

/// The image voxel range and tile voxel range for one tile, per axis.
struct Overlap {
    /// Per axis: first tile coordinate inside the image, one past the last, and the image coordinate of the first.
    axes: [(usize, usize, usize); 3],
}

impl Overlap {
    fn new(plan: &Plan, start: [usize; 3], shape: [usize; 3]) -> Overlap {
        let axes = std::array::from_fn(|a| {
            let (lo, hi) = inside(start[a], plan.pad_lo[a], shape[a], plan.tile[a]);
            (lo, hi, start[a] + lo - plan.pad_lo[a])
        });
        Overlap { axes }
    }
}

/// Copies the image part of one tile (C, td, th, tw) into `dst`, which must be zero where the tile is padding.
fn cut_tile(image: &[f32], channels: usize, shape: [usize; 3], tile: [usize; 3], ov: &Overlap, dst: &mut [f32]) {
    let [(z0, z1, iz), (y0, y1, iy), (x0, x1, ix)] = ov.axes;
    let [d, h, w] = shape;
    let [td, th, tw] = tile;
    let len = x1 - x0;
    for c in 0..channels {
        for tz in z0..z1 {
            for ty in y0..y1 {
                let src = ((c * d + iz + tz - z0) * h + iy + ty - y0) * w + ix;
                let dst_row = ((c * td + tz) * th + ty) * tw + x0;
                dst[dst_row..dst_row + len].copy_from_slice(&image[src..src + len]);
            }
        }
    }
}

/// Adds `scale * g * logits` of one tile (K, td, th, tw) into the volume accumulator (K, D, H, W) and g into the
/// weight map (D, H, W), inside the image only.
#[allow(clippy::too_many_arguments)]
fn add_tile(
    acc: &mut [f32],
    weight: &mut [f32],
    logits: &[f32],
    g: &[f32],
    scale: f32,
    classes: usize,
    shape: [usize; 3],
    tile: [usize; 3],
    ov: &Overlap,
) {
    let [(z0, z1, iz), (y0, y1, iy), (x0, x1, ix)] = ov.axes;
    let [d, h, w] = shape;
    let [td, th, tw] = tile;
    let len = x1 - x0;
    let voxels = d * h * w;
    let tile_voxels = td * th * tw;
    for tz in z0..z1 {
        for ty in y0..y1 {
            let vol_row = ((iz + tz - z0) * h + iy + ty - y0) * w + ix;
            let tile_row = (tz * th + ty) * tw + x0;
            let g_row = &g[tile_row..tile_row + len];
            for (wv, gv) in weight[vol_row..vol_row + len].iter_mut().zip(g_row) {
                *wv += gv;
            }
            for k in 0..classes {
                let src = &logits[k * tile_voxels + tile_row..k * tile_voxels + tile_row + len];
                let dst = &mut acc[k * voxels + vol_row..k * voxels + vol_row + len];
                for ((a, &l), &gv) in dst.iter_mut().zip(src).zip(g_row) {
                    *a += scale * gv * l;
                }
            }
        }
    }
}

/// Runs the network on a host batch of `shape` and returns its full-resolution logits on the host.
fn run_network(
    model: &LkmUnet,
    params: &Params,
    device: &Device,
    batch: Vec<f32>,
    shape: &[usize],
) -> Result<Vec<f32>> {
    let mut x = Tensor::from_vec(batch, shape)?;
    if device.is_cpu() {
        // A float64 CPU model gets float64 input; GPU parameters are always float32.
        let dtype = params.tensors().first().map_or(DType::F32, |t| t.dtype());
        x = x.to_dtype(dtype)?;
    }
    let x = x.to_device(device)?;
    let outputs = model.forward(&mut Tape::no_grad(), params, &x)?;
    let Some(logits) = outputs.into_iter().next() else {
        bail!(Shape, "sliding window: the network returned no output for input {shape:?}");
    };
    let mut expected = shape.to_vec();
    expected[1] = model.config.num_classes;
    ensure!(
        logits.shape() == expected.as_slice(),
        Shape,
        "sliding window: network output {:?} for input {shape:?}, expected {expected:?}",
        logits.shape()
    );
    logits.to_vec_f32()
}

/// Checks the arguments shared by the prediction functions.
fn check_inputs(model: &LkmUnet, image: &[f32], channels: usize, shape: [usize; 3], cfg: &InferConfig) -> Result<()> {
    let mc = &model.config;
    ensure!(
        cfg.patch.len() == mc.spatial_rank(),
        Config,
        "sliding window: patch {:?} has {} axes but the model is {}D",
        cfg.patch,
        cfg.patch.len(),
        mc.spatial_rank()
    );
    mc.validate(&cfg.patch)?;
    ensure!(
        cfg.step_fraction > 0.0 && cfg.step_fraction <= 1.0,
        Config,
        "sliding window: step fraction must be in (0, 1], got {}",
        cfg.step_fraction
    );
    ensure!(cfg.batch >= 1, Config, "sliding window: batch must be at least 1, got {}", cfg.batch);
    ensure!(
        channels == mc.in_channels,
        Data,
        "sliding window: the image has {channels} channels but the model expects {}",
        mc.in_channels
    );
    ensure!(shape.iter().all(|&s| s > 0), Data, "sliding window: empty volume of shape {shape:?}");
    let expected = channels * shape.iter().product::<usize>();
    ensure!(
        image.len() == expected,
        Shape,
        "sliding window: the image has {} values, but {channels} channels of {shape:?} need {expected}",
        image.len()
    );
    Ok(())
}

/// The Gaussian-weighted mean logits (K, D, H, W) over all tiles (and flips) covering each voxel.
fn aggregate_logits(
    model: &LkmUnet,
    params: &Params,
    device: &Device,
    image: &[f32],
    channels: usize,
    shape: [usize; 3],
    cfg: &InferConfig,
) -> Result<Vec<f32>> {
    check_inputs(model, image, channels, shape, cfg)?;
    let classes = model.config.num_classes;
    let plan = Plan::new(shape, &cfg.patch, cfg.step_fraction)?;
    let g = gaussian_importance(&cfg.patch);
    let tile_voxels: usize = plan.tile.iter().product();
    let voxels: usize = shape.iter().product();
    let rank = cfg.patch.len();
    // Network input and output shapes per batch: (B, C, patch...) and (B, K, patch...).
    let spatial_axes: Vec<usize> = (2..2 + rank).collect();
    let flips: Vec<Vec<usize>> = if cfg.mirror {
        (0..1usize << rank)
            .map(|mask| {
                spatial_axes.iter().enumerate().filter(|(i, _)| (mask >> i) & 1 == 1).map(|(_, &a)| a).collect()
            })
            .collect()
    } else {
        vec![vec![]]
    };
    let scale = 1.0 / flips.len() as f32;

    let mut acc = vec![0.0f32; classes * voxels];
    let mut weight = vec![0.0f32; voxels];
    let tiles = plan.tiles();
    for chunk in tiles.chunks(cfg.batch) {
        let _phase = crate::profile::phase("window_batch");
        let b = chunk.len();
        let overlaps: Vec<Overlap> = chunk.iter().map(|&s| Overlap::new(&plan, s, shape)).collect();
        let mut host = vec![0.0f32; b * channels * tile_voxels];
        for (ov, dst) in overlaps.iter().zip(host.chunks_mut(channels * tile_voxels)) {
            cut_tile(image, channels, shape, plan.tile, ov, dst);
        }
        let mut in_shape = vec![b, channels];
        in_shape.extend_from_slice(&cfg.patch);
        let mut out_shape = in_shape.clone();
        out_shape[1] = classes;
        let mut summed = vec![0.0f32; b * classes * tile_voxels];
        for axes in &flips {
            let input = if axes.is_empty() { host.clone() } else { flip(&host, &in_shape, axes)? };
            let mut out = run_network(model, params, device, input, &in_shape)?;
            if !axes.is_empty() {
                out = flip(&out, &out_shape, axes)?;
            }
            for (s, o) in summed.iter_mut().zip(&out) {
                *s += o;
            }
        }
        for (ov, logits) in overlaps.iter().zip(summed.chunks(classes * tile_voxels)) {
            add_tile(&mut acc, &mut weight, logits, &g, scale, classes, shape, plan.tile, ov);
        }
    }
    for k in 0..classes {
        for (a, &wv) in acc[k * voxels..(k + 1) * voxels].iter_mut().zip(&weight) {
            *a /= wv;
        }
    }
    Ok(acc)
}

/// Voxels per block in the per-voxel reductions over classes (keeps the per-voxel scratch in cache while each
/// class plane is read contiguously).
const BLOCK: usize = 4096;

/// Class probabilities (K, D, H, W) for a volume `image` of `channels` x `shape` (C, D, H, W) row-major: the softmax
/// of the Gaussian-weighted sliding-window logits (see the module docs). Runs on `device`, where `params` must live.
pub fn predict_probabilities(
    model: &LkmUnet,
    params: &Params,
    device: &Device,
    image: &[f32],
    channels: usize,
    shape: [usize; 3],
    cfg: &InferConfig,
) -> Result<Vec<f32>> {
    let mut p = aggregate_logits(model, params, device, image, channels, shape, cfg)?;
    let classes = model.config.num_classes;
    let voxels: usize = shape.iter().product();
    let mut max = [0.0f32; BLOCK];
    let mut sum = [0.0f32; BLOCK];
    for v0 in (0..voxels).step_by(BLOCK) {
        let n = BLOCK.min(voxels - v0);
        max[..n].fill(f32::NEG_INFINITY);
        sum[..n].fill(0.0);
        for k in 0..classes {
            for (m, &z) in max[..n].iter_mut().zip(&p[k * voxels + v0..k * voxels + v0 + n]) {
                *m = m.max(z);
            }
        }
        for k in 0..classes {
            let plane = &mut p[k * voxels + v0..k * voxels + v0 + n];
            for ((z, s), &m) in plane.iter_mut().zip(&mut sum[..n]).zip(&max[..n]) {
                *z = (*z - m).exp();
                *s += *z;
            }
        }
        for k in 0..classes {
            for (z, &s) in p[k * voxels + v0..k * voxels + v0 + n].iter_mut().zip(&sum[..n]) {
                *z /= s;
            }
        }
    }
    Ok(p)
}

/// The predicted class per voxel (D, H, W): the argmax over classes of the sliding-window logits (the first class
/// wins ties).
pub fn predict_labels(
    model: &LkmUnet,
    params: &Params,
    device: &Device,
    image: &[f32],
    channels: usize,
    shape: [usize; 3],
    cfg: &InferConfig,
) -> Result<Vec<u8>> {
    let classes = model.config.num_classes;
    ensure!(classes <= 256, Config, "sliding window: {classes} classes do not fit 8-bit labels");
    let logits = aggregate_logits(model, params, device, image, channels, shape, cfg)?;
    let voxels: usize = shape.iter().product();
    let mut labels = vec![0u8; voxels];
    let mut best = logits[..voxels].to_vec();
    for k in 1..classes {
        let plane = &logits[k * voxels..(k + 1) * voxels];
        for ((b, l), &z) in best.iter_mut().zip(labels.iter_mut()).zip(plane) {
            if z > *b {
                *b = z;
                *l = k as u8;
            }
        }
    }
    Ok(labels)
}
