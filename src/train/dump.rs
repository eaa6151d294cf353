//! One training step written out for the PyTorch parity check (`tools/parity.py`): the parameters under their public
//! names with the model configuration, the inputs, and what the engine computed: every deep-supervision output, the
//! loss and every parameter's gradient. Also times whole training steps (forward, loss, backward, clipping, SGD) for
//! the side-by-side step table.

use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::checkpoint::write_atomically;
use super::loss::{deep_supervision_loss, downsample_labels};
use super::step::train_step;
use crate::autograd::Tape;
use crate::device::Device;
use crate::nn::{LkmUnet, ModelConfig, Params};
use crate::optim::{Sgd, DEFAULT_GRAD_CLIP};
use crate::tensor::{DType, Tensor};
use crate::{ensure, Error, Result};

/// Writes named tensors (any device; float64 ones as F64, the rest as F32) and string metadata as a safetensors file.
fn write_tensors(path: &Path, tensors: &[(String, Tensor)], meta: serde_json::Value) -> Result<()> {
    let host = tensors
        .iter()
        .map(|(n, t)| {
            let (dtype, bytes) = match t.dtype() {
                DType::F64 => (safetensors::Dtype::F64, bytemuck::cast_slice::<f64, u8>(&t.to_vec_f64()?).to_vec()),
                _ => (safetensors::Dtype::F32, bytemuck::cast_slice::<f32, u8>(&t.to_vec_f32()?).to_vec()),
            };
            Ok((n.clone(), dtype, t.shape().to_vec(), bytes))
        })
        .collect::<Result<Vec<_>>>()?;
    let views = host
        .iter()
        .map(|(n, dtype, s, b)| {
            let v = safetensors::tensor::TensorView::new(*dtype, s.clone(), b)
                .map_err(|e| Error::Data(format!("{n}: {e}")))?;
            Ok((n.as_str(), v))
        })
        .collect::<Result<Vec<_>>>()?;
    let info = std::collections::HashMap::from([("lkm_engine".to_string(), meta.to_string())]);
    let bytes =
        safetensors::serialize(views, Some(info)).map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    write_atomically(path, &bytes)
}

/// At initialisation every residual branch ends in an InstanceNorm of scale 0 and every bias is 0, which makes many
/// gradients exactly zero and a parity check of them vacuous: draw norm scales from U(0.5, 1.5) and biases (but
/// dt_proj's, which sets Mamba's step sizes) from U(-0.1, 0.1).
pub fn randomise_norms_and_biases(params: &Params, seed: u64) -> Result<Params> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5EED);
    let tensors = params
        .names()
        .iter()
        .zip(params.tensors())
        .map(|(name, t)| {
            if name.ends_with("norm.weight") {
                Tensor::uniform(t.shape(), 0.5, 1.5, DType::F32, &mut rng)
            } else if name.ends_with(".bias") && !name.contains("dt_proj") {
                Tensor::uniform(t.shape(), -0.1, 0.1, DType::F32, &mut rng)
            } else {
                Ok(t.clone())
            }
        })
        .collect::<Result<Vec<_>>>()?;
    params.with_tensors(tensors)
}

/// Random inputs for a batch at the model's patch size: x ~ N(0, 1), labels uniform over the classes.
pub fn random_batch(config: &ModelConfig, batch: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut xs = vec![batch, config.in_channels];
    xs.extend_from_slice(&config.patch);
    let x = Tensor::randn(&xs, DType::F32, &mut rng)?;
    let mut ys = vec![batch, 1];
    ys.extend_from_slice(&config.patch);
    let n: usize = ys.iter().product();
    let labels: Vec<f32> = (0..n).map(|_| rng.random_range(0..config.num_classes) as f32).collect();
    Ok((x, Tensor::from_vec(labels, &ys)?))
}

/// Forward, loss and backward of one batch; returns the outputs, the loss and the gradients (None where none flows).
fn forward_backward(
    model: &LkmUnet,
    params: &Params,
    x: &Tensor,
    targets: &[Tensor],
) -> Result<(Vec<Tensor>, Tensor, Vec<Option<Tensor>>)> {
    let mut tape = Tape::new();
    params.watch(&mut tape);
    let outputs = model.forward(&mut tape, params, x)?;
    let loss = deep_supervision_loss(&mut tape, &outputs, targets, true)?;
    let mut grads = tape.backward(&loss)?;
    let g = params.tensors().iter().map(|p| grads.take(p)).collect();
    Ok((outputs, loss, g))
}

