//! `lkm-engine profile`: where a training step's time and memory go, op by op.
//!
//! After warm-up steps it measures the step three ways on the same batch: plain (host clock around a synchronised
//! step, no per-op events, NVTX off; with the host's time to queue it and the kernel launches it made, which say
//! whether the GPU waits for launches), with NVTX ranges pushed (the cost of the ranges when no tool is attached), and
//! recorded (every op forward and backward between CUDA events, or the wall clock on the CPU, with its shapes, bytes
//! and FLOPs, and every allocation tracked). [`crate::profile::report`] turns the recording into tables.

use std::time::Instant;

use super::dump::random_batch;
use super::loss::downsample_labels;
use super::step::{queue_step, StepInput};
use crate::device::Device;
use crate::nn::{LkmUnet, ModelConfig};
use crate::optim::{Sgd, DEFAULT_GRAD_CLIP};
use crate::profile::report::{Ceilings, StepTimes};
use crate::profile::{self, Recorder, Recording};
use crate::tensor::{DType, Tensor};
use crate::{ensure, Result};

/// What to profile.
pub struct ProfileOptions {
    /// The network (its patch is the input size).
    pub config: ModelConfig,
    /// Patches per batch.
    pub batch: usize,
    /// Steps measured in each of the three ways (after 2 warm-up steps).
    pub steps: usize,
    /// Where to run.
    pub device: Device,
}

/// A finished profile.
pub struct Profile {
    /// The per-op and per-phase records of the recorded steps.
    pub recording: Recording,
    /// Step times measured without per-op events.
    pub times: StepTimes,
    /// The machine's ceilings, measured in the same run.
    pub ceilings: Ceilings,
    /// The memory pool's high-water mark during the recorded steps (GPU only).
    pub pool_peak_bytes: Option<u64>,
}

/// Runs the profile: warm-up, plain steps, steps with NVTX ranges, recorded steps.
pub fn run(opts: &ProfileOptions) -> Result<Profile> {
    ensure!(opts.steps > 0 && opts.batch > 0, Config, "profile: --steps and --batch must be at least 1");
    let device = &opts.device;
    let ceilings = Ceilings::measure(device)?;
    let (model, params) = LkmUnet::new(opts.config.clone(), 7)?;
    let mut params = params.to(DType::F32, device)?.deep_copy()?;
    let (x, y) = random_batch(&model.config, opts.batch, 8)?;
    let x = x.to_device(device)?;
    let targets = model
        .config
        .output_sizes(&model.config.patch)
        .iter()
        .map(|s| downsample_labels(&y, s)?.to_device(device))
        .collect::<Result<Vec<Tensor>>>()?;
    let mut sgd = Sgd::default();
    let input = StepInput { model: &model, x: &x, targets: &targets, batch_dice: true, grad_clip: DEFAULT_GRAD_CLIP };
    // One step; returns the host's milliseconds until everything is queued (before the read-back that waits).
    let mut step = || -> Result<f64> {
        let _phase = profile::phase("train_step");
        let t0 = Instant::now();
        let queued = queue_step(&input, &mut params, &mut sgd, None)?;
        let queue_ms = t0.elapsed().as_secs_f64() * 1e3;
        queued.finish()?;
        Ok(queue_ms)
    };
    let sync = || match device {
        Device::Cuda(gpu) => gpu.synchronize(),
        Device::Cpu => Ok(()),
    };
    // Medians of the whole step and of its queueing.
    let median_step = |step: &mut dyn FnMut() -> Result<f64>| -> Result<(f64, f64)> {
        let (mut times, mut queued) = (Vec::with_capacity(opts.steps), Vec::with_capacity(opts.steps));
        for _ in 0..opts.steps {
            sync()?;
            let t0 = Instant::now();
            queued.push(step()?);
            sync()?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        Ok((median(times), median(queued)))
    };
    for _ in 0..2 {
        step()?;
    }
    let nvtx_before = profile::nvtx_enabled();
    profile::set_nvtx(false);
    let launched = || match device {
        Device::Cuda(gpu) => gpu.launches(),
        Device::Cpu => 0,
    };
    let before = launched();
    let (plain_ms, queue_ms) = median_step(&mut step)?;
    let launches = (launched() - before) as f64 / opts.steps.max(1) as f64;
    profile::set_nvtx(true);
    let (nvtx_ms, _) = median_step(&mut step)?;
    profile::set_nvtx(nvtx_before);

    sync()?;
    if let Device::Cuda(gpu) = device {
        gpu.reset_peak_memory()?;
    }
    Recorder::install(device)?;
    let recorded: Result<()> = (0..opts.steps).try_for_each(|_| step().map(|_| ()));
    let recording = Recorder::finish()?;
    recorded?;
    let pool_peak_bytes = match device {
        Device::Cuda(gpu) => Some(gpu.peak_memory()?),
        Device::Cpu => None,
    };
    Ok(Profile {
        recording,
        times: StepTimes { plain_ms, queue_ms, launches, nvtx_ms, steps: opts.steps },
        ceilings,
        pool_peak_bytes,
    })
}
