//! conv and conv_transpose on the GPU against their CPU reference (float64): forward and every gradient, fresh
//! random inputs, odd sizes (not multiples of the 128 x 32 x 16 tiles), NaN-poisoned outputs, in all three maths. Exact
//! float32 (SIMT): tolerance 1e-4, every output being a float32 sum of up to a few thousand products (the weight
//! gradient's of many more, in slices). tf32 tensor cores: engine.md's 1e-2, and above 1e-6, which exact float32 never
//! reaches here: a tf32 kernel that quietly ran in float32 would fail. bf16 storage (bf16 tensor cores): 1e-2 against
//! float64 on the same bf16-rounded inputs. Run on a GPU machine with
//! `cargo test --release --test gpu_conv -- --ignored`. Run-to-run determinism and the shape errors, the same on
//! every device, are device tests in tests/grad_conv.rs.

mod common;

use common::{assert_conv_repeats, assert_rel_err, check_op_bf16, check_op_on, randn32, tf32_gpu};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::conv::conv;
use lkm_engine::ops::conv_transpose::conv_transpose;
use lkm_engine::tensor::DType;
use lkm_engine::Tensor;

const TOL: f64 = 1e-4;
/// engine.md's tolerance for tf32 and bf16 products.
const TF32_TOL: f64 = 1e-2;

/// Runs `f` on `inputs` (the last one an optional bias) against the CPU, with and without the bias, on the exact
/// float32 kernels, on the tf32 tensor-core kernels, and on the bf16 tensor-core kernels (bf16 storage of every
/// operand, against float64 on the same rounded inputs).
fn check_all_maths(name: &str, inputs: [Tensor; 3], f: impl Fn(&mut Tape, &[Tensor]) -> lkm_engine::Result<Tensor>) {
    let [x, w, b] = inputs;
    for (math, gpu, tol) in [("float32", common::gpu(), TOL), ("tf32", tf32_gpu(), TF32_TOL)] {
        let with_bias = [x.clone(), w.clone(), b.clone()];
        let worst = check_op_on(gpu.clone(), &format!("{name} {math} with bias"), &with_bias, &[true; 3], tol, &f);
        let no_bias = [x.clone(), w.clone()];
        check_op_on(gpu, &format!("{name} {math} without bias"), &no_bias, &[true; 2], tol, &f);
        if math == "tf32" {
            assert!(worst > 1e-6, "{name}: the tf32 kernels match float64 to {worst:e}: are they running in float32?");
        }
    }
    let bf16_name = format!("{name} bf16");
    check_op_bf16(&bf16_name, &[x.clone(), w.clone(), b], &[true; 3], &[true; 3], TF32_TOL, &f);
    check_op_bf16(&bf16_name, &[x, w], &[true; 2], &[true; 2], TF32_TOL, &f);
}

/// Checks conv with and without bias on an input of `x_shape` and a weight of `w_shape`.
fn check_conv(name: &str, x_shape: &[usize], w_shape: &[usize], stride: &[usize], seed: u64) {
    let inputs = [randn32(x_shape, 1.0, seed), randn32(w_shape, 0.3, seed + 1), randn32(&[w_shape[0]], 1.0, seed + 2)];
    check_all_maths(name, inputs, |t, v| conv(t, &v[0], &v[1], v.get(2), stride));
}

/// Checks conv_transpose with and without bias on an input of `x_shape` and a weight of `w_shape`.
fn check_conv_transpose(name: &str, x_shape: &[usize], w_shape: &[usize], seed: u64) {
    let inputs = [randn32(x_shape, 1.0, seed), randn32(w_shape, 0.3, seed + 1), randn32(&[w_shape[1]], 1.0, seed + 2)];
    check_all_maths(name, inputs, |t, v| conv_transpose(t, &v[0], &v[1], v.get(2)));
}

