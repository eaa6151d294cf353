//! Tensors: a shape of up to five axes (N, C, D, H, W), a dtype and contiguous storage on one device.
//!
//! A [`Tensor`] is an immutable handle: cloning it shares the storage (an `Arc`) and keeps its identity, which is
//! what the autograd tape keys gradients on. Ops return new tensors. The only in-place writes are the optimiser's,
//! through [`Tensor::storage_mut`], which is allowed once nothing else (such as a tape) holds the storage.
//!
//! ```
//! use lkm_engine::tensor::{add, scale};
//! use lkm_engine::{DType, Tensor};
//!
//! # fn main() -> lkm_engine::Result<()> {
//! // Row-major: the last axis varies fastest.
//! let x = Tensor::from_fn(&[2, 3], DType::F64, |i| i as f64)?;
//! assert_eq!((x.shape(), x.rank(), x.numel()), (&[2, 3][..], 2, 6));
//!
//! // A clone is the same tensor (same identity, shared storage); a view with another shape is a new one.
//! assert_eq!(x.clone().id(), x.id());
//! let rows = x.with_shape(&[3, 2])?;
//! assert_ne!(rows.id(), x.id());
//! assert_eq!(rows.to_vec_f64()?, x.to_vec_f64()?);
//!
//! // Elementwise arithmetic (no autograd at this layer): x + 2x.
//! let y = add(&x, &scale(&x, 2.0)?)?;
//! assert_eq!(y.to_vec_f64()?, [0.0, 3.0, 6.0, 9.0, 12.0, 15.0]);
//!
//! // Sizes that do not match are an error that names them.
//! let err = Tensor::from_vec(vec![1.0f32; 5], &[2, 3]).unwrap_err().to_string();
//! assert!(err.contains("5 values") && err.contains("[2, 3]"), "{err}");
//! # Ok(())
//! # }
//! ```

mod real;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use real::Real;

use crate::device::cuda::{GpuBuffer, GpuElement};
use crate::device::Device;
use crate::{bail, ensure, Error, Result};

/// The largest rank a tensor may have: (N, C, D, H, W).
pub const MAX_RANK: usize = 5;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// 32-bit float: training and inference.
    F32,
    /// 64-bit float: gradient checks on the CPU.
    F64,
    /// bfloat16 (float32's 8-bit exponent, 8 significand bits): low-precision storage on the GPU only. The CPU
    /// reference computes in float32 or float64; a bf16 tensor comes to the host as float32 (exactly).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// The memory behind a tensor.
pub enum Storage {
    /// Host float32.
    F32(Vec<f32>),
    /// Host float64.
    F64(Vec<f64>),
    /// Device float32.
    Cuda(GpuBuffer),
    /// Device bf16.
    CudaBf16(GpuBuffer<half::bf16>),
}

