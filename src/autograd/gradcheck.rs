//! Finite-difference gradient checks in float64.
//!
//! For a function `y = f(x_1, ..., x_k)` and a fixed random weighting `r` of its output, the scalar
//! `L = sum(r * y)` has the analytic gradient that the tape computes from the seed `dL/dy = r`, and the numerical one
//!
//! ```text
//!   dL/dx_ij ~ (L(x_ij + eps) - L(x_ij - eps)) / (2 eps)
//! ```
//!
//! whose error is O(eps^2) (truncation) plus the rounding of the two sums, at most about
//! `4 * EPSILON * sum|r * y| / eps`. That rounding bound is subtracted before an error is judged, so large outputs
//! with small gradients do not fail a correct backward.
//!
//! The check of an op (here a strided 2D convolution), and of a new op written with [`Tape::record`] and a
//! [`Backward`](super::Backward): `y = x^2` passes with `dy/dx = 2x` and fails with `x`, half the true gradient.
//!
//! ```
//! use lkm_engine::autograd::gradcheck::{check_gradients, randn64};
//! use lkm_engine::autograd::{Backward, Tape};
//! use lkm_engine::ops::conv::conv;
//! use lkm_engine::tensor::{mul, scale};
//! use lkm_engine::{Result, Tensor};
//!
//! # fn main() -> Result<()> {
//! let x = randn64(&[1, 2, 5, 6], 1); // (N, Cin, H, W)
//! let w = randn64(&[3, 2, 3, 3], 2); // (Cout, Cin, kh, kw)
//! let b = randn64(&[3], 3);
//! let report = check_gradients(&[x, w, b], 1e-5, |tape, v| conv(tape, &v[0], &v[1], Some(&v[2]), &[2, 1]))?;
//! assert_eq!(report.checked, 60 + 54 + 3);
//! assert!(report.max_error < 1e-6, "{report:?}");
//!
//! struct SquareBackward {
//!     x: Tensor,
//!     slope: f64, // dy/dx = slope * x; the true slope is 2
//! }
//! impl Backward for SquareBackward {
//!     fn name(&self) -> &'static str {
//!         "square"
//!     }
//!     fn backward(&self, grad_out: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
//!         Ok(vec![Some(mul(grad_out, &scale(&self.x, self.slope)?)?)])
//!     }
//! }
//! fn square(tape: &mut Tape, x: &Tensor, slope: f64) -> Result<Tensor> {
//!     let y = mul(x, x)?;
//!     tape.record(&[x], &y, SquareBackward { x: x.clone(), slope });
//!     Ok(y)
//! }
//! let x = randn64(&[4, 3], 4);
//! let right = check_gradients(&[x.clone()], 1e-5, |tape, v| square(tape, &v[0], 2.0))?;
//! let wrong = check_gradients(&[x], 1e-5, |tape, v| square(tape, &v[0], 1.0))?;
//! assert!(right.max_error < 1e-8, "{right:?}");
//! assert!((wrong.max_error - 0.5).abs() < 1e-6, "{wrong:?}"); // |x - 2x| / |2x|
//! # Ok(())
//! # }
//! ```

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::Tape;
use crate::tensor::{DType, Tensor};
use crate::{ensure, Result};

/// The outcome of a gradient check.
#[derive(Debug, Clone)]
pub struct GradCheckReport {
    /// The largest error over all checked elements, relative to the size of the gradient (see [`check_gradients`]).
    pub max_error: f64,
    /// Which input and element gave it, with both values.
    pub worst: String,
    /// How many elements were compared.
    pub checked: usize,
}

/// Random float64 inputs for checks: standard normal, deterministic in `seed`.
pub fn randn64(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, DType::F64, &mut StdRng::seed_from_u64(seed)).expect("valid shape")
}

/// Compares the tape's gradients of `f` with central differences for every element of every input.
///
/// `inputs` must be float64 CPU tensors; `f` builds the output from them on the tape it is given. The error of an
/// element is `max(0, |analytic - numeric| - rounding) / max(|analytic|, |numeric|, 1e-3 * largest |gradient| of
/// that input, 1e-12)`, so tiny gradients are judged against the input's gradient scale rather than against zero.
pub fn check_gradients(
    inputs: &[Tensor],
    eps: f64,
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) -> Result<GradCheckReport> {
    for x in inputs {
        ensure!(x.dtype() == DType::F64 && x.device().is_cpu(), Mismatch, "gradient checks need f64 CPU inputs");
    }
    let mut tape = Tape::new();
    for x in inputs {
        tape.watch(x);
    }
    let y = f(&mut tape, inputs)?;
    let weights = randn64(y.shape(), 0x5eed);
    let r = weights.to_vec_f64()?;
    let magnitude: f64 = y.to_vec_f64()?.iter().zip(&r).map(|(a, b)| (a * b).abs()).sum();
    let rounding = 4.0 * f64::EPSILON * magnitude / eps;
    let grads = tape.backward_from(&y, weights)?;

    let weighted_sum = |xs: &[Tensor]| -> Result<f64> {
        let y = f(&mut Tape::no_grad(), xs)?;
        Ok(y.to_vec_f64()?.iter().zip(&r).map(|(a, b)| a * b).sum())
    };

    let mut report = GradCheckReport { max_error: 0.0, worst: "nothing checked".into(), checked: 0 };
    for (i, x) in inputs.iter().enumerate() {
        let analytic = match grads.get(x) {
            Some(g) => g.to_vec_f64()?,
            None => vec![0.0; x.numel()],
        };
        ensure!(
            analytic.len() == x.numel(),
            Shape,
            "gradient of input {i} has {} elements, input has {}",
            analytic.len(),
            x.numel()
        );
        let base = x.to_vec_f64()?;
        let mut numeric = vec![0.0; base.len()];
        for j in 0..base.len() {
            let eval_at = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[j] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, x.shape())?;
                weighted_sum(&xs)
            };
            numeric[j] = (eval_at(eps)? - eval_at(-eps)?) / (2.0 * eps);
        }
        let scale = numeric.iter().chain(&analytic).fold(0.0f64, |m, v| m.max(v.abs()));
        let floor = (1e-3 * scale).max(1e-12);
        for (j, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
            let err = ((a - n).abs() - rounding).max(0.0) / a.abs().max(n.abs()).max(floor);
            if err.is_nan() || err > report.max_error {
                report.max_error = err;
                report.worst = format!("input {i} {:?} element {j}: analytic {a:e}, numeric {n:e}", x.shape());
            }
            report.checked += 1;
        }
    }
    Ok(report)
}

/// Runs [`check_gradients`] with eps = 1e-5 and fails with the report unless the error is below `tol`.
pub fn assert_gradients(inputs: &[Tensor], tol: f64, f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>) {
    let report = check_gradients(inputs, 1e-5, f).expect("gradient check could not run");
    assert!(report.checked > 0, "gradient check compared nothing");
    assert!(report.max_error < tol, "gradient check failed: max error {:e} at {}", report.max_error, report.worst);
}
