//! Depthwise causal convolution along the sequence axis (Mamba's conv1d, kernel 4, left padding K - 1).
//!
//! Tokens x (G, L, C), weight w (C, K) (PyTorch's `Conv1d(groups=C)` weight (C, 1, K) squeezed), bias b (C). Each
//! output sees its own token and the K - 1 before it; tokens before the start of a sequence are zero:
//!
//! ```text
//!   y[g, t, c] = b[c] + sum_{k<K} w[c, k] x[g, t - (K-1) + k, c]       (terms with t - (K-1) + k < 0 dropped)
//!
//!   dL/dx[g, s, c] = sum_{k<K, t = s + (K-1) - k < L} w[c, k] g[g, t, c]
//!   dL/dw[c, k]    = sum_{g, t} g[g, t, c] x[g, t - (K-1) + k, c]
//!   dL/db[c]       = sum_{g, t} g[g, t, c]
//! ```
//!
//! With [`Order::Reversed`] the sequences are walked from their last token (token t above is the (L - 1 - t)-th
//! stored): the conv of the reversed sequences, written back in stored order, without flipped copies (the backward
//! Mamba's; on the GPU the kernels step through memory backwards).
//!
//! [`causal_conv1d_silu`] is SiLU of the same conv as one op, Mamba's `x = SiLU(conv1d(x))`. Its backward recomputes
//! the conv's output y from x (which it reads anyway) instead of keeping it, and uses dL/dy = dL/dout SiLU'(y) in the
//! formulas above: a (G, L, C) tensor fewer kept per Mamba block, and no SiLU passes over memory.
//!
//! CPU: the loops keep the channel axis innermost, where tokens are contiguous; the weight is used transposed to
//! (K, C) so that its rows are contiguous too.
//!
//! GPU (cuda/conv1d.cu): each thread streams a run of `CONV1D_RUN` tokens of one sequence over a group of channels
//! (16-byte accesses when K = 4 and the channels allow it, one channel per thread otherwise), keeping the last K rows
//! in registers, so every token row is read once. One backward kernel computes dL/dx and, from the same loads, per
//! block partial sums of dL/dw and dL/db, which `sum_rows` then adds in a fixed order: the gradients are the same bits
//! on every run. The tokens (x, y, dL/dy, dL/dx) are stored as float32 or bf16 and computed on in float32; the weight,
//! the bias and their gradients are float32 for both (the precision policy, README "GPU").
//!
//! Cost per element of x (G L C), with K taps, in units of the storage size E of the tokens (4 bytes float32, 2 bf16;
//! the counting rules are in [`ops`](crate::ops)): forward 2E bytes (read x, write y) and 2K FLOPs; backward 3E bytes
//! (read x and dL/dy, write dL/dx) and 4K + 1 FLOPs (2K for dL/dx, 2K for dL/dw, 1 for dL/db), which the GPU's one
//! backward kernel moves, plus its partial sums (about 1% more at Mamba's shapes). With SiLU the bytes are the same,
//! and the FLOPs grow by 4 forward, 2K + 8 backward (the conv recomputed, SiLU').

use cudarc::driver::LaunchConfig;

use crate::autograd::{Backward, Tape};
use crate::device::cuda::GpuElement;
use crate::device::params::{
    kernel, Conv1dParams, CONV1D_BACKWARD_WIDTH, CONV1D_MAX_K, CONV1D_RUN, CONV1D_TAPS, CONV1D_THREADS,
};
use crate::ops::activation::Activation;
use crate::ops::flip::Order;
use crate::ops::linear::sum_rows;
use crate::ops::operand::{Kept, Operand};
use crate::ops::{check_param_kind, seq_dims};
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, by_gpu_type, ensure, Result};

/// Causal depthwise conv of tokens `x` (G, L, C) with `w` (C, K) and `bias` (C); returns (G, L, C) of x's dtype. `w`
/// and `bias` have x's dtype, or float32 for bf16 tokens.
pub fn causal_conv1d(tape: &mut Tape, x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    conv_op(tape, Operand::Tensor(x), w, bias, false, Order::Stored)
}