/// A stride-1 conv of an input of `x_shape` and a weight of `w_shape` in bf16 on the GPU (inputs from seeds `seed`,
/// `seed + 1`, `seed + 2`): its output and both gradients are the same bits on two runs.
fn check_bf16_conv_repeats(name: &str, x_shape: &[usize], w_shape: &[usize], seed: u64) {
    let dev = Device::Cuda(tf32_gpu());
    let on_gpu = |t: Tensor| t.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
    let mut y_shape = x_shape.to_vec();
    y_shape[1] = w_shape[0];
    let x = on_gpu(randn32(x_shape, 1.0, seed));
    let w = on_gpu(randn32(w_shape, 0.3, seed + 1));
    let g = on_gpu(randn32(&y_shape, 1.0, seed + 2));
    assert_conv_repeats(name, &x, &w, &g);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv3d_k333() {
    check_conv("conv3d 3x3x3 stride 1", &[2, 5, 7, 9, 11], &[7, 5, 3, 3, 3], &[1, 1, 1], 10);
    check_conv("conv3d 3x3x3 stride 2", &[2, 5, 7, 9, 11], &[7, 5, 3, 3, 3], &[2, 2, 2], 20);
    check_conv("conv3d 3x3x3 stride 1,2,2", &[2, 5, 7, 9, 11], &[7, 5, 3, 3, 3], &[1, 2, 2], 30);
    // In bf16 on sm_90: the weight gradient on the explicit product (64 wide channels), the input gradient's eight
    // stride phases of 1024 positions each (one of one tap) on the implicit products.
    check_conv("conv3d 3x3x3 stride 2, 64 -> 24 channels", &[2, 64, 8, 16, 32], &[24, 64, 3, 3, 3], &[2, 2, 2], 35);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv3d_k133() {
    check_conv("conv3d 1x3x3 stride 1", &[2, 5, 7, 9, 11], &[7, 5, 1, 3, 3], &[1, 1, 1], 40);
    check_conv("conv3d 1x3x3 stride 1,2,2", &[2, 5, 7, 9, 11], &[7, 5, 1, 3, 3], &[1, 2, 2], 50);
}

/// 1x1x1 with stride 2: the input gradient's odd phases have no tap at all and must come out zero.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv3d_k111() {
    check_conv("conv3d 1x1x1 stride 1", &[2, 5, 7, 9, 11], &[7, 5, 1, 1, 1], &[1, 1, 1], 60);
    check_conv("conv3d 1x1x1 stride 2", &[2, 5, 7, 9, 11], &[7, 5, 1, 1, 1], &[2, 2, 2], 70);
}

/// Different odd kernels and strides on every axis, and strides beyond the map size.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv3d_mixed_axes() {
    check_conv("conv3d 3x1x5 stride 2,1,3", &[2, 5, 7, 9, 11], &[7, 5, 3, 1, 5], &[2, 1, 3], 80);
    check_conv("conv3d stride beyond the map", &[1, 2, 1, 3, 2], &[3, 2, 3, 3, 3], &[2, 4, 3], 90);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv2d() {
    check_conv("conv2d 3x3 stride 1", &[2, 5, 13, 17], &[7, 5, 3, 3], &[1, 1], 100);
    check_conv("conv2d 3x3 stride 2", &[2, 5, 13, 17], &[7, 5, 3, 3], &[2, 2], 110);
    check_conv("conv2d 1x1 stride 1", &[2, 5, 13, 17], &[7, 5, 1, 1], &[1, 1], 120);
    // A weight gradient whose reduction fits one slice (written directly, no slice sum).
    check_conv("conv2d tiny", &[1, 3, 3, 5], &[4, 3, 3, 3], &[1, 1], 130);
}

/// Several column tiles (Cout 37 > 32), several row tiles of the weight gradient (Cin * taps = 297 > 128), and
/// reductions of many stages.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv2d_many_channels() {
    check_conv("conv2d 33 -> 37 channels", &[2, 33, 19, 23], &[37, 33, 3, 3], &[1, 1], 140);
    check_conv("conv2d 33 -> 37 channels stride 2", &[2, 33, 19, 23], &[37, 33, 3, 3], &[2, 2], 150);
    // More than one 64-column tile of the tensor-core kernels in the forward (67) and the input gradient (70).
    check_conv("conv2d 70 -> 67 channels", &[1, 70, 11, 13], &[67, 70, 3, 3], &[1, 1], 170);
}

