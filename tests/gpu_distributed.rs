//! Data-parallel training through NCCL on real GPUs (ignored: they need a CUDA GPU, and NCCL loadable as libnccl.so,
//! README "Several GPUs"; run them with NCCL_NVLS_ENABLE=0 on the lent machines).
//!
//! - A world of one through NCCL takes exactly the step of the single-GPU path, bit for bit: the averages over one
//!   rank are copies (ncclAvg over one rank multiplies by 1/1 = 1, exact), the loss and gradient kernels are
//!   deterministic (no float atomics), and clipping and SGD then see the same bits.
//! - On two GPUs, the averaged gradients are the mean of the two ranks' own gradients (relative error under 1e-6:
//!   the same float32 sum, (a + b) / 2, but NCCL may form it as a/2 + b/2, which rounds alike save for subnormals),
//!   and after 10 steps on different batches, from different initial weights that rank 0's broadcast overwrites, both
//!   ranks hold the same weights bit for bit. Skipped, saying so, where fewer than 2 GPUs are visible.
//! - The command line on two GPUs (one process per GPU, started by `--gpus 2`, and two processes started by hand with
//!   `--dist-env` as torchrun would, meeting at NCCL_COMM_ID): rank 0 alone writes the run folder, the checkpoint
//!   records the number of GPUs, and `--resume` continues with 2 GPUs and refuses 1.

mod common;

use std::process::Command;
use std::sync::Arc;

use lkm_engine::autograd::Tape;
use lkm_engine::device::{Device, Gpu};
use lkm_engine::nn::{LkmUnet, ModelConfig, Params};
use lkm_engine::optim::Sgd;
use lkm_engine::tensor::DType;
use lkm_engine::train::distributed::{NcclId, Replica};
use lkm_engine::train::dump::random_batch;
use lkm_engine::train::loss::{deep_supervision_loss, downsample_labels};
use lkm_engine::train::step::{replica_step, train_step, StepInput};
use lkm_engine::Tensor;

/// A device batch of `config` (seed `seed`) with its labels at every output's resolution.
fn device_batch(config: &ModelConfig, gpu: &Arc<Gpu>, seed: u64) -> (Tensor, Vec<Tensor>) {
    let device = Device::Cuda(gpu.clone());
    let (x, labels) = random_batch(config, 2, seed).unwrap();
    let targets = config
        .output_sizes(&config.patch)
        .iter()
        .map(|s| downsample_labels(&labels, s).unwrap().to_device(&device).unwrap())
        .collect();
    (x.to_device(&device).unwrap(), targets)
}

fn host(params: &Params) -> Vec<Vec<f32>> {
    params.tensors().iter().map(|t| t.to_vec_f32().unwrap()).collect()
}

fn on_gpu(params: &Params, gpu: &Arc<Gpu>) -> Params {
    params.to(DType::F32, &Device::Cuda(gpu.clone())).unwrap().deep_copy().unwrap()
}

