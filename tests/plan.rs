//! The planner: its rules (anisotropy, topology, window divisibility, mask-for-norm, crop), its memory model against
//! the engine's measured peaks, a FLARE-like dataset, and plans of awkward synthetic datasets that train and predict.

use std::path::PathBuf;

use lkm_engine::data::crop::{crop_to_nonzero, nonzero_bbox, uncrop_labels, BoundingBox};
use lkm_engine::data::dataset::write_dataset;
use lkm_engine::data::fingerprint::{CaseFingerprint, Fingerprint, IntensityStats};
use lkm_engine::data::nifti::{header_for, read_volume, write_image};
use lkm_engine::data::normalize::{normalize_case, ChannelNorm, Normalization};
use lkm_engine::data::synth::{phantom_dataset, SynthConfig, PHANTOM_LABELS};
use lkm_engine::data::Case;
use lkm_engine::device::{Device, Precision};
use lkm_engine::nn::mamba::MambaConfig;
use lkm_engine::nn::{LkmUnet, ModelConfig};
use lkm_engine::plan::memory::{estimate_gib, parameter_count};
use lkm_engine::plan::topology::topology;
use lkm_engine::plan::{normalization, override_stages, plan, plan_dataset, target_spacing, Dims, PlanOptions, Plans};
use lkm_engine::predict::Predictor;
use lkm_engine::train::prepare;
use lkm_engine::train::trainer::{Run, Start, TrainOptions};

