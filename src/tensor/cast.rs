//! The GPU storage conversions behind [`Tensor::to_dtype`](super::Tensor::to_dtype) and
//! [`ops::cast`](crate::ops::cast): float32 to bf16 (round to nearest, ties to even) and back (exact), kernels of
//! `cuda/cast.cu`.

use half::bf16;

use crate::device::cuda::{grid_vec, GpuBuffer};
use crate::device::params::{kernel, CastParams};
use crate::Result;

/// `x` rounded to bf16, in a new buffer on its GPU.
pub(crate) fn to_bf16(x: &GpuBuffer) -> Result<GpuBuffer<bf16>> {
    let n = x.slice.len();
    let mut y = x.gpu.alloc_of::<bf16>(n, "bf16 copy")?;
    let p = CastParams { f32_in: x.ptr(), bf16_out: y.ptr_mut(), n: n as i64, ..Default::default() };
    x.gpu.launch(kernel::cast_f32_to_bf16, grid_vec::<bf16>(n), &p, &format!("{n} elements"))?;
    Ok(y)
}

/// `x` as float32, in a new buffer on its GPU.
pub(crate) fn to_f32(x: &GpuBuffer<bf16>) -> Result<GpuBuffer> {
    let n = x.slice.len();
    let mut y = x.gpu.alloc(n, "float32 copy")?;
    let p = CastParams { bf16_in: x.ptr(), f32_out: y.ptr_mut(), n: n as i64, ..Default::default() };
    x.gpu.launch(kernel::cast_bf16_to_f32, grid_vec::<bf16>(n), &p, &format!("{n} elements"))?;
    Ok(y)
}
