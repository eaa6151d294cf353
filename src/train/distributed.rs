//! Data-parallel training on several GPUs through NCCL: every GPU holds a replica of the weights, trains on its own
//! batches, and the replicas average their gradients before each update, so that they stay identical.
//!
//! For `W` replicas with local losses `L_r` (each the loss of its own batch of `b` patches), the update uses
//!
//! ```text
//!   g = (1/W) sum_r dL_r/dw          (NCCL all-reduce with ncclAvg, of every parameter's gradient)
//! ```
//!
//! the gradient of the mean loss over a global batch of `W b` patches, as PyTorch's DistributedDataParallel does;
//! `--batch` is the batch of one GPU. Clipping and SGD then run on every replica with the same `g`, and NCCL's
//! all-reduce hands every rank the same bits (each chunk is reduced once and then copied to every rank), so the
//! weights stay bit for bit identical without being broadcast again.
//!
//! # One process per GPU
//!
//! `train --devices cuda:0,cuda:1` (or `--gpus 2`) starts one `lkm-engine` process per GPU ([`launch_local`]) and
//! waits for them; the processes meet through NCCL's bootstrap with an id the launcher made. One process per GPU
//! rather than one thread per GPU because:
//! - the same rank process serves a run on one host and a run over several hosts started by torchrun or a batch
//!   system (`--dist-env`, below): there is one code path to test;
//! - a rank that fails (out of memory, a bad file) exits, and the launcher stops the others; a thread blocked in an
//!   NCCL collective cannot be stopped from another thread without aborting the communicator under it;
//! - the CUDA driver serialises some calls per process (allocations, launches), which costs an engine that launches
//!   thousands of small kernels per step when several GPUs share one process.
//!
//! The price is that every process prepares the data itself (reads and resamples the dataset, or generates the
//! phantoms); that is done once per run and costs memory, not step time.
//!
//! # Several hosts
//!
//! With `--dist-env` a process is one rank of a run started by another launcher: its rank, the number of ranks and
//! its GPU come from `RANK`, `WORLD_SIZE` and `LOCAL_RANK`, as torchrun sets them, and the ranks meet through NCCL's
//! own bootstrap at `NCCL_COMM_ID=host:port` (the address of rank 0's host and a free port), which the user sets:
//! NCCL then derives the same id in every process and rank 0 listens at that address. The engine never sets an NCCL
//! variable; a user's `NCCL_*` settings reach NCCL as they are.
//!
//! # Data
//!
//! Rank `r` draws the batch of (epoch, iteration) from the generator of (`rank_seed(seed, r)`, epoch, iteration)
//! ([`rank_seed`], [`super::loader::iteration_rng`]): rank 0's stream is the single-GPU run's, and every rank's
//! batches are a fixed function of those numbers, so a run is reproducible for a given number of GPUs (and resumes
//! bit for bit with that number; [`check_resume_world`] refuses another).
//!
//! # Overlap with the backward pass
//!
//! A parameter's gradient is final once the backward pass has run the first node of the forward pass that used it
//! ([`Tape::backward_notify`]). The parameters are grouped in that order into buckets of at most
//! [`DEFAULT_BUCKET_BYTES`] ([`plan_buckets`]); when the last gradient of a bucket is final ([`BucketTracker`]), the
//! bucket's all-reduces are queued, as one NCCL group, on a second stream that waits for the compute stream's work so
//! far, and the backward pass goes on queueing kernels on the compute stream meanwhile. Before clipping, the compute
//! stream waits for the communication stream. Each gradient is reduced into a new buffer rather than in place, since
//! an op's backward may hand the same tensor to a parameter and to another input (an addition's gradient), and that
//! other gradient is still in use.
//!
//! Only rank 0 writes: the checkpoint, `metrics.jsonl`, `progress.png` and the environment record; it also runs the
//! validation, while the other ranks wait for it in the next step's first collective.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cudarc::driver::CudaStream;
use cudarc::nccl::{group_end, group_start, Comm, Id, ReduceOp};

