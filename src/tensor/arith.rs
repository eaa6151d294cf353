//! Elementwise arithmetic on whole tensors, without autograd: the building blocks that the autograd layer (gradient
//! accumulation), the ops' backward passes and the optimiser share.

use super::{Real, Storage, Tensor};
use crate::device::cuda::{grid_vec, GpuBuffer, GpuElement};
use crate::device::params::{kernel, ConstPtr, EltwiseParams, Kernel};
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

/// The elementwise binary kernels of `cuda/elementwise.cu`.
#[derive(Clone, Copy)]
enum Binary {
    Add,
    Mul,
}

fn binary(a: &Tensor, b: &Tensor, op: Binary) -> Result<Tensor> {
    let name = match op {
        Binary::Add => "add",
        Binary::Mul => "mul",
    };
    check_binary(a, b, name)?;
    fn gpu<T: GpuElement>(a: &Tensor, b: &Tensor, op: Binary, name: &str) -> Result<Tensor> {
        let k = match op {
            Binary::Add => kernel::add::<T>(),
            Binary::Mul => kernel::mul::<T>(),
        };
        let (ab, bb) = (a.gpu_operand::<T>(name)?, b.gpu_operand::<T>(name)?);
        Tensor::from_gpu(eltwise_gpu(k, ab, Some(bb), 1.0, name, &format!("{:?}", a.shape()))?, a.shape())
    }
    if let Some(y) = by_gpu_type!(a, gpu(a, b, op, name)) {
        return y;
    }
    fn cpu<T: Real>(a: &Tensor, b: &Tensor, op: Binary) -> Result<Tensor> {
        match op {
            Binary::Add => zip_map::<T>(a, b, |x, y| x + y),
            Binary::Mul => zip_map::<T>(a, b, |x, y| x * y),
        }
    }
    by_dtype!(a.dtype(), cpu(a, b, op))
}

/// `a + b`, same shapes.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, Binary::Add)
}

/// `a * b` elementwise, same shapes.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, Binary::Mul)
}

/// `a += b` (same shapes, storage types and device): in place when nothing else shares `a`'s storage (the tape's
/// gradient accumulation: no new buffer per sum), otherwise `a` is replaced by a new sum. The same bits either way.
pub fn add_assign(a: &mut Tensor, b: &Tensor) -> Result<()> {
    check_binary(a, b, "add")?;
    let shapes = format!("{:?} += {:?}", a.shape(), b.shape());
    let Ok(storage) = a.storage_mut() else {
        *a = add(a, b)?;
        return Ok(());
    };
    match storage {
        Storage::F32(v) => v.iter_mut().zip(b.cpu::<f32>()?).for_each(|(x, y)| *x += y),
        Storage::F64(v) => v.iter_mut().zip(b.cpu::<f64>()?).for_each(|(x, y)| *x += y),
        Storage::Cuda(y) => add_in_place_gpu(y, b.gpu_operand::<f32>("add")?, &shapes)?,
        Storage::CudaBf16(y) => add_in_place_gpu(y, b.gpu_operand::<half::bf16>("add")?, &shapes)?,
    }
    Ok(())
}

/// `y += b` on the GPU: cuda/elementwise.cu's add with its output as its first operand (each thread reads its group
/// of elements before writing it, and no two threads share one, so the aliasing is safe).
fn add_in_place_gpu<T: GpuElement>(y: &mut GpuBuffer<T>, b: &GpuBuffer<T>, shapes: &str) -> Result<()> {
    let n = y.slice.len();
    let out = y.ptr_mut();
    let p = EltwiseParams { a: ConstPtr::from_raw(out.address()), b: b.ptr(), y: out, s: 1.0, n: n as i64 };
    y.gpu.launch(kernel::add::<T>(), grid_vec::<T>(n), &p, shapes)
}

/// `s * a`.
pub fn scale(a: &Tensor, s: f64) -> Result<Tensor> {
    fn gpu<T: GpuElement>(a: &Tensor, s: f64) -> Result<Tensor> {
        let ab = a.gpu_operand::<T>("scale")?;
        let y = eltwise_gpu(kernel::scale::<T>(), ab, None, s as f32, "scale", &format!("{:?}", a.shape()))?;
        Tensor::from_gpu(y, a.shape())
    }
    if let Some(y) = by_gpu_type!(a, gpu(a, s)) {
        return y;
    }
    fn cpu<T: Real>(a: &Tensor, s: f64) -> Result<Tensor> {
        let s = T::from_f64(s);
        map::<T>(a, |x| x * s)
    }
    by_dtype!(a.dtype(), cpu(a, s))
}

/// Runs an elementwise kernel of `cuda/elementwise.cu` over all of `a` (with `b`, of the same length, as its second
/// operand, and `s` as its factor, where it takes them) into a new buffer named `what`; `shapes` names the operands
/// in an error.
pub(crate) fn eltwise_gpu<T: GpuElement>(
    k: Kernel<EltwiseParams<T>>,
    a: &GpuBuffer<T>,
    b: Option<&GpuBuffer<T>>,
    s: f32,
    what: &str,
    shapes: &str,
) -> Result<GpuBuffer<T>> {
    let n = a.slice.len();
    let gpu = &a.gpu;
    let mut y = gpu.alloc_of::<T>(n, what)?;
    let p = EltwiseParams { a: a.ptr(), b: b.map_or(ConstPtr::NULL, GpuBuffer::ptr), y: y.ptr_mut(), s, n: n as i64 };
    gpu.launch(k, grid_vec::<T>(n), &p, shapes)?;
    Ok(y)
}

/// The sum of all elements, accumulated in f64, as a host number.
pub fn sum_all(a: &Tensor) -> Result<f64> {
    Ok(a.to_vec_f64()?.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor nothing else holds is summed into in place; one whose storage is shared (a clone, a view) is replaced,
    /// and the other holders keep their values.
    #[test]
    fn add_assign_is_in_place_only_when_unshared() {
        let b = Tensor::from_vec(vec![10.0f32, 20.0, 30.0], &[3]).unwrap();
        let mut a = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3]).unwrap();
        let before = a.cpu::<f32>().unwrap().as_ptr();
        add_assign(&mut a, &b).unwrap();
        assert_eq!(a.cpu::<f32>().unwrap(), [11.0, 22.0, 33.0]);
        assert_eq!(a.cpu::<f32>().unwrap().as_ptr(), before, "summed in place");

        let view = a.with_shape(&[3, 1]).unwrap();
        add_assign(&mut a, &b).unwrap();
        assert_eq!(a.cpu::<f32>().unwrap(), [21.0, 42.0, 63.0]);
        assert_eq!(view.cpu::<f32>().unwrap(), [11.0, 22.0, 33.0], "the shared storage is left alone");

        let err = add_assign(&mut a, &Tensor::from_vec(vec![1.0f32; 2], &[2]).unwrap()).unwrap_err().to_string();
        assert!(err.contains("shapes differ"), "{err}");
    }
}
