//! `lkm-engine profile`: where a training step's time and memory go, op by op.
//!
//! After warm-up steps it measures the step three ways on the same batch: plain (host clock around a synchronised
//! step, no per-op events, NVTX off), with NVTX ranges pushed (the cost of the ranges when no tool is attached), and
//! recorded (every op forward and backward between CUDA events, or the wall clock on the CPU, with its shapes, bytes
//! and FLOPs, and every allocation tracked). [`crate::profile::report`] turns the recording into tables.

use std::time::Instant;

use super::dump::random_batch;
use super::loss::downsample_labels;
use super::step::train_step;
use crate::device::Device;
use crate::nn::{LkmUnet, ModelConfig};
use crate::optim::Sgd;
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
    let mut step = || -> Result<()> {
        let _phase = profile::phase("train_step");
        train_step(&model, &mut params, &mut sgd, &x, &targets, true, crate::optim::DEFAULT_GRAD_CLIP).map(|_| ())
    };
    let sync = || match device {
        Device::Cuda(gpu) => gpu.synchronize(),
        Device::Cpu => Ok(()),
    };
    let median_step = |step: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut times = Vec::with_capacity(opts.steps);
        for _ in 0..opts.steps {
            sync()?;
            let t0 = Instant::now();
            step()?;
            sync()?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    for _ in 0..2 {
        step()?;
    }
    let nvtx_before = profile::nvtx_enabled();
    profile::set_nvtx(false);
    let plain_ms = median_step(&mut step)?;
    profile::set_nvtx(true);
    let nvtx_ms = median_step(&mut step)?;
    profile::set_nvtx(nvtx_before);

    sync()?;
    if let Device::Cuda(gpu) = device {
        gpu.reset_peak_memory()?;
    }
    Recorder::install(device)?;
    let recorded: Result<()> = (0..opts.steps).try_for_each(|_| step());
    let recording = Recorder::finish()?;
    recorded?;
    let pool_peak_bytes = match device {
        Device::Cuda(gpu) => Some(gpu.peak_memory()?),
        Device::Cpu => None,
    };
    Ok(Profile { recording, times: StepTimes { plain_ms, nvtx_ms, steps: opts.steps }, ceilings, pool_peak_bytes })
}