use crate::autograd::Tape;
use crate::device::cuda::driver_err;
use crate::device::Gpu;
use crate::nn::Params;
use crate::tensor::{Storage, Tensor};
use crate::{bail, ensure, Error, Result};

/// The gradient bytes one all-reduce launch carries at most (PyTorch DDP's default bucket, 25 MiB): large enough that
/// NCCL runs near its bandwidth, small enough that the first buckets start while most of the backward pass is left.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// Parses `--devices`: GPUs as `cuda:N` (or `cuda` for GPU 0), comma-separated, each once. Returns the ordinals.
pub fn parse_devices(spec: &str) -> Result<Vec<usize>> {
    let mut ordinals = Vec::new();
    for item in spec.split(',').map(str::trim) {
        let ordinal = match item {
            "cuda" => Some(0),
            s => s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()),
        };
        let Some(n) = ordinal else {
            let hint = if matches!(item, "cpu" | "auto") {
                "--devices lists GPUs; train on the CPU with --device cpu"
            } else {
                "write GPUs as cuda:N, comma-separated, e.g. --devices cuda:0,cuda:1"
            };
            bail!(Config, "--devices {spec:?}: {item:?} is not a GPU; {hint}");
        };
        ensure!(
            !ordinals.contains(&n),
            Config,
            "--devices {spec:?}: cuda:{n} is listed twice; each GPU runs one replica (NCCL refuses two ranks on one GPU)"
        );
        ordinals.push(n);
    }
    Ok(ordinals)
}

/// How a `train` process takes part in a run.
#[derive(Clone, Debug, PartialEq)]
pub enum Role {
    /// One device, no NCCL: the GPU of a one-GPU `--devices`/`--gpus` (`Some(ordinal)`), else `--device`.
    Single(Option<usize>),
    /// Start one rank process per GPU and wait for them; this process trains nothing.
    Launcher(Vec<usize>),
    /// Train as one rank.
    Rank(RankSpec),
}

/// One rank of a data-parallel run.
#[derive(Clone, Debug, PartialEq)]
pub struct RankSpec {
    /// This process's rank, 0 to `world - 1`; rank 0 writes the run folder.
    pub rank: usize,
    /// The number of ranks (GPUs) in the run.
    pub world: usize,
    /// The GPU this rank trains on.
    pub ordinal: usize,
    /// The NCCL id in hex, as the local launcher made it; `None`: NCCL derives it from `NCCL_COMM_ID` (`--dist-env`).
    pub nccl_id: Option<String>,
}

/// The distributed flags of `train`, as given.
#[derive(Clone, Debug, Default)]
pub struct DistFlags {
    /// `--devices`.
    pub devices: Option<String>,
    /// `--gpus`.
    pub gpus: Option<usize>,
    /// `--dist-env`.
    pub dist_env: bool,
    /// The launcher's hidden `--rank`, `--world-size` and `--nccl-id` for the processes it starts.
    pub rank: Option<(usize, usize, String)>,
}

