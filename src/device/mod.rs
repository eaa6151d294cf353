//! Where tensors live: host memory or one CUDA GPU.
//!
//! A [`Device`] is chosen once (`--device`) and every tensor of a step lives there; ops run their CPU reference or
//! their CUDA kernels depending on where their inputs are, and never move data between devices on their own.
//!
//! ```
//! use lkm_engine::device::Device;
//! use lkm_engine::{DType, Tensor};
//!
//! # fn main() -> lkm_engine::Result<()> {
//! let cpu = Device::parse("cpu")?;
//! let x = Tensor::from_vec(vec![1.0f32, -2.0, 3.5], &[3])?;
//! assert!(x.device().same(&cpu));
//!
//! // A bad --device value is an error that names it and the accepted forms.
//! let err = Device::parse("tpu").unwrap_err().to_string();
//! assert!(err.contains("\"tpu\"") && err.contains("cuda:N"), "{err}");
//!
//! // With a GPU (and a build with kernels), a round trip through its memory keeps every bit.
//! match Device::cuda(0) {
//!     Ok(gpu) => {
//!         let on_gpu = x.to_device(&gpu)?;
//!         assert!(!on_gpu.device().is_cpu() && on_gpu.dtype() == DType::F32);
//!         assert_eq!(on_gpu.to_device(&cpu)?.to_vec_f32()?, x.to_vec_f32()?);
//!     }
//!     Err(e) => println!("no GPU here: {e}"),
//! }
//! # Ok(())
//! # }
//! ```

pub mod cuda;
#[cfg(test)]
mod header;
pub mod params;

use std::fmt;
use std::sync::Arc;

pub use cuda::Gpu;

/// A compute device. CPU tensors hold `Vec<f32>`/`Vec<f64>`; CUDA tensors hold a buffer on one GPU's stream.
#[derive(Clone)]
pub enum Device {
    /// Host memory; ops run their readable reference implementation.
    Cpu,
    /// One GPU with its context, stream and loaded kernels.
    Cuda(Arc<Gpu>),
}

impl Device {
    /// GPU `ordinal`, with its kernels loaded.
    pub fn cuda(ordinal: usize) -> crate::Result<Device> {
        Ok(Device::Cuda(Gpu::new(ordinal)?))
    }

    /// Parses a `--device` value: `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto` (GPU 0 when one is usable, else CPU,
    /// saying why on stderr).
    pub fn parse(spec: &str) -> crate::Result<Device> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Device::cuda(0),
            "auto" => match Device::cuda(0) {
                Ok(d) => Ok(d),
                Err(e) => {
                    eprintln!("--device auto: using the CPU ({e})");
                    Ok(Device::Cpu)
                }
            },
            s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Device::cuda(n),
                None => crate::bail!(Config, "unknown device {s:?}: use cpu, cuda, cuda:N or auto"),
            },
        }
    }

    /// Whether this is the CPU.
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// Whether two devices are the same (the same GPU for CUDA).
    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(g) => write!(f, "cuda:{}", g.ordinal()),
        }
    }
}
