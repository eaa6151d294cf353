//! lkm-engine: a from-scratch training engine for LKM-UNet, the large-kernel Mamba U-Net for medical image
//! segmentation, with its own autograd and handwritten CUDA kernels.
//!
//! The modules are layers; each uses only those above it in this list:
//! 1. [`device`]: CPU and CUDA memory, streams, kernels;
//! 2. [`tensor`]: shapes, dtypes, storage;
//! 3. [`autograd`]: the tape and gradient checks;
//! 4. [`ops`]: every op with forward, backward, CPU reference and kernel launch;
//! 5. `nn`, `data`, `train`, `infer`, `metrics`: the network and the workflow around it.

pub mod autograd;
pub mod data;
pub mod device;
mod error;
pub mod infer;
pub mod metrics;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod predict;
pub mod profile;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use tensor::{DType, Tensor};
