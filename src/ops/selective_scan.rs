//! The Mamba v1 selective scan, fused: softplus step size, discretisation, state recurrence, C contraction, D skip
//! and SiLU(z) gate in one op, as mamba_ssm's `selective_scan_fn(u, delta, A, B, C, D, z, delta_bias,
//! delta_softplus=True)` with B and C shared by all channels (one per token).
//!
//! Shapes: u, delta, z (G, L, Dch); a_log (Dch, N); b, c (G, L, N); d_skip, delta_bias (Dch); output y (G, L, Dch).
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
//! dA_t dh_t. The buffers are reused for every (g, d), so memory stays O(L N) rather than O(G L Dch N).

use crate::autograd::{Backward, Tape};
use crate::ops::activation::Activation;
use crate::ops::seq_dims;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, ensure, Result};

/// The eight inputs of [`selective_scan`], in the order they are recorded on the tape.
#[derive(Clone, Copy, Debug)]
pub struct ScanInputs<'a> {
    /// The scanned signal u (G, L, Dch).
    pub u: &'a Tensor,
    /// The step size before bias and softplus (G, L, Dch).
    pub delta: &'a Tensor,
    /// log(-A), the state matrix's parameter (Dch, N).
    pub a_log: &'a Tensor,
    /// Input projection of each token, shared by all channels (G, L, N).
    pub b: &'a Tensor,
    /// Output projection of each token, shared by all channels (G, L, N).
    pub c: &'a Tensor,
    /// Skip weight D (Dch).
    pub d_skip: &'a Tensor,
    /// Gate input z (G, L, Dch); the output is multiplied by SiLU(z).
    pub z: &'a Tensor,
    /// Bias added to delta before the softplus (Dch).
    pub delta_bias: &'a Tensor,
}

impl<'a> ScanInputs<'a> {
    fn all(&self) -> [&'a Tensor; 8] {
        [self.u, self.delta, self.a_log, self.b, self.c, self.d_skip, self.z, self.delta_bias]
    }
}

/// The fused selective scan (see the module doc); returns y (G, L, Dch).
pub fn selective_scan(tape: &mut Tape, inp: &ScanInputs) -> Result<Tensor> {
    let dims = ScanDims::of(inp)?;
    let y = by_dtype!(inp.u.dtype(), forward_cpu(inp, dims))?;
    let all = inp.all();
    let saved = ScanBackward { inputs: all.map(|t| t.clone()), dims };
    tape.record(&all, &y, saved);
    Ok(y)
}

/// Sequences G, length L, channels Dch, state size N.
#[derive(Clone, Copy, Debug)]
struct ScanDims {
    g: usize,
    l: usize,
    dch: usize,
    n: usize,
}

