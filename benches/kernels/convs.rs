//! Every convolution shape of the two reference training steps, each role timed alone beside cuDNN (see the usage in
//! kernels.rs). A row is one distinct shape (`ModelConfig::convolutions`: the first layer that has it and how many
//! layers do) and one role: `fprop` (the forward), `dgrad` (the input gradient) or `wgrad` (the weight and bias
//! gradients), in bf16 (bf16 storage, bf16 tensor cores) and tf32 (float32 storage, tf32 tensor cores). FLOPs are the
//! forward's (`ConvUse::flops`; each gradient role does as many). The ratio is cuDNN's time over ours (above 1: we
//! are faster); the per-role summary gives the median and the minimum ratio over shapes and the step's total
//! (each shape's time times its count).

use std::collections::BTreeMap;
use std::sync::Arc;

use lkm_engine::autograd::Tape;
use lkm_engine::device::{Device, Gpu};
use lkm_engine::nn::{ConvKind, ConvUse, ModelConfig};
use lkm_engine::ops;
use lkm_engine::tensor::DType;
use lkm_engine::{Error, Result, Tensor};

use super::median;

/// The configurations and batch sizes of the reference steps.
const STEPS: [(&str, usize); 2] = [("flare-3d", 2), ("amos-2d", 12)];
/// The roles, in table order.
const ROLES: [&str; 3] = ["fprop", "dgrad", "wgrad"];
/// Our maths: (name, activation storage).
const MATHS: [(&str, DType); 2] = [("bf16", DType::BF16), ("tf32", DType::F32)];

/// The row name both benchmarks use: config, first layer, role, math.
fn row_name(config: &str, conv: &ConvUse, role: &str, math: &str) -> String {
    format!("{config} {} {role} {math}", conv.layer)
}

fn shapes() -> Result<Vec<(&'static str, ConvUse)>> {
    let mut out = Vec::new();
    for (name, batch) in STEPS {
        out.extend(ModelConfig::by_name(name)?.convolutions(batch).into_iter().map(|c| (name, c)));
    }
    Ok(out)
}