/// The role the flags give this process; `env` reads an environment variable (`--dist-env` reads `RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK` and checks that `NCCL_COMM_ID` is set). Every error names the flag or variable.
pub fn role(flags: &DistFlags, env: &dyn Fn(&str) -> Option<String>) -> Result<Role> {
    let ordinals = match (&flags.devices, flags.gpus) {
        (Some(_), Some(_)) => bail!(Config, "--devices and --gpus both choose the GPUs; give one of them"),
        (Some(spec), None) => Some(parse_devices(spec)?),
        (None, Some(0)) => bail!(Config, "--gpus must be at least 1, got 0"),
        (None, Some(n)) => Some((0..n).collect()),
        (None, None) => None,
    };
    if flags.dist_env {
        ensure!(
            ordinals.is_none(),
            Config,
            "--dist-env takes the GPU from LOCAL_RANK; leave out --devices and --gpus (start one process per GPU)"
        );
        let var = |name: &str| -> Result<usize> {
            let value = env(name).ok_or_else(|| {
                Error::Config(format!(
                    "--dist-env needs {name} in the environment (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK)"
                ))
            })?;
            value.trim().parse().map_err(|_| {
                Error::Config(format!("{name}={value:?} (for --dist-env) is not a non-negative whole number"))
            })
        };
        let (rank, world, local) = (var("RANK")?, var("WORLD_SIZE")?, var("LOCAL_RANK")?);
        ensure!(world >= 1, Config, "WORLD_SIZE=0 (for --dist-env): a run needs at least one rank");
        ensure!(rank < world, Config, "RANK={rank} (for --dist-env) must be below WORLD_SIZE={world}");
        ensure!(
            env("NCCL_COMM_ID").is_some_and(|v| !v.trim().is_empty()),
            Config,
            "--dist-env needs NCCL_COMM_ID=HOST:PORT in every rank's environment: the address of rank 0's host and a \
             free port (not torchrun's MASTER_PORT, which its store holds), e.g. NCCL_COMM_ID=$MASTER_ADDR:29600; \
             NCCL's bootstrap meets there, and lkm-engine does not set NCCL variables itself"
        );
        return Ok(Role::Rank(RankSpec { rank, world, ordinal: local, nccl_id: None }));
    }
    match (ordinals, &flags.rank) {
        (None, Some(_)) => bail!(Config, "--rank is set by the launcher of --devices/--gpus; it needs one of them"),
        (None, None) => Ok(Role::Single(None)),
        (Some(o), None) if o.len() == 1 => Ok(Role::Single(Some(o[0]))),
        (Some(o), None) => Ok(Role::Launcher(o)),
        (Some(o), Some((rank, world, id))) => {
            ensure!(
                *world == o.len() && *rank < *world,
                Config,
                "--rank {rank} --world-size {world} does not fit the {} GPUs of --devices/--gpus",
                o.len()
            );
            Ok(Role::Rank(RankSpec { rank: *rank, world: *world, ordinal: o[*rank], nccl_id: Some(id.clone()) }))
        }
    }
}

/// The sampling seed of rank `rank`: the run's seed for rank 0 (so rank 0 draws the single-GPU run's batches), an
/// unrelated seed (splitmix64 of the seed and the rank) for the others.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        return seed;
    }
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    mix(mix(seed) ^ mix(rank as u64 ^ 0xD157_0000_0000_0000))
}

/// Checks that a run resumed on `world` GPUs was trained on as many (`recorded`: the checkpoint's `world_size`, absent
/// in single-GPU checkpoints). Each GPU draws its own batches, so another number would continue another run.
pub fn check_resume_world(recorded: Option<u64>, world: usize, ck: &Path) -> Result<()> {
    let recorded = recorded.unwrap_or(1) as usize;
    if recorded == world {
        return Ok(());
    }
    let how = if recorded == 1 {
        "resume without --devices/--gpus (or with one GPU)".to_string()
    } else {
        format!("resume with --gpus {recorded} (or --devices listing {recorded} GPUs)")
    };
    bail!(
        Config,
        "{} was trained on {recorded} GPU(s) and this run would use {world}: each GPU draws its own batches, so \
         another number of GPUs would not continue the same run; {how}, or start a new run",
        ck.display()
    )
}

/// One all-reduce launch: the parameters (indices into [`Params`]) whose gradients it carries, in the order they
/// become final, and their bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Parameter indices.
    pub params: Vec<usize>,
    /// Their gradients' bytes.
    pub bytes: usize,
}

/// Groups the parameters, in the order their gradients become final (`ready_order`), into consecutive buckets of at
/// most `limit` bytes (`bytes[p]` per parameter); a parameter larger than `limit` gets a bucket of its own. Bucket
/// k's last gradient is final before bucket k + 1's, so the buckets launch in index order.
pub fn plan_buckets(ready_order: &[usize], bytes: &[usize], limit: usize) -> Vec<Bucket> {
    let mut buckets = Vec::new();
    let mut current = Bucket { params: Vec::new(), bytes: 0 };
    for &p in ready_order {
        if !current.params.is_empty() && current.bytes + bytes[p] > limit {
            buckets.push(std::mem::replace(&mut current, Bucket { params: Vec::new(), bytes: 0 }));
        }
        current.params.push(p);
        current.bytes += bytes[p];
    }
    if !current.params.is_empty() {
        buckets.push(current);
    }
    buckets
}

