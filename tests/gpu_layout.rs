//! The layout kernels of `cuda/layout.cu` against their CPU references: PiM partition and merge (both layouts, 2D and
//! 3D), channel concatenation, sequence flip, last-axis slice and reshape, forward and backward, on odd sizes (C = 5
//! and 37, W = 7, windows and voxel counts that are not multiples of the 32-channel x 128-voxel PiM tile), NaN-poisoned
//! outputs, and PiM at the 3D reference patch. The copies move 16-byte chunks (4 float32) where rows, offsets and
//! lengths allow and element by element elsewhere: the cases below take both paths and the short last chunk. Run on a
//! GPU machine with `cargo test --release -- --ignored`.
//!
//! These ops only move elements, so GPU and CPU must agree exactly: the tolerance is 1e-12, not 1e-5.

mod common;

use common::{check_op, check_op_inputs, randn32};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::add::add;
use lkm_engine::ops::concat::concat_channels;
use lkm_engine::ops::flip::flip_seq;
use lkm_engine::ops::narrow::narrow;
use lkm_engine::ops::pim::{grouping, merge, partition, PimLayout};
use lkm_engine::ops::reshape::reshape;
use lkm_engine::Tensor;

/// Moves are exact in float32.
const EXACT: f64 = 1e-12;
/// Where overlapping gradients are added (float32 on the GPU, float64 on the CPU), rounding appears: ~1e-8.
const SUMMED: f64 = 1e-6;

const LAYOUTS: [PimLayout; 2] = [PimLayout::Window, PimLayout::Strided];