/// The stride-1 products of more than one tap and at least one channel chunk (16 bf16, 8 float32), which the
/// tensor-core maths run on the halo-tile kernels (cuda/conv_halo.cu): channel counts that are not multiples of the
/// chunk, outputs in both tile widths (at most 32 columns, and more than 64), maps that are not multiples of any box
/// (the box's extent along the last axis is 8, 16 or 32), kernels up to 3x3x3; the forward, the input gradient (a
/// stride-1 product with the kernel flipped; boxes of 256 positions for outputs of more than 32 channels where
/// those cover little more of the map than boxes of 128) and, on maps of at least 8192 positions, the weight
/// gradient (at least 16 input channels: row tiles of 16, boxes dealt to several slices) all go through them. The
/// input gradient of a strided conv goes through them too, one product per stride phase (each writing every
/// stride-th position; a phase of one tap stays on the gathers), and so does its forward at strides (1, 2, 2) and
/// (2, 2, 2) (boxes of 64 positions, the halo split by phase; of 3x3x3 kernels from 128 source channels). The 1x1x1
/// case is the gathers' (no halo). In bf16 on sm_90 the stride phases into more than 32 channels of at least 16
/// source channels and 1024 positions, one-tap ones included, run on the implicit wgmma products instead (conv.rs's
/// implicit_suits): here those of the 40 -> 80 3D case.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_halo_tiles() {
    check_conv("conv3d 3x3x3 19 -> 21, x 37", &[2, 19, 5, 9, 37], &[21, 19, 3, 3, 3], &[1, 1, 1], 400);
    check_conv("conv3d 1x3x3 17 -> 40, x 12", &[1, 17, 3, 20, 12], &[40, 17, 1, 3, 3], &[1, 1, 1], 410);
    check_conv("conv3d 1x1x1 32 -> 14", &[2, 32, 3, 5, 7], &[14, 32, 1, 1, 1], &[1, 1, 1], 420);
    check_conv("conv3d 3x1x3 24 -> 70, x 70", &[1, 24, 4, 3, 70], &[70, 24, 3, 1, 3], &[1, 1, 1], 430);
    check_conv("conv2d 3x3 48 -> 33, 9 x 70", &[2, 48, 9, 70], &[33, 48, 3, 3], &[1, 1], 440);
    // The weight gradient takes the halo tiles from 8192 positions on (below, the gathers above).
    check_conv("conv3d 3x3x3 19 -> 21, 8640 positions", &[1, 19, 4, 48, 45], &[21, 19, 3, 3, 3], &[1, 1, 1], 450);
    check_conv("conv2d 3x3 24 -> 40, 2 x 70 x 60", &[2, 24, 70, 60], &[40, 24, 3, 3], &[1, 1], 460);
    // Forward and input gradient of more than 32 columns in boxes of 256 positions (1.11x and 1.0x the positions that
    // boxes of 128 cover).
    check_conv("conv3d 3x3x3 35 -> 40, 33000 positions", &[1, 35, 5, 66, 100], &[40, 35, 3, 3, 3], &[1, 1, 1], 470);
    check_conv("conv2d 3x3 40 -> 36, 3 x 100 x 115", &[3, 40, 100, 115], &[36, 40, 3, 3], &[1, 1], 480);
    // Strided: the input gradient's phases (source: the 20 or 70 output-gradient channels) on the halo tiles (in bf16
    // on sm_90 the implicit products take those into more than 32 channels of at least 1024 positions).
    check_conv(
        "conv3d 3x3x3 stride 1,2,2 9 -> 20, 5 x 23 x 70",
        &[1, 9, 5, 23, 70],
        &[20, 9, 3, 3, 3],
        &[1, 2, 2],
        490,
    );
    check_conv("conv3d 3x3x3 stride 2 13 -> 70, 7 x 9 x 37", &[2, 13, 7, 9, 37], &[70, 13, 3, 3, 3], &[2, 2, 2], 500);
    check_conv("conv2d 3x3 stride 2 24 -> 33, 2 x 41 x 66", &[2, 24, 41, 66], &[33, 24, 3, 3], &[2, 2], 510);
    // Strided forwards in boxes of 64 (3x3x3 from 128 source channels, conv.rs's HALO_STRIDED_MIN_CHANNELS; fewer
    // take the gathers): maps no box divides, more than 64 output columns, at most 32, 1x3x3.
    check_conv(
        "conv3d 3x3x3 stride 1,2,2 128 -> 20, 3 x 11 x 19",
        &[1, 128, 3, 11, 19],
        &[20, 128, 3, 3, 3],
        &[1, 2, 2],
        515,
    );
    check_conv(
        "conv3d 3x3x3 stride 2 130 -> 66, 4 x 9 x 14",
        &[1, 130, 4, 9, 14],
        &[66, 130, 3, 3, 3],
        &[2, 2, 2],
        525,
    );
    check_conv(
        "conv3d 3x3x3 stride 1,2,2 24 -> 40, 3 x 30 x 45",
        &[2, 24, 3, 30, 45],
        &[40, 24, 3, 3, 3],
        &[1, 2, 2],
        520,
    );
    check_conv("conv3d 3x3x3 stride 2 17 -> 70, 5 x 18 x 37", &[1, 17, 5, 18, 37], &[70, 17, 3, 3, 3], &[2, 2, 2], 530);
    check_conv("conv2d 3x3 stride 2 20 -> 20, 2 x 41 x 66", &[2, 20, 41, 66], &[20, 20, 3, 3], &[2, 2], 540);
    check_conv(
        "conv3d 1x3x3 stride 1,2,2 16 -> 33, 2 x 19 x 34",
        &[1, 16, 2, 19, 34],
        &[33, 16, 1, 3, 3],
        &[1, 2, 2],
        550,
    );
    // A strided forward on the implicit wgmma products' wide tile (more than 64 output columns, at least 1024
    // positions: conv.rs's implicit_suits), a source chunk of 16 channels cut short.
    check_conv("conv3d 3x3x3 stride 2 40 -> 80, 4 x 16 x 17", &[1, 40, 8, 32, 34], &[80, 40, 3, 3, 3], &[2, 2, 2], 560);
}

