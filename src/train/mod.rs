//! Training: the loss, one step ([`step::train_step`]), the loop, data-parallel training on several GPUs
//! ([`distributed`]), checkpoints, data preparation, the launch settings
//! a run is resumed with ([`launch`]), the run folder and its lock ([`run_dir`]), the step dump for the parity check
//! and the step profile.
//!
//! One training step, spelled out with the public items and runnable, is in
//! [the tour](crate::tour#the-whole-step-spelled-out); the [`predict`](crate::predict) example trains one iteration
//! with [`Run::train`](trainer::Run::train) and segments a NIfTI file with the checkpoint it wrote.

pub mod checkpoint;
pub mod distributed;
pub mod dump;
pub mod launch;
pub mod loader;
pub mod loss;
pub mod prepare;
pub mod profile;
pub mod run_dir;
pub mod step;
pub mod trainer;
