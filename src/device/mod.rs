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

/// The storage type of a GPU run's activations (`--precision`). Master weights, gradients of the weights and the
/// optimiser state stay float32 in both; with `Bf16` the network's input is rounded to bf16 on entry, every op reads
/// and writes bf16 activations (computing in float32 inside its kernels), the convolutions and linear layers take
/// their float32 weights' bf16 copies ([`crate::ops::cast::Weight`]), normalisations keep float32 statistics
/// and parameters, the scan a float32 state, and the logits return to float32 before the losses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Float32 storage everywhere (products on the tf32 tensor cores, or exact with `--math exact`).
    #[default]
    Fp32,
    /// bf16 activations, float32 weights and accumulation.
    Bf16,
}

impl Precision {
    /// Parses a `--precision` value: `fp32` or `bf16`.
    pub fn parse(s: &str) -> crate::Result<Precision> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            s => crate::bail!(Config, "--precision must be fp32 or bf16, not {s:?}"),
        }
    }

    /// The storage type of activations.
    pub fn dtype(self) -> crate::tensor::DType {
        match self {
            Precision::Fp32 => crate::tensor::DType::F32,
            Precision::Bf16 => crate::tensor::DType::BF16,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        })
    }
}

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

    /// The precision of runs on this device: the GPU's setting ([`Gpu::set_precision`]); float32 on the CPU (whose
    /// reference ops compute in the tensors' own float32 or float64).
    pub fn precision(&self) -> Precision {
        match self {
            Device::Cpu => Precision::Fp32,
            Device::Cuda(gpu) => gpu.precision(),
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