/// Counts the final gradients of each bucket during the backward pass and says when a bucket is complete.
pub struct BucketTracker {
    bucket_of: Vec<Option<usize>>,
    remaining: Vec<usize>,
}

impl BucketTracker {
    /// A tracker of `buckets` over `n_params` parameters.
    pub fn new(buckets: &[Bucket], n_params: usize) -> BucketTracker {
        let mut bucket_of = vec![None; n_params];
        for (b, bucket) in buckets.iter().enumerate() {
            for &p in &bucket.params {
                bucket_of[p] = Some(b);
            }
        }
        BucketTracker { bucket_of, remaining: buckets.iter().map(|b| b.params.len()).collect() }
    }

    /// Records that parameter `p`'s gradient is final; returns the bucket it completes, if any.
    pub fn finalise(&mut self, p: usize) -> Option<usize> {
        let b = self.bucket_of.get_mut(p)?.take()?;
        self.remaining[b] -= 1;
        (self.remaining[b] == 0).then_some(b)
    }
}

/// Whether NCCL can be loaded; the error says where it comes from and how to point the engine at it.
pub fn check_nccl() -> Result<()> {
    // SAFETY: only tries to dlopen the library; no NCCL call is made.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Ok(());
    }
    let found: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("libnccl.so.2")).filter(|f| f.exists()).collect())
        .unwrap_or_default();
    let source = match found.first() {
        Some(f) => format!("{} is on LD_LIBRARY_PATH but not under that name", f.display()),
        None => "PyTorch's environment ships it as site-packages/nvidia/nccl/lib/libnccl.so.2 (the PyPI wheel \
                 nvidia-nccl-cu13; `python3 -c \"import nvidia.nccl as m; print(m.__path__[0])\"` prints the folder \
                 holding lib/)"
            .to_string(),
    };
    let target = found.first().map_or("NCCL_DIR/lib/libnccl.so.2".to_string(), |f| f.display().to_string());
    bail!(
        Device,
        "NCCL could not be loaded, and training on several GPUs needs it: lkm-engine loads it at run time (through \
         cudarc) as libnccl.so from the library search path. {source}. Link it under that name into a folder and \
         put the folder on LD_LIBRARY_PATH: mkdir -p ~/.lkm-nccl && ln -sf {target} ~/.lkm-nccl/libnccl.so && \
         export LD_LIBRARY_PATH=~/.lkm-nccl:$LD_LIBRARY_PATH (a system NCCL from the libnccl-dev package provides \
         libnccl.so already)"
    )
}

/// An NCCL error as text, naming what was being done.
fn nccl_err(what: impl std::fmt::Display) -> impl FnOnce(cudarc::nccl::result::NcclError) -> Error {
    move |e| {
        // SAFETY: ncclGetErrorString returns a static C string for any result code.
        let text = unsafe { std::ffi::CStr::from_ptr(cudarc::nccl::sys::ncclGetErrorString(e.0)) };
        Error::Device(format!("NCCL, {what}: {} ({:?})", text.to_string_lossy(), e.0))
    }
}

/// Runs `f`, which queues NCCL calls, inside one NCCL group (NCCL launches the group's operations together when it
/// ends), ending the group whether or not `f` fails.
fn in_group(f: impl FnOnce() -> Result<()>) -> Result<()> {
    group_start().map_err(nccl_err("starting a group"))?;
    let queued = f();
    let ended = group_end().map_err(nccl_err("launching a group"));
    queued.and(ended.map(|_| ()))
}

/// The id the ranks of one run meet by.
pub struct NcclId(Id);

impl NcclId {
    /// A new id (NCCL's `ncclGetUniqueId`): this process then listens for the ranks' bootstrap, or, with
    /// `NCCL_COMM_ID` set, the id names that address and rank 0 will listen there.
    pub fn new() -> Result<NcclId> {
        check_nccl()?;
        Ok(NcclId(Id::new().map_err(nccl_err("creating a communicator id"))?))
    }

