//! The training loop (nnU-Net's recipe, lkm-unet.md section 4): per iteration a batch of patches, the deep-supervised
//! Dice + CE loss, backward, gradient clipping at 12, SGD with Nesterov momentum; per epoch the poly learning rate
//! `lr (1 - epoch/epochs)^0.9`, validation Dice per class by sliding-window prediction of the validation cases, one
//! JSON line in `metrics.jsonl`, the curves redrawn in `progress.png` and an atomic checkpoint (`latest.safetensors`).
//!
//! Reproducibility and resume: every iteration's batch is drawn from its own generator seeded by (seed, epoch,
//! iteration) by the background loader ([`super::loader`]), so a run resumed from the checkpoint of epoch e continues
//! exactly as the uninterrupted run would have, whatever the number of loader threads.
//!
//! On several GPUs ([`Run::train_replica`], [`super::distributed`]) each process runs this loop as one replica: its
//! batches come from its rank's seed, its steps average loss and gradients with the other replicas, and only rank 0
//! validates and writes the run folder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::checkpoint;
use super::distributed::{rank_seed, Replica};
use super::loader::{BatchSource, Loader};
use super::run_dir::{CHECKPOINT, METRICS};
use super::step::{queue_step, StepInput};
use crate::data::sampler::{ForegroundIndex, PatchSampler};
use crate::data::Case;
use crate::device::Device;
use crate::metrics::dice_per_class;
use crate::nn::{LkmUnet, Params};
use crate::optim::{poly_lr, Sgd};
use crate::profile::phase;
use crate::tensor::Tensor;
use crate::{bail, Error, Result};

/// Settings of a training run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainOptions {
    /// Number of epochs.
    pub epochs: usize,
    /// Iterations (batches) per epoch.
    pub iters_per_epoch: usize,
    /// Patches per batch.
    pub batch: usize,
    /// Initial learning rate.
    pub lr: f64,
    /// Nesterov momentum.
    pub momentum: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm limit.
    pub grad_clip: f64,
    /// Seed of sampling and augmentation.
    pub seed: u64,
    /// Dice over the whole batch (nnU-Net 3d_fullres) or per sample.
    pub batch_dice: bool,
    /// Validate every this many epochs (and after the last).
    pub val_every: usize,
    /// Show a progress bar.
    pub progress: bool,
    /// Mirror patches along every axis (nnU-Net's default; turn off when classes are left/right pairs).
    #[serde(default = "default_true")]
    pub mirror: bool,
    /// Augment training patches (nnU-Net's default transforms); false samples plain crops, for debugging.
    #[serde(default = "default_true")]
    pub augment: bool,
    /// Threads preparing batches ahead of the training step (0: on the training thread). Batches do not depend on it.
    #[serde(default = "default_loader_workers")]
    pub loader_workers: usize,
}

fn default_true() -> bool {
    true
}

/// One loader thread per spare core, at most 4 (the 3D reference patch is prepared in a fraction of a GPU step).
pub fn default_loader_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1)).clamp(1, 4)
}

/// Batches each loader thread prepares ahead.
const LOADER_DEPTH: usize = 2;

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            epochs: 1000,
            iters_per_epoch: 250,
            batch: 2,
            lr: crate::optim::DEFAULT_LR,
            momentum: crate::optim::DEFAULT_MOMENTUM,
            weight_decay: crate::optim::DEFAULT_WEIGHT_DECAY,
            grad_clip: crate::optim::DEFAULT_GRAD_CLIP,
            seed: 12345,
            batch_dice: true,
            val_every: 1,
            progress: true,
            mirror: true,
            augment: true,
            loader_workers: default_loader_workers(),
        }
    }
}

/// One epoch's record, as written to `metrics.jsonl`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EpochRecord {
    /// Epoch index (0-based).
    pub epoch: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Validation Dice per foreground class (None: class absent from prediction and reference in every case).
    pub val_dice: Option<Vec<Option<f64>>>,
    /// Mean of the present per-class Dice values.
    pub val_mean_dice: Option<f64>,
    /// Seconds the epoch took (training and validation).
    pub seconds: f64,
    /// Training throughput in patch voxels per second.
    pub voxels_per_second: f64,
    /// Median milliseconds per training iteration (sampling included).
    pub ms_per_iteration: f64,
    /// Peak GPU memory of the engine's allocations during the epoch, GiB (None on the CPU).
    pub peak_gib: Option<f64>,
}

