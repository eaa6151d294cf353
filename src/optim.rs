//! The optimiser of nnU-Net v2: SGD with Nesterov momentum and weight decay, global gradient-norm clipping and the
//! polynomial learning-rate schedule.
//!
//! One step of PyTorch's `torch.optim.SGD(nesterov=True, dampening=0)`, per parameter element, with the momentum
//! buffer b starting at 0 (so the first step sets b = g, as PyTorch's copy does, bit for bit):
//!
//! ```text
//!   g = grad + wd * p          weight decay as an L2 term in the gradient (not decoupled)
//!   b = mu * b + g             momentum buffer
//!   p = p - lr * (g + mu * b)  Nesterov: step along the gradient plus the look-ahead momentum
//! ```
//! computed in the parameter's dtype in exactly that order. `torch.nn.utils.clip_grad_norm_`:
//!
//! ```text
//!   norm = sqrt(sum over all gradients and elements of g^2)       (accumulated in f64)
//!   g = g * min(1, max_norm / (norm + 1e-6))
//! ```
//! and the schedule `lr(epoch) = base * (1 - epoch / max_epochs)^0.9`.
//!
//! On the GPU (kernels in `cuda/optim.cu`) the step is one elementwise launch over every parameter (a table of the
//! tensors in device memory, `TensorTable`), updating each parameter and its momentum buffer (which lives on the GPU)
//! in place; each operation is rounded separately in the order above, so a GPU step gives the same float32 bits as the
//! CPU's. The first step writes b = g (into a zeroed fresh buffer, which it does not read). `clip_grad_norm` sums the
//! squares of each gradient in float64 per block (a fixed tree; the blocks of a gradient depend on its size only) in
//! one launch; a second, of one block, adds them in order into each gradient's sum and the total (float64, the order of
//! the CPU's sums, so the same bits), and writes the norm, the ratio and whether the step may proceed (the loss and the
//! norm finite) into a small status buffer in device memory ([`Clip`]). The scaling (one in-place launch over every
//! gradient) and the optimiser step read that status there: a training step queues all its work without waiting for the
//! GPU, and reads the status back once, after its last launch ([`Clip::finish`]), to report the loss and a non-finite
//! norm. (One launch per tensor instead cost 3.3 ms of a 192 ms flare-3d step: about 300 launches the GPU waited on.
//! A read-back in the middle of a step holds the host until the GPU has caught up, instead of queueing the rest of the
//! step while the GPU works.)
//!
//! One clipped step by hand: the gradient (3, 4) has norm 5 and is scaled to norm 2.5, then the first Nesterov step
//! (b = g) moves p by `-lr (1 + mu) g`.
//!
//! ```
//! use lkm_engine::optim::{clip_grad_norm, Sgd};
//! use lkm_engine::Tensor;
//!
//! # fn main() -> lkm_engine::Result<()> {
//! let mut params = [Tensor::from_vec(vec![1.0f64, -2.0], &[2])?];
//! let mut grads = [Tensor::from_vec(vec![3.0f64, 4.0], &[2])?];
//! assert_eq!(clip_grad_norm(&mut grads, 2.5)?, 5.0);
//! let mut sgd = Sgd::new(0.1, 0.9, 0.0);
//! sgd.step(&mut params, &grads)?;
//! let p = params[0].to_vec_f64()?;
//! let by_hand = [1.0 - 0.1 * 1.9 * 1.5, -2.0 - 0.1 * 1.9 * 2.0];
//! assert!(p.iter().zip(by_hand).all(|(a, b)| (a - b).abs() < 1e-6), "{p:?}");
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use crate::device::cuda::{driver_err, Gpu, GpuBuffer};
use cudarc::driver::CudaSlice;

