//! The layout kernels (`cuda/layout.cu`: PiM partition and merge, channel concatenation and its split, slice and its
//! backward, sequence flip) and the pooling kernels (`cuda/pool.cu`: average pooling, nearest upsampling) on bf16 GPU
//! tensors: forward and every gradient against the float64 CPU reference on the same bf16-rounded inputs (engine.md's
//! bf16 tolerance, 1e-2), 2D and 3D, both PiM layouts, odd sizes that are not multiples of the 32-channel x 128-voxel
//! PiM tile or of a block. And bit for bit against the float32 kernels on the same rounded inputs and seed gradient:
//! the pure moves (PiM, concat, narrow, flip, the upsampling forward) give the float32 path's values themselves, the
//! averaging and summing ones (avg_pool both ways, the upsampling backward) the float32 values rounded once to bf16.
//! The copies and the pooling kernels move 16-byte chunks (8 bf16) where the sizes allow and element by element
//! elsewhere; the cases below take both paths, chunks across rows and the short last chunk. Run on a GPU machine with
//! `cargo test --release --test gpu_bf16_layout -- --ignored`.

mod common;

use common::{check_op_bf16, randn32};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::avg_pool::avg_pool;
use lkm_engine::ops::concat::concat_channels;
use lkm_engine::ops::flip::flip_seq;
use lkm_engine::ops::narrow::narrow;
use lkm_engine::ops::pim::{grouping, merge, partition, PimLayout};
use lkm_engine::ops::reshape::reshape;
use lkm_engine::ops::upsample::upsample_nearest;
use lkm_engine::tensor::DType;
use lkm_engine::{Result, Tensor};

/// engine.md's tolerance for bf16 storage.
const BF16_TOL: f64 = 1e-2;

const LAYOUTS: [PimLayout; 2] = [PimLayout::Window, PimLayout::Strided];

/// How the bf16 kernels of an op relate to its float32 kernels on the same bf16-rounded data.
#[derive(Clone, Copy)]
enum Bf16Exact {
    /// The op only moves elements: the bf16 results are the float32 results themselves.
    Moves,
    /// The op computes in float32 and rounds once: the bf16 results are the float32 results rounded to bf16.
    RoundsOnce,
}

/// Runs `f` on `xs` (on the GPU) with a tape watching every input and back-propagates the standard-normal seed
/// gradient of [`common::seeded_step`], rounded to bf16 and stored in the output's type: the output and each input's
/// gradient.
fn run(xs: &[Tensor], f: &dyn Fn(&mut Tape, &[Tensor]) -> Result<Tensor>) -> (Tensor, Vec<Tensor>) {
    let dev = xs[0].device();
    let mut tape = Tape::new();
    for x in xs {
        tape.watch(x);
    }
    let y = f(&mut tape, xs).unwrap();
    let seed = randn32(y.shape(), 1.0, 99).to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
    let mut grads = tape.backward_from(&y, seed.to_dtype(y.dtype()).unwrap()).unwrap();
    let grads = xs.iter().map(|x| grads.take(x).expect("every input has a gradient")).collect();
    (y, grads)
}

/// Asserts that `f` on the bf16-rounded `inputs` stored as bf16 gives bf16 results equal bit for bit to those of the
/// float32 kernels on the same rounded values, as `exact` says for the output (`exact[0]`) and the gradients
/// (`exact[1]`).
fn assert_bf16_matches_f32(
    name: &str,
    inputs: &[Tensor],
    exact: [Bf16Exact; 2],
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) {
    let gpu = Device::Cuda(common::gpu());
    let x16: Vec<Tensor> = inputs.iter().map(|x| x.to_device(&gpu).unwrap().to_dtype(DType::BF16).unwrap()).collect();
    let x32: Vec<Tensor> = x16.iter().map(|x| x.to_dtype(DType::F32).unwrap()).collect();
    let (y16, g16) = run(&x16, &f);
    let (y32, g32) = run(&x32, &f);
    let results = std::iter::once(("output".to_string(), y16, y32, exact[0])).chain(
        g16.into_iter().zip(g32).enumerate().map(|(i, (a, b))| (format!("gradient of input {i}"), a, b, exact[1])),
    );
    for (what, got, reference, exact) in results {
        assert_eq!(got.dtype(), DType::BF16, "{name}: the {what} is not stored as bf16");
        assert_eq!(got.shape(), reference.shape(), "{name}: {what}");
        let want = match exact {
            Bf16Exact::Moves => reference,
            Bf16Exact::RoundsOnce => reference.to_dtype(DType::BF16).unwrap(),
        };
        let bits = |t: &Tensor| t.to_vec_f32().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let (got, want) = (bits(&got), bits(&want));
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            first.is_none(),
            "{name}: bf16 {what} differs from the float32 path at element {}: {:#x} vs {:#x}",
            first.unwrap_or(0),
            got[first.unwrap_or(0)],
            want[first.unwrap_or(0)]
        );
    }
    eprintln!("{name}: bf16 bit-exact against float32");
}

