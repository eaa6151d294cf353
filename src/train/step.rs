//! One training step, as the trainer, `dump-step` and `profile` run it: forward, the deep-supervision loss, the
//! tape's backward pass, global gradient-norm clipping and the SGD update, each inside its profiling phase. As one
//! replica of a data-parallel run ([`Replica`]), the loss and the gradients are averaged over the replicas before
//! they are used.

use super::distributed::Replica;
use super::loss::deep_supervision_loss;
use crate::autograd::Tape;
use crate::nn::{LkmUnet, Params};
use crate::optim::{clip_for_step, Clip, Sgd};
use crate::profile::phase;
use crate::tensor::Tensor;
use crate::Result;

/// What one step trains on: the model, a device batch and the labels at every output's resolution, and the loss and
/// clipping settings.
pub struct StepInput<'a> {
    /// The network.
    pub model: &'a LkmUnet,
    /// The device batch (n, channels, patch...).
    pub x: &'a Tensor,
    /// The labels at every output's resolution.
    pub targets: &'a [Tensor],
    /// Dice over the whole batch (nnU-Net 3d_fullres) or per sample.
    pub batch_dice: bool,
    /// Global gradient-norm limit.
    pub grad_clip: f64,
}

/// Runs one optimisation step of `model` on the device batch `x` with the labels at every output's resolution
/// (`targets`) and returns the loss, read back from the device once the whole step is queued. A non-finite loss is
/// returned with the parameters as they were: the backward pass runs, but clipping and SGD change nothing (on the GPU
/// they read that decision from device memory). A non-finite gradient norm with a finite loss is an
/// [`Error::NonFinite`](crate::Error::NonFinite), the parameters likewise unchanged.
pub fn train_step(
    model: &LkmUnet,
    params: &mut Params,
    sgd: &mut Sgd,
    x: &Tensor,
    targets: &[Tensor],
    batch_dice: bool,
    grad_clip: f64,
) -> Result<f64> {
    replica_step(&StepInput { model, x, targets, batch_dice, grad_clip }, params, sgd, None)
}

/// [`train_step`], as one replica of a data-parallel run when `replica` is given: the returned loss is the mean over
/// the replicas (every replica reads the same value, so all stop together on a non-finite one), and every gradient is
/// the mean over the replicas, reduced by NCCL in buckets while the backward pass runs ([`Replica::backward`]).
/// Clipping and SGD then see the same gradients on every replica, so the weights stay identical. Without a replica
/// this is the single-device step. Nothing waits for the GPU before the optimiser's launch: the one read-back is the
/// clipping status, at the end.
pub fn replica_step(input: &StepInput, params: &mut Params, sgd: &mut Sgd, replica: Option<&Replica>) -> Result<f64> {
    queue_step(input, params, sgd, replica)?.finish()
}

/// A training step whose work is queued on the device ([`queue_step`]).
pub struct QueuedStep {
    clip: Clip,
}

impl QueuedStep {
    /// Waits for the step (reading its clipping status back) and returns its loss, as [`replica_step`] does.
    pub fn finish(self) -> Result<f64> {
        let report = self.clip.finish()?;
        if !report.loss.is_finite() {
            return Ok(report.loss);
        }
        report.norm()?;
        Ok(report.loss)
    }
}

/// [`replica_step`] up to its read-back: everything is queued, nothing waited for, so the caller can prepare the
/// next batch while the GPU works, then [`QueuedStep::finish`].
pub fn queue_step(
    input: &StepInput,
    params: &mut Params,
    sgd: &mut Sgd,
    replica: Option<&Replica>,
) -> Result<QueuedStep> {
    let mut tape = Tape::new();
    params.watch(&mut tape);
    let outputs = {
        let _phase = phase("forward");
        input.model.forward(&mut tape, params, input.x)?
    };
    params.keep_copies(&tape);
    let loss = {
        let _phase = phase("loss");
        let _layer = crate::profile::layer("loss");
        deep_supervision_loss(&mut tape, &outputs, input.targets, input.batch_dice)?
    };
    drop(outputs);
    let mean_loss = match replica {
        Some(r) => r.average_loss(&loss)?,
        None => loss.clone(),
    };
    // Parameters no gradient reaches (the deepest seg head: loss weight 0) are skipped, as PyTorch does.
    let mut g: Vec<Option<Tensor>> = {
        let _phase = phase("backward");
        match replica {
            Some(r) => r.backward(&mut tape, &loss, params)?,
            None => {
                let mut grads = tape.backward(&loss)?;
                params.tensors().iter().map(|p| grads.take(p)).collect()
            }
        }
    };
    let clip = {
        let _phase = phase("clip");
        clip_for_step(&mut g, input.grad_clip, &mean_loss)?
    };
    {
        let _phase = phase("optimiser");
        let (tensors, copies) = params.for_optimiser();
        sgd.step_clipped(tensors, copies, &g, &clip)?;
    }
    Ok(QueuedStep { clip })
}
