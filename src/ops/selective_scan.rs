//! The Mamba v1 selective scan, fused: softplus step size, discretisation, state recurrence, C contraction, D skip
//! and SiLU(z) gate in one op, as mamba_ssm's `selective_scan_fn(u, delta, A, B, C, D, z, delta_bias,
//! delta_softplus=True)` with B and C shared by all channels (one per token).
//!
//! Shapes: u, delta, z (G, L, Dch); a_log (Dch, N); b, c (G, L, N); d_skip, delta_bias (Dch); output y (G, L, Dch).
//! B and C may also be N columns of a wider (G, L, W) tensor ([`Columns`]): Mamba's are columns of x_proj's output
//! [dt | B | C], which the op reads where they lie and whose gradient it writes whole (dB and dC in their columns,
//! zeros elsewhere), so that neither B nor C nor their gradients are copied out.
//! With [`Order::Reversed`] (the backward Mamba's) the scan walks each sequence from its last token: token t below is
//! the (L - 1 - t)-th stored one, in every input and output, so the op is the scan of the reversed sequences written
//! back in stored order, without flipped copies.
//! For each sequence g and channel d (indices g and d dropped below), with state h_t in R^N and h_{-1} = 0:
//!
//! ```text
//!   A[n]  = -exp(a_log[d, n])
//!   dt_t  = softplus(delta_t + delta_bias[d])                 (= its argument above 20)
//!   dA_t[n] = exp(dt_t A[n])
//!   h_t[n]  = dA_t[n] h_{t-1}[n] + dt_t B_t[n] u_t
//!   s_t   = sum_n C_t[n] h_t[n] + D[d] u_t
//!   y_t   = s_t SiLU(z_t)
//! ```
//!
//! Backward, given g_t = dL/dy_t. The gate gives
//!
//! ```text
//!   dL/dz_t = g_t s_t SiLU'(z_t),     q_t = dL/ds_t = g_t SiLU(z_t)
//!   dL/dD[d] = sum_{g,t} q_t u_t,     dL/dC_t[n] += q_t h_t[n]        (C summed over channels d)
//! ```
//!
//! h_t reaches the loss through s_t and through h_{t+1}, so its total adjoint runs backwards in time:
//!
//! ```text
//!   dh_t[n] = C_t[n] q_t + dA_{t+1}[n] dh_{t+1}[n]           (dh_L = 0)
//! ```
//!
//! and each step's inputs receive, from h_t = dA_t h_{t-1} + dt_t B_t u_t with dA_t = exp(dt_t A):
//!
//! ```text
//!   e_t[n]    = dh_t[n] dA_t[n] h_{t-1}[n]                     (adjoint of the exponent dt_t A[n])
//!   dL/dB_t[n] += dh_t[n] dt_t u_t                              (B summed over channels d)
//!   dL/du_t   = q_t D[d] + dt_t sum_n dh_t[n] B_t[n]
//!   dL/ddt_t  = u_t sum_n dh_t[n] B_t[n] + sum_n e_t[n] A[n]
//!   dL/dA[n]  = sum_{g,t} e_t[n] dt_t,      dL/da_log[d, n] = dL/dA[n] A[n]      (dA/da_log = A)
//!   dL/ddelta_t = dL/ddt_t softplus'(delta_t + delta_bias[d]),  dL/ddelta_bias[d] = sum_{g,t} dL/ddelta_t
//! ```
//!
//! Nothing but the inputs is saved: the backward pass recomputes one sequence-channel's states h_t into an (L + 1) x N
//! buffer (row 0 is h_{-1} = 0) together with dA_t, dt_t and s_t, then sweeps t from L-1 down to 0 carrying
//! dA_t dh_t. The buffers are reused for every (g, d), so memory stays O(L N) per thread rather than O(G L Dch N).
//!
//! The CPU passes run on rayon's thread pool, one task per sequence g, which runs its channels one after another:
//! the sequence owns its rows of y and of every token-shaped gradient (dB and dC sum over its channels, so a
//! sequence is the smallest independent unit of the backward), and the gradients of a_log, D and delta_bias are
//! summed per sequence and then over the sequences in index order. The results are the same bits for any number of
//! threads.
//!
//! On the GPU (cuda/scan.cu, whose header gives the design) sequences are cut into chunks of [`GPU_CHUNK`] tokens and
//! only the state at each chunk start, (G, chunks, Dch, N), is saved for the backward (nothing for a single chunk).
//! Many sequences (PiM) run whole in one thread per (sequence, channel); few long ones (PaM) run as a parallel scan
//! over chunks: each chunk's decay and end state from zero, a sequential combine over the chunks, then every chunk
//! again from its true initial state. The backward recomputes the states chunk by chunk from the saved ones and
//! carries the adjoint backwards, across chunks of long sequences by the same combine in reverse. Gradients summed
//! over tokens or channels are reduced in a fixed order, so they are deterministic. The GPU kernels support N <= 32.
//!
//! bf16 (the precision policy: the scan keeps its state and its exp/softplus in float32, its inputs and outputs may be
//! bf16). On the GPU the token-shaped tensors u, delta, B, C, z, the output y and their gradients may be stored as
//! bf16, all five inputs alike; a_log, D and delta_bias then stay float32, and so do their gradients. The kernels read
//! every element into float32 and round each output once: the states, the adjoints, the chunk states and carries, the
//! sums of dB and dC over channels and the parameters' partial sums are float32 throughout. Any other mix of storage
//! types is refused, naming the operand.
//!
//! Cost per element of u (one token of one channel), with N states and Dch channels, in units of the storage size E
//! of the token-shaped tensors (4 bytes float32, 2 bf16; the counting rules are in [`ops`](crate::ops)): forward at
//! least E (4 + 2N/Dch) bytes (read u, delta and z, write y; the B and C rows of a token are shared by its Dch
//! channels) and about 7N + 11 FLOPs: 7 per state (dt A and its exponential, the update dA h + (dt u) B, the C
//! contraction) and about 11 for the softplus, the D skip and the gate, N + 3 of them exponentials or logarithms;
//! backward at least E (7 + 4N/Dch) bytes (read u, delta, z, dL/dy, B and C; write dL/du, dL/ddelta, dL/dz, dL/dB
//! and dL/dC) and about 21N + 25 FLOPs (the forward recomputed, then about twice its per-state work for the adjoint).
//! `lkm-engine profile` counts the per-state terms, 7N and 21N. The GPU also writes and reads back the chunk-start
//! states, N / [`GPU_CHUNK`] float32 values per element. At the PiM stage-0 shapes of the 3D reference (N = 16,
//! Dch = 64) the forward does 123 FLOPs per 18 bytes in float32 (7 per byte), per 9 in bf16 (14 per byte): bound by
//! memory and by the exponentials.

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use crate::autograd::{Backward, Tape};
use crate::device::cuda::{grid_1d, GpuBuffer, GpuElement};
use crate::device::params::{
    kernel, ConstPtr, Kernel, MutPtr, ScanParams, SCAN_BWD_R, SCAN_BWD_SUB, SCAN_BWD_THREADS, SCAN_CHUNK,
    SCAN_FWD_THREADS,
};
use crate::ops::activation::Activation;
use crate::ops::flip::Order;
use crate::ops::linear::sum_rows;
use crate::ops::operand::{Kept, Operand};
use crate::ops::{check_param_kind, seq_dims};
use crate::profile;
use crate::tensor::{Real, Tensor};
use crate::{bail, by_dtype, by_gpu_type, ensure, Result};