impl ScanDims {
    fn of(inp: &ScanInputs) -> Result<ScanDims> {
        let op = "selective_scan";
        let (g, l, dch) = seq_dims(inp.u, op)?;
        for t in inp.all() {
            inp.u.check_same_kind(t, op)?;
        }
        ensure!(
            inp.a_log.rank() == 2 && inp.a_log.shape()[0] == dch,
            Shape,
            "{op}: a_log must be (Dch, N) with Dch = {dch} channels of u {:?}, got shape {:?}",
            inp.u.shape(),
            inp.a_log.shape()
        );
        let n = inp.a_log.shape()[1];
        inp.delta.check_shape(&[g, l, dch], "selective_scan: delta (G, L, Dch) like u")?;
        inp.z.check_shape(&[g, l, dch], "selective_scan: z (G, L, Dch) like u")?;
        inp.b.check_shape(&[g, l, n], "selective_scan: b (G, L, N), N from a_log")?;
        inp.c.check_shape(&[g, l, n], "selective_scan: c (G, L, N), N from a_log")?;
        inp.d_skip.check_shape(&[dch], "selective_scan: d_skip (Dch)")?;
        inp.delta_bias.check_shape(&[dch], "selective_scan: delta_bias (Dch)")?;
        Ok(ScanDims { g, l, dch, n })
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

fn forward_cpu<T: Real>(inp: &ScanInputs, dims: ScanDims) -> Result<Tensor> {
    let ScanDims { g, l, dch, n } = dims;
    let s = Slices::<T>::of(inp.all())?;
    let mut y = vec![T::zero(); g * l * dch];
    let mut a = vec![T::zero(); n];
    let mut h = vec![T::zero(); n];
    for gi in 0..g {
        for d in 0..dch {
            s.fill_a(d, &mut a);
            h.fill(T::zero());
            let (dd, bias) = (s.d_skip[d], s.delta_bias[d]);
            for t in 0..l {
                let i = (gi * l + t) * dch + d;
                let row = (gi * l + t) * n;
                let (bt, ct) = (&s.b[row..row + n], &s.c[row..row + n]);
                let u = s.u[i];
                let dt = Activation::Softplus.value(s.delta[i] + bias);
                let du = dt * u;
                let mut acc = T::zero();
                for (((hn, &an), &bn), &cn) in h.iter_mut().zip(&a).zip(bt).zip(ct) {
                    *hn = (dt * an).exp() * *hn + du * bn;
                    acc += cn * *hn;
                }
                y[i] = (acc + dd * u) * Activation::Silu.value(s.z[i]);
            }
        }
    }
    Tensor::from_vec(y, inp.u.shape())
}

struct ScanBackward {
    inputs: [Tensor; 8],
    dims: ScanDims,
}

fn backward_cpu<T: Real>(op: &ScanBackward, gout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let ScanDims { g, l, dch, n } = op.dims;
    let s = Slices::<T>::of(op.inputs.each_ref())?;
    let gy = gout.cpu::<T>()?;
    let tok = g * l * dch;
    let (mut gu, mut gdelta, mut gz) = (vec![T::zero(); tok], vec![T::zero(); tok], vec![T::zero(); tok]);
    let (mut gb, mut gc) = (vec![T::zero(); g * l * n], vec![T::zero(); g * l * n]);
    // dL/dA, turned into dL/da_log at the end.
    let mut ga = vec![T::zero(); dch * n];
    let (mut gd, mut gbias) = (vec![T::zero(); dch], vec![T::zero(); dch]);

    // Per (g, d) work buffers: h_{t-1} in row t and h_t in row t + 1 of `hs`; dA_t in row t of `das`.
    let mut hs = vec![T::zero(); (l + 1) * n];
    let mut das = vec![T::zero(); l * n];
    let (mut dts, mut ss) = (vec![T::zero(); l], vec![T::zero(); l]);
    let mut a = vec![T::zero(); n];
    let mut dh = vec![T::zero(); n];
    let mut ga_local = vec![T::zero(); n];

    for gi in 0..g {
        for d in 0..dch {
            s.fill_a(d, &mut a);
            let (dd, bias) = (s.d_skip[d], s.delta_bias[d]);

            // Recompute the forward of this sequence-channel.
            for t in 0..l {
                let i = (gi * l + t) * dch + d;
                let row = (gi * l + t) * n;
                let (bt, ct) = (&s.b[row..row + n], &s.c[row..row + n]);
                let u = s.u[i];
                let dt = Activation::Softplus.value(s.delta[i] + bias);
                let du = dt * u;
                let (prev, cur) = hs[t * n..(t + 2) * n].split_at_mut(n);
                let dat = &mut das[t * n..(t + 1) * n];
                let mut acc = T::zero();
                for (((((hn, &hp), dan), &an), &bn), &cn) in
                    cur.iter_mut().zip(&*prev).zip(dat.iter_mut()).zip(&a).zip(bt).zip(ct)
                {
                    *dan = (dt * an).exp();
                    *hn = *dan * hp + du * bn;
                    acc += cn * *hn;
                }
                dts[t] = dt;
                ss[t] = acc + dd * u;
            }

            // Sweep backwards; `dh` holds dA_{t+1} dh_{t+1} on entry to step t.
            dh.fill(T::zero());
            ga_local.fill(T::zero());
            let (mut gd_acc, mut gbias_acc) = (T::zero(), T::zero());
            for t in (0..l).rev() {
                let i = (gi * l + t) * dch + d;
                let row = (gi * l + t) * n;
                let (u, z, dt) = (s.u[i], s.z[i], dts[t]);
                gz[i] = gy[i] * ss[t] * Activation::Silu.derivative(z);
                let q = gy[i] * Activation::Silu.value(z);
                gd_acc += q * u;
                let du = dt * u;
                let (bt, ct) = (&s.b[row..row + n], &s.c[row..row + n]);
                let (gbt, gct) = (&mut gb[row..row + n], &mut gc[row..row + n]);
                let (hp, hc) = (&hs[t * n..(t + 1) * n], &hs[(t + 1) * n..(t + 2) * n]);
                let dat = &das[t * n..(t + 1) * n];
                let (mut dh_b, mut e_a) = (T::zero(), T::zero());
                for n_ in 0..n {
                    let dhn = dh[n_] + ct[n_] * q;
                    gct[n_] += q * hc[n_];
                    gbt[n_] += dhn * du;
                    dh_b += dhn * bt[n_];
                    let e = dhn * dat[n_] * hp[n_];
                    e_a += e * a[n_];
                    ga_local[n_] += e * dt;
                    dh[n_] = dhn * dat[n_];
                }
                gu[i] = q * dd + dt * dh_b;
                let gdt = u * dh_b + e_a;
                let gdl = gdt * Activation::Softplus.derivative(s.delta[i] + bias);
                gdelta[i] = gdl;
                gbias_acc += gdl;
            }
            for (gan, &gl) in ga[d * n..(d + 1) * n].iter_mut().zip(&ga_local) {
                *gan += gl;
            }
            gd[d] += gd_acc;
            gbias[d] += gbias_acc;
        }
    }
    for (d, row) in ga.chunks_exact_mut(n.max(1)).enumerate().take(dch) {
        s.fill_a(d, &mut a);
        for (gan, &an) in row.iter_mut().zip(&a) {
            *gan *= an;
        }
    }

    let grads = [gu, gdelta, ga, gb, gc, gd, gz, gbias];
    grads
        .into_iter()
        .zip(&op.inputs)
        .zip(needs)
        .map(|((v, x), &need)| need.then(|| Tensor::from_vec(v, x.shape())).transpose())
        .collect()
}

impl Backward for ScanBackward {
    fn name(&self) -> &'static str {
        "selective_scan"
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        by_dtype!(self.inputs[0].dtype(), backward_cpu(self, grad_out, needs))
    }
}