/// SiLU([`causal_conv1d`]) as one op (Mamba's `x = SiLU(conv1d(x))`): the same result as the two ops, but the conv's
/// output is never stored; the backward pass recomputes it from `x` (which it reads anyway) to form
/// dL/dconv = dL/dout SiLU'(conv). `x` may be given as the product that makes it (Mamba's in_proj x half,
/// [`Operand::Product`]): then not even `x` is kept, but rebuilt in the backward pass. `order` walks the sequences as
/// stored or from their last token ([`Order`]).
pub fn causal_conv1d_silu(tape: &mut Tape, x: Operand, w: &Tensor, bias: &Tensor, order: Order) -> Result<Tensor> {
    conv_op(tape, x, w, bias, true, order)
}

fn conv_op(tape: &mut Tape, x: Operand, w: &Tensor, bias: &Tensor, silu: bool, order: Order) -> Result<Tensor> {
    let (x, kept) = (x.value(), x.keep());
    let d = ConvDims::of(x, w, bias, silu, order)?;
    let range = profile::forward(d.name(), &[x, w, bias], d.flops());
    let y = match by_gpu_type!(x, forward_gpu(x, w, bias, d)) {
        Some(y) => y?,
        None => by_dtype!(x.dtype(), forward_cpu(x, w, bias, d))?,
    };
    range.done([&y]);
    let saved = CausalConv1dBackward { x: kept, w: w.clone(), bias: silu.then(|| bias.clone()), dims: d };
    tape.record(&[x, w, bias], &y, saved);
    Ok(y)
}

/// Sequences G, length L, channels C, kernel size K, whether SiLU follows the conv in the same op, and the order of
/// the tokens.
#[derive(Clone, Copy, Debug)]
struct ConvDims {
    g: usize,
    l: usize,
    c: usize,
    k: usize,
    silu: bool,
    order: Order,
}

impl ConvDims {
    /// Forward FLOPs, 2 G L C k, and 4 G L C for the SiLU.
    fn flops(&self) -> f64 {
        let silu = if self.silu { 4.0 } else { 0.0 };
        (2.0 * self.k as f64 + silu) * (self.g * self.l * self.c) as f64
    }

    fn name(&self) -> &'static str {
        if self.silu {
            "causal_conv1d_silu"
        } else {
            "causal_conv1d"
        }
    }

    fn of(x: &Tensor, w: &Tensor, bias: &Tensor, silu: bool, order: Order) -> Result<ConvDims> {
        let (g, l, c) = seq_dims(x, "causal_conv1d")?;
        ensure!(
            w.rank() == 2 && w.shape()[0] == c && w.shape()[1] > 0,
            Shape,
            "causal_conv1d: weight must be (C, K) with C = {c} channels of the input {:?} and K >= 1, got shape {:?}",
            x.shape(),
            w.shape()
        );
        check_param_kind(x, w, "causal_conv1d weight")?;
        check_param_kind(x, bias, "causal_conv1d bias")?;
        bias.check_shape(&[c], "causal_conv1d: bias (C)")?;
        Ok(ConvDims { g, l, c, k: w.shape()[1], silu, order })
    }
}

/// w (C, K) as (K, C).
fn transpose_weight<T: Real>(w: &[T], c: usize, k: usize) -> Vec<T> {
    let mut wt = vec![T::zero(); k * c];
    for ci in 0..c {
        for ki in 0..k {
            wt[ki * c + ci] = w[ci * k + ki];
        }
    }
    wt
}

fn forward_cpu<T: Real>(x: &Tensor, w: &Tensor, bias: &Tensor, d: ConvDims) -> Result<Tensor> {
    let mut y = conv_cpu::<T>(x, w, bias, d)?;
    if d.silu {
        y.iter_mut().for_each(|v| *v = Activation::Silu.value(*v));
    }
    Tensor::from_vec(y, x.shape())
}