/// The inputs of [`selective_scan`]; they are recorded on the tape in this order. delta and z may be given as the
/// linear products that make them ([`Operand::Product`]: Mamba's delta = dt dt_proj^T, and z = u W_z^T, in_proj's z
/// half): the op then keeps their operands instead and rebuilds them, the same bits, in its backward pass, two
/// (G, L, Dch) tensors fewer kept per scan for two more products. The token-shaped ones (u, delta, b, c, z) share one
/// dtype; the parameters (a_log, d_skip, delta_bias) have it too, or are float32 when it is bf16.
#[derive(Clone, Copy, Debug)]
pub struct ScanInputs<'a> {
    /// The scanned signal u (G, L, Dch).
    pub u: &'a Tensor,
    /// The step size before bias and softplus (G, L, Dch), or the product that makes it (from dt (G, L, R) and
    /// dt_proj's weight (Dch, R)).
    pub delta: Operand<'a>,
    /// log(-A), the state matrix's parameter (Dch, N).
    pub a_log: &'a Tensor,
    /// Input projection of each token, shared by all channels (G, L, N): N columns of a (G, L, W) tensor.
    pub b: Columns<'a>,
    /// Output projection of each token, shared by all channels (G, L, N): N columns of a (G, L, W) tensor, the same
    /// W as b's (when both are columns of one tensor, their columns may not overlap).
    pub c: Columns<'a>,
    /// Skip weight D (Dch).
    pub d_skip: &'a Tensor,
    /// Gate input z (G, L, Dch), or the product that makes it; the output is multiplied by SiLU(z).
    pub z: Operand<'a>,
    /// Bias added to delta before the softplus (Dch).
    pub delta_bias: &'a Tensor,
    /// The order the scan walks each sequence's tokens in: as stored, or from the last ([`Order::Reversed`]: the scan
    /// of the reversed sequences, written back in stored order, without flipped copies).
    pub order: Order,
}

/// N columns of a (G, L, W) tensor, from column `at`: a tensor of its own (`Columns::from(&t)`: W = N, `at` 0), or
/// columns of a wider one (Mamba's B and C in x_proj's output [dt | B | C]).
#[derive(Clone, Copy, Debug)]
pub struct Columns<'a> {
    /// The tensor (G, L, W).
    pub t: &'a Tensor,
    /// The first of the N columns.
    pub at: usize,
}

impl<'a> From<&'a Tensor> for Columns<'a> {
    fn from(t: &'a Tensor) -> Columns<'a> {
        Columns { t, at: 0 }
    }
}

/// The fused selective scan (see the module doc); returns y (G, L, Dch).
pub fn selective_scan(tape: &mut Tape, inp: &ScanInputs) -> Result<Tensor> {
    let all = [inp.u, inp.delta.value(), inp.a_log, inp.b.t, inp.c.t, inp.d_skip, inp.z.value(), inp.delta_bias];
    let dims = ScanDims::of(all, [inp.b.at, inp.c.at], inp.order)?;
    let range = profile::forward("selective_scan", &all, dims.flops());
    let (y, chunk_states) = match by_gpu_type!(inp.u, forward_gpu(all, dims, tape.needs_grad(&all))) {
        Some(out) => out?,
        None => (by_dtype!(inp.u.dtype(), forward_cpu(all, dims))?, None),
    };
    let [u, _, a_log, b, c, d_skip, _, delta_bias] = all.map(Tensor::clone);
    let rest = [u, a_log, b, c, d_skip, delta_bias];
    let saved = ScanBackward { rest, delta: inp.delta.keep(), z: inp.z.keep(), dims, chunk_states };
    range.done([&y]);
    tape.record(&dims.bc.recorded(&all), &y, saved);
    Ok(y)
}

/// Where B and C lie: in rows of `ld` elements per token, from columns `b_at` and `c_at`, of one tensor (`shared`)
/// or of two.
#[derive(Clone, Copy, Debug)]
struct BcLayout {
    ld: usize,
    b_at: usize,
    c_at: usize,
    shared: bool,
}

