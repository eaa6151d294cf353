//! The LKM-UNet as built from its configurations: parameter counts and names against the public PyTorch model,
//! output shapes, configuration errors, and the tape releasing what a step saved. The forward checks are device tests
//! (`common::device_test!`; `NAME::gpu` with `cargo test --release --test model -- --ignored` on a GPU machine).

use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::nn::{LkmUnet, ModelConfig};
use lkm_engine::tensor::DType;
use lkm_engine::Tensor;

mod common;
use common::{device_test, randn_on};

#[test]
fn reference_configs_have_the_public_parameter_counts() {
    // anchors.md: the public PyTorch LKM-UNet has 63.45 M parameters (3D FLARE plan) and 80.89 M (2D AMOS).
    for (cfg, expected) in [(ModelConfig::flare_3d(), 63.45e6), (ModelConfig::amos_2d(), 80.89e6)] {
        let (_, params) = LkmUnet::new(cfg, 0).unwrap();
        let count = params.count() as f64;
        assert!((count - expected).abs() < 0.006e6, "{count} parameters, expected {expected}");
    }
}

#[test]
fn parameter_names_follow_the_public_module_paths() {
    let (_, params) = LkmUnet::new(ModelConfig::flare_3d(), 0).unwrap();
    let names = params.names();
    for expected in [
        "encoder.stem.convs.0.conv.weight",
        "encoder.stages.0.blocks.0.conv1.conv.weight",
        "encoder.stages.1.blocks.0.skip.1.conv.weight",
        "encoder.stages.1.blocks.1.conv2.norm.weight",
        "encoder.mamba_layers.0.mamba_forw.A_log",
        "encoder.mamba_layers.5.out_proj.weight",
        "encoder.w_mamba_layers.2.mamba_backw.dt_proj.bias",
        "decoder.transpconvs.0.weight",
        "decoder.stages.4.blocks.1.conv1.conv.bias",
        "decoder.seg_layers.4.weight",
    ] {
        assert!(names.iter().any(|n| n == expected), "missing {expected}");
    }
    assert!(
        !names.iter().any(|n| n.starts_with("encoder.stages.0.blocks.0.skip")),
        "stage 0 keeps its channels: no skip"
    );
    assert!(names.iter().any(|n| n == "decoder.stages.0.blocks.0.skip.0.conv.weight"), "decoder blocks halve channels");
}

fn tiny_model_outputs_one_map_per_decoder_level(dev: &Device) {
    let cfg = ModelConfig::tiny_3d();
    let (model, params) = LkmUnet::new(cfg.clone(), 1).unwrap();
    let params = params.to(DType::F32, dev).unwrap();
    let x = randn_on(dev, &[1, 1, 32, 32, 32], 1.0, 2);
    let outs = model.forward(&mut Tape::no_grad(), &params, &x).unwrap();
    let shapes: Vec<Vec<usize>> = outs.iter().map(|o| o.shape().to_vec()).collect();
    assert_eq!(shapes, vec![vec![1, 4, 32, 32, 32], vec![1, 4, 16, 16, 16], vec![1, 4, 8, 8, 8]]);
    assert!(outs.iter().all(|o| o.to_vec_f64().unwrap().iter().all(|v| v.is_finite())));
}
device_test!(tiny_model_outputs_one_map_per_decoder_level);

