//! Training: the loss, and (next) the loop, checkpoints and metrics.

pub mod checkpoint;
pub mod dump;
pub mod loss;
pub mod prepare;
pub mod profile;
pub mod step;
pub mod trainer;
