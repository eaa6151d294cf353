//! `lkm-engine profile` and the NVTX names: one check of a recorded tiny-3d step, run on the CPU here and on the GPU
//! (ignored without one), plus the range names built from parameter paths.

use std::collections::HashSet;

use lkm_engine::device::Device;
use lkm_engine::nn::ModelConfig;
use lkm_engine::profile::report::{render, rows, stage_of, trace_json};
use lkm_engine::profile::{op_name, Pass};
use lkm_engine::train::profile::{run, Profile, ProfileOptions};

fn profile_tiny(device: Device) -> Profile {
    let opts = ProfileOptions { config: ModelConfig::tiny_3d(), batch: 1, steps: 1, device };
    run(&opts).unwrap_or_else(|e| panic!("profile failed: {e}"))
}

/// The recording names every op after its layer, the table and its roll-ups print, and the trace holds one complete
/// event per recorded op call.
fn check_profile(p: &Profile) {
    let ops = &p.recording.ops;
    assert!(!ops.is_empty(), "no op was recorded");
    let names: HashSet<String> = ops.iter().map(|r| op_name(r.layer.as_deref(), r.kind, r.pass)).collect();
    for expected in [
        "encoder.stages.0.blocks.0.conv1/conv3d.fwd",
        "encoder.stages.0.blocks.0.conv1/conv3d.bwd",
        "encoder.stages.0.blocks.0.conv1/instance_norm_leaky_relu.fwd",
        "encoder.stages.0.blocks.0.conv2/instance_norm_add_leaky_relu.fwd",
        "encoder.mamba_layers.0.mamba_forw/selective_scan.fwd",
        "encoder.mamba_layers.0.mamba_backw/selective_scan.bwd",
        "encoder.mamba_layers.0.mamba_forw.in_proj/linear.bwd",
        "encoder.w_mamba_layers.1.out_proj/linear.fwd",
        "decoder.transpconvs.0/conv_transpose3d.fwd",
        "decoder.seg_layers.2/conv3d.fwd",
        "loss/cross_entropy.bwd",
    ] {
        assert!(names.contains(expected), "no op recorded as {expected}");
    }
    assert!(ops.iter().all(|r| r.ms >= 0.0 && r.ms.is_finite()), "an op has no valid time");
    let phases: HashSet<&str> = p.recording.phases.iter().map(|r| r.kind).collect();
    for phase in ["train_step", "forward", "loss", "backward", "clip", "optimiser"] {
        assert!(phases.contains(phase), "phase {phase} was not recorded");
    }
    let conv = ops.iter().find(|r| r.kind == "conv3d" && r.pass == Pass::Forward).expect("a conv forward");
    assert!(conv.flops > 0.0 && conv.bytes > 0.0, "conv3d.fwd has no FLOPs or bytes: {conv:?}");

    // Queueing is part of the step: it cannot take longer than the whole step (the host's clock around both).
    let t = &p.times;
    assert!(t.queue_ms > 0.0 && t.queue_ms <= t.plain_ms, "queued in {} ms of a {} ms step", t.queue_ms, t.plain_ms);
    let table = render("tiny-3d", &p.recording, &p.times, &p.ceilings, p.pool_peak_bytes, 10);
    for part in [
        "conv3d.bwd",
        "queued by the host in",
        "kernel launches",
        "by op kind:",
        "by stage:",
        "encoder 0",
        "by phase",
        "memory:",
    ] {
        assert!(table.contains(part), "the report lacks {part:?}:\n{table}");
    }
    let total: f64 = rows(&p.recording, 1).iter().map(|r| r.calls).sum();
    assert_eq!(total as usize, ops.len(), "the rows do not account for every call");

    let text = trace_json(&p.recording).to_string();
    let trace: serde_json::Value = serde_json::from_str(&text).expect("the trace is JSON");
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    let op_events: Vec<_> = events.iter().filter(|e| e["tid"] == 1).collect();
    assert_eq!(op_events.len(), ops.len(), "one trace event per op call");
    assert!(op_events.iter().all(|e| e["ph"] == "X" && e["dur"].as_f64().is_some_and(|d| d >= 0.0)));
    assert!(op_events.iter().any(|e| e["name"] == "encoder.stages.0.blocks.0.conv1/conv3d.fwd"));
}

#[test]
fn profile_tiny_cpu() {
    let p = profile_tiny(Device::Cpu);
    check_profile(&p);
    assert!(p.pool_peak_bytes.is_none() && p.ceilings.bf16_tflops.is_none());
    assert_eq!(p.times.launches, 0.0, "the CPU launches no kernel");
}

#[test]
#[ignore = "needs a CUDA device"]
fn profile_tiny_gpu() {
    let p = profile_tiny(Device::cuda(0).expect("a CUDA device"));
    check_profile(&p);
    // A step is hundreds of launches at least (every op one or more).
    assert!(p.times.launches >= p.recording.ops.len() as f64 / 2.0, "{} launches per step", p.times.launches);
    let peak = p.pool_peak_bytes.expect("the pool peak on the GPU");
    assert!(peak > 0 && p.recording.peak_bytes > 0 && !p.recording.at_peak.is_empty(), "memory was not tracked");
    assert!(p.recording.at_peak.windows(2).all(|w| w[0].bytes >= w[1].bytes), "largest tensors not sorted");
    let planned: usize = p.recording.by_op_at_peak.iter().map(|g| g.bytes).sum();
    assert_eq!(planned, p.recording.peak_bytes, "the memory plan accounts for every buffer alive at the peak");
    assert!(p.ceilings.bf16_tflops.is_some_and(|t| t > 1.0) && p.ceilings.copy_gbps > 10.0);
}

#[test]
fn range_names_follow_parameter_paths() {
    assert_eq!(
        op_name(Some("encoder.stages.0.blocks.1.conv1"), "conv3d", Pass::Forward),
        "encoder.stages.0.blocks.1.conv1/conv3d.fwd"
    );
    assert_eq!(op_name(None, "add", Pass::Backward), "add.bwd");
    assert_eq!(stage_of(Some("encoder.stem.convs.0"), "forward"), "encoder 0");
    assert_eq!(stage_of(Some("encoder.w_mamba_layers.3.mamba_forw.in_proj"), "forward"), "encoder 3");
    assert_eq!(stage_of(Some("decoder.seg_layers.2"), "forward"), "decoder 2");
    assert_eq!(stage_of(None, "optimiser"), "optimiser");
}
