//! Training: the loss, and (next) the loop, checkpoints and metrics.

pub mod loss;
