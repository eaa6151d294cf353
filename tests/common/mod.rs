//! Shared by the tests: one elementwise closeness check ([`assert_close`]) and the error measures ([`rel_err`],
//! [`max_abs_diff`]), a GPU with poisoned allocations, one way to run a test on the CPU and, when present, on the GPU
//! ([`device_test!`]), the comparison of an op's forward and backward on the GPU (float32) with its CPU reference
//! (float64 on the same float32-rounded inputs), and a micro model for workflow tests.
//!
//! A check that must hold alike on every device (an op refusing a bad shape with the same message, a forward small
//! enough to work out by hand, two runs giving the same bits, the tape letting go of what it saved) is written once,
//! as a function of the device, and expanded into one test per device:
//!
//! ```ignore
//! /// conv names the weight whose input channels do not match the map's.
//! fn conv_rejects_channel_mismatch(dev: &Device) {
//!     let (x, w) = (common::randn_on(dev, &[1, 3, 5, 5], 1.0, 0), common::randn_on(dev, &[4, 2, 3, 3], 1.0, 1));
//!     let err = conv(&mut Tape::new(), &x, &w, None, &[1, 1]).unwrap_err().to_string();
//!     assert!(err.contains("input channels"), "{err}");
//! }
//! common::device_test!(conv_rejects_channel_mismatch);
//! ```
//!
//! makes the module `conv_rejects_channel_mismatch` with the tests `cpu` (runs everywhere) and `gpu` (ignored: "needs
//! a CUDA device"; run with `-- --ignored`), the latter on [`gpu`] (NaN-poisoned allocations, exact float32
//! products). `device_test!(name, tf32)` adds `tf32`, on [`tf32_gpu`] (the convolutions and linear layers on the
//! tensor cores). GPU tensors are float32, so the body builds float32 tensors on `dev` ([`randn_on`],
//! [`tensor_on`]). The body is a plain function, so rustfmt and clippy see it as they see any test.
#![allow(dead_code)]

use std::sync::Arc;

pub mod mamba;

use lkm_engine::autograd::Tape;
use lkm_engine::device::{Device, Gpu};
use lkm_engine::tensor::DType;
use lkm_engine::{Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// GPU 0 with NaN-poisoned allocations and exact float32 products (these tests check float32 arithmetic against
/// float64); panics with the reason when there is none (these tests are `#[ignore]`d).
pub fn gpu() -> Arc<Gpu> {
    let gpu = Gpu::new(0).unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"));
    gpu.set_poison(true);
    gpu.set_exact_f32(true);
    gpu
}

/// As [`gpu`], with the convolutions on the tf32 tensor cores (the training default).
pub fn tf32_gpu() -> Arc<Gpu> {
    let gpu = gpu();
    gpu.set_exact_f32(false);
    gpu
}

/// Expands a test body `fn name(dev: &Device)` defined beside it into a module `name` of tests, one per device: `cpu`
/// (`Device::Cpu`), `gpu` ([`gpu`]: poisoned allocations, exact float32), and with `tf32` as second argument also
/// `tf32` ([`tf32_gpu`]); the GPU tests are ignored ("needs a CUDA device"). See the module documentation.
#[allow(unused_macros)] // Test binaries that write no device test leave it unused.
macro_rules! device_test {
    ($name:ident) => {
        $crate::common::device_test!(@module $name {});
    };
    ($name:ident, tf32) => {
        $crate::common::device_test!(@module $name {
            #[test]
            #[ignore = "needs a CUDA device"]
            fn tf32() {
                super::$name(&::lkm_engine::device::Device::Cuda($crate::common::tf32_gpu()));
            }
        });
    };
    // A function and a module may share a name (they live in different namespaces), so `name::cpu` reads as the
    // test `name` on the CPU and a filter on `name` selects every device's run of it.
    (@module $name:ident { $($extra:item)* }) => {
        mod $name {
            #[test]
            fn cpu() {
                super::$name(&::lkm_engine::device::Device::Cpu);
            }

            #[test]
            #[ignore = "needs a CUDA device"]
            fn gpu() {
                super::$name(&::lkm_engine::device::Device::Cuda($crate::common::gpu()));
            }

            $($extra)*
        }
    };
}
#[allow(unused_imports)] // Test binaries that write no device test leave it unused.
pub(crate) use device_test;

/// Standard-normal float32 inputs scaled by `scale` (those of [`randn32`]) on `dev`.
pub fn randn_on(dev: &Device, shape: &[usize], scale: f64, seed: u64) -> Tensor {
    randn32(shape, scale, seed).to_device(dev).unwrap()
}

/// The float32 `values` of `shape` on `dev`.
pub fn tensor_on(dev: &Device, values: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(values, shape).unwrap().to_device(dev).unwrap()
}

/// Fresh standard-normal float32 CPU inputs, scaled by `scale`.
pub fn randn32(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    let t = Tensor::randn(shape, DType::F32, &mut StdRng::seed_from_u64(seed)).unwrap();
    lkm_engine::tensor::scale(&t, scale).unwrap()
}

/// ||a - b|| / ||b||, with NaN anywhere giving infinity.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Asserts rel_err(`got`, `want`) < `tol` (see [`rel_err`]) and returns the error; the panic names `what`.
pub fn assert_rel_err(what: &str, got: &[f64], want: &[f64], tol: f64) -> f64 {
    let e = rel_err(got, want);
    assert!(e < tol, "{what}: relative error {e:e} >= {tol:e}");
    e
}

/// max_i |a_i - b_i| for float32 or float64 slices, computed in float64; NaN when any difference is NaN (so every
/// comparison of the result fails rather than a NaN being skipped by `max`).
pub fn max_abs_diff<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let d = ((*x).into() - (*y).into()).abs();
        if d.is_nan() {
            return f64::NAN;
        }
        worst = worst.max(d);
    }
    worst
}