mod common;
use common::assert_close;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lkm-plan-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A fingerprint of `n` cases with the given shapes and spacings (cycled), one channel, 14 classes.
fn fingerprint(shapes: &[[usize; 3]], spacings: &[[f64; 3]], n: usize, channel: &str, kept: f64) -> Fingerprint {
    let stats =
        IntensityStats { mean: 80.0, std: 60.0, median: 75.0, min: -900.0, max: 1500.0, p00_5: -80.0, p99_5: 300.0 };
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

/// Planner options for models small enough to train on the CPU in a test.
fn tiny_options() -> PlanOptions {
    PlanOptions {
        base_features: 4,
        blocks_per_stage: 1,
        mamba: MambaConfig { d_state: 4, d_conv: 4, expand: 2, recompute: false },
        ..PlanOptions::default()
    }
}

#[test]
fn memory_model_counts_parameters_exactly_and_is_exact_at_the_measured_peaks() {
    let fp = fingerprint(&[[37, 61, 53]], &[[3.0, 0.8, 0.8]], 4, "CT", 1.0);
    let planned_3d = plan(&fp, &PlanOptions { base_features: 8, ..PlanOptions::default() }).unwrap().model;
    let fp2 = fingerprint(&[[1, 75, 91]], &[[4.0, 0.7, 1.1]], 4, "T2", 1.0);
    let planned_2d = plan(&fp2, &PlanOptions { base_features: 8, ..PlanOptions::default() }).unwrap().model;
    for cfg in [ModelConfig::tiny_3d(), planned_3d, planned_2d] {
        let (_, params) = LkmUnet::new(cfg.clone(), 1).unwrap();
        assert_eq!(parameter_count(&cfg), params.count(), "features {:?}", cfg.features);
    }
    let (fp32, bf16) = (Precision::Fp32, Precision::Bf16);
    assert!((estimate_gib(&ModelConfig::flare_3d(), 2, fp32) - 21.28).abs() < 1e-9);
    assert!((estimate_gib(&ModelConfig::amos_2d(), 12, fp32) - 9.15).abs() < 1e-9);
    assert!((estimate_gib(&ModelConfig::flare_3d(), 2, bf16) - 11.26).abs() < 1e-9);
    assert!((estimate_gib(&ModelConfig::amos_2d(), 12, bf16) - 5.07).abs() < 1e-9);
    // Linear in the batch: each sample adds the same bytes.
    let f = ModelConfig::flare_3d();
    let step = estimate_gib(&f, 3, fp32) - estimate_gib(&f, 2, fp32);
    assert!((estimate_gib(&f, 2, fp32) - estimate_gib(&f, 1, fp32) - step).abs() < 1e-9 && step > 8.0, "{step}");
    // The two families' fitted bytes per counted value agree (fp32 within 5%: 5.0% measured; bf16 within 10%: 9.3%
    // measured, see plan::memory): the count follows what the engine keeps.
    for (precision, tolerance) in [(fp32, 0.05), (bf16, 0.10)] {
        let k = |rank| lkm_engine::plan::memory::bytes_per_value(rank, precision);
        let (k3, k2) = (k(3), k(2));
        assert!((k3 / k2 - 1.0).abs() < tolerance, "{precision}: 3D {k3:.3} vs 2D {k2:.3} bytes per counted value");
    }
}

#[test]
fn a_flare_like_dataset_gets_the_papers_patch() {
    let shapes = [[96, 512, 512], [104, 512, 512], [100, 512, 512]];
    let fp = fingerprint(&shapes, &[[2.5, 0.8, 0.8]], 30, "CT", 1.0);
    let at = |gib: f64, precision| {
        plan(&fp, &PlanOptions { gpu_memory_gib: gib, precision, ..PlanOptions::default() }).unwrap()
    };
    // In bf16 a budget that holds the engine's measured 11.26 GiB at this patch, and not the next patch on the path.
    let p = at(14.0, Precision::Bf16);
    assert_eq!((p.model.patch.as_slice(), p.batch), (&[40, 224, 192][..], 2));
    // (Its network differs from flare_3d's in small ways, e.g. the window layout, so its estimate is near 11.26.)
    assert!(p.estimated_gib <= p.budget_gib && (p.estimated_gib / 11.26 - 1.0).abs() < 0.01, "{}", p.estimated_gib);
    // The same in fp32, whose measured peak is 21.28 GiB.
    let p = at(26.0, Precision::Fp32);
    assert_eq!(p.dims, Dims::ThreeD);
    assert_eq!(p.model.patch, vec![40, 224, 192]);
    assert_eq!(p.batch, 2);
    assert_eq!(p.model.features, vec![32, 64, 128, 256, 320, 320]);
    assert_eq!(p.model.kernels[0], vec![1, 3, 3], "2.5 mm is coarser than twice 0.8 mm");
    assert_eq!(p.model.strides[1], vec![1, 2, 2]);
    // The public code's windows and factors for this patch, now derived from its stage maps.
    let w: Vec<Vec<usize>> = [[20, 28, 24], [20, 28, 24], [10, 14, 12], [10, 14, 12], [5, 7, 6], [5, 7, 6]]
        .iter()
        .map(|v| v.to_vec())
        .collect();
    assert_eq!(p.model.pim_windows, w);
    assert_eq!(p.model.pam_pools.iter().map(|v| v[0]).collect::<Vec<_>>(), vec![4, 4, 2, 2, 1, 1]);
    // 80 GiB in fp32: a patch larger than the paper's along every axis (deep enough for a seventh stage), batch 2.
    let p = at(80.0, Precision::Fp32);
    let (patch, paper) = (&p.model.patch, [40, 224, 192]);
    assert!(patch.iter().zip(paper).all(|(&a, b)| a > b), "{patch:?}");
    assert_eq!((p.batch, p.model.features.len()), (2, 7));
    assert!(p.estimated_gib <= p.budget_gib && p.budget_gib < 80.0);
}

#[test]
fn anisotropic_spacing_takes_the_tenth_percentile_of_the_coarse_axis() {
    // Thick slices (median 5 mm) and few of them: the target is the 10th percentile of the z spacings.
    let z: Vec<[f64; 3]> = [2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0, 6.0].iter().map(|&z| [z, 0.8, 0.8]).collect();
    let (t, aniso) = target_spacing(&fingerprint(&[[20, 256, 256]], &z, 10, "T2", 1.0));
    assert!(aniso);
    assert!((t[0] - 3.8).abs() < 1e-9 && t[1] == 0.8, "{t:?}"); // 2 + 0.9 (4 - 2)
                                                                // The same spacings with as many voxels along z as in-plane: the median stays.
    let (t, aniso) = target_spacing(&fingerprint(&[[100, 256, 256]], &z, 10, "T2", 1.0));
    assert!(!aniso && t[0] == 5.0, "{t:?}");
    // A 10th percentile finer than the other axes is raised to just above them.
    let z: Vec<[f64; 3]> = (0..20).map(|i| [if i < 3 { 0.5 } else { 5.0 }, 0.8, 0.7]).collect();
    let (t, _) = target_spacing(&fingerprint(&[[20, 256, 256]], &z, 20, "T2", 1.0));
    assert!((t[0] - (0.8 + 1e-5)).abs() < 1e-12, "{t:?}");
}

#[test]
fn topology_windows_and_factors_divide_every_stage_map() {
    for spacing in [[1.0, 1.0, 1.0], [3.0, 0.8, 0.8], [5.0, 0.7, 1.1], [0.9, 0.9, 2.2]] {
        for patch in [[37, 61, 53], [8, 160, 160], [64, 64, 64], [13, 200, 90], [5, 30, 30]] {
            let shapes = [[patch[0] + 3, patch[1] + 5, patch[2] + 1]];
            let p = plan(&fingerprint(&shapes, &[spacing], 3, "T2", 1.0), &PlanOptions::default()).unwrap();
            let m = &p.model;
            m.validate(&m.patch).unwrap();
            let topo = topology(&spacing, &patch);
            for (a, (&len, &d)) in topo.patch.iter().zip(&topo.divisor).enumerate() {
                assert!(len % d == 0 && len >= patch[a] && len < patch[a] + d, "{patch:?} -> {:?}", topo.patch);
            }
            let maps = m.stage_sizes(&m.patch);
            assert!(maps.last().unwrap().iter().zip(&m.patch).all(|(&b, &p)| b >= 1 && b <= p));
            for (s, map) in maps.iter().enumerate() {
                for a in 0..3 {
                    assert_eq!(map[a] % m.pim_windows[s][a], 0, "stage {s} {map:?} {:?}", m.pim_windows[s]);
                    assert_eq!(map[a] % m.pam_pools[s][a], 0, "stage {s} {map:?} {:?}", m.pam_pools[s]);
                }
            }
            // Coarse axes get kernel 1 until the fine axes have been pooled to within a factor 2.
            let coarse = (0..3).filter(|&a| spacing[a] >= 2.0 * spacing.iter().cloned().fold(f64::MAX, f64::min));
            for a in coarse {
                assert_eq!(m.kernels[0][a], 1, "spacing {spacing:?}: kernel {:?}", m.kernels[0]);
            }
        }
    }
}

#[test]
fn two_d_data_plans_two_d_and_the_batch_follows_memory_and_the_dataset() {
    let fp = fingerprint(&[[1, 300, 260]], &[[5.0, 0.7, 0.7]], 400, "T2", 1.0);
    let small = plan(&fp, &PlanOptions { gpu_memory_gib: 4.0, ..PlanOptions::default() }).unwrap();
    assert_eq!((small.dims, small.model.patch.len()), (Dims::TwoD, 2));
    assert!(small.model.patch.iter().zip([300, 260]).all(|(&p, m)| p <= m + 64));
    let large = plan(&fp, &PlanOptions { gpu_memory_gib: 80.0, ..PlanOptions::default() }).unwrap();
    assert!(large.batch > small.batch && large.estimated_gib <= large.budget_gib, "{} {}", small.batch, large.batch);
    // A slice axis is never resampled in 2D.
    assert_eq!(large.target_spacing_for([2.0, 1.0, 1.0])[0], 2.0);
    // Few cases: one batch may cover at most 5% of the dataset's voxels (but at least 2 patches).
    let few = fingerprint(&[[1, 300, 260]], &[[5.0, 0.7, 0.7]], 40, "T2", 1.0);
    assert_eq!(plan(&few, &PlanOptions { gpu_memory_gib: 80.0, ..PlanOptions::default() }).unwrap().batch, 2);
    let err = plan(&fp, &PlanOptions { dims: Some(Dims::ThreeD), ..PlanOptions::default() }).unwrap_err().to_string();
    assert!(err.contains("one slice deep"), "{err}");
    let err = plan(&fp, &PlanOptions { gpu_memory_gib: 0.001, ..PlanOptions::default() }).unwrap_err().to_string();
    assert!(err.contains("--gpu-memory 0.001 GiB"), "{err}");
}

#[test]
fn normalisation_masks_the_zero_background_when_the_crop_removes_a_quarter() {
    for (kept, masked) in [(0.74, true), (0.76, false)] {
        let n = normalization(&fingerprint(&[[10, 10, 10]], &[[1.0; 3]], 2, "FLAIR", kept));
        assert_eq!(n.channel(0), ChannelNorm::ZScore { nonzero_mask: masked });
        let n = normalization(&fingerprint(&[[10, 10, 10]], &[[1.0; 3]], 2, "CT", kept));
        assert!(matches!(n.channel(0), ChannelNorm::Ct(s) if s.lo == -80.0 && s.hi == 300.0 && s.mean == 80.0));
    }
    // A brain-like image: zeros around a region of intensities 100..200.
    let mut case = boxed_case([6, 8, 10], [1, 2, 3], [5, 6, 8]);
    let original = case.image.clone();
    let norm = Normalization::PerChannel(vec![ChannelNorm::ZScore { nonzero_mask: true }]);
    assert_eq!(Normalization::from_json(&norm.to_json()).unwrap(), norm);
    normalize_case(&mut case, &norm).unwrap();
    let inside: Vec<f64> =
        case.image.iter().zip(&original).filter(|(_, &o)| o != 0.0).map(|(&v, _)| v as f64).collect();
    let mean = inside.iter().sum::<f64>() / inside.len() as f64;
    let var = inside.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / inside.len() as f64;
    assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "mean {mean} var {var}");
    assert!(case.image.iter().zip(&original).all(|(&v, &o)| o != 0.0 || v == 0.0), "the background stays 0");
}

