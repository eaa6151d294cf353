//! Instance normalisation with a learnable per-channel scale and shift (PyTorch `InstanceNorm{2,3}d(affine=True)`).
//!
//! For a feature map x of shape (N, C, [D,] H, W), each plane p = (n, c) of V = D*H*W voxels is normalised with its
//! own mean and biased variance:
//!
//! ```text
//!   mu_p   = (1/V) sum_i x_pi
//!   var_p  = (1/V) sum_i (x_pi - mu_p)^2
//!   rstd_p = 1 / sqrt(var_p + eps)
//!   xhat_pi = (x_pi - mu_p) * rstd_p
//!   y_pi    = gamma_c * xhat_pi + beta_c
//! ```
//!
//! Backward, with g = dL/dy and the plane means <g>_p = (1/V) sum_i g_pi, <g xhat>_p = (1/V) sum_i g_pi xhat_pi
//! (the derivatives of mu and rstd with respect to every x_pi make the two correction terms):
//!
//! ```text
//!   dL/dx_pi    = gamma_c * rstd_p * (g_pi - <g>_p - xhat_pi * <g xhat>_p)
//!   dL/dgamma_c = sum_n sum_i g_pi xhat_pi
//!   dL/dbeta_c  = sum_n sum_i g_pi
//! ```
//!
//! The statistics are computed in two passes (mean, then the mean squared deviation) with float64 accumulation for
//! both dtypes, so a large common offset in x does not cancel the variance away. mu and rstd are saved per plane in
//! float64 (N*C numbers), and xhat is formed in float64 in both passes: rounding mu to float32 would shift a map
//! with mean 1000 by up to half an ulp of 1000 (3e-5 after normalisation), while this way only the final rounding
//! of y and dL/dx to the tensor's dtype remains. The backward recomputes exactly the xhat of the forward.

use crate::autograd::{Backward, Tape};
use crate::ops::MapDims;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, ensure, Result};

/// The eps of every InstanceNorm in LKM-UNet (PyTorch's default).
pub const IN_EPS: f64 = 1e-5;

/// Instance normalisation of a feature map `x` (N, C, H, W) or (N, C, D, H, W): each (n, c) plane is normalised
/// over its spatial axes with its biased variance and `eps`, then scaled by `gamma[c]` and shifted by `beta[c]`
/// (`gamma`, `beta` of shape (C)).
pub fn instance_norm(tape: &mut Tape, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = MapDims::of(x, "instance_norm")?;
    x.check_same_kind(gamma, "instance_norm gamma")?;
    x.check_same_kind(beta, "instance_norm beta")?;
    gamma.check_shape(&[dims.c], "instance_norm gamma (one per channel of the input)")?;
    beta.check_shape(&[dims.c], "instance_norm beta (one per channel of the input)")?;
    ensure!(eps.is_finite() && eps > 0.0, Shape, "instance_norm: eps must be positive and finite, got {eps}");

    let (y, mean, rstd) = by_dtype!(x.dtype(), forward_cpu(x, gamma, beta, dims, eps))?;
    tape.record(&[x, gamma, beta], &y, InstanceNormBackward { x: x.clone(), gamma: gamma.clone(), mean, rstd, dims });
    Ok(y)
}

/// Mean and 1/sqrt(var + eps) of one plane or row, in two passes with float64 accumulation (empty: 0 and
/// 1/sqrt(eps)).
pub(crate) fn moments<T: Real>(v: &[T], eps: f64) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| x.to_f64()).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| {
            let d = x.to_f64() - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Returns y and the per-plane mean and rstd, each of shape (N, C) in float64.
fn forward_cpu<T: Real>(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    dims: MapDims,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xs, gs, bs) = (x.cpu::<T>()?, gamma.cpu::<T>()?, beta.cpu::<T>()?);
    let v = dims.voxels();
    let planes = dims.n * dims.c;
    let mut y = vec![T::zero(); xs.len()];
    let mut mean = Vec::with_capacity(planes);
    let mut rstd = Vec::with_capacity(planes);
    for p in 0..planes {
        let c = p % dims.c;
        let xp = &xs[p * v..(p + 1) * v];
        let (m, r) = moments(xp, eps);
        let scale = gs[c].to_f64() * r;
        let shift = bs[c].to_f64();
        for (yv, &xv) in y[p * v..(p + 1) * v].iter_mut().zip(xp) {
            *yv = T::from_f64((xv.to_f64() - m) * scale + shift);
        }
        mean.push(m);
        rstd.push(r);
    }
    let stats_shape = [dims.n, dims.c];
    Ok((Tensor::from_vec(y, x.shape())?, Tensor::from_vec(mean, &stats_shape)?, Tensor::from_vec(rstd, &stats_shape)?))
}

struct InstanceNormBackward {
    x: Tensor,
    gamma: Tensor,
    /// Per-plane mean, shape (N, C), float64.
    mean: Tensor,
    /// Per-plane 1/sqrt(var + eps), shape (N, C), float64.
    rstd: Tensor,
    dims: MapDims,
}

impl Backward for InstanceNormBackward {
    fn name(&self) -> &'static str {
        "instance_norm"
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        by_dtype!(self.x.dtype(), backward_cpu(self, grad_out, needs))
    }
}

fn backward_cpu<T: Real>(b: &InstanceNormBackward, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let (xs, gs, gamma) = (b.x.cpu::<T>()?, grad_out.cpu::<T>()?, b.gamma.cpu::<T>()?);
    let (ms, rs) = (b.mean.cpu::<f64>()?, b.rstd.cpu::<f64>()?);
    let dims = b.dims;
    let v = dims.voxels();
    let inv_v = 1.0 / v.max(1) as f64;
    let mut dx = if needs[0] { vec![T::zero(); xs.len()] } else { Vec::new() };
    let mut dgamma = vec![0.0f64; dims.c];
    let mut dbeta = vec![0.0f64; dims.c];
    for p in 0..dims.n * dims.c {
        let c = p % dims.c;
        let (m, r) = (ms[p], rs[p]);
        let xp = &xs[p * v..(p + 1) * v];
        let gp = &gs[p * v..(p + 1) * v];
        let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
        for (&xv, &gv) in xp.iter().zip(gp) {
            let g = gv.to_f64();
            sum_g += g;
            sum_gx += g * (xv.to_f64() - m) * r;
        }
        dgamma[c] += sum_gx;
        dbeta[c] += sum_g;
        if needs[0] {
            let k = gamma[c].to_f64() * r;
            let (mean_g, mean_gx) = (sum_g * inv_v, sum_gx * inv_v);
            for ((d, &xv), &gv) in dx[p * v..(p + 1) * v].iter_mut().zip(xp).zip(gp) {
                let xhat = (xv.to_f64() - m) * r;
                *d = T::from_f64(k * (gv.to_f64() - mean_g - xhat * mean_gx));
            }
        }
    }
    let per_channel = |s: Vec<f64>| Tensor::from_vec(s.into_iter().map(T::from_f64).collect::<Vec<T>>(), &[dims.c]);
    Ok(vec![
        if needs[0] { Some(Tensor::from_vec(dx, b.x.shape())?) } else { None },
        if needs[1] { Some(per_channel(dgamma)?) } else { None },
        if needs[2] { Some(per_channel(dbeta)?) } else { None },
    ])
}
