//! LKM-UNet (lkm-unet.md section 1): a residual U-Net encoder whose every stage is followed by a PiM and a PaM
//! bidirectional Mamba layer, and nnU-Net's decoder with deep supervision. Parameter names are the public PyTorch
//! code's `state_dict` keys (`encoder.stem.convs.0.conv.weight`, `encoder.mamba_layers.0.mamba_forw.A_log`,
//! `decoder.seg_layers.4.weight`, ...).

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::blocks::{ConvNormAct, ConvSpec, ResidualStage};
use super::init::{constant, he_normal};
use super::mamba::{BiMambaLayer, Grouping, MambaConfig};
use super::params::{ParamId, Params};
use crate::autograd::Tape;
use crate::device::Precision;
use crate::ops::cast::cast;
use crate::ops::concat::concat_channels;
use crate::ops::conv::conv;
use crate::ops::conv_transpose::conv_transpose;
use crate::ops::pim::PimLayout;
use crate::profile;
use crate::tensor::{DType, Tensor};
use crate::{bail, ensure, Result};

/// Everything that defines an LKM-UNet (stored as JSON in checkpoints).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// Input channels (modalities).
    pub in_channels: usize,
    /// Output classes, background included.
    pub num_classes: usize,
    /// Channels per stage.
    pub features: Vec<usize>,
    /// Convolution kernel per stage, per spatial axis (2 or 3 entries).
    pub kernels: Vec<Vec<usize>>,
    /// Downsampling stride per stage, per spatial axis (the first is all 1).
    pub strides: Vec<Vec<usize>>,
    /// Residual blocks per encoder stage.
    pub blocks_enc: Vec<usize>,
    /// Residual blocks per decoder stage (one fewer than stages; entry s is the level of encoder stage s).
    pub blocks_dec: Vec<usize>,
    /// Whether every decoder level emits logits (training) or only the last.
    pub deep_supervision: bool,
    /// PiM window size per stage, per spatial axis.
    pub pim_windows: Vec<Vec<usize>>,
    /// PiM grouping: adjacent windows (paper) or strided grid (public code).
    pub pim_layout: PimLayout,
    /// PaM pooling factor per stage, per spatial axis.
    pub pam_pools: Vec<Vec<usize>>,
    /// Mamba hyper-parameters.
    pub mamba: MambaConfig,
    /// The training patch size the windows were chosen for (per spatial axis).
    pub patch: Vec<usize>,
}

/// The public code's PiM base factor for stage s of n: `2^((n - s + 1) // 2 - 1)` ((n - s + 1) // 2 = ceil((n - s) / 2)).
pub(crate) fn pim_base(n: usize, s: usize) -> usize {
    1 << ((n - s).div_ceil(2) - 1)
}

/// The public code's PaM pooling factor for stage s of n: `2^((n - s + 1) / 2) / 2`.
pub(crate) fn pam_factor(n: usize, s: usize) -> usize {
    (1 << (n - s).div_ceil(2)) / 2
}

impl ModelConfig {
    /// The 3D reference configuration (FLARE22 abdomen CT, nnU-Net 3d_fullres): patch 40 x 224 x 192, 14 classes.
    pub fn flare_3d() -> ModelConfig {
        let n = 6;
        let mut strides = vec![vec![1, 1, 1], vec![1, 2, 2]];
        strides.extend([vec![2, 2, 2], vec![2, 2, 2], vec![1, 2, 2], vec![1, 2, 2]]);
        let mut kernels = vec![vec![1, 3, 3]];
        kernels.extend(vec![vec![3, 3, 3]; n - 1]);
        ModelConfig {
            in_channels: 1,
            num_classes: 14,
            features: vec![32, 64, 128, 256, 320, 320],
            kernels,
            strides,
            blocks_enc: vec![2; n],
            blocks_dec: vec![2; n - 1],
            deep_supervision: true,
            pim_windows: (0..n).map(|s| [5, 7, 6].iter().map(|p| p * pim_base(n, s)).collect()).collect(),
            pim_layout: PimLayout::Window,
            pam_pools: (0..n).map(|s| vec![pam_factor(n, s); 3]).collect(),
            mamba: MambaConfig::default(),
            patch: vec![40, 224, 192],
        }
    }

