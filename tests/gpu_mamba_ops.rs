//! The Mamba block's CUDA kernels (linear, depthwise causal conv1d, selective scan) against their CPU references:
//! forward and every gradient, fresh random inputs, odd sizes, NaN-poisoned outputs, and one case at the reference
//! shapes of lkm-unet.md section 5 for each. Run on a GPU machine with `cargo test --release -- --ignored`.
//!
//! Tolerances (relative error ||gpu - ref|| / ||ref||, ref in float64 on the same float32 inputs): linear and conv1d
//! forwards are short dot products (K terms), plain arithmetic, 1e-5; their weight and bias gradients reduce over all
//! tokens, and the scans run recurrences over up to 26,880 steps, 1e-4. linear also runs on the tf32 tensor cores
//! (the training default), against engine.md's 1e-2.

mod common;

use std::sync::Arc;

use common::mamba::{projected_scan, projected_scan_inputs, scan, scan_inputs, scan_reversed};
use common::{assert_rel_err, assert_same_bits, check_op, check_op_on, gpu, randn32, tf32_gpu};
use lkm_engine::autograd::Tape;
use lkm_engine::device::{Device, Gpu};
use lkm_engine::ops::cast::cast;
use lkm_engine::ops::causal_conv1d::{causal_conv1d, causal_conv1d_silu};
use lkm_engine::ops::flip::Order;
use lkm_engine::ops::linear::{linear, Product};
use lkm_engine::ops::operand::Operand;
use lkm_engine::ops::selective_scan::GPU_CHUNK;
use lkm_engine::tensor::DType;
use lkm_engine::{Result, Tensor};

/// Asserts that `f` on the GPU matches `f` on the CPU in float64 (forward only) within `tol`.
fn check_forward(name: &str, inputs: &[Tensor], tol: f64, f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>) {
    let dev = Device::Cuda(gpu());
    let cpu: Vec<Tensor> = inputs.iter().map(|x| x.to_dtype(DType::F64).unwrap()).collect();
    let gpu_in: Vec<Tensor> = inputs.iter().map(|x| x.to_device(&dev).unwrap()).collect();
    let want = f(&mut Tape::no_grad(), &cpu).unwrap().to_vec_f64().unwrap();
    let got = f(&mut Tape::no_grad(), &gpu_in).unwrap().to_vec_f64().unwrap();
    assert_rel_err(&format!("{name}: forward"), &got, &want, tol);
}

