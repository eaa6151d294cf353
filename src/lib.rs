//! lkm-engine: a from-scratch training engine for LKM-UNet, the large-kernel Mamba U-Net for medical image
//! segmentation, with its own autograd and handwritten CUDA kernels.
//!
//! **Start with the [tour]**: one training step followed from `lkm-engine train` through the data, the patch
//! sampler, the network's forward pass (a convolution block, a PiM layer, the selective scan), the loss, the tape's
//! backward pass and the optimiser, down to a kernel launch and back, with the formula at every stop and an index of
//! where each op's formula, CPU reference, CUDA kernel, tests and benchmark are.
//!
//! The modules are layers; each uses only those above it in this list:
//! 1. [`device`]: CPU and CUDA memory, streams, kernels;
//! 2. [`tensor`]: shapes, dtypes, storage; [`profile`]: NVTX ranges and the per-op recorder, which the layers
//!    below open ranges in;
//! 3. [`autograd`]: the tape and gradient checks;
//! 4. [`ops`]: every op with forward, backward, CPU reference and kernel launch;
//! 5. [`nn`], [`data`], [`plan`], [`optim`], [`train`], [`infer`], [`predict`], [`metrics`], [`viz`]: the network
//!    and the workflow around it (`viz`: the pictures of runs and predictions, drawn by the trainer, `predict`,
//!    `evaluate` and `report`).
//!
//! Examples that run in `cargo test --doc`, one or more per layer: [`device`], [`tensor`], [`autograd`] (an op
//! forward and backward by hand) and [`autograd::gradcheck`] (finite differences), [`ops`], [`nn`] (the tiny model),
//! [`data::nifti`], [`optim`], the [tour](tour#the-whole-step-spelled-out) (the selective scan against its
//! recurrence, and one whole training step), [`predict`] (train, checkpoint, segment a NIfTI file) and [`metrics`].

pub mod autograd;
pub mod data;
pub mod device;
mod error;
pub mod infer;
pub mod metrics;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod plan;
pub mod predict;
pub mod profile;
pub mod tensor;
pub mod tour;
pub mod train;
pub mod viz;

pub use error::{Error, Result};
pub use tensor::{DType, Tensor};