/// A one-channel labelled case of `shape` that is zero outside the box [lo, hi), 100 + (i % 101) inside.
fn boxed_case(shape: [usize; 3], lo: [usize; 3], hi: [usize; 3]) -> Case {
    let n = shape.iter().product::<usize>();
    let inside = |i: usize| {
        let p = [i / (shape[1] * shape[2]), (i / shape[2]) % shape[1], i % shape[2]];
        (0..3).all(|a| p[a] >= lo[a] && p[a] < hi[a])
    };
    Case {
        name: "boxed".into(),
        image: (0..n).map(|i| if inside(i) { 100.0 + (i % 101) as f32 } else { 0.0 }).collect(),
        channels: 1,
        shape,
        label: Some((0..n).map(|i| u8::from(inside(i) && i % 3 == 0)).collect()),
        spacing: [1.0; 3],
    }
}

#[test]
fn crop_to_nonzero_finds_the_box_and_uncrop_restores_the_grid() {
    let case = boxed_case([6, 8, 10], [1, 2, 3], [5, 6, 8]);
    let b = nonzero_bbox(&case);
    assert_eq!(b, BoundingBox { start: [1, 2, 3], end: [5, 6, 8] });
    let (cropped, b2) = crop_to_nonzero(&case).unwrap();
    assert_eq!((cropped.shape, b2), ([4, 4, 5], b));
    assert!(cropped.image.iter().all(|&v| v >= 100.0), "only the nonzero region is kept");
    let label = case.label.as_ref().unwrap();
    assert_eq!(&uncrop_labels(cropped.label.as_ref().unwrap(), &b, case.shape), label);
    // Nothing nonzero: nothing to crop to.
    let zero = Case { image: vec![0.0; case.image.len()], ..case.clone() };
    assert_eq!(nonzero_bbox(&zero), BoundingBox::full(case.shape));
}