    /// The id as hex, to hand to a rank process.
    pub fn to_hex(&self) -> String {
        self.0.internal().iter().map(|&c| format!("{:02x}", c as u8)).collect()
    }

    /// The id of [`NcclId::to_hex`].
    pub fn from_hex(hex: &str) -> Result<NcclId> {
        let mut internal = [0 as std::ffi::c_char; 128];
        ensure!(hex.len() == 2 * internal.len(), Config, "--nccl-id must be 256 hex digits, got {}", hex.len());
        for (i, byte) in internal.iter_mut().enumerate() {
            let b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| Error::Config(format!("--nccl-id: {:?} is not hex", &hex[2 * i..2 * i + 2])))?;
            *byte = b as std::ffi::c_char;
        }
        Ok(NcclId(Id::uninit(internal)))
    }
}

/// This process's part of a data-parallel run: its rank, its GPU and an NCCL communicator on a stream of its own.
pub struct Replica {
    rank: usize,
    world: usize,
    gpu: Arc<Gpu>,
    comm: Comm,
    comm_stream: Arc<CudaStream>,
    bucket_bytes: usize,
}

impl Replica {
    /// Joins the run of `id` as rank `rank` of `world` on `gpu`. Blocks until every rank has joined.
    pub fn new(gpu: &Arc<Gpu>, rank: usize, world: usize, id: &NcclId) -> Result<Replica> {
        check_nccl()?;
        ensure!(rank < world, Config, "rank {rank} of a run of {world} ranks");
        let ctx = gpu.stream().context().clone();
        // NCCL takes the GPU from the thread's current context.
        ctx.bind_to_thread().map_err(driver_err("binding the GPU's context"))?;
        let comm_stream = ctx.new_stream().map_err(driver_err("creating the communication stream"))?;
        let comm = Comm::from_rank(comm_stream.clone(), rank, world, id.0).map_err(nccl_err(format!(
            "joining the run as rank {rank} of {world} on cuda:{} (every rank must start; a rank that waits here \
             forever is missing one)",
            gpu.ordinal()
        )))?;
        Ok(Replica { rank, world, gpu: gpu.clone(), comm, comm_stream, bucket_bytes: DEFAULT_BUCKET_BYTES })
    }

    /// The same replica with buckets of at most `bytes` (tests use small buckets to exercise many launches).
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Replica {
        self.bucket_bytes = bytes.max(1);
        self
    }

    /// This replica's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of replicas.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Whether this is rank 0, the one that writes the run folder.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Queues `f` on the communication stream after everything queued so far on the compute stream, then makes
    /// the compute stream wait for it: a collective ordered like a kernel of the step.
    fn collective(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        self.comm_stream.join(self.gpu.stream()).map_err(driver_err("ordering a collective after the step"))?;
        f()?;
        self.gpu.stream().join(&self.comm_stream).map_err(driver_err("waiting for a collective"))
    }

    /// Copies rank 0's parameters to every rank, so that replicas start identical whatever each built.
    pub fn broadcast_params(&self, params: &mut Params) -> Result<()> {
        self.collective(|| {
            in_group(|| {
                for t in params.tensors_mut() {
                    let shape = t.shape().to_vec();
                    let Storage::Cuda(buffer) = t.storage_mut()? else {
                        bail!(Device, "parameter {shape:?} is not on the GPU; data-parallel training runs on GPUs");
                    };
                    self.comm.broadcast_in_place(&mut buffer.slice, 0).map_err(nccl_err("broadcasting the weights"))?;
                }
                Ok(())
            })
        })
    }

    /// The mean of a one-element `loss` over the replicas (the loss of the global batch), as a new tensor.
    pub fn average_loss(&self, loss: &Tensor) -> Result<Tensor> {
        let mut out = Vec::new();
        self.launch_average(&[loss], &mut out, "the loss")?;
        self.gpu.stream().join(&self.comm_stream).map_err(driver_err("waiting for the loss all-reduce"))?;
        Ok(out.pop().expect("one tensor averaged"))
    }

