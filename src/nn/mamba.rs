//! The Mamba layers of LKM-UNet (lkm-unet.md sections 2 and 3).
//!
//! A [`Mamba`] block (Mamba v1 without its out_proj) maps tokens u (G, L, d_model) to (G, L, d_inner):
//! ```text
//!   [x, z] = in_proj(u)                      d_model -> 2 d_inner (x and z from the two halves of its weight's rows)
//!   x      = SiLU(causal_conv1d(x))          kernel d_conv, per channel (one op, causal_conv1d_silu)
//!   [dt, B, C] = x_proj(x)                   d_inner -> dt_rank + 2 d_state
//!   delta  = dt_proj.weight @ dt             dt_rank -> d_inner (its bias is the scan's delta_bias)
//!   y      = selective_scan(x, delta, A_log, B, C, D, z, dt_proj.bias)
//! ```
//! A [`BiMambaLayer`] runs two blocks over LayerNorm'd tokens, one on the reversed sequence, and projects their sum
//! back with one shared out_proj: `out = x + ungroup(out_proj(fwd(t) + flip(bwd(flip(t)))))`, t = LN(group(x)); the
//! flips are not copies: bwd's conv1d and scan walk t's sequences from their last token ([`Order::Reversed`]).
//! PiM groups pixels into windows ([`Grouping::Pixel`]); PaM averages r^3 patches, runs one sequence per sample
//! over the pooled map and upsamples back ([`Grouping::Patch`]).

use rand::rngs::StdRng;
use rand::RngExt;

use super::init::{constant, default_uniform};
use super::params::{ParamId, Params};
use crate::autograd::checkpoint::checkpoint;
use crate::autograd::Tape;
use crate::ops::add::add;
use crate::ops::avg_pool::avg_pool;
use crate::ops::causal_conv1d::causal_conv1d_silu;
use crate::ops::concat::concat_channels;
use crate::ops::flip::Order;
use crate::ops::layer_norm::{layer_norm, LN_EPS};
use crate::ops::linear::{linear, Product};
use crate::ops::narrow::narrow;
use crate::ops::operand::Operand;
use crate::ops::pim::{merge, Partitioned, PimLayout};
use crate::ops::reshape::reshape;
use crate::ops::selective_scan::{selective_scan, Columns, ScanInputs};
use crate::ops::upsample::upsample_nearest;
use crate::profile;
use crate::tensor::{DType, Tensor};
use crate::{ensure, Result};

/// Mamba's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MambaConfig {
    /// State size N per channel (16).
    pub d_state: usize,
    /// Causal conv kernel (4).
    pub d_conv: usize,
    /// d_inner = expand * d_model (2).
    pub expand: usize,
    /// Recompute in the backward pass, instead of keeping, each block's input branch (in_proj's x half, a (G, L,
    /// d_inner) intermediate, and the causal conv1d with SiLU) and its scan (the scan's per-chunk states), as two
    /// [`checkpoint`]s (`--recompute mamba`): less memory, the same gradients; per block one more small product,
    /// conv1d and scan forward. Off by default. (in_proj's halves and delta are never kept: the ops that take them
    /// rebuild them, see [`Product`].)
    #[serde(default)]
    pub recompute: bool,
}

impl Default for MambaConfig {
    fn default() -> Self {
        MambaConfig { d_state: 16, d_conv: 4, expand: 2, recompute: false }
    }
}

/// One Mamba v1 block without out_proj.
pub struct Mamba {
    prefix: String,
    d_inner: usize,
    dt_rank: usize,
    d_state: usize,
    d_conv: usize,
    in_proj: ParamId,
    conv_w: ParamId,
    conv_b: ParamId,
    x_proj: ParamId,
    dt_proj_w: ParamId,
    dt_proj_b: ParamId,
    a_log: ParamId,
    d_skip: ParamId,
    /// [`MambaConfig::recompute`].
    recompute: bool,
}