/// check_op of partition of a map and of merge of tokens, for both layouts.
fn check_pim(map: &[usize], window: &[usize], seed: u64) {
    for layout in LAYOUTS {
        let name = format!("pim partition {layout:?} map {map:?} window {window:?}");
        check_op(&name, &[randn32(map, 1.0, seed)], EXACT, |t, x| partition(t, &x[0], window, layout));
        let (g, l) = grouping(map, window, layout).unwrap();
        let name = format!("pim merge {layout:?} map {map:?} window {window:?}");
        check_op(&name, &[randn32(&[g, l, map[1]], 1.0, seed + 1)], EXACT, |t, x| merge(t, &x[0], map, window, layout));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_pim_3d_odd() {
    // V = 252 voxels (a full 128-voxel tile and a partial one), C = 5 (a partial channel tile), W = 7.
    check_pim(&[2, 5, 4, 9, 7], &[2, 3, 7], 1);
    // C = 37: two channel tiles, the second with 5 channels; windows of 3 x 5 x 5.
    check_pim(&[1, 37, 6, 10, 15], &[3, 5, 5], 3);
    // Window 1 on some axes, and W = 7 with window 7.
    check_pim(&[3, 5, 3, 4, 7], &[1, 2, 7], 5);
    // V = 1280: ten whole voxel tiles, each across several lines of W = 40; C = 64: two whole channel tiles.
    check_pim(&[1, 64, 4, 8, 40], &[2, 4, 8], 7);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_pim_2d_odd() {
    check_pim(&[3, 5, 15, 7], &[5, 7], 11);
    check_pim(&[2, 33, 12, 21], &[4, 3], 13);
    check_pim(&[1, 7, 9, 35], &[3, 5], 15);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_pim_whole_map_and_unit_windows() {
    // Window = whole map: PaM's one sequence per sample (Window) or one token per sequence (Strided).
    check_pim(&[2, 5, 3, 5, 7], &[3, 5, 7], 21);
    check_pim(&[2, 5, 9, 7], &[9, 7], 23);
    // Window 1: every voxel its own sequence (Window) or one sequence per sample (Strided).
    check_pim(&[2, 5, 3, 5, 7], &[1, 1, 1], 25);
}

/// PiM partition (forward and, through its backward, merge) at the 3D reference patch of lkm-unet.md section 5,
/// stage 0: one sample (the batch of 2 adds nothing but time), 32 channels, 40 x 224 x 192 voxels (55M elements;
/// the float64 CPU reference is a permutation and takes a few seconds).
fn check_pim_reference(window: &[usize], layout: PimLayout) {
    let map = [1, 32, 40, 224, 192];
    let name = format!("pim partition {layout:?} reference map {map:?} window {window:?}");
    check_op(&name, &[randn32(&map, 1.0, 31)], EXACT, |t, x| partition(t, &x[0], window, layout));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_pim_reference_window_20_28_24() {
    check_pim_reference(&[20, 28, 24], PimLayout::Window);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_pim_reference_strided_20_28_24() {
    check_pim_reference(&[20, 28, 24], PimLayout::Strided);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_pim_reference_window_2_2_2() {
    check_pim_reference(&[2, 2, 2], PimLayout::Window);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_pim_reference_strided_2_2_2() {
    check_pim_reference(&[2, 2, 2], PimLayout::Strided);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_concat_channels() {
    let two_3d = [randn32(&[2, 5, 3, 4, 7], 1.0, 41), randn32(&[2, 3, 3, 4, 7], 1.0, 42)];
    check_op("concat 3d", &two_3d, EXACT, |t, x| concat_channels(t, &[&x[0], &x[1]]));
    let three_2d = [randn32(&[3, 1, 5, 7], 1.0, 43), randn32(&[3, 4, 5, 7], 1.0, 44), randn32(&[3, 2, 5, 7], 1.0, 45)];
    check_op("concat 2d three inputs", &three_2d, EXACT, |t, x| concat_channels(t, &[&x[0], &x[1], &x[2]]));
    let rank2 = [randn32(&[5, 3], 1.0, 46), randn32(&[5, 7], 1.0, 47)];
    check_op("concat rank 2", &rank2, EXACT, |t, x| concat_channels(t, &[&x[0], &x[1]]));
    // Odd channel counts on planes of 128 voxels: every block and offset a whole number of vectors.
    let aligned = [randn32(&[2, 3, 4, 4, 8], 1.0, 50), randn32(&[2, 5, 4, 4, 8], 1.0, 51)];
    check_op("concat aligned", &aligned, EXACT, |t, x| concat_channels(t, &[&x[0], &x[1]]));
    // Planes of 6 voxels: blocks of 18 and 12, chunks across samples.
    let ragged = [randn32(&[3, 3, 2, 3], 1.0, 52), randn32(&[3, 2, 2, 3], 1.0, 53)];
    check_op("concat ragged", &ragged, EXACT, |t, x| concat_channels(t, &[&x[0], &x[1]]));
    // Only the skip connection needs a gradient: the other input's split is skipped.
    check_op_inputs("concat one gradient", &two_3d, &[false, true], EXACT, |t, x| concat_channels(t, &[&x[0], &x[1]]));
    // A decoder level of the 3D network (upsampled 32 channels, skip 32 channels) at a quarter of the patch.
    let decoder = [randn32(&[2, 32, 20, 56, 48], 1.0, 48), randn32(&[2, 32, 20, 56, 48], 1.0, 49)];
    check_op("concat decoder", &decoder, EXACT, |t, x| concat_channels(t, &[&x[0], &x[1]]));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_concat_rejects_mixed_devices() {
    let gpu = Device::Cuda(common::gpu());
    let a = randn32(&[2, 3, 4, 5], 1.0, 0).to_device(&gpu).unwrap();
    let b = randn32(&[2, 2, 4, 5], 1.0, 0);
    let err = concat_channels(&mut Tape::new(), &[&a, &b]).unwrap_err().to_string();
    assert!(err.contains("concat_channels"), "{err}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_flip_seq() {
    check_op("flip small", &[randn32(&[3, 37, 5], 1.0, 51)], EXACT, |t, x| flip_seq(t, &x[0]));
    check_op("flip one token", &[randn32(&[2, 1, 7], 1.0, 52)], EXACT, |t, x| flip_seq(t, &x[0]));
    // C a multiple of 4: one vector per chunk; C = 6: chunks across token rows, gathered element by element.
    check_op("flip vectors", &[randn32(&[3, 9, 8], 1.0, 54)], EXACT, |t, x| flip_seq(t, &x[0]));
    check_op("flip C = 4", &[randn32(&[2, 5, 4], 1.0, 55)], EXACT, |t, x| flip_seq(t, &x[0]));
    check_op("flip C = 6", &[randn32(&[3, 7, 6], 1.0, 56)], EXACT, |t, x| flip_seq(t, &x[0]));
    // PaM at stage 0 of the 3D reference (one sequence per sample of 26,880 tokens, d_inner = 64).
    check_op("flip pam", &[randn32(&[2, 26_880, 64], 1.0, 53)], EXACT, |t, x| flip_seq(t, &x[0]));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_narrow() {
    for (name, shape, axis, start, len, seed) in [
        ("narrow middle", &[7, 13][..], 1, 3, 5, 61),
        ("narrow head", &[3, 11, 37], 2, 0, 16, 62),
        ("narrow tail", &[3, 11, 37], 2, 21, 16, 63),
        ("narrow one", &[2, 3, 5, 7, 9], 4, 8, 1, 64),
        ("narrow all", &[5, 9], 1, 0, 9, 65),
        // A middle axis: runs of 7 x 9 elements out of rows of 5 x 7 x 9.
        ("narrow axis 2 of 5", &[2, 3, 5, 7, 9], 2, 1, 3, 67),
        // Mamba's in_proj weight (2 d_inner, d_model) at d_model 32: the rows of x and those of z.
        ("narrow in_proj x rows", &[128, 32], 0, 0, 64, 68),
        ("narrow in_proj z rows", &[128, 32], 0, 64, 64, 69),
        ("narrow rows, odd", &[37, 3, 5], 0, 11, 19, 70),
        // Rows, offset and length multiples of 4: 16-byte chunks on both sides, forward and backward.
        ("narrow aligned", &[9, 64], 1, 16, 32, 71),
        ("narrow aligned short rows", &[7, 24], 1, 8, 8, 72),
        // Rows of 100 (not a multiple of 8): the backward's chunks lie outside the slice (zeros), inside it, across
        // its edges and across rows.
        ("narrow zeros around", &[5, 100], 1, 40, 24, 73),
        ("narrow odd start, aligned length", &[6, 45], 1, 3, 32, 74),
    ] {
        check_op(name, &[randn32(shape, 1.0, seed)], EXACT, |t, x| narrow(t, &x[0], axis, start, len));
    }
    // Four 16-column slices of one (rows, 34) tensor, two of them overlapping, summed: the first slice's gradient to
    // run in the backward pass is widened with zeros, the other three are added into it in place
    // (narrow_add_backward), the overlap adding twice. Row slices of a weight, as Mamba's in_proj takes them, too.
    let sum_of_slices = |axis: usize, starts: [usize; 4]| {
        move |t: &mut Tape, x: &[Tensor]| {
            let mut y = narrow(t, &x[0], axis, starts[0], 16)?;
            for start in &starts[1..] {
                let s = narrow(t, &x[0], axis, *start, 16)?;
                y = add(t, &y, &s)?;
            }
            Ok(y)
        }
    };
    check_op(
        "narrow slices added in place",
        &[randn32(&[13_441, 34], 1.0, 75)],
        SUMMED,
        sum_of_slices(1, [0, 16, 2, 18]),
    );
    check_op(
        "narrow row slices added in place",
        &[randn32(&[64, 5], 1.0, 76)],
        SUMMED,
        sum_of_slices(0, [0, 48, 16, 20]),
    );
    // Mamba's x_proj output for d_model 32: dt_rank 2 + 2 x d_state 16 = 34 columns, split into dt, B and C.
    let xp = [randn32(&[13_441, 34], 1.0, 66)];
    check_op("narrow dt", &xp, EXACT, |t, x| narrow(t, &x[0], 1, 0, 2));
    check_op("narrow B", &xp, EXACT, |t, x| narrow(t, &x[0], 1, 2, 16));
    check_op("narrow C", &xp, EXACT, |t, x| narrow(t, &x[0], 1, 18, 16));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_reshape() {
    check_op("reshape", &[randn32(&[3, 5, 7], 1.0, 71)], EXACT, |t, x| reshape(t, &x[0], &[15, 7]));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_layout_chain() {
    // Map -> tokens -> flip -> rows (reshape) -> two column slices used twice -> back: gradients of the two slices
    // and of both uses accumulate on the GPU, and the zeros the slice backward writes must add up right.
    let (map, window) = ([2, 6, 4, 6, 10], [2, 3, 5]);
    for layout in LAYOUTS {
        let name = format!("layout chain {layout:?}");
        check_op(&name, &[randn32(&map, 1.0, 81)], SUMMED, |t, x| {
            let tokens = partition(t, &x[0], &window, layout)?;
            let flipped = flip_seq(t, &tokens)?;
            let (g, l, c) = (flipped.shape()[0], flipped.shape()[1], flipped.shape()[2]);
            let rows = reshape(t, &flipped, &[g * l, c])?;
            let a = narrow(t, &rows, 1, 1, 3)?;
            let b = narrow(t, &rows, 1, 2, 3)?;
            let both = concat_channels(t, &[&a, &b])?;
            let back = reshape(t, &both, &[g, l, 6])?;
            merge(t, &back, &map, &window, layout)
        });
    }
}