/// The conv's output (before any SiLU), channels last.
fn conv_cpu<T: Real>(x: &Tensor, w: &Tensor, bias: &Tensor, d: ConvDims) -> Result<Vec<T>> {
    let ConvDims { g, l, c, k, order, .. } = d;
    let (xv, bv) = (x.cpu::<T>()?, bias.cpu::<T>()?);
    let wt = transpose_weight(w.cpu::<T>()?, c, k);
    let mut y = vec![T::zero(); g * l * c];
    for gi in 0..g {
        let xs = &xv[gi * l * c..(gi + 1) * l * c];
        for t in 0..l {
            let at = gi * l + order.position(t, l);
            let yr = &mut y[at * c..(at + 1) * c];
            yr.copy_from_slice(bv);
            // Tap k reads token t - (K-1) + k; the first valid tap is K-1-t when t < K-1.
            for ki in (k - 1).saturating_sub(t)..k {
                let s = order.position(t + ki + 1 - k, l);
                let (xr, wr) = (&xs[s * c..(s + 1) * c], &wt[ki * c..(ki + 1) * c]);
                for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(wr) {
                    *yv += wv * xv;
                }
            }
        }
    }
    Ok(y)
}

struct CausalConv1dBackward {
    x: Kept,
    w: Tensor,
    /// With SiLU: the bias, to recompute the conv's output.
    bias: Option<Tensor>,
    dims: ConvDims,
}

fn backward_cpu<T: Real>(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    gout: &Tensor,
    d: ConvDims,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let ConvDims { g, l, c, k, order, .. } = d;
    let xv = x.cpu::<T>()?;
    // With SiLU the gradient entering the conv is dL/dout SiLU'(y), y the conv's output recomputed.
    let gsilu: Vec<T>;
    let gv = match bias {
        Some(bias) => {
            let y = conv_cpu::<T>(x, w, bias, d)?;
            gsilu = y.iter().zip(gout.cpu::<T>()?).map(|(&y, &g)| g * Activation::Silu.derivative(y)).collect();
            &gsilu[..]
        }
        None => gout.cpu::<T>()?,
    };
    let wt = transpose_weight(w.cpu::<T>()?, c, k);
    let mut dx = needs[0].then(|| vec![T::zero(); g * l * c]);
    let mut dwt = needs[1].then(|| vec![T::zero(); k * c]);
    let mut db = needs[2].then(|| vec![T::zero(); c]);
    for gi in 0..g {
        let base = gi * l * c;
        for t in 0..l {
            let at = base + order.position(t, l) * c;
            let gr = &gv[at..at + c];
            if let Some(db) = db.as_mut() {
                for (dbv, &gvv) in db.iter_mut().zip(gr) {
                    *dbv += gvv;
                }
            }
            for ki in (k - 1).saturating_sub(t)..k {
                let s = base + order.position(t + ki + 1 - k, l) * c;
                if let Some(dx) = dx.as_mut() {
                    let wr = &wt[ki * c..(ki + 1) * c];
                    for ((dxv, &wv), &gvv) in dx[s..s + c].iter_mut().zip(wr).zip(gr) {
                        *dxv += wv * gvv;
                    }
                }
                if let Some(dwt) = dwt.as_mut() {
                    let xr = &xv[s..s + c];
                    for ((dwv, &xvv), &gvv) in dwt[ki * c..(ki + 1) * c].iter_mut().zip(xr).zip(gr) {
                        *dwv += xvv * gvv;
                    }
                }
            }
        }
    }
    let dw = dwt.map(|dwt| transpose_weight(&dwt, k, c));
    Ok(vec![
        dx.map(|v| Tensor::from_vec(v, x.shape())).transpose()?,
        dw.map(|v| Tensor::from_vec(v, w.shape())).transpose()?,
        db.map(|v| Tensor::from_vec(v, &[c])).transpose()?,
    ])
}