    /// The 2D reference configuration (AMOS abdomen MR): 7 stages, patch 320 x 320, 14 classes.
    pub fn amos_2d() -> ModelConfig {
        let n = 7;
        let mut strides = vec![vec![1, 1]];
        strides.extend(vec![vec![2, 2]; n - 1]);
        ModelConfig {
            in_channels: 1,
            num_classes: 14,
            features: vec![32, 64, 128, 256, 512, 512, 512],
            kernels: vec![vec![3, 3]; n],
            strides,
            blocks_enc: vec![2; n],
            blocks_dec: vec![2; n - 1],
            deep_supervision: true,
            pim_windows: (0..n).map(|s| vec![5 * pim_base(n, s); 2]).collect(),
            pim_layout: PimLayout::Window,
            pam_pools: (0..n).map(|s| vec![pam_factor(n, s); 2]).collect(),
            mamba: MambaConfig::default(),
            patch: vec![320, 320],
        }
    }

    /// A small 3D model for CPU training on the synthetic phantoms: 4 stages, 8-64 features, patch 32^3.
    pub fn tiny_3d() -> ModelConfig {
        ModelConfig {
            in_channels: 1,
            num_classes: 4,
            features: vec![8, 16, 32, 64],
            kernels: vec![vec![3, 3, 3]; 4],
            strides: vec![vec![1, 1, 1], vec![2, 2, 2], vec![2, 2, 2], vec![2, 2, 2]],
            blocks_enc: vec![1, 1, 1, 1],
            blocks_dec: vec![1, 1, 1],
            deep_supervision: true,
            pim_windows: vec![vec![4, 4, 4], vec![4, 4, 4], vec![2, 2, 2], vec![2, 2, 2]],
            pim_layout: PimLayout::Window,
            pam_pools: vec![vec![4, 4, 4], vec![2, 2, 2], vec![1, 1, 1], vec![1, 1, 1]],
            mamba: MambaConfig { d_state: 8, d_conv: 4, expand: 2, recompute: false },
            patch: vec![32, 32, 32],
        }
    }

    /// A built-in configuration by name: `flare-3d`, `amos-2d` or `tiny-3d`.
    pub fn by_name(name: &str) -> Result<ModelConfig> {
        match name {
            "flare-3d" => Ok(ModelConfig::flare_3d()),
            "amos-2d" => Ok(ModelConfig::amos_2d()),
            "tiny-3d" => Ok(ModelConfig::tiny_3d()),
            _ => bail!(Config, "unknown model configuration {name:?}: choose flare-3d, amos-2d or tiny-3d"),
        }
    }

    /// The number of spatial axes.
    pub fn spatial_rank(&self) -> usize {
        self.patch.len()
    }

    /// The feature-map size of each stage for an input of `size` (per spatial axis): stride-2 convs with padding
    /// k/2 give ceil(size / stride).
    pub fn stage_sizes(&self, size: &[usize]) -> Vec<Vec<usize>> {
        let mut cur = size.to_vec();
        self.strides
            .iter()
            .map(|st| {
                cur = cur.iter().zip(st).map(|(c, s)| c.div_ceil(*s)).collect();
                cur.clone()
            })
            .collect()
    }