/// The tape holds what the forward pass saved for the backward pass (activations, and the weights each op reads)
/// and lets go of it as the backward pass runs: after the backward pass of a step every parameter is held by its
/// `Params` alone again, so the optimiser can update it in place (`Tensor::storage_mut` fails on a shared tensor).
fn backward_releases_what_the_forward_saved(dev: &Device) {
    let (model, initial) = LkmUnet::new(common::micro_config(), 3).unwrap();
    // On the CPU `to` shares the float32 storage of `initial`: drop it, so that only the tape can share a parameter.
    let mut params = initial.to(DType::F32, dev).unwrap();
    drop(initial);
    let x = randn_on(dev, &[1, 1, 8, 16, 16], 1.0, 4);
    let mut tape = Tape::new();
    params.watch(&mut tape);
    let outs = model.forward(&mut tape, &params, &x).unwrap();
    let held = params.tensors_mut().iter_mut().map(|p| p.storage_mut().is_err()).filter(|&shared| shared).count();
    assert!(held > 0, "the forward pass saved no parameter: this test would check nothing");
    let seed = randn_on(dev, outs[0].shape(), 1.0, 5);
    let grads = tape.backward_from(&outs[0], seed).unwrap();
    assert!(tape.is_empty(), "{} nodes left on the tape after the backward pass", tape.len());
    assert!(!grads.is_empty(), "the backward pass reached no parameter");
    let names = params.names().to_vec();
    for (name, p) in names.iter().zip(params.tensors_mut()) {
        if let Err(e) = p.storage_mut() {
            panic!("{name} is still shared after the backward pass ({held} were during the forward): {e}");
        }
    }
}
device_test!(backward_releases_what_the_forward_saved);

#[test]
fn window_that_does_not_divide_names_stage_axis_and_sizes() {
    let mut cfg = ModelConfig::flare_3d();
    cfg.pim_windows[2] = vec![10, 14, 11];
    let err = LkmUnet::new(cfg, 0).err().expect("building must fail").to_string();
    assert!(err.contains("PiM stage 2") && err.contains("axis W") && err.contains("11") && err.contains("48"), "{err}");
}

fn patch_not_divisible_by_strides_is_an_error(dev: &Device) {
    let (model, params) = LkmUnet::new(ModelConfig::tiny_3d(), 0).unwrap();
    let params = params.to(DType::F32, dev).unwrap();
    let x = Tensor::zeros(&[1, 1, 32, 30, 32], DType::F32, dev).unwrap();
    let err = model.forward(&mut Tape::no_grad(), &params, &x).expect_err("must fail").to_string();
    assert!(err.contains("30"), "{err}");
}
device_test!(patch_not_divisible_by_strides_is_an_error);

/// `ModelConfig::convolutions` (the benchmarks' list of a forward pass's convolutions) has exactly the network's
/// convolution weights, counted, and every layer it names exists.
#[test]
fn convolution_list_matches_the_network_weights() {
    use lkm_engine::nn::ConvKind;
    for cfg in [ModelConfig::tiny_3d(), ModelConfig::amos_2d(), ModelConfig::flare_3d()] {
        let convs = cfg.convolutions(2);
        let (_, params) = LkmUnet::new(cfg, 0).unwrap();
        let is_conv_weight = |n: &str| {
            n.ends_with(".conv.weight")
                || (n.starts_with("decoder.transpconvs.") || n.starts_with("decoder.seg_layers."))
                    && n.ends_with(".weight")
        };
        let mut want: Vec<Vec<usize>> = params
            .names()
            .iter()
            .zip(params.tensors())
            .filter(|(n, _)| is_conv_weight(n))
            .map(|(_, t)| t.shape().to_vec())
            .collect();
        let mut got: Vec<Vec<usize>> =
            convs.iter().flat_map(|c| std::iter::repeat_n(c.weight.clone(), c.count)).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "convolution weights");
        for c in &convs {
            let name = match c.kind {
                ConvKind::Conv | ConvKind::Projection => format!("{}.conv.weight", c.layer),
                ConvKind::Transposed | ConvKind::Head => format!("{}.weight", c.layer),
            };
            assert!(params.names().contains(&name), "{name}");
            assert_eq!(c.bias(), params.names().contains(&name.replace("weight", "bias")), "{name} bias");
        }
    }
}