impl BcLayout {
    /// The op's inputs as the tape records them: the eight slots of [`ScanInputs`], B and C's tensor once when they
    /// share it.
    fn recorded<'t>(&self, all: &[&'t Tensor; 8]) -> Vec<&'t Tensor> {
        let mut v = all.to_vec();
        if self.shared {
            v.remove(4);
        }
        v
    }

    /// The eight slots' gradients (c's `None` when it shares b's tensor, whose gradient holds both) in the order the
    /// tape recorded the inputs ([`BcLayout::recorded`]), each only where `needs` asks.
    fn wanted(&self, mut grads: Vec<Option<Tensor>>, needs: &[bool]) -> Vec<Option<Tensor>> {
        if self.shared {
            grads.remove(4);
        }
        grads.into_iter().zip(needs).map(|(g, &need)| g.filter(|_| need)).collect()
    }

    /// Whether the B and C columns fill their tensors' rows (else the gradients' other columns must be zeroed).
    fn fills_rows(&self, n: usize) -> bool {
        self.ld == if self.shared { 2 * n } else { n }
    }

    /// Token t's rows of dB and dC (N each) within a sequence's gradient rows: `gb` (and `gc`, or `gb` again when
    /// B and C share one tensor, whose columns do not overlap).
    fn rows<'b, T>(&self, gb: &'b mut [T], gc: Option<&'b mut [T]>, t: usize, n: usize) -> (&'b mut [T], &'b mut [T]) {
        let row = t * self.ld;
        match gc {
            Some(gc) => (&mut gb[row + self.b_at..][..n], &mut gc[row + self.c_at..][..n]),
            None => {
                let row = &mut gb[row..row + self.ld];
                if self.b_at < self.c_at {
                    let (lo, hi) = row.split_at_mut(self.c_at);
                    (&mut lo[self.b_at..][..n], &mut hi[..n])
                } else {
                    let (lo, hi) = row.split_at_mut(self.b_at);
                    (&mut hi[..n], &mut lo[self.c_at..][..n])
                }
            }
        }
    }
}

/// Sequences G, length L, channels Dch, state size N, where B and C lie, and the order of the tokens.
#[derive(Clone, Copy, Debug)]
struct ScanDims {
    g: usize,
    l: usize,
    dch: usize,
    n: usize,
    bc: BcLayout,
    order: Order,
}

impl ScanDims {
    /// Where the scan's token t of a sequence is stored.
    fn position(&self, t: usize) -> usize {
        self.order.position(t, self.l)
    }

    /// Forward FLOPs counted per (token, channel, state): exp(delta A), the state update delta B u + dA h (4) and
    /// the C contraction (2), so 7 G L Dch N; softplus, the D skip and the gate are per (token, channel) and left out.
    fn flops(&self) -> f64 {
        7.0 * (self.g * self.l * self.dch * self.n) as f64
    }

    /// The sizes of the eight inputs in the order of [`ScanInputs`] (b and c the tensors that hold them, from columns
    /// `bc_at`), after checking their shapes and kinds, walked in `order`.
    fn of(inputs: [&Tensor; 8], bc_at: [usize; 2], order: Order) -> Result<ScanDims> {
        let op = "selective_scan";
        let [u, delta, a_log, b, c, d_skip, z, delta_bias] = inputs;
        let (g, l, dch) = seq_dims(u, op)?;
        for (t, what) in [(delta, "delta"), (b, "b"), (c, "c"), (z, "z")] {
            u.check_same_kind(t, &format!("{op}: u and {what}"))?;
        }
        for (t, what) in [(a_log, "a_log"), (d_skip, "d_skip"), (delta_bias, "delta_bias")] {
            check_param_kind(u, t, &format!("{op}: {what}"))?;
        }
        ensure!(
            a_log.rank() == 2 && a_log.shape()[0] == dch,
            Shape,
            "{op}: a_log must be (Dch, N) with Dch = {dch} channels of u {:?}, got shape {:?}",
            u.shape(),
            a_log.shape()
        );
        let n = a_log.shape()[1];
        ensure!(n > 0, Shape, "{op}: a_log {:?} must have at least one state (N >= 1)", a_log.shape());
        delta.check_shape(&[g, l, dch], "selective_scan: delta (G, L, Dch) like u")?;
        z.check_shape(&[g, l, dch], "selective_scan: z (G, L, Dch) like u")?;
        let ld = b.shape().last().copied().unwrap_or(0);
        let [b_at, c_at] = bc_at;
        for (t, at, what) in [(b, b_at, "b"), (c, c_at, "c")] {
            ensure!(
                t.rank() == 3 && t.shape()[..2] == [g, l] && at + n <= t.shape()[2] && t.shape()[2] == ld,
                Shape,
                "{op}: {what} must be N = {n} columns (from column {at}) of a (G, L, W) tensor with (G, L) = ({g}, {l}) \
                 like u and the same W for b and c, got shape {:?} (b's {:?})",
                t.shape(),
                b.shape()
            );
        }
        let shared = b.id() == c.id();
        ensure!(
            !shared || b_at + n <= c_at || c_at + n <= b_at,
            Shape,
            "{op}: b (columns {b_at}..) and c (columns {c_at}..) overlap in one tensor of shape {:?}",
            b.shape()
        );
        d_skip.check_shape(&[dch], "selective_scan: d_skip (Dch)")?;
        delta_bias.check_shape(&[dch], "selective_scan: delta_bias (Dch)")?;
        Ok(ScanDims { g, l, dch, n, bc: BcLayout { ld, b_at, c_at, shared }, order })
    }
}

/// The host slices of the eight inputs.
struct Slices<'a, T> {
    u: &'a [T],
    delta: &'a [T],
    a_log: &'a [T],
    b: &'a [T],
    c: &'a [T],
    d_skip: &'a [T],
    z: &'a [T],
    delta_bias: &'a [T],
}

