//! One training step, as the trainer, `dump-step` and `profile` run it: forward, the deep-supervision loss, the
//! tape's backward pass, global gradient-norm clipping and the SGD update, each inside its profiling phase.

use super::loss::deep_supervision_loss;
use crate::autograd::Tape;
use crate::nn::{LkmUnet, Params};
use crate::optim::{clip_present_grad_norm, Sgd};
use crate::profile::phase;
use crate::tensor::Tensor;
use crate::Result;

/// Runs one optimisation step of `model` on the device batch `x` with the labels at every output's resolution
/// (`targets`) and returns the loss, read back from the device. A non-finite loss is returned before the backward
/// pass, leaving the parameters as they were.
pub fn train_step(
    model: &LkmUnet,
    params: &mut Params,
    sgd: &mut Sgd,
    x: &Tensor,
    targets: &[Tensor],
    batch_dice: bool,
    grad_clip: f64,
) -> Result<f64> {
    let mut tape = Tape::new();
    params.watch(&mut tape);
    let outputs = {
        let _phase = phase("forward");
        model.forward(&mut tape, params, x)?
    };
    let loss = {
        let _phase = phase("loss");
        let _layer = crate::profile::layer("loss");
        deep_supervision_loss(&mut tape, &outputs, targets, batch_dice)?
    };
    drop(outputs);
    let value = loss.scalar()?;
    if !value.is_finite() {
        return Ok(value);
    }
    let mut grads = {
        let _phase = phase("backward");
        tape.backward(&loss)?
    };
    // Parameters no gradient reaches (the deepest seg head: loss weight 0) are skipped, as PyTorch does.
    let mut g: Vec<Option<Tensor>> = params.tensors().iter().map(|p| grads.take(p)).collect();
    {
        let _phase = phase("clip");
        clip_present_grad_norm(&mut g, grad_clip)?;
    }
    let _phase = phase("optimiser");
    sgd.step_partial(params.tensors_mut(), &g).map(|_| value)
}
