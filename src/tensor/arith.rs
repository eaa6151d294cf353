//! Elementwise arithmetic on whole tensors, without autograd: the building blocks that the autograd layer (gradient
//! accumulation), the ops' backward passes and the optimiser share.

use super::{Real, Tensor};
use crate::{ensure, Result};

/// Applies `f` elementwise to two host tensors of equal shape.
pub fn zip_map<T: Real>(a: &Tensor, b: &Tensor, f: impl Fn(T, T) -> T) -> Result<Tensor> {
    let out: Vec<T> = a.cpu::<T>()?.iter().zip(b.cpu::<T>()?).map(|(&x, &y)| f(x, y)).collect();
    Tensor::from_vec(out, a.shape())
}

/// Applies `f` elementwise to a host tensor.
pub fn map<T: Real>(a: &Tensor, f: impl Fn(T) -> T) -> Result<Tensor> {
    let out: Vec<T> = a.cpu::<T>()?.iter().map(|&x| f(x)).collect();
    Tensor::from_vec(out, a.shape())
}

fn check_binary(a: &Tensor, b: &Tensor, op: &str) -> Result<()> {
    a.check_same_kind(b, op)?;
    ensure!(a.shape() == b.shape(), Shape, "{op}: shapes differ: {:?} vs {:?}", a.shape(), b.shape());
    Ok(())
}

/// `a + b`, same shapes.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_binary(a, b, "add")?;
    fn cpu<T: Real>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        zip_map::<T>(a, b, |x, y| x + y)
    }
    by_dtype!(a.dtype(), cpu(a, b))
}

/// `a * b` elementwise, same shapes.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_binary(a, b, "mul")?;
    fn cpu<T: Real>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        zip_map::<T>(a, b, |x, y| x * y)
    }
    by_dtype!(a.dtype(), cpu(a, b))
}

/// `s * a`.
pub fn scale(a: &Tensor, s: f64) -> Result<Tensor> {
    fn cpu<T: Real>(a: &Tensor, s: f64) -> Result<Tensor> {
        let s = T::from_f64(s);
        map::<T>(a, |x| x * s)
    }
    by_dtype!(a.dtype(), cpu(a, s))
}

/// The sum of all elements, accumulated in f64, as a host number.
pub fn sum_all(a: &Tensor) -> Result<f64> {
    Ok(a.to_vec_f64()?.iter().sum())
}