    /// Every convolution of one forward pass at batch `batch` and the configuration's patch, as the benchmarks rebuild
    /// them: the stem, each residual block's two convolutions and 1x1 skip projection, the transposed convolutions and
    /// the segmentation heads (those of every decoder level with deep supervision), in network order, each distinct
    /// shape once with the number of layers that have it.
    pub fn convolutions(&self, batch: usize) -> Vec<ConvUse> {
        let n = self.features.len();
        let f = &self.features;
        let sizes = self.stage_sizes(&self.patch);
        let mut list = ConvList { batch, ones: vec![1; self.spatial_rank()], all: Vec::new() };
        let ones = list.ones.clone();
        let stem = [&[f[0], self.in_channels][..], &self.kernels[0]].concat();
        list.push("encoder.stem.convs.0".into(), &self.patch, stem, &ones, ConvKind::Conv);
        for s in 0..n {
            let (cin, input) = if s == 0 { (f[0], &self.patch) } else { (f[s - 1], &sizes[s - 1]) };
            let maps = (&input[..], &sizes[s][..]);
            let prefix = format!("encoder.stages.{s}");
            list.stage(&prefix, self.blocks_enc[s], (cin, f[s]), maps, &self.kernels[s], &self.strides[s]);
        }
        for i in 0..n - 1 {
            let s = n - 2 - i;
            let k = &self.strides[s + 1];
            let up = [&[f[s + 1], f[s]][..], k].concat();
            list.push(format!("decoder.transpconvs.{i}"), &sizes[s + 1], up, k, ConvKind::Transposed);
            let maps = (&sizes[s][..], &sizes[s][..]);
            list.stage(
                &format!("decoder.stages.{i}"),
                self.blocks_dec[s],
                (2 * f[s], f[s]),
                maps,
                &self.kernels[s],
                &ones,
            );
            if self.deep_supervision || i == n - 2 {
                let head = [&[self.num_classes, f[s]][..], &ones].concat();
                list.push(format!("decoder.seg_layers.{i}"), &sizes[s], head, &ones, ConvKind::Head);
            }
        }
        list.all
    }

    /// The spatial sizes of the network's outputs for an input of `size`: one per decoder level, highest
    /// resolution first, with deep supervision; otherwise only the full resolution.
    pub fn output_sizes(&self, size: &[usize]) -> Vec<Vec<usize>> {
        let mut sizes = self.stage_sizes(size);
        sizes.pop();
        if !self.deep_supervision {
            sizes.truncate(1);
        }
        sizes
    }

    /// Checks the configuration's internal consistency and that every PiM window and PaM factor divides its stage's
    /// map for a patch of `size`, naming the stage, axis and sizes otherwise.
    pub fn validate(&self, size: &[usize]) -> Result<()> {
        let n = self.features.len();
        let r = self.spatial_rank();
        ensure!(n >= 2, Config, "a U-Net needs at least 2 stages, got {n}");
        for (what, len) in [
            ("kernels", self.kernels.len()),
            ("strides", self.strides.len()),
            ("blocks_enc", self.blocks_enc.len()),
            ("pim_windows", self.pim_windows.len()),
            ("pam_pools", self.pam_pools.len()),
        ] {
            ensure!(len == n, Config, "{what} has {len} entries for {n} stages");
        }
        ensure!(
            self.blocks_dec.len() == n - 1,
            Config,
            "blocks_dec needs {} entries, got {}",
            n - 1,
            self.blocks_dec.len()
        );
        ensure!(size.len() == r, Config, "patch {size:?} has {} axes, the model {r}", size.len());
        let mut input = size.to_vec();
        for (s, sizes) in self.stage_sizes(size).iter().enumerate() {
            for (a, (&len, &st)) in input.iter().zip(&self.strides[s]).enumerate() {
                ensure!(
                    len % st == 0,
                    Config,
                    "stage {s}: stride {st} does not divide axis {a} of size {len} (patch {size:?}): the decoder could not \
                     restore the size; choose a patch divisible by the product of the strides"
                );
            }
            input = sizes.clone();
            for (what, v) in [
                ("kernel", &self.kernels[s]),
                ("stride", &self.strides[s]),
                ("PiM window", &self.pim_windows[s]),
                ("PaM pool", &self.pam_pools[s]),
            ] {
                ensure!(v.len() == r, Config, "stage {s}: {what} {v:?} does not have {r} axes");
            }
            let axes = if r == 3 { ["D", "H", "W"].as_slice() } else { ["H", "W"].as_slice() };
            for (a, &len) in sizes.iter().enumerate() {
                let w = self.pim_windows[s][a];
                ensure!(
                    len % w == 0,
                    Config,
                    "PiM stage {s}: window {w} does not divide axis {} of size {len} (stage map {sizes:?}, patch {size:?})",
                    axes[a]
                );
                let f = self.pam_pools[s][a];
                ensure!(
                    len % f == 0,
                    Config,
                    "PaM stage {s}: pooling factor {f} does not divide axis {} of size {len} (stage map {sizes:?}, patch {size:?})",
                    axes[a]
                );
            }
        }
        Ok(())
    }
}