use crate::device::params::{
    kernel, ConstPtr, Kernel, MutPtr, OptimParams, OPTIM_BLOCK0, OPTIM_BLOCKS, OPTIM_BUF, OPTIM_COPY, OPTIM_FIRST,
    OPTIM_GRAD, OPTIM_N, OPTIM_PARAM, OPTIM_PARTIAL, OPTIM_STATUS_LOSS, OPTIM_STATUS_NORM, OPTIM_STATUS_OK,
    OPTIM_STATUS_RATIO, OPTIM_STATUS_SUMS, OPTIM_STATUS_THREADS, OPTIM_THREADS, OPTIM_WORDS,
};
use crate::tensor::{DType, Real, Storage, Tensor};
use crate::{bail, by_dtype, ensure, Error, Result};

/// nnU-Net's initial learning rate.
pub const DEFAULT_LR: f64 = 1e-2;
/// nnU-Net's Nesterov momentum: high, so the update averages the gradients of about 100 steps.
pub const DEFAULT_MOMENTUM: f64 = 0.99;
/// nnU-Net's weight decay (an L2 term added to the gradient).
pub const DEFAULT_WEIGHT_DECAY: f64 = 3e-5;
/// nnU-Net's bound on the global L2 norm of the gradients, which tames the rare huge step that high momentum would
/// otherwise carry on for many iterations.
pub const DEFAULT_GRAD_CLIP: f64 = 12.0;
/// The exponent of the polynomial learning-rate decay.
pub const POLY_EXPONENT: f64 = 0.9;
/// Added to the norm in the clipping ratio, as PyTorch does, so the ratio stays finite.
const CLIP_EPS: f64 = 1e-6;

/// Stochastic gradient descent with Nesterov momentum and weight decay (PyTorch's `SGD(nesterov=True,
/// dampening=0)`). Parameters are identified by their position in the slice given to [`Sgd::step`], so pass them
/// in the same order every step.
#[derive(Clone, Debug)]
pub struct Sgd {
    /// Learning rate of the next step (set it from [`poly_lr`] each epoch).
    pub lr: f64,
    /// Momentum factor mu.
    pub momentum: f64,
    /// Weight decay wd (L2 penalty coefficient).
    pub weight_decay: f64,
    /// Momentum buffer per parameter position; empty, or `None` entries, before the first step.
    buffers: Vec<Option<Tensor>>,
}

impl Default for Sgd {
    /// nnU-Net's settings: lr 1e-2, momentum 0.99, weight decay 3e-5.
    fn default() -> Sgd {
        Sgd::new(DEFAULT_LR, DEFAULT_MOMENTUM, DEFAULT_WEIGHT_DECAY)
    }
}

impl Sgd {
    /// An optimiser with no momentum history.
    pub fn new(lr: f64, momentum: f64, weight_decay: f64) -> Sgd {
        Sgd { lr, momentum, weight_decay, buffers: Vec::new() }
    }

    /// The momentum buffers, one per parameter position (`None` before that parameter's first step), for
    /// checkpoints. Clones of them are snapshots: later steps never write into a buffer that is shared.
    pub fn momentum_buffers(&self) -> &[Option<Tensor>] {
        &self.buffers
    }

    /// Restores momentum buffers saved with [`Sgd::momentum_buffers`]; they are checked against the parameters
    /// (count, shape, dtype, device) at the next step.
    pub fn set_momentum_buffers(&mut self, buffers: Vec<Option<Tensor>>) {
        self.buffers = buffers;
    }

    /// Updates every parameter in place from its gradient (`grads[i]` belongs to `params[i]`). Fails, changing
    /// nothing, on a count, shape, dtype or device mismatch, on negative or non-finite settings, or when a parameter's
    /// storage is still shared (e.g. by a tape that has not been freed).
    pub fn step(&mut self, params: &mut [Tensor], grads: &[Tensor]) -> Result<()> {
        let grads: Vec<Option<Tensor>> = grads.iter().cloned().map(Some).collect();
        self.step_partial(params, &grads)
    }

    /// As [`Sgd::step`], where a parameter whose gradient is `None` (no gradient reached it, e.g. the seg head of the
    /// deepest deep-supervision output, whose loss weight is 0) is left untouched with its momentum, as PyTorch's
    /// SGD skips parameters whose `.grad` is None.
    pub fn step_partial(&mut self, params: &mut [Tensor], grads: &[Option<Tensor>]) -> Result<()> {
        self.step_guarded(params, &mut [], grads, None)
    }