/// Asserts |got_i - want_i| <= `atol` + `rtol` |want_i| for every i (float32 or float64 slices, compared in
/// float64; a NaN fails). The panic names `what`, how many elements fail, and the worst one (largest excess over its
/// bound) with its index and both values.
pub fn assert_close<G: Copy + Into<f64>, W: Copy + Into<f64>>(what: &str, got: &[G], want: &[W], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ (got {}, want {})", got.len(), want.len());
    let mut failures = 0usize;
    let mut worst: Option<(usize, f64, f64, f64)> = None; // (index, got, want, excess)
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w): (f64, f64) = ((*g).into(), (*w).into());
        let d = (g - w).abs();
        let bound = atol + rtol * w.abs();
        // Written so that a NaN difference fails too.
        if d.is_nan() || d > bound {
            failures += 1;
            let excess = if d.is_nan() { f64::INFINITY } else { d - bound };
            if worst.is_none_or(|(_, _, _, e)| excess > e) {
                worst = Some((i, g, w, excess));
            }
        }
    }
    if let Some((i, g, w, _)) = worst {
        panic!(
            "{what}: {failures} of {} elements differ by more than {atol:e} + {rtol:e} |want|; worst at {i}: got {g}, \
             want {w} (difference {:e})",
            got.len(),
            (g - w).abs()
        );
    }
}

/// Runs `f` on the GPU and on the CPU (float64) from the same float32 `inputs`, back-propagates the same random seed
/// gradient through both, and asserts the relative error of the output and of every input's gradient is below
/// `tol`. Returns the worst error.
pub fn check_op(name: &str, inputs: &[Tensor], tol: f64, f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>) -> f64 {
    check_op_inputs(name, inputs, &vec![true; inputs.len()], tol, f)
}

/// A step's output and the gradient of each input (`None` where none flows), as float64 host vectors.
pub type SeededStep = (Vec<f64>, Vec<Option<Vec<f64>>>);

/// Runs `f` on `xs` (already of the wanted dtype and device) and back-propagates a fixed standard-normal gradient from
/// its output: (output, gradient of each input with `differentiable[i]`) as float64 host vectors.
pub fn seeded_step(
    name: &str,
    xs: &[Tensor],
    differentiable: &[bool],
    device: &Device,
    f: &dyn Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) -> SeededStep {
    let mut tape = Tape::new();
    for (x, &d) in xs.iter().zip(differentiable) {
        if d {
            tape.watch(x);
        }
    }
    let y = f(&mut tape, xs).unwrap_or_else(|e| panic!("{name} forward failed: {e}"));
    // Onto the device first: a bf16 output takes its seed rounded to bf16 there (the host has no bf16).
    let seed = randn32(y.shape(), 1.0, 99).to_device(device).unwrap().to_dtype(y.dtype()).unwrap();
    let out = y.to_vec_f64().unwrap();
    let mut grads = tape.backward_from(&y, seed).unwrap_or_else(|e| panic!("{name} backward failed: {e}"));
    (out, xs.iter().map(|x| grads.take(x).map(|g| g.to_vec_f64().unwrap())).collect())
}