/// What a convolution of [`ModelConfig::convolutions`] is in the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKind {
    /// A block's (or the stem's) convolution, with bias, before an InstanceNorm.
    Conv,
    /// A residual block's 1x1 skip projection (no bias).
    Projection,
    /// A decoder level's transposed convolution (kernel = stride), with bias.
    Transposed,
    /// A segmentation head (1x1, with bias).
    Head,
}

/// One distinct convolution shape of a forward pass ([`ModelConfig::convolutions`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvUse {
    /// The first layer with this shape (its parameter prefix, e.g. `encoder.stages.1.blocks.0.conv1`).
    pub layer: String,
    /// The input map (N, C, spatial...).
    pub input: Vec<usize>,
    /// The weight: (Cout, Cin, kernel...), or (Cin, Cout, kernel...) for a transposed convolution.
    pub weight: Vec<usize>,
    /// The stride per spatial axis (for a transposed convolution: its kernel, by which it upsamples).
    pub stride: Vec<usize>,
    /// Which kind of layer it is.
    pub kind: ConvKind,
    /// How many layers of one forward pass have exactly this shape.
    pub count: usize,
}

impl ConvUse {
    /// Whether the layer has a bias (all but the skip projections).
    pub fn bias(&self) -> bool {
        self.kind != ConvKind::Projection
    }

    /// Multiply-adds x 2 of the forward pass (also of each gradient pass): 2 N prod(output) Cout Cin prod(kernel).
    pub fn flops(&self) -> f64 {
        let (n, sp) = (self.input[0] as f64, &self.input[2..]);
        let k: usize = self.weight[2..].iter().product();
        let positions: f64 = match self.kind {
            // Each input position meets every tap once.
            ConvKind::Transposed => sp.iter().product::<usize>() as f64,
            _ => sp.iter().zip(&self.stride).map(|(&l, &s)| l.div_ceil(s)).product::<usize>() as f64,
        };
        2.0 * n * positions * (self.weight[0] * self.weight[1] * k) as f64
    }
}

/// The convolutions of [`ModelConfig::convolutions`] as they are listed: each distinct shape once, with its count.
struct ConvList {
    batch: usize,
    ones: Vec<usize>,
    all: Vec<ConvUse>,
}

impl ConvList {
    /// Adds a layer reading a map of spatial size `size` with `weight` (whose second axis is the input's channels,
    /// first for a transposed convolution).
    fn push(&mut self, layer: String, size: &[usize], weight: Vec<usize>, stride: &[usize], kind: ConvKind) {
        let cin = if kind == ConvKind::Transposed { weight[0] } else { weight[1] };
        let input = [&[self.batch, cin][..], size].concat();
        let same = |c: &&mut ConvUse| c.input == input && c.weight == weight && c.stride == stride && c.kind == kind;
        match self.all.iter_mut().find(same) {
            Some(c) => c.count += 1,
            None => self.all.push(ConvUse { layer, input, weight, stride: stride.to_vec(), kind, count: 1 }),
        }
    }