    /// [`Sgd::step_partial`] after `clip` clipped `grads`: where `clip` found the loss or the gradient norm not
    /// finite, the step changes no parameter and no momentum buffer (on the GPU the kernel reads that decision from
    /// device memory, so nothing waits for it here). `copies` (empty, or one entry per parameter) are bf16 copies of
    /// float32 GPU parameters that the same kernel rewrites from each updated parameter
    /// ([`crate::nn::Params::for_optimiser`]); a copy whose storage is shared is first replaced by a private copy.
    pub fn step_clipped(
        &mut self,
        params: &mut [Tensor],
        copies: &mut [Option<Tensor>],
        grads: &[Option<Tensor>],
        clip: &Clip,
    ) -> Result<()> {
        self.step_guarded(params, copies, grads, Some(clip))
    }

    fn step_guarded(
        &mut self,
        params: &mut [Tensor],
        copies: &mut [Option<Tensor>],
        grads: &[Option<Tensor>],
        clip: Option<&Clip>,
    ) -> Result<()> {
        for (name, value) in [("lr", self.lr), ("momentum", self.momentum), ("weight_decay", self.weight_decay)] {
            ensure!(value.is_finite() && value >= 0.0, Config, "Sgd: {name} must be finite and >= 0, got {value}");
        }
        ensure!(
            params.len() == grads.len(),
            Shape,
            "Sgd::step: {} parameters but {} gradients",
            params.len(),
            grads.len()
        );
        if self.buffers.is_empty() {
            self.buffers = vec![None; params.len()];
        }
        ensure!(
            self.buffers.len() == params.len(),
            Shape,
            "Sgd::step: {} parameters but momentum buffers for {} (restored from another model?)",
            params.len(),
            self.buffers.len()
        );
        ensure!(
            copies.is_empty() || copies.len() == params.len(),
            Shape,
            "Sgd::step: {} parameters but {} bf16 copies",
            params.len(),
            copies.len()
        );
        for (i, (p, c)) in params.iter().zip(copies.iter()).enumerate() {
            let Some(c) = c else { continue };
            let what = format!("Sgd::step: bf16 copy of parameter {i}");
            ensure!(
                p.gpu_buffer().is_some() && p.dtype() == DType::F32 && c.dtype() == DType::BF16,
                Mismatch,
                "{what}: only a float32 GPU parameter has a bf16 copy, got {:?} for {p:?}",
                c.dtype()
            );
            c.check_shape(p.shape(), &what)?;
        }
        for (i, ((p, g), b)) in params.iter_mut().zip(grads).zip(&self.buffers).enumerate() {
            let Some(g) = g else { continue };
            let what = format!("Sgd::step: gradient of parameter {i}");
            p.check_same_kind(g, &what)?;
            g.check_shape(p.shape(), &what)?;
            if let Some(b) = b {
                let what = format!("Sgd::step: momentum buffer of parameter {i}");
                p.check_same_kind(b, &what)?;
                b.check_shape(p.shape(), &what)?;
            }
            p.storage_mut()?;
        }
        if clip.is_some_and(|c| c.skips_on_host()) {
            return Ok(());
        }
        let hyper = [self.lr, self.momentum, self.weight_decay];
        let mut table = TensorTable::default();
        for (i, ((p, g), b)) in params.iter_mut().zip(grads).zip(self.buffers.iter_mut()).enumerate() {
            let Some(g) = g else { continue };
            if p.gpu_buffer().is_some() {
                add_gpu_update(&mut table, p, g, b, copies.get_mut(i).and_then(Option::as_mut))?;
                continue;
            }
            let b = match b {
                Some(b) => b,
                None => b.insert(p.zeros_like()?),
            };
            by_dtype!(p.dtype(), update_cpu(p, g, b, hyper))?;
        }
        let [lr, mu, wd] = hyper.map(|v| v as f32);
        let status = match clip.map(|c| &c.decided) {
            Some(Decided::Device { status_at, .. }) => *status_at,
            _ => MutPtr::NULL,
        };
        table.launch(kernel::sgd_nesterov_step, OptimParams { lr, mu, wd, status, ..Default::default() }, "Sgd::step")
    }
}