/// Writes the shape list for tools/bench_torch.py --convs: one entry per shape with its layer, kind, input, weight,
/// stride, count and FLOPs.
pub fn write_list(path: &str) -> Result<()> {
    let list: Vec<serde_json::Value> = shapes()?
        .iter()
        .map(|(config, c)| {
            serde_json::json!({
                "config": config, "layer": c.layer, "transposed": c.kind == ConvKind::Transposed,
                "bias": c.bias(), "input": c.input, "weight": c.weight, "stride": c.stride, "count": c.count,
                "flops": c.flops(),
                "names": ROLES.iter().map(|r| {
                    MATHS.iter().map(|(m, _)| row_name(config, c, r, m)).collect::<Vec<_>>()
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let text = serde_json::to_string_pretty(&list).map_err(|e| Error::Io(format!("{path}: {e}")))?;
    std::fs::write(path, text).map_err(|e| Error::Io(format!("{path}: {e}")))?;
    eprintln!("wrote {} convolution shapes to {path}", list.len());
    Ok(())
}

/// One (config, role, math) over all shapes: the ratios cuDNN / ours, and both step totals (time x count).
#[derive(Default)]
struct RoleSummary {
    ratios: Vec<f64>,
    ours_ms: f64,
    cudnn_ms: f64,
}

/// Median milliseconds of the forward, the input gradient and the weight (and bias) gradient of one shape, inputs
/// stored as `dtype`: each gradient role is its backward pass timed alone, after an untimed forward that records it.
fn time_roles(gpu: &Arc<Gpu>, c: &ConvUse, dtype: DType) -> Result<[f64; 3]> {
    let dev = Device::Cuda(gpu.clone());
    let randn = |shape: &[usize], scale: f64, seed: u64| super::randn(&dev, shape, scale, seed).to_dtype(dtype);
    let cout = if c.kind == ConvKind::Transposed { c.weight[1] } else { c.weight[0] };
    let inputs = [randn(&c.input, 1.0, 1)?, randn(&c.weight, 0.05, 2)?, randn(&[cout], 0.1, 3)?];
    let bias = c.bias();
    let forward = |tape: &mut Tape, i: &[Tensor]| -> Result<Tensor> {
        let b = bias.then_some(&i[2]);
        match c.kind {
            ConvKind::Transposed => ops::conv_transpose::conv_transpose(tape, &i[0], &i[1], b),
            _ => ops::conv::conv(tape, &i[0], &i[1], b, &c.stride),
        }
    };
    let seed = {
        let y = forward(&mut Tape::no_grad(), &inputs)?;
        randn(y.shape(), 1.0, 4)?
    };
    let (warmup, reps) = (2, 7);
    let fwd = median(gpu.time_ms(warmup, reps, || forward(&mut Tape::no_grad(), &inputs).map(drop))?);
    // A role's backward computes only the gradients of the inputs its tape watches.
    let backward = |watched: &[usize]| -> Result<f64> {
        let recorded = || -> Result<(Tape, Tensor)> {
            let mut tape = Tape::new();
            for &i in watched.iter().filter(|&&i| i < 2 || bias) {
                tape.watch(&inputs[i]);
            }
            let y = forward(&mut tape, &inputs)?;
            Ok((tape, y))
        };
        let run = |(mut tape, y): (Tape, Tensor)| tape.backward_from(&y, seed.clone()).map(drop);
        Ok(median(gpu.time_ms_after(warmup, reps, recorded, run)?))
    };
    Ok([fwd, backward(&[0])?, backward(&[1, 2])?])
}

/// Times every shape in both maths and prints (and writes to `out`) the table beside cuDNN's rows of
/// `torch` (tools/bench_torch.py --convs).
/// `maths` (comma-separated, default both) picks which of our maths to time; the others' cells read "-".
pub fn run(list: &str, torch: Option<String>, out: Option<String>, maths: Option<String>) -> Result<()> {
    let maths = maths.unwrap_or_else(|| "bf16,tf32".into());
    let timed: Vec<bool> = MATHS.iter().map(|(m, _)| maths.split(',').any(|x| x == *m)).collect();
    if !timed.contains(&true) {
        return Err(Error::Config(format!("--maths {maths}: choose from bf16, tf32")));
    }
    let gpu = Gpu::new(0)?;
    gpu.set_exact_f32(false);
    let read = |p: &str| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(p).map_err(|e| Error::Io(format!("{p}: {e}")))?;
        serde_json::from_str(&text).map_err(|e| Error::Io(format!("{p}: {e}")))
    };
    let list_json = read(list)?;
    let listed: Vec<(&str, &str)> = list_json
        .as_array()
        .map_or(vec![], |l| l.iter().filter_map(|c| Some((c["config"].as_str()?, c["layer"].as_str()?))).collect());
    let torch = torch.as_deref().map(read).transpose()?;
    let bf16_rate = torch.as_ref().and_then(|t| t["ceilings"]["bf16_TFLOPs"].as_f64());
    let cudnn = |name: &str, variant: &str| -> Option<f64> {
        torch.as_ref()?["rows"].as_array()?.iter().find_map(|r| {
            (r["name"].as_str()? == name && r["variant"].as_str()? == variant).then(|| r["ms"].as_f64())?
        })
    };
    // Only the shapes the list names (a list cut down to one configuration, or to some layers, times only those).
    let shapes: Vec<_> =
        shapes()?.into_iter().filter(|(config, c)| listed.contains(&(*config, c.layer.as_str()))).collect();
    if listed.len() != shapes.len() {
        eprintln!(
            "note: {list} lists {} shapes, this binary {}: cuDNN rows may be missing",
            listed.len(),
            shapes.len()
        );
    }
    // tools/bench_torch.py says how it timed cuDNN: CUDA graph replays (the GPU's time, as ours) or eager calls.
    let timing = torch.as_ref().and_then(|t| t["timing"].as_str()).unwrap_or("eager");
    let mut md = format!(
        "GPU: {}; bf16 matrix ceiling {} (PyTorch, same run). cuDNN: bf16 channels-last and tf32, cudnn.benchmark on, \
         timed as {timing}; ratio = cuDNN ms / ours.\n\n| config | layer (count) | input | weight | stride | role | \
         ours bf16 ms | TFLOP/s (% bf16) | cuDNN bf16 ms | ratio | ours tf32 ms | cuDNN tf32 ms | ratio |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        gpu.name(),
        bf16_rate.map_or("n/a".into(), |r| format!("{r:.0} TFLOP/s"))
    );
    let mut summary: BTreeMap<(String, &str, &str), RoleSummary> = BTreeMap::new();
    for (config, c) in &shapes {
        let times: Vec<Option<[f64; 3]>> = MATHS
            .iter()
            .zip(&timed)
            .map(|(&(_, dtype), &t)| t.then(|| time_roles(&gpu, c, dtype)).transpose())
            .collect::<Result<_>>()?;
        for (r, role) in ROLES.iter().enumerate() {
            let mut cells = Vec::new();
            for (m, (math, _)) in MATHS.iter().enumerate() {
                let Some(ours) = times[m].map(|t| t[r]) else {
                    cells.push(if *math == "bf16" { "- | - | - | -" } else { "- | - | -" }.to_string());
                    continue;
                };
                let theirs = cudnn(&row_name(config, c, role, math), if *math == "bf16" { "bf16_cl" } else { "tf32" });
                let ratio = theirs.map(|t| t / ours);
                let entry = summary.entry((config.to_string(), role, math)).or_default();
                entry.ours_ms += ours * c.count as f64;
                if let (Some(t), Some(q)) = (theirs, ratio) {
                    entry.ratios.push(q);
                    entry.cudnn_ms += t * c.count as f64;
                }
                let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
                if *math == "bf16" {
                    let tflops = c.flops() / (ours * 1e-3) / 1e12;
                    let pct = bf16_rate.map_or("-".into(), |p| format!("{:.1}%", 100.0 * tflops / p));
                    cells.push(format!("{ours:.3} | {tflops:.1} ({pct}) | {} | {}", fmt(theirs), fmt(ratio)));
                } else {
                    cells.push(format!("{ours:.3} | {} | {}", fmt(theirs), fmt(ratio)));
                }
            }
            md += &format!(
                "| {config} | {} ({}) | {:?} | {:?} | {:?} | {role} | {} |\n",
                c.layer,
                c.count,
                c.input,
                c.weight,
                c.stride,
                cells.join(" | ")
            );
        }
        eprintln!("{config} {}: {:?}", c.layer, times);
    }
    md += "\n| config | role | math | median ratio | min ratio | ours total ms (x count) | cuDNN total ms |\n\
           |---|---|---|---|---|---|---|\n";
    for ((config, role, math), RoleSummary { ratios, ours_ms: ours, cudnn_ms: theirs }) in &summary {
        let (med, min) = if ratios.is_empty() {
            ("-".into(), "-".into())
        } else {
            let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            (format!("{:.2}", median(ratios.clone())), format!("{min:.2}"))
        };
        md += &format!("| {config} | {role} | {math} | {med} | {min} | {ours:.1} | {theirs:.1} |\n");
    }
    println!("{md}");
    if let Some(p) = out {
        std::fs::write(&p, &md).map_err(|e| Error::Io(format!("{p}: {e}")))?;
    }
    Ok(())
}
