//! The training workflow: patch sampling, the background loader (batches independent of its thread count), the
//! deep-supervision loss, checkpoints (round trip, atomic write,
//! mismatch errors), resume (bit-identical to an uninterrupted run), a NaN loss, and predict's output grid.

use std::path::PathBuf;

mod common;

use lkm_engine::autograd::Tape;
use lkm_engine::data::nifti::{header_for, read_volume, write_image};
use lkm_engine::data::sampler::{ForegroundIndex, PatchSampler};
use lkm_engine::data::synth::{phantom_dataset, SynthConfig};
use lkm_engine::data::Case;
use lkm_engine::device::Device;
use lkm_engine::nn::LkmUnet;
use lkm_engine::ops::cross_entropy::cross_entropy;
use lkm_engine::ops::dice::soft_dice_loss;
use lkm_engine::predict::Predictor;
use lkm_engine::train::checkpoint;
use lkm_engine::train::loader::{Batch, BatchSource, Loader};
use lkm_engine::train::loss::{deep_supervision_loss, deep_supervision_weights, downsample_labels};
use lkm_engine::train::trainer::{Run, Start, TrainOptions};
use lkm_engine::{DType, Error, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lkm-train-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn phantoms(n: usize) -> Vec<Case> {
    phantoms_of([12, 20, 20], n)
}

/// `n` z-scored phantoms of `shape`.
fn phantoms_of(shape: [usize; 3], n: usize) -> Vec<Case> {
    let mut cases = phantom_dataset(&SynthConfig { cases: n, shape, seed: 3 });
    for c in &mut cases {
        lkm_engine::data::normalize::normalize_case(c, &lkm_engine::data::normalize::Normalization::ZScore).unwrap();
    }
    cases
}

fn options(epochs: usize) -> TrainOptions {
    TrainOptions { epochs, iters_per_epoch: 2, batch: 2, progress: false, ..TrainOptions::default() }
}

#[test]
fn sampler_patches_have_the_patch_shape_and_aligned_labels() {
    // An image that is its own label (as float): mirroring and cropping must move both identically.
    let mut case = phantoms(1).remove(0);
    let label = case.label.clone().unwrap();
    case.image = label.iter().map(|&l| l as f32 * 10.0).collect();
    let fg = ForegroundIndex::new(&case, 4);
    let mut rng = StdRng::seed_from_u64(1);
    for (patch, fg_fraction) in [(vec![8, 16, 16], 1.0), (vec![16, 32, 32], 0.0), (vec![16, 16], 1.0)] {
        let s = PatchSampler { patch: patch.clone(), fg_fraction, augment: false, mirror: true };
        let mirror = PatchSampler { augment: true, ..s.clone() };
        for sampler in [&s, &mirror] {
            for _ in 0..20 {
                let p = sampler.sample(&case, &fg, &mut rng).unwrap();
                assert_eq!(p.label.len(), patch.iter().product::<usize>());
                if !sampler.augment {
                    assert!(
                        p.image.iter().zip(&p.label).all(|(i, &l)| *i == l as f32 * 10.0),
                        "image and label moved apart"
                    );
                }
                if fg_fraction == 1.0 {
                    assert!(p.label.iter().any(|&l| l > 0), "a foreground-centred patch must contain foreground");
                }
            }
        }
    }
}

#[test]
fn loader_batches_depend_only_on_seed_epoch_and_iteration() {
    let cases = phantoms(3);
    let foreground: Vec<ForegroundIndex> = cases.iter().map(|c| ForegroundIndex::new(c, 4)).collect();
    let sampler = PatchSampler { patch: vec![8, 16, 16], fg_fraction: 1.0 / 3.0, augment: true, mirror: true };
    let source = BatchSource {
        sampler,
        cases: &cases,
        foreground: &foreground,
        batch: 2,
        seed: 9,
        iters_per_epoch: 4,
        target_sizes: vec![vec![8, 16, 16], vec![4, 8, 8], vec![2, 4, 4]],
    };
    // A batch as one vector: images, then the labels at each size.
    let flat = |b: Batch| -> Vec<f32> {
        std::iter::once(&b.image).chain(&b.targets).flat_map(|t| t.to_vec_f32().unwrap()).collect()
    };
    // Every batch of epochs first_epoch..3, drawn with `workers` threads.
    let batches = |first_epoch: usize, workers: usize| -> Vec<Vec<f32>> {
        std::thread::scope(|scope| {
            let mut loader = Loader::start(scope, &source, first_epoch, 3, workers, 2);
            (first_epoch * 4..12).map(|_| flat(loader.next_batch().unwrap())).collect()
        })
    };
    let inline = batches(0, 0);
    assert_eq!(batches(0, 1), inline, "one worker thread");
    assert_eq!(batches(0, 3), inline, "three worker threads");
    assert_eq!(batches(1, 3), inline[4..], "a run resumed at epoch 1");
    let b = source.batch(2, 1).unwrap();
    // The worker's reduced labels are the full-size labels reduced (nearest, the loss's own reduction).
    assert_eq!(b.targets.len(), 3);
    for (t, size) in b.targets.iter().zip(&source.target_sizes) {
        assert_eq!(&t.shape()[2..], &size[..]);
        let reduced = downsample_labels(&b.targets[0], size).unwrap();
        assert_eq!(t.to_vec_f32().unwrap(), reduced.to_vec_f32().unwrap());
    }
    assert_eq!(flat(b), inline[9], "epoch 2, iteration 1");
    assert!(inline.windows(2).all(|b| b[0] != b[1]), "consecutive iterations drew the same batch");
    // A loader dropped long before its last epoch stops its workers (the scope would otherwise never end).
    std::thread::scope(|scope| Loader::start(scope, &source, 0, 1000, 3, 1).next_batch().map(drop)).unwrap();
}

#[test]
fn deep_supervision_weights_and_loss_follow_nnunet() {
    let w = deep_supervision_weights(4);
    let expected = [1.0, 0.5, 0.25, 0.0].map(|v| v / 1.75);
    common::assert_close("deep supervision weights", &w, &expected, 0.0, 1e-12);
    let mut rng = StdRng::seed_from_u64(2);
    let labels: Vec<f64> = (0..2 * 8 * 8 * 8).map(|i| ((i * 7) % 3) as f64).collect();
    let labels = Tensor::from_vec(labels, &[2, 1, 8, 8, 8]).unwrap();
    let small = downsample_labels(&labels, &[4, 4, 4]).unwrap();
    // Voxel o of the reduced map is voxel 2o + 1 of the full one (the block centre, as nnU-Net).
    let (full, red) = (labels.to_vec_f64().unwrap(), small.to_vec_f64().unwrap());
    for (o, i) in [([1, 2, 3], [3, 5, 7]), ([0, 0, 0], [1, 1, 1]), ([3, 1, 0], [7, 3, 1])] {
        assert_eq!(red[(4 * 4 * 4) + (o[0] * 4 + o[1]) * 4 + o[2]], full[(8 * 8 * 8) + (i[0] * 8 + i[1]) * 8 + i[2]]);
    }
    let outs = [
        Tensor::randn(&[2, 3, 8, 8, 8], lkm_engine::DType::F64, &mut rng).unwrap(),
        Tensor::randn(&[2, 3, 4, 4, 4], lkm_engine::DType::F64, &mut rng).unwrap(),
    ];
    let t = &mut Tape::no_grad();
    let total = deep_supervision_loss(t, &outs, &[labels.clone(), small.clone()], true).unwrap().scalar().unwrap();
    // Two outputs: weights (1, 0) normalised, so only the full-resolution term counts.
    let ce = cross_entropy(t, &outs[0], &labels).unwrap().scalar().unwrap();
    let dice = soft_dice_loss(t, &outs[0], &labels, true).unwrap().scalar().unwrap();
    assert!((total - (ce + dice)).abs() < 1e-12, "{total} vs {}", ce + dice);
}

#[test]
fn checkpoint_round_trip_is_exact_and_atomic() {
    let dir = temp_dir("ckpt");
    let (_, params) = LkmUnet::new(common::micro_config(), 5).unwrap();
    let momentum: Vec<Option<Tensor>> =
        params.tensors().iter().enumerate().map(|(i, t)| (i % 2 == 0).then(|| t.clone())).collect();
    let meta = serde_json::json!({"epoch": 3, "config": common::micro_config()});
    let path = dir.join("ck.safetensors");
    checkpoint::save(&path, &params, &momentum, &meta).unwrap();
    assert!(!path.with_extension("tmp").exists(), "the temporary file must be renamed away");
    let ck = checkpoint::load(&path).unwrap();
    assert_eq!(ck.meta, meta);
    let back = ck.params_like(&params).unwrap();
    for (a, b) in params.tensors().iter().zip(back.tensors()) {
        assert_eq!(a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    }
    let m = ck.momentum_like(&params);
    assert_eq!(m.iter().filter(|m| m.is_some()).count(), momentum.iter().filter(|m| m.is_some()).count());
    // A checkpoint of another model is refused with the names that differ.
    let mut other = common::micro_config();
    other.features = vec![4, 12];
    let (_, other_params) = LkmUnet::new(other, 5).unwrap();
    let err = ck.params_like(&other_params).err().expect("shapes differ").to_string();
    assert!(err.contains("expected shape"), "{err}");
    // A truncated file is an error naming it, not a panic.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = checkpoint::load(&path).err().expect("truncated").to_string();
    assert!(err.contains("ck.safetensors"), "{err}");
}

fn train_run(dir: &std::path::Path, epochs: usize, start: Start) -> lkm_engine::nn::Params {
    let (model, _) = LkmUnet::new(common::micro_config(), 5).unwrap();
    let run = Run {
        model: &model,
        device: Device::Cpu,
        opts: options(epochs),
        out_dir: dir.to_path_buf(),
        meta: serde_json::json!({}),
    };
    run.train(&phantoms(3), &[], start).unwrap().1
}

#[test]
fn resume_continues_the_same_run_bit_for_bit() {
    let (_, init) = LkmUnet::new(common::micro_config(), 5).unwrap();
    let fresh = || Start { params: init.clone(), momentum: Vec::new(), epoch: 0 };
    let straight = train_run(&temp_dir("straight"), 2, fresh());
    let half = temp_dir("half");
    train_run(&half, 1, fresh());
    let ck = checkpoint::load(&half.join("latest.safetensors")).unwrap();
    assert_eq!(ck.meta["epoch"], 1);
    let resumed = Start { params: ck.params_like(&init).unwrap(), momentum: ck.momentum_like(&init), epoch: 1 };
    assert!(resumed.momentum.iter().all(|m| m.is_some()), "the momentum of every trained parameter is saved");
    let resumed = train_run(&half, 2, resumed);
    for ((name, a), b) in init.names().iter().zip(straight.tensors()).zip(resumed.tensors()) {
        assert_eq!(a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap(), "{name} differs after resume");
    }
    let lines = std::fs::read_to_string(half.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2, "one metrics line per epoch across both runs");
}

#[test]
fn a_nan_loss_stops_training_with_a_clear_error() {
    let dir = temp_dir("nan");
    let (model, init) = LkmUnet::new(common::micro_config(), 5).unwrap();
    let opts = TrainOptions { lr: 1e30, ..options(3) };
    let run = Run { model: &model, device: Device::Cpu, opts, out_dir: dir.clone(), meta: serde_json::json!({}) };
    let err =
        run.train(&phantoms(3), &[], Start { params: init, momentum: Vec::new(), epoch: 0 }).err().expect("must fail");
    assert!(matches!(err, Error::NonFinite(_)), "{err}");
    assert!(err.to_string().contains("lower --lr"), "{err}");
}

/// A step whose input holds a NaN: the loss comes back NaN and the parameters and momentum are as they were (the
/// backward pass ran, but on the GPU clipping and SGD read from device memory that the step must not change anything).
fn a_nan_step_leaves_the_parameters_as_they_were(dev: &Device) {
    let cfg = common::micro_config();
    let (model, params) = LkmUnet::new(cfg.clone(), 5).unwrap();
    let mut params = params.to(DType::F32, dev).unwrap().deep_copy().unwrap();
    let before: Vec<Vec<f64>> = params.tensors().iter().map(|p| p.to_vec_f64().unwrap()).collect();
    let mut shape = vec![1, 1];
    shape.extend_from_slice(&cfg.patch);
    let x = Tensor::from_fn(&shape, DType::F32, |i| if i == 7 { f64::NAN } else { (i % 5) as f64 }).unwrap();
    let y = Tensor::from_fn(&[&[1, 1][..], &cfg.patch].concat(), DType::F32, |i| (i % 4) as f64).unwrap();
    let targets: Vec<Tensor> = cfg
        .output_sizes(&cfg.patch)
        .iter()
        .map(|s| downsample_labels(&y, s).unwrap().to_device(dev).unwrap())
        .collect();
    let mut sgd = lkm_engine::optim::Sgd::default();
    let x = x.to_device(dev).unwrap();
    let loss = lkm_engine::train::step::train_step(&model, &mut params, &mut sgd, &x, &targets, true, 12.0).unwrap();
    assert!(loss.is_nan(), "{loss}");
    for (p, b) in params.tensors().iter().zip(&before) {
        assert_eq!(&p.to_vec_f64().unwrap(), b);
    }
}
common::device_test!(a_nan_step_leaves_the_parameters_as_they_were);

#[test]
fn predict_writes_labels_on_the_input_grid() {
    let dir = temp_dir("predict");
    // Train briefly, then predict an image whose spacing differs from training (so it is resampled and back).
    let (model, init) = LkmUnet::new(common::micro_config(), 5).unwrap();
    let meta = serde_json::json!({"normalization": {"scheme": "zscore"}, "spacing": [1.5, 1.5, 1.5]});
    let run = Run { model: &model, device: Device::Cpu, opts: options(1), out_dir: dir.clone(), meta };
    run.train(&phantoms(3), &[], Start { params: init, momentum: Vec::new(), epoch: 0 }).unwrap();
    let case = phantom_dataset(&SynthConfig { cases: 1, shape: [10, 21, 17], seed: 9 }).remove(0);
    let header = header_for(case.shape, [2.0, 1.2, 1.4]).unwrap();
    let input = dir.join("img_0000.nii.gz");
    write_image(&input, &case.image, case.shape, &header).unwrap();
    let predictor = Predictor::from_checkpoint(&dir.join("latest.safetensors"), Device::Cpu, false).unwrap();
    let out = predictor.predict_files("img", std::slice::from_ref(&input), &dir.join("out")).unwrap();
    let (a, b) = (read_volume(&input).unwrap(), read_volume(&out).unwrap());
    assert_eq!(b.shape, a.shape);
    assert_eq!(b.affine, a.affine);
    assert!(b.to_labels().unwrap().iter().all(|&l| l < 4));
    // Two channel files for a one-channel model, and none at all: refused with the counts, nothing written.
    let twice = [input.clone(), input.clone()];
    for files in [&twice[..], &[]] {
        let err = predictor.predict_files("bad", files, &dir.join("bad")).expect_err("must fail");
        assert!(err.to_string().contains(&format!("case bad: {} channel file(s)", files.len())), "{err}");
    }
    assert!(!dir.join("bad").exists());
}

#[test]
fn a_volume_smaller_than_the_patch_is_zero_padded() {
    // nnU-Net pads such cases (a plan's patch, rounded up to its divisibility, can exceed the median case).
    let (model, init) = LkmUnet::new(common::micro_config(), 5).unwrap();
    let run = Run {
        model: &model,
        device: Device::Cpu,
        opts: options(1),
        out_dir: temp_dir("big-patch"),
        meta: serde_json::json!({}),
    };
    let small = phantoms_of([6, 20, 20], 2);
    let (records, _) = run.train(&small, &small[..1], Start { params: init, momentum: Vec::new(), epoch: 0 }).unwrap();
    assert!(records[0].train_loss.is_finite() && records[0].val_mean_dice.is_some(), "{:?}", records[0]);
}

#[test]
fn dump_step_writes_float32_and_float64_steps_that_agree() {
    let read = |dir: &std::path::Path| {
        let bytes = std::fs::read(dir.join("engine.safetensors")).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta: serde_json::Value = serde_json::from_str(&header.metadata().as_ref().unwrap()["lkm_engine"]).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let values = |name: &str| -> (safetensors::Dtype, Vec<f64>) {
            let t = st.tensor(name).unwrap();
            let v = match t.dtype() {
                safetensors::Dtype::F64 => bytemuck::pod_collect_to_vec::<u8, f64>(t.data()),
                _ => bytemuck::pod_collect_to_vec::<u8, f32>(t.data()).iter().map(|&x| x as f64).collect(),
            };
            (t.dtype(), v)
        };
        let grad = "grad.encoder.stem.convs.0.conv.weight";
        (meta["dtype"].as_str().unwrap().to_string(), values("loss"), values(grad))
    };
    let (d32, d64) = (temp_dir("dump32"), temp_dir("dump64"));
    for (dir, dtype) in [(&d32, DType::F32), (&d64, DType::F64)] {
        lkm_engine::train::dump::dump_step(common::micro_config(), 1, 7, &Device::Cpu, dtype, dir, 0).unwrap();
    }
    let (m32, l32, g32) = read(&d32);
    let (m64, l64, g64) = read(&d64);
    assert_eq!((m32.as_str(), m64.as_str()), ("float32", "float64"));
    assert_eq!((l32.0, g64.0), (safetensors::Dtype::F32, safetensors::Dtype::F64));
    assert!((l32.1[0] - l64.1[0]).abs() < 1e-5 * l64.1[0].abs(), "loss {} vs {}", l32.1[0], l64.1[0]);
    let diff: f64 = g32.1.iter().zip(&g64.1).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
    let norm: f64 = g64.1.iter().map(|b| b * b).sum::<f64>().sqrt();
    assert!(norm > 0.0 && diff < 1e-4 * norm, "stem gradient: float32 vs float64 {}", diff / norm);
}