/// The tensors of one optimiser launch: the table of cuda/optim.cuh (`OPTIM_WORDS` words per tensor), each tensor
/// with its own run of blocks.
#[derive(Default)]
struct TensorTable {
    words: Vec<i64>,
    blocks: usize,
    gpu: Option<Arc<Gpu>>,
}

/// The most blocks a tensor takes in the elementwise kernels (a grid-stride loop covers larger tensors).
const ELEMENTWISE_MAX_BLOCKS: usize = 1024;

impl TensorTable {
    /// Adds a tensor of `n` elements on `gpu` with `blocks` blocks; `addresses` are the param, grad, buf, partial and
    /// copy addresses (0 for those the kernel does not use).
    fn push(&mut self, gpu: &Arc<Gpu>, addresses: [u64; 5], n: usize, blocks: usize, first: bool) -> Result<()> {
        let launcher = self.gpu.get_or_insert_with(|| gpu.clone());
        ensure!(
            Arc::ptr_eq(launcher, gpu),
            Mismatch,
            "optimiser: the tensors of one step are on different GPUs; step each device's parameters separately"
        );
        let mut entry = [0i64; OPTIM_WORDS];
        for (word, address) in
            [OPTIM_PARAM, OPTIM_GRAD, OPTIM_BUF, OPTIM_PARTIAL, OPTIM_COPY].into_iter().zip(addresses)
        {
            entry[word] = address as i64;
        }
        entry[OPTIM_N] = n as i64;
        entry[OPTIM_BLOCK0] = self.blocks as i64;
        entry[OPTIM_BLOCKS] = blocks as i64;
        entry[OPTIM_FIRST] = first as i64;
        self.words.extend(entry);
        self.blocks += blocks;
        Ok(())
    }

    /// Blocks for `n` elements in the elementwise kernels.
    fn elementwise_blocks(n: usize) -> usize {
        n.div_ceil(OPTIM_THREADS).clamp(1, ELEMENTWISE_MAX_BLOCKS)
    }

    /// One launch of `kernel` over every tensor added (nothing when none was); `p` gives the scalars.
    fn launch(self, kernel: Kernel<OptimParams>, p: OptimParams, what: &str) -> Result<()> {
        match self.upload(what)? {
            Some(table) => table.launch(kernel, p, what),
            None => Ok(()),
        }
    }

    /// The table in device memory, for one or more launches (`None` when no tensor was added).
    fn upload(self, what: &str) -> Result<Option<Uploaded>> {
        let Some(gpu) = self.gpu else { return Ok(None) };
        let words = gpu.stream().clone_htod(&self.words).map_err(driver_err(format!("copying the {what} table")))?;
        let count = (self.words.len() / OPTIM_WORDS) as i32;
        Ok(Some(Uploaded { gpu, words, count, blocks: self.blocks }))
    }
}

/// A [`TensorTable`] in device memory.
struct Uploaded {
    gpu: Arc<Gpu>,
    words: CudaSlice<i64>,
    count: i32,
    blocks: usize,
}

impl Uploaded {
    /// `kernel` over the table's blocks; `p` gives the scalars.
    fn launch(&self, kernel: Kernel<OptimParams>, p: OptimParams, what: &str) -> Result<()> {
        self.launch_on(kernel, p, self.blocks, OPTIM_THREADS, what)
    }

    /// `kernel` as one block of `threads` threads.
    fn launch_one_block(&self, kernel: Kernel<OptimParams>, p: OptimParams, threads: usize, what: &str) -> Result<()> {
        self.launch_on(kernel, p, 1, threads, what)
    }