/// Everything a run needs besides the data.
pub struct Run<'a> {
    /// The network.
    pub model: &'a LkmUnet,
    /// Where to compute.
    pub device: Device,
    /// The settings.
    pub opts: TrainOptions,
    /// Output folder: metrics.jsonl, latest.safetensors.
    pub out_dir: PathBuf,
    /// Extra metadata stored with checkpoints (normalisation, class names, data source).
    pub meta: serde_json::Value,
}

/// Where training starts: fresh parameters, or a checkpoint's parameters, momentum and epoch.
pub struct Start {
    /// Parameters (any device; moved to the run's device).
    pub params: Params,
    /// Momentum buffers aligned with the parameters.
    pub momentum: Vec<Option<Tensor>>,
    /// The first epoch to run.
    pub epoch: usize,
}

impl Run<'_> {
    /// Trains from `start` to `opts.epochs`, returning the records of the epochs run and the final parameters.
    pub fn train(&self, train: &[Case], val: &[Case], start: Start) -> Result<(Vec<EpochRecord>, Params)> {
        self.train_replica(train, val, start, None)
    }

    /// [`Run::train`] as one replica of a data-parallel run when `replica` is given (the run's device must be the
    /// replica's GPU): the replicas start from rank 0's parameters, rank r samples with [`rank_seed`]`(seed, r)`,
    /// every step averages loss and gradients over the replicas, and only rank 0 validates, prints the epoch summary
    /// and writes the run folder (the other ranks return records without validation). The records' throughput counts
    /// the patches of every replica.
    pub fn train_replica(
        &self,
        train: &[Case],
        val: &[Case],
        start: Start,
        replica: Option<&Replica>,
    ) -> Result<(Vec<EpochRecord>, Params)> {
        let cfg = &self.model.config;
        let o = &self.opts;
        if train.is_empty() {
            bail!(Data, "no training cases");
        }
        // A 2D patch is cut from one slice: compare its two axes with H and W.
        let patch3: Vec<usize> =
            if cfg.patch.len() == 2 { [&[1][..], &cfg.patch[..]].concat() } else { cfg.patch.clone() };
        // As in nnU-Net, a case smaller than the patch is zero-padded to it (a plan's patch can exceed the median
        // case once it is rounded up to its divisibility); say so, since a preset patch far larger wastes compute.
        let small: Vec<&str> =
            train.iter().filter(|c| c.shape.iter().zip(&patch3).any(|(s, p)| s < p)).map(|c| c.name.as_str()).collect();
        if !small.is_empty() {
            eprintln!(
                "note: {} of {} training case(s) ({}) are smaller than the patch {:?} along some axis and are \
                 zero-padded to it",
                small.len(),
                train.len(),
                small.iter().take(3).copied().collect::<Vec<_>>().join(", "),
                cfg.patch
            );
        }
        let fg: Vec<ForegroundIndex> = train.iter().map(|c| ForegroundIndex::new(c, cfg.num_classes)).collect();
        let source = BatchSource {
            sampler: PatchSampler {
                patch: cfg.patch.clone(),
                fg_fraction: 1.0 / 3.0,
                augment: o.augment,
                mirror: o.mirror,
            },
            cases: train,
            foreground: &fg,
            batch: o.batch,
            seed: rank_seed(o.seed, replica.map_or(0, Replica::rank)),
            iters_per_epoch: o.iters_per_epoch,
            target_sizes: cfg.output_sizes(&cfg.patch),
        };
        std::thread::scope(|scope| {
            let batches = Loader::start(scope, &source, start.epoch, o.epochs, o.loader_workers, LOADER_DEPTH);
            self.run_epochs(batches, val, start, replica)
        })
    }

    /// The epochs of [`Run::train_replica`], training on `batches`.
    fn run_epochs(
        &self,
        mut batches: Loader,
        val: &[Case],
        start: Start,
        replica: Option<&Replica>,
    ) -> Result<(Vec<EpochRecord>, Params)> {
        let cfg = &self.model.config;
        let o = &self.opts;
        // Rank 0 (or the only process) validates and writes; the other replicas only train.
        let writes = replica.is_none_or(Replica::is_root);
        let mut params = start.params.to(crate::tensor::DType::F32, &self.device)?.deep_copy()?;
        if let Some(r) = replica {
            r.broadcast_params(&mut params)?;
        }
        let mut sgd = Sgd::new(o.lr, o.momentum, o.weight_decay);
        let momentum = start
            .momentum
            .iter()
            .map(|m| m.as_ref().map(|t| t.to_device(&self.device)).transpose())
            .collect::<Result<Vec<_>>>()?;
        if momentum.iter().any(|m| m.is_some()) {
            sgd.set_momentum_buffers(momentum);
        }
        let log_path = self.out_dir.join(METRICS);
        let mut log = if writes {
            std::fs::create_dir_all(&self.out_dir)
                .map_err(|e| Error::Io(format!("creating {}: {e}", self.out_dir.display())))?;
            crate::viz::report::record_environment(&self.out_dir, &self.device, start.epoch)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| Error::Io(format!("opening {}: {e}", log_path.display())))?;
            Some(file)
        } else {
            None
        };
        let mut records = Vec::new();
        // The patches of one iteration, over every replica.
        let world = replica.map_or(1, Replica::world);
        let patch_voxels = (world * o.batch * cfg.patch.iter().product::<usize>()) as f64;
        for epoch in start.epoch..o.epochs {
            let t0 = Instant::now();
            sgd.lr = poly_lr(o.lr, epoch, o.epochs);
            let bar = if writes { self.progress_bar(epoch) } else { None };
            let mut loss_sum = 0.0;
            let mut iteration_ms = Vec::with_capacity(o.iters_per_epoch);
            if let Device::Cuda(gpu) = &self.device {
                gpu.reset_peak_memory()?;
            }
            // Each iteration's batch is taken and copied to the device while the GPU still works on the previous
            // step (the copy is queued after it), so the GPU does not wait for the host between steps.
            let mut upcoming = match o.iters_per_epoch {
                0 => None,
                _ => Some(self.next_on_device(&mut batches)?),
            };
            for it in 0..o.iters_per_epoch {
                let t_it = Instant::now();
                let (x, targets) = upcoming.take().expect("each iteration's batch is taken before it");
                let step = StepInput {
                    model: self.model,
                    x: &x,
                    targets: &targets,
                    batch_dice: o.batch_dice,
                    grad_clip: o.grad_clip,
                };
                let queued = queue_step(&step, &mut params, &mut sgd, replica)?;
                if it + 1 < o.iters_per_epoch {
                    upcoming = Some(self.next_on_device(&mut batches)?);
                }
                let loss = queued.finish()?;
                if !loss.is_finite() {
                    bail!(NonFinite, "{}", self.diverged(loss, epoch, it, start.epoch, loss_sum / it.max(1) as f64));
                }
                loss_sum += loss;
                iteration_ms.push(t_it.elapsed().as_secs_f64() * 1e3);
                if let Some(b) = &bar {
                    let vps = patch_voxels * (it + 1) as f64 / t0.elapsed().as_secs_f64();
                    b.set_message(format!("loss {:.4}  {:.2} Mvox/s", loss_sum / (it + 1) as f64, vps / 1e6));
                    b.inc(1);
                }
            }
            if let Some(b) = bar {
                b.finish();
            }
            let train_seconds = t0.elapsed().as_secs_f64();
            let peak_gib = match &self.device {
                Device::Cuda(gpu) => Some(gpu.peak_memory()? as f64 / (1u64 << 30) as f64),
                Device::Cpu => None,
            };
            iteration_ms.sort_by(|a, b| a.total_cmp(b));
            let validate =
                writes && !val.is_empty() && ((epoch + 1) % o.val_every.max(1) == 0 || epoch + 1 == o.epochs);
            let val_dice = if validate { Some(self.validate(&params, val)?) } else { None };
            let present: Vec<f64> = val_dice.iter().flatten().flatten().copied().collect();
            let rec = EpochRecord {
                epoch,
                lr: sgd.lr,
                train_loss: loss_sum / o.iters_per_epoch.max(1) as f64,
                val_mean_dice: (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64),
                val_dice,
                seconds: t0.elapsed().as_secs_f64(),
                voxels_per_second: patch_voxels * o.iters_per_epoch as f64 / train_seconds,
                ms_per_iteration: iteration_ms.get(iteration_ms.len() / 2).copied().unwrap_or(f64::NAN),
                peak_gib,
            };
            if let Some(log) = &mut log {
                eprintln!("{}", epoch_summary(&rec));
                writeln!(log, "{}", serde_json::to_string(&rec).expect("records serialise"))
                    .map_err(|e| Error::Io(format!("writing {}: {e}", log_path.display())))?;
                self.save(&self.out_dir.join(CHECKPOINT), &params, &sgd, epoch + 1)?;
                // After the checkpoint, and only a warning if it fails: a picture never costs training.
                crate::viz::progress::write_progress(&self.out_dir, &crate::viz::class_names(&self.meta))
                    .unwrap_or_else(|e| eprintln!("progress.png not drawn: {e}"));
            }
            records.push(rec);
        }
        Ok((records, params))
    }

    /// Mean Dice per foreground class over the validation cases (sliding window, no mirroring).
    fn validate(&self, params: &Params, val: &[Case]) -> Result<Vec<Option<f64>>> {
        let k = self.model.config.num_classes;
        let mut sums = vec![(0.0, 0usize); k - 1];
        let cfg = crate::infer::InferConfig {
            patch: self.model.config.patch.clone(),
            step_fraction: 0.5,
            mirror: false,
            batch: self.opts.batch,
        };
        for case in val {
            let pred = crate::infer::predict_labels(
                self.model,
                params,
                &self.device,
                &case.image,
                case.channels,
                case.shape,
                &cfg,
            )?;
            let reference = case
                .label
                .as_ref()
                .ok_or_else(|| Error::Data(format!("validation case {} has no labels", case.name)))?;
            for (s, d) in sums.iter_mut().zip(dice_per_class(&pred, reference, k)?) {
                if let Some(d) = d {
                    s.0 += d;
                    s.1 += 1;
                }
            }
        }
        Ok(sums.iter().map(|&(s, n)| (n > 0).then(|| s / n as f64)).collect())
    }

    /// The loader's next batch, on the run's device: the image and the labels at every output's resolution.
    fn next_on_device(&self, batches: &mut Loader) -> Result<(Tensor, Vec<Tensor>)> {
        let batch = {
            let _phase = phase("sample");
            batches.next_batch()?
        };
        let _phase = phase("to_device");
        let targets = batch.targets.iter().map(|t| t.to_device(&self.device)).collect::<Result<Vec<_>>>()?;
        Ok((batch.image.to_device(&self.device)?, targets))
    }

    /// The message for a non-finite loss at (`epoch`, `it`) of a run started at `start_epoch`: which checkpoint
    /// exists and what was last done. The images were checked finite when read and the loss of finite inputs is
    /// finite, so the parameters diverged.
    fn diverged(&self, loss: f64, epoch: usize, it: usize, start_epoch: usize, mean_loss: f64) -> String {
        let ck = self.out_dir.join(CHECKPOINT);
        let checkpoint = if epoch > start_epoch || (epoch > 0 && ck.exists()) {
            format!("the checkpoint {} of epoch {epoch} is intact; resume from it with a lower --lr", ck.display())
        } else {
            "no checkpoint was written (the first epoch did not finish); start again with a lower --lr".to_string()
        };
        let done = if it > 0 {
            format!("the {it} iteration(s) before it had a mean loss of {mean_loss:.4}")
        } else {
            format!("it was the epoch's first iteration ({} epoch(s) done in this run)", epoch - start_epoch)
        };
        format!(
            "the loss is {loss} at epoch {epoch}, iteration {it}; {done}. The images were finite when read, so the \
             weights diverged (lr {:.3e} at this epoch); training stopped: {checkpoint}",
            poly_lr(self.opts.lr, epoch, self.opts.epochs)
        )
    }

    fn progress_bar(&self, epoch: usize) -> Option<indicatif::ProgressBar> {
        if !self.opts.progress {
            return None;
        }
        let bar = indicatif::ProgressBar::new(self.opts.iters_per_epoch as u64);
        let style = indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {elapsed} {msg}")
            .expect("valid template")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("epoch {}/{}", epoch + 1, self.opts.epochs));
        Some(bar)
    }

    /// Writes a checkpoint with the run's metadata and `epochs_done`.
    fn save(&self, path: &Path, params: &Params, sgd: &Sgd, epochs_done: usize) -> Result<()> {
        let meta = serde_json::json!({
            "config": self.model.config,
            "options": self.opts,
            "epoch": epochs_done,
            "run": self.meta,
        });
        checkpoint::save(path, params, sgd.momentum_buffers(), &meta)
    }
}

/// A one-line summary of an epoch for the terminal.
pub fn epoch_summary(r: &EpochRecord) -> String {
    let dice = match (&r.val_dice, r.val_mean_dice) {
        (Some(d), Some(m)) => format!(
            "  val Dice {m:.4} [{}]",
            d.iter().map(|v| v.map_or("-".into(), |v| format!("{v:.3}"))).collect::<Vec<_>>().join(" ")
        ),
        _ => String::new(),
    };
    let memory = r.peak_gib.map_or(String::new(), |g| format!("  peak {g:.2} GiB"));
    format!(
        "epoch {:4}  lr {:.5}  loss {:.4}{dice}  {:.1}s  {:.0} ms/it  {:.2} Mvox/s{memory}",
        r.epoch,
        r.lr,
        r.train_loss,
        r.seconds,
        r.ms_per_iteration,
        r.voxels_per_second / 1e6
    )
}