/// A unique tensor identity, stable across clones of the same handle.
pub type TensorId = u64;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn fresh_id() -> TensorId {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// A contiguous, row-major tensor (the last axis varies fastest).
#[derive(Clone)]
pub struct Tensor {
    id: TensorId,
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

/// Checks that `shape` is a valid tensor shape, naming `what` in the error.
fn check_shape(shape: &[usize], what: &str) -> Result<()> {
    ensure!(
        !shape.is_empty() && shape.len() <= MAX_RANK,
        Shape,
        "{what}: rank must be 1 to {MAX_RANK}, got shape {shape:?}"
    );
    Ok(())
}

impl Tensor {
    /// Wraps a host vector. Fails if the length does not match the shape.
    pub fn from_vec<T: Real>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        check_shape(shape, "Tensor::from_vec")?;
        let n: usize = shape.iter().product();
        ensure!(data.len() == n, Shape, "Tensor::from_vec: {} values for shape {shape:?} ({n} elements)", data.len());
        Ok(Tensor::from_storage(T::into_storage(data), shape.to_vec()))
    }

    /// Builds a tensor from storage that is known to match `shape`.
    pub(crate) fn from_storage(storage: Storage, shape: Vec<usize>) -> Tensor {
        Tensor { id: fresh_id(), shape, storage: Arc::new(storage) }
    }

    /// A host tensor of the given dtype whose element i is `f(i)`.
    pub fn from_fn(shape: &[usize], dtype: DType, f: impl FnMut(usize) -> f64) -> Result<Tensor> {
        check_shape(shape, "Tensor::from_fn")?;
        let n = shape.iter().product();
        let values = (0..n).map(f);
        let storage = match dtype {
            DType::F32 => Storage::F32(values.map(|v| v as f32).collect()),
            DType::F64 => Storage::F64(values.collect()),
            DType::BF16 => bail!(Mismatch, "{}", BF16_ON_HOST),
        };
        Ok(Tensor::from_storage(storage, shape.to_vec()))
    }

    /// A tensor filled with `value` on `device`.
    pub fn full(shape: &[usize], value: f64, dtype: DType, device: &Device) -> Result<Tensor> {
        if dtype == DType::BF16 {
            return Tensor::full(shape, value, DType::F32, device)?.to_dtype(dtype);
        }
        Tensor::from_fn(shape, dtype, |_| value)?.to_device(device)
    }

    /// A tensor of zeros on `device`.
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(shape, 0.0, dtype, device)
    }

    /// A zero tensor with the shape, dtype and device of `self`.
    pub fn zeros_like(&self) -> Result<Tensor> {
        Tensor::zeros(&self.shape, self.dtype(), &self.device())
    }

    /// The identity the autograd tape keys this tensor's gradient on.
    pub fn id(&self) -> TensorId {
        self.id
    }

    /// The axis lengths.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of axes.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match &*self.storage {
            Storage::F32(_) | Storage::Cuda(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::CudaBf16(_) => DType::BF16,
        }
    }

    /// The device holding the storage.
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cuda(b) => Device::Cuda(b.gpu.clone()),
            Storage::CudaBf16(b) => Device::Cuda(b.gpu.clone()),
            _ => Device::Cpu,
        }
    }

    /// The storage, for ops.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The GPU buffer, if this is a float32 GPU tensor.
    pub fn gpu_buffer(&self) -> Option<&GpuBuffer> {
        self.gpu::<f32>()
    }

    /// The GPU buffer, if this is a GPU tensor stored as `T` (`f32` or `half::bf16`).
    pub fn gpu<T: GpuElement>(&self) -> Option<&GpuBuffer<T>> {
        T::buffer(&self.storage)
    }

    /// The GPU buffer of an operand that must be stored as `T` on the GPU (the op dispatched on another operand's
    /// type with [`by_gpu_type!`](crate::by_gpu_type)); `op` names the caller in the error.
    pub fn gpu_operand<T: GpuElement>(&self, op: &str) -> Result<&GpuBuffer<T>> {
        self.gpu::<T>().ok_or_else(|| {
            Error::Mismatch(format!(
                "{op}: expected a GPU {:?} operand, got a {:?} tensor on {:?} with shape {:?} (operands of one op \
                 share device and storage type: convert with ops::cast::cast)",
                T::DTYPE,
                self.dtype(),
                self.device(),
                self.shape
            ))
        })
    }

    /// Wraps a GPU buffer holding exactly `shape`'s elements.
    pub fn from_gpu<T: GpuElement>(buffer: GpuBuffer<T>, shape: &[usize]) -> Result<Tensor> {
        check_shape(shape, "Tensor::from_gpu")?;
        let n: usize = shape.iter().product();
        ensure!(buffer.slice.len() == n, Shape, "GPU buffer of {} values for shape {shape:?}", buffer.slice.len());
        Ok(Tensor::from_storage(T::storage(buffer), shape.to_vec()))
    }

    /// Mutable storage for in-place updates (the optimiser). Fails while any other handle shares it, e.g. a tape that
    /// still holds the parameter: free the tape first.
    pub fn storage_mut(&mut self) -> Result<&mut Storage> {
        let shape = self.shape.clone();
        Arc::get_mut(&mut self.storage).ok_or_else(|| {
            Error::Mismatch(format!("in-place update of a tensor {shape:?} that is still shared (free the tape first)"))
        })
    }

    /// The host elements, if this tensor is a CPU tensor of element type `T`.
    pub fn cpu<T: Real>(&self) -> Result<&[T]> {
        T::slice(&self.storage).ok_or_else(|| {
            Error::Mismatch(format!(
                "expected a CPU {:?} tensor, found a {:?} tensor on {:?} with shape {:?}",
                T::DTYPE,
                self.dtype(),
                self.device(),
                self.shape
            ))
        })
    }

    /// The same storage seen with another shape of equal size (a new identity; no autograd, see `ops::reshape`).
    pub fn with_shape(&self, shape: &[usize]) -> Result<Tensor> {
        check_shape(shape, "reshape")?;
        ensure!(
            shape.iter().product::<usize>() == self.numel(),
            Shape,
            "cannot view a tensor of shape {:?} as {shape:?}",
            self.shape
        );
        Ok(Tensor { id: fresh_id(), shape: shape.to_vec(), storage: self.storage.clone() })
    }

    /// A copy with its own storage (and identity), on the same device.
    pub fn deep_copy(&self) -> Result<Tensor> {
        let storage = match &*self.storage {
            Storage::F32(v) => Storage::F32(v.clone()),
            Storage::F64(v) => Storage::F64(v.clone()),
            Storage::Cuda(b) => {
                let mut copy = b.gpu.alloc(b.slice.len(), "tensor copy")?;
                b.gpu.copy(b, &mut copy)?;
                Storage::Cuda(copy)
            }
            Storage::CudaBf16(b) => {
                let mut copy = b.gpu.alloc_of(b.slice.len(), "tensor copy")?;
                b.gpu.copy(b, &mut copy)?;
                Storage::CudaBf16(copy)
            }
        };
        Ok(Tensor::from_storage(storage, self.shape.clone()))
    }

    /// Copies every element to the host as f64 (for checks, metrics and printing).
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        match &*self.storage {
            Storage::F32(v) => Ok(v.iter().map(|&x| x as f64).collect()),
            Storage::F64(v) => Ok(v.clone()),
            Storage::Cuda(b) => Ok(b.to_host()?.into_iter().map(|x| x as f64).collect()),
            Storage::CudaBf16(b) => Ok(b.to_host()?.into_iter().map(f64::from).collect()),
        }
    }

    /// Copies every element to the host as f32.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        match &*self.storage {
            Storage::F32(v) => Ok(v.clone()),
            Storage::F64(v) => Ok(v.iter().map(|&x| x as f32).collect()),
            Storage::Cuda(b) => b.to_host(),
            Storage::CudaBf16(b) => Ok(b.to_host()?.into_iter().map(f32::from).collect()),
        }
    }

    /// The single element of a one-element tensor (reads the GPU, so it synchronises).
    pub fn scalar(&self) -> Result<f64> {
        ensure!(self.numel() == 1, Shape, "scalar() on a tensor of shape {:?}", self.shape);
        Ok(self.to_vec_f64()?[0])
    }

    /// This tensor on `device` (a copy, or a cheap clone when it is already there). Tensors move to the GPU as float32
    /// and to the host as float32 (from either GPU type; convert on the GPU with [`Tensor::to_dtype`]).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device().same(device) {
            return Ok(self.clone());
        }
        let storage = match device {
            Device::Cpu => Storage::F32(self.to_vec_f32()?),
            Device::Cuda(gpu) => {
                if self.dtype() != DType::F32 {
                    bail!(Mismatch, "only float32 tensors can move to the GPU; this one is {:?}", self.dtype());
                }
                Storage::Cuda(GpuBuffer::from_host(gpu, self.cpu::<f32>()?)?)
            }
        };
        Ok(Tensor::from_storage(storage, self.shape.clone()))
    }

    /// This tensor converted to `dtype` on its device (a cheap clone when it already has it): float32 and float64 on
    /// the host, float32 and bf16 on the GPU (bf16 rounded to nearest, ties to even; cuda/cast.cu). Outside autograd:
    /// [`crate::ops::cast::cast`] is the op that carries gradients.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let storage = match (&*self.storage, dtype) {
            (Storage::F32(_) | Storage::F64(_), DType::F32) => Storage::F32(self.to_vec_f32()?),
            (Storage::F32(_) | Storage::F64(_), DType::F64) => Storage::F64(self.to_vec_f64()?),
            (Storage::Cuda(b), DType::BF16) => Storage::CudaBf16(cast::to_bf16(b)?),
            (Storage::CudaBf16(b), DType::F32) => Storage::Cuda(cast::to_f32(b)?),
            (_, DType::BF16) => bail!(Mismatch, "{}", BF16_ON_HOST),
            (_, DType::F64) => bail!(Mismatch, "float64 is a CPU type: move the tensor to the CPU first"),
            (Storage::Cuda(_), DType::F32) => unreachable!("dtype already equal"),
        };
        Ok(Tensor::from_storage(storage, self.shape.clone()))
    }

    /// Fails unless `self` and `other` share dtype and device; `op` names the caller in the message.
    pub fn check_same_kind(&self, other: &Tensor, op: &str) -> Result<()> {
        ensure!(
            self.dtype() == other.dtype() && self.device().same(&other.device()),
            Mismatch,
            "{op}: operands differ: {:?} on {:?} {:?} vs {:?} on {:?} {:?}",
            self.dtype(),
            self.device(),
            self.shape,
            other.dtype(),
            other.device(),
            other.shape
        );
        Ok(())
    }

    /// Fails unless the shape equals `expected`; `what` names the operand in the message.
    pub fn check_shape(&self, expected: &[usize], what: &str) -> Result<()> {
        ensure!(self.shape == expected, Shape, "{what}: expected shape {expected:?}, got {:?}", self.shape);
        Ok(())
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor(#{} {:?} {:?} on {:?})", self.id, self.shape, self.dtype(), self.device())
    }
}