/// The bf16 weight gradient of stride-1 convs of 5 to 10 or 14 to 28 taps on maps of at least 8192 positions runs on
/// the wgmma kernels of cuda/conv_wgmma.cu on an H100/H200 (boxes of 256 narrow positions, 64 output channels x 16
/// (3x3x3) or 32 (1x3x3: 17 and 40 input channels leave the second 16-channel halo pass partly empty) input channels
/// per block, both warpgroups' taps): rows of the narrow map a whole number of 16 bytes (copied by
/// cp.async) and not (element loads; gpu_conv_halo_tiles' cases), more than one tile of output channels, a 1x3x3
/// kernel in boxes 4 slices deep, a 2D map, and both passes twice, bit for bit.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_wgrad_wgmma() {
    check_conv("conv3d 3x3x3 24 -> 70, x 96", &[1, 24, 5, 20, 96], &[70, 24, 3, 3, 3], &[1, 1, 1], 600);
    check_conv("conv3d 1x3x3 40 -> 33, x 64", &[2, 40, 3, 26, 64], &[33, 40, 1, 3, 3], &[1, 1, 1], 610);
    check_conv("conv2d 3x3 17 -> 66, 90 x 96", &[1, 17, 90, 96], &[66, 17, 3, 3], &[1, 1], 620);
    check_bf16_conv_repeats("conv3d 3x3x3 32 -> 40 bf16", &[2, 32, 6, 18, 40], &[40, 32, 3, 3, 3], 630);
}

/// The explicit weight gradient (cuda/gemm_wgmma.cu, sm_90; conv.rs `Pairing::weight_grad_gemm`, which takes these
/// shapes: conv.rs's `explicit_weight_gradient_takes_the_shapes_it_pays_on`): deep maps of few positions through the
/// columns (conv_im2col_bf16; a strided conv's too) and 1x1x1 kernels straight from the map. 330 output channels
/// leave the third 128-row tile 74 rows, 37 x 27 = 999 weight columns an odd last pair, positions that are not whole
/// steps of 32 a short last step per batch item, and the reduction runs in several slices; then forward and backward
/// twice bit for bit.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_wgrad_gemm() {
    check_conv("conv3d 3x3x3 37 -> 330, 4x6x10", &[2, 37, 4, 6, 10], &[330, 37, 3, 3, 3], &[1, 1, 1], 640);
    check_conv("conv3d 1x1x1 20 -> 9, 3x6x44", &[2, 20, 3, 6, 44], &[9, 20, 1, 1, 1], &[1, 1, 1], 650);
    // Rows of positions that are not whole 16-byte pieces (35 and 105): the narrow map, the columns and the 1x1x1
    // conv's wide map in rows padded to 40 and 112.
    check_conv("conv2d 3x3 24 -> 320, 5 x 7", &[2, 24, 5, 7], &[320, 24, 3, 3], &[1, 1], 655);
    check_conv("conv3d 1x1x1 20 -> 9, 3x5x7", &[2, 20, 3, 5, 7], &[9, 20, 1, 1, 1], &[1, 1, 1], 657);
    check_conv("conv2d 3x3 24 -> 320, 18 x 12", &[3, 24, 18, 12], &[320, 24, 3, 3], &[1, 1], 660);
    check_conv(
        "conv3d 3x3x3 21 -> 320 stride 1,2,2, 5x12x16",
        &[2, 21, 5, 12, 16],
        &[320, 21, 3, 3, 3],
        &[1, 2, 2],
        665,
    );
    check_bf16_conv_repeats("conv3d 3x3x3 48 -> 320 bf16", &[2, 48, 4, 6, 10], &[320, 48, 3, 3, 3], 670);
}

