//! Profiling: NVTX ranges named by the network's parameter paths, and the per-op recorder behind
//! `lkm-engine profile`.
//!
//! Three kinds of range, all opened by the code that does the work and closed when their guard drops:
//! - a **layer** ([`layer`]): the parameter path of the module running, e.g. `encoder.stages.0.blocks.1.conv1`;
//! - an **op** ([`forward`], [`backward`]): `LAYER/KIND.fwd` or `LAYER/KIND.bwd`, e.g.
//!   `encoder.stages.0.blocks.1.conv1/conv3d.fwd`. In NVTX that path is the range stack itself: a `KIND.fwd` range
//!   nested in the layer's range, which is how Nsight tools write and filter nested ranges (`A/B`). The backward pass
//!   of an op runs with the layer it was recorded under (the tape keeps it) and pushes that layer's range around its
//!   `KIND.bwd` range, so `.bwd` ops carry the same paths as `.fwd` ones;
//! - a **phase** ([`phase`]) of a training step (`sample`, `to_device`, `forward`, `loss`, `backward`, `clip`,
//!   `optimiser`) or of prediction (`window_batch`).
//!
//! NVTX: ranges are pushed through the `nvtx` crate 1.x, which compiles the header-only NVTX3 C API with the system C
//! compiler (NVIDIA's own `nvtx` 2.x generates its bindings with bindgen and so needs libclang at build time, which a
//! plain cargo install does not have). They are only built and
//! pushed when a tool has injected itself (`NVTX_INJECTION64_PATH` is set, as Nsight Systems, Nsight Compute and
//! compute-sanitizer do) or `LKM_NVTX=1`; otherwise no name is even formatted, so an unprofiled run pays one relaxed
//! atomic load per op.
//!
//! The recorder ([`Recorder`]): while one is installed on the thread, every outermost op is timed (CUDA events on the
//! op's stream, the wall clock on the CPU) with its shapes, the bytes of its inputs and outputs and its FLOPs, every
//! phase likewise, and on the GPU every buffer allocation is tracked so that the tensors alive at the peak can be
//! listed with the op that made them. Ops nested inside another op are not timed twice (only the outermost one is).

pub mod report;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaStream};

use crate::device::Device;
use crate::tensor::Tensor;
use crate::Result;

/// Forward or backward half of an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Pass {
    /// The forward computation.
    Forward,
    /// The gradient computation, run by the tape.
    Backward,
}

impl Pass {
    /// `fwd` or `bwd`, the suffix of the op's range name.
    pub fn suffix(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::Backward => "bwd",
        }
    }
}

fn nvtx_flag() -> &'static AtomicBool {
    static FLAG: OnceLock<AtomicBool> = OnceLock::new();
    FLAG.get_or_init(|| {
        let injected = std::env::var_os("NVTX_INJECTION64_PATH").is_some_and(|v| !v.is_empty());
        let forced = std::env::var("LKM_NVTX").is_ok_and(|v| v == "1");
        AtomicBool::new(injected || forced)
    })
}

/// Whether NVTX ranges are pushed (a tool is attached, or `LKM_NVTX=1`).
pub fn nvtx_enabled() -> bool {
    nvtx_flag().load(Ordering::Relaxed)
}

/// Turns NVTX ranges on or off for this process (the step benchmark measures both).
pub fn set_nvtx(on: bool) {
    nvtx_flag().store(on, Ordering::Relaxed);
}

