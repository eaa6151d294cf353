//! nnU-Net's convolution blocks (dynamic_network_architectures), with the public code's parameter names.
//!
//! - [`ConvNormAct`] (`ConvDropoutNormReLU`): `y = act(IN(conv(x)))`, act = LeakyReLU(0.01) or none (fused into the
//!   norm op, which recomputes its input in the backward pass instead of storing it).
//!   Kept for the backward pass: the conv's input and output (the norm's input), and the norm's statistics.
//! - [`ResidualBlock`] (`BasicBlockD`): `y = LReLU(IN(conv2(LReLU(IN(conv1_stride(x))))) + skip(x))` where
//!   `skip = [AvgPool(stride)] -> [conv 1x1 (no bias) -> IN]` when the stride is not 1 / the channels change.
//!   The second IN starts with scale 0, so every block starts as its shortcut (nnU-Net's
//!   init_last_bn_before_add_to_0). conv2 rebuilds its input, conv1's normalised map, in its backward pass
//!   ([`Normalized`]), so a block keeps three maps of its width: the two conv outputs and its output. The second IN,
//!   the sum and the LeakyReLU are one op ([`instance_norm_add_act`]), which writes only the block's output.

use rand::rngs::StdRng;

use super::init::{constant, he_normal};
use super::params::{ParamId, Params};
use crate::autograd::Tape;
use crate::ops::activation::Activation;
use crate::ops::avg_pool::avg_pool;
use crate::ops::conv::conv;
use crate::ops::instance_norm::{instance_norm_add_act, Normalized, IN_EPS};
use crate::ops::operand::Operand;
use crate::profile;
use crate::tensor::Tensor;
use crate::{ensure, Result};

/// conv -> InstanceNorm -> optional LeakyReLU.
pub struct ConvNormAct {
    prefix: String,
    weight: ParamId,
    bias: Option<ParamId>,
    norm_w: ParamId,
    norm_b: ParamId,
    stride: Vec<usize>,
    act: bool,
}

/// What a [`ConvNormAct`] is: channels, kernel and stride per axis, whether it has a conv bias and a nonlinearity.
pub struct ConvSpec<'a> {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel size per spatial axis.
    pub kernel: &'a [usize],
    /// Stride per spatial axis.
    pub stride: &'a [usize],
    /// Whether the convolution has a bias.
    pub bias: bool,
    /// Whether LeakyReLU follows the norm.
    pub act: bool,
    /// The initial IN scale (1, or 0 for the last norm of a residual branch).
    pub norm_scale: f64,
}

impl ConvNormAct {
    /// Registers `{prefix}.conv.weight`, `{prefix}.conv.bias`, `{prefix}.norm.weight`, `{prefix}.norm.bias`.
    pub fn new(params: &mut Params, prefix: &str, spec: ConvSpec, rng: &mut StdRng) -> ConvNormAct {
        let mut shape = vec![spec.cout, spec.cin];
        shape.extend_from_slice(spec.kernel);
        let fan_in = spec.cin * spec.kernel.iter().product::<usize>();
        let weight = params.add(format!("{prefix}.conv.weight"), he_normal(&shape, fan_in, rng));
        let bias = spec.bias.then(|| params.add(format!("{prefix}.conv.bias"), constant(&[spec.cout], 0.0)));
        let norm_w = params.add(format!("{prefix}.norm.weight"), constant(&[spec.cout], spec.norm_scale));
        let norm_b = params.add(format!("{prefix}.norm.bias"), constant(&[spec.cout], 0.0));
        ConvNormAct { prefix: prefix.into(), weight, bias, norm_w, norm_b, stride: spec.stride.to_vec(), act: spec.act }
    }