/// Runs a generic CPU function at the element type of a dtype: `by_dtype!(x.dtype(), f(a, b))` calls `f::<f32>(a, b)`
/// or `f::<f64>(a, b)`. A bf16 tensor reaching an op's CPU path is a GPU tensor that op has no bf16 kernel for:
/// the error names the op's module.
#[macro_export]
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dtype {
            $crate::tensor::DType::F32 => $f::<f32>($($arg),*),
            $crate::tensor::DType::F64 => $f::<f64>($($arg),*),
            $crate::tensor::DType::BF16 => Err($crate::tensor::no_bf16_kernel(module_path!())),
        }
    };
}

/// Runs a function generic over the GPU storage type ([`GpuElement`]) at the storage type of the tensor `x`:
/// `by_gpu_type!(x, f(a, b))` is `Some(f::<f32>(a, b))` for a float32 GPU tensor, `Some(f::<half::bf16>(a, b))` for
/// a bf16 one and `None` on the host, where the op runs its CPU reference. The one place where an op's GPU path
/// dispatches on the storage type; inside, [`Tensor::gpu_operand`] gets each operand's buffer.
#[macro_export]
macro_rules! by_gpu_type {
    ($x:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $x.storage() {
            $crate::tensor::Storage::Cuda(_) => Some($f::<f32>($($arg),*)),
            $crate::tensor::Storage::CudaBf16(_) => Some($f::<half::bf16>($($arg),*)),
            _ => None,
        }
    };
}

