//! Data-parallel training, the parts that need no GPU: the `--devices`/`--gpus`/`--dist-env` flags and the rank
//! environment, the ranks' sampling seeds, the refusal to resume on another number of GPUs, the gradient buckets
//! (which parameters go in which bucket, each exactly once, the byte limit, the launch order) and the tape's
//! hand-over of final gradients during the backward pass that the buckets are launched from. The NCCL steps
//! themselves are in tests/gpu_distributed.rs.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use lkm_engine::autograd::Tape;
use lkm_engine::data::sampler::{ForegroundIndex, PatchSampler};
use lkm_engine::data::synth::{phantom_dataset, SynthConfig};
use lkm_engine::nn::LkmUnet;
use lkm_engine::tensor::TensorId;
use lkm_engine::train::distributed::{
    check_resume_world, parse_devices, plan_buckets, rank_seed, role, BucketTracker, DistFlags, RankSpec, Role,
};
use lkm_engine::train::dump::random_batch;
use lkm_engine::train::loader::BatchSource;
use lkm_engine::train::loss::{deep_supervision_loss, downsample_labels};
use lkm_engine::Tensor;

fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| map.get(k).cloned()
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn err(r: lkm_engine::Result<Role>) -> String {
    r.expect_err("an error").to_string()
}

#[test]
fn devices_flag_parses_gpus_and_names_itself_in_errors() {
    assert_eq!(parse_devices("cuda:0,cuda:1").unwrap(), [0, 1]);
    assert_eq!(parse_devices("cuda:3, cuda:1").unwrap(), [3, 1]);
    assert_eq!(parse_devices("cuda").unwrap(), [0]);
    for (bad, says) in [
        ("cpu", "--device cpu"),
        ("cuda:0,cpu", "not a GPU"),
        ("gpu0", "cuda:N"),
        ("cuda:-1", "cuda:N"),
        ("cuda:0,,cuda:1", "\"\" is not a GPU"),
        ("", "not a GPU"),
        ("cuda:1,cuda:1", "listed twice"),
    ] {
        let e = parse_devices(bad).unwrap_err().to_string();
        assert!(e.contains("--devices") && e.contains(says), "{bad:?}: {e}");
    }
}

#[test]
fn flags_give_each_process_its_role() {
    let devices = |d: &str| DistFlags { devices: Some(d.into()), ..DistFlags::default() };
    assert_eq!(role(&DistFlags::default(), &no_env).unwrap(), Role::Single(None));
    // One GPU is the single-GPU run, without NCCL.
    assert_eq!(role(&devices("cuda:2"), &no_env).unwrap(), Role::Single(Some(2)));
    assert_eq!(role(&DistFlags { gpus: Some(1), ..DistFlags::default() }, &no_env).unwrap(), Role::Single(Some(0)));
    assert_eq!(role(&devices("cuda:1,cuda:0"), &no_env).unwrap(), Role::Launcher(vec![1, 0]));
    assert_eq!(
        role(&DistFlags { gpus: Some(3), ..DistFlags::default() }, &no_env).unwrap(),
        Role::Launcher(vec![0, 1, 2])
    );
    // The processes the launcher starts: rank r trains on the r-th listed GPU.
    let child = DistFlags { rank: Some((1, 2, "ab".into())), ..devices("cuda:1,cuda:0") };
    assert_eq!(
        role(&child, &no_env).unwrap(),
        Role::Rank(RankSpec { rank: 1, world: 2, ordinal: 0, nccl_id: Some("ab".into()) })
    );
    let e = err(role(&DistFlags { rank: Some((2, 2, "ab".into())), ..devices("cuda:0,cuda:1") }, &no_env));
    assert!(e.contains("--rank 2 --world-size 2"), "{e}");
    let e = err(role(&DistFlags { gpus: Some(0), ..DistFlags::default() }, &no_env));
    assert!(e.contains("--gpus must be at least 1"), "{e}");
    let e = err(role(&DistFlags { gpus: Some(2), ..devices("cuda:0") }, &no_env));
    assert!(e.contains("--devices and --gpus"), "{e}");
}

