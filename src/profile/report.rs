//! What `lkm-engine profile` prints and writes: the per-op table, roll-ups by op kind and by network stage, the step
//! time beside the sum of the per-op times, the memory peak, a CSV of every row and a Chrome trace-event JSON.
//!
//! Throughput is judged against two ceilings measured in the same run ([`Ceilings::measure`]): the device copy
//! bandwidth (bytes read plus bytes written per second of a large device-to-device copy) and the bf16 tensor-core
//! rate of `mma.sync` (`cuda/peak.cu`). An op's bytes are those of its inputs and outputs (a lower bound of its
//! traffic), its FLOPs the count its op file gives (0 for memory-bound ops).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use super::{Pass, Record, Recording};
use crate::device::params::{kernel, PeakParams, PEAK_THREADS};
use crate::device::Device;
use crate::Result;

/// The machine's ceilings, measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ceilings {
    /// The device's name.
    pub device: String,
    /// Copy bandwidth, GB/s (read + write).
    pub copy_gbps: f64,
    /// bf16 tensor-core rate of mma.sync, TFLOP/s (None on the CPU).
    pub bf16_tflops: Option<f64>,
}

impl Ceilings {
    /// Measures the copy bandwidth (a 1 GiB device-to-device copy on the GPU, a 256 MiB copy on the host) and, on
    /// the GPU, the bf16 mma.sync rate; the best of 5 timed runs each.
    pub fn measure(device: &Device) -> Result<Ceilings> {
        match device {
            Device::Cuda(gpu) => {
                let n = 1usize << 28;
                let src = gpu.zeros(n, "copy-bandwidth source")?;
                let mut dst = gpu.alloc(n, "copy-bandwidth destination")?;
                let copy_ms = best(gpu.time_ms(1, 5, || gpu.copy(&src, &mut dst))?);
                drop((src, dst));
                let (blocks, threads, iters) = (4096usize, PEAK_THREADS, 512i32);
                let mut out = gpu.alloc(blocks * threads, "mma peak output")?;
                let cfg = crate::device::cuda::LaunchConfig {
                    grid_dim: (blocks as u32, 1, 1),
                    block_dim: (threads as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                let params = PeakParams { out: out.ptr_mut(), iters };
                let mma_ms = best(gpu.time_ms(1, 5, || gpu.launch(kernel::peak_mma_bf16, cfg, &params, "peak"))?);
                let flops = (blocks * threads / 32) as f64 * f64::from(iters) * 4.0 * (2 * 16 * 8 * 16) as f64;
                Ok(Ceilings {
                    device: gpu.name().to_string(),
                    copy_gbps: 2.0 * (n * 4) as f64 / (copy_ms * 1e6),
                    bf16_tflops: Some(flops / (mma_ms * 1e9)),
                })
            }
            Device::Cpu => {
                let src = vec![1.0f32; 1 << 26];
                let mut dst = vec![0.0f32; 1 << 26];
                let mut times = Vec::new();
                for _ in 0..5 {
                    let t0 = Instant::now();
                    dst.copy_from_slice(&src);
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                    std::hint::black_box(&mut dst);
                }
                Ok(Ceilings {
                    device: "cpu".into(),
                    copy_gbps: 2.0 * (src.len() * 4) as f64 / (best(times) * 1e6),
                    bf16_tflops: None,
                })
            }
        }
    }
}

fn best(times: Vec<f64>) -> f64 {
    times.into_iter().fold(f64::INFINITY, f64::min)
}

/// One row of the per-op table: every call of one op kind and pass in one layer on one set of shapes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// `conv3d.fwd`, `selective_scan.bwd`, ...
    pub op: String,
    /// The layer's parameter path ("-" outside any layer).
    pub layer: String,
    /// The network stage ([`stage_of`]).
    pub stage: String,
    /// The phase of the step its calls ran in.
    pub phase: &'static str,
    /// Input shapes.
    pub shapes: String,
    /// Calls per step.
    pub calls: f64,
    /// Milliseconds per step.
    pub ms: f64,
    /// Bytes per step.
    pub bytes: f64,
    /// FLOPs per step.
    pub flops: f64,
}

impl Row {
    fn gbps(&self) -> f64 {
        self.bytes / (self.ms * 1e6)
    }

