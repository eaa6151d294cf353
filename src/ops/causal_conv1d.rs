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
//! The loops keep the channel axis innermost, where tokens are contiguous; the weight is used transposed to (K, C)
//! so that its rows are contiguous too.

use crate::autograd::{Backward, Tape};
use crate::ops::seq_dims;
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, ensure, Result};

/// Causal depthwise conv of tokens `x` (G, L, C) with `w` (C, K) and `bias` (C); returns (G, L, C).
pub fn causal_conv1d(tape: &mut Tape, x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let d = ConvDims::of(x, w, bias)?;
    let y = by_dtype!(x.dtype(), forward_cpu(x, w, bias, d))?;
    tape.record(&[x, w, bias], &y, CausalConv1dBackward { x: x.clone(), w: w.clone(), dims: d });
    Ok(y)
}

/// Sequences G, length L, channels C, kernel size K.
#[derive(Clone, Copy, Debug)]
struct ConvDims {
    g: usize,
    l: usize,
    c: usize,
    k: usize,
}

impl ConvDims {
    fn of(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<ConvDims> {
        let (g, l, c) = seq_dims(x, "causal_conv1d")?;
        ensure!(
            w.rank() == 2 && w.shape()[0] == c && w.shape()[1] > 0,
            Shape,
            "causal_conv1d: weight must be (C, K) with C = {c} channels of the input {:?} and K >= 1, got shape {:?}",
            x.shape(),
            w.shape()
        );
        x.check_same_kind(w, "causal_conv1d")?;
        x.check_same_kind(bias, "causal_conv1d")?;
        bias.check_shape(&[c], "causal_conv1d: bias (C)")?;
        Ok(ConvDims { g, l, c, k: w.shape()[1] })
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
    let ConvDims { g, l, c, k } = d;
    let (xv, bv) = (x.cpu::<T>()?, bias.cpu::<T>()?);
    let wt = transpose_weight(w.cpu::<T>()?, c, k);
    let mut y = vec![T::zero(); g * l * c];
    for gi in 0..g {
        let xs = &xv[gi * l * c..(gi + 1) * l * c];
        for t in 0..l {
            let yr = &mut y[(gi * l + t) * c..(gi * l + t + 1) * c];
            yr.copy_from_slice(bv);
            // Tap k reads token t - (K-1) + k; the first valid tap is K-1-t when t < K-1.
            for ki in (k - 1).saturating_sub(t)..k {
                let s = t + ki + 1 - k;
                let (xr, wr) = (&xs[s * c..(s + 1) * c], &wt[ki * c..(ki + 1) * c]);
                for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(wr) {
                    *yv += wv * xv;
                }
            }
        }
    }
    Tensor::from_vec(y, x.shape())
}

struct CausalConv1dBackward {
    x: Tensor,
    w: Tensor,
    dims: ConvDims,
}

fn backward_cpu<T: Real>(
    x: &Tensor,
    w: &Tensor,
    gout: &Tensor,
    d: ConvDims,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let ConvDims { g, l, c, k } = d;
    let (xv, gv) = (x.cpu::<T>()?, gout.cpu::<T>()?);
    let wt = transpose_weight(w.cpu::<T>()?, c, k);
    let mut dx = needs[0].then(|| vec![T::zero(); g * l * c]);
    let mut dwt = needs[1].then(|| vec![T::zero(); k * c]);
    let mut db = needs[2].then(|| vec![T::zero(); c]);
    for gi in 0..g {
        let base = gi * l * c;
        for t in 0..l {
            let gr = &gv[base + t * c..base + (t + 1) * c];
            if let Some(db) = db.as_mut() {
                for (dbv, &gvv) in db.iter_mut().zip(gr) {
                    *dbv += gvv;
                }
            }
            for ki in (k - 1).saturating_sub(t)..k {
                let s = base + (t + ki + 1 - k) * c;
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
        "causal_conv1d"
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        by_dtype!(self.x.dtype(), backward_cpu(&self.x, &self.w, grad_out, self.dims, needs))
    }
}