    fn launch_on(
        &self,
        kernel: Kernel<OptimParams>,
        p: OptimParams,
        blocks: usize,
        threads: usize,
        what: &str,
    ) -> Result<()> {
        let p = OptimParams { table: self.gpu.ptr(&self.words), count: self.count, ..p };
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.gpu.launch(kernel, cfg, &p, &format!("{what} ({} tensors)", p.count))
    }
}

/// Adds the step of one GPU parameter to `table`: `buf` is created on the first step (zeroed, though the kernel writes
/// b = g there without reading it: a first step that a [`Clip`] skips on the GPU leaves zeros, which the next step
/// reads as PyTorch's fresh buffer), and replaced by a private copy when its storage is shared (a checkpoint snapshot
/// keeps its values). `copy`, the parameter's bf16 copy if it has one, is rewritten by the kernel, a shared one first
/// replaced by a private copy of it (a step that the status skips leaves it as it was, as it leaves the parameter).
fn add_gpu_update(
    table: &mut TensorTable,
    param: &mut Tensor,
    grad: &Tensor,
    buf: &mut Option<Tensor>,
    copy: Option<&mut Tensor>,
) -> Result<()> {
    let shape = param.shape().to_vec();
    let g = grad.gpu_buffer().ok_or_else(|| {
        Error::Mismatch(format!("Sgd::step: the gradient of a GPU parameter {shape:?} is not on the GPU"))
    })?;
    let gpu = g.gpu.clone();
    let first = buf.is_none();
    let buf = match buf {
        Some(b) => {
            if b.storage_mut().is_err() {
                *b = gpu_copy(b)?;
            }
            b
        }
        None => buf.insert(Tensor::from_gpu(gpu.zeros(param.numel(), "momentum buffer")?, &shape)?),
    };
    let b = gpu_mut(buf)?.ptr_mut().address();
    let p = gpu_mut(param)?.ptr_mut().address();
    let c = match copy {
        Some(c) => {
            if c.storage_mut().is_err() {
                *c = c.deep_copy()?;
            }
            match c.storage_mut()? {
                Storage::CudaBf16(b) => b.ptr_mut().address(),
                _ => bail!(Mismatch, "optimiser: the bf16 copy of a parameter {shape:?} is not a bf16 GPU tensor"),
            }
        }
        None => 0,
    };
    let n = shape.iter().product::<usize>();
    table.push(&gpu, [p, g.ptr().address(), b, 0, c], n, TensorTable::elementwise_blocks(n), first)
}

/// The device buffer of an unshared GPU tensor, for writing.
fn gpu_mut(t: &mut Tensor) -> Result<&mut GpuBuffer> {
    let shape = t.shape().to_vec();
    match t.storage_mut()? {
        Storage::Cuda(b) => Ok(b),
        _ => Err(Error::Mismatch(format!("optimiser: expected a GPU tensor of shape {shape:?}"))),
    }
}

/// A new GPU tensor holding a copy of `t`'s elements.
fn gpu_copy(t: &Tensor) -> Result<Tensor> {
    let b = t.gpu_buffer().ok_or_else(|| Error::Mismatch(format!("optimiser: {t:?} is not on the GPU")))?;
    let slice = b.gpu.stream().clone_dtod(&b.slice).map_err(driver_err(format!("copying {t:?} on the GPU")))?;
    Tensor::from_gpu(GpuBuffer::new(slice, &b.gpu, "optimiser copy"), t.shape())
}

fn update_cpu<T: Real>(param: &mut Tensor, grad: &Tensor, buf: &mut Tensor, [lr, mu, wd]: [f64; 3]) -> Result<()> {
    let (lr, mu, wd) = (T::from_f64(lr), T::from_f64(mu), T::from_f64(wd));
    let grad = grad.cpu::<T>()?;
    let b = unique_host_mut::<T>(buf)?;
    let p = host_mut::<T>(param)?;
    for ((pi, &gi), bi) in p.iter_mut().zip(grad).zip(b.iter_mut()) {
        let g = gi + wd * *pi;
        *bi = mu * *bi + g;
        *pi -= lr * (g + mu * *bi);
    }
    Ok(())
}