/// Asserts that two runs of a stride-1 conv (no bias) of `x` with `w`, forward and backward for the output gradient
/// `seed`, give the same output, input gradient and weight gradient bit for bit (the reductions run in a fixed order:
/// no atomics, split-K slices summed in order).
pub fn assert_conv_repeats(name: &str, x: &Tensor, w: &Tensor, seed: &Tensor) {
    let stride = vec![1; x.shape().len() - 2];
    let run = || {
        let mut tape = Tape::new();
        tape.watch(x);
        tape.watch(w);
        let y = lkm_engine::ops::conv::conv(&mut tape, x, w, None, &stride).unwrap();
        let mut g = tape.backward_from(&y, seed.clone()).unwrap();
        [y, g.take(x).unwrap(), g.take(w).unwrap()].map(|t| t.to_vec_f32().unwrap())
    };
    let (a, b) = (run(), run());
    for (what, (a, b)) in ["output", "input gradient", "weight gradient"].iter().zip(a.iter().zip(&b)) {
        assert!(
            a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name}: the {what} differs between two runs"
        );
    }
}

/// Asserts that `f` and `g` give the same output and input gradients, bit for bit, on `xs` (already on `device`), for
/// the seed gradient of [`seeded_step`]: a fused op against the ops it replaces.
pub fn assert_same_bits(
    name: &str,
    xs: &[Tensor],
    device: &Device,
    f: &dyn Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
    g: &dyn Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) {
    let all = vec![true; xs.len()];
    let (out_f, grads_f) = seeded_step(name, xs, &all, device, f);
    let (out_g, grads_g) = seeded_step(name, xs, &all, device, g);
    assert!(out_f == out_g, "{name}: outputs differ (max |diff| {:e})", max_abs_diff(&out_f, &out_g));
    for (i, (a, b)) in grads_f.iter().zip(&grads_g).enumerate() {
        let (a, b) = (a.as_ref().expect("a gradient"), b.as_ref().expect("a gradient"));
        assert!(a == b, "{name}: gradients of input {i} differ (max |diff| {:e})", max_abs_diff(a, b));
    }
}

/// As [`check_op`], with `differentiable[i]` saying which inputs have gradients (labels do not).
pub fn check_op_inputs(
    name: &str,
    inputs: &[Tensor],
    differentiable: &[bool],
    tol: f64,
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) -> f64 {
    check_op_on(gpu(), name, inputs, differentiable, tol, f)
}

/// As [`check_op_inputs`], on a given GPU (e.g. [`tf32_gpu`]).
pub fn check_op_on(
    gpu: Arc<Gpu>,
    name: &str,
    inputs: &[Tensor],
    differentiable: &[bool],
    tol: f64,
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) -> f64 {
    let gpu = Device::Cuda(gpu);
    let cpu_inputs: Vec<Tensor> = inputs.iter().map(|x| x.to_dtype(DType::F64).unwrap()).collect();
    let gpu_inputs: Vec<Tensor> = inputs.iter().map(|x| x.to_device(&gpu).unwrap()).collect();
    let reference = seeded_step(name, &cpu_inputs, differentiable, &Device::Cpu, &f);
    assert_steps_close(name, &seeded_step(name, &gpu_inputs, differentiable, &gpu, &f), &reference, tol)
}

/// Asserts that a GPU step (the output and the input gradients of [`seeded_step`]) is within `tol` of the CPU
/// reference's (relative error), prints each error, and returns the worst.
fn assert_steps_close(name: &str, got: &SeededStep, reference: &SeededStep, tol: f64) -> f64 {
    let ((out, grads), (ref_out, ref_grads)) = (got, reference);
    let mut worst = assert_rel_err(&format!("{name}: forward"), out, ref_out, tol);
    let mut report = format!("{name}: forward {worst:.1e}, gradients");
    for (i, (g, r)) in grads.iter().zip(ref_grads).enumerate() {
        match (g, r) {
            (Some(g), Some(r)) => {
                let e = assert_rel_err(&format!("{name}: gradient of input {i}"), g, r, tol);
                worst = worst.max(e);
                report += &format!(" {e:.1e}");
            }
            (None, None) => report += " -",
            _ => panic!("{name}: input {i} has a gradient on one device only"),
        }
    }
    eprintln!("{report}");
    worst
}