/// The error of an op given a bf16 tensor it has no kernel for; `module` is the op's module path.
pub fn no_bf16_kernel(module: &str) -> Error {
    let op = module.rsplit("::").next().unwrap_or(module);
    Error::Mismatch(format!(
        "{op}: no bf16 kernel (this op reads float32); convert its input to float32 first (ops::cast::cast or \
         Tensor::to_dtype)"
    ))
}

/// Why a bf16 tensor cannot be made on the host.
const BF16_ON_HOST: &str =
    "bf16 is a GPU storage type: make or move the tensor to the GPU as float32, then convert it there";

pub(crate) mod cast;

mod arith;
pub(crate) use arith::eltwise_gpu;
pub use arith::{add, add_assign, map, mul, scale, sum_all, zip_map};

impl Tensor {
    /// Standard-normal samples on the host (Box-Muller, so the sequence depends only on the generator).
    pub fn randn(shape: &[usize], dtype: DType, rng: &mut impl rand::Rng) -> Result<Tensor> {
        use rand::RngExt;
        Tensor::from_fn(shape, dtype, |_| {
            let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1], so ln is finite
            let u2: f64 = rng.random();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
    }

    /// Uniform samples in [lo, hi) on the host.
    pub fn uniform(shape: &[usize], lo: f64, hi: f64, dtype: DType, rng: &mut impl rand::Rng) -> Result<Tensor> {
        use rand::RngExt;
        Tensor::from_fn(shape, dtype, |_| lo + (hi - lo) * rng.random::<f64>())
    }
}