    /// Queues, as one NCCL group on the communication stream after the compute stream's work so far, the averages over
    /// the replicas of `tensors` into new tensors pushed onto `out`. The caller makes the compute stream wait before
    /// using them and keeps `tensors` alive until then.
    fn launch_average(&self, tensors: &[&Tensor], out: &mut Vec<Tensor>, what: &str) -> Result<()> {
        // The outputs come from the compute stream's pool before the communication stream is ordered after it.
        let mut outputs = Vec::with_capacity(tensors.len());
        for t in tensors {
            outputs.push((self.gpu.alloc(t.numel(), "all-reduced gradient")?, t.shape().to_vec()));
        }
        self.comm_stream.join(self.gpu.stream()).map_err(driver_err(format!("ordering the all-reduce of {what}")))?;
        in_group(|| {
            for (t, (buffer, _)) in tensors.iter().zip(outputs.iter_mut()) {
                let Some(send) = t.gpu_buffer() else {
                    bail!(Device, "{what}: a tensor {:?} is not on the GPU", t.shape());
                };
                self.comm.all_reduce(&send.slice, &mut buffer.slice, &ReduceOp::Avg).map_err(nccl_err(format!(
                    "averaging {what} ({} floats) over {} ranks",
                    t.numel(),
                    self.world
                )))?;
            }
            Ok(())
        })?;
        for (buffer, shape) in outputs {
            out.push(Tensor::from_gpu(buffer, &shape)?);
        }
        Ok(())
    }

    /// Back-propagates `loss` and returns every parameter's gradient averaged over the replicas (`None` where no
    /// gradient reaches a parameter, the same on every replica), reducing each bucket while the rest of the backward
    /// pass runs (see the module header).
    pub fn backward(&self, tape: &mut Tape, loss: &Tensor, params: &Params) -> Result<Vec<Option<Tensor>>> {
        let n = params.len();
        let index: HashMap<_, _> = params.tensors().iter().enumerate().map(|(i, t)| (t.id(), i)).collect();
        let ready: Vec<usize> = tape.leaves_in_final_order().iter().filter_map(|id| index.get(id).copied()).collect();
        let bytes: Vec<usize> = params.tensors().iter().map(|t| t.numel() * 4).collect();
        let buckets = plan_buckets(&ready, &bytes, self.bucket_bytes);
        let mut tracker = BucketTracker::new(&buckets, n);
        // Each rank's own gradients stay alive until the compute stream has waited for the reductions that read them.
        let mut local: Vec<Option<Tensor>> = vec![None; n];
        let mut averaged: Vec<Option<Tensor>> = vec![None; n];
        let leftover = tape.backward_notify(loss, &mut |id, grad| {
            let Some(&p) = index.get(&id) else { return Ok(()) };
            local[p] = grad;
            if let Some(b) = tracker.finalise(p) {
                let members: Vec<usize> = buckets[b].params.iter().copied().filter(|&q| local[q].is_some()).collect();
                let sends: Vec<&Tensor> = members.iter().map(|&q| local[q].as_ref().expect("present")).collect();
                let mut out = Vec::with_capacity(members.len());
                self.launch_average(&sends, &mut out, &format!("gradient bucket {b} of {}", buckets.len()))?;
                for (q, g) in members.into_iter().zip(out) {
                    averaged[q] = Some(g);
                }
            }
            Ok(())
        })?;
        ensure!(
            leftover.is_empty(),
            Mismatch,
            "{} gradient(s) were not handed over by the backward pass; every parameter's gradient must be reduced",
            leftover.len()
        );
        self.gpu.stream().join(&self.comm_stream).map_err(driver_err("waiting for the gradient all-reduces"))?;
        drop(local);
        Ok(averaged)
    }
}

