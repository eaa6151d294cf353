//! Layers built from ops: parameters, initialisation, nnU-Net's convolution blocks, the Mamba layers and LKM-UNet.
//!
//! A network is its structure ([`LkmUnet`], built from a [`ModelConfig`]) plus one store of named parameters
//! ([`Params`]) that its `forward` reads; the names are the public PyTorch code's `state_dict` keys.
//!
//! ```
//! use lkm_engine::autograd::Tape;
//! use lkm_engine::nn::{LkmUnet, ModelConfig};
//! use lkm_engine::{DType, Tensor};
//! use rand::rngs::StdRng;
//! use rand::SeedableRng;
//!
//! # fn main() -> lkm_engine::Result<()> {
//! let mut config = ModelConfig::tiny_3d(); // 4 stages, 8 to 64 channels, 4 classes
//! config.patch = vec![16, 16, 16];
//! let (model, params) = LkmUnet::new(config, 0)?;
//! assert!(params.names().iter().any(|n| n == "encoder.mamba_layers.0.mamba_forw.A_log"));
//!
//! // Deep supervision: one map of class logits per decoder level, highest resolution first.
//! let x = Tensor::randn(&[1, 1, 16, 16, 16], DType::F32, &mut StdRng::seed_from_u64(1))?;
//! let outputs = model.forward(&mut Tape::no_grad(), &params, &x)?;
//! let shapes: Vec<&[usize]> = outputs.iter().map(|o| o.shape()).collect();
//! assert_eq!(shapes, [[1, 4, 16, 16, 16], [1, 4, 8, 8, 8], [1, 4, 4, 4, 4]]);
//!
//! // A PiM window that does not divide its stage's map is refused before anything runs.
//! let mut bad = ModelConfig::tiny_3d();
//! bad.pim_windows[1] = vec![4, 4, 5];
//! let err = LkmUnet::new(bad, 0).err().expect("a bad window").to_string();
//! assert!(err.contains("PiM stage 1") && err.contains("axis W"), "{err}");
//! # Ok(())
//! # }
//! ```

pub mod blocks;
pub mod init;
pub mod lkm_unet;
pub mod mamba;
pub mod params;

pub use lkm_unet::{ConvKind, ConvUse, LkmUnet, ModelConfig};
pub use params::{ParamId, Params};