thread_local! {
    static LAYER: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
    static OP_DEPTH: Cell<usize> = const { Cell::new(0) };
    /// The phase and op being run, for the labels of tracked allocations.
    static CURRENT: RefCell<(&'static str, Option<Arc<str>>)> = const { RefCell::new(("", None)) };
}

fn recording() -> bool {
    RECORDER.with(|r| r.borrow().is_some())
}

/// Whether names are needed at all (NVTX on, or a recorder installed).
fn active() -> bool {
    nvtx_enabled() || recording()
}

/// A pushed NVTX range, popped when dropped.
struct NvtxRange;

impl NvtxRange {
    fn push(name: &str) -> NvtxRange {
        nvtx::range_push!("{name}");
        NvtxRange
    }
}

impl Drop for NvtxRange {
    fn drop(&mut self) {
        nvtx::range_pop!();
    }
}

/// The NVTX/profile name of an op: `LAYER/KIND.fwd`, or `KIND.fwd` outside any layer.
pub fn op_name(layer: Option<&str>, kind: &str, pass: Pass) -> String {
    match layer {
        Some(l) => format!("{l}/{kind}.{}", pass.suffix()),
        None => format!("{kind}.{}", pass.suffix()),
    }
}

/// Restores the enclosing layer when dropped.
pub struct LayerScope {
    previous: Option<Option<Arc<str>>>,
    _nvtx: Option<NvtxRange>,
}

/// Enters the module whose parameters live under `path` (its `state_dict` prefix) until the guard drops.
pub fn layer(path: &str) -> LayerScope {
    if !active() {
        return LayerScope { previous: None, _nvtx: None };
    }
    let previous = LAYER.with(|l| l.replace(Some(Arc::from(path))));
    let nvtx = nvtx_enabled().then(|| NvtxRange::push(path));
    LayerScope { previous: Some(previous), _nvtx: nvtx }
}

impl Drop for LayerScope {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            LAYER.with(|l| *l.borrow_mut() = previous);
        }
    }
}

/// Enters the sub-module `child` of the module at `prefix` (`{prefix}.{child}`); the path is only formatted while
/// profiling.
pub fn sublayer(prefix: &str, child: &str) -> LayerScope {
    if !active() {
        return LayerScope { previous: None, _nvtx: None };
    }
    layer(&format!("{prefix}.{child}"))
}

/// The layer ops are being recorded under (None when profiling is off, or outside every layer). The tape keeps it
/// with each node so that the backward pass is named after the same layer.
pub fn current_layer() -> Option<Arc<str>> {
    if !active() {
        return None;
    }
    LAYER.with(|l| l.borrow().clone())
}

/// The bytes a tensor occupies.
pub fn tensor_bytes(t: &Tensor) -> f64 {
    (t.numel() * t.dtype().size()) as f64
}

/// A point in time on a device: a CUDA event on the stream, or the host clock.
enum Mark {
    Host(Instant),
    Gpu(CudaEvent),
}

impl Mark {
    fn now(stream: Option<&Arc<CudaStream>>) -> Option<Mark> {
        match stream {
            Some(s) => {
                let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                s.record_event(flags).ok().map(Mark::Gpu)
            }
            None => Some(Mark::Host(Instant::now())),
        }
    }

    /// Milliseconds from `base` to this mark (GPU marks only after the stream has reached them).
    fn ms_since(&self, base: &Mark) -> f64 {
        match (base, self) {
            (Mark::Host(a), Mark::Host(b)) => b.duration_since(*a).as_secs_f64() * 1e3,
            (Mark::Gpu(a), Mark::Gpu(b)) => a.elapsed_ms(b).map(f64::from).unwrap_or(f64::NAN),
            _ => f64::NAN,
        }
    }
}

/// One timed op call or phase, as the recorder keeps it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Record {
    /// The op kind (`conv3d`, `selective_scan`, ...) or the phase name.
    pub kind: &'static str,
    /// Forward or backward (phases: forward).
    pub pass: Pass,
    /// The layer's parameter path, if the op ran inside one.
    pub layer: Option<String>,
    /// The phase of the step it ran in.
    pub phase: &'static str,
    /// Input shapes, e.g. `[2, 32, 40, 224, 192] x [32, 32, 3, 3, 3]`.
    pub shapes: String,
    /// Bytes of the inputs and outputs (a lower bound of the memory traffic).
    pub bytes: f64,
    /// Floating-point operations (multiply and add counted separately; 0 where not counted).
    pub flops: f64,
    /// Start, milliseconds after the recorder's start.
    pub start_ms: f64,
    /// Duration in milliseconds.
    pub ms: f64,
}

struct Pending {
    record: Record,
    start: Mark,
    end: Option<Mark>,
}

/// One allocation alive at the memory peak.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LiveTensor {
    /// Its size.
    pub bytes: usize,
    /// The op (and layer) that allocated it, and what the op called it.
    pub made_by: String,
}