impl Backward for CausalConv1dBackward {
    fn name(&self) -> &'static str {
        self.dims.name()
    }

    /// The conv's input and parameter gradients (4 G L C K), and with SiLU the conv recomputed (2 G L C K) and its
    /// derivative (8 G L C).
    fn flops(&self) -> f64 {
        let n = (self.dims.g * self.dims.l * self.dims.c) as f64;
        let k = self.dims.k as f64;
        if self.dims.silu {
            (6.0 * k + 8.0) * n
        } else {
            4.0 * k * n
        }
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let x = &self.x.get()?;
        x.check_same_kind(grad_out, "causal_conv1d backward")?;
        let (w, bias, d) = (&self.w, self.bias.as_ref(), self.dims);
        match by_gpu_type!(x, backward_gpu(x, w, bias, grad_out, d, needs)) {
            Some(grads) => grads,
            None => by_dtype!(x.dtype(), backward_cpu(x, w, bias, grad_out, d, needs)),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// GPU

/// Blocks of the backward beyond which its threads take several runs each (fewer partial rows to sum); about eight
/// per SM of an H200.
const BACKWARD_BLOCKS: usize = 1024;
/// The most runs per thread of the backward.
const BACKWARD_MAX_ITERS: usize = 4;
/// The most channel lanes of a block (a warp's width): the rest of its threads are run lanes.
const CHANNEL_LANES: usize = 32;

fn check_gpu(d: ConvDims) -> Result<()> {
    let ConvDims { g, l, c, k, .. } = d;
    ensure!(g * l * c > 0, Shape, "causal_conv1d on the GPU: empty input (G, L, C) = ({g}, {l}, {c})");
    ensure!(
        k <= CONV1D_MAX_K,
        Shape,
        "causal_conv1d on the GPU supports kernels up to {CONV1D_MAX_K} taps, got K = {k}"
    );
    // The kernels index tokens, runs and channels with 32-bit integers (element offsets are 64-bit), and the blocks
    // along the channels are the grid's y dimension (at most 65,535).
    ensure!(
        g * l < 1 << 30 && c * (k + 1) < 1 << 30 && c.div_ceil(CHANNEL_LANES) <= 65_535,
        Shape,
        "causal_conv1d on the GPU supports fewer than 2^30 tokens and at most {} channels, got (G, L, C) = ({g}, {l}, \
         {c}), K = {k}",
        65_535 * CHANNEL_LANES
    );
    Ok(())
}

/// How a conv1d kernel covers the tokens: the vector or the scalar instance, and blocks of (channel lanes, run lanes)
/// over groups of channels and runs of `CONV1D_RUN` tokens (cuda/conv1d.cu).
#[derive(Debug)]
struct Plan {
    vector: bool,
    /// Channel lanes and run lanes of a block.
    lanes: (usize, usize),
    /// Blocks along the channels.
    channel_blocks: usize,
    /// Runs of all sequences, G ceil(L / CONV1D_RUN).
    runs: usize,
}

impl Plan {
    /// The vector kernels, `width` channels per thread, when K is theirs, `width` divides C and every buffer at
    /// `addresses` is 16-byte aligned; else the scalar kernels, one channel per thread.
    fn of(d: ConvDims, width: usize, addresses: &[u64]) -> Plan {
        let vector = d.k == CONV1D_TAPS && d.c % width == 0 && addresses.iter().all(|a| a % 16 == 0);
        let groups = d.c.div_ceil(if vector { width } else { 1 });
        let channel_lanes = groups.min(CHANNEL_LANES);
        Plan {
            vector,
            lanes: (channel_lanes, CONV1D_THREADS / channel_lanes),
            channel_blocks: groups.div_ceil(channel_lanes),
            runs: d.g * d.l.div_ceil(CONV1D_RUN),
        }
    }

    /// The launch over `run_blocks` blocks of runs.
    fn config(&self, run_blocks: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (run_blocks as u32, self.channel_blocks as u32, 1),
            block_dim: (self.lanes.0 as u32, self.lanes.1 as u32, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The backward's runs per thread: one, or up to `BACKWARD_MAX_ITERS` while that leaves `BACKWARD_BLOCKS`
    /// blocks; the partial sums of dw and db (one row per block of runs) and their order follow from the shape alone.
    fn backward_iters(&self) -> usize {
        let blocks = self.runs.div_ceil(self.lanes.1) * self.channel_blocks;
        (blocks / BACKWARD_BLOCKS).clamp(1, BACKWARD_MAX_ITERS)
    }
}

/// The parameters shared by the kernels of one conv1d on the GPU; each launch fills in its own pointers.
fn gpu_params<T: GpuElement>(d: ConvDims) -> Conv1dParams<T> {
    let ConvDims { g, l, c, k, silu, order } = d;
    let runs = l.div_ceil(CONV1D_RUN);
    Conv1dParams {
        G: g as i32,
        L: l as i32,
        C: c as i32,
        K: k as i32,
        runs: runs as i32,
        iters: 1,
        silu: silu as i32,
        flip: order.kernel_flip(),
        ..Default::default()
    }
}

/// y (G, L, C) stored as `T`, like x.
fn forward_gpu<T: GpuElement>(x: &Tensor, w: &Tensor, bias: &Tensor, d: ConvDims) -> Result<Tensor> {
    check_gpu(d)?;
    let ConvDims { g, l, c, .. } = d;
    let op = d.name();
    let (xb, wb, bb) = (x.gpu_operand::<T>(op)?, w.gpu_operand::<f32>(op)?, bias.gpu_operand::<f32>(op)?);
    let gpu = &xb.gpu;
    let mut y = gpu.alloc_of::<T>(g * l * c, "causal_conv1d output")?;
    let p = Conv1dParams { x: xb.ptr(), w: wb.ptr(), bias: bb.ptr(), out: y.ptr_mut(), ..gpu_params(d) };
    let addresses = [p.x.address(), p.w.address(), p.bias.address(), p.out.address()];
    let plan = Plan::of(d, 16 / std::mem::size_of::<T>(), &addresses);
    let kernel =
        if plan.vector { kernel::causal_conv1d_forward::<T>() } else { kernel::causal_conv1d_forward_scalar::<T>() };
    let cfg = plan.config(plan.runs.div_ceil(plan.lanes.1));
    gpu.launch(kernel, cfg, &p, &format!("{op} {d:?}"))?;
    Tensor::from_gpu(y, x.shape())
}

/// dx (G, L, C) stored as `T`, like x, and the float32 dw (C, K) and db (C), each only when wanted. One kernel
/// computes dx and the per-block partial sums of dw and db from one read of x and dL/dy.
fn backward_gpu<T: GpuElement>(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    grad_out: &Tensor,
    d: ConvDims,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    check_gpu(d)?;
    let ConvDims { g, l, c, k, .. } = d;
    let op = "causal_conv1d backward";
    let (xb, wb, gy) = (x.gpu_operand::<T>(op)?, w.gpu_operand::<f32>(op)?, grad_out.gpu_operand::<T>(op)?);
    let bb = bias.map(|b| b.gpu_operand::<f32>(op)).transpose()?;
    let gpu = &xb.gpu;
    let shapes = format!("{} backward {d:?}", d.name());
    // The kernel always writes dx: from the loads it needs for dw and db anyway.
    let mut dx = gpu.alloc_of::<T>(g * l * c, "causal_conv1d dx")?;
    let mut p = Conv1dParams { x: xb.ptr(), w: wb.ptr(), gy: gy.ptr(), out: dx.ptr_mut(), ..gpu_params(d) };
    if let Some(bb) = &bb {
        p.bias = bb.ptr();
    }
    let addresses = [p.x.address(), p.w.address(), p.bias.address(), p.gy.address(), p.out.address()];
    let plan = Plan::of(d, CONV1D_BACKWARD_WIDTH, &addresses);
    let iters = plan.backward_iters();
    let run_blocks = plan.runs.div_ceil(plan.lanes.1 * iters);
    // One partial row [dw (C K) | db (C)] per block of runs, then fixed-order sums over them.
    let width = c * k + c;
    let mut part = if needs[1] || needs[2] {
        Some(gpu.alloc(run_blocks * width, "causal_conv1d parameter partial sums")?)
    } else {
        None
    };
    p.iters = iters as i32;
    if let Some(part) = part.as_mut() {
        p.part = part.ptr_mut();
    }
    let kernel =
        if plan.vector { kernel::causal_conv1d_backward::<T>() } else { kernel::causal_conv1d_backward_scalar::<T>() };
    gpu.launch(kernel, plan.config(run_blocks), &p, &shapes)?;
    let (mut dw, mut db) = (None, None);
    if let Some(part) = &part {
        if needs[1] {
            let sums = sum_rows(gpu, &part.slice.slice(..), run_blocks, c * k, width, "causal_conv1d dw")?;
            dw = Some(Tensor::from_gpu(sums, w.shape())?);
        }
        if needs[2] {
            let sums = sum_rows(gpu, &part.slice.slice(c * k..), run_blocks, c, width, "causal_conv1d db")?;
            db = Some(Tensor::from_gpu(sums, &[c])?);
        }
    }
    let dx = if needs[0] { Some(Tensor::from_gpu(dx, x.shape())?) } else { None };
    Ok(vec![dx, dw, db])
}