impl<'a, T: Real> Slices<'a, T> {
    fn of(t: [&'a Tensor; 8]) -> Result<Self> {
        Ok(Slices {
            u: t[0].cpu()?,
            delta: t[1].cpu()?,
            a_log: t[2].cpu()?,
            b: t[3].cpu()?,
            c: t[4].cpu()?,
            d_skip: t[5].cpu()?,
            z: t[6].cpu()?,
            delta_bias: t[7].cpu()?,
        })
    }

    /// A[n] = -exp(a_log[d, n]) for channel d, into `a`.
    fn fill_a(&self, d: usize, a: &mut [T]) {
        let n = a.len();
        for (an, &lg) in a.iter_mut().zip(&self.a_log[d * n..(d + 1) * n]) {
            *an = -lg.exp();
        }
    }
}

/// Token t of sequence gi, channel d, as the recurrence sees it: its flat index i into the (G, L, Dch) tensors,
/// u, dt = softplus(delta + bias), dt u, and its rows of B and C.
struct Token<'a, T> {
    i: usize,
    u: T,
    dt: T,
    du: T,
    b: &'a [T],
    c: &'a [T],
}

impl<'a, T: Real> Slices<'a, T> {
    fn token(&self, dims: ScanDims, gi: usize, t: usize, d: usize) -> Token<'a, T> {
        let ScanDims { l, dch, n, bc, .. } = dims;
        let at = gi * l + dims.position(t);
        let (i, row) = (at * dch + d, at * bc.ld);
        let u = self.u[i];
        let dt = Activation::Softplus.value(self.delta[i] + self.delta_bias[d]);
        Token { i, u, dt, du: dt * u, b: &self.b[row + bc.b_at..][..n], c: &self.c[row + bc.c_at..][..n] }
    }
}

/// One step of the recurrence, in place: dA_n = exp(dt A_n) into `da`, h_n <- dA_n h_n + dt u B_n; returns
/// sum_n C_n h_n. The exponentials in a loop of their own leave the state update free of calls, so that it
/// vectorises (about 15% off the forward).
fn recurrence_step<T: Real>(a: &[T], tok: &Token<T>, h: &mut [T], da: &mut [T]) -> T {
    for (dan, &an) in da.iter_mut().zip(a) {
        *dan = (tok.dt * an).exp();
    }
    let mut acc = T::zero();
    for (((hn, &dan), &bn), &cn) in h.iter_mut().zip(&*da).zip(tok.b).zip(tok.c) {
        *hn = dan * *hn + tok.du * bn;
        acc += cn * *hn;
    }
    acc
}

fn forward_cpu<T: Real>(inputs: [&Tensor; 8], dims: ScanDims) -> Result<Tensor> {
    let ScanDims { g, l, dch, n, .. } = dims;
    let s = Slices::<T>::of(inputs)?;
    let mut y = vec![T::zero(); g * l * dch];
    // One task per sequence gi, which owns its rows of y; each task has its own A and state buffers.
    y.par_chunks_mut((l * dch).max(1)).enumerate().for_each_init(
        || (vec![T::zero(); n], vec![T::zero(); n], vec![T::zero(); n]),
        |(a, h, da), (gi, yg)| {
            for d in 0..dch {
                s.fill_a(d, a);
                h.fill(T::zero());
                for t in 0..l {
                    let tok = s.token(dims, gi, t, d);
                    let acc = recurrence_step(a, &tok, h, da);
                    yg[dims.position(t) * dch + d] = (acc + s.d_skip[d] * tok.u) * Activation::Silu.value(s.z[tok.i]);
                }
            }
        },
    );
    Tensor::from_vec(y, inputs[0].shape())
}

struct ScanBackward {
    /// u, a_log, b, c, d_skip, delta_bias: the inputs but delta and z, in the order of [`ScanInputs`].
    rest: [Tensor; 6],
    delta: Kept,
    z: Kept,
    dims: ScanDims,
    /// GPU sequences longer than one chunk: the state at each chunk start (G, chunks, Dch, N).
    chunk_states: Option<Tensor>,
}

impl ScanBackward {
    /// The eight inputs in the order of [`ScanInputs`], delta and z rebuilt where only their products' operands were
    /// kept.
    fn inputs(&self) -> Result<[Tensor; 8]> {
        let [u, a_log, b, c, d_skip, delta_bias] = self.rest.clone();
        Ok([u, self.delta.get()?, a_log, b, c, d_skip, self.z.get()?, delta_bias])
    }
}

/// The gradients that belong to one sequence g: its rows of the token-shaped gradients (dB and dC in the rows of b's
/// gradient and of c's, `None` when they share b's), and its partial sums of the parameter gradients,
/// `part` = [sum_t e_t[n] dt_t per (d, n) (Dch N) | sum_t q_t u_t (Dch) | sum_t ddelta_t (Dch)].
struct SeqGrads<'a, T> {
    u: &'a mut [T],
    delta: &'a mut [T],
    z: &'a mut [T],
    b: &'a mut [T],
    c: Option<&'a mut [T]>,
    part: &'a mut [T],
}

/// One worker's buffers for recomputing a sequence-channel (see the module doc).
struct Scratch<T> {
    /// h_{t-1} in row t and h_t in row t + 1.
    hs: Vec<T>,
    /// dA_t in row t.
    das: Vec<T>,
    /// C_t . h_t + D u_t: the gate's input.
    ss: Vec<T>,
    a: Vec<T>,
    dh: Vec<T>,
}

impl<T: Real> Scratch<T> {
    fn new(l: usize, n: usize) -> Self {
        let z = |len| vec![T::zero(); len];
        Scratch { hs: z((l + 1) * n), das: z(l * n), ss: z(l), a: z(n), dh: z(n) }
    }
}