/// The gradients of `f`'s inputs on the GPU for the seed gradient of `check_op`, as host vectors (to compare runs).
fn gpu_grads(gpu: &Arc<Gpu>, inputs: &[Tensor], f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>) -> Vec<Vec<f32>> {
    let dev = Device::Cuda(gpu.clone());
    let xs: Vec<Tensor> = inputs.iter().map(|x| x.to_device(&dev).unwrap()).collect();
    let mut tape = Tape::new();
    for x in &xs {
        tape.watch(x);
    }
    let y = f(&mut tape, &xs).unwrap();
    let seed = randn32(y.shape(), 1.0, 99).to_device(&dev).unwrap();
    let mut grads = tape.backward_from(&y, seed).unwrap();
    xs.iter().map(|x| grads.take(x).unwrap().to_vec_f32().unwrap()).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// linear

/// Random x (`x_shape`), weight (`n_out`, K) and, with `bias`, a bias (`n_out`), float32 on the host.
fn linear_inputs(x_shape: &[usize], n_out: usize, bias: bool, seed: u64) -> Vec<Tensor> {
    let k = *x_shape.last().unwrap();
    let mut inputs = vec![randn32(x_shape, 1.0, seed), randn32(&[n_out, k], 0.2, seed + 1)];
    if bias {
        inputs.push(randn32(&[n_out], 1.0, seed + 2));
    }
    inputs
}

/// linear on `x_shape` -> `n_out` against float64, in exact float32 (SIMT tiles) and in tf32 (tensor cores: engine.md's
/// 1e-2, and above 1e-6, which float32 never reaches here, so a tf32 path quietly running in float32 fails).
fn linear_case(name: &str, x_shape: &[usize], n_out: usize, bias: bool, seed: u64) {
    let inputs = linear_inputs(x_shape, n_out, bias, seed);
    let f = |t: &mut Tape, x: &[Tensor]| linear(t, &x[0], &x[1], x.get(2));
    check_forward(name, &inputs, 1e-5, f);
    check_op(name, &inputs, 1e-4, f);
    let all = vec![true; inputs.len()];
    let worst = check_op_on(tf32_gpu(), &format!("{name} tf32"), &inputs, &all, 1e-2, f);
    assert!(worst > 1e-6, "{name}: tf32 linear matches float64 to {worst:e}: is it running in float32?");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_linear_bias() {
    // M = 1000, K = 37, N = 53: no size is a multiple of the 64 x 64 x 16 tiles.
    linear_case("linear 1000x37 -> 53 + bias", &[1000, 37], 53, true, 1);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_linear_no_bias() {
    // Rank-3 tokens (3, 333, 37): M = 999.
    linear_case("linear (3, 333, 37) -> 53", &[3, 333, 37], 53, false, 4);
}

/// linear with its operands stored as bf16 on the GPU (cast from float32 by the cast op, as a bf16 step casts the
/// float32 master weights), against the float64 reference on the float32 inputs: engine.md's bf16 tolerance 1e-2,
/// and above 1e-6 (rounding to bf16 alone moves every operand by up to 2^-9).
fn linear_bf16_case(name: &str, x_shape: &[usize], n_out: usize, bias: bool, seed: u64) {
    let inputs = linear_inputs(x_shape, n_out, bias, seed);
    let f = |t: &mut Tape, x: &[Tensor]| {
        let on_gpu = !x[0].device().is_cpu();
        let low = |t: &mut Tape, v: &Tensor| if on_gpu { cast(t, v, DType::BF16) } else { Ok(v.clone()) };
        let (xb, wb) = (low(t, &x[0])?, low(t, &x[1])?);
        let bb = x.get(2).map(|b| low(t, b)).transpose()?;
        let y = linear(t, &xb, &wb, bb.as_ref())?;
        if on_gpu {
            assert_eq!(y.dtype(), DType::BF16, "{name}: the bf16 linear's output is bf16");
            cast(t, &y, DType::F32)
        } else {
            Ok(y)
        }
    };
    let all = vec![true; inputs.len()];
    let worst = check_op_on(tf32_gpu(), &format!("{name} bf16"), &inputs, &all, 1e-2, f);
    assert!(worst > 1e-6, "{name}: bf16 linear matches float64 to {worst:e}: is it running in float32?");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_linear_bf16() {
    // 16-byte copies (K, N multiples of 8), 64- and 32-column tiles, pair copies (rows of an even number of
    // elements that are not whole 16 bytes: x_proj's 34 outputs, dt_proj's 2 inputs), the element-wise loads of odd
    // sizes, and the reference in_proj with its split weight gradient.
    linear_bf16_case("linear 1001x64 -> 96 + bias", &[1001, 64], 96, true, 40);
    linear_bf16_case("linear 999x40 -> 20", &[999, 40], 20, false, 43);
    linear_bf16_case("linear x_proj 2001x64 -> 34", &[2001, 64], 34, false, 52);
    linear_bf16_case("linear dt_proj 1999x2 -> 64 + bias", &[1999, 2], 64, true, 55);
    linear_bf16_case("linear 1000x37 -> 53 + bias", &[1000, 37], 53, true, 46);
    linear_bf16_case("linear in_proj (100003, 32) -> 128", &[100_003, 32], 128, false, 49);
}

/// The bf16 linear's output and every gradient, element by element, against float64 on the same bf16 inputs and the
/// same bf16 seed gradient: each (y, dx, and dW and db, float32 sums over the rows returned in the bf16 weight's type)
/// is one rounding to bf16 away from exact (|error| <= 2^-8 |exact|), plus float32 summation noise.
fn linear_bf16_elementwise(m: usize, k: usize, n: usize, bias: bool, seed: u64) {
    let name = format!("linear bf16 ({m}, {k}) -> {n}{}", if bias { " + bias" } else { "" });
    let dev = Device::Cuda(tf32_gpu());
    let on_gpu: Vec<Tensor> = linear_inputs(&[m, k], n, bias, seed)
        .iter()
        .map(|x| x.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap())
        .collect();
    let on_cpu: Vec<Tensor> =
        on_gpu.iter().map(|x| Tensor::from_vec(x.to_vec_f64().unwrap(), x.shape()).unwrap()).collect();
    let g = randn32(&[m, n], 1.0, seed + 7).to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
    let g_cpu = Tensor::from_vec(g.to_vec_f64().unwrap(), g.shape()).unwrap();
    let run = |xs: &[Tensor], g: Tensor| {
        let mut tape = Tape::new();
        xs.iter().for_each(|x| tape.watch(x));
        let y = linear(&mut tape, &xs[0], &xs[1], xs.get(2)).unwrap();
        let mut grads = tape.backward_from(&y, g).unwrap();
        let mut out = vec![y.to_vec_f64().unwrap()];
        out.extend(xs.iter().map(|x| grads.take(x).unwrap().to_vec_f64().unwrap()));
        out
    };
    let (got, want) = (run(&on_gpu, g), run(&on_cpu, g_cpu));
    for (i, what) in ["output", "dx", "dW", "db"].iter().enumerate().take(got.len()) {
        let scale = want[i].iter().fold(0.0f64, |a, v| a.max(v.abs()));
        common::assert_close(&format!("{name}: {what}"), &got[i], &want[i], 1.0 / 256.0, 1e-5 * scale);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_linear_stream() {
    // The streaming products (cuda/gemm.cu, short reductions over many rows) in each column width, and the shapes
    // around them: in_proj's (fprop 128 columns, dgrad 32 over a reduction of 128, dW 128 x 32), 64 -> 64 (dW
    // 64 x 64), x_proj's 34 outputs (element stores; its dgrad and dW read rows of 34 by pairs), reductions padded
    // to 16 (K = 40, 56; dgrad over 24 and 100), bias, N = 56 in 64-column tiles (dW 24 x 56 in a 32 x 64 tile), two
    // column blocks (N = 200), fewer rows than a tile (dW 16 x 128 in two tiles), dt_proj's rows of 2 (fprop, dgrad
    // to 2 columns, dW 64 x 2); the tiled products for a dgrad over 200 and a dW of 200 rows. Where both gradients
    // stream and the layer has at most 64 inputs they come from the fused backward (linear.rs's fused_backward: all
    // of the above but 8 -> 200 and 128 -> 16; 32 -> 24 adds its 32 x 32 instance), and on their own kernels from 96
    // inputs (dx over 128, dW 128 x 96 in two 64-column tiles).
    linear_bf16_elementwise(100_003, 32, 128, false, 60);
    linear_bf16_elementwise(50_001, 64, 64, true, 67);
    linear_bf16_elementwise(5_001, 64, 34, false, 61);
    linear_bf16_elementwise(3_001, 40, 100, true, 62);
    linear_bf16_elementwise(2_001, 56, 24, true, 63);
    linear_bf16_elementwise(2_001, 32, 24, true, 69);
    linear_bf16_elementwise(777, 8, 200, true, 64);
    linear_bf16_elementwise(40, 128, 16, false, 65);
    linear_bf16_elementwise(1_999, 2, 64, false, 66);
    linear_bf16_elementwise(3_001, 96, 128, false, 68);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_linear_backward_fused_twice() {
    // The fused backward's dW sums its slices in a fixed order (gpu_linear_stream checks its values): in_proj's 32 ->
    // 128 over 469 token tiles, bit for bit twice.
    let dev = Device::Cuda(tf32_gpu());
    let inputs: Vec<Tensor> = linear_inputs(&[30_001, 32], 128, false, 97)
        .iter()
        .map(|x| x.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap())
        .collect();
    let in_proj = |t: &mut Tape, x: &[Tensor]| linear(t, &x[0], &x[1], None);
    assert_same_bits("fused linear backward, twice", &inputs, &dev, &in_proj, &in_proj);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_linear_wgmma() {
    // The wgmma products (cuda/gemm_wgmma.cu, sm_90: what the streaming kernels do not take) and their edges: a
    // reduction of 200 (not whole 64-index steps) into 136 outputs with bias (two 128-column tiles, the second short;
    // dx over 136 with W MN-major; dW 136 x 200 in 4 float32 slices of 256 tokens), x_proj-like 256 -> 48 (the 64-column
    // forward; dW 48 x 256, fewer rows than a tile), in_proj at 64 channels (dx and dW in 64-column tiles), fewer
    // tokens than a row tile; and rows of 130 elements, which are not whole 16-byte pieces: the mma.sync tiles.
    linear_bf16_elementwise(1_000, 200, 136, true, 70);
    linear_bf16_elementwise(777, 256, 48, false, 71);
    linear_bf16_elementwise(3_001, 64, 256, false, 72);
    linear_bf16_elementwise(40, 256, 200, true, 73);
    linear_bf16_elementwise(500, 130, 200, true, 74);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_linear_aligned_rows() {
    // K and N multiples of 4 (the tensor-core kernels' 16-byte copies), M odd, N past one 64-column tile.
    linear_case("linear 1001x64 -> 96 + bias", &[1001, 64], 96, true, 21);
    // At most 32 output columns: the 32-wide tiles.
    linear_case("linear 999x40 -> 20", &[999, 40], 20, false, 24);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_linear_single_row_and_column() {
    linear_case("linear 1x5 -> 1 + bias", &[1, 5], 1, true, 7);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_linear_reference_shape() {
    // Stage 0's in_proj (32 -> 2 x 64 channels) over 100,003 tokens instead of the 3.4 million of a 3D batch, so that
    // the float64 CPU reference takes about a second; enough rows for the split-K weight gradient and the two-round
    // bias sum.
    linear_case("linear in_proj (100003, 32) -> 128 + bias", &[100_003, 32], 128, true, 10);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_linear_deterministic() {
    let inputs = [randn32(&[20_001, 19], 1.0, 13), randn32(&[45, 19], 0.2, 14), randn32(&[45], 1.0, 15)];
    let f = |t: &mut Tape, x: &[Tensor]| linear(t, &x[0], &x[1], Some(&x[2]));
    for gpu in [gpu(), tf32_gpu()] {
        let math = if gpu.exact_f32() { "float32" } else { "tf32" };
        let (a, b) = (gpu_grads(&gpu, &inputs, f), gpu_grads(&gpu, &inputs, f));
        assert_eq!(a, b, "{math} linear gradients differ between two runs");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// causal conv1d

/// The conv1d ops of a GPU test: the conv alone, SiLU(conv) as one op, whose backward recomputes the conv, and that
/// op walking the sequences from their last token (the kernels stepping through memory backwards).
const CONV1D_OPS: [(&str, Conv1dOp); 3] =
    [("", causal_conv1d), (" + silu", conv1d_silu), (" + silu, reversed", conv1d_silu_reversed)];
type Conv1dOp = fn(&mut Tape, &Tensor, &Tensor, &Tensor) -> Result<Tensor>;

fn conv1d_silu(t: &mut Tape, x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    causal_conv1d_silu(t, Operand::Tensor(x), w, bias, Order::Stored)
}

fn conv1d_silu_reversed(t: &mut Tape, x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    causal_conv1d_silu(t, Operand::Tensor(x), w, bias, Order::Reversed)
}

fn conv_case(name: &str, g: usize, l: usize, c: usize, k: usize, seed: u64) {
    let inputs = [randn32(&[g, l, c], 1.0, seed), randn32(&[c, k], 0.5, seed + 1), randn32(&[c], 1.0, seed + 2)];
    for (suffix, op) in CONV1D_OPS {
        let f = |t: &mut Tape, x: &[Tensor]| op(t, &x[0], &x[1], &x[2]);
        let name = format!("{name}{suffix}");
        check_forward(&name, &inputs, 1e-5, f);
        check_op(&name, &inputs, 1e-4, f);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_causal_conv1d() {
    conv_case("causal_conv1d (5, 37, 19) k4", 5, 37, 19, 4, 20);
    conv_case("causal_conv1d (3, 11, 70) k3", 3, 11, 70, 3, 23);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_causal_conv1d_shorter_than_kernel() {
    // L = 2 < K = 4: every output sees the zero padding; L = 1 and K = 1 are the extremes.
    conv_case("causal_conv1d (7, 2, 33) k4", 7, 2, 33, 4, 26);
    conv_case("causal_conv1d (4, 1, 5) k4", 4, 1, 5, 4, 29);
    conv_case("causal_conv1d (4, 9, 5) k1", 4, 9, 5, 1, 32);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_causal_conv1d_vector() {
    // The vector kernels (K = 4, C a multiple of 4: 16-byte float32 accesses) over runs of 8 tokens: L = 37 ends on a
    // partial run, L = 3 < K and L = 1 fit in one; C = 36 takes 9 channel lanes. C = 6: the scalar kernels.
    conv_case("causal_conv1d (3, 37, 64) k4", 3, 37, 64, 4, 40);
    conv_case("causal_conv1d (4, 3, 128) k4", 4, 3, 128, 4, 43);
    conv_case("causal_conv1d (2, 1, 64) k4", 2, 1, 64, 4, 46);
    conv_case("causal_conv1d (2, 13, 36) k4", 2, 13, 36, 4, 49);
    conv_case("causal_conv1d (3, 17, 6) k4", 3, 17, 6, 4, 52);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_causal_conv1d_runs_per_thread() {
    // Enough runs that the backward gives each thread two (over 2048 blocks of runs), the last block of runs partly
    // filled: the vector kernels at C = 64 (36,891 runs of 8 tokens) and the scalar ones at C = 37 (two blocks of
    // channels).
    conv_case("causal_conv1d (4099, 67, 64) k4", 4099, 67, 64, 4, 55);
    conv_case("causal_conv1d (1001, 75, 37) k4", 1001, 75, 37, 4, 58);
}

/// The weight and bias gradients reduce over all tokens in a fixed order: two runs give the same bits, in float32 and
/// with bf16 tokens, for the vector and the scalar kernels, with several runs per thread.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_causal_conv1d_deterministic() {
    let gpu = gpu();
    for (g, l, c, seed) in [(4099, 67, 64, 61), (1001, 75, 37, 64), (5, 37, 128, 67)] {
        let inputs = [randn32(&[g, l, c], 1.0, seed), randn32(&[c, 4], 0.5, seed + 1), randn32(&[c], 1.0, seed + 2)];
        for (suffix, op) in CONV1D_OPS {
            let f32_conv = |t: &mut Tape, x: &[Tensor]| op(t, &x[0], &x[1], &x[2]);
            let bf16_conv = |t: &mut Tape, x: &[Tensor]| {
                let xb = cast(t, &x[0], DType::BF16)?;
                let y = op(t, &xb, &x[1], &x[2])?;
                cast(t, &y, DType::F32)
            };
            let (a, b) = (gpu_grads(&gpu, &inputs, f32_conv), gpu_grads(&gpu, &inputs, f32_conv));
            assert_eq!(a, b, "causal_conv1d{suffix} ({g}, {l}, {c}): float32 gradients differ between two runs");
            let (a, b) = (gpu_grads(&gpu, &inputs, bf16_conv), gpu_grads(&gpu, &inputs, bf16_conv));
            assert_eq!(a, b, "causal_conv1d{suffix} ({g}, {l}, {c}): bf16 gradients differ between two runs");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_causal_conv1d_silu_of_a_product() {
    // x = v w^T given as the product (Operand::Product: v and w kept, x rebuilt in the backward pass) against the
    // float64 reference, and against x made by linear and kept: the same bits.
    let device = Device::Cuda(gpu());
    let (g, l, k, c) = (300, 37, 32, 64);
    let x =
        [randn32(&[g, l, k], 1.0, 80), randn32(&[c, k], 0.2, 81), randn32(&[c, 4], 0.5, 82), randn32(&[c], 1.0, 83)];
    let product = |t: &mut Tape, v: &[Tensor]| {
        let made = Product::new(t, &v[0], &v[1])?;
        causal_conv1d_silu(t, Operand::Product(&made), &v[2], &v[3], Order::Stored)
    };
    let kept = |t: &mut Tape, v: &[Tensor]| {
        let made = linear(t, &v[0], &v[1], None)?;
        causal_conv1d_silu(t, Operand::Tensor(&made), &v[2], &v[3], Order::Stored)
    };
    check_op("causal_conv1d_silu of a product", &x, 1e-4, product);
    let on_gpu: Vec<Tensor> = x.iter().map(|t| t.to_device(&device).unwrap()).collect();
    assert_same_bits("causal_conv1d_silu of a product", &on_gpu, &device, &product, &kept);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_causal_conv1d_reference_shape() {
    // PaM at stage 0: 2 sequences of 26,880 tokens, d_inner = 64 channels, kernel 4 (several weight-gradient slices).
    conv_case("causal_conv1d (2, 26880, 64) k4", 2, 26_880, 64, 4, 35);
}

// ---------------------------------------------------------------------------------------------------------------
// selective scan

/// The scan of these sizes in both orders: as stored, and from each sequence's last token (every token-shaped access
/// of the kernels mirrored) against the CPU's.
fn scan_case(name: &str, g: usize, l: usize, d: usize, n: usize, seed: u64) {
    let inputs = scan_inputs(g, l, d, n, seed);
    check_op(name, &inputs, 1e-4, scan);
    check_op(&format!("{name} reversed"), &inputs, 1e-4, scan_reversed);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_selective_scan_short() {
    // Many short sequences (the PiM regime): one pass; 37 channels leave part of a tile idle.
    scan_case("selective_scan G300 L7 D37 N16", 300, 7, 37, 16, 40);
    scan_case("selective_scan G5 L1 D3 N16", 5, 1, 3, 16, 41);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_selective_scan_chunk_boundary() {
    // L = T: one chunk, nothing saved. L = T + 1: the smallest chunked scan (a 1-token second chunk); with few
    // (sequence, channel) pairs the forward runs the three-pass parallel scan, and the backward sweeps the whole
    // sequence in one block. L = 2T + 17 exceeds what one backward block sweeps: one chunk per block, with the adjoint
    // carried across chunks.
    scan_case("selective_scan L = T", 3, GPU_CHUNK, 37, 16, 50);
    scan_case("selective_scan L = T + 1", 3, GPU_CHUNK + 1, 37, 16, 51);
    scan_case("selective_scan L = 2T + 17", 2, 2 * GPU_CHUNK + 17, 21, 16, 52);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_selective_scan_long() {
    // Few long sequences (the PaM regime): 79 chunks carried forward (states) and backward (adjoints).
    scan_case("selective_scan G2 L5000 D8 N16", 2, 5000, 8, 16, 60);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_selective_scan_of_products() {
    // Operand::Product (Mamba's delta = dt w^T and z = u W_z^T, rebuilt in the backward pass) against the float64
    // reference, and against delta and z made by linear and kept (Operand::Tensor): the same bits, output and all ten
    // gradients. One chunk of many sequences, whole sequences of several chunks, and few long ones (the chunked
    // parallel scan).
    let device = Device::Cuda(gpu());
    for (g, l, d, r, seed) in [(300, 7, 37, 3, 70), (260, 150, 64, 4, 72), (2, 700, 40, 3, 74)] {
        let x = projected_scan_inputs(g, l, d, 16, r, seed);
        let name = format!("selective_scan of products G{g} L{l} D{d} R{r}");
        check_op(&name, &x, 1e-4, |t, v| projected_scan(t, v, false));
        let on_gpu: Vec<Tensor> = x.iter().map(|t| t.to_device(&device).unwrap()).collect();
        let (projected, full) = (
            |t: &mut Tape, v: &[Tensor]| projected_scan(t, v, false),
            |t: &mut Tape, v: &[Tensor]| projected_scan(t, v, true),
        );
        assert_same_bits(&name, &on_gpu, &device, &projected, &full);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_selective_scan_many_chunked_sequences() {
    // Enough (sequence, channel) pairs (260 x 64) that the forward runs each sequence whole in one thread, recording
    // the chunk-start states; 150 tokens are too many for one backward block, so the backward goes chunk by chunk.
    scan_case("selective_scan G260 L150 D64 N16", 260, 150, 64, 16, 65);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_selective_scan_other_state_sizes() {
    // N < 16 pads the 16-state kernels; 16 < N <= 32 takes the 32-state kernels: one chunk, two chunks (beyond what
    // their backward block sweeps whole), many chunks.
    scan_case("selective_scan N5", 7, 19, 13, 5, 70);
    scan_case("selective_scan N23 short", 7, 19, 13, 23, 71);
    scan_case("selective_scan N23 L100", 3, 100, 13, 23, 72);
    scan_case("selective_scan N23 L300", 2, 300, 9, 23, 73);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_selective_scan_channel_splits() {
    // Few sequences of many channels (amos-2d's deepest windowed layers: 12 x 100 tokens, 1024 channels): the
    // backward splits the channel tiles over 32 blocks per sequence and adds their dB, dC sums afterwards. N = 23
    // (16-channel tiles) over five chunks per sequence, 13 splits of one tile.
    scan_case("selective_scan G12 L100 D1024 N16", 12, 100, 1024, 16, 75);
    scan_case("selective_scan G2 L300 D200 N23", 2, 300, 200, 23, 76);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_selective_scan_pim_stage0() {
    // PiM at stage 0: sequences of 128 tokens (two chunks), d_inner = 64, N = 16. The real batch has 26,880 sequences;
    // 256 keep the float64 CPU reference (forward and backward) to about a second and still take the one-pass forward.
    scan_case("selective_scan PiM stage 0 (G256 of 26880) L128 D64 N16", 256, 128, 64, 16, 80);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_selective_scan_pam_stage0() {
    // PaM at stage 0: one sequence of 26,880 tokens (the real batch has 2), d_inner = 64, N = 16: 420 chunks.
    scan_case("selective_scan PaM stage 0 G1 L26880 D64 N16", 1, 26_880, 64, 16, 90);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_selective_scan_deterministic() {
    // Parameter, B and C gradients are sums over tokens and channels: two runs must agree bit for bit.
    let inputs = scan_inputs(3, 700, 40, 16, 100);
    assert_eq!(
        gpu_grads(&gpu(), &inputs, scan),
        gpu_grads(&gpu(), &inputs, scan),
        "selective_scan gradients differ between runs"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_selective_scan_rejects_large_state() {
    let dev = Device::Cuda(gpu());
    let inputs: Vec<Tensor> = scan_inputs(1, 4, 2, 33, 110).iter().map(|x| x.to_device(&dev).unwrap()).collect();
    let msg = scan(&mut Tape::new(), &inputs).unwrap_err().to_string();
    assert!(msg.contains("N = 33"), "{msg}");
}