/// The host elements of an unshared tensor, for writing.
fn host_mut<T: Real>(t: &mut Tensor) -> Result<&mut [T]> {
    let shape = t.shape().to_vec();
    T::slice_mut(t.storage_mut()?)
        .ok_or_else(|| Error::Mismatch(format!("optimiser: expected a CPU {:?} tensor of shape {shape:?}", T::DTYPE)))
}

/// The host elements of `t` for writing, after replacing `t` by a private copy if its storage is shared
/// (copy-on-write: a snapshot taken by the caller keeps its values).
fn unique_host_mut<T: Real>(t: &mut Tensor) -> Result<&mut [T]> {
    if t.storage_mut().is_err() {
        *t = Tensor::from_vec(t.cpu::<T>()?.to_vec(), t.shape())?;
    }
    host_mut(t)
}

/// Clips the global L2 norm of `grads` to `max_norm` like PyTorch's `clip_grad_norm_`: computes the norm over every
/// element of every gradient (accumulated in f64) and returns it, and, when `max_norm / (norm + 1e-6) < 1`, scales
/// each gradient by that ratio (replacing the tensors in the slice; shared ones are copied first). A NaN or infinite
/// norm is an [`Error::NonFinite`] that leaves the gradients untouched. (Reads the norm back from the GPU; a training
/// step uses [`clip_for_step`] instead, which does not wait.)
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    clip(grads, max_norm, None)?.finish()?.norm()
}

/// [`clip_grad_norm`] over the gradients that exist (`None`: no gradient reached that parameter).
pub fn clip_present_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    clip_present(grads, max_norm, None)?.finish()?.norm()
}

/// Clipping as a training step does it: as [`clip_present_grad_norm`], but on the GPU the decision stays in device
/// memory (nothing here waits for the GPU), and it also covers the step's `loss` (one value): where the loss or the
/// norm is not finite, nothing is scaled and [`Sgd::step_clipped`] changes nothing. [`Clip::finish`], after the
/// step's last launch, reads the loss and the norm back.
pub fn clip_for_step(grads: &mut [Option<Tensor>], max_norm: f64, loss: &Tensor) -> Result<Clip> {
    clip_present(grads, max_norm, Some(loss))
}

fn clip_present(grads: &mut [Option<Tensor>], max_norm: f64, loss: Option<&Tensor>) -> Result<Clip> {
    let mut present: Vec<Tensor> = grads.iter().flatten().cloned().collect();
    let clip = clip(&mut present, max_norm, loss)?;
    let mut clipped = present.into_iter();
    for g in grads.iter_mut().flatten() {
        *g = clipped.next().expect("one clipped gradient per present gradient");
    }
    Ok(clip)
}

/// A clipping decision: made at once for host gradients, or held in device memory (`cuda/optim.cuh`'s status words)
/// for GPU gradients, where the scaling and [`Sgd::step_clipped`] read it.
pub struct Clip {
    decided: Decided,
    /// The gradients' shapes, for the message naming a non-finite one.
    shapes: Vec<Vec<usize>>,
}

enum Decided {
    /// The status words, computed on the host.
    Host(Vec<f64>),
    /// The status words in device memory, and their address for the kernels.
    Device { gpu: Arc<Gpu>, status: CudaSlice<f64>, status_at: MutPtr<f64> },
}

/// What a [`Clip`] found, read back.
#[derive(Clone, Debug)]
pub struct ClipReport {
    /// The global L2 norm of the gradients.
    pub norm_value: f64,
    /// The step's loss (0 when none was given).
    pub loss: f64,
    /// The message of a non-finite norm: which gradient was first not finite.
    first_bad: Option<String>,
}

impl ClipReport {
    /// The norm, or the [`Error::NonFinite`] of a NaN or infinite one (the gradients were left unchanged).
    pub fn norm(&self) -> Result<f64> {
        let norm = self.norm_value;
        if norm.is_finite() {
            return Ok(norm);
        }
        let at = self.first_bad.clone().unwrap_or_else(|| "the sum of squares overflowed".into());
        Err(Error::NonFinite(format!(
            "gradient norm is NaN or infinite ({norm}; {at}); the gradients were left unchanged: lower the learning \
             rate or check the data"
        )))
    }
}