/// The backward of sequence `gi`, all its channels one after another.
fn backward_sequence<T: Real>(
    s: &Slices<T>,
    gy: &[T],
    gi: usize,
    dims: ScanDims,
    out: SeqGrads<T>,
    w: &mut Scratch<T>,
) {
    let ScanDims { l, dch, n, bc, .. } = dims;
    let mut out = out;
    let (part_a, part_rest) = out.part.split_at_mut(dch * n);
    let (part_d, part_bias) = part_rest.split_at_mut(dch);
    for d in 0..dch {
        s.fill_a(d, &mut w.a);
        let (dd, bias) = (s.d_skip[d], s.delta_bias[d]);

        // Recompute the forward of this sequence-channel, keeping every state h_t (hs[t + 1]; hs[0] = 0).
        for t in 0..l {
            let tok = s.token(dims, gi, t, d);
            let (prev, cur) = w.hs[t * n..(t + 2) * n].split_at_mut(n);
            cur.copy_from_slice(prev);
            let acc = recurrence_step(&w.a, &tok, cur, &mut w.das[t * n..(t + 1) * n]);
            w.ss[t] = acc + dd * tok.u;
        }

        // Sweep backwards; `dh` holds dA_{t+1} dh_{t+1} on entry to step t.
        w.dh.fill(T::zero());
        let ga = &mut part_a[d * n..(d + 1) * n];
        let (mut gd_acc, mut gbias_acc) = (T::zero(), T::zero());
        for t in (0..l).rev() {
            let Token { i, u, dt, du, b: bt, c: ct } = s.token(dims, gi, t, d);
            let (z, at) = (s.z[i], dims.position(t));
            out.z[at * dch + d] = gy[i] * w.ss[t] * Activation::Silu.derivative(z);
            let q = gy[i] * Activation::Silu.value(z);
            gd_acc += q * u;
            let (gbt, gct) = bc.rows(out.b, out.c.as_deref_mut(), at, n);
            let (hp, hc) = (&w.hs[t * n..(t + 1) * n], &w.hs[(t + 1) * n..(t + 2) * n]);
            let dat = &w.das[t * n..(t + 1) * n];
            let (mut dh_b, mut e_a) = (T::zero(), T::zero());
            for n_ in 0..n {
                let dhn = w.dh[n_] + ct[n_] * q;
                gct[n_] += q * hc[n_];
                gbt[n_] += dhn * du;
                dh_b += dhn * bt[n_];
                let e = dhn * dat[n_] * hp[n_];
                e_a += e * w.a[n_];
                ga[n_] += e * dt;
                w.dh[n_] = dhn * dat[n_];
            }
            out.u[at * dch + d] = q * dd + dt * dh_b;
            let gdt = u * dh_b + e_a;
            let gdl = gdt * Activation::Softplus.derivative(s.delta[i] + bias);
            out.delta[at * dch + d] = gdl;
            gbias_acc += gdl;
        }
        part_d[d] = gd_acc;
        part_bias[d] = gbias_acc;
    }
}

fn backward_cpu<T: Real>(
    inputs: [&Tensor; 8],
    dims: ScanDims,
    gout: &Tensor,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let ScanDims { g, l, dch, n, bc: layout, .. } = dims;
    let s = Slices::<T>::of(inputs)?;
    let gy = gout.cpu::<T>()?;
    // Per sequence: L Dch token gradients, L rows of dB and dC (in b's gradient, and c's unless they share it), and
    // the partial sums of the parameter gradients.
    let (tok, bc, width) = (l * dch, l * layout.ld, dch * n + 2 * dch);
    let (mut gu, mut gdelta, mut gz) = (vec![T::zero(); g * tok], vec![T::zero(); g * tok], vec![T::zero(); g * tok]);
    let mut gb = vec![T::zero(); g * bc];
    let mut gc = if layout.shared { Vec::new() } else { vec![T::zero(); g * bc] };
    let mut part = vec![T::zero(); g * width];
    // One task per sequence gi: it owns its rows of every token-shaped gradient (dB and dC sum over its channels)
    // and its row of partial sums; each task has its own recompute buffers. (Every chunk length is positive when
    // the buffer is not empty: N >= 1 is checked, and Dch = 0 or L = 0 leaves nothing to compute.)
    let rows = |len: usize| len.max(1);
    let gc_rows: Vec<Option<&mut [T]>> = match layout.shared {
        true => (0..g).map(|_| None).collect(),
        false => gc.chunks_mut(rows(bc)).map(Some).collect(),
    };
    (
        gu.par_chunks_mut(rows(tok)),
        gdelta.par_chunks_mut(rows(tok)),
        gz.par_chunks_mut(rows(tok)),
        gb.par_chunks_mut(rows(bc)),
        gc_rows,
        part.par_chunks_mut(rows(width)),
    )
        .into_par_iter()
        .enumerate()
        .for_each_init(
            || Scratch::new(l, n),
            |w, (gi, (u, delta, z, b, c, part))| {
                backward_sequence(&s, gy, gi, dims, SeqGrads { u, delta, z, b, c, part }, w)
            },
        );
    // The parameter gradients: the sequences' partial sums added in sequence order.
    let mut sums = vec![T::zero(); width];
    for row in part.chunks_exact(rows(width)) {
        for (acc, &p) in sums.iter_mut().zip(row) {
            *acc += p;
        }
    }
    let gbias = sums.split_off(dch * n + dch);
    let gd = sums.split_off(dch * n);
    // dL/dA to dL/da_log.
    let mut ga = sums;
    let mut a = vec![T::zero(); n];
    for (d, row) in ga.chunks_exact_mut(rows(n)).enumerate().take(dch) {
        s.fill_a(d, &mut a);
        for (gan, &an) in row.iter_mut().zip(&a) {
            *gan *= an;
        }
    }

    let grads = [gu, gdelta, ga, gb, gc, gd, gz, gbias];
    let grads: Vec<Option<Tensor>> = grads
        .into_iter()
        .zip(inputs)
        .enumerate()
        .map(|(i, (v, x))| (i != 4 || !layout.shared).then(|| Tensor::from_vec(v, x.shape())).transpose())
        .collect::<Result<_>>()?;
    Ok(layout.wanted(grads, needs))
}