impl Mamba {
    /// Registers the block's parameters under `prefix` (e.g. `encoder.mamba_layers.0.mamba_forw`), initialised as
    /// mamba_ssm does.
    pub fn new(params: &mut Params, prefix: &str, d_model: usize, cfg: MambaConfig, rng: &mut StdRng) -> Mamba {
        let d_inner = cfg.expand * d_model;
        let dt_rank = d_model.div_ceil(16);
        let n = cfg.d_state;
        let name = |s: &str| format!("{prefix}.{s}");
        let in_proj = params.add(name("in_proj.weight"), default_uniform(&[2 * d_inner, d_model], d_model, rng));
        let conv_w = params.add(name("conv1d.weight"), default_uniform(&[d_inner, 1, cfg.d_conv], cfg.d_conv, rng));
        let conv_b = params.add(name("conv1d.bias"), default_uniform(&[d_inner], cfg.d_conv, rng));
        let x_proj = params.add(name("x_proj.weight"), default_uniform(&[dt_rank + 2 * n, d_inner], d_inner, rng));
        let std = (dt_rank as f64).powf(-0.5);
        let dt_w = Tensor::uniform(&[d_inner, dt_rank], -std, std, DType::F32, rng).expect("valid shape");
        let dt_proj_w = params.add(name("dt_proj.weight"), dt_w);
        // dt ~ exp(U(ln 1e-3, ln 1e-1)) floored at 1e-4; the bias is its inverse softplus, dt + ln(1 - e^-dt).
        let (lo, hi) = (1e-3f64.ln(), 1e-1f64.ln());
        let inv_softplus: Vec<f32> = (0..d_inner)
            .map(|_| {
                let dt = (lo + (hi - lo) * rng.random::<f64>()).exp().max(1e-4);
                (dt + (-(-dt).exp_m1()).ln()) as f32
            })
            .collect();
        let dt_proj_b = params.add(name("dt_proj.bias"), Tensor::from_vec(inv_softplus, &[d_inner]).expect("shape"));
        let a: Vec<f32> = (0..d_inner * n).map(|i| ((i % n + 1) as f32).ln()).collect();
        let a_log = params.add(name("A_log"), Tensor::from_vec(a, &[d_inner, n]).expect("shape"));
        let d_skip = params.add(name("D"), constant(&[d_inner], 1.0));
        Mamba {
            prefix: prefix.into(),
            d_inner,
            dt_rank,
            d_state: n,
            d_conv: cfg.d_conv,
            in_proj,
            conv_w,
            conv_b,
            x_proj,
            dt_proj_w,
            dt_proj_b,
            a_log,
            d_skip,
            recompute: cfg.recompute,
        }
    }