/// Starts one `lkm-engine` process per GPU of `ordinals` with the arguments `args` of this one (plus the rank, the
/// number of ranks and an NCCL id), and waits for them. Rank 0 prints as a single-GPU run would; the other ranks'
/// messages are kept and shown if that rank fails. When one rank fails, the others are stopped (they would wait for
/// it in their next collective forever) and the error names the rank.
pub fn launch_local(ordinals: &[usize], args: &[OsString]) -> Result<()> {
    check_nccl()?;
    check_gpus(ordinals)?;
    let id = NcclId::new()?.to_hex();
    let exe = std::env::current_exe().map_err(|e| Error::Io(format!("finding this executable to start ranks: {e}")))?;
    let world = ordinals.len();
    eprintln!(
        "training on {world} GPUs ({}), one process each; rank 0 reports",
        ordinals.iter().map(|o| format!("cuda:{o}")).collect::<Vec<_>>().join(", ")
    );
    let mut ranks: Vec<(Child, Option<JoinHandle<Vec<String>>>)> = Vec::with_capacity(world);
    for rank in 0..world {
        let mut cmd = Command::new(&exe);
        cmd.args(args).args(["--rank", &rank.to_string(), "--world-size", &world.to_string(), "--nccl-id", &id]);
        cmd.stdin(Stdio::null());
        if rank > 0 {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let spawned = cmd.spawn().map_err(|e| Error::Io(format!("starting rank {rank} ({}): {e}", exe.display())));
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                stop(&mut ranks);
                return Err(e);
            }
        };
        let tail = child.stderr.take().map(|err| std::thread::spawn(move || last_lines(err, 40)));
        ranks.push((child, tail));
    }
    let mut done = vec![false; world];
    while done.iter().any(|d| !d) {
        for rank in 0..world {
            if done[rank] {
                continue;
            }
            let status = ranks[rank].0.try_wait().map_err(|e| Error::Io(format!("waiting for rank {rank}: {e}")))?;
            match status {
                Some(s) if s.success() => done[rank] = true,
                Some(s) => {
                    let messages = ranks[rank].1.take().map(|t| t.join().unwrap_or_default()).unwrap_or_default();
                    stop(&mut ranks);
                    return Err(rank_failed(rank, ordinals[rank], s, &messages));
                }
                None => {}
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Checks that the driver sees every GPU of `ordinals`.
fn check_gpus(ordinals: &[usize]) -> Result<()> {
    // SAFETY: only tries to dlopen libcuda; no CUDA call is made.
    ensure!(
        unsafe { cudarc::driver::sys::is_culib_present() },
        Device,
        "--devices/--gpus: no CUDA driver found (libcuda.so is not loadable); training on several GPUs needs them"
    );
    let count = cudarc::driver::CudaContext::device_count().map_err(driver_err("counting GPUs"))? as usize;
    if let Some(missing) = ordinals.iter().find(|&&o| o >= count) {
        bail!(Config, "--devices/--gpus: cuda:{missing} requested but the driver sees {count} GPU(s)");
    }
    Ok(())
}

/// Kills the rank processes still running (their own children only) and reaps them.
fn stop(ranks: &mut [(Child, Option<JoinHandle<Vec<String>>>)]) {
    for (child, _) in ranks.iter_mut() {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// The last `n` lines a rank wrote to `stream`, read until it closes.
fn last_lines(stream: impl std::io::Read, n: usize) -> Vec<String> {
    let mut lines = std::collections::VecDeque::with_capacity(n);
    for line in BufReader::new(stream).lines().map_while(std::result::Result::ok) {
        if lines.len() == n {
            lines.pop_front();
        }
        lines.push_back(line);
    }
    lines.into()
}

/// The error of a rank that exited with `status`, with its last messages (rank 0's are already on the terminal).
fn rank_failed(rank: usize, ordinal: usize, status: ExitStatus, messages: &[String]) -> Error {
    let shown =
        if messages.is_empty() { String::new() } else { format!("; its last messages:\n  {}", messages.join("\n  ")) };
    Error::Device(format!(
        "rank {rank} (cuda:{ordinal}) exited with {status}; the other ranks were stopped (the checkpoint of the last \
         finished epoch, if any, is intact){shown}"
    ))
}