/// The buffers alive at the memory peak that one kind of op made (its kind and pass, every layer together), or that
/// were made outside any op (named by their phase and what they are).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryByOp {
    /// The op kind and pass (`conv3d.fwd`), or the phase and the buffer's name outside ops.
    pub made_by: String,
    /// Their total size.
    pub bytes: usize,
    /// How many buffers.
    pub buffers: usize,
}

/// The op kind and pass of a buffer's `made_by` ("layer/conv3d.fwd: conv output" -> "conv3d.fwd"); the whole of it
/// when it was made outside any op.
fn op_kind(made_by: &str) -> &str {
    match made_by.split_once(": ") {
        Some((op, _)) if op.contains('.') => op.rsplit('/').next().unwrap_or(op),
        _ => made_by,
    }
}

/// Every live buffer grouped by [`op_kind`], largest total first.
fn by_op(live: &HashMap<u64, LiveTensor>) -> Vec<MemoryByOp> {
    let mut groups: HashMap<&str, (usize, usize)> = HashMap::new();
    for t in live.values() {
        let g = groups.entry(op_kind(&t.made_by)).or_default();
        g.0 += t.bytes;
        g.1 += 1;
    }
    let mut out: Vec<MemoryByOp> =
        groups.into_iter().map(|(k, (bytes, buffers))| MemoryByOp { made_by: k.to_string(), bytes, buffers }).collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.made_by.cmp(&b.made_by)));
    out
}

#[derive(Default)]
struct Memory {
    next_id: u64,
    live: HashMap<u64, LiveTensor>,
    live_bytes: usize,
    peak_bytes: usize,
    at_peak: Vec<LiveTensor>,
    by_op_at_peak: Vec<MemoryByOp>,
}

/// What a recorder collected: per-op and per-phase records and the memory peak.
pub struct Recording {
    /// Every outermost op call, in order.
    pub ops: Vec<Record>,
    /// Every phase, in order.
    pub phases: Vec<Record>,
    /// The most bytes of tracked GPU buffers alive at once (0 on the CPU).
    pub peak_bytes: usize,
    /// The ten largest buffers alive at that peak.
    pub at_peak: Vec<LiveTensor>,
    /// Every buffer alive at that peak, grouped by the kind of op that made it: the step's memory plan (what the
    /// forward pass leaves for the backward pass, and the gradients, where the peak falls).
    pub by_op_at_peak: Vec<MemoryByOp>,
}

/// Collects timed records of the ops and phases run on this thread while installed ([`Recorder::install`]).
pub struct Recorder {
    stream: Option<Arc<CudaStream>>,
    base: Mark,
    ops: Vec<Pending>,
    phases: Vec<Pending>,
    memory: Memory,
}

impl Recorder {
    /// Installs a recorder on this thread for work on `device`; [`Recorder::finish`] removes it.
    pub fn install(device: &Device) -> Result<()> {
        let stream = match device {
            Device::Cuda(gpu) => Some(gpu.stream().clone()),
            Device::Cpu => None,
        };
        let base = Mark::now(stream.as_ref())
            .ok_or_else(|| crate::Error::Device("recording the profiler's start event".into()))?;
        let recorder = Recorder { stream, base, ops: Vec::new(), phases: Vec::new(), memory: Memory::default() };
        RECORDER.with(|r| *r.borrow_mut() = Some(recorder));
        Ok(())
    }

    /// Removes this thread's recorder and resolves its times (waiting for the GPU to reach every event).
    pub fn finish() -> Result<Recording> {
        let recorder = RECORDER
            .with(|r| r.borrow_mut().take())
            .ok_or_else(|| crate::Error::Config("no profiler recorder is installed".into()))?;
        if let Some(s) = &recorder.stream {
            s.synchronize().map_err(crate::device::cuda::driver_err("waiting for the profiled work"))?;
        }
        let resolve = |pending: Vec<Pending>| -> Vec<Record> {
            pending
                .into_iter()
                .filter_map(|p| {
                    let end = p.end?;
                    let mut r = p.record;
                    r.start_ms = p.start.ms_since(&recorder.base);
                    r.ms = end.ms_since(&p.start);
                    Some(r)
                })
                .collect()
        };
        Ok(Recording {
            ops: resolve(recorder.ops),
            phases: resolve(recorder.phases),
            peak_bytes: recorder.memory.peak_bytes,
            at_peak: recorder.memory.at_peak,
            by_op_at_peak: recorder.memory.by_op_at_peak,
        })
    }
}