/// The TMA kernels (cuda/conv_tma.cu, sm_90). The weight gradient (conv.rs `Pairing::tma_wgrad_rows` says which 3x3x3
/// and 1x3x3 convs of stride 1 or 2 it takes): boxes of 16 x 4 positions over a map 10 wide (the last 6 columns of each
/// box past the map, zeros), 67 output channels (the 128-row tile's second warpgroup on 3 of its 64), 65 input channels
/// (the copy rounds them to 72, the second 64-channel box mostly past them; 67 x 65 sums per tap, so that every other
/// row of the partial sums starts at an odd float), two batch items; a 1x3x3 kernel into 130 channels (three row tiles,
/// the last of 2); 64 output channels (blocks of 64 rows, the warpgroups on the halves of each k-block) in a 2D 3x3 of
/// 60 k-blocks (slices of the reduction) and a 1x3x3 of 68, the latter bit for bit twice.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_tma() {
    check_conv("conv3d 3x3x3 65 -> 67, 3x6x10", &[2, 65, 3, 6, 10], &[67, 65, 3, 3, 3], &[1, 1, 1], 680);
    check_conv("conv3d 1x3x3 64 -> 130, 2x9x20", &[1, 64, 2, 9, 20], &[130, 64, 1, 3, 3], &[1, 1, 1], 685);
    check_conv("conv2d 3x3 96 -> 64, 40 x 48", &[2, 96, 40, 48], &[64, 96, 3, 3], &[1, 1], 690);
    check_bf16_conv_repeats("conv3d 1x3x3 64 -> 64 bf16", &[2, 64, 34, 8, 8], &[64, 64, 1, 3, 3], 695);
    // The forward and input gradient on the TMA product (`Pairing::tma_product_rows`: 128 channels and more on both
    // sides): 130 source channels (three 64-channel k-blocks per tap, the last of 2 and the packed weight's zeros
    // past them), 136 outputs (a second 128-row tile of 8), 16 x 8 boxes over a map 10 wide; 2D maps 20 wide in 32 x 4
    // boxes and 8 wide in 8 x 16 (30 rows: the second box's last two past the map), the three box widths; bit for bit
    // twice.
    check_conv("conv3d 3x3x3 130 -> 136, 3x6x10", &[2, 130, 3, 6, 10], &[136, 130, 3, 3, 3], &[1, 1, 1], 696);
    check_conv("conv2d 3x3 128 -> 128, 9 x 20", &[1, 128, 9, 20], &[128, 128, 3, 3], &[1, 1], 697);
    check_conv("conv2d 3x3 128 -> 128, 30 x 8", &[1, 128, 30, 8], &[128, 128, 3, 3], &[1, 1], 699);
    // The forward into at most 64 channels in blocks of 64 rows and 256 positions (`Pairing::tma_product_rows`): 40
    // outputs (the block's rows past them), 136 sources (the third k-block of 8), one 32 x 8 box over 20 x 6; its
    // input gradient stays on the other kernels. The input gradient on those blocks (conv_dgrad_tma_bf16_m64):
    // 40 -> 136, whose forward stays on the other kernels.
    check_conv("conv3d 3x3x3 136 -> 40, 3x6x20", &[2, 136, 3, 6, 20], &[40, 136, 3, 3, 3], &[1, 1, 1], 701);
    check_conv("conv3d 3x3x3 40 -> 136, 3x6x20", &[2, 40, 3, 6, 20], &[136, 40, 3, 3, 3], &[1, 1, 1], 702);
    check_bf16_conv_repeats("conv3d 3x3x3 128 -> 128 bf16", &[1, 128, 4, 8, 16], &[128, 128, 3, 3, 3], 698);
    // The weight gradient of strided convs (the wide boxes at steps of 2): stride (2, 2, 2) over odd sizes (each
    // axis' last output reads past the map) in 16 x 4 boxes, 72 -> 136; stride (1, 2, 2), 64 -> 130 (three row
    // tiles); a 2D stride 2 into 64 channels (blocks of 64 rows) over 18 x 37 (narrow 9 x 19, boxes 32 x 2).
    check_conv("conv3d 3x3x3 stride 2 72 -> 136, 5x13x21", &[2, 72, 5, 13, 21], &[136, 72, 3, 3, 3], &[2, 2, 2], 703);
    check_conv("conv3d 3x3x3 stride (1, 2, 2) 64 -> 130", &[1, 64, 3, 10, 12], &[130, 64, 3, 3, 3], &[1, 2, 2], 704);
    check_conv("conv2d 3x3 stride 2 64 -> 64, 18 x 37", &[2, 64, 18, 37], &[64, 64, 3, 3], &[2, 2], 705);
    // From fewer than 64 wide channels (a box's channels past the map's are the TMA unit's zeros): 40 -> 64 3x3x3 at
    // (1, 2, 2) in blocks of 64 rows, 2D 32 -> 64.
    check_conv("conv3d 3x3x3 stride (1, 2, 2) 40 -> 64", &[1, 40, 3, 10, 12], &[64, 40, 3, 3, 3], &[1, 2, 2], 709);
    check_conv("conv2d 3x3 stride 2 32 -> 64, 18 x 37", &[2, 32, 18, 37], &[64, 32, 3, 3], &[2, 2], 710);
    // The forward and input gradient of strided convs on the TMA product (`Pairing::tma_launches`: the forward's
    // source at steps of 2, its columns of 2 and of 1 tap along y; the input gradient by stride phases, each written
    // at steps of 2): 136 -> 130 at stride 2 over odd sizes (both passes, 128 rows); 2D 128 -> 40 (the forward in 64
    // rows) and 40 -> 128 (the input gradient in 64 rows, its four phases of 2 x 2, 2 x 1, 1 x 2 and 1 x 1 taps);
    // the (1, 2, 2) 64 -> 130 above takes the input gradient in 64 rows, three taps along z per phase.
    check_conv(
        "conv3d 3x3x3 stride 2 136 -> 130, 5x13x21",
        &[2, 136, 5, 13, 21],
        &[130, 136, 3, 3, 3],
        &[2, 2, 2],
        706,
    );
    check_conv("conv2d 3x3 stride 2 128 -> 40, 30 x 37", &[2, 128, 30, 37], &[40, 128, 3, 3], &[2, 2], 707);
    check_conv("conv2d 3x3 stride 2 40 -> 128, 30 x 37", &[2, 40, 30, 37], &[128, 40, 3, 3], &[2, 2], 708);
    // Input gradients into at most 32 channels from 64 and more (conv_dgrad_tma_bf16_n32: the positions as the
    // product's m): 72 -> 32 of the conv 32 -> 72 (the source's second k-block of 8 channels), and those of the 2D
    // 32 -> 64 at stride 2 above and of 32 -> 64 at (1, 2, 2) here, by stride phases.
    check_conv("conv3d 3x3x3 32 -> 72, 3x6x20", &[2, 32, 3, 6, 20], &[72, 32, 3, 3, 3], &[1, 1, 1], 711);
    check_conv("conv3d 3x3x3 stride (1, 2, 2) 32 -> 64", &[1, 32, 3, 10, 12], &[64, 32, 3, 3, 3], &[1, 2, 2], 712);
}