    /// Tokens u (G, L, d_model) to y (G, L, d_inner), each sequence walked in `order`: [`Order::Reversed`] is the
    /// block on the reversed sequences, written back in stored order (its conv1d and scan walk the tokens backwards;
    /// the projections are per token), `flip_seq(forward(flip_seq(u)))` without the copies.
    pub fn forward(&self, tape: &mut Tape, p: &Params, u: &Tensor, order: Order) -> Result<Tensor> {
        let _layer = profile::layer(&self.prefix);
        let (di, r, n) = (self.d_inner, self.dt_rank, self.d_state);
        // in_proj's output [x, z] is split by splitting its weight (2 d_inner, d_model) into the rows that make x and
        // those that make z: x = u W[0..di]^T, z = u W[di..2di]^T are the same dot products as the columns of
        // u W^T, but neither the (G, L, 2 d_inner) product nor copies of its halves are ever made, and the gradients
        // of x and z flow back without a zero-filled (G, L, 2 d_inner) gradient. The tape adds the two row slices'
        // gradients into W's, and the two products' gradients into u's.
        let rows = |tape: &mut Tape, start| narrow(tape, p.get(self.in_proj), 0, start, di);
        // The input branch x = SiLU(conv1d(u W[0..di]^T)): one op that makes in_proj's x half itself and keeps u and
        // the weight rows instead of it (Operand::Product), rebuilding the product in its backward pass. As a
        // checkpoint (recompute) it keeps nothing more and reruns the product and the conv in the backward pass.
        let w_rows = {
            let _layer = profile::sublayer(&self.prefix, "in_proj");
            rows(tape, 0)?
        };
        let conv_w = {
            let _layer = profile::sublayer(&self.prefix, "conv1d");
            reshape(tape, p.get(self.conv_w), &[di, self.d_conv])?
        };
        let prefix = self.prefix.clone();
        let branch = move |t: &mut Tape, v: &[Tensor]| {
            let x = {
                let _layer = profile::sublayer(&prefix, "in_proj");
                Product::new(t, &v[0], &v[1])?
            };
            let _layer = profile::sublayer(&prefix, "conv1d");
            causal_conv1d_silu(t, Operand::Product(&x), &v[2], &v[3], order)
        };
        let inputs = [u, &w_rows, &conv_w, p.get(self.conv_b)];
        let x = piece(tape, self.recompute, "mamba input branch", &inputs, branch)?;
        let z_rows = {
            let _layer = profile::sublayer(&self.prefix, "in_proj");
            rows(tape, di)?
        };
        // x_proj's output (G, L, dt_rank + 2 d_state) is sliced along its last axis, not through its weight as in_proj
        // is: here the output is narrower than x (34 columns against 64 at d_model 32), and three products would read
        // x three times forward and in dW, add three (G, L, d_inner) gradients into x's, and (gemm_f32 computes 64 x 64
        // output tiles) each do the arithmetic of the one 34-column product. The scan reads B and C where they lie
        // in the output (columns r.. and r + n..) and writes their gradients into its gradient; only dt is cut out,
        // for dt_proj. Its rows are padded with zero columns to whole 16-byte pieces ([`padded_rows`]), which the
        // streaming products copy and store as such (34 or 36 columns would go by 4-byte pairs).
        let (dbc, dt) = {
            let _layer = profile::sublayer(&self.prefix, "x_proj");
            let w = padded_rows(tape, p.get(self.x_proj))?;
            let dbc = linear(tape, &x, &w, None)?;
            let dt = narrow(tape, &dbc, 2, 0, r)?;
            (dbc, dt)
        };
        // delta = dt W_dt^T and z = u W[di..2di]^T, then the scan: the scan op makes delta and z itself
        // (Operand::Product) and keeps their products' operands instead of them (dt_rank and d_model channels against
        // d_inner each), rebuilding them in its backward pass. As a checkpoint (recompute) it also drops the scan's
        // per-chunk states and reruns the scan's forward in the backward pass; x, B and C are kept either way.
        let (dt_w, a_log, d_skip, dt_b) =
            (p.get(self.dt_proj_w), p.get(self.a_log), p.get(self.d_skip), p.get(self.dt_proj_b));
        let prefix = self.prefix.clone();
        let scan = move |t: &mut Tape, v: &[Tensor]| {
            let delta = {
                let _layer = profile::sublayer(&prefix, "dt_proj");
                Product::new(t, &v[1], &v[2])?
            };
            let z = {
                let _layer = profile::sublayer(&prefix, "in_proj");
                Product::new(t, &v[6], &v[7])?
            };
            let inputs = ScanInputs {
                u: &v[0],
                delta: Operand::Product(&delta),
                a_log: &v[3],
                b: Columns { t: &v[4], at: r },
                c: Columns { t: &v[4], at: r + n },
                d_skip: &v[5],
                z: Operand::Product(&z),
                delta_bias: &v[8],
                order,
            };
            selective_scan(t, &inputs)
        };
        let inputs = [&x, &dt, dt_w, a_log, &dbc, d_skip, u, &z_rows, dt_b];
        piece(tape, self.recompute, "mamba scan", &inputs, scan)
    }
}

/// The weight `w` (N, K) with zero rows appended up to a multiple of [`ROW_PIECE`] rows (itself when it has one): the
/// product x w^T then has rows of whole 16-byte pieces in bf16 and float32, the extra columns zero (0 x = 0 exactly)
/// and their gradients dropped by the concatenation's backward pass, so every other value is unchanged.
fn padded_rows(tape: &mut Tape, w: &Tensor) -> Result<Tensor> {
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let padded = n.next_multiple_of(ROW_PIECE);
    if padded == n {
        return Ok(w.clone());
    }
    let zeros = Tensor::zeros(&[1, padded - n, k], w.dtype(), &w.device())?;
    let rows = reshape(tape, w, &[1, n, k])?;
    let rows = concat_channels(tape, &[&rows, &zeros])?;
    reshape(tape, &rows, &[padded, k])
}

/// Output columns per 16-byte piece of a bf16 row (two pieces of float32).
const ROW_PIECE: usize = 8;

/// The width of x_proj's output as the engine stores it ([`padded_rows`]): dt_rank + 2 d_state columns and the zero
/// ones up to a multiple of [`ROW_PIECE`].
pub(crate) fn x_proj_width(dt_rank: usize, d_state: usize) -> usize {
    (dt_rank + 2 * d_state).next_multiple_of(ROW_PIECE)
}

/// `f(inputs)` as a [`checkpoint`] named `name` (recomputed in the backward pass) when `recompute`, else recorded
/// op by op as usual.
fn piece(
    tape: &mut Tape,
    recompute: bool,
    name: &'static str,
    inputs: &[&Tensor],
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor> + 'static,
) -> Result<Tensor> {
    if recompute {
        checkpoint(tape, name, inputs, f)
    } else {
        let owned: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
        f(tape, &owned)
    }
}

