//! Fully connected layer over the last axis (Mamba's in_proj, x_proj, dt_proj and the layer's out_proj).
//!
//! With the leading axes of `x` flattened to M rows, x (M, K), weight W (N, K) in PyTorch's layout (out, in) and an
//! optional bias b (N):
//!
//! ```text
//!   y[i, j] = sum_k x[i, k] W[j, k] + b[j]              y = x W^T + b,  (M, N)
//!
//!   dL/dx[i, k] = sum_j g[i, j] W[j, k]                 dx = g W
//!   dL/dW[j, k] = sum_i g[i, j] x[i, k]                 dW = g^T x  (summed over all M rows)
//!   dL/db[j]    = sum_i g[i, j]
//! ```
//!
//! Every loop runs over contiguous rows: the forward takes dot products of rows of x with rows of W, four rows of x at
//! a time so that each load of W serves four of them; dx adds rows of W scaled by g[i, j]; dW adds the outer product
//! g[i, :] x[i, :] one row i at a time.

use crate::autograd::{Backward, Tape};
use crate::tensor::{Real, Tensor};
use crate::{by_dtype, ensure, Result};

/// `y = x W^T + b` over the last axis of `x` (..., Cin), with `w` (Cout, Cin) and `bias` (Cout); returns (..., Cout).
pub fn linear(tape: &mut Tape, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let d = LinearDims::of(x, w, bias)?;
    let y = by_dtype!(x.dtype(), forward_cpu(x, w, bias, d))?;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("rank checked") = d.n;
    let y = y.with_shape(&out_shape)?;
    let saved = || LinearBackward { x: x.clone(), w: w.clone(), has_bias: bias.is_some(), dims: d };
    match bias {
        Some(b) => tape.record(&[x, w, b], &y, saved()),
        None => tape.record(&[x, w], &y, saved()),
    }
    Ok(y)
}

/// Rows M, input features K, output features N.
#[derive(Clone, Copy, Debug)]
struct LinearDims {
    m: usize,
    k: usize,
    n: usize,
}

impl LinearDims {
    fn of(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<LinearDims> {
        let xs = x.shape();
        ensure!(xs.len() >= 2, Shape, "linear: input must have rank >= 2 (..., Cin), got shape {xs:?}");
        let k = xs[xs.len() - 1];
        let m = xs[..xs.len() - 1].iter().product();
        ensure!(
            w.rank() == 2 && w.shape()[1] == k,
            Shape,
            "linear: weight must be (Cout, Cin) with Cin = {k} (the input's last axis of {xs:?}), got shape {:?}",
            w.shape()
        );
        x.check_same_kind(w, "linear")?;
        let n = w.shape()[0];
        if let Some(b) = bias {
            x.check_same_kind(b, "linear")?;
            b.check_shape(&[n], "linear: bias (Cout)")?;
        }
        Ok(LinearDims { m, k, n })
    }
}

/// sum_i a[i] b[i] with eight independent partial sums, which the compiler keeps in vector lanes.
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = T::zero();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += *x * *y;
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    s + tail
}

/// The dot products of four rows `x` with one row `w`, with four partial sums per row (vector lanes).
fn dot4<T: Real>(x: [&[T]; 4], w: &[T]) -> [T; 4] {
    let mut acc = [[T::zero(); 4]; 4];
    let k4 = w.len() / 4 * 4;
    for c in (0..k4).step_by(4) {
        let wc = &w[c..c + 4];
        for r in 0..4 {
            let xc = &x[r][c..c + 4];
            for l in 0..4 {
                acc[r][l] += xc[l] * wc[l];
            }
        }
    }
    std::array::from_fn(|r| {
        let mut s = (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]);
        for c in k4..w.len() {
            s += x[r][c] * w[c];
        }
        s
    })
}

/// y += a x.
fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