/// The bf16 forward and input gradient of stride-1 convs of at least 512 source channels on small maps run as
/// explicit products (conv.cu's conv_im2row_bf16, gemm_wgmma.cu's conv_fprop_gemm_wgmma_bf16 and
/// conv_dgrad_gemm_wgmma_bf16 after conv_weight_flip_bf16, conv_rows_store_bf16): output channels that are not whole
/// 128-row tiles (520, 8), positions that are not whole 128-column tiles (70, 72), 2D and 3D kernels, a batch of 3.
/// The float32 and tf32 runs of check_conv take the implicit kernels, as before.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_explicit_products() {
    check_conv("conv2d 3x3 512 -> 520, 2 x 5x7", &[2, 512, 5, 7], &[520, 512, 3, 3], &[1, 1], 760);
    check_conv("conv3d 3x3x3 512 -> 8, 3 x 2x3x4", &[3, 512, 2, 3, 4], &[8, 512, 3, 3, 3], &[1, 1, 1], 770);
    check_bf16_conv_repeats("conv2d 3x3 512 -> 520 bf16", &[2, 512, 5, 7], &[520, 512, 3, 3], 780);
}

/// The bf16 wgmma GEMM products in 256-column tiles (cuda/gemm_wgmma.cu's _n256 kernels), which conv.rs's
/// widest_pays takes where they halve the waves of blocks: on a GPU of 132 SMs (H100, H200) these shapes have 133
/// to 264 tiles of 128 columns and at most 132 of 256 (conv.rs's unit test widest_tiles_where_the_waves_halve checks
/// the count). The implicit products: a strided forward to 256 channels, and the input gradient of a 2D stride-1 conv
/// from 256 channels below the wgmma halo products' 6400 positions; the explicit weight gradient of a 1x1 conv with
/// 17000 input channels; the explicit forward and input gradient of 512-channel 3x1 convs on 43 x 20x20 (3x1 keeps
/// the rows within EXPLICIT_MAX_ROWS_BYTES and the CPU reference short; an input gradient's source is the narrow
/// side). Their own test, not in the others: cuda-emu (CI) would take long over these sizes.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_widest_tiles() {
    check_conv("conv2d 3x3 stride 2 20 -> 256, 2 x 70 x 66", &[2, 20, 140, 132], &[256, 20, 3, 3], &[2, 2], 570);
    check_conv("conv2d 3x3 256 -> 24, 3 x 60 x 60", &[3, 256, 60, 60], &[24, 256, 3, 3], &[1, 1], 580);
    check_conv("conv2d 1x1 17000 -> 64, 2 x 2x4", &[2, 17000, 2, 4], &[64, 17000, 1, 1], &[1, 1], 675);
    check_conv("conv2d 3x1 512 -> 8, 43 x 20x20", &[43, 512, 20, 20], &[8, 512, 3, 1], &[1, 1], 790);
    check_conv("conv2d 3x1 8 -> 512, 43 x 20x20", &[43, 8, 20, 20], &[512, 8, 3, 1], &[1, 1], 795);
}