#[test]
fn dist_env_reads_torchrun_variables_and_needs_nccl_comm_id() {
    let flags = DistFlags { dist_env: true, ..DistFlags::default() };
    let full = [("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("NCCL_COMM_ID", "10.0.0.1:29600")];
    assert_eq!(
        role(&flags, &env_of(&full)).unwrap(),
        Role::Rank(RankSpec { rank: 3, world: 4, ordinal: 1, nccl_id: None })
    );
    for (vars, says) in [
        (&full[1..], "needs RANK"),
        (&[("RANK", "0"), ("LOCAL_RANK", "0"), ("NCCL_COMM_ID", "h:1")][..], "needs WORLD_SIZE"),
        (&[("RANK", "0"), ("WORLD_SIZE", "1"), ("NCCL_COMM_ID", "h:1")][..], "needs LOCAL_RANK"),
        (&[("RANK", "x"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("NCCL_COMM_ID", "h:1")][..], "RANK=\"x\""),
        (&[("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("NCCL_COMM_ID", "h:1")][..], "below WORLD_SIZE"),
        (&full[..3], "NCCL_COMM_ID=HOST:PORT"),
    ] {
        let e = err(role(&flags, &env_of(vars)));
        assert!(e.contains(says), "{vars:?}: {e}");
    }
    let e = err(role(&DistFlags { gpus: Some(2), ..flags }, &env_of(&full)));
    assert!(e.contains("--dist-env takes the GPU from LOCAL_RANK"), "{e}");
}

#[test]
fn rank_zero_samples_the_single_gpu_batches_and_other_ranks_their_own() {
    assert_eq!(rank_seed(12345, 0), 12345);
    let seeds: Vec<u64> = (0..8).map(|r| rank_seed(12345, r)).collect();
    for (i, a) in seeds.iter().enumerate() {
        assert!(seeds[i + 1..].iter().all(|b| a != b), "rank seeds collide: {seeds:?}");
    }
    assert_ne!(rank_seed(1, 1), rank_seed(2, 1), "the rank seed depends on the run's seed");
    // The batches drawn from them: rank 0's are the single-GPU run's, rank 1's differ, and each is reproducible.
    let mut cases = phantom_dataset(&SynthConfig { cases: 2, shape: [12, 20, 20], seed: 3 });
    for c in &mut cases {
        lkm_engine::data::normalize::normalize_case(c, &lkm_engine::data::normalize::Normalization::ZScore).unwrap();
    }
    let fg: Vec<ForegroundIndex> = cases.iter().map(|c| ForegroundIndex::new(c, 4)).collect();
    let source = |seed| BatchSource {
        sampler: PatchSampler { patch: vec![8, 16, 16], fg_fraction: 1.0 / 3.0, augment: true, mirror: true },
        cases: &cases,
        foreground: &fg,
        batch: 2,
        seed,
        iters_per_epoch: 5,
        target_sizes: vec![vec![8, 16, 16], vec![4, 8, 8]],
    };
    let image = |seed, it| source(seed).batch(1, it).unwrap().image.to_vec_f32().unwrap();
    assert_eq!(image(rank_seed(7, 0), 3), image(7, 3));
    assert_ne!(image(rank_seed(7, 1), 3), image(7, 3));
    assert_eq!(image(rank_seed(7, 1), 3), image(rank_seed(7, 1), 3));
}

#[test]
fn resume_needs_the_same_number_of_gpus() {
    let ck = Path::new("runs/x/latest.safetensors");
    check_resume_world(None, 1, ck).unwrap();
    check_resume_world(Some(2), 2, ck).unwrap();
    let e = check_resume_world(Some(2), 1, ck).unwrap_err().to_string();
    assert!(e.contains("trained on 2 GPU(s)") && e.contains("--gpus 2") && e.contains("runs/x"), "{e}");
    let e = check_resume_world(None, 4, ck).unwrap_err().to_string();
    assert!(e.contains("trained on 1 GPU(s)") && e.contains("without --devices/--gpus"), "{e}");
}

/// Checks the invariants of a bucket plan of `ready` (parameter indices) with `bytes` and `limit`.
fn check_plan(ready: &[usize], bytes: &[usize], limit: usize) -> Vec<Vec<usize>> {
    let buckets = plan_buckets(ready, bytes, limit);
    // Concatenated, the buckets are the ready order: each parameter exactly once, in order.
    let flat: Vec<usize> = buckets.iter().flat_map(|b| b.params.iter().copied()).collect();
    assert_eq!(flat, ready);
    for (i, b) in buckets.iter().enumerate() {
        assert!(!b.params.is_empty(), "bucket {i} is empty");
        assert_eq!(b.bytes, b.params.iter().map(|&p| bytes[p]).sum::<usize>(), "bucket {i}'s bytes");
        assert!(b.bytes <= limit || b.params.len() == 1, "bucket {i} over the limit: {b:?}");
        // Greedy: the next bucket's first parameter did not fit into this one.
        if let Some(next) = buckets.get(i + 1) {
            assert!(b.bytes + bytes[next.params[0]] > limit, "bucket {i} closed early: {b:?}, {next:?}");
        }
    }
    // The tracker completes the buckets in launch order, each once, as their parameters become final in turn.
    let mut tracker = BucketTracker::new(&buckets, bytes.len());
    let launched: Vec<usize> = ready.iter().filter_map(|&p| tracker.finalise(p)).collect();
    assert_eq!(launched, (0..buckets.len()).collect::<Vec<_>>());
    assert_eq!(tracker.finalise(ready[0]), None, "a parameter finalised twice launches nothing");
    buckets.into_iter().map(|b| b.params).collect()
}

#[test]
fn buckets_follow_the_ready_order_within_the_byte_limit() {
    let bytes = [400, 100, 100, 300, 2000, 50, 50];
    let ready = [6, 5, 4, 3, 2, 1, 0];
    assert_eq!(check_plan(&ready, &bytes, 500), [vec![6, 5], vec![4], vec![3, 2, 1], vec![0]]);
    // One bucket when everything fits, one per parameter when nothing pairs.
    assert_eq!(check_plan(&ready, &bytes, 1 << 20), [vec![6, 5, 4, 3, 2, 1, 0]]);
    assert_eq!(check_plan(&ready, &bytes, 1).len(), 7);
    // Parameters left out of the ready order (no node uses them) are in no bucket and launch nothing.
    assert_eq!(check_plan(&[3, 1], &bytes, 450), [vec![3, 1]]);
    let mut tracker = BucketTracker::new(&plan_buckets(&[3, 1], &bytes, 450), bytes.len());
    assert_eq!(tracker.finalise(0), None);
    assert!(plan_buckets(&[], &bytes, 10).is_empty());
}

/// One forward pass of the micro model on the CPU, recorded on a tape: (tape, loss, params).
fn recorded_step() -> (Tape, Tensor, lkm_engine::nn::Params) {
    let config = common::micro_config();
    let (model, params) = LkmUnet::new(config.clone(), 5).unwrap();
    let (x, labels) = random_batch(&config, 1, 6).unwrap();
    let mut tape = Tape::new();
    params.watch(&mut tape);
    let outputs = model.forward(&mut tape, &params, &x).unwrap();
    let targets: Vec<Tensor> = outputs.iter().map(|o| downsample_labels(&labels, &o.shape()[2..]).unwrap()).collect();
    let loss = deep_supervision_loss(&mut tape, &outputs, &targets, true).unwrap();
    (tape, loss, params)
}

#[test]
fn the_tape_hands_over_each_final_gradient_once_in_its_announced_order() {
    let (mut tape, loss, params) = recorded_step();
    let order = tape.leaves_in_final_order();
    let ids: Vec<TensorId> = params.tensors().iter().map(Tensor::id).collect();
    assert_eq!(order.len(), params.len(), "every parameter of the model is used by some node");
    let mut sorted = order.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), order.len(), "a parameter announced twice");
    assert!(order.iter().all(|id| ids.contains(id)));
    let mut handed = Vec::new();
    let rest = tape
        .backward_notify(&loss, &mut |id, g| {
            handed.push((id, g));
            Ok(())
        })
        .unwrap();
    assert!(rest.is_empty(), "every gradient was handed over");
    assert_eq!(handed.iter().map(|(id, _)| *id).collect::<Vec<_>>(), order, "handed over in the announced order");
    // Handed over when final: the same bits as the plain backward pass's complete gradients.
    let (mut tape, loss, params) = recorded_step();
    let mut full = tape.backward(&loss).unwrap();
    let position: HashMap<TensorId, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut present = 0;
    for (id, g) in &handed {
        let reference = full.take(&params.tensors()[position[id]]);
        match (g, reference) {
            (Some(g), Some(r)) => {
                assert_eq!(g.to_vec_f64().unwrap(), r.to_vec_f64().unwrap());
                present += 1;
            }
            (None, None) => {}
            (g, r) => panic!("gradient presence differs: handed {}, plain {}", g.is_some(), r.is_some()),
        }
    }
    assert!(present > params.len() / 2, "{present} of {} parameters have a gradient", params.len());
    // The decoder's last head is used last in the forward pass, so its gradient is among the first final; the stem
    // is used first, so its gradient is final last.
    let name = |id: &TensorId| params.names()[position[id]].clone();
    assert!(name(order.last().unwrap()).starts_with("encoder.stem"), "{}", name(order.last().unwrap()));
    assert!(name(&order[0]).starts_with("decoder.seg_layers"), "{}", name(&order[0]));
}

#[test]
fn model_buckets_hold_every_parameter_once_within_the_limit() {
    let (tape, _, params) = recorded_step();
    let position: HashMap<TensorId, usize> = params.tensors().iter().enumerate().map(|(i, t)| (t.id(), i)).collect();
    let ready: Vec<usize> = tape.leaves_in_final_order().iter().map(|id| position[id]).collect();
    let bytes: Vec<usize> = params.tensors().iter().map(|t| t.numel() * 4).collect();
    let total: usize = bytes.iter().sum();
    for limit in [1, 256, 4096, total / 3, total] {
        let buckets = check_plan(&ready, &bytes, limit);
        let mut all: Vec<usize> = buckets.concat();
        all.sort_unstable();
        assert_eq!(all, (0..params.len()).collect::<Vec<_>>(), "limit {limit}: each parameter exactly once");
    }
}

fn engine(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lkm-engine")).args(args).output().expect("run lkm-engine");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn train_refuses_bad_gpu_flags_before_doing_anything() {
    let dir = std::env::temp_dir().join(format!("lkm-dist-cli-{}", std::process::id()));
    let out = dir.to_str().unwrap();
    for (args, says) in [
        (&["--devices", "cpu"][..], "--devices \"cpu\""),
        (&["--devices", "cuda:0,cuda:0"][..], "listed twice"),
        (&["--devices", "0,1"][..], "cuda:N"),
        (&["--gpus", "0"][..], "--gpus must be at least 1"),
        (&["--gpus", "2", "--devices", "cuda:0,cuda:1"][..], "--gpus"),
        (&["--gpus", "2", "--device", "cpu"][..], "--device"),
        (&["--gpus", "2", "--epochs", "0"][..], "--epochs must be at least 1"),
        (&["--dist-env", "--gpus", "2"][..], "--dist-env"),
    ] {
        let mut all = vec!["train", "--out", out, "--no-progress"];
        all.extend_from_slice(args);
        let (ok, stderr) = engine(&all);
        assert!(!ok && stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(!dir.exists(), "a refused run leaves no folder");
}

#[test]
fn several_gpus_without_nccl_say_how_to_provide_it() {
    if lkm_engine::train::distributed::check_nccl().is_ok() {
        println!("NCCL is loadable here; the missing-NCCL message is not exercised");
        return;
    }
    let dir = std::env::temp_dir().join(format!("lkm-dist-nccl-{}", std::process::id()));
    let (ok, stderr) = engine(&["train", "--gpus", "2", "--out", dir.to_str().unwrap()]);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("NCCL could not be loaded") && stderr.contains("LD_LIBRARY_PATH"), "{stderr}");
    assert!(stderr.contains("nvidia/nccl/lib/libnccl.so.2"), "{stderr}");
    assert!(!dir.exists());
}