fn with_recorder<R>(f: impl FnOnce(&mut Recorder) -> R) -> Option<R> {
    RECORDER.with(|r| r.borrow_mut().as_mut().map(f))
}

/// Tracks a new GPU buffer of `bytes` while a recorder is installed; returns its id for [`track_free`].
pub fn track_alloc(bytes: usize, what: &str) -> Option<u64> {
    with_recorder(|rec| {
        let m = &mut rec.memory;
        m.next_id += 1;
        let made_by = CURRENT.with(|c| {
            let c = c.borrow();
            match &c.1 {
                Some(op) => format!("{op}: {what}"),
                None if !c.0.is_empty() => format!("{}: {what}", c.0),
                None => what.to_string(),
            }
        });
        m.live.insert(m.next_id, LiveTensor { bytes, made_by });
        m.live_bytes += bytes;
        if m.live_bytes > m.peak_bytes {
            m.peak_bytes = m.live_bytes;
            let mut live: Vec<LiveTensor> = m.live.values().cloned().collect();
            live.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.made_by.cmp(&b.made_by)));
            live.truncate(10);
            m.at_peak = live;
            m.by_op_at_peak = by_op(&m.live);
        }
        m.next_id
    })
}

/// Forgets a buffer tracked by [`track_alloc`].
pub fn track_free(id: u64) {
    with_recorder(|rec| {
        if let Some(t) = rec.memory.live.remove(&id) {
            rec.memory.live_bytes -= t.bytes;
        }
    });
}

/// The guard of an op's range: ends the NVTX range and the op's timing when dropped or [`OpRange::done`].
pub struct OpRange {
    /// The op's NVTX range and, in the backward pass, its layer's range around it (dropped in this order).
    _nvtx: Option<(NvtxRange, Option<NvtxRange>)>,
    /// The index of the op's pending record in the recorder, when it is timed.
    timed: Option<usize>,
    previous_op: Option<Option<Arc<str>>>,
}

/// Opens the forward range of op `kind` on `inputs`, under the current layer; `flops` is its operation count.
pub fn forward(kind: &'static str, inputs: &[&Tensor], flops: f64) -> OpRange {
    if !active() {
        return OpRange { _nvtx: None, timed: None, previous_op: None };
    }
    open_op(kind, Pass::Forward, current_layer(), inputs, flops)
}

/// Opens the backward range of op `kind` recorded under `layer`, given its output gradient.
pub fn backward(kind: &'static str, layer: Option<Arc<str>>, grad_out: &Tensor, flops: f64) -> OpRange {
    if !active() {
        return OpRange { _nvtx: None, timed: None, previous_op: None };
    }
    open_op(kind, Pass::Backward, layer, &[grad_out], flops)
}

fn open_op(kind: &'static str, pass: Pass, layer: Option<Arc<str>>, inputs: &[&Tensor], flops: f64) -> OpRange {
    let name: Arc<str> = Arc::from(op_name(layer.as_deref(), kind, pass));
    let nvtx = nvtx_enabled().then(|| {
        let layer_range = (pass == Pass::Backward).then(|| layer.as_deref().map(NvtxRange::push)).flatten();
        (NvtxRange::push(&format!("{kind}.{}", pass.suffix())), layer_range)
    });
    let previous_op = Some(CURRENT.with(|c| c.borrow_mut().1.replace(name)));
    let depth = OP_DEPTH.with(|d| d.replace(d.get() + 1));
    let timed = if depth == 0 {
        with_recorder(|rec| {
            let start = Mark::now(rec.stream.as_ref())?;
            let shapes = inputs.iter().map(|t| format!("{:?}", t.shape())).collect::<Vec<_>>().join(" x ");
            let record = Record {
                kind,
                pass,
                layer: layer.as_deref().map(str::to_string),
                phase: CURRENT.with(|c| c.borrow().0),
                shapes,
                bytes: inputs.iter().map(|t| tensor_bytes(t)).sum(),
                flops,
                start_ms: 0.0,
                ms: 0.0,
            };
            rec.ops.push(Pending { record, start, end: None });
            Some(rec.ops.len() - 1)
        })
        .flatten()
    } else {
        None
    };
    OpRange { _nvtx: nvtx, timed, previous_op }
}