/// Both checks of an op on `inputs`, all differentiable and all stored as bf16, its output and gradients related to
/// the float32 path's by `exact`.
fn check_bf16(name: &str, inputs: &[Tensor], exact: Bf16Exact, f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>) {
    let n = inputs.len();
    check_op_bf16(name, inputs, &vec![true; n], &vec![true; n], BF16_TOL, &f);
    assert_bf16_matches_f32(name, inputs, [exact; 2], &f);
}

/// Partition of a map and merge of tokens, both layouts.
fn check_pim(map: &[usize], window: &[usize], seed: u64) {
    for layout in LAYOUTS {
        let name = format!("pim partition {layout:?} map {map:?} window {window:?}");
        check_bf16(&name, &[randn32(map, 1.0, seed)], Bf16Exact::Moves, |t, x| partition(t, &x[0], window, layout));
        let (g, l) = grouping(map, window, layout).unwrap();
        let name = format!("pim merge {layout:?} map {map:?} window {window:?}");
        check_bf16(&name, &[randn32(&[g, l, map[1]], 1.0, seed + 1)], Bf16Exact::Moves, |t, x| {
            merge(t, &x[0], map, window, layout)
        });
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_pim_3d() {
    // V = 252 voxels (a full 128-voxel tile and a partial one), C = 5 (a partial channel tile), W = 7.
    check_pim(&[2, 5, 4, 9, 7], &[2, 3, 7], 1);
    // C = 37: two channel tiles, the second with 5 channels.
    check_pim(&[1, 37, 6, 10, 15], &[3, 5, 5], 3);
    // Window = whole map (PaM's sequence) and window 1.
    check_pim(&[2, 5, 3, 5, 7], &[3, 5, 7], 5);
    check_pim(&[2, 5, 3, 5, 7], &[1, 1, 1], 7);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_pim_2d() {
    check_pim(&[3, 5, 15, 7], &[5, 7], 11);
    check_pim(&[2, 33, 12, 21], &[4, 3], 13);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_concat_channels() {
    let two_3d = [randn32(&[2, 5, 3, 4, 7], 1.0, 41), randn32(&[2, 3, 3, 4, 7], 1.0, 42)];
    check_bf16("concat 3d", &two_3d, Bf16Exact::Moves, |t, x| concat_channels(t, &[&x[0], &x[1]]));
    let three_2d = [randn32(&[3, 1, 5, 7], 1.0, 43), randn32(&[3, 4, 5, 7], 1.0, 44), randn32(&[3, 2, 5, 7], 1.0, 45)];
    check_bf16("concat 2d three inputs", &three_2d, Bf16Exact::Moves, |t, x| {
        concat_channels(t, &[&x[0], &x[1], &x[2]])
    });
    let rank2 = [randn32(&[5, 3], 1.0, 46), randn32(&[5, 7], 1.0, 47)];
    check_bf16("concat rank 2", &rank2, Bf16Exact::Moves, |t, x| concat_channels(t, &[&x[0], &x[1]]));
    // Odd channel counts on planes of 128 voxels: every block and offset a whole number of vectors.
    let aligned = [randn32(&[2, 3, 4, 4, 8], 1.0, 50), randn32(&[2, 5, 4, 4, 8], 1.0, 51)];
    check_bf16("concat aligned", &aligned, Bf16Exact::Moves, |t, x| concat_channels(t, &[&x[0], &x[1]]));
    // A decoder level of the 3D network at a sixteenth of the patch (planes of 10 x 28 x 24 voxels).
    let decoder = [randn32(&[2, 8, 10, 28, 24], 1.0, 48), randn32(&[2, 8, 10, 28, 24], 1.0, 49)];
    check_bf16("concat decoder", &decoder, Bf16Exact::Moves, |t, x| concat_channels(t, &[&x[0], &x[1]]));
    // Only the second input needs a gradient: the other split is skipped.
    check_op_bf16("concat one gradient", &two_3d, &[false, true], &[true; 2], BF16_TOL, |t, x| {
        concat_channels(t, &[&x[0], &x[1]])
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_concat_rejects_mixed_storage() {
    let gpu = Device::Cuda(common::gpu());
    let a = randn32(&[2, 3, 4, 5], 1.0, 0).to_device(&gpu).unwrap().to_dtype(DType::BF16).unwrap();
    let b = randn32(&[2, 2, 4, 5], 1.0, 1).to_device(&gpu).unwrap();
    let err = concat_channels(&mut Tape::new(), &[&a, &b]).unwrap_err().to_string();
    assert!(err.contains("concat_channels") && err.contains("BF16") && err.contains("F32"), "{err}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_narrow() {
    for (name, shape, axis, start, len, seed) in [
        ("narrow middle", &[7, 13][..], 1, 3, 5, 61),
        ("narrow head", &[3, 11, 37], 2, 0, 16, 62),
        ("narrow tail", &[3, 11, 37], 2, 21, 16, 63),
        ("narrow one", &[2, 3, 5, 7, 9], 4, 8, 1, 64),
        ("narrow axis 2 of 5", &[2, 3, 5, 7, 9], 2, 1, 3, 67),
        ("narrow rows, odd", &[37, 3, 5], 0, 11, 19, 70),
        // x_proj's output at d_model 32 (34 columns): dt, B and C; some rows of B and C start on a vector.
        ("narrow dt", &[1_341, 34], 1, 0, 2, 65),
        ("narrow B", &[1_341, 34], 1, 2, 16, 66),
        ("narrow C", &[1_341, 34], 1, 18, 16, 68),
        // Mamba's in_proj weight at d_model 32: one run of 2048 elements at offset 2048.
        ("narrow in_proj z rows", &[128, 32], 0, 64, 64, 69),
        // Rows, offset and length multiples of 8: 16-byte chunks on both sides.
        ("narrow aligned", &[9, 64], 1, 16, 32, 71),
        ("narrow aligned short rows", &[7, 24], 1, 8, 8, 72),
        // Rows of 100: the backward's chunks outside the slice (zeros), inside it, across its edges and rows.
        ("narrow zeros around", &[5, 100], 1, 40, 24, 73),
        ("narrow odd start, aligned length", &[6, 45], 1, 3, 32, 74),
    ] {
        check_bf16(name, &[randn32(shape, 1.0, seed)], Bf16Exact::Moves, |t, x| narrow(t, &x[0], axis, start, len));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_flip_seq() {
    check_bf16("flip small", &[randn32(&[3, 37, 5], 1.0, 51)], Bf16Exact::Moves, |t, x| flip_seq(t, &x[0]));
    check_bf16("flip one token", &[randn32(&[2, 1, 7], 1.0, 52)], Bf16Exact::Moves, |t, x| flip_seq(t, &x[0]));
    check_bf16("flip long", &[randn32(&[2, 1_001, 33], 1.0, 53)], Bf16Exact::Moves, |t, x| flip_seq(t, &x[0]));
    // C a multiple of 8: one vector per chunk; C = 4 and 12: chunks across token rows, gathered element by element.
    check_bf16("flip vectors", &[randn32(&[3, 9, 64], 1.0, 54)], Bf16Exact::Moves, |t, x| flip_seq(t, &x[0]));
    check_bf16("flip C = 4", &[randn32(&[2, 7, 4], 1.0, 55)], Bf16Exact::Moves, |t, x| flip_seq(t, &x[0]));
    check_bf16("flip C = 12", &[randn32(&[3, 5, 12], 1.0, 56)], Bf16Exact::Moves, |t, x| flip_seq(t, &x[0]));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_layout_chain() {
    // Map -> tokens -> flip -> rows -> two overlapping column slices -> concat -> back: the gradients of the two
    // slices meet (bf16 adds) on the rows, zeros of the slice backward included.
    let (map, window) = ([2, 6, 4, 6, 10], [2, 3, 5]);
    for layout in LAYOUTS {
        let name = format!("layout chain {layout:?}");
        check_op_bf16(&name, &[randn32(&map, 1.0, 81)], &[true], &[true], BF16_TOL, |t, x| {
            chain(t, &x[0], &map, &window, layout)
        });
    }
}

/// The chain of [`gpu_bf16_layout_chain`].
fn chain(t: &mut Tape, x: &Tensor, map: &[usize], window: &[usize], layout: PimLayout) -> Result<Tensor> {
    let tokens = partition(t, x, window, layout)?;
    let flipped = flip_seq(t, &tokens)?;
    let (g, l, c) = (flipped.shape()[0], flipped.shape()[1], flipped.shape()[2]);
    let rows = reshape(t, &flipped, &[g * l, c])?;
    let a = narrow(t, &rows, 1, 1, 3)?;
    let b = narrow(t, &rows, 1, 2, 3)?;
    let both = concat_channels(t, &[&a, &b])?;
    let back = reshape(t, &both, &[g, l, 6])?;
    merge(t, &back, map, window, layout)
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_avg_pool() {
    for (shape, factor, seed) in [
        (&[2, 3, 37, 41][..], &[2, 2][..], 51),
        (&[2, 3, 37, 41], &[3, 4], 52),
        (&[1, 2, 5, 7], &[7, 1], 53),
        (&[2, 3, 9, 19, 23], &[2, 2, 2], 54),
        (&[1, 5, 11, 13, 17], &[3, 4, 5], 56),
        // Rows of a multiple of 8 with k_w = 4, 2, 1: the forward reads window rows as vectors (short windows along
        // d and h included), the backward stores whole vectors.
        (&[2, 3, 9, 19, 64], &[2, 2, 4], 57),
        (&[1, 4, 6, 20, 48], &[1, 2, 2], 58),
        (&[2, 3, 6, 10, 16], &[2, 2, 1], 59),
        // 2D with pooled rows of 20: chunks within a row and across two.
        (&[2, 3, 7, 40], &[2, 2], 60),
    ] {
        let name = format!("avg_pool {shape:?} / {factor:?}");
        check_bf16(&name, &[randn32(shape, 1.0, seed)], Bf16Exact::RoundsOnce, |t, x| avg_pool(t, &x[0], factor));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bf16_upsample_nearest() {
    for (shape, factor, seed) in [
        (&[2, 3, 19, 21][..], &[2, 2][..], 61),
        (&[2, 3, 13, 11], &[3, 1], 62),
        (&[2, 3, 5, 9, 11], &[2, 2, 2], 63),
        (&[1, 5, 3, 7, 5], &[1, 3, 4], 64),
        // Vector paths: forward rows of 32, 24 (f_w = 3: source runs across chunk edges) and 32; backward windows
        // read as vectors for f_w = 2 and 4.
        (&[2, 3, 4, 6, 16], &[2, 2, 2], 65),
        (&[2, 3, 4, 8], &[1, 3], 66),
        (&[1, 2, 3, 5, 8], &[1, 2, 4], 67),
    ] {
        let name = format!("upsample_nearest {shape:?} * {factor:?}");
        let x = [randn32(shape, 1.0, seed)];
        check_op_bf16(&name, &x, &[true], &[true], BF16_TOL, |t, x| upsample_nearest(t, &x[0], factor));
        // The forward moves elements, the backward sums in float32 and rounds once.
        let exact = [Bf16Exact::Moves, Bf16Exact::RoundsOnce];
        assert_bf16_matches_f32(&name, &x, exact, |t, x| upsample_nearest(t, &x[0], factor));
    }
}
