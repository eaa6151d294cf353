//! The `lkm-engine` command line: plan, train, predict, evaluate, synth, devices.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use lkm_engine::data::dataset::check_same_grid;
use lkm_engine::data::dataset::write_dataset;
use lkm_engine::data::nifti::read_volume;
use lkm_engine::data::synth::{phantom_dataset, SynthConfig, PHANTOM_LABELS};
use lkm_engine::device::{Device, Gpu, Precision};
use lkm_engine::metrics::{evaluate_case, scores_csv, summary_table};
use lkm_engine::nn::{LkmUnet, ModelConfig};
use lkm_engine::plan::{self, Dims, Plan, PlanOptions, Plans};
use lkm_engine::predict::{check_output, input_cases, pair_labels, Predictor};
use lkm_engine::train::checkpoint::{self, Checkpoint};
use lkm_engine::train::distributed::{self, DistFlags, NcclId, Replica, Role};
use lkm_engine::train::launch::{parse_pim_layout, Launch};
use lkm_engine::train::prepare::{self, Prepared};
use lkm_engine::train::run_dir::{RunDir, CHECKPOINT};
use lkm_engine::train::trainer::{Run, Start, TrainOptions};
use lkm_engine::viz::overlay;
use lkm_engine::{bail, ensure, DType, Error, Result};