#[test]
fn stage_overrides_set_windows_and_refuse_sizes_that_do_not_divide() {
    let mut cfg = ModelConfig::flare_3d();
    override_stages(&mut cfg, &[(0, vec![10, 14, 12])], &[(1, vec![2])]).unwrap();
    assert_eq!((cfg.pim_windows[0].clone(), cfg.pam_pools[1].clone()), (vec![10, 14, 12], vec![2, 2, 2]));
    let err = override_stages(&mut cfg, &[(0, vec![16, 16, 16])], &[]).unwrap_err().to_string();
    assert!(err.contains("PiM stage 0") && err.contains("axis D of size 40"), "{err}");
    let err = override_stages(&mut cfg, &[], &[(9, vec![2])]).unwrap_err().to_string();
    assert!(err.contains("--pam-factor 9") && err.contains("0..5"), "{err}");
    assert!(lkm_engine::plan::parse_stage_sizes("0=20x28").is_ok());
    assert!(lkm_engine::plan::parse_stage_sizes("0:20").unwrap_err().contains("STAGE=AxBxC"));
}

/// Plans `dir`, checks the plans file round trip, trains one iteration of the plan and predicts `image` with it;
/// returns the plan and the path of the prediction.
fn plan_train_predict(dir: &std::path::Path, image: &std::path::Path, name: &str) -> (lkm_engine::plan::Plan, PathBuf) {
    let plans = plan_dataset(dir, &tiny_options()).unwrap();
    let file = dir.with_extension("plans.json");
    plans.save(&file).unwrap();
    assert_eq!(Plans::load(&file).unwrap(), plans);
    // A plans file written before plans recorded their precision was made with the fp32 memory model.
    let mut older: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(older["plan"]["precision"], "bf16");
    older["plan"].as_object_mut().unwrap().remove("precision");
    std::fs::write(&file, older.to_string()).unwrap();
    assert_eq!(Plans::load(&file).unwrap().plan.precision, Precision::Fp32);
    let plan = plans.plan;
    let data = prepare::planned(dir, &plan, 0.25).unwrap();
    let (model, init) = LkmUnet::new(plan.model.clone(), 1).unwrap();
    let out = dir.with_extension("run");
    let opts =
        TrainOptions { epochs: 1, iters_per_epoch: 1, batch: plan.batch, progress: false, ..TrainOptions::default() };
    let run = Run { model: &model, device: Device::Cpu, opts, out_dir: out.clone(), meta: data.meta() };
    let (records, _) =
        run.train(&data.train, &data.val, Start { params: init, momentum: Vec::new(), epoch: 0 }).unwrap();
    assert!(records[0].train_loss.is_finite() && records[0].val_mean_dice.is_some(), "{:?}", records[0]);
    let predictor = Predictor::from_checkpoint(&out.join("latest.safetensors"), Device::Cpu, false).unwrap();
    let pred = predictor.predict_files(name, &[image.to_path_buf()], &out.join("pred")).unwrap();
    (plan, pred)
}