impl Clip {
    /// Whether the decision is known on the host and says not to step.
    fn skips_on_host(&self) -> bool {
        matches!(&self.decided, Decided::Host(words) if words[OPTIM_STATUS_OK] == 0.0)
    }

    /// The loss and the norm (one copy from the GPU, which waits for the work queued so far).
    pub fn finish(self) -> Result<ClipReport> {
        let words = match self.decided {
            Decided::Host(words) => words,
            Decided::Device { gpu, status, .. } => {
                gpu.stream().clone_dtoh(&status).map_err(driver_err("reading the clipping status back"))?
            }
        };
        let sums = &words[OPTIM_STATUS_SUMS..];
        let first_bad = sums
            .iter()
            .position(|s| !s.is_finite())
            .map(|i| format!("first in gradient {i} of shape {:?}", self.shapes[i]));
        Ok(ClipReport { norm_value: words[OPTIM_STATUS_NORM], loss: words[OPTIM_STATUS_LOSS], first_bad })
    }
}

/// The status words of `sums` (each gradient's sum of squares) and `loss`, as `optim_clip_status` computes them: the
/// same float64 operations in the same order.
fn status_words(sums: &[f64], loss: f64, max_norm: f64) -> Vec<f64> {
    let total = sums.iter().fold(0.0f64, |t, &s| t + s);
    let norm = total.sqrt();
    let mut words = vec![0.0; OPTIM_STATUS_SUMS];
    words[OPTIM_STATUS_NORM] = norm;
    words[OPTIM_STATUS_RATIO] = max_norm / (norm + CLIP_EPS);
    words[OPTIM_STATUS_OK] = f64::from(u8::from(norm.is_finite() && loss.is_finite()));
    words[OPTIM_STATUS_LOSS] = loss;
    words.extend_from_slice(sums);
    words
}

fn clip(grads: &mut [Tensor], max_norm: f64, loss: Option<&Tensor>) -> Result<Clip> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        bail!(Config, "clip_grad_norm: max_norm must be positive, got {max_norm}");
    }
    if let Some(loss) = loss {
        ensure!(loss.numel() == 1, Shape, "clipping: the loss must be one value, got shape {:?}", loss.shape());
    }
    let shapes = grads.iter().map(|g| g.shape().to_vec()).collect();
    if let Some(first_gpu) = grads.iter().position(|g| g.gpu_buffer().is_some()) {
        let decided = clip_gpu(grads, first_gpu, max_norm, loss)?;
        return Ok(Clip { decided, shapes });
    }
    let sums = grads.iter().map(|g| by_dtype!(g.dtype(), sum_squares_cpu(g))).collect::<Result<Vec<f64>>>()?;
    let loss = loss.map(Tensor::scalar).transpose()?.unwrap_or(0.0);
    let words = status_words(&sums, loss, max_norm);
    let ratio = words[OPTIM_STATUS_RATIO];
    if words[OPTIM_STATUS_OK] != 0.0 && ratio < 1.0 {
        for g in grads.iter_mut() {
            by_dtype!(g.dtype(), scale_in_place_cpu(g, ratio))?;
        }
    }
    Ok(Clip { decided: Decided::Host(words), shapes })
}

fn sum_squares_cpu<T: Real>(g: &Tensor) -> Result<f64> {
    Ok(g.cpu::<T>()?.iter().map(|&x| x.to_f64() * x.to_f64()).sum())
}

/// The most blocks (partial sums) per gradient of the sum of squares; a fixed number, so the summation order depends
/// only on the gradient's size.
const SQUARES_MAX_BLOCKS: usize = 512;

