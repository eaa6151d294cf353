//! The memory model against a third measurement: the host memory one more sample adds to a float32 training step of
//! tiny-3d on the CPU (a counting allocator's peak), beside the model's per-sample bytes fitted on the GPU peaks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use lkm_engine::autograd::Tape;
use lkm_engine::device::Precision;
use lkm_engine::nn::{LkmUnet, ModelConfig};
use lkm_engine::plan::memory::sample_bytes;
use lkm_engine::train::loss::{deep_supervision_loss, downsample_labels};
use lkm_engine::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak heap bytes above the start of one forward and backward pass of `batch` samples.
fn step_peak(model: &LkmUnet, params: &lkm_engine::nn::Params, batch: usize) -> usize {
    let cfg = &model.config;
    let mut rng = StdRng::seed_from_u64(1);
    let mut shape = vec![batch, cfg.in_channels];
    shape.extend_from_slice(&cfg.patch);
    let x = Tensor::randn(&shape, DType::F32, &mut rng).unwrap();
    let mut yshape = vec![batch, 1];
    yshape.extend_from_slice(&cfg.patch);
    let y = Tensor::from_fn(&yshape, DType::F32, |i| (i % cfg.num_classes) as f64).unwrap();
    let targets: Vec<Tensor> = cfg.output_sizes(&cfg.patch).iter().map(|s| downsample_labels(&y, s).unwrap()).collect();
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let mut tape = Tape::new();
    params.watch(&mut tape);
    let outputs = model.forward(&mut tape, params, &x).unwrap();
    let loss = deep_supervision_loss(&mut tape, &outputs, &targets, true).unwrap();
    drop(outputs);
    let grads = tape.backward(&loss).unwrap();
    drop(grads);
    PEAK.load(Ordering::SeqCst) - base
}

#[test]
fn one_more_sample_costs_what_the_model_says_on_the_cpu() {
    let (model, params) = LkmUnet::new(ModelConfig::tiny_3d(), 1).unwrap();
    let (one, two) = (step_peak(&model, &params, 1), step_peak(&model, &params, 2));
    let measured = two as f64 - one as f64;
    let predicted = sample_bytes(&model.config, Precision::Fp32);
    eprintln!("tiny-3d on the CPU: peak {one} B (batch 1), {two} B (batch 2); per sample {measured:.0} B, model {predicted:.0} B");
    assert!((measured / predicted - 1.0).abs() < 0.15, "measured {measured:.0} B per sample, model {predicted:.0} B");
}