#[test]
fn plans_of_awkward_datasets_train_and_predict_in_3d_and_2d() {
    // 3D: 37 x 61 x 53 voxels at 3 x 0.8 x 0.8 mm, CT.
    let dir = temp_dir("aniso3d");
    let mut cases = phantom_dataset(&SynthConfig { cases: 4, shape: [37, 61, 53], seed: 5 });
    for c in &mut cases {
        c.spacing = [3.0, 0.8, 0.8];
    }
    write_dataset(&dir, &cases, PHANTOM_LABELS, &["CT"]).unwrap();
    // The image to predict sits in a zero frame: cropped for the network, written back at full size.
    let [d, h, w] = cases[0].shape;
    let full = [d + 4, h + 6, w + 2];
    let mut framed = vec![0f32; full.iter().product()];
    for (i, &v) in cases[0].image.iter().enumerate() {
        let (z, y, x) = (i / (h * w) + 2, (i / w) % h + 3, i % w + 1);
        framed[(z * full[1] + y) * full[2] + x] = v;
    }
    let image = dir.with_extension("framed_0000.nii.gz");
    write_image(&image, &framed, full, &header_for(full, [3.0, 0.8, 0.8]).unwrap()).unwrap();
    let (p, pred) = plan_train_predict(&dir, &image, "framed");
    assert_eq!(p.dims, Dims::ThreeD);
    assert_close("planned spacing", &p.spacing, &[3.0, 0.8, 0.8], 0.0, 1e-6);
    assert_eq!(p.model.patch, vec![40, 64, 56], "37 x 61 x 53 padded to the 8 x 16 x 8 divisibility");
    assert_eq!(p.model.kernels[0], vec![1, 3, 3]);
    let (a, b) = (read_volume(&image).unwrap(), read_volume(&pred).unwrap());
    assert_eq!((b.shape, b.affine), (a.shape, a.affine));
    assert!(b.to_labels().unwrap().iter().zip(&framed).all(|(&l, &v)| v != 0.0 || l == 0), "background in the frame");

    // 2D: one slice of 70 x 90 at 0.7 x 1.1 mm (one case at 0.75 mm: resampled), MR with a zero frame.
    let dir = temp_dir("mr2d");
    let cases: Vec<Case> = (0..4)
        .map(|i| {
            let mut c = boxed_case([1, 70, 90], [0, 8 + i, 5], [1, 60, 80 - i]);
            c.name = format!("slice{i}");
            c.spacing = [5.0, if i == 3 { 0.75 } else { 0.7 }, 1.1];
            c.label = Some(
                c.image.iter().enumerate().map(|(j, &v)| if v == 0.0 { 0 } else { 1 + (j % 90 > 40) as u8 }).collect(),
            );
            c
        })
        .collect();
    write_dataset(&dir, &cases, &[("background", 0), ("left", 1), ("right", 2)], &["T2"]).unwrap();
    let image = dir.join("imagesTr").join("slice0_0000.nii.gz");
    let (p, pred) = plan_train_predict(&dir, &image, "slice0");
    assert_eq!((p.dims, p.model.patch.len()), (Dims::TwoD, 2));
    assert_eq!(p.normalization.channel(0), ChannelNorm::ZScore { nonzero_mask: true }, "the frame is over a quarter");
    assert_eq!(read_volume(&pred).unwrap().shape, [1, 70, 90]);
}