/// Clipping of gradients that are all on the GPU of `grads[first_gpu]`, in three launches and no copy back: per-block
/// float64 partial sums of squares, the status (`optim_clip_status`), and the scaling, which reads the status.
fn clip_gpu(grads: &mut [Tensor], first_gpu: usize, max_norm: f64, loss: Option<&Tensor>) -> Result<Decided> {
    let reference = grads[first_gpu].clone();
    for (i, g) in grads.iter().enumerate() {
        reference.check_same_kind(g, &format!("clip_grad_norm: gradient {i}"))?;
    }
    let not_on_gpu = |i: usize| Error::Mismatch(format!("clip_grad_norm: gradient {i} is not on the GPU"));
    let gpu = reference.gpu_buffer().ok_or_else(|| not_on_gpu(first_gpu))?.gpu.clone();
    let loss = loss.map(|l| l.gpu_operand::<f32>("clipping: the loss")).transpose()?;
    if let Some(l) = &loss {
        ensure!(Arc::ptr_eq(&l.gpu, &gpu), Mismatch, "clipping: the loss and the gradients are on different GPUs");
    }
    let blocks: Vec<usize> =
        grads.iter().map(|g| g.numel().div_ceil(OPTIM_THREADS).clamp(1, SQUARES_MAX_BLOCKS)).collect();
    let mut partial = gpu
        .stream()
        .alloc_zeros::<f64>(blocks.iter().sum())
        .map_err(driver_err("allocating the partial sums of clip_grad_norm"))?;
    let partial_at = gpu.ptr_mut(&mut partial);
    let mut table = TensorTable::default();
    let mut offset = 0;
    for (i, (g, &nb)) in grads.iter().zip(&blocks).enumerate() {
        let b = g.gpu_buffer().ok_or_else(|| not_on_gpu(i))?;
        table.push(&gpu, [0, b.ptr().address(), 0, partial_at.offset(offset).address(), 0], g.numel(), nb, false)?;
        offset += nb;
    }
    let mut status = gpu
        .stream()
        .alloc_zeros::<f64>(OPTIM_STATUS_SUMS + grads.len())
        .map_err(driver_err("allocating the clipping status"))?;
    let status_at = gpu.ptr_mut(&mut status);
    let p = OptimParams {
        max_norm,
        eps: CLIP_EPS,
        loss: loss.as_ref().map_or(ConstPtr::NULL, |l| l.ptr()),
        status: status_at,
        ..Default::default()
    };
    if let Some(table) = table.upload("clip_grad_norm")? {
        table.launch(kernel::optim_sum_squares_partial, p, "clip_grad_norm")?;
        table.launch_one_block(kernel::optim_clip_status, p, OPTIM_STATUS_THREADS, "clip_grad_norm status")?;
    }
    let mut scaling = TensorTable::default();
    for g in grads.iter_mut() {
        add_gpu_scale(&mut scaling, g)?;
    }
    scaling.launch(kernel::optim_scale_in_place, p, "clip_grad_norm scale")?;
    Ok(Decided::Device { gpu, status, status_at })
}

/// Adds a GPU gradient to the in-place scaling `table`, replacing it by a private copy first when its storage is
/// shared (whether it is scaled is decided on the GPU).
fn add_gpu_scale(table: &mut TensorTable, g: &mut Tensor) -> Result<()> {
    if g.storage_mut().is_err() {
        *g = gpu_copy(g)?;
    }
    let n = g.numel();
    let b = gpu_mut(g)?;
    let gpu = b.gpu.clone();
    table.push(&gpu, [b.ptr_mut().address(), 0, 0, 0, 0], n, TensorTable::elementwise_blocks(n), false)
}

fn scale_in_place_cpu<T: Real>(g: &mut Tensor, ratio: f64) -> Result<()> {
    let ratio = T::from_f64(ratio);
    for x in unique_host_mut::<T>(g)? {
        *x *= ratio;
    }
    Ok(())
}

/// nnU-Net's polynomial learning-rate schedule, `base_lr * (1 - epoch / max_epochs)^0.9`; 0 from `max_epochs` on.
pub fn poly_lr(base_lr: f64, epoch: usize, max_epochs: usize) -> f64 {
    if epoch >= max_epochs {
        return 0.0;
    }
    base_lr * (1.0 - epoch as f64 / max_epochs as f64).powf(POLY_EXPONENT)
}
