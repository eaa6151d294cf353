//! The `lkm-engine` command line: train, predict, evaluate, synth, devices.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, Subcommand};
use lkm_engine::data::dataset::write_dataset;
use lkm_engine::data::nifti::read_volume;
use lkm_engine::data::synth::{phantom_dataset, SynthConfig, PHANTOM_LABELS};
use lkm_engine::device::{Device, Gpu};
use lkm_engine::metrics::{evaluate_case, scores_csv, summary_table};
use lkm_engine::nn::{LkmUnet, ModelConfig};
use lkm_engine::ops::pim::PimLayout;
use lkm_engine::predict::{input_cases, Predictor};
use lkm_engine::train::checkpoint;
use lkm_engine::train::prepare::{self, Prepared};
use lkm_engine::train::trainer::{Run, Start, TrainOptions};
use lkm_engine::{bail, DType, Error, Result};

#[derive(Parser)]
#[command(name = "lkm-engine", version, about = "Train and run LKM-UNet segmentation models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model. Without --data, trains on the built-in synthetic phantom dataset, generated in memory.
    Train(TrainArgs),
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
    },
    /// Score predicted label maps against references: Dice and normalised surface Dice per class and case.
    Evaluate {
        /// Folder of predicted label maps.
        #[arg(long)]
        pred: PathBuf,
        /// Folder of reference label maps with the same file names.
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
struct TrainArgs {
    /// An nnU-Net raw dataset folder (dataset.json, imagesTr, labelsTr). Default: synthetic phantoms in memory.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model configuration: tiny-3d, flare-3d or amos-2d (classes and channels are taken from the data).
    #[arg(long, default_value = "tiny-3d")]
    config: String,
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
    /// Patches per batch.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Initial learning rate.
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    /// Seed of initialisation, sampling and augmentation.
    #[arg(long, default_value_t = 12345)]
    seed: u64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Math of the GPU convolutions: tf32 (tensor cores, float32 accumulation) or exact (float32 SIMT, for parity
    /// checks).
    #[arg(long, default_value = "tf32")]
    math: String,
    /// Run folder for metrics.jsonl and checkpoints.
    #[arg(long, default_value = "runs/default")]
    out: PathBuf,
    /// Continue the run of this checkpoint (its model configuration and options; --epochs may extend it).
    #[arg(long)]
    resume: Option<PathBuf>,
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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train(args),
        Command::Predict { model, input, output, mirror, device, math } => {
            open_device(&device, &math).and_then(|d| predict(&model, &input, &output, mirror, d))
        }
        Command::Evaluate { pred, reference, tolerance, classes, csv, groups } => {
            evaluate(&pred, &reference, &tolerance, classes, csv.as_deref(), &groups)
        }
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

fn train(a: TrainArgs) -> Result<()> {
    let device = open_device(&a.device, &a.math)?;
    let t0 = Instant::now();
    let data: Prepared = match &a.data {
        Some(dir) => prepare::dataset(dir, a.val_fraction)?,
        None => prepare::synthetic(&SynthConfig { cases: a.synth_cases, ..SynthConfig::default() }, a.val_fraction)?,
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
    let resume = a.resume.as_deref().map(checkpoint::load).transpose()?;
    let (config, mut opts, start_epoch) = match &resume {
        Some(ck) => {
            let config: ModelConfig = serde_json::from_value(ck.meta["config"].clone())
                .map_err(|e| Error::Data(format!("checkpoint has no valid model config: {e}")))?;
            let mut opts: TrainOptions = serde_json::from_value(ck.meta["options"].clone())
                .map_err(|e| Error::Data(format!("checkpoint has no valid training options: {e}")))?;
            opts.epochs = opts.epochs.max(a.epochs);
            (config, opts, ck.meta["epoch"].as_u64().unwrap_or(0) as usize)
        }
        None => {
            let mut config = ModelConfig::by_name(&a.config)?;
            config.num_classes = data.num_classes();
            config.in_channels = data.channels;
            config.pim_layout = parse_layout(&a.pim_layout)?;
            if let Some(p) = &a.patch {
                config.patch = p.clone();
            }
            let opts = TrainOptions {
                epochs: a.epochs,
                iters_per_epoch: a.iters,
                batch: a.batch,
                lr: a.lr,
                seed: a.seed,
                progress: !a.no_progress,
                mirror: !a.no_mirror,
                ..TrainOptions::default()
            };
            (config, opts, 0)
        }
    };
    opts.progress = !a.no_progress;
    let (model, fresh) = LkmUnet::new(config, opts.seed)?;
    let start = match &resume {
        Some(ck) => Start { params: ck.params_like(&fresh)?, momentum: ck.momentum_like(&fresh), epoch: start_epoch },
        None => Start { params: fresh.clone(), momentum: Vec::new(), epoch: 0 },
    };
    eprintln!(
        "model: LKM-UNet {} stages, {:.2} M parameters, patch {:?}, PiM {:?}; device {:?}{}; epochs {}..{} of {} iterations",
        model.config.features.len(),
        fresh.count() as f64 / 1e6,
        model.config.patch,
        model.config.pim_layout,
        device,
        if device.is_cpu() { String::new() } else { format!(" ({} convolutions)", a.math) },
        start.epoch,
        opts.epochs,
        opts.iters_per_epoch
    );
    let run = Run { model: &model, device, opts, out_dir: a.out.clone(), meta: data.meta() };
    let (records, _) = run.train(&data.train, &data.val, start)?;
    if let Some(last) = records.iter().rev().find(|r| r.val_mean_dice.is_some()) {
        eprintln!(
            "done in {:.1}s: validation mean Dice {:.4}; checkpoint {}",
            t0.elapsed().as_secs_f64(),
            last.val_mean_dice.unwrap_or(f64::NAN),
            a.out.join("latest.safetensors").display()
        );
    }
    Ok(())
}

fn predict(model_path: &Path, input: &Path, output: &Path, mirror: bool, device: Device) -> Result<()> {
    let predictor = Predictor::from_checkpoint(model_path, device, mirror)?;
    for (name, files) in input_cases(input)? {
        let t0 = Instant::now();
        let out = predictor.predict_files(&name, &files, output)?;
        eprintln!("{name}: {} ({:.1}s)", out.display(), t0.elapsed().as_secs_f64());
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
) -> Result<()> {
    // With groups, label l becomes 1 + the index of the group holding it, or 0.
    let regroup = |labels: Vec<u8>| -> Vec<u8> {
        if groups.is_empty() {
            return labels;
        }
        labels.iter().map(|l| groups.iter().position(|(_, g)| g.contains(l)).map_or(0, |i| i as u8 + 1)).collect()
    };
    let cases = input_cases(reference)?;
    let mut loaded = Vec::new();
    for (name, files) in &cases {
        let r = read_volume(&files[0])?;
        let p_path = pred.join(files[0].file_name().expect("a file"));
        let p = read_volume(&p_path)?;
        if p.shape != r.shape {
            bail!(
                Data,
                "{}: shape {:?} differs from the reference {} {:?}",
                p_path.display(),
                p.shape,
                files[0].display(),
                r.shape
            );
        }
        loaded.push((name.clone(), regroup(p.to_labels()?), regroup(r.to_labels()?), r.shape, r.spacing));
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
    Ok(())
}

fn synth(out: &Path, cases: usize, shape: &[usize], seed: u64) -> Result<()> {
    let shape: [usize; 3] =
        shape.try_into().map_err(|_| Error::Config(format!("--shape needs 3 values, got {shape:?}")))?;
    let cases = phantom_dataset(&SynthConfig { cases, shape, seed });
    write_dataset(out, &cases, PHANTOM_LABELS, &["CT"])?;
    eprintln!("wrote {} phantom cases of {shape:?} to {}", cases.len(), out.display());
    Ok(())
}

fn dump_step(a: &DumpArgs) -> Result<()> {
    let mut cfg = ModelConfig::by_name(&a.config)?;
    cfg.pim_layout = parse_layout(&a.pim_layout)?;
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "f64" => DType::F64,
        s => bail!(Config, "--dtype must be f32 or f64, not {s:?}"),
    };
    let out = &a.out;
    std::fs::create_dir_all(out).map_err(|e| Error::Io(format!("creating {}: {e}", out.display())))?;
    lkm_engine::train::dump::dump_step(cfg, a.batch, a.seed, &open_device(&a.device, &a.math)?, dtype, out, a.steps)
}

fn profile(a: &ProfileArgs) -> Result<()> {
    use lkm_engine::profile::report;
    let mut config = ModelConfig::by_name(&a.config)?;
    config.pim_layout = parse_layout(&a.pim_layout)?;
    let device = open_device(&a.device, &a.math)?;
    let opts = lkm_engine::train::profile::ProfileOptions { config, batch: a.batch, steps: a.steps, device };
    let p = lkm_engine::train::profile::run(&opts)?;
    let title = format!(
        "{} batch {} ({} PiM, {} convolutions), {} recorded steps",
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

/// Parses `--device` and applies `--math` (tf32 or exact) to a GPU.
fn open_device(spec: &str, math: &str) -> Result<Device> {
    let exact = match math {
        "tf32" => false,
        "exact" => true,
        s => bail!(Config, "--math must be tf32 or exact, not {s:?}"),
    };
    let device = Device::parse(spec)?;
    if let Device::Cuda(gpu) = &device {
        gpu.set_exact_f32(exact);
    }
    Ok(device)
}

fn parse_layout(s: &str) -> Result<PimLayout> {
    match s {
        "window" => Ok(PimLayout::Window),
        "strided" => Ok(PimLayout::Strided),
        s => bail!(Config, "--pim-layout must be window or strided, not {s:?}"),
    }
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