    /// A residual stage (blocks.rs): block 0 takes `cin` channels at the `maps.0` size with `stride`, the others
    /// `cout` at `maps.1`; each has conv1, conv2 and, where the channels change, a 1x1 skip projection.
    fn stage(
        &mut self,
        prefix: &str,
        blocks: usize,
        (cin, cout): (usize, usize),
        maps: (&[usize], &[usize]),
        kernel: &[usize],
        stride: &[usize],
    ) {
        let ones = self.ones.clone();
        for b in 0..blocks {
            let (ci, st, size) = if b == 0 { (cin, stride, maps.0) } else { (cout, &ones[..], maps.1) };
            let p = format!("{prefix}.blocks.{b}");
            self.push(format!("{p}.conv1"), size, [&[cout, ci][..], kernel].concat(), st, ConvKind::Conv);
            self.push(format!("{p}.conv2"), maps.1, [&[cout, cout][..], kernel].concat(), &ones, ConvKind::Conv);
            if ci != cout {
                let skip = format!("{p}.skip.{}", usize::from(st.iter().any(|&s| s != 1)));
                self.push(skip, maps.1, [&[cout, ci][..], &ones].concat(), &ones, ConvKind::Projection);
            }
        }
    }
}

struct DecoderLevel {
    transp_w: ParamId,
    transp_b: ParamId,
    stage: ResidualStage,
    seg_w: ParamId,
    seg_b: ParamId,
}

/// An LKM-UNet: its configuration, the layer structure and (separately) its parameters.
pub struct LkmUnet {
    /// The configuration it was built from.
    pub config: ModelConfig,
    stem: ConvNormAct,
    stages: Vec<ResidualStage>,
    pim: Vec<BiMambaLayer>,
    pam: Vec<BiMambaLayer>,
    /// Index 0 is the deepest level (the public code's `decoder.stages.0`).
    decoder: Vec<DecoderLevel>,
}

impl LkmUnet {
    /// Builds the network and its freshly initialised float32 CPU parameters (nnU-Net He init, Mamba init).
    pub fn new(config: ModelConfig, seed: u64) -> Result<(LkmUnet, Params)> {
        config.validate(&config.patch)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = Params::new();
        let c = &config;
        let n = c.features.len();
        let ones = vec![1; c.spatial_rank()];
        let stem_spec = ConvSpec {
            cin: c.in_channels,
            cout: c.features[0],
            kernel: &c.kernels[0],
            stride: &ones,
            bias: true,
            act: true,
            norm_scale: 1.0,
        };
        let stem = ConvNormAct::new(&mut p, "encoder.stem.convs.0", stem_spec, &mut rng);
        let mut stages = Vec::new();
        let mut pim = Vec::new();
        let mut pam = Vec::new();
        for s in 0..n {
            let cin = if s == 0 { c.features[0] } else { c.features[s - 1] };
            let prefix = format!("encoder.stages.{s}");
            stages.push(ResidualStage::new(
                &mut p,
                &prefix,
                c.blocks_enc[s],
                cin,
                c.features[s],
                &c.kernels[s],
                &c.strides[s],
                &mut rng,
            ));
            let pixel = Grouping::Pixel { window: c.pim_windows[s].clone(), layout: c.pim_layout };
            pim.push(BiMambaLayer::new(
                &mut p,
                &format!("encoder.mamba_layers.{s}"),
                c.features[s],
                pixel,
                c.mamba,
                &mut rng,
            ));
            let patch = Grouping::Patch { pool: c.pam_pools[s].clone() };
            pam.push(BiMambaLayer::new(
                &mut p,
                &format!("encoder.w_mamba_layers.{s}"),
                c.features[s],
                patch,
                c.mamba,
                &mut rng,
            ));
        }
        let mut decoder = Vec::new();
        for i in 0..n - 1 {
            // Decoder stage i works at encoder level s = n - 2 - i, upsampling from level s + 1.
            let s = n - 2 - i;
            let (below, skip) = (c.features[s + 1], c.features[s]);
            let k = &c.strides[s + 1];
            let mut wshape = vec![below, skip];
            wshape.extend_from_slice(k);
            // PyTorch's fan_in of a transposed conv weight (Cin, Cout, k...) is Cout * prod(k).
            let fan_in = skip * k.iter().product::<usize>();
            let transp_w = p.add(format!("decoder.transpconvs.{i}.weight"), he_normal(&wshape, fan_in, &mut rng));
            let transp_b = p.add(format!("decoder.transpconvs.{i}.bias"), constant(&[skip], 0.0));
            let stage = ResidualStage::new(
                &mut p,
                &format!("decoder.stages.{i}"),
                c.blocks_dec[s],
                2 * skip,
                skip,
                &c.kernels[s],
                &ones,
                &mut rng,
            );
            let mut seg_shape = vec![c.num_classes, skip];
            seg_shape.extend_from_slice(&ones);
            let seg_w = p.add(format!("decoder.seg_layers.{i}.weight"), he_normal(&seg_shape, skip, &mut rng));
            let seg_b = p.add(format!("decoder.seg_layers.{i}.bias"), constant(&[c.num_classes], 0.0));
            decoder.push(DecoderLevel { transp_w, transp_b, stage, seg_w, seg_b });
        }
        Ok((LkmUnet { config, stem, stages, pim, pam, decoder }, p))
    }