impl Backward for ScanBackward {
    fn name(&self) -> &'static str {
        "selective_scan"
    }

    /// The backward pass recomputes the forward and then does about twice its work.
    fn flops(&self) -> f64 {
        3.0 * self.dims.flops()
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let inputs = self.inputs()?;
        let (u, inputs, dims) = (&inputs[0], inputs.each_ref(), self.dims);
        u.check_same_kind(grad_out, "selective_scan backward")?;
        match by_gpu_type!(u, backward_gpu(inputs, dims, self.chunk_states.as_ref(), grad_out, needs)) {
            Some(grads) => grads,
            None => by_dtype!(u.dtype(), backward_cpu(inputs, dims, grad_out, needs)),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// GPU

/// Tokens per chunk of the GPU scan (`SCAN_CHUNK` of cuda/scan.cuh): the backward recomputes states from the state
/// saved at each chunk start, so a sequence of L > 64 tokens saves ceil(L / 64) states of N floats per channel (the
/// first, zero, included), 1/4 of u's size at L = 128 and N = 16; one of at most 64 tokens saves nothing.
pub const GPU_CHUNK: usize = SCAN_CHUNK;

/// With at least this many (sequence, channel) pairs the forward runs each whole sequence in one thread (every PiM
/// grouping); with fewer (PaM) it runs the three-pass parallel scan over chunks so that the GPU has work.
const SEQUENTIAL_MIN_THREADS: usize = 16_384;

/// The backward splits each block's channel tiles over several blocks until about this many run (8 per SM of a
/// 132-SM H200): PaM's few long sequences of hundreds of channels otherwise leave most of the GPU idle (12 blocks
/// for amos-2d's deepest windowed layers, each sweeping 32 tiles in turn).
const BACKWARD_MIN_BLOCKS: usize = 1024;

/// The kernels serving one range of state sizes N, for storage type `T`: states padded to `padded` (forward
/// registers; backward lanes of 4 states each), and the longest sequence a backward block sweeps whole (its dB, dC
/// accumulator must fit in shared memory); longer sequences are swept one chunk per block with the adjoint carried
/// between chunks.
#[derive(Clone, Copy)]
struct Variant<T> {
    padded: usize,
    whole_sequence_max: usize,
    forward: Kernel<ScanParams<T>>,
    backward: Kernel<ScanParams<T>>,
}

impl<T: GpuElement> Variant<T> {
    fn for_states(n: usize) -> Result<Variant<T>> {
        match n {
            1..=16 => Ok(Variant {
                padded: 16,
                whole_sequence_max: 128,
                forward: kernel::scan_forward_n16::<T>(),
                backward: kernel::scan_backward_n16::<T>(),
            }),
            17..=32 => Ok(Variant {
                padded: 32,
                whole_sequence_max: 64,
                forward: kernel::scan_forward_n32::<T>(),
                backward: kernel::scan_backward_n32::<T>(),
            }),
            _ => bail!(Shape, "selective_scan on the GPU supports 1 to 32 states, got N = {n} (a_log's second axis)"),
        }
    }

    /// Channels of one backward tile: each takes padded / SCAN_BWD_R lanes.
    fn backward_tile_channels(self) -> usize {
        SCAN_BWD_THREADS / (self.padded / SCAN_BWD_R)
    }

    /// Dynamic shared memory of the backward kernel in bytes (the layout in cuda/scan.cu's `scan_backward_group`).
    fn backward_shared_bytes(self, acc_rows: usize) -> usize {
        let channels = self.backward_tile_channels();
        let (v, warps) = (2 * self.padded, SCAN_BWD_THREADS / 32);
        let staged = 5 * SCAN_BWD_SUB * channels + 2 * SCAN_BWD_SUB * self.padded;
        let sums = 3 * SCAN_BWD_SUB * channels + SCAN_BWD_SUB * warps * v;
        let checkpoints = SCAN_CHUNK / SCAN_BWD_SUB * SCAN_BWD_R * SCAN_BWD_THREADS;
        4 * (staged + sums + acc_rows * v + checkpoints + 2 * SCAN_BWD_THREADS)
    }
}

/// Channel splits of the backward: `blocks` (sequence, group) blocks, each with `tiles` channel tiles, split into
/// equal runs of whole tiles until about [`BACKWARD_MIN_BLOCKS`] blocks run (1: no split).
fn backward_splits(blocks: usize, tiles: usize) -> usize {
    let wanted = BACKWARD_MIN_BLOCKS.div_ceil(blocks).clamp(1, tiles);
    tiles.div_ceil(tiles.div_ceil(wanted))
}

/// Chunks per sequence, after checking that the sizes suit the kernels.
fn gpu_chunks(dims: ScanDims) -> Result<usize> {
    let ScanDims { g, l, dch, n, .. } = dims;
    ensure!(g * l * dch * n > 0, Shape, "selective_scan on the GPU: empty input {dims:?}");
    let nc = l.div_ceil(GPU_CHUNK);
    ensure!(
        g * nc <= i32::MAX as usize,
        Shape,
        "selective_scan on the GPU: too many sequence chunks for one grid ({dims:?})"
    );
    Ok(nc)
}

/// What every scan kernel of one call reads: the eight inputs (`inputs` in the order of [`ScanInputs`], the
/// token-shaped ones stored as `T`, the parameters as float32) and the sizes; each launch adds its own fields.
fn scan_params<T: GpuElement>(inputs: [&Tensor; 8], dims: ScanDims) -> Result<ScanParams<T>> {
    let op = "selective_scan";
    let token = |x: &Tensor| x.gpu_operand::<T>(op).map(GpuBuffer::ptr);
    let param = |x: &Tensor| x.gpu_operand::<f32>(op).map(GpuBuffer::ptr);
    let [u, delta, a_log, b, c, d_skip, z, delta_bias] = inputs;
    Ok(ScanParams {
        u: token(u)?,
        delta: token(delta)?,
        a_log: param(a_log)?,
        b: token(b)?.offset(dims.bc.b_at),
        c: token(c)?.offset(dims.bc.c_at),
        d_skip: param(d_skip)?,
        z: token(z)?,
        delta_bias: param(delta_bias)?,
        G: dims.g as i64,
        L: dims.l as i64,
        D: dims.dch as i64,
        N: dims.n as i32,
        bc_ld: dims.bc.ld as i64,
        flip: dims.order.kernel_flip(),
        ..Default::default()
    })
}

/// The fields `scan_chunk_combine` reads (a_log, the per-chunk states and sums of dt, the direction and the sizes),
/// in the float32 struct its one instance takes: it never touches the token-shaped tensors.
fn combine_params<T: GpuElement>(p: &ScanParams<T>) -> ScanParams<f32> {
    ScanParams {
        a_log: p.a_log,
        chunk_states: p.chunk_states,
        chunk_dt: p.chunk_dt,
        reverse: p.reverse,
        G: p.G,
        L: p.L,
        D: p.D,
        N: p.N,
        ..Default::default()
    }
}

/// y (stored as `T`, like u), and for sequences of several chunks (when `keep` asks) the float32 state at every
/// chunk start, (G, chunks, Dch, N).
fn forward_gpu<T: GpuElement>(inputs: [&Tensor; 8], dims: ScanDims, keep: bool) -> Result<(Tensor, Option<Tensor>)> {
    let ScanDims { g, l, dch, n, .. } = dims;
    let variant = Variant::<T>::for_states(n)?;
    let nc = gpu_chunks(dims)?;
    let gpu = &inputs[0].gpu_operand::<T>("selective_scan")?.gpu;
    let threads = dch.next_multiple_of(32).min(SCAN_FWD_THREADS);
    // Whole sequences per block (cpb = nc), or one chunk per block for the parallel scan.
    let whole = nc == 1 || g * dch >= SEQUENTIAL_MIN_THREADS;
    let cpb = if whole { nc } else { 1 };
    let cfg = LaunchConfig {
        grid_dim: ((g * nc.div_ceil(cpb)) as u32, dch.div_ceil(threads) as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let shapes = format!("selective_scan {dims:?}");
    let mut y = gpu.alloc_of::<T>(g * l * dch, "selective_scan output")?;
    let base = ScanParams { y: y.ptr_mut(), cpb: cpb as i64, ..scan_params::<T>(inputs, dims)? };
    if nc == 1 {
        // From h = 0, nothing to record.
        gpu.launch(variant.forward, cfg, &base, &shapes)?;
        return Ok((Tensor::from_gpu(y, &[g, l, dch])?, None));
    }
    let mut states = gpu.alloc(g * nc * dch * n, "selective_scan chunk states")?;
    if whole {
        // One pass that records the state at each chunk start.
        let p = ScanParams { chunk_states: states.ptr_mut(), record: 1, ..base };
        gpu.launch(variant.forward, cfg, &p, &shapes)?;
    } else {
        // Pass 1: each chunk's end state from 0 and its sum of dt (no output).
        let mut sum_dt = gpu.alloc(g * nc * dch, "selective_scan chunk step sums")?;
        let p = ScanParams { chunk_states: states.ptr_mut(), chunk_dt: sum_dt.ptr_mut(), summary: 1, ..base };
        gpu.launch(variant.forward, cfg, &p, &shapes)?;
        // Pass 2: end states become true initial states, in place.
        let combine = combine_params(&p);
        gpu.launch(
            kernel::scan_chunk_combine,
            grid_1d(g * dch * n),
            &combine,
            &format!("selective_scan combine {dims:?}"),
        )?;
        // Pass 3: every chunk from its initial state, nothing recorded.
        let p = ScanParams { h_init: states.ptr(), ..base };
        gpu.launch(variant.forward, cfg, &p, &shapes)?;
    }
    let saved = if keep { Some(Tensor::from_gpu(states, &[g, nc, dch, n])?) } else { None };
    Ok((Tensor::from_gpu(y, &[g, l, dch])?, saved))
}

/// The gradients of the eight inputs, each when `needs` asks: the token-shaped ones stored as `T` (like their
/// inputs), those of a_log, D and delta_bias as float32.
fn backward_gpu<T: GpuElement>(
    inputs: [&Tensor; 8],
    dims: ScanDims,
    chunk_states: Option<&Tensor>,
    grad_out: &Tensor,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let ScanDims { g, l, dch, n, bc: layout, .. } = dims;
    let variant = Variant::<T>::for_states(n)?;
    let nc = gpu_chunks(dims)?;
    let gy = grad_out.gpu_operand::<T>("selective_scan backward")?;
    let gpu = &gy.gpu;
    let shapes = format!("selective_scan backward {dims:?}");

    // A block sweeps a whole sequence when its dB, dC accumulator fits, else one chunk.
    let cpb = if l <= variant.whole_sequence_max { nc } else { 1 };
    let groups = nc.div_ceil(cpb);
    let states = match (chunk_states, nc > 1) {
        (Some(s), true) => Some(s.gpu_operand::<f32>("selective_scan backward: chunk states")?),
        (_, false) => None,
        (None, true) => {
            bail!(Mismatch, "selective_scan backward: the forward did not keep its chunk states ({dims:?})")
        }
    };
    let base = ScanParams {
        gy: gy.ptr(),
        // Without saved states (a single chunk) every chunk starts from 0.
        h_init: states.map_or(ConstPtr::NULL, GpuBuffer::ptr),
        cpb: cpb as i64,
        ..scan_params::<T>(inputs, dims)?
    };
    // Sequences split over several blocks: the adjoint carry entering each chunk from the right.
    let carry = if groups > 1 {
        let mut carry = gpu.alloc(g * nc * dch * n, "selective_scan chunk carries")?;
        let mut sum_dt = gpu.alloc(g * nc * dch, "selective_scan chunk step sums")?;
        let p = ScanParams { chunk_states: carry.ptr_mut(), chunk_dt: sum_dt.ptr_mut(), reverse: 1, ..base };
        gpu.launch(kernel::scan_backward_carry::<T>(), grid_1d(g * nc * dch * n), &p, &shapes)?;
        gpu.launch(kernel::scan_chunk_combine, grid_1d(g * dch * n), &combine_params(&p), &shapes)?;
        Some(carry)
    } else {
        None
    };

    let tokens = g * l * dch;
    let mut du = gpu.alloc_of::<T>(tokens, "selective_scan du")?;
    let mut ddelta = gpu.alloc_of::<T>(tokens, "selective_scan ddelta")?;
    let mut dz = gpu.alloc_of::<T>(tokens, "selective_scan dz")?;
    // dB and dC in the columns of b's gradient and c's (one buffer when they share a tensor), zero elsewhere.
    let bc_grad = |what| match layout.fills_rows(n) {
        true => gpu.alloc_of::<T>(g * l * layout.ld, what),
        false => gpu.zeros_of::<T>(g * l * layout.ld, what),
    };
    let mut db = bc_grad("selective_scan dB")?;
    let mut dc = if layout.shared { None } else { Some(bc_grad("selective_scan dC")?) };
    let db_at = db.ptr_mut().offset(layout.b_at);
    let dc_at = dc.as_mut().unwrap_or(&mut db).ptr_mut().offset(layout.c_at);
    // One row per (g, group): [A sum e dt (Dch N) | sum q u (Dch) | sum ddelta (Dch)].
    let width = dch * n + 2 * dch;
    let mut part = gpu.alloc(g * groups * width, "selective_scan parameter partial sums")?;
    let acc_rows = (cpb * GPU_CHUNK).min(l).next_multiple_of(SCAN_BWD_SUB);
    let splits = backward_splits(g * groups, dch.div_ceil(variant.backward_tile_channels()));
    let cfg = LaunchConfig {
        grid_dim: ((g * groups) as u32, splits as u32, 1),
        block_dim: (SCAN_BWD_THREADS as u32, 1, 1),
        shared_mem_bytes: variant.backward_shared_bytes(acc_rows) as u32,
    };
    // Split channels: each split's dB | dC sums, added in split order afterwards.
    let mut bc_part =
        if splits > 1 { Some(gpu.alloc(splits * g * l * 2 * n, "selective_scan dB, dC partial sums")?) } else { None };
    let p = ScanParams {
        carry_in: carry.as_ref().map_or(ConstPtr::NULL, GpuBuffer::ptr),
        du: du.ptr_mut(),
        ddelta: ddelta.ptr_mut(),
        dz: dz.ptr_mut(),
        db: db_at,
        dc: dc_at,
        part: part.ptr_mut(),
        bc_part: bc_part.as_mut().map_or(MutPtr::NULL, GpuBuffer::ptr_mut),
        splits: splits as i32,
        acc_rows: acc_rows as i32,
        ..base
    };
    gpu.launch(variant.backward, cfg, &p, &shapes)?;
    if splits > 1 {
        gpu.launch(kernel::scan_sum_bc::<T>(), grid_1d(g * l * n), &p, &shapes)?;
    }

    let rows = g * groups;
    let da_log = sum_rows(gpu, &part.slice.slice(..), rows, dch * n, width, "selective_scan da_log")?;
    let dd = sum_rows(gpu, &part.slice.slice(dch * n..), rows, dch, width, "selective_scan dD")?;
    let dbias = sum_rows(gpu, &part.slice.slice(dch * n + dch..), rows, dch, width, "selective_scan ddelta_bias")?;

    // Each gradient has its input's shape and storage type: T for the token-shaped ones, float32 for the parameters.
    let [u, delta, a_log, b, c, d_skip, z, delta_bias] = inputs.map(Tensor::shape);
    let grads = vec![
        Some(Tensor::from_gpu(du, u)?),
        Some(Tensor::from_gpu(ddelta, delta)?),
        Some(Tensor::from_gpu(da_log, a_log)?),
        Some(Tensor::from_gpu(db, b)?),
        dc.map(|dc| Tensor::from_gpu(dc, c)).transpose()?,
        Some(Tensor::from_gpu(dd, d_skip)?),
        Some(Tensor::from_gpu(dz, z)?),
        Some(Tensor::from_gpu(dbias, delta_bias)?),
    ];
    Ok(layout.wanted(grads, needs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_splits_cover_every_tile_in_nonempty_runs() {
        // The kernel's runs: split s of `splits` takes tiles s per .. min(tiles, (s + 1) per), per = ceil(tiles /
        // splits). Every tile in exactly one run, none empty, and the split only where blocks are few.
        for blocks in [1, 2, 12, 54, 300, 1023, 1024, 26_880] {
            for tiles in [1, 2, 13, 20, 32, 64] {
                let splits = backward_splits(blocks, tiles);
                let per = tiles.div_ceil(splits);
                assert!(splits >= 1 && splits <= tiles, "blocks {blocks} tiles {tiles}: {splits} splits");
                assert!(
                    splits * per >= tiles && (splits - 1) * per < tiles,
                    "blocks {blocks} tiles {tiles}: {splits} x {per}"
                );
                if blocks >= BACKWARD_MIN_BLOCKS {
                    assert_eq!(splits, 1, "blocks {blocks}");
                } else {
                    assert!(
                        blocks * splits >= BACKWARD_MIN_BLOCKS.min(blocks * tiles) / 2,
                        "blocks {blocks} tiles {tiles}"
                    );
                }
            }
        }
        // amos-2d's deepest windowed layers: 12 sequences of 1024 channels (32 tiles of 32) -> 32 splits.
        assert_eq!(backward_splits(12, 32), 32);
    }
}