fn nccl_id() -> NcclId {
    NcclId::new().unwrap_or_else(|e| panic!("this test needs NCCL: {e}"))
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL"]
fn a_world_of_one_through_nccl_takes_the_single_gpu_step_bit_for_bit() {
    let gpu = common::tf32_gpu();
    let config = common::micro_config();
    let (model, fresh) = LkmUnet::new(config.clone(), 11).unwrap();
    // Small buckets, so that the step launches many all-reduces while its backward pass runs.
    let replica = Replica::new(&gpu, 0, 1, &nccl_id()).unwrap().with_bucket_bytes(4096);
    let (mut plain, mut replicated) = (on_gpu(&fresh, &gpu), on_gpu(&fresh, &gpu));
    replica.broadcast_params(&mut replicated).unwrap();
    let (mut sgd_plain, mut sgd_replicated) = (Sgd::new(1e-2, 0.99, 3e-5), Sgd::new(1e-2, 0.99, 3e-5));
    // Three steps, so that the momentum buffers carry the gradients forward too.
    for step in 0..3 {
        let (x, targets) = device_batch(&config, &gpu, 40 + step);
        let a = train_step(&model, &mut plain, &mut sgd_plain, &x, &targets, true, 12.0).unwrap();
        let input = StepInput { model: &model, x: &x, targets: &targets, batch_dice: true, grad_clip: 12.0 };
        let b = replica_step(&input, &mut replicated, &mut sgd_replicated, Some(&replica)).unwrap();
        assert_eq!(a.to_bits(), b.to_bits(), "step {step}: loss {a} without NCCL, {b} through NCCL");
    }
    let (p, r) = (host(&plain), host(&replicated));
    assert_ne!(p, host(&fresh), "the steps changed the weights");
    for ((name, a), b) in plain.names().iter().zip(&p).zip(&r) {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{name} differs after 3 steps through NCCL with one rank");
    }
}

/// What one rank of the two-GPU test reports: its own and the averaged gradients of one batch, the losses and the
/// weights after its steps.
struct RankRun {
    local: Vec<Option<Vec<f32>>>,
    averaged: Vec<Option<Vec<f32>>>,
    losses: Vec<f64>,
    weights: Vec<Vec<f32>>,
}

fn rank_run(rank: usize, id_hex: &str, steps: usize) -> RankRun {
    let gpu = Gpu::new(rank).unwrap();
    let config = common::micro_config();
    // Each rank builds other weights: the broadcast from rank 0 must make them equal.
    let (model, fresh) = LkmUnet::new(config.clone(), 100 + rank as u64).unwrap();
    let replica = Replica::new(&gpu, rank, 2, &NcclId::from_hex(id_hex).unwrap()).unwrap().with_bucket_bytes(8192);
    let mut params = on_gpu(&fresh, &gpu);
    replica.broadcast_params(&mut params).unwrap();
    // One batch's gradients, the rank's own (plain backward pass) and averaged over the ranks.
    let (x, targets) = device_batch(&config, &gpu, 7 + rank as u64);
    let gradients = |replica: Option<&Replica>| -> Vec<Option<Vec<f32>>> {
        let mut tape = Tape::new();
        params.watch(&mut tape);
        let outputs = model.forward(&mut tape, &params, &x).unwrap();
        let loss = deep_supervision_loss(&mut tape, &outputs, &targets, true).unwrap();
        drop(outputs);
        let grads: Vec<Option<Tensor>> = match replica {
            Some(r) => r.backward(&mut tape, &loss, &params).unwrap(),
            None => {
                let mut g = tape.backward(&loss).unwrap();
                params.tensors().iter().map(|p| g.take(p)).collect()
            }
        };
        grads.iter().map(|g| g.as_ref().map(|g| g.to_vec_f32().unwrap())).collect()
    };
    let local = gradients(None);
    let averaged = gradients(Some(&replica));
    let mut sgd = Sgd::new(1e-2, 0.99, 3e-5);
    let mut losses = Vec::new();
    for step in 0..steps {
        // Each rank its own batches, as in training.
        let (x, targets) = device_batch(&config, &gpu, 1000 + 10 * step as u64 + rank as u64);
        let input = StepInput { model: &model, x: &x, targets: &targets, batch_dice: true, grad_clip: 12.0 };
        losses.push(replica_step(&input, &mut params, &mut sgd, Some(&replica)).unwrap());
    }
    RankRun { local, averaged, losses, weights: host(&params) }
}

/// Whether GPU 1 exists; says so when not.
fn two_gpus() -> bool {
    match Gpu::new(1) {
        Ok(_) => true,
        Err(e) => {
            println!("SKIPPED: this test needs 2 GPUs ({e}); nothing was checked");
            false
        }
    }
}

#[test]
#[ignore = "needs 2 CUDA GPUs and NCCL"]
fn two_gpus_average_gradients_and_keep_identical_weights_for_10_steps() {
    if !two_gpus() {
        return;
    }
    let id = nccl_id().to_hex();
    let runs: Vec<RankRun> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn({
                    let id = id.clone();
                    move || rank_run(rank, &id, 10)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    });
    let (r0, r1) = (&runs[0], &runs[1]);
    for (p, ((a0, a1), (l0, l1))) in
        r0.averaged.iter().zip(&r1.averaged).zip(r0.local.iter().zip(&r1.local)).enumerate()
    {
        match (a0, a1, l0, l1) {
            (Some(a0), Some(a1), Some(l0), Some(l1)) => {
                assert_eq!(a0, a1, "parameter {p}: the ranks' averaged gradients differ");
                assert_ne!(l0, l1, "parameter {p}: the ranks' own gradients are equal; their batches should differ");
                let mean: Vec<f64> = l0.iter().zip(l1).map(|(a, b)| (*a as f64 + *b as f64) / 2.0).collect();
                let got: Vec<f64> = a0.iter().map(|&v| v as f64).collect();
                common::assert_rel_err(&format!("parameter {p}: averaged gradient vs the mean"), &got, &mean, 1e-6);
            }
            (None, None, None, None) => {}
            _ => panic!("parameter {p}: gradient presence differs between ranks or paths"),
        }
    }
    assert_eq!(r0.losses, r1.losses, "both ranks read the same averaged losses");
    assert!(r0.losses.iter().all(|l| l.is_finite()), "{:?}", r0.losses);
    for (p, (w0, w1)) in r0.weights.iter().zip(&r1.weights).enumerate() {
        let same = w0.iter().zip(w1).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "parameter {p} differs between the ranks after 10 steps");
    }
}