/// How a [`BiMambaLayer`] turns the feature map into sequences.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grouping {
    /// PiM: windows of these per-axis sizes, in the given layout.
    Pixel {
        /// Window size per spatial axis.
        window: Vec<usize>,
        /// `Window` (adjacent pixels, the paper) or `Strided` (the public code).
        layout: PimLayout,
    },
    /// PaM: average-pool by these per-axis factors, then one sequence per sample.
    Patch {
        /// Pooling factor per spatial axis (1 = no pooling).
        pool: Vec<usize>,
    },
}

/// A residual bidirectional Mamba layer: PiM or PaM.
pub struct BiMambaLayer {
    prefix: String,
    grouping: Grouping,
    norm_w: ParamId,
    norm_b: ParamId,
    forw: Mamba,
    backw: Mamba,
    out_proj: ParamId,
}

impl BiMambaLayer {
    /// Registers the layer under `prefix` (e.g. `encoder.mamba_layers.0`) with the public code's names.
    pub fn new(
        params: &mut Params,
        prefix: &str,
        dim: usize,
        grouping: Grouping,
        cfg: MambaConfig,
        rng: &mut StdRng,
    ) -> BiMambaLayer {
        let norm_w = params.add(format!("{prefix}.norm.weight"), constant(&[dim], 1.0));
        let norm_b = params.add(format!("{prefix}.norm.bias"), constant(&[dim], 0.0));
        let forw = Mamba::new(params, &format!("{prefix}.mamba_forw"), dim, cfg, rng);
        let d_inner = cfg.expand * dim;
        let out_proj = params.add(format!("{prefix}.out_proj.weight"), default_uniform(&[dim, d_inner], d_inner, rng));
        let backw = Mamba::new(params, &format!("{prefix}.mamba_backw"), dim, cfg, rng);
        BiMambaLayer { prefix: prefix.into(), grouping, norm_w, norm_b, forw, backw, out_proj }
    }

    /// `x + mixer(x)` for a feature map x (N, C, \[D,\] H, W).
    pub fn forward(&self, tape: &mut Tape, p: &Params, x: &Tensor) -> Result<Tensor> {
        let _layer = profile::layer(&self.prefix);
        let (tokens_of, map_shape, window, layout) = match &self.grouping {
            Grouping::Pixel { window, layout } => (x.clone(), x.shape().to_vec(), window.clone(), *layout),
            Grouping::Patch { pool } => {
                let pooled = if pool.iter().all(|&f| f == 1) { x.clone() } else { avg_pool(tape, x, pool)? };
                let whole = pooled.shape()[2..].to_vec();
                (pooled.clone(), pooled.shape().to_vec(), whole, PimLayout::Window)
            }
        };
        let t = {
            let sequences = Partitioned::new(tape, &tokens_of, &window, layout)?;
            let _layer = profile::sublayer(&self.prefix, "norm");
            // PiM's map is its stage's output, which that stage's last LeakyReLU keeps: the norm keeps the map and cuts
            // it again in its backward pass instead of keeping the sequences. PaM's pooled map is kept by no one.
            let input = match &self.grouping {
                Grouping::Pixel { .. } => Operand::Partitioned(&sequences),
                Grouping::Patch { .. } => Operand::Tensor(sequences.value()),
            };
            layer_norm(tape, input, p.get(self.norm_w), p.get(self.norm_b), LN_EPS)?
        };
        let yf = self.forw.forward(tape, p, &t, Order::Stored)?;
        let yb = self.backw.forward(tape, p, &t, Order::Reversed)?;
        let y = add(tape, &yf, &yb)?;
        let y = {
            let _layer = profile::sublayer(&self.prefix, "out_proj");
            linear(tape, &y, p.get(self.out_proj), None)?
        };
        let mut y = merge(tape, &y, &map_shape, &window, layout)?;
        if let Grouping::Patch { pool } = &self.grouping {
            if pool.iter().any(|&f| f != 1) {
                y = upsample_nearest(tape, &y, pool)?;
            }
        }
        ensure!(
            y.shape() == x.shape(),
            Shape,
            "Mamba layer output {:?} differs from its input {:?}",
            y.shape(),
            x.shape()
        );
        add(tape, &y, x)
    }
}
