//! Layers built from ops: parameters, initialisation, the Mamba layers and (next) the LKM-UNet.

pub mod init;
pub mod mamba;
pub mod params;

pub use params::{ParamId, Params};