/// The bf16 1x1x1 products of maps whose channels are whole 16-byte pieces run on the channels-first streaming kernels
/// (cuda/gemm.cu's conv_*_pointwise_bf16_n*): the conv's forward and input gradient and the transposed conv's forward,
/// in each column width (9 and 20 channels in n32, 64 in n64, 80 and 100 in n128, 130 in two column blocks), with
/// reductions padded to 16 (20, 40, 100), batches whose positions are not whole 64-position tiles (312, 160, 192) and
/// 2D maps. The float32 and tf32 runs of check_conv take the other kernels, as before.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_pointwise() {
    check_conv("conv3d 1x1x1 20 -> 9, 3 x 3x8x13", &[3, 20, 3, 8, 13], &[9, 20, 1, 1, 1], &[1, 1, 1], 700);
    check_conv("conv3d 1x1x1 64 -> 100, 2 x 2x4x24", &[2, 64, 2, 4, 24], &[100, 64, 1, 1, 1], &[1, 1, 1], 710);
    check_conv("conv3d 1x1x1 40 -> 130, 1 x 1x8x8", &[1, 40, 1, 8, 8], &[130, 40, 1, 1, 1], &[1, 1, 1], 720);
    check_conv("conv2d 1x1 33 -> 47, 3 x 16x10", &[3, 33, 16, 10], &[47, 33, 1, 1], &[1, 1], 730);
    check_conv_transpose("conv_transpose3d 1x2x2 40 -> 20, 2 x 2x4x8", &[2, 40, 2, 4, 8], &[40, 20, 1, 2, 2], 740);
}

/// The bf16 1x1x1 products of more than GEMM_STREAM_MAX_K (128) source channels run on the channels-first wgmma kernels
/// (cuda/gemm_wgmma.cu's conv_*_pointwise_wgmma_bf16, sm_90): the forward reads W K-major, the input gradient and the
/// transposed conv's forward read it and every map MN-major. Reductions not whole 64-channel steps (200, 136, 264,
/// 144), output channels past one 128-row tile (136, 160, 200) or below it (24), positions not whole 128-position
/// tiles (288, 160, 96), 2D and 3D maps; the 2D convs' other role (24 source channels) stays on the streaming
/// kernels.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_pointwise_wgmma() {
    check_conv("conv3d 1x1x1 200 -> 136, 2 x 3x8x12", &[2, 200, 3, 8, 12], &[136, 200, 1, 1, 1], &[1, 1, 1], 750);
    check_conv("conv2d 1x1 256 -> 24, 3 x 10x16", &[3, 256, 10, 16], &[24, 256, 1, 1], &[1, 1], 755);
    check_conv("conv2d 1x1 24 -> 264, 1 x 8x16", &[1, 24, 8, 16], &[264, 24, 1, 1], &[1, 1], 760);
    check_conv_transpose("conv_transpose3d 1x2x2 192 -> 40, 2 x 2x4x8", &[2, 192, 2, 4, 8], &[192, 40, 1, 2, 2], 765);
    check_conv_transpose("conv_transpose2d 2x2 144 -> 36, 3 x 8x12", &[3, 144, 8, 12], &[144, 36, 2, 2], 770);
}

/// The tensor-core kernels enumerate at most 10 taps per axis: a larger kernel is refused with a message that says
/// so and names the way out, not computed wrongly.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_tf32_refuses_kernels_beyond_ten_taps() {
    let dev = Device::Cuda(tf32_gpu());
    let x = randn32(&[1, 2, 16, 16], 1.0, 1).to_device(&dev).unwrap();
    let w = randn32(&[3, 2, 11, 11], 0.1, 2).to_device(&dev).unwrap();
    let err = conv(&mut Tape::new(), &x, &w, None, &[1, 1]).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("at most 10 taps per axis") && err.contains("--math exact"), "{err}");
}