    fn tflops(&self) -> f64 {
        self.flops / (self.ms * 1e9)
    }
}

/// The stage of the network a layer belongs to: `encoder s` for the stem and encoder level s (its residual blocks and
/// its PiM and PaM layers), `decoder i` for decoder stage i (its transposed conv, blocks and segmentation head), or,
/// outside any layer, the phase (loss, clip, optimiser).
pub fn stage_of(layer: Option<&str>, phase: &str) -> String {
    let Some(layer) = layer else { return phase.to_string() };
    let mut parts = layer.split('.');
    let side = parts.next().unwrap_or("");
    if layer.starts_with("encoder.stem") {
        return "encoder 0".into();
    }
    match parts.find_map(|p| p.parse::<usize>().ok()) {
        Some(i) => format!("{side} {i}"),
        None => side.to_string(),
    }
}

/// Every op call of a recording aggregated into rows, per step (divided by `steps`), slowest first.
pub fn rows(recording: &Recording, steps: usize) -> Vec<Row> {
    let mut by_key: BTreeMap<(String, String, String), Row> = BTreeMap::new();
    let per = 1.0 / steps.max(1) as f64;
    for r in &recording.ops {
        let op = format!("{}.{}", r.kind, r.pass.suffix());
        let layer = r.layer.clone().unwrap_or_else(|| "-".into());
        let row = by_key.entry((op.clone(), layer.clone(), r.shapes.clone())).or_insert_with(|| Row {
            op,
            stage: stage_of(r.layer.as_deref(), r.phase),
            phase: r.phase,
            layer,
            shapes: r.shapes.clone(),
            calls: 0.0,
            ms: 0.0,
            bytes: 0.0,
            flops: 0.0,
        });
        row.calls += per;
        row.ms += r.ms * per;
        row.bytes += r.bytes * per;
        row.flops += r.flops * per;
    }
    let mut rows: Vec<Row> = by_key.into_values().collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.layer.cmp(&b.layer)));
    rows
}