    /// `act(IN(conv(x)))`.
    pub fn forward<'a>(&self, tape: &mut Tape, p: &Params, x: impl Into<Operand<'a>>) -> Result<Tensor> {
        Ok(self.normalized(tape, p, x)?.value().clone())
    }

    /// `LeakyReLU(IN(conv(x)) + skip)`, the norm, the sum and the activation as one op ([`instance_norm_add_act`]): a
    /// residual block's second conv (which has no activation of its own) and the block's end.
    pub fn forward_add_act<'a>(
        &self,
        tape: &mut Tape,
        p: &Params,
        x: impl Into<Operand<'a>>,
        skip: &Tensor,
    ) -> Result<Tensor> {
        ensure!(!self.act, Config, "{}: forward_add_act is for a conv block without an activation", self.prefix);
        let _layer = profile::layer(&self.prefix);
        let y = conv(tape, x, p.get(self.weight), self.bias.map(|b| p.get(b)), &self.stride)?;
        instance_norm_add_act(tape, &y, p.get(self.norm_w), p.get(self.norm_b), IN_EPS, skip, Activation::LeakyRelu)
    }

    /// [`ConvNormAct::forward`] for a block whose output only a convolution reads: that convolution takes it as an
    /// [`Operand::Normalized`] and rebuilds it in its backward pass instead of keeping it.
    pub fn normalized<'a>(&self, tape: &mut Tape, p: &Params, x: impl Into<Operand<'a>>) -> Result<Normalized> {
        let _layer = profile::layer(&self.prefix);
        let y = conv(tape, x, p.get(self.weight), self.bias.map(|b| p.get(b)), &self.stride)?;
        let act = self.act.then_some(Activation::LeakyRelu);
        Normalized::new(tape, &y, p.get(self.norm_w), p.get(self.norm_b), IN_EPS, act)
    }
}

/// nnU-Net's BasicBlockD.
pub struct ResidualBlock {
    prefix: String,
    conv1: ConvNormAct,
    conv2: ConvNormAct,
    pool: Option<Vec<usize>>,
    projection: Option<ConvNormAct>,
}

impl ResidualBlock {
    /// Registers the block under `prefix` (e.g. `encoder.stages.1.blocks.0`).
    pub fn new(
        params: &mut Params,
        prefix: &str,
        cin: usize,
        cout: usize,
        kernel: &[usize],
        stride: &[usize],
        rng: &mut StdRng,
    ) -> ResidualBlock {
        let ones = vec![1; kernel.len()];
        let spec = |cin, stride, act, norm_scale| ConvSpec { cin, cout, kernel, stride, bias: true, act, norm_scale };
        let conv1 = ConvNormAct::new(params, &format!("{prefix}.conv1"), spec(cin, stride, true, 1.0), rng);
        let conv2 = ConvNormAct::new(params, &format!("{prefix}.conv2"), spec(cout, &ones, false, 0.0), rng);
        let pool = stride.iter().any(|&s| s != 1).then(|| stride.to_vec());
        // The skip path is an nn.Sequential: [pool], [projection]; the projection's index is 1 after a pool.
        let projection = (cin != cout).then(|| {
            let index = usize::from(pool.is_some());
            let spec = ConvSpec { cin, cout, kernel: &ones, stride: &ones, bias: false, act: false, norm_scale: 1.0 };
            ConvNormAct::new(params, &format!("{prefix}.skip.{index}"), spec, rng)
        });
        ResidualBlock { prefix: prefix.into(), conv1, conv2, pool, projection }
    }

    /// `LReLU(branch(x) + skip(x))`.
    pub fn forward(&self, tape: &mut Tape, p: &Params, x: &Tensor) -> Result<Tensor> {
        let _layer = profile::layer(&self.prefix);
        // conv2 keeps what makes conv1's output (conv1's conv output and norm statistics, which conv1's norm keeps
        // anyway), not the output itself.
        let y = self.conv1.normalized(tape, p, x)?;
        let mut skip = match &self.pool {
            Some(f) => avg_pool(tape, x, f)?,
            None => x.clone(),
        };
        if let Some(proj) = &self.projection {
            skip = proj.forward(tape, p, &skip)?;
        }
        self.conv2.forward_add_act(tape, p, &y, &skip)
    }
}

/// A stage: `n` residual blocks, the first one strided and changing channels (`StackedResidualBlocks`).
pub struct ResidualStage {
    blocks: Vec<ResidualBlock>,
}

impl ResidualStage {
    /// Registers `{prefix}.blocks.{i}` for i < n.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        params: &mut Params,
        prefix: &str,
        n: usize,
        cin: usize,
        cout: usize,
        kernel: &[usize],
        stride: &[usize],
        rng: &mut StdRng,
    ) -> ResidualStage {
        let ones = vec![1; kernel.len()];
        let blocks = (0..n)
            .map(|i| {
                let (ci, s) = if i == 0 { (cin, stride) } else { (cout, ones.as_slice()) };
                ResidualBlock::new(params, &format!("{prefix}.blocks.{i}"), ci, cout, kernel, s, rng)
            })
            .collect();
        ResidualStage { blocks }
    }

    /// Runs the blocks in order.
    pub fn forward(&self, tape: &mut Tape, p: &Params, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for b in &self.blocks {
            y = b.forward(tape, p, &y)?;
        }
        Ok(y)
    }
}