/// Writes `dir/weights.safetensors`, `dir/inputs.safetensors` (float32) and `dir/engine.safetensors` for one step of
/// `config` at batch `batch` computed in `dtype` (float64 on the CPU only: the exact-arithmetic side of the parity
/// check), then times `steps` full training steps (after 2 untimed ones; none when `steps` is 0) and writes
/// `dir/engine_step.json`.
pub fn dump_step(
    config: ModelConfig,
    batch: usize,
    seed: u64,
    device: &Device,
    dtype: DType,
    dir: &Path,
    steps: usize,
) -> Result<()> {
    ensure!(
        dtype == DType::F32 || matches!(device, Device::Cpu),
        Config,
        "dump-step: float64 runs on the CPU only (the CUDA kernels are float32)"
    );
    let (model, params) = LkmUnet::new(config, seed)?;
    let params = randomise_norms_and_biases(&params, seed)?.to(DType::F32, &Device::Cpu)?;
    let (x, y) = random_batch(&model.config, batch, seed + 1)?;
    let meta = serde_json::json!({ "config": model.config, "batch_dice": true });
    let named = |p: &Params| p.names().iter().cloned().zip(p.tensors().iter().cloned()).collect::<Vec<_>>();
    write_tensors(&dir.join("weights.safetensors"), &named(&params), meta.clone())?;
    write_tensors(
        &dir.join("inputs.safetensors"),
        &[("x".into(), x.clone()), ("labels".into(), y.clone())],
        meta.clone(),
    )?;
    let params = params.to(dtype, device)?.deep_copy()?;
    let xd = x.to_dtype(dtype)?.to_device(device)?;
    let sizes = model.config.output_sizes(&model.config.patch);
    let targets = sizes
        .iter()
        .map(|s| downsample_labels(&y, s)?.to_dtype(dtype)?.to_device(device))
        .collect::<Result<Vec<_>>>()?;
    let (outputs, loss, grads) = forward_backward(&model, &params, &xd, &targets)?;
    let mut results: Vec<(String, Tensor)> =
        outputs.iter().enumerate().map(|(i, o)| (format!("out.{i}"), o.clone())).collect();
    results.push(("loss".into(), loss.clone()));
    for (name, g) in params.names().iter().zip(&grads) {
        if let Some(g) = g {
            results.push((format!("grad.{name}"), g.clone()));
        }
    }
    let mut meta = meta;
    meta["dtype"] = dtype_name(dtype).into();
    meta["precision"] = device.precision().to_string().into();
    write_tensors(&dir.join("engine.safetensors"), &results, meta)?;
    drop((outputs, grads, results));

    // Whole training steps, the trainer's own (clip 12, SGD Nesterov, the loss read back), timed on the host after a
    // sync.
    let mut params = params;
    let mut sgd = Sgd::default();
    let mut times = Vec::new();
    if let Device::Cuda(gpu) = device {
        gpu.synchronize()?;
        gpu.reset_peak_memory()?;
    }
    let warmup = if steps > 0 { 2 } else { 0 };
    for i in 0..steps + warmup {
        let t0 = Instant::now();
        train_step(&model, &mut params, &mut sgd, &xd, &targets, true, DEFAULT_GRAD_CLIP)?;
        if let Device::Cuda(gpu) = device {
            gpu.synchronize()?;
        }
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let peak = match device {
        Device::Cuda(gpu) => Some(gpu.peak_memory()? as f64 / (1u64 << 30) as f64),
        Device::Cpu => None,
    };
    let device_name = match device {
        Device::Cuda(gpu) => gpu.name().to_string(),
        Device::Cpu => "cpu".into(),
    };
    let report = serde_json::json!({
        "device": device_name,
        "dtype": dtype_name(dtype),
        "precision": device.precision().to_string(),
        "recompute_mamba": model.config.mamba.recompute,
        "batch": batch,
        "parameters": params.count(),
        "ms_per_step_median": times.get(times.len() / 2),
        "ms_per_step_all": times,
        "peak_gib": peak,
    });
    write_atomically(&dir.join("engine_step.json"), report.to_string().as_bytes())
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F64 => "float64",
        _ => "float32",
    }
}
