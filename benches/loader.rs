//! The training loader on the CPU: how long one batch of a reference configuration takes to draw (patch sampling
//! with nnU-Net's spatial and intensity augmentation, then the labels of every deep-supervision output), on one thread
//! and through `train`'s [`Loader`] with 1 to 4 worker threads, against the GPU step it has to keep up with.
//!
//! Issue 14 asks that `train` run within 5% of `dump-step`'s step time, so a batch must be ready before the GPU
//! finishes the previous step. The table gives, per configuration, the median single-thread time of each stage, the
//! loader's time per batch with w workers (batches/s of a steady stream), and that time as a fraction of the bf16 step
//! last measured on a GPU (the latest row of `benches/step.json`) and of issue 14's target step: below 1, the loader
//! keeps up.
//!
//! The cases are synthetic phantoms (`lkm-engine synth`) of a real scan's size; what a batch costs depends on the
//! patch and the augmentation, not on the intensities.
//!
//! Usage: `cargo bench --bench loader [-- --config flare-3d|amos-2d|both] [--batches N] [--workers 1,2,4]`.

use std::time::Instant;

use lkm_engine::data::sampler::{ForegroundIndex, PatchSampler};
use lkm_engine::data::synth::{phantom_dataset, SynthConfig};
use lkm_engine::nn::lkm_unet::ModelConfig;
use lkm_engine::train::loader::{BatchSource, Loader};
use lkm_engine::train::loss::downsample_labels;
use lkm_engine::{Error, Result};

/// A reference configuration's loader: its batch, the size of the synthetic cases it samples from, and issue 14's
/// target step (ms, bf16, one GPU).
struct Setup {
    config: &'static str,
    batch: usize,
    case_shape: [usize; 3],
    target_ms: f64,
}

const SETUPS: [Setup; 2] = [
    // FLARE22 cases after resampling to the median spacing are about 100 x 512 x 512 at 0.8 mm in plane; the
    // phantoms keep memory modest with 64 x 256 x 224, larger than the 40 x 224 x 192 patch on every axis.
    Setup { config: "flare-3d", batch: 2, case_shape: [64, 256, 224], target_ms: 127.0 },
    Setup { config: "amos-2d", batch: 12, case_shape: [48, 384, 384], target_ms: 67.0 },
];

/// The bf16 step of `s` (strided PiM) last measured on a GPU: the latest such row of benches/step.json, and its GPU.
fn measured_step(s: &Setup) -> Result<(f64, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/step.json");
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io(format!("reading {path}: {e}")))?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| Error::Data(format!("{path}: {e}")))?;
    rows.iter()
        .rev()
        .find(|r| {
            r["config"] == s.config
                && r["batch"] == s.batch
                && r["pim_layout"] == "strided"
                && r["precision"] == "bf16 storage, bf16 matrix products"
        })
        .and_then(|r| Some((r["ms_per_step"].as_f64()?, r["gpu"].as_str()?.to_string())))
        .ok_or_else(|| Error::Data(format!("{path}: no bf16 strided step of {} batch {}", s.config, s.batch)))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let which = arg("--config").unwrap_or_else(|| "both".into());
    let batches: usize = arg("--batches").map_or(8, |b| b.parse().expect("--batches: a number"));
    let workers: Vec<usize> = arg("--workers")
        .unwrap_or_else(|| "1,2,4".into())
        .split(',')
        .map(|w| w.parse().expect("--workers: numbers separated by commas"))
        .collect();
    let mut rows = Vec::new();
    for setup in SETUPS.iter().filter(|s| which == "both" || which == s.config) {
        match measure(setup, batches, &workers) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("loader benchmark failed for {}: {e}", setup.config);
                std::process::exit(1);
            }
        }
    }
    println!("\nCPU: {} ({} threads available)", cpu_name(), threads());
    println!(
        "| config | batch | case | stage | ms per batch | of the GPU step (ms) | of issue 14's step (ms) |\n\
         |---|---|---|---|---|---|---|"
    );
    for r in rows {
        println!("{r}");
    }
}

/// The median single-thread time of each stage of a batch, then the loader's steady time per batch with each
/// worker count; table rows.
fn measure(s: &Setup, batches: usize, workers: &[usize]) -> Result<Vec<String>> {
    let cfg = ModelConfig::by_name(s.config)?;
    let (step_ms, gpu) = measured_step(s)?;
    eprintln!("{}: the step last measured, bf16 strided: {step_ms} ms on {gpu} (benches/step.json)", s.config);
    let started = Instant::now();
    let cases = phantom_dataset(&SynthConfig { cases: 4, shape: s.case_shape, seed: 1 });
    let fg: Vec<ForegroundIndex> = cases.iter().map(|c| ForegroundIndex::new(c, cfg.num_classes)).collect();
    eprintln!("{}: 4 phantoms of {:?} in {:.1} s", s.config, s.case_shape, started.elapsed().as_secs_f64());
    let source = BatchSource {
        sampler: PatchSampler { patch: cfg.patch.clone(), fg_fraction: 1.0 / 3.0, augment: true, mirror: true },
        cases: &cases,
        foreground: &fg,
        batch: s.batch,
        seed: 7,
        iters_per_epoch: batches,
        target_sizes: cfg.output_sizes(&cfg.patch),
    };
    let row = |stage: &str, ms: f64| {
        format!(
            "| {} | {} | {:?} | {stage} | {ms:.1} | {:.2} ({}) | {:.2} ({}) |",
            s.config,
            s.batch,
            s.case_shape,
            ms / step_ms,
            step_ms,
            ms / s.target_ms,
            s.target_ms
        )
    };
    // One thread, stage by stage: the patches (sampling and augmentation), then the label pyramid.
    let (mut sample_ms, mut labels_ms) = (Vec::new(), Vec::new());
    for i in 0..batches {
        let mut rng = lkm_engine::train::loader::iteration_rng(source.seed, 0, i);
        let t = Instant::now();
        let (_, labels) = source.sampler.batch(&cases, &fg, s.batch, &mut rng)?;
        sample_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        for size in &source.target_sizes {
            std::hint::black_box(downsample_labels(&labels, size)?);
        }
        labels_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (sample, labels) = (median(sample_ms), median(labels_ms));
    let mut rows = vec![
        row("patches, augmented (1 thread)", sample),
        row("label pyramid (1 thread)", labels),
        row("whole batch (1 thread)", sample + labels),
    ];
    // Through the loader: the time per batch of a steady stream, after the first batch (which pays the start-up).
    for &w in workers {
        let per_batch = std::thread::scope(|scope| -> Result<f64> {
            let mut loader = Loader::start(scope, &source, 0, 2, w, 2);
            loader.next_batch()?;
            let t = Instant::now();
            for _ in 1..2 * batches {
                std::hint::black_box(loader.next_batch()?);
            }
            Ok(t.elapsed().as_secs_f64() * 1e3 / (2 * batches - 1) as f64)
        })?;
        rows.push(row(&format!("loader, {w} worker{}", if w == 1 { "" } else { "s" }), per_batch));
    }
    Ok(rows)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU's model name from /proc/cpuinfo (Linux), or "unknown".
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