    /// Logits for an input batch (N, in_channels, spatial...): with deep supervision one per decoder level, highest
    /// resolution first (the full-resolution output is element 0); otherwise just the full-resolution one.
    pub fn forward(&self, tape: &mut Tape, p: &Params, x: &Tensor) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let spatial = &x.shape()[2..];
        ensure!(
            x.rank() == c.spatial_rank() + 2 && x.shape()[1] == c.in_channels,
            Shape,
            "LKM-UNet expects input (N, {}, {} spatial axes), got {:?}",
            c.in_channels,
            c.spatial_rank(),
            x.shape()
        );
        c.validate(spatial)?;
        let x_dtype = x.dtype();
        // The run's precision (crate::device::Precision): bf16 activations from here to the logits, which return to
        // float32 for the losses, the softmax of inference and the metrics.
        let x = &cast(tape, x, activation_dtype(x))?;
        let mut h = self.stem.forward(tape, p, x)?;
        let mut skips = Vec::new();
        for s in 0..self.stages.len() {
            h = self.stages[s].forward(tape, p, &h)?;
            h = self.pim[s].forward(tape, p, &h)?;
            h = self.pam[s].forward(tape, p, &h)?;
            skips.push(h.clone());
        }
        let mut outputs = Vec::new();
        let mut below = skips.pop().expect("at least two stages");
        let last = self.decoder.len() - 1;
        for (i, level) in self.decoder.iter().enumerate() {
            let up = {
                let _layer = profile::layer(&format!("decoder.transpconvs.{i}"));
                conv_transpose(tape, &below, p.get(level.transp_w), Some(p.get(level.transp_b)))?
            };
            let skip = skips.pop().expect("one skip per decoder level");
            let cat = {
                let _layer = profile::layer(&format!("decoder.stages.{i}"));
                concat_channels(tape, &[&up, &skip])?
            };
            below = level.stage.forward(tape, p, &cat)?;
            if c.deep_supervision || i == last {
                let _layer = profile::layer(&format!("decoder.seg_layers.{i}"));
                let ones = vec![1; c.spatial_rank()];
                outputs.push(conv(tape, &below, p.get(level.seg_w), Some(p.get(level.seg_b)), &ones)?);
            }
        }
        outputs.reverse();
        outputs.iter().map(|o| cast(tape, o, x_dtype)).collect()
    }
}

/// The storage type of the network's activations for an input `x`: bf16 when its device runs in bf16
/// ([`Precision`]), else the input's own (float32, or float64 for the CPU checks).
fn activation_dtype(x: &Tensor) -> DType {
    match x.device().precision() {
        Precision::Bf16 => DType::BF16,
        Precision::Fp32 => x.dtype(),
    }
}