/// The bf16 check of an op's GPU kernels: the inputs with `bf16[i]` are rounded to bf16 on the GPU (the others stay
/// float32: norm weights, the scan's A and D), `f` runs there and back-propagates the bf16-rounded seed gradient, and
/// the output and every gradient are held to `tol` (engine.md: 1e-2 for bf16) against the float64 CPU reference run
/// on the same rounded inputs, so the measure is the kernels' own error. Returns the worst error.
pub fn check_op_bf16(
    name: &str,
    inputs: &[Tensor],
    differentiable: &[bool],
    bf16: &[bool],
    tol: f64,
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) -> f64 {
    // Not exact float32 (gpu()'s setting, which routes some bf16 products to the conv_tc tiles): bf16 runs as training
    // runs it, every product on the kernels that training uses.
    let gpu = Device::Cuda(tf32_gpu());
    let gpu_inputs: Vec<Tensor> = inputs
        .iter()
        .zip(bf16)
        .map(|(x, &low)| {
            let x = x.to_device(&gpu).unwrap();
            if low {
                x.to_dtype(DType::BF16).unwrap()
            } else {
                x
            }
        })
        .collect();
    let cpu_inputs: Vec<Tensor> =
        gpu_inputs.iter().map(|x| Tensor::from_vec(x.to_vec_f64().unwrap(), x.shape()).unwrap()).collect();
    let reference = seeded_step(name, &cpu_inputs, differentiable, &Device::Cpu, &f);
    let got = seeded_step(name, &gpu_inputs, differentiable, &gpu, &f);
    assert_steps_close(&format!("{name} (bf16)"), &got, &reference, tol)
}

/// One node of a traced forward/backward pass as float64 host data (see `Tape::trace`).
pub struct TraceRow {
    /// The node's position on the tape.
    pub index: usize,
    /// The op's name.
    pub op: &'static str,
    /// The output's shape.
    pub shape: Vec<usize>,
    /// The forward output.
    pub output: Vec<f64>,
    /// dL/d(output).
    pub grad: Vec<f64>,
}

/// The tiny model's forward pass in `dtype` on `dev` with weights `params` and input `x` (float32 CPU), then the
/// backward pass of a fixed random gradient from the full-resolution output, traced node by node (backward order).
pub fn traced_model_step(
    model: &lkm_engine::nn::LkmUnet,
    params: &lkm_engine::nn::Params,
    x: &Tensor,
    dtype: DType,
    dev: &Device,
) -> Vec<TraceRow> {
    let p = params.to(dtype, dev).unwrap();
    let x = x.to_dtype(dtype).unwrap().to_device(dev).unwrap();
    let mut tape = Tape::new();
    tape.trace(true);
    tape.watch(&x);
    p.watch(&mut tape);
    let y = model.forward(&mut tape, &p, &x).unwrap()[0].clone();
    let seed = randn32(y.shape(), 1.0, 99).to_device(dev).unwrap().to_dtype(dtype).unwrap();
    let g = tape.backward_from(&y, seed).unwrap();
    g.trace()
        .iter()
        .map(|n| TraceRow {
            index: n.index,
            op: n.op,
            shape: n.output.shape().to_vec(),
            output: n.output.to_vec_f64().unwrap(),
            grad: n.grad.to_vec_f64().unwrap(),
        })
        .collect()
}

/// The elements where `got` and `exact` fall on different sides of 0 at a LeakyReLU (whose output has its input's
/// sign; the op `leaky_relu` or a norm with it fused, `instance_norm_leaky_relu`): (row position in the trace,
/// element). There the exact derivative jumps from 1 to the negative slope, so a
/// float32 forward that rounds an input across 0 differentiates another branch of the function than float64 does.
pub fn leaky_relu_flips(got: &[TraceRow], exact: &[TraceRow]) -> Vec<(usize, usize)> {
    assert_eq!(got.len(), exact.len(), "the two runs recorded different graphs");
    let mut flips = Vec::new();
    for (r, (g, e)) in got.iter().zip(exact).enumerate() {
        if e.op.ends_with("leaky_relu") {
            let crossed = g.output.iter().zip(&e.output).enumerate().filter(|(_, (a, b))| (**a > 0.0) != (**b > 0.0));
            flips.extend(crossed.map(|(i, _)| (r, i)));
        }
    }
    flips
}

/// A model small enough to train a few iterations in well under a second: 2 stages on 8 x 16 x 16 patches.
pub fn micro_config() -> lkm_engine::nn::ModelConfig {
    lkm_engine::nn::ModelConfig {
        in_channels: 1,
        num_classes: 4,
        features: vec![4, 8],
        kernels: vec![vec![3, 3, 3]; 2],
        strides: vec![vec![1, 1, 1], vec![2, 2, 2]],
        blocks_enc: vec![1, 1],
        blocks_dec: vec![1],
        deep_supervision: true,
        pim_windows: vec![vec![2, 4, 4], vec![2, 2, 2]],
        pim_layout: lkm_engine::ops::pim::PimLayout::Window,
        pam_pools: vec![vec![2, 2, 2], vec![1, 1, 1]],
        mamba: lkm_engine::nn::mamba::MambaConfig { d_state: 4, d_conv: 4, expand: 2, recompute: false },
        patch: vec![8, 16, 16],
    }
}
