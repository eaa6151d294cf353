//! The planner: its rules (anisotropy, topology, window divisibility, mask-for-norm, crop), its memory model against
//! the engine's measured peaks, a FLARE-like dataset, and plans of awkward synthetic datasets that `train` runs.

use lkm_engine::data::fingerprint::{CaseFingerprint, Fingerprint, IntensityStats};
use lkm_engine::nn::{LkmUnet, ModelConfig};
use lkm_engine::plan::memory::{estimate_gib, parameter_count};
use lkm_engine::plan::{plan, Dims, PlanOptions};

/// A fingerprint of `n` cases of the given shapes and spacings (cycled), one CT or MR channel, 14 classes.
fn fingerprint(shapes: &[[usize; 3]], spacings: &[[f64; 3]], n: usize, channel: &str, kept: f64) -> Fingerprint {
    let stats = IntensityStats { mean: 80.0, std: 60.0, median: 75.0, min: -900.0, max: 1500.0, p00_5: -80.0, p99_5: 300.0 };
    Fingerprint {
        channel_names: vec![channel.to_string()],
        class_names: (0..14).map(|k| format!("class{k}")).collect(),
        cases: (0..n)
            .map(|i| CaseFingerprint {
                name: format!("case{i}"),
                shape: shapes[i % shapes.len()],
                shape_after_crop: shapes[i % shapes.len()],
                spacing: spacings[i % spacings.len()],
            })
            .collect(),
        intensity: vec![stats],
        class_voxels: vec![1; 14],
        median_relative_size_after_crop: kept,
    }
}

#[test]
fn memory_model_is_calibrated_and_counts_parameters_exactly() {
    for cfg in [ModelConfig::tiny_3d(), ModelConfig::flare_3d(), ModelConfig::amos_2d()] {
        let (_, params) = LkmUnet::new(cfg.clone(), 1).unwrap();
        assert_eq!(parameter_count(&cfg), params.count(), "{:?}", cfg.features);
    }
    // Exact at the two measured peaks.
    assert!((estimate_gib(&ModelConfig::flare_3d(), 2) - 40.8).abs() < 1e-9);
    assert!((estimate_gib(&ModelConfig::amos_2d(), 12) - 17.4).abs() < 1e-9);
    for rank in [3, 2] {
        let k = lkm_engine::plan::memory::bytes_per_value(rank) / 4.0;
        eprintln!("rank {rank}: {k:.3} float32 values per counted value");
    }
}

#[test]
fn a_flare_like_dataset_at_80_gib_gets_the_papers_patch() {
    let shapes = [[96, 512, 512], [104, 512, 512], [100, 512, 512]];
    let fp = fingerprint(&shapes, &[[2.5, 0.8, 0.8]], 30, "CT", 1.0);
    for gib in [41.0, 48.0, 60.0, 80.0] {
        let p = plan(&fp, &PlanOptions { gpu_memory_gib: gib, ..PlanOptions::default() }).unwrap();
        eprintln!("{gib} GiB: {:?} batch {} est {:.1} strides {:?}", p.model.patch, p.batch, p.estimated_gib, p.model.strides);
        eprintln!("{:?}\n{:?}", p.model.pim_windows, p.model.pam_pools);
    }
}
