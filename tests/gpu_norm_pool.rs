//! The CUDA kernels of instance norm, layer norm (`cuda/norm.cu`), average pooling and nearest upsampling
//! (`cuda/pool.cu`) against their CPU references: forward and every gradient, 2D and 3D, odd and ragged sizes
//! (planes that are not a whole number of the kernels' 2048-voxel chunks, channel counts that are not multiples of
//! the 8-channel groups or of 32, row counts that are not multiples of a block's rows), both memory paths of the
//! norms (16-byte vectors where the plane or row size is a multiple of 4 float32, element access where it is not),
//! NaN-poisoned outputs, two runs giving the same bits, and a conv and a layer norm that rebuild their inputs. Run on
//! a GPU machine with `cargo test --release --test gpu_norm_pool -- --ignored`.

mod common;

use common::{check_op, randn32, seeded_step};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::activation::{leaky_relu, Activation::LeakyRelu};
use lkm_engine::ops::add::add;
use lkm_engine::ops::avg_pool::avg_pool;
use lkm_engine::ops::conv::conv;
use lkm_engine::ops::instance_norm::{instance_norm, instance_norm_act, instance_norm_add_act, Normalized, IN_EPS};
use lkm_engine::ops::layer_norm::{layer_norm, LN_EPS};
use lkm_engine::ops::pim::{partition, Partitioned, PimLayout};
use lkm_engine::ops::upsample::upsample_nearest;
use lkm_engine::tensor::map;
use lkm_engine::{DType, Tensor};

/// 3 randn + 2 in float32: a nonzero mean and a scale other than 1, so the normalisation has work to do.
fn shifted(shape: &[usize], seed: u64) -> Tensor {
    map::<f32>(&randn32(shape, 3.0, seed), |v| v + 2.0).unwrap()
}