/// The `lkm-engine` binary: cargo's build of it, or, in the folder `tools/gpu-pack.sh` carries to a GPU machine
/// (`.gpu/tests/THIS_TEST` beside `.gpu/lkm-engine`), the packed one.
fn engine_bin() -> std::path::PathBuf {
    let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_lkm-engine"));
    if built.exists() {
        return built;
    }
    let exe = std::env::current_exe().unwrap();
    let packed = exe.parent().and_then(|d| d.parent()).map(|d| d.join("lkm-engine"));
    packed
        .filter(|p| p.exists())
        .unwrap_or_else(|| panic!("no lkm-engine binary at {} nor beside {}", built.display(), exe.display()))
}

fn engine(args: &[&str], env: &[(&str, String)]) -> std::process::Child {
    Command::new(engine_bin()).args(args).envs(env.iter().cloned()).spawn().expect("start")
}

fn run_ok(args: &[&str]) -> (bool, String) {
    let out = Command::new(engine_bin()).args(args).output().expect("run lkm-engine");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
#[ignore = "needs 2 CUDA GPUs and NCCL"]
fn train_on_two_gpus_writes_once_and_resumes_only_on_two() {
    if !two_gpus() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("lkm-gpu-dist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("run");
    let out_s = out.to_str().unwrap();
    let small = ["--synth-cases", "6", "--iters", "4", "--no-progress"];
    let mut args = vec!["train", "--gpus", "2", "--epochs", "1", "--out", out_s];
    args.extend_from_slice(&small);
    let (ok, stderr) = run_ok(&args);
    assert!(ok, "{stderr}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "one epoch, one line (rank 0 alone writes): {metrics}");
    let ck = lkm_engine::train::checkpoint::load(&out.join("latest.safetensors")).unwrap();
    assert_eq!(ck.meta["run"]["world_size"], 2, "{}", ck.meta["run"]);
    let ck_path = out.join("latest.safetensors");
    let ck_s = ck_path.to_str().unwrap();
    // Another number of GPUs is refused, before any rank starts.
    let (ok, stderr) = run_ok(&["train", "--resume", ck_s, "--epochs", "2", "--device", "cuda:0", "--no-progress"]);
    assert!(!ok && stderr.contains("trained on 2 GPU(s)") && stderr.contains("--gpus 2"), "{stderr}");
    let (ok, stderr) = run_ok(&["train", "--resume", ck_s, "--epochs", "2", "--gpus", "2", "--no-progress"]);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);

    // The same run's first epoch as torchrun would start it: two processes with RANK, WORLD_SIZE, LOCAL_RANK, meeting
    // through NCCL's bootstrap at NCCL_COMM_ID. It trains the same batches (rank seeds), so it must write the same
    // first-epoch loss.
    let env_out = dir.join("env");
    let env_s = env_out.to_str().unwrap();
    let port = 29_000 + std::process::id() % 1000;
    let mut ranks: Vec<_> = (0..2)
        .map(|r| {
            let env = [
                ("RANK", r.to_string()),
                ("WORLD_SIZE", "2".to_string()),
                ("LOCAL_RANK", r.to_string()),
                ("NCCL_COMM_ID", format!("127.0.0.1:{port}")),
            ];
            let mut args = vec!["train", "--dist-env", "--epochs", "1", "--out", env_s];
            args.extend_from_slice(&small);
            engine(&args, &env)
        })
        .collect();
    for (r, child) in ranks.iter_mut().enumerate() {
        assert!(child.wait().unwrap().success(), "rank {r} of the --dist-env run failed");
    }
    let loss = |path: &std::path::Path| -> f64 {
        let text = std::fs::read_to_string(path.join("metrics.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        first["train_loss"].as_f64().unwrap()
    };
    assert_eq!(loss(&env_out), loss(&out), "--dist-env and --gpus 2 train the same first epoch");
    let _ = std::fs::remove_dir_all(&dir);
}