/// Rows summed by `key` (op kind, stage), slowest first.
fn roll_up(rows: &[Row], key: impl Fn(&Row) -> String) -> Vec<(String, f64, f64, f64)> {
    let mut sums: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
    for r in rows {
        let e = sums.entry(key(r)).or_default();
        e.0 += r.ms;
        e.1 += r.bytes;
        e.2 += r.flops;
    }
    let mut out: Vec<_> = sums.into_iter().map(|(k, (ms, b, f))| (k, ms, b, f)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// The measured step times that frame the per-op table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepTimes {
    /// Median host-timed step with no per-op events and no NVTX ranges.
    pub plain_ms: f64,
    /// Median host time to queue that step (everything launched, before the read-back that waits for the GPU): near
    /// `plain_ms`, the GPU waits for the host's launches.
    pub queue_ms: f64,
    /// Kernel launches per step (0 on the CPU): with `queue_ms`, the host's time per launch.
    pub launches: f64,
    /// Median host-timed step with NVTX ranges pushed (no per-op events).
    pub nvtx_ms: f64,
    /// Steps recorded per op.
    pub steps: usize,
}

fn pct(part: f64, whole: f64) -> String {
    if whole > 0.0 && part.is_finite() {
        format!("{:.1}", 100.0 * part / whole)
    } else {
        "-".into()
    }
}

fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

/// The printed report: header, the `top` slowest rows, roll-ups, step time against the sum of ops, memory.
pub fn render(
    title: &str,
    recording: &Recording,
    times: &StepTimes,
    ceilings: &Ceilings,
    pool_peak_bytes: Option<u64>,
    top: usize,
) -> String {
    let rows = rows(recording, times.steps);
    let ops_ms: f64 = rows.iter().map(|r| r.ms).sum();
    let per = 1.0 / times.steps.max(1) as f64;
    let phase_ms = |name: &str| recording.phases.iter().filter(|p| p.kind == name).map(|p| p.ms).sum::<f64>() * per;
    let step_ms = phase_ms("train_step");
    let mut s = String::new();
    let tflops = ceilings.bf16_tflops.map_or("-".into(), |t| format!("{t:.0} TFLOP/s"));
    let _ = writeln!(
        s,
        "{title} on {}: ceilings measured now: copy {:.0} GB/s, bf16 mma.sync {tflops}",
        ceilings.device, ceilings.copy_gbps
    );
    let _ = writeln!(
        s,
        "step: {:.2} ms (median, no per-op events, NVTX off; queued by the host in {:.2} ms, {:.0} kernel launches), \
         {:.2} ms with NVTX ranges pushed; recorded step {:.2} ms, sum of its op times {:.2} ms ({}%)\n",
        times.plain_ms,
        times.queue_ms,
        times.launches,
        times.nvtx_ms,
        step_ms,
        ops_ms,
        pct(ops_ms, step_ms)
    );
    let header = format!(
        "{:<22} {:<46} {:<44} {:>6} {:>9} {:>6} {:>8} {:>6} {:>8} {:>6}",
        "op", "layer", "shapes", "calls", "ms", "% step", "GB/s", "% copy", "TFLOP/s", "% mma"
    );
    let _ = writeln!(s, "{header}\n{}", "-".repeat(header.len()));
    let clip = |t: &str, n: usize| if t.len() > n { format!("{}~", &t[..n - 1]) } else { t.to_string() };
    for r in rows.iter().take(top) {
        let (tf, tf_pct) = if r.flops > 0.0 {
            (format!("{:.2}", r.tflops()), ceilings.bf16_tflops.map_or("-".into(), |c| pct(r.tflops(), c)))
        } else {
            ("-".into(), "-".into())
        };
        let _ = writeln!(
            s,
            "{:<22} {:<46} {:<44} {:>6.0} {:>9.3} {:>6} {:>8.0} {:>6} {:>8} {:>6}",
            clip(&r.op, 22),
            clip(&r.layer, 46),
            clip(&r.shapes, 44),
            r.calls,
            r.ms,
            pct(r.ms, step_ms),
            r.gbps(),
            pct(r.gbps(), ceilings.copy_gbps),
            tf,
            tf_pct
        );
    }
    if rows.len() > top {
        let rest: f64 = rows[top..].iter().map(|r| r.ms).sum();
        let _ = writeln!(s, "... {} more rows, {:.3} ms ({}%)", rows.len() - top, rest, pct(rest, step_ms));
    }
    for (title, key) in [("op kind", 0), ("stage", 1)] {
        let sums = roll_up(&rows, |r| if key == 0 { r.op.clone() } else { r.stage.clone() });
        let _ = writeln!(s, "\nby {title}:");
        for (k, ms, bytes, flops) in sums {
            let rate = if flops > 0.0 { format!("  {:.2} TFLOP/s", flops / (ms * 1e9)) } else { String::new() };
            let _ =
                writeln!(s, "  {k:<28} {ms:>10.3} ms {:>6}%  {:>8.0} GB/s{rate}", pct(ms, step_ms), bytes / (ms * 1e6));
        }
    }
    let _ = writeln!(s, "\nby phase (time in the phase, of it in ops, the rest: launch gaps and host work):");
    for name in ["forward", "loss", "backward", "clip", "optimiser"] {
        let total = phase_ms(name);
        let in_ops: f64 = rows.iter().filter(|r| r.phase == name).map(|r| r.ms).sum();
        let _ = writeln!(s, "  {name:<10} {total:>10.3} ms  ops {in_ops:>10.3} ms  rest {:>9.3} ms", total - in_ops);
    }
    let between =
        step_ms - ["forward", "loss", "backward", "clip", "optimiser"].iter().map(|p| phase_ms(p)).sum::<f64>();
    let _ = writeln!(s, "  between phases (the clipping status read back, gradient gathering): {between:.3} ms");
    let _ = writeln!(s, "\nmemory:");
    match pool_peak_bytes {
        Some(p) => {
            let _ = writeln!(
                s,
                "  pool peak {:.2} GiB; tracked tensors at their peak {:.2} GiB; the largest then:",
                gib(p as f64),
                gib(recording.peak_bytes as f64)
            );
            for t in &recording.at_peak {
                let _ = writeln!(s, "  {:>9.3} GiB  {}", gib(t.bytes as f64), t.made_by);
            }
            let _ = writeln!(s, "  every buffer alive then, by the op that made it (the memory plan):");
            for g in recording.by_op_at_peak.iter().take(top.max(12)) {
                let _ = writeln!(s, "  {:>9.3} GiB  {:>5} buffers  {}", gib(g.bytes as f64), g.buffers, g.made_by);
            }
        }
        None => {
            let _ = writeln!(s, "  (not tracked on the CPU)");
        }
    }
    s
}

/// Every row as CSV (op, layer, stage, shapes, calls, ms, bytes, flops per step, GB/s, TFLOP/s).
pub fn csv(recording: &Recording, steps: usize) -> String {
    let mut s =
        String::from("op,layer,stage,shapes,calls_per_step,ms_per_step,bytes_per_step,flops_per_step,gbps,tflops\n");
    for r in rows(recording, steps) {
        let _ = writeln!(
            s,
            "{},{},{},\"{}\",{},{:.6},{:.0},{:.0},{:.3},{:.4}",
            r.op,
            r.layer,
            r.stage,
            r.shapes,
            r.calls,
            r.ms,
            r.bytes,
            r.flops,
            r.gbps(),
            r.tflops()
        );
    }
    s
}

/// Chrome trace-event JSON (Perfetto, chrome://tracing): one complete event ("X") per op call on thread 1 and per
/// phase on thread 0, microseconds from the recorder's start.
pub fn trace_json(recording: &Recording) -> serde_json::Value {
    let event = |r: &Record, tid: u32| {
        let name = match r.pass {
            Pass::Forward if tid == 0 => r.kind.to_string(),
            _ => super::op_name(r.layer.as_deref(), r.kind, r.pass),
        };
        serde_json::json!({
            "name": name,
            "cat": if tid == 0 { "phase" } else { r.pass.suffix() },
            "ph": "X",
            "ts": r.start_ms * 1e3,
            "dur": r.ms * 1e3,
            "pid": 1,
            "tid": tid,
            "args": { "shapes": r.shapes, "bytes": r.bytes, "flops": r.flops, "phase": r.phase },
        })
    };
    let events: Vec<_> =
        recording.phases.iter().map(|r| event(r, 0)).chain(recording.ops.iter().map(|r| event(r, 1))).collect();
    serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}