fn forward_cpu<T: Real>(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, d: LinearDims) -> Result<Tensor> {
    let (xv, wv) = (x.cpu::<T>()?, w.cpu::<T>()?);
    let bv = bias.map(|b| b.cpu::<T>()).transpose()?;
    let mut y = vec![T::zero(); d.m * d.n];
    if d.k > 0 && d.n > 0 {
        // Four rows of x at a time share each load of a row of W.
        let mut yq = y.chunks_exact_mut(4 * d.n);
        let mut xq = xv.chunks_exact(4 * d.k);
        for (yb, xb) in (&mut yq).zip(&mut xq) {
            let x4: [&[T]; 4] = std::array::from_fn(|r| &xb[r * d.k..(r + 1) * d.k]);
            for (j, wr) in wv.chunks_exact(d.k).enumerate() {
                let s = dot4(x4, wr);
                for r in 0..4 {
                    yb[r * d.n + j] = s[r];
                }
            }
        }
        for (yr, xr) in yq.into_remainder().chunks_exact_mut(d.n).zip(xq.remainder().chunks_exact(d.k)) {
            for (yj, wr) in yr.iter_mut().zip(wv.chunks_exact(d.k)) {
                *yj = dot(xr, wr);
            }
        }
    }
    if let Some(bv) = bv {
        for yr in y.chunks_exact_mut(d.n) {
            for (yj, &bj) in yr.iter_mut().zip(bv) {
                *yj += bj;
            }
        }
    }
    Tensor::from_vec(y, &[d.m, d.n])
}

struct LinearBackward {
    x: Tensor,
    w: Tensor,
    has_bias: bool,
    dims: LinearDims,
}

/// dx (M, K), dW (N, K) and db (N), each computed only when wanted.
type LinearGrads<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

fn backward_cpu<T: Real>(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    d: LinearDims,
    needs: [bool; 3],
) -> Result<LinearGrads<T>> {
    let (xv, wv, gv) = (x.cpu::<T>()?, w.cpu::<T>()?, g.cpu::<T>()?);
    let LinearDims { m, k, n } = d;
    let dx = needs[0].then(|| {
        let mut dx = vec![T::zero(); m * k];
        if k > 0 && n > 0 {
            for (dxr, gr) in dx.chunks_exact_mut(k).zip(gv.chunks_exact(n)) {
                for (&gj, wr) in gr.iter().zip(wv.chunks_exact(k)) {
                    axpy(dxr, gj, wr);
                }
            }
        }
        dx
    });
    let dw = needs[1].then(|| {
        let mut dw = vec![T::zero(); n * k];
        if k > 0 && n > 0 {
            for (gr, xr) in gv.chunks_exact(n).zip(xv.chunks_exact(k)) {
                for (&gj, dwr) in gr.iter().zip(dw.chunks_exact_mut(k)) {
                    axpy(dwr, gj, xr);
                }
            }
        }
        dw
    });
    let db = needs[2].then(|| {
        let mut db = vec![T::zero(); n];
        if n > 0 {
            for gr in gv.chunks_exact(n) {
                for (dbj, &gj) in db.iter_mut().zip(gr) {
                    *dbj += gj;
                }
            }
        }
        db
    });
    Ok((dx, dw, db))
}

fn grads_to_tensors<T: Real>(grads: LinearGrads<T>, x: &Tensor, w: &Tensor, n: usize) -> Result<[Option<Tensor>; 3]> {
    let (dx, dw, db) = grads;
    Ok([
        dx.map(|v| Tensor::from_vec(v, x.shape())).transpose()?,
        dw.map(|v| Tensor::from_vec(v, w.shape())).transpose()?,
        db.map(|v| Tensor::from_vec(v, &[n])).transpose()?,
    ])
}

impl Backward for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn backward(&self, grad_out: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        fn cpu<T: Real>(op: &LinearBackward, g: &Tensor, needs: [bool; 3]) -> Result<[Option<Tensor>; 3]> {
            let grads = backward_cpu::<T>(&op.x, &op.w, g, op.dims, needs)?;
            grads_to_tensors(grads, &op.x, &op.w, op.dims.n)
        }
        let want = [needs[0], needs[1], self.has_bias && needs.get(2).copied().unwrap_or(false)];
        let [dx, dw, db] = by_dtype!(self.x.dtype(), cpu(self, grad_out, want))?;
        let mut out = vec![dx, dw];
        if self.has_bias {
            out.push(db);
        }
        Ok(out)
    }
}
