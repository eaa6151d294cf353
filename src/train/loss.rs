//! nnU-Net's training loss: soft Dice + cross-entropy (weights 1:1) on every deep-supervision output, each against
//! the label map downsampled to its resolution, output i weighted by 2^-i with the lowest resolution weighted 0, and
//! the weights normalised to sum 1.

use crate::autograd::Tape;
use crate::ops::add::add;
use crate::ops::cross_entropy::cross_entropy;
use crate::ops::dice::soft_dice_loss;
use crate::ops::scale::scale;
use crate::tensor::Tensor;
use crate::{ensure, Result};

/// The deep-supervision weights for `n` outputs (highest resolution first): 2^-i, the last 0 (when n > 1),
/// normalised to sum 1.
pub fn deep_supervision_weights(n: usize) -> Vec<f64> {
    let mut w: Vec<f64> = (0..n).map(|i| 0.5f64.powi(i as i32)).collect();
    if n > 1 {
        w[n - 1] = 0.0;
    }
    let total: f64 = w.iter().sum();
    w.iter().map(|v| v / total).collect()
}

/// The label map (N, 1, spatial) reduced to `size` by nearest neighbour: output voxel o takes input voxel
/// o * f + f / 2 on each axis of integer factor f (the centre of its block, as nnU-Net v2's
/// `F.interpolate(mode='nearest-exact')` picks).
pub fn downsample_labels(labels: &Tensor, size: &[usize]) -> Result<Tensor> {
    let shape = labels.shape();
    let spatial = &shape[2..];
    ensure!(spatial.len() == size.len(), Shape, "labels {shape:?} cannot be reduced to {size:?}");
    if spatial == size {
        return Ok(labels.clone());
    }
    let factors: Vec<usize> = spatial.iter().zip(size).map(|(a, b)| a / b).collect();
    ensure!(
        spatial.iter().zip(size).zip(&factors).all(|((a, b), f)| *f >= 1 && b * f == *a),
        Shape,
        "labels of spatial size {spatial:?} cannot be reduced to {size:?} by integer factors"
    );
    let src = labels.to_vec_f32()?;
    let (n, c) = (shape[0], shape[1]);
    let s3 = |v: &[usize]| if v.len() == 2 { [1, v[0], v[1]] } else { [v[0], v[1], v[2]] };
    let (i3, o3) = (s3(spatial), s3(size));
    let f3 = s3(&factors);
    let mut out = Vec::with_capacity(n * c * o3.iter().product::<usize>());
    for plane in 0..n * c {
        let base = plane * i3.iter().product::<usize>();
        for d in 0..o3[0] {
            for h in 0..o3[1] {
                for w in 0..o3[2] {
                    let (sd, sh, sw) = (d * f3[0] + f3[0] / 2, h * f3[1] + f3[1] / 2, w * f3[2] + f3[2] / 2);
                    out.push(src[base + (sd * i3[1] + sh) * i3[2] + sw]);
                }
            }
        }
    }
    let mut out_shape = vec![n, c];
    out_shape.extend_from_slice(size);
    Tensor::from_vec(out, &out_shape)?.to_dtype(labels.dtype())?.to_device(&labels.device())
}

/// The loss of one batch: `sum_i w_i (CE(out_i, y_i) + Dice(out_i, y_i))`, where `targets[i]` is the label map at the
/// resolution of `outputs[i]`. Outputs with weight 0 are skipped.
pub fn deep_supervision_loss(
    tape: &mut Tape,
    outputs: &[Tensor],
    targets: &[Tensor],
    batch_dice: bool,
) -> Result<Tensor> {
    ensure!(
        outputs.len() == targets.len() && !outputs.is_empty(),
        Shape,
        "{} outputs for {} targets",
        outputs.len(),
        targets.len()
    );
    let weights = deep_supervision_weights(outputs.len());
    let mut total: Option<Tensor> = None;
    for ((out, target), &w) in outputs.iter().zip(targets).zip(&weights) {
        if w == 0.0 {
            continue;
        }
        let ce = cross_entropy(tape, out, target)?;
        let dice = soft_dice_loss(tape, out, target, batch_dice)?;
        let both = add(tape, &ce, &dice)?;
        let term = scale(tape, &both, w)?;
        total = Some(match total {
            Some(t) => add(tape, &t, &term)?,
            None => term,
        });
    }
    Ok(total.expect("the first weight is positive"))
}