/// The stage-1 convolution of the 3D configuration (32 channels, 3x3x3, stride [1,2,2]) on a small map, forward and
/// backward.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv3d_reference_channels() {
    check_conv("conv3d 32 -> 32 3x3x3 stride 1,2,2", &[2, 32, 5, 28, 24], &[32, 32, 3, 3, 3], &[1, 2, 2], 160);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_transpose3d() {
    check_conv_transpose("conv_transpose3d 2x2x2", &[2, 5, 3, 5, 7], &[5, 7, 2, 2, 2], 200);
    check_conv_transpose("conv_transpose3d 1x2x2", &[2, 5, 3, 5, 7], &[5, 7, 1, 2, 2], 210);
    // Input positions a whole number of 8s (16-byte rows in bf16): in bf16 on sm_90 the fused wgmma forward, whose
    // stores carry each position to its voxel; rows of 11 (position pairs across rows), three position tiles.
    check_conv_transpose("conv_transpose3d 2x2x2, 64 positions", &[2, 5, 2, 4, 8], &[5, 7, 2, 2, 2], 215);
    check_conv_transpose("conv_transpose3d 2x2x2 24 -> 20, 3x8x11", &[2, 24, 3, 8, 11], &[24, 20, 2, 2, 2], 217);
    // 64 output channels: in bf16 on sm_90 the backward from g unfolded (dx a 1x1x1 product, dW the explicit one).
    check_conv_transpose("conv_transpose3d 2x2x2 24 -> 64, 2x4x8", &[2, 24, 2, 4, 8], &[24, 64, 2, 2, 2], 218);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_transpose2d() {
    check_conv_transpose("conv_transpose2d 2x2", &[2, 5, 9, 11], &[5, 7, 2, 2], 220);
    check_conv_transpose("conv_transpose2d 33 -> 37 channels", &[2, 33, 9, 11], &[33, 37, 2, 2], 230);
    check_conv_transpose("conv_transpose2d 33 -> 37 channels, 96 positions", &[2, 33, 8, 12], &[33, 37, 2, 2], 235);
}

/// The stage-0 convolutions of the 3D configuration (lkm-unet.md section 5: 32 -> 32 channels, kernels 1x3x3 and
/// 3x3x3, stride 1), forward only and on depth 8 instead of 40 with batch 1 instead of 2: the float64 CPU
/// reference of the full 1x32x40x224x192 3x3x3 forward alone is about 95 GFLOP. Then times the GPU forward and
/// forward + backward at the full shape (batch 2, depth 40).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv3d_reference_shape() {
    let gpu = common::gpu();
    let dev = Device::Cuda(gpu.clone());
    for (kernel, seed) in [([1, 3, 3], 300), ([3, 3, 3], 310)] {
        let x = randn32(&[1, 32, 8, 224, 192], 1.0, seed);
        let w = randn32(&[32, 32, kernel[0], kernel[1], kernel[2]], 0.1, seed + 1);
        let b = randn32(&[32], 1.0, seed + 2);
        let run = |xs: [&Tensor; 3], dev: Option<&Device>| {
            let [x, w, b] = xs.map(|t| match dev {
                Some(d) => t.to_device(d).unwrap(),
                None => t.to_dtype(DType::F64).unwrap(),
            });
            conv(&mut Tape::new(), &x, &w, Some(&b), &[1, 1, 1]).unwrap().to_vec_f64().unwrap()
        };
        let reference = run([&x, &w, &b], None);
        for (math, tol) in [("float32", TOL), ("tf32", TF32_TOL)] {
            gpu.set_exact_f32(math == "float32");
            let what = format!("conv3d {kernel:?} reference shape, {math}: forward");
            let err = assert_rel_err(&what, &run([&x, &w, &b], Some(&dev)), &reference, tol);
            eprintln!("conv3d {kernel:?} 1x32x8x224x192 {math} forward: relative error {err:.2e}");
        }
    }

    gpu.set_poison(false);
    for (math, kernel) in [("float32", [1, 3, 3]), ("float32", [3, 3, 3]), ("tf32", [1, 3, 3]), ("tf32", [3, 3, 3])] {
        gpu.set_exact_f32(math == "float32");
        let x = randn32(&[2, 32, 40, 224, 192], 1.0, 1).to_device(&dev).unwrap();
        let w = randn32(&[32, 32, kernel[0], kernel[1], kernel[2]], 0.1, 2).to_device(&dev).unwrap();
        let b = randn32(&[32], 1.0, 3).to_device(&dev).unwrap();
        let seed = randn32(&[2, 32, 40, 224, 192], 1.0, 4).to_device(&dev).unwrap();
        let forward = gpu.time_ms(1, 3, || conv(&mut Tape::new(), &x, &w, Some(&b), &[1, 1, 1]).map(|_| ())).unwrap();
        let both = gpu
            .time_ms(1, 3, || {
                let mut tape = Tape::new();
                for t in [&x, &w, &b] {
                    tape.watch(t);
                }
                let y = conv(&mut tape, &x, &w, Some(&b), &[1, 1, 1])?;
                tape.backward_from(&y, seed.clone()).map(|_| ())
            })
            .unwrap();
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let flop = 2.0 * (2 * 40 * 224 * 192) as f64 * 32.0 * 32.0 * kernel.iter().product::<usize>() as f64;
        eprintln!(
            "conv3d {kernel:?} 2x32x40x224x192 {math} on {}: forward {:.2} ms ({:.1} TFLOP/s), forward + dx + dw + db {:.2} ms",
            gpu.name(),
            best(&forward),
            flop / best(&forward) * 1e-9,
            best(&both)
        );
    }
}