impl OpRange {
    /// Ends the range, counting the bytes of what the op produced.
    pub fn done<'a>(self, outputs: impl IntoIterator<Item = &'a Tensor>) {
        if let Some(i) = self.timed {
            let bytes: f64 = outputs.into_iter().map(tensor_bytes).sum();
            with_recorder(|rec| rec.ops[i].record.bytes += bytes);
        }
    }
}

impl Drop for OpRange {
    fn drop(&mut self) {
        let Some(previous) = self.previous_op.take() else { return };
        if let Some(i) = self.timed {
            with_recorder(|rec| rec.ops[i].end = Mark::now(rec.stream.as_ref()));
        }
        OP_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        CURRENT.with(|c| c.borrow_mut().1 = previous);
    }
}

/// The guard of a phase's range.
pub struct PhaseRange {
    _nvtx: Option<NvtxRange>,
    timed: Option<usize>,
    previous: Option<&'static str>,
}

/// Opens phase `name` of a training step or of prediction until the guard drops.
pub fn phase(name: &'static str) -> PhaseRange {
    if !active() {
        return PhaseRange { _nvtx: None, timed: None, previous: None };
    }
    let nvtx = nvtx_enabled().then(|| NvtxRange::push(name));
    let previous = CURRENT.with(|c| std::mem::replace(&mut c.borrow_mut().0, name));
    let timed = with_recorder(|rec| {
        let start = Mark::now(rec.stream.as_ref())?;
        let record = Record {
            kind: name,
            pass: Pass::Forward,
            layer: None,
            phase: name,
            shapes: String::new(),
            bytes: 0.0,
            flops: 0.0,
            start_ms: 0.0,
            ms: 0.0,
        };
        rec.phases.push(Pending { record, start, end: None });
        Some(rec.phases.len() - 1)
    })
    .flatten();
    PhaseRange { _nvtx: nvtx, timed, previous: Some(previous) }
}

impl Drop for PhaseRange {
    fn drop(&mut self) {
        let Some(previous) = self.previous.take() else { return };
        if let Some(i) = self.timed {
            with_recorder(|rec| rec.phases[i].end = Mark::now(rec.stream.as_ref()));
        }
        CURRENT.with(|c| c.borrow_mut().0 = previous);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory plan groups every buffer alive at the peak by the kind of op that made it (all layers together),
    /// and buffers made outside ops by their phase and name; buffers freed before the peak are not in it.
    #[test]
    fn memory_plan_groups_the_peak_by_op() {
        let x = Tensor::from_vec(vec![0.0f32; 4], &[4]).unwrap();
        Recorder::install(&Device::Cpu).unwrap();
        let mut ids = Vec::new();
        {
            let _phase = phase("forward");
            for layer in ["stages.0", "stages.1"] {
                let _layer = self::layer(layer);
                let range = forward("conv3d", &[&x], 0.0);
                ids.push(track_alloc(100, "conv output").unwrap());
                range.done([&x]);
            }
            let range = forward("add", &[&x], 0.0);
            let freed = track_alloc(1000, "sum").unwrap();
            track_free(freed);
            range.done([&x]);
            ids.push(track_alloc(30, "momentum").unwrap());
        }
        let recording = Recorder::finish().unwrap();
        assert_eq!(recording.peak_bytes, 1200, "the peak is while the sum was alive");
        let plan: Vec<(&str, usize, usize)> =
            recording.by_op_at_peak.iter().map(|g| (g.made_by.as_str(), g.bytes, g.buffers)).collect();
        assert_eq!(plan, [("add.fwd", 1000, 1), ("conv3d.fwd", 200, 2)]);
        assert_eq!(op_kind("forward: momentum"), "forward: momentum");
        assert_eq!(op_kind("stages.1/conv3d.bwd: dx"), "conv3d.bwd");
    }
}