/// The input map of every listed convolution is the one the network gives it: the traced forward of the tiny
/// model has a convolution output of each listed layer's output shape, as many times as listed.
#[test]
fn convolution_list_has_the_traced_map_sizes() {
    let cfg = ModelConfig::tiny_3d();
    let convs = cfg.convolutions(1);
    let (model, params) = LkmUnet::new(cfg.clone(), 0).unwrap();
    let x = randn_on(&Device::Cpu, &[1, 1, 32, 32, 32], 1.0, 1);
    let mut tape = Tape::new();
    tape.trace(true);
    params.watch(&mut tape);
    let y = model.forward(&mut tape, &params, &x).unwrap();
    let seed = Tensor::full(y[0].shape(), 1.0, DType::F32, &Device::Cpu).unwrap();
    let grads = tape.backward_from(&y[0], seed).unwrap();
    let mut traced: Vec<Vec<usize>> =
        grads.trace().iter().filter(|n| n.op.starts_with("conv")).map(|n| n.output.shape().to_vec()).collect();
    let mut listed: Vec<Vec<usize>> = Vec::new();
    for c in &convs {
        let cout = if c.kind == lkm_engine::nn::ConvKind::Transposed { c.weight[1] } else { c.weight[0] };
        let spatial: Vec<usize> = match c.kind {
            lkm_engine::nn::ConvKind::Transposed => c.input[2..].iter().zip(&c.stride).map(|(l, s)| l * s).collect(),
            _ => c.input[2..].iter().zip(&c.stride).map(|(l, s)| l.div_ceil(*s)).collect(),
        };
        // The trace holds what the seed at the full-resolution output reaches: every convolution but the heads of
        // the coarser levels.
        if c.kind == lkm_engine::nn::ConvKind::Head && spatial != cfg.patch {
            continue;
        }
        listed.extend(std::iter::repeat_n([&[1, cout][..], &spatial].concat(), c.count));
    }
    traced.sort();
    listed.sort();
    assert_eq!(traced, listed, "convolution outputs of the traced forward vs the list");
}

/// `--recompute mamba` (MambaConfig::recompute: each Mamba block's input branch and scan as checkpoints) records fewer
/// nodes and gives the same output and parameter gradients, bit for bit, as keeping everything (on the GPU also the
/// test of the in-place gradient accumulation there: the same bits as before it).
fn recomputed_mamba_blocks_give_the_same_gradients(dev: &Device) {
    let step = |recompute: bool| {
        let mut cfg = common::micro_config();
        cfg.mamba.recompute = recompute;
        let (model, params) = LkmUnet::new(cfg.clone(), 3).unwrap();
        let params = params.to(DType::F32, dev).unwrap();
        let mut shape = vec![2, cfg.in_channels];
        shape.extend_from_slice(&cfg.patch);
        let x = randn_on(dev, &shape, 1.0, 5);
        let mut tape = Tape::new();
        params.watch(&mut tape);
        let y = model.forward(&mut tape, &params, &x).unwrap().remove(0);
        let nodes = tape.len();
        let seed = common::randn32(y.shape(), 1.0, 9).to_device(dev).unwrap();
        let mut grads = tape.backward_from(&y, seed).unwrap();
        let g: Vec<Vec<f64>> =
            params.tensors().iter().map(|p| grads.take(p).map_or(vec![], |g| g.to_vec_f64().unwrap())).collect();
        (y.to_vec_f64().unwrap(), g, nodes)
    };
    let (y_kept, g_kept, nodes_kept) = step(false);
    let (y_recomputed, g_recomputed, nodes_recomputed) = step(true);
    assert!(y_kept == y_recomputed, "outputs differ");
    assert!(g_kept.iter().any(|g| !g.is_empty()));
    for (i, (a, b)) in g_kept.iter().zip(&g_recomputed).enumerate() {
        assert!(a == b, "gradient of parameter {i} differs");
    }
    assert!(nodes_recomputed < nodes_kept, "{nodes_recomputed} nodes with the checkpoints, {nodes_kept} without");
}
device_test!(recomputed_mamba_blocks_give_the_same_gradients, tf32);
