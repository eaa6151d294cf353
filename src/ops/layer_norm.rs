//! Layer normalisation over the last axis (PyTorch `LayerNorm(C)`), for token sequences (G, L, C) or any tensor
//! whose last axis holds the C channels.
//!
//! Each row r (one token: C contiguous values) is normalised with its own mean and biased variance, then scaled and
//! shifted per channel:
//!
//! ```text
//!   mu_r   = (1/C) sum_c x_rc
//!   var_r  = (1/C) sum_c (x_rc - mu_r)^2
//!   rstd_r = 1 / sqrt(var_r + eps)
//!   xhat_rc = (x_rc - mu_r) * rstd_r
//!   y_rc    = gamma_c * xhat_rc + beta_c
//! ```
//!
//! Backward, with g = dL/dy, h_rc = gamma_c g_rc (the gradient reaching xhat) and the row means
//! <h>_r = (1/C) sum_c h_rc, <h xhat>_r = (1/C) sum_c h_rc xhat_rc:
//!
//! ```text
//!   dL/dx_rc    = rstd_r * (h_rc - <h>_r - xhat_rc * <h xhat>_r)
//!   dL/dgamma_c = sum_r g_rc xhat_rc
//!   dL/dbeta_c  = sum_r g_rc
//! ```
//!
//! As in instance norm, the statistics use two passes with float64 accumulation, mu and rstd are saved per row in
//! float64, and xhat is formed in float64 in both passes, so only the final rounding to the tensor's dtype remains.

use crate::autograd::{Backward, Tape};
use crate::ops::instance_norm::moments;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, ensure, Result};

/// The eps of the LayerNorm in front of every Mamba layer (PyTorch's default).
pub const LN_EPS: f64 = 1e-5;

/// Layer normalisation of `x` over its last axis (size C) with `eps`, then `gamma[c] * xhat + beta[c]` (`gamma`,
/// `beta` of shape (C)). `x` may have any rank; every position of the leading axes is one row.
pub fn layer_norm(tape: &mut Tape, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.shape().last().copied().unwrap_or(0);
    ensure!(c > 0, Shape, "layer_norm: the last axis (channels) of x is empty, shape {:?}", x.shape());
    x.check_same_kind(gamma, "layer_norm gamma")?;
    x.check_same_kind(beta, "layer_norm beta")?;
    gamma.check_shape(&[c], "layer_norm gamma (one per element of the last axis of the input)")?;
    beta.check_shape(&[c], "layer_norm beta (one per element of the last axis of the input)")?;
    ensure!(eps.is_finite() && eps > 0.0, Shape, "layer_norm: eps must be positive and finite, got {eps}");

    let (y, mean, rstd) = by_dtype!(x.dtype(), forward_cpu(x, gamma, beta, eps))?;
    tape.record(&[x, gamma, beta], &y, LayerNormBackward { x: x.clone(), gamma: gamma.clone(), mean, rstd });
    Ok(y)
}

/// Returns y and the per-row mean and rstd, each of shape (rows) in float64.
fn forward_cpu<T: Real>(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let (xs, gs, bs) = (x.cpu::<T>()?, gamma.cpu::<T>()?, beta.cpu::<T>()?);
    let c = gs.len();
    let rows = xs.len() / c;
    let mut y = vec![T::zero(); xs.len()];
    let mut mean = Vec::with_capacity(rows);
    let mut rstd = Vec::with_capacity(rows);
    for (xr, yr) in xs.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        let (m, r) = moments(xr, eps);
        for (((yv, &xv), &g), &b) in yr.iter_mut().zip(xr).zip(gs).zip(bs) {
            *yv = T::from_f64((xv.to_f64() - m) * r * g.to_f64() + b.to_f64());
        }
        mean.push(m);
        rstd.push(r);
    }
    // A tensor with no rows still needs a valid (non-empty) shape for its statistics.
    let stats_shape = [rows];
    Ok((Tensor::from_vec(y, x.shape())?, Tensor::from_vec(mean, &stats_shape)?, Tensor::from_vec(rstd, &stats_shape)?))
}

struct LayerNormBackward {
    x: Tensor,
    gamma: Tensor,
    /// Per-row mean, shape (rows), float64.
    mean: Tensor,
    /// Per-row 1/sqrt(var + eps), shape (rows), float64.
    rstd: Tensor,
}

impl Backward for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer_norm"
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        by_dtype!(self.x.dtype(), backward_cpu(self, grad_out, needs))
    }
}

fn backward_cpu<T: Real>(b: &LayerNormBackward, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let (xs, gs, gamma) = (b.x.cpu::<T>()?, grad_out.cpu::<T>()?, b.gamma.cpu::<T>()?);
    let (ms, rs) = (b.mean.cpu::<f64>()?, b.rstd.cpu::<f64>()?);
    let c = gamma.len();
    let inv_c = 1.0 / c as f64;
    let gamma64: Vec<f64> = gamma.iter().map(|&w| w.to_f64()).collect();
    let want_params = needs[1] || needs[2];
    let mut dx = if needs[0] { vec![T::zero(); xs.len()] } else { Vec::new() };
    let mut dgamma = vec![0.0f64; if want_params { c } else { 0 }];
    let mut dbeta = vec![0.0f64; if want_params { c } else { 0 }];
    // One row's xhat, reused by both sums and dL/dx.
    let mut xhat = vec![0.0f64; c];
    for (row, (xr, gr)) in xs.chunks_exact(c).zip(gs.chunks_exact(c)).enumerate() {
        let (m, r) = (ms[row], rs[row]);
        for (xh, &xv) in xhat.iter_mut().zip(xr) {
            *xh = (xv.to_f64() - m) * r;
        }
        if want_params {
            for (((dgv, dbv), &xh), &gv) in dgamma.iter_mut().zip(dbeta.iter_mut()).zip(&xhat).zip(gr) {
                let g = gv.to_f64();
                *dgv += g * xh;
                *dbv += g;
            }
        }
        if needs[0] {
            let (mut sum_h, mut sum_hx) = (0.0f64, 0.0f64);
            for ((&xh, &gv), &w) in xhat.iter().zip(gr).zip(&gamma64) {
                let h = gv.to_f64() * w;
                sum_h += h;
                sum_hx += h * xh;
            }
            let (mean_h, mean_hx) = (sum_h * inv_c, sum_hx * inv_c);
            let dxr = &mut dx[row * c..(row + 1) * c];
            for (((d, &xh), &gv), &w) in dxr.iter_mut().zip(&xhat).zip(gr).zip(&gamma64) {
                *d = T::from_f64(r * (gv.to_f64() * w - mean_h - xh * mean_hx));
            }
        }
    }
    let per_channel = |s: Vec<f64>| Tensor::from_vec(s.into_iter().map(T::from_f64).collect::<Vec<T>>(), &[c]);
    Ok(vec![
        if needs[0] { Some(Tensor::from_vec(dx, b.x.shape())?) } else { None },
        if needs[1] { Some(per_channel(dgamma)?) } else { None },
        if needs[2] { Some(per_channel(dbeta)?) } else { None },
    ])
}