fn check_instance_norm(shape: &[usize], seed: u64) {
    let c = shape[1];
    let inputs = [shifted(shape, seed), randn32(&[c], 1.0, seed + 1), randn32(&[c], 1.0, seed + 2)];
    check_op(&format!("instance_norm {shape:?}"), &inputs, 1e-4, |t: &mut Tape, x: &[Tensor]| {
        instance_norm(t, &x[0], &x[1], &x[2], IN_EPS)
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_instance_norm_2d() {
    // One partial chunk per plane (1517 voxels), then two chunks with a ragged last one (3015 voxels).
    check_instance_norm(&[2, 3, 37, 41], 1);
    check_instance_norm(&[3, 5, 67, 45], 4);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_instance_norm_3d() {
    // 3059 voxels (2 chunks), 15283 voxels (8 chunks, the last ragged), and a tiny plane of 3 voxels.
    check_instance_norm(&[2, 5, 7, 19, 23], 7);
    check_instance_norm(&[1, 3, 17, 31, 29], 10);
    check_instance_norm(&[3, 7, 1, 1, 3], 13);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_instance_norm_reference_plane() {
    // The stage-0 planes of the 3D reference configuration (40 x 224 x 192 = 1,720,320 voxels, 840 chunks), with 2
    // channels and batch 1 instead of 32 and 2 so that the float64 CPU reference (forward and backward) stays cheap.
    check_instance_norm(&[1, 2, 40, 224, 192], 16);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_instance_norm_vector_path() {
    // Planes of a multiple of 4 voxels: every chunk on 16-byte vectors. 3072 voxels (a whole chunk and a half one),
    // 4096 (two whole chunks), 420 (one partial chunk; with bf16 every other plane starts unaligned, see
    // tests/gpu_bf16_mamba.rs), 8 (a lane or two).
    check_instance_norm(&[2, 3, 8, 16, 24], 50);
    check_instance_norm(&[1, 3, 16, 16, 16], 53);
    check_instance_norm(&[2, 5, 10, 7, 6], 56);
    check_instance_norm(&[3, 2, 2, 4], 59);
}

/// Two runs of a norm's forward and backward give the same bits: output and every gradient.
fn assert_twice_same_bits(
    name: &str,
    inputs: &[Tensor],
    f: &dyn Fn(&mut Tape, &[Tensor]) -> lkm_engine::Result<Tensor>,
) {
    let dev = Device::Cuda(common::gpu());
    let xs: Vec<Tensor> = inputs.iter().map(|x| x.to_device(&dev).unwrap()).collect();
    let all = vec![true; xs.len()];
    let (a, b) = (seeded_step(name, &xs, &all, &dev, f), seeded_step(name, &xs, &all, &dev, f));
    assert!(a == b, "{name}: two runs differ");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_norms_twice_same_bits() {
    // Instance norm: the vector path (3072 voxels) and the element path (3059); layer norm: one row per team (C =
    // 32, 2,000 rows) and, with 140,000 rows, two rows per team; a wide row (C = 300).
    for shape in [&[2, 3, 8, 16, 24][..], &[2, 5, 7, 19, 23][..]] {
        let inputs = [shifted(shape, 60), randn32(&[shape[1]], 1.0, 61), randn32(&[shape[1]], 1.0, 62)];
        let f = |t: &mut Tape, x: &[Tensor]| instance_norm_act(t, &x[0], &x[1], &x[2], IN_EPS, Some(LeakyRelu));
        assert_twice_same_bits(&format!("instance_norm_leaky_relu {shape:?}"), &inputs, &f);
    }
    for shape in [&[2000, 32][..], &[140_000, 32][..], &[50, 300][..]] {
        let c = shape[1];
        let inputs = [shifted(shape, 63), randn32(&[c], 1.0, 64), randn32(&[c], 1.0, 65)];
        let f = |t: &mut Tape, x: &[Tensor]| layer_norm(t, &x[0], &x[1], &x[2], LN_EPS);
        assert_twice_same_bits(&format!("layer_norm {shape:?}"), &inputs, &f);
    }
}

/// The fused norm + LeakyReLU against float64 on the CPU, and against the two separate ops on the GPU, bit for bit.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_instance_norm_leaky_relu() {
    let fused = |t: &mut Tape, x: &[Tensor]| instance_norm_act(t, &x[0], &x[1], &x[2], IN_EPS, Some(LeakyRelu));
    let two_ops = |t: &mut Tape, x: &[Tensor]| {
        let y = instance_norm(t, &x[0], &x[1], &x[2], IN_EPS)?;
        leaky_relu(t, &y)
    };
    let dev = Device::Cuda(common::gpu());
    for (shape, seed) in [(&[2, 3, 37, 41][..], 30), (&[2, 5, 7, 19, 23][..], 33)] {
        let c = shape[1];
        // Mean 0 after the norm and shifts of either sign: a good share of the elements on each side of the kink.
        let inputs = [shifted(shape, seed), randn32(&[c], 1.0, seed + 1), randn32(&[c], 0.5, seed + 2)];
        check_op(&format!("instance_norm_leaky_relu {shape:?}"), &inputs, 1e-4, fused);
        let on_gpu: Vec<Tensor> = inputs.iter().map(|t| t.to_device(&dev).unwrap()).collect();
        let name = format!("fused against two ops {shape:?}");
        common::assert_same_bits(&name, &on_gpu, &dev, &fused, &two_ops);
    }
}

/// A conv of a normalised map given as [`Normalized`] (the map rebuilt in the conv's backward pass by the norm's apply
/// kernel) against the map kept: the same bits on the GPU in float32 and bf16; and float32 against float64 on the
/// CPU. 3D strided (1, 2, 2) and 2D at stride 1.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_of_a_normalized_map() {
    let dev = Device::Cuda(common::gpu());
    for (shape, stride, seed) in [(&[2, 8, 5, 12, 10][..], &[1, 2, 2][..], 40), (&[2, 16, 20, 24][..], &[1, 1][..], 45)]
    {
        let (c, cout) = (shape[1], 2 * shape[1] - 3);
        let mut w_shape = vec![cout, c];
        w_shape.extend(vec![3; shape.len() - 2]);
        let inputs = [
            shifted(shape, seed),
            randn32(&[c], 1.0, seed + 1),
            randn32(&[c], 0.5, seed + 2),
            randn32(&w_shape, 0.2, seed + 3),
            randn32(&[cout], 1.0, seed + 4),
        ];
        let rebuilt = |t: &mut Tape, x: &[Tensor]| {
            let n = Normalized::new(t, &x[0], &x[1], &x[2], IN_EPS, Some(LeakyRelu))?;
            conv(t, &n, &x[3], Some(&x[4]), stride)
        };
        let kept = |t: &mut Tape, x: &[Tensor]| {
            let y = instance_norm_act(t, &x[0], &x[1], &x[2], IN_EPS, Some(LeakyRelu))?;
            conv(t, &y, &x[3], Some(&x[4]), stride)
        };
        check_op(&format!("conv of a normalised map {shape:?}"), &inputs, 1e-4, rebuilt);
        for dtype in [DType::F32, DType::BF16] {
            let mut xs: Vec<Tensor> = inputs.iter().map(|t| t.to_device(&dev).unwrap()).collect();
            xs[0] = xs[0].to_dtype(dtype).unwrap();
            let name = format!("conv of a normalised map {shape:?} {dtype:?}, rebuilt against kept");
            common::assert_same_bits(&name, &xs, &dev, &rebuilt, &kept);
        }
    }
}

/// instance_norm_add_act (a residual block's end as one op) on the GPU: float32 against float64 on the CPU, and
/// against instance_norm, add and LeakyReLU the same bits in float32 and bf16 (the fused kernel rounds y and y + skip
/// as the three ops store them). 3D, 2D, and a plane of 693 voxels (no 16-byte vectors).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_instance_norm_add_act() {
    let dev = Device::Cuda(common::gpu());
    let fused = |t: &mut Tape, x: &[Tensor]| instance_norm_add_act(t, &x[0], &x[1], &x[2], IN_EPS, &x[3], LeakyRelu);
    let three = |t: &mut Tape, x: &[Tensor]| {
        let y = instance_norm(t, &x[0], &x[1], &x[2], IN_EPS)?;
        let y = add(t, &y, &x[3])?;
        leaky_relu(t, &y)
    };
    for (shape, seed) in [(&[2, 8, 5, 12, 10][..], 80), (&[2, 16, 20, 24][..], 85), (&[2, 3, 7, 9, 11][..], 90)] {
        let c = shape[1];
        let inputs = [
            shifted(shape, seed),
            randn32(&[c], 1.0, seed + 1),
            randn32(&[c], 0.5, seed + 2),
            randn32(shape, 1.0, seed + 3),
        ];
        check_op(&format!("instance_norm_add_act {shape:?}"), &inputs, 1e-4, fused);
        for dtype in [DType::F32, DType::BF16] {
            let mut xs: Vec<Tensor> = inputs.iter().map(|t| t.to_device(&dev).unwrap()).collect();
            for i in [0, 3] {
                xs[i] = xs[i].to_dtype(dtype).unwrap();
            }
            let name = format!("instance_norm_add_act {shape:?} {dtype:?}, one op against three");
            common::assert_same_bits(&name, &xs, &dev, &fused, &three);
        }
    }
}

/// A layer norm of PiM sequences given as [`Partitioned`] (cut again from the map in the norm's backward pass)
/// against the sequences kept: the same bits on the GPU in float32 and bf16; and float32 against float64 on the CPU.
/// 32 channels (4 lanes per row) and 300 (the wide kernel, a last 8-channel group half full).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_layer_norm_of_partitioned_sequences() {
    let dev = Device::Cuda(common::gpu());
    for (shape, window, seed) in
        [(&[2, 32, 4, 12, 10][..], &[2, 3, 5][..], 70), (&[2, 300, 12, 8][..], &[4, 2][..], 75)]
    {
        let c = shape[1];
        let inputs = [shifted(shape, seed), randn32(&[c], 1.0, seed + 1), randn32(&[c], 0.5, seed + 2)];
        let rebuilt = |t: &mut Tape, x: &[Tensor]| {
            let sequences = Partitioned::new(t, &x[0], window, PimLayout::Strided)?;
            layer_norm(t, &sequences, &x[1], &x[2], LN_EPS)
        };
        let kept = |t: &mut Tape, x: &[Tensor]| {
            let sequences = partition(t, &x[0], window, PimLayout::Strided)?;
            layer_norm(t, &sequences, &x[1], &x[2], LN_EPS)
        };
        check_op(&format!("layer norm of partitioned sequences {shape:?}"), &inputs, 1e-4, rebuilt);
        for dtype in [DType::F32, DType::BF16] {
            let mut xs: Vec<Tensor> = inputs.iter().map(|t| t.to_device(&dev).unwrap()).collect();
            xs[0] = xs[0].to_dtype(dtype).unwrap();
            let name = format!("layer norm of partitioned sequences {shape:?} {dtype:?}, rebuilt against kept");
            common::assert_same_bits(&name, &xs, &dev, &rebuilt, &kept);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_instance_norm_param_grads_only() {
    // Only gamma and beta need gradients: the input-gradient kernel is skipped, the parameter gradients still match.
    let shape = [2, 3, 5, 9, 11];
    let x = shifted(&shape, 19);
    let (gamma, beta) = (randn32(&[3], 1.0, 20), randn32(&[3], 1.0, 21));
    let grads = |device: &lkm_engine::device::Device| {
        let (x, gamma, beta) =
            (x.to_device(device).unwrap(), gamma.to_device(device).unwrap(), beta.to_device(device).unwrap());
        let mut tape = Tape::new();
        tape.watch(&gamma);
        tape.watch(&beta);
        let y = instance_norm(&mut tape, &x, &gamma, &beta, IN_EPS).unwrap();
        let seed = randn32(y.shape(), 1.0, 22).to_device(device).unwrap();
        let mut g = tape.backward_from(&y, seed).unwrap();
        assert!(g.get(&x).is_none());
        [g.take(&gamma).unwrap().to_vec_f64().unwrap(), g.take(&beta).unwrap().to_vec_f64().unwrap()]
    };
    let gpu = lkm_engine::device::Device::Cuda(common::gpu());
    let (on_gpu, on_cpu) = (grads(&gpu), grads(&lkm_engine::device::Device::Cpu));
    for (g, r) in on_gpu.iter().zip(&on_cpu) {
        common::assert_rel_err("instance_norm parameter gradient", g, r, 1e-4);
    }
}

fn check_layer_norm(shape: &[usize], seed: u64) {
    let c = *shape.last().unwrap();
    let inputs = [shifted(shape, seed), randn32(&[c], 1.0, seed + 1), randn32(&[c], 1.0, seed + 2)];
    check_op(&format!("layer_norm {shape:?}"), &inputs, 1e-4, |t: &mut Tape, x: &[Tensor]| {
        layer_norm(t, &x[0], &x[1], &x[2], LN_EPS)
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_layer_norm_channels() {
    // C = 32 (stage 0, 4 lanes per row), 48 (8 lanes, 2 idle), 7 (one lane per row, element access: rows of 28
    // bytes), 320 (stage 4: the wide kernels, two groups on some lanes), 96; row counts 3 * 37 = 111, 517, 13, 45, 210.
    check_layer_norm(&[3, 37, 32], 31);
    check_layer_norm(&[11, 47, 48], 34);
    check_layer_norm(&[13, 7], 37);
    check_layer_norm(&[5, 9, 320], 40);
    check_layer_norm(&[2, 3, 5, 7, 96], 43);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_layer_norm_row_layouts() {
    // Every team size and both kernel widths: C = 8 (one lane, one vector group), 12 (two lanes, the second one
    // ragged), 4 and 5 (less than a group), 256 (the widest narrow row: a warp, one group each), 264 (the narrowest
    // wide one), 512 (the widest: two groups on every lane); row counts not multiples of a block's teams.
    check_layer_norm(&[67, 8], 70);
    check_layer_norm(&[5, 11, 12], 71);
    check_layer_norm(&[33, 4], 72);
    check_layer_norm(&[29, 5], 73);
    check_layer_norm(&[3, 13, 256], 74);
    check_layer_norm(&[21, 264], 75);
    check_layer_norm(&[2, 9, 512], 76);
}

/// Wider rows than the GPU kernels take are refused by name (the CPU takes any width).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_layer_norm_refuses_too_wide_rows() {
    let dev = Device::Cuda(common::gpu());
    let on = |x: Tensor| x.to_device(&dev).unwrap();
    let (x, gamma, beta) =
        (on(randn32(&[3, 513], 1.0, 80)), on(randn32(&[513], 1.0, 81)), on(randn32(&[513], 1.0, 82)));
    let err = layer_norm(&mut Tape::new(), &x, &gamma, &beta, LN_EPS).unwrap_err().to_string();
    assert!(err.contains("layer_norm") && err.contains("512") && err.contains("513"), "{err}");
}

/// Only some inputs need gradients: the backward kernel runs without the input gradient (only the parameters') or
/// without the parameters' (no partial sums), and what it gives still matches the CPU.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_layer_norm_partial_needs() {
    let shape = [7, 45, 32];
    let (x, gamma, beta) = (shifted(&shape, 90), randn32(&[32], 1.0, 91), randn32(&[32], 1.0, 92));
    let grads = |device: &Device, watch_x: bool| {
        let on = |t: &Tensor| t.to_device(device).unwrap();
        let (x, gamma, beta) = (on(&x), on(&gamma), on(&beta));
        let mut tape = Tape::new();
        if watch_x {
            tape.watch(&x);
        } else {
            tape.watch(&gamma);
            tape.watch(&beta);
        }
        let y = layer_norm(&mut tape, &x, &gamma, &beta, LN_EPS).unwrap();
        let seed = randn32(y.shape(), 1.0, 93).to_device(device).unwrap();
        let mut g = tape.backward_from(&y, seed).unwrap();
        [&x, &gamma, &beta].map(|t| g.take(t).map(|g| g.to_vec_f64().unwrap()))
    };
    let gpu = Device::Cuda(common::gpu());
    for watch_x in [true, false] {
        let (on_gpu, on_cpu) = (grads(&gpu, watch_x), grads(&Device::Cpu, watch_x));
        for (i, (g, r)) in on_gpu.iter().zip(&on_cpu).enumerate() {
            assert_eq!(g.is_some(), i == 0 && watch_x || i > 0 && !watch_x, "gradient {i}, watch_x {watch_x}");
            if let (Some(g), Some(r)) = (g, r) {
                common::assert_rel_err(&format!("layer_norm gradient {i}"), g, r, 1e-4);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_layer_norm_reference_rows() {
    // Stage-0 PiM of the 3D reference: sequences of 128 tokens with 32 channels; 1344 groups (a tenth of one
    // sample's 13,440) keep the float64 CPU reference cheap while the parameter gradients still sum 172,032 rows in
    // 672 partial blocks.
    check_layer_norm(&[1344, 128, 32], 46);
}

fn check_avg_pool(shape: &[usize], factor: &[usize], seed: u64) {
    check_op(&format!("avg_pool {shape:?} / {factor:?}"), &[randn32(shape, 1.0, seed)], 1e-5, |t, x| {
        avg_pool(t, &x[0], factor)
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_avg_pool_2d() {
    check_avg_pool(&[2, 3, 37, 41], &[2, 2], 51);
    check_avg_pool(&[2, 3, 37, 41], &[3, 4], 52);
    check_avg_pool(&[1, 2, 5, 7], &[7, 1], 53);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_avg_pool_3d() {
    check_avg_pool(&[2, 3, 9, 19, 23], &[2, 2, 2], 54);
    check_avg_pool(&[2, 3, 9, 19, 23], &[1, 2, 2], 55);
    check_avg_pool(&[1, 5, 11, 13, 17], &[3, 4, 5], 56);
}

/// Rows whose windows are whole 16-byte vectors: the forward's vector path for k_w = 4, 2 and 1 (short windows
/// along d and h included) and the backward's vector stores; pooled rows of 10 mix chunks within a row and across
/// two.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_avg_pool_vectors() {
    check_avg_pool(&[2, 3, 9, 19, 64], &[2, 2, 4], 58);
    check_avg_pool(&[1, 4, 6, 20, 48], &[1, 2, 2], 59);
    check_avg_pool(&[2, 3, 6, 10, 16], &[2, 2, 1], 60);
    check_avg_pool(&[2, 3, 7, 40], &[2, 4], 61);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_avg_pool_reference() {
    // Stage-0 PaM of the 3D reference (r = 4 on a 40 x 224 x 192 map), 2 channels and batch 1 to keep the CPU cheap.
    check_avg_pool(&[1, 2, 40, 224, 192], &[4, 4, 4], 57);
}

fn check_upsample(shape: &[usize], factor: &[usize], seed: u64) {
    check_op(&format!("upsample_nearest {shape:?} * {factor:?}"), &[randn32(shape, 1.0, seed)], 1e-5, |t, x| {
        upsample_nearest(t, &x[0], factor)
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_upsample_2d() {
    check_upsample(&[2, 3, 19, 21], &[2, 2], 61);
    check_upsample(&[2, 3, 13, 11], &[3, 1], 62);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_upsample_3d() {
    check_upsample(&[2, 3, 5, 9, 11], &[2, 2, 2], 63);
    check_upsample(&[1, 5, 3, 7, 5], &[1, 3, 4], 64);
}

/// The vector paths: forward rows of 32, 24 (f_w = 3: source runs across chunk edges) and 32, backward windows read
/// as vectors for f_w = 2 and 4; rows of 10 (f_w = 1) mix chunks within a row and across two.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_upsample_vectors() {
    check_upsample(&[2, 3, 4, 6, 16], &[2, 2, 2], 66);
    check_upsample(&[2, 3, 4, 8], &[1, 3], 67);
    check_upsample(&[1, 2, 3, 5, 8], &[1, 2, 4], 68);
    check_upsample(&[2, 3, 6, 10], &[2, 1], 69);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_upsample_reference() {
    // Stage-0 PaM of the 3D reference: the pooled 10 x 56 x 48 map back up by 4, 2 channels and batch 1.
    check_upsample(&[1, 2, 10, 56, 48], &[4, 4, 4], 65);
}
