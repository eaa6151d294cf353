//! Layers built from ops: parameters, initialisation, nnU-Net's convolution blocks, the Mamba layers and LKM-UNet.

pub mod blocks;
pub mod init;
pub mod lkm_unet;
pub mod mamba;
pub mod params;

pub use lkm_unet::{LkmUnet, ModelConfig};
pub use params::{ParamId, Params};