#[test]
fn resume_restores_the_plan_and_refuses_another() {
    use lkm_engine::train::launch::Launch;
    let fp = fingerprint(&[[37, 61, 53]], &[[3.0, 0.8, 0.8]], 4, "CT", 1.0);
    let planned = plan(&fp, &tiny_options()).unwrap();
    let recorded = Launch {
        data: None,
        config: None,
        plan: Some(planned.clone()),
        pim_window: Vec::new(),
        pam_factor: Vec::new(),
        patch: None,
        pim_layout: "window".into(),
        epochs: 2,
        iters: 1,
        batch: planned.batch,
        lr: 0.01,
        seed: 1,
        val_fraction: 0.2,
        synth_cases: 4,
        mirror: true,
        augment: true,
    };
    // `train --resume ck --epochs 3`: no plan on the command line; the recorded one comes back, network included.
    let given = Launch { plan: None, epochs: 3, ..recorded.clone() };
    let ck = std::path::Path::new("run/latest.safetensors");
    let resumed = Launch::resumed(&recorded, &given, &|id| id == "epochs", ck, 1).unwrap();
    assert_eq!((resumed.plan.as_ref(), resumed.epochs), (Some(&planned), 3));
    assert_eq!(resumed.model_config(14, 1).unwrap(), planned.model);
    // An explicit --plans with another plan, or another --pim-window, is refused.
    let other = plan(&fp, &PlanOptions { base_features: 8, ..tiny_options() }).unwrap();
    let given = Launch { plan: Some(other), ..given };
    let err = Launch::resumed(&recorded, &given, &|id| id == "plans", ck, 1).unwrap_err().to_string();
    assert!(err.contains("--plans") && err.contains("run/latest.safetensors"), "{err}");
    let given = Launch { plan: None, pim_window: vec![(0, vec![4])], ..recorded.clone() };
    let err = Launch::resumed(&recorded, &given, &|id| id == "pim_window", ck, 1).unwrap_err().to_string();
    assert!(err.contains("--pim-window"), "{err}");
}