#[derive(Parser)]
#[command(name = "lkm-engine", version, about = "Train and run LKM-UNet segmentation models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fingerprint an nnU-Net raw dataset and plan its training (spacing, patch, batch, network, normalisation).
    Plan(PlanArgs),
    /// Train a model. Without --data, trains on the built-in synthetic phantom dataset, generated in memory.
    Train(Box<TrainArgs>),
    /// Segment NIfTI images with a trained checkpoint.
    Predict {
        /// The checkpoint (`latest.safetensors` of a run).
        #[arg(long)]
        model: PathBuf,
        /// An image file, or a folder of images (nnU-Net naming `CASE_0000.nii.gz` for multi-channel input).
        #[arg(long)]
        input: PathBuf,
        /// Output folder for the label maps (`CASE.nii.gz`, on the input's grid and header).
        #[arg(long)]
        output: PathBuf,
        /// Average predictions over all axis flips (slower, slightly better).
        #[arg(long)]
        mirror: bool,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Math of the GPU convolutions: tf32 (tensor cores) or exact (float32 SIMT).
        #[arg(long, default_value = "tf32")]
        math: String,
        /// Storage type of the activations on a GPU: bf16 (the default there: float32 master weights, gradients,
        /// optimiser state and accumulation) or fp32. --math exact implies fp32.
        #[arg(long)]
        precision: Option<String>,
        /// Also write PNG slices of each image with its predicted labels over it into this folder.
        #[arg(long)]
        overlay: Option<PathBuf>,
    },
    /// Score predicted label maps against references: Dice and normalised surface Dice per class and case.
    Evaluate {
        /// Folder of predicted label maps.
        #[arg(long)]
        pred: PathBuf,
        /// Folder of reference label maps, one file per case (`CASE.nii.gz`); each needs the prediction of the same
        /// case name.
        #[arg(long = "ref")]
        reference: PathBuf,
        /// NSD tolerance in mm: one value for all classes or one per foreground class, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "2")]
        tolerance: Vec<f64>,
        /// Number of classes (default: the largest label found + 1).
        #[arg(long)]
        classes: Option<usize>,
        /// Where to write the per-case CSV (default PRED/scores.csv).
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Score groups of labels as one class each, e.g. --group lungs=5,6 --group spine=2,3,4 (other labels
        /// become background).
        #[arg(long = "group", value_parser = parse_group)]
        groups: Vec<(String, Vec<u8>)>,
        /// Also write PNG slices of each case, reference and prediction side by side over the image, with the
        /// case's Dice, into this folder (needs --images).
        #[arg(long, requires = "images")]
        overlay: Option<PathBuf>,
        /// Folder of the images under the label maps, for --overlay (channel 0: CASE_0000.nii.gz, or CASE.nii.gz).
        #[arg(long)]
        images: Option<PathBuf>,
    },
    /// Write one self-contained HTML page about a training run: configuration, environment, curves, final metrics
    /// and the overlays found in the run folder.
    Report {
        /// The run folder (metrics.jsonl, latest.safetensors).
        run_dir: PathBuf,
        /// Where to write the page (default RUN_DIR/report.html).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write the synthetic phantom dataset as an nnU-Net raw dataset folder.
    Synth {
        /// Output folder (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Number of cases.
        #[arg(long, default_value_t = 24)]
        cases: usize,
        /// Volume size D,H,W.
        #[arg(long, value_delimiter = ',', default_value = "48,48,48")]
        shape: Vec<usize>,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Show which compute devices this build can use.
    Devices,
    /// Write one training step (weights, inputs, outputs, loss, gradients) and step timings for tools/parity.py.
    DumpStep(DumpArgs),
    /// Time every op of a training step, forward and backward, and print where the time and memory go.
    Profile(ProfileArgs),
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// Model configuration: tiny-3d, flare-3d or amos-2d (the input is its patch).
    #[arg(long, default_value = "tiny-3d")]
    config: String,
    /// Batch size.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// PiM grouping: window or strided.
    #[arg(long, default_value = "window")]
    pim_layout: String,
    /// Steps measured each way (plain, with NVTX ranges, recorded per op), after 2 warm-up steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Math of the GPU convolutions: tf32 (tensor cores, float32 accumulation) or exact (float32 SIMT, for parity
    /// checks).
    #[arg(long, default_value = "tf32")]
    math: String,
    /// Storage type of the activations on a GPU: bf16 (the default there: float32 master weights, gradients,
    /// optimiser state and accumulation) or fp32. --math exact implies fp32.
    #[arg(long)]
    precision: Option<String>,
    /// What the step recomputes in the backward pass instead of keeping: none (the default), or mamba (each Mamba
    /// block's input branch, in_proj's x half, causal conv1d and SiLU, and its dt product and scan; less memory, the
    /// same gradients).
    #[arg(long)]
    recompute: Option<String>,
    /// Write a Chrome trace-event JSON (Perfetto, chrome://tracing) of the recorded steps.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Write every row of the per-op table as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Rows of the per-op table to print.
    #[arg(long, default_value_t = 40)]
    top: usize,
}

#[derive(clap::Args)]
struct DumpArgs {
    /// Model configuration: tiny-3d, flare-3d or amos-2d.
    #[arg(long, default_value = "tiny-3d")]
    config: String,
    /// PiM grouping: window or strided.
    #[arg(long, default_value = "window")]
    pim_layout: String,
    /// Batch size.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Timed training steps after the dump.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Math of the GPU convolutions: exact (float32 SIMT, the parity check's default) or tf32 (tensor cores).
    #[arg(long, default_value = "exact")]
    math: String,
    /// Storage type of the activations on a GPU: bf16 (the default there: float32 master weights, gradients,
    /// optimiser state and accumulation) or fp32. --math exact implies fp32.
    #[arg(long)]
    precision: Option<String>,
    /// What the step recomputes in the backward pass instead of keeping: none (the default), or mamba (each Mamba
    /// block's input branch, in_proj's x half, causal conv1d and SiLU, and its dt product and scan; less memory, the
    /// same gradients).
    #[arg(long)]
    recompute: Option<String>,
    /// Precision of the dumped step: f32, or f64 (CPU only; the exact side of the parity check).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Seed of the weights (norm scales and biases drawn at random too); the batch uses seed + 1.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// An nnU-Net raw dataset folder (dataset.json, imagesTr, labelsTr).
    #[arg(long)]
    data: PathBuf,
    /// GPU memory in GiB to plan for (default: the memory of GPU 0, or 8 without a GPU).
    #[arg(long)]
    gpu_memory: Option<f64>,
    /// 3d or 2d (default: 3d unless the images are one slice deep).
    #[arg(long)]
    dims: Option<String>,
    /// Where to write the plans.
    #[arg(long, default_value = "plans.json")]
    out: PathBuf,
    /// Features of the first stage (nnU-Net: 32); smaller for quick experiments.
    #[arg(long, default_value_t = 32)]
    base_features: usize,
    /// The precision the run will train in, fp32 or bf16 (a GPU run's default): bf16 activations take about half the
    /// memory, so a bf16 plan gets a larger patch or batch for the same budget.
    #[arg(long, default_value = "bf16")]
    precision: String,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// An nnU-Net raw dataset folder (dataset.json, imagesTr, labelsTr). Default: synthetic phantoms in memory.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model configuration: tiny-3d, flare-3d or amos-2d (classes and channels are taken from the data). Default:
    /// with --data, plan the dataset (as `lkm-engine plan`); without, tiny-3d on the phantoms.
    #[arg(long, conflicts_with = "plans")]
    config: Option<String>,
    /// Train by a plans file written by `lkm-engine plan` (needs --data).
    #[arg(long, requires = "data")]
    plans: Option<PathBuf>,
    /// GPU memory in GiB for planning with --data and no --config (default: the device's, or 8 on the CPU).
    #[arg(long)]
    gpu_memory: Option<f64>,
    /// Set the PiM window of one stage, e.g. 0=20x28x24 (or 0=16 for every axis); repeatable.
    #[arg(long = "pim-window", value_parser = plan::parse_stage_sizes)]
    pim_window: Vec<(usize, Vec<usize>)>,
    /// Set the PaM pooling factor of one stage, e.g. 1=2x4x4 (or 1=2); repeatable.
    #[arg(long = "pam-factor", value_parser = plan::parse_stage_sizes)]
    pam_factor: Vec<(usize, Vec<usize>)>,
    /// Override the patch size (comma-separated, one value per spatial axis).
    #[arg(long, value_delimiter = ',')]
    patch: Option<Vec<usize>>,
    /// PiM grouping: window (adjacent pixels, the paper) or strided (the public code).
    #[arg(long, default_value = "window")]
    pim_layout: String,
    /// Epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Iterations per epoch.
    #[arg(long, default_value_t = 25)]
    iters: usize,
    /// Patches per batch (default: the plan's with a plan, else nnU-Net's 2 with --data, 1 on the built-in phantoms).
    #[arg(long)]
    batch: Option<usize>,
    /// Initial learning rate (default: nnU-Net's 1e-2 with --data, 2e-2 on the built-in phantoms).
    #[arg(long)]
    lr: Option<f64>,
    /// Seed of initialisation, sampling and augmentation.
    #[arg(long, default_value_t = 12345)]
    seed: u64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Train data-parallel on these GPUs, one process each, through NCCL: cuda:0,cuda:1,... (--batch is per GPU;
    /// one GPU is the single-GPU run). NCCL is loaded at run time: README, "Several GPUs".
    #[arg(long, conflicts_with_all = ["device", "gpus", "dist_env"])]
    devices: Option<String>,
    /// Train data-parallel on the first N GPUs (as --devices cuda:0,...,cuda:N-1).
    #[arg(long, conflicts_with_all = ["device", "dist_env"])]
    gpus: Option<usize>,
    /// Be one rank of a run started by torchrun or another launcher (one process per GPU, on one host or several):
    /// rank, number of ranks and GPU from RANK, WORLD_SIZE and LOCAL_RANK; the ranks meet at NCCL_COMM_ID=HOST:PORT.
    #[arg(long, conflicts_with = "device")]
    dist_env: bool,
    /// Set by the launcher of --devices/--gpus for the rank processes it starts.
    #[arg(long, hide = true, requires_all = ["world_size", "nccl_id"])]
    rank: Option<usize>,
    /// Set by the launcher of --devices/--gpus: the number of ranks.
    #[arg(long, hide = true, requires = "rank")]
    world_size: Option<usize>,
    /// Set by the launcher of --devices/--gpus: the NCCL id the ranks meet by (hex).
    #[arg(long, hide = true, requires = "rank")]
    nccl_id: Option<String>,
    /// Math of the GPU convolutions: tf32 (tensor cores, float32 accumulation) or exact (float32 SIMT, for parity
    /// checks).
    #[arg(long, default_value = "tf32")]
    math: String,
    /// Storage type of the activations on a GPU: bf16 (the default there: float32 master weights, gradients,
    /// optimiser state and accumulation) or fp32. --math exact implies fp32.
    #[arg(long)]
    precision: Option<String>,
    /// What the step recomputes in the backward pass instead of keeping: none (the default), or mamba (each Mamba
    /// block's input branch, in_proj's x half, causal conv1d and SiLU, and its dt product and scan; less memory, the
    /// same gradients).
    #[arg(long)]
    recompute: Option<String>,
    /// Run folder for metrics.jsonl and checkpoints.
    #[arg(long, default_value = "runs/default")]
    out: PathBuf,
    /// Continue the run of this checkpoint, in its folder, with its data, configuration and options (a flag that
    /// differs from them is an error); --epochs may extend it and --lr change it.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start a fresh run even if --out holds one (its checkpoint and metrics are deleted).
    #[arg(long)]
    overwrite: bool,
    /// Fraction of cases held out for validation.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Synthetic dataset: number of cases.
    #[arg(long, default_value_t = 24)]
    synth_cases: usize,
    /// Hide the progress bar.
    #[arg(long)]
    no_progress: bool,
    /// No mirroring augmentation (for datasets whose classes are left/right pairs, e.g. right and left lung).
    #[arg(long)]
    no_mirror: bool,
    /// No augmentation at all (plain crops; for debugging).
    #[arg(long)]
    no_aug: bool,
    /// Threads preparing batches ahead of the training step (0: on the training thread; the batches are the same).
    #[arg(long, default_value_t = lkm_engine::train::trainer::default_loader_workers())]
    loader_workers: usize,
}

fn main() {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Plan(args) => plan_command(&args),
        Command::Train(args) => train(*args, matches.subcommand_matches("train").expect("the train subcommand")),
        Command::Predict { model, input, output, mirror, device, math, precision, overlay } => {
            open_device(&device, &math, precision.as_deref())
                .and_then(|d| predict(&model, &input, &output, mirror, d, overlay.as_deref()))
        }
        Command::Evaluate { pred, reference, tolerance, classes, csv, groups, overlay, images } => {
            let overlay = overlay.as_deref().zip(images.as_deref());
            evaluate(&pred, &reference, &tolerance, classes, csv.as_deref(), &groups, overlay)
        }
        Command::Report { run_dir, out } => lkm_engine::viz::report::write_report(&run_dir, out.as_deref())
            .map(|path| eprintln!("report: {}", path.display())),
        Command::Synth { out, cases, shape, seed } => synth(&out, cases, &shape, seed),
        Command::Devices => devices(),
        Command::DumpStep(a) => dump_step(&a),
        Command::Profile(a) => profile(&a),
    };
    if let Err(e) = result {
        eprintln!("lkm-engine: {e}");
        std::process::exit(1);
    }
}

/// The default run's batch and learning rate on the built-in phantoms: with nnU-Net's full augmentation, the 2-core
/// CPU passes validation Dice 0.8 after 200 iterations this way (README, "Measured"); half the work per step at twice
/// the rate learns faster per second there than nnU-Net's batch 2 at 1e-2.
const PHANTOM_BATCH: usize = 1;
const PHANTOM_LR: f64 = 2e-2;

impl TrainArgs {
    /// The distributed flags, for [`distributed::role`].
    fn dist_flags(&self) -> DistFlags {
        DistFlags {
            devices: self.devices.clone(),
            gpus: self.gpus,
            dist_env: self.dist_env,
            rank: self.rank.zip(self.world_size).zip(self.nccl_id.clone()).map(|((r, w), id)| (r, w, id)),
        }
    }

    /// The run settings these flags ask for, with `plan` (the batch is the plan's unless `--batch` was given).
    fn launch(&self, plan: Option<Plan>, batch_given: bool) -> Launch {
        Launch {
            data: self.data.clone(),
            config: self.config.clone(),
            batch: match &plan {
                Some(p) if !batch_given => p.batch,
                _ => self.batch.unwrap_or(if self.data.is_some() { 2 } else { PHANTOM_BATCH }),
            },
            plan,
            pim_window: self.pim_window.clone(),
            pam_factor: self.pam_factor.clone(),
            patch: self.patch.clone(),
            pim_layout: self.pim_layout.clone(),
            epochs: self.epochs,
            iters: self.iters,
            lr: self.lr.unwrap_or(if self.data.is_some() { lkm_engine::optim::DEFAULT_LR } else { PHANTOM_LR }),
            seed: self.seed,
            val_fraction: self.val_fraction,
            synth_cases: self.synth_cases,
            mirror: !self.no_mirror,
            augment: !self.no_aug,
        }
    }
}

/// GPU memory to plan for: the flag, else the total memory of the GPU the run uses, else the planner's default.
fn planning_memory_gib(flag: Option<f64>, device: &Device) -> Result<f64> {
    Ok(match (flag, device) {
        (Some(g), _) => g,
        (None, Device::Cuda(gpu)) => gpu.memory()?.1 as f64 / plan::memory::GIB,
        (None, Device::Cpu) => PlanOptions::default().gpu_memory_gib,
    })
}

fn plan_command(a: &PlanArgs) -> Result<()> {
    let opts = PlanOptions {
        gpu_memory_gib: planning_memory_gib(a.gpu_memory, &Device::cuda(0).unwrap_or(Device::Cpu))?,
        dims: a.dims.as_deref().map(Dims::parse).transpose()?,
        base_features: a.base_features,
        precision: Precision::parse(&a.precision)?,
        ..PlanOptions::default()
    };
    let plans = plan::plan_dataset(&a.data, &opts)?;
    print!("{}", plan::summary(&plans.fingerprint, &plans.plan));
    plans.save(&a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// The plan of a run: the --plans file, or, for --data without --config or --resume, one made now.
fn run_plan(a: &TrainArgs, device: &Device) -> Result<Option<Plan>> {
    if let Some(path) = &a.plans {
        let plan = Plans::load(path)?.plan;
        if plan.precision == Precision::Bf16 && device.precision() == Precision::Fp32 && !device.is_cpu() {
            let fp32 = plan::memory::estimate_gib(&plan.model, plan.batch, Precision::Fp32);
            eprintln!(
                "note: {} was planned for bf16 ({:.1} GiB); this run is fp32 and needs about {fp32:.1} GiB of the \
                 {:.1} GiB budget: plan with --precision fp32, or train in bf16",
                path.display(),
                plan.estimated_gib,
                plan.budget_gib
            );
        }
        return Ok(Some(plan));
    }
    match (&a.data, &a.config, &a.resume) {
        (Some(dir), None, None) => {
            let opts = PlanOptions {
                gpu_memory_gib: planning_memory_gib(a.gpu_memory, device)?,
                precision: device.precision(),
                ..PlanOptions::default()
            };
            let plans = plan::plan_dataset(dir, &opts)?;
            eprint!("no --config: planned the dataset\n{}", plan::summary(&plans.fingerprint, &plans.plan));
            Ok(Some(plans.plan))
        }
        _ => Ok(None),
    }
}

/// `train` on several GPUs: checks every flag, and a resumed run's number of GPUs, before any rank starts, then
/// starts one rank process per GPU and waits for them.
fn launch_ranks(a: &TrainArgs, ordinals: &[usize]) -> Result<()> {
    a.launch(None, false).validate()?;
    numerics(&a.math, a.precision.as_deref())?;
    recompute_flag(a.recompute.as_deref())?;
    if let Some(path) = &a.resume {
        distributed::check_resume_world(
            checkpoint::load(path)?.meta["run"]["world_size"].as_u64(),
            ordinals.len(),
            path,
        )?;
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    distributed::launch_local(ordinals, &args)
}

/// The device of a train process and, for a rank of a data-parallel run, its replica (NCCL joined).
fn train_device(a: &TrainArgs, role: &Role) -> Result<(Device, Option<Replica>)> {
    match role {
        Role::Single(None) => Ok((open_device(&a.device, &a.math, a.precision.as_deref())?, None)),
        Role::Single(Some(ordinal)) => {
            Ok((open_device(&format!("cuda:{ordinal}"), &a.math, a.precision.as_deref())?, None))
        }
        Role::Launcher(_) => unreachable!("the launcher trains nothing"),
        Role::Rank(spec) => {
            let device = open_device(&format!("cuda:{}", spec.ordinal), &a.math, a.precision.as_deref())?;
            let Device::Cuda(gpu) = &device else { unreachable!("cuda:N opens a GPU") };
            let id = match &spec.nccl_id {
                Some(hex) => NcclId::from_hex(hex)?,
                // --dist-env: NCCL derives the id from NCCL_COMM_ID, the same in every process.
                None => NcclId::new()?,
            };
            let replica = Replica::new(gpu, spec.rank, spec.world, &id)?;
            Ok((device, Some(replica)))
        }
    }
}

fn train(a: TrainArgs, matches: &ArgMatches) -> Result<()> {
    let role = distributed::role(&a.dist_flags(), &|name| std::env::var(name).ok())?;
    if let Role::Launcher(ordinals) = &role {
        return launch_ranks(&a, ordinals);
    }
    // Every flag is checked before any device is opened or data is read; then the plan, if any, is made or read.
    let flags = a.launch(None, false).validate()?;
    let (device, replica) = train_device(&a, &role)?;
    let world = replica.as_ref().map_or(1, Replica::world);
    // Rank 0 (or the only process) owns the run folder; the other ranks write nothing.
    let root = replica.as_ref().is_none_or(Replica::is_root);
    let t0 = Instant::now();
    let explicit = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let given = match run_plan(&a, &device)? {
        Some(plan) => a.launch(Some(plan), explicit("batch")).validate()?,
        None => flags,
    };
    // A resumed run continues in its checkpoint's folder, with the settings recorded there.
    let resume = a.resume.as_deref().map(|p| Ok::<_, Error>((p, checkpoint::load(p)?))).transpose()?;
    let (launch, out) = match &resume {
        Some((path, ck)) => {
            distributed::check_resume_world(ck.meta["run"]["world_size"].as_u64(), world, path)?;
            resumed_launch(path, ck, &given, &explicit, &a.out)?
        }
        None => (given, a.out.clone()),
    };
    let run_dir = if root { Some(RunDir::lock(&out)?) } else { None };
    match (&run_dir, &resume) {
        (Some(dir), Some((_, ck))) => dir.resume_at(checkpoint_epoch(ck))?,
        (Some(dir), None) => dir.start_fresh(a.overwrite)?,
        (None, _) => {}
    }
    let data: Prepared = match (&launch.data, &launch.plan) {
        (Some(dir), Some(plan)) => prepare::planned(dir, plan, launch.val_fraction)?,
        (Some(dir), None) => prepare::dataset(dir, launch.val_fraction)?,
        (None, _) => prepare::synthetic(
            &SynthConfig { cases: launch.synth_cases, ..SynthConfig::default() },
            launch.val_fraction,
        )?,
    };
    eprintln!(
        "data: {} — {} training, {} validation cases, spacing {:?} mm, classes {:?} ({:.1}s)",
        data.source,
        data.train.len(),
        data.val.len(),
        data.spacing,
        data.class_names,
        t0.elapsed().as_secs_f64()
    );
    let (mut config, mut opts, start_epoch) = match &resume {
        Some((path, ck)) => {
            let config: ModelConfig = serde_json::from_value(ck.meta["config"].clone())
                .map_err(|e| Error::Data(format!("{}: no valid model config: {e}", path.display())))?;
            let mut opts: TrainOptions = serde_json::from_value(ck.meta["options"].clone())
                .map_err(|e| Error::Data(format!("{}: no valid training options: {e}", path.display())))?;
            opts.epochs = launch.epochs;
            opts.lr = launch.lr;
            for (what, model, found) in
                [("classes", config.num_classes, data.num_classes()), ("channels", config.in_channels, data.channels)]
            {
                if model != found {
                    bail!(Data, "{}: the model has {model} {what}, the data {found} ({})", path.display(), data.source);
                }
            }
            (config, opts, checkpoint_epoch(ck))
        }
        None => (launch.model_config(data.num_classes(), data.channels)?, launch.train_options(true), 0),
    };
    apply_recompute(&mut config, a.recompute.as_deref())?;
    opts.progress = !a.no_progress && root;
    opts.loader_workers = a.loader_workers;
    let (model, fresh) = LkmUnet::new(config, opts.seed)?;
    let start = match &resume {
        Some((_, ck)) => {
            Start { params: ck.params_like(&fresh)?, momentum: ck.momentum_like(&fresh), epoch: start_epoch }
        }
        None => Start { params: fresh.clone(), momentum: Vec::new(), epoch: 0 },
    };
    let ranks = match &replica {
        Some(r) => format!(" as rank {} of {} (batch {} per GPU)", r.rank(), r.world(), opts.batch),
        None => String::new(),
    };
    eprintln!(
        "model: LKM-UNet {} stages, {:.2} M parameters, patch {:?}, PiM {:?}; device {:?}{}{ranks}; epochs {}..{} of {} \
         iterations",
        model.config.features.len(),
        fresh.count() as f64 / 1e6,
        model.config.patch,
        model.config.pim_layout,
        device,
        if device.is_cpu() { String::new() } else { format!(" ({}, {} products)", device.precision(), a.math) },
        start.epoch,
        opts.epochs,
        opts.iters_per_epoch
    );
    let mut meta = data.meta();
    meta["launch"] = serde_json::to_value(&launch).expect("launch settings serialise");
    // The number of GPUs is part of the run: each draws its own batches (checked by --resume).
    meta["world_size"] = world.into();
    let run = Run { model: &model, device, opts, out_dir: out.clone(), meta };
    let (records, _) = run.train_replica(&data.train, &data.val, start, replica.as_ref())?;
    drop(run_dir);
    if let Some(last) = records.iter().rev().find(|r| r.val_mean_dice.is_some()) {
        eprintln!(
            "done in {:.1}s: validation mean Dice {:.4}; checkpoint {}",
            t0.elapsed().as_secs_f64(),
            last.val_mean_dice.unwrap_or(f64::NAN),
            out.join(CHECKPOINT).display()
        );
    }
    Ok(())
}

/// The settings and run folder of `--resume path`: those recorded in the checkpoint (explicit flags must agree),
/// and the checkpoint's folder (an explicit `--out` must be that folder).
fn resumed_launch(
    path: &Path,
    ck: &Checkpoint,
    given: &Launch,
    explicit: &dyn Fn(&str) -> bool,
    out: &Path,
) -> Result<(Launch, PathBuf)> {
    let recorded: Launch = serde_json::from_value(ck.meta["run"]["launch"].clone()).map_err(|e| {
        Error::Data(format!(
            "{}: no launch settings recorded ({e}); it was written by an older lkm-engine and cannot be resumed",
            path.display()
        ))
    })?;
    ensure!(!explicit("overwrite"), Config, "--overwrite starts a fresh run; it cannot be combined with --resume");
    let launch = Launch::resumed(&recorded, given, explicit, path, checkpoint_epoch(ck))?
        .validate()
        .map_err(|e| Error::Config(format!("{}: the run's recorded settings: {e}", path.display())))?;
    let folder = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    if explicit("out") {
        let canonical = |p: &Path| p.canonicalize().map_err(|e| Error::Io(format!("{}: {e}", p.display())));
        ensure!(
            out.exists() && canonical(out)? == canonical(&folder)?,
            Config,
            "--out {} conflicts with the run being resumed, whose folder is {}; omit --out",
            out.display(),
            folder.display()
        );
    }
    Ok((launch, folder))
}

/// The number of epochs a checkpoint has done.
fn checkpoint_epoch(ck: &Checkpoint) -> usize {
    ck.meta["epoch"].as_u64().unwrap_or(0) as usize
}

fn predict(
    model_path: &Path,
    input: &Path,
    output: &Path,
    mirror: bool,
    device: Device,
    overlay: Option<&Path>,
) -> Result<()> {
    let cases = input_cases(input)?;
    check_output(&cases, output)?;
    let predictor = Predictor::from_checkpoint(model_path, device, mirror)?;
    for (name, files) in cases {
        let t0 = Instant::now();
        let out = predictor.predict_files(&name, &files, output)?;
        eprintln!("{name}: {} ({:.1}s)", out.display(), t0.elapsed().as_secs_f64());
        if let Some(dir) = overlay {
            overlay::write_prediction(dir, &name, &files[0], &out, &predictor.class_names)?;
        }
    }
    Ok(())
}

/// Parses `NAME=a,b,c`.
fn parse_group(s: &str) -> std::result::Result<(String, Vec<u8>), String> {
    let (name, labels) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=label,label,..."))?;
    let labels = labels
        .split(',')
        .map(|l| l.trim().parse::<u8>().map_err(|e| format!("{s:?}: {e}")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((name.to_string(), labels))
}

fn evaluate(
    pred: &Path,
    reference: &Path,
    tolerance: &[f64],
    classes: Option<usize>,
    csv: Option<&Path>,
    groups: &[(String, Vec<u8>)],
    overlay: Option<(&Path, &Path)>,
) -> Result<()> {
    // With groups, label l becomes 1 + the index of the group holding it, or 0.
    let regroup = |labels: Vec<u8>| -> Vec<u8> {
        if groups.is_empty() {
            return labels;
        }
        labels.iter().map(|l| groups.iter().position(|(_, g)| g.contains(l)).map_or(0, |i| i as u8 + 1)).collect()
    };
    if let Some(k) = classes {
        ensure!(k >= 2, Config, "--classes must be at least 2 (background and one class), got {k}");
    }
    let mut loaded = Vec::new();
    for (name, p_path, r_path) in pair_labels(pred, reference)? {
        let r = read_volume(&r_path)?;
        let p = read_volume(&p_path)?;
        check_same_grid(&r, &p)?;
        loaded.push((name, regroup(p.to_labels()?), regroup(r.to_labels()?), r.shape, r.spacing));
    }
    let k = if groups.is_empty() { classes } else { Some(groups.len() + 1) };
    let k = k.unwrap_or_else(|| {
        loaded.iter().flat_map(|(_, p, r, _, _)| p.iter().chain(r.iter())).copied().max().unwrap_or(0) as usize + 1
    });
    let scores = loaded
        .iter()
        .map(|(n, p, r, shape, spacing)| evaluate_case(n, p, r, *shape, *spacing, k, tolerance))
        .collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = if groups.is_empty() {
        (1..k).map(|c| format!("class {c}")).collect()
    } else {
        groups.iter().map(|g| g.0.clone()).collect()
    };
    println!("{}", summary_table(&scores, &names));
    let csv_path = csv.map(Path::to_path_buf).unwrap_or_else(|| pred.join("scores.csv"));
    std::fs::write(&csv_path, scores_csv(&scores, &names))
        .map_err(|e| Error::Io(format!("{}: {e}", csv_path.display())))?;
    eprintln!("per-case scores: {}", csv_path.display());
    if let Some((dir, images)) = overlay {
        let class_names: Vec<String> = ["background".to_string()].into_iter().chain(names).collect();
        for ((_, p, r, shape, _), s) in loaded.iter().zip(&scores) {
            overlay::write_evaluation(dir, images, *shape, [r, p], s, &class_names)?;
        }
        eprintln!("overlays: {}", dir.display());
    }
    Ok(())
}

fn synth(out: &Path, cases: usize, shape: &[usize], seed: u64) -> Result<()> {
    let shape: [usize; 3] =
        shape.try_into().map_err(|_| Error::Config(format!("--shape needs 3 values, got {shape:?}")))?;
    let config = SynthConfig { cases, shape, seed };
    config.validate()?;
    let cases = phantom_dataset(&config);
    write_dataset(out, &cases, PHANTOM_LABELS, &["CT"])?;
    eprintln!("wrote {} phantom cases of {shape:?} to {}", cases.len(), out.display());
    Ok(())
}

fn dump_step(a: &DumpArgs) -> Result<()> {
    let mut cfg = ModelConfig::by_name(&a.config)?;
    cfg.pim_layout = parse_pim_layout(&a.pim_layout)?;
    apply_recompute(&mut cfg, a.recompute.as_deref())?;
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "f64" => DType::F64,
        s => bail!(Config, "--dtype must be f32 or f64, not {s:?}"),
    };
    let out = &a.out;
    std::fs::create_dir_all(out).map_err(|e| Error::Io(format!("creating {}: {e}", out.display())))?;
    lkm_engine::train::dump::dump_step(
        cfg,
        a.batch,
        a.seed,
        &open_device(&a.device, &a.math, a.precision.as_deref())?,
        dtype,
        out,
        a.steps,
    )
}

fn profile(a: &ProfileArgs) -> Result<()> {
    use lkm_engine::profile::report;
    let mut config = ModelConfig::by_name(&a.config)?;
    config.pim_layout = parse_pim_layout(&a.pim_layout)?;
    apply_recompute(&mut config, a.recompute.as_deref())?;
    let device = open_device(&a.device, &a.math, a.precision.as_deref())?;
    let precision = device.precision();
    let recompute = if config.mamba.recompute { ", Mamba blocks recomputed" } else { "" };
    let opts = lkm_engine::train::profile::ProfileOptions { config, batch: a.batch, steps: a.steps, device };
    let p = lkm_engine::train::profile::run(&opts)?;
    let title = format!(
        "{} batch {} ({} PiM, {precision}, {} products{recompute}), {} recorded steps",
        a.config, a.batch, a.pim_layout, a.math, a.steps
    );
    println!("{}", report::render(&title, &p.recording, &p.times, &p.ceilings, p.pool_peak_bytes, a.top));
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
    };
    if let Some(path) = &a.trace {
        write(path, report::trace_json(&p.recording).to_string())?;
        eprintln!("trace: {} ({} op calls)", path.display(), p.recording.ops.len());
    }
    if let Some(path) = &a.csv {
        write(path, report::csv(&p.recording, a.steps))?;
        eprintln!("csv: {}", path.display());
    }
    Ok(())
}

/// `--recompute`: none or mamba, as whether Mamba blocks recompute their input branch (`None` without the flag).
fn recompute_flag(flag: Option<&str>) -> Result<Option<bool>> {
    match flag {
        None => Ok(None),
        Some("none") => Ok(Some(false)),
        Some("mamba") => Ok(Some(true)),
        Some(s) => bail!(Config, "--recompute must be none or mamba, not {s:?}"),
    }
}

/// Applies `--recompute` to a model configuration; without the flag the configuration keeps its own setting (a
/// resumed run continues as it was saved).
fn apply_recompute(cfg: &mut ModelConfig, flag: Option<&str>) -> Result<()> {
    if let Some(on) = recompute_flag(flag)? {
        cfg.mamba.recompute = on;
    }
    Ok(())
}

/// Whether `--math` asks for exact float32 products (else tf32).
fn math_is_exact(math: &str) -> Result<bool> {
    match math {
        "tf32" => Ok(false),
        "exact" => Ok(true),
        s => bail!(Config, "--math must be tf32 or exact, not {s:?}"),
    }
}

/// `--math` and `--precision` checked together: (exact float32 products, the precision asked for, if any).
fn numerics(math: &str, precision: Option<&str>) -> Result<(bool, Option<Precision>)> {
    let exact = math_is_exact(math)?;
    let precision = precision.map(Precision::parse).transpose()?;
    if exact && precision == Some(Precision::Bf16) {
        bail!(
            Config,
            "--math exact is float32 arithmetic, --precision bf16 runs bf16 products: give --math tf32 with bf16 \
             (dump-step's --math defaults to exact), or --precision fp32 with exact"
        );
    }
    Ok((exact, precision))
}

/// Parses `--device` and applies `--math` (tf32 or exact) and `--precision` (bf16 unless asked otherwise or exact) to
/// a GPU; `--precision bf16` on the CPU is an error.
fn open_device(spec: &str, math: &str, precision: Option<&str>) -> Result<Device> {
    let (exact, precision) = numerics(math, precision)?;
    let device = Device::parse(spec)?;
    match &device {
        Device::Cuda(gpu) => {
            gpu.set_exact_f32(exact);
            let default = if exact { Precision::Fp32 } else { Precision::Bf16 };
            let precision = precision.unwrap_or(default);
            gpu.set_precision(precision);
            let products = match (precision, exact) {
                (Precision::Bf16, _) => "bf16 activations, bf16 tensor-core products",
                (Precision::Fp32, false) => "float32 activations, tf32 tensor-core products",
                (Precision::Fp32, true) => "float32 activations, exact float32 products",
            };
            eprintln!("{device:?}: precision {precision} ({products}; float32 weights and accumulation)");
        }
        Device::Cpu if precision == Some(Precision::Bf16) => {
            bail!(Config, "--precision bf16 needs a GPU (bf16 is a GPU storage type): use --precision fp32 on the CPU")
        }
        Device::Cpu => {}
    }
    Ok(device)
}

fn devices() -> Result<()> {
    println!("cpu: available");
    match Gpu::new(0) {
        Ok(gpu) => {
            let (free, total) = gpu.memory()?;
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            println!("cuda:0: {} ({:.1} of {:.1} GiB free)", gpu.name(), gib(free), gib(total));
        }
        Err(e) => println!("cuda: unavailable ({e})"),
    }
    Ok(())
}
