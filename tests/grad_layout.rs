//! Layout ops: PiM partition/merge, channel concatenation, sequence flip, slices along an axis (narrow) and
//! reshape. Forward results are compared with index formulas written independently here; backward passes with finite
//! differences. The forward checks and the shape errors are device tests (`common::device_test!`): moves are exact,
//! so the GPU kernels must give the very same elements and refuse the same shapes with the same messages (`NAME::gpu`,
//! `cargo test --release --test grad_layout -- --ignored` on a GPU machine).

use lkm_engine::autograd::gradcheck::{assert_gradients, randn64};
use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::ops::add::add;
use lkm_engine::ops::concat::concat_channels;
use lkm_engine::ops::flip::flip_seq;
use lkm_engine::ops::linear::linear;
use lkm_engine::ops::narrow::narrow;
use lkm_engine::ops::pim::{check_window, grouping, merge, partition, PimLayout};
use lkm_engine::ops::reshape::reshape;
use lkm_engine::Tensor;

mod common;
use common::{device_test, randn_on};

/// A float32 tensor on `dev` whose element i is i (exact below 2^24), so every output value says where it came from.
fn iota(dev: &Device, shape: &[usize]) -> Tensor {
    Tensor::from_fn(shape, lkm_engine::DType::F32, |i| i as f64).unwrap().to_device(dev).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// The map shape as (N, C, [D, H, W]) with D = 1 for 2D, and the window as [p_d, p_h, p_w].
fn as_3d(map: &[usize], window: &[usize]) -> (usize, usize, [usize; 3], [usize; 3]) {
    match (map.len(), window.len()) {
        (4, 2) => (map[0], map[1], [1, map[2], map[3]], [1, window[0], window[1]]),
        (5, 3) => (map[0], map[1], [map[2], map[3], map[4]], [window[0], window[1], window[2]]),
        _ => panic!("bad test shapes"),
    }
}

/// Splits `v` into mixed-radix digits, most significant first.
fn digits(mut v: usize, radix: [usize; 3]) -> [usize; 3] {
    let mut out = [0; 3];
    for a in (0..3).rev() {
        out[a] = v % radix[a];
        v /= radix[a];
    }
    out
}

/// Naive PiM partition: for every output element (g, l, c), decode the group and token indices into the map
/// coordinates (the opposite direction from the engine, which walks the map).
fn naive_partition(x: &[f64], map: &[usize], window: &[usize], layout: PimLayout) -> (Vec<f64>, [usize; 3]) {
    let (n, c, s, p) = as_3d(map, window);
    let blocks = [s[0] / p[0], s[1] / p[1], s[2] / p[2]];
    let (group_radix, token_radix) = match layout {
        PimLayout::Window => (blocks, p),
        PimLayout::Strided => (p, blocks),
    };
    let groups_per_sample: usize = group_radix.iter().product();
    let len: usize = token_radix.iter().product();
    let g_total = n * groups_per_sample;
    let mut out = Vec::new();
    for g in 0..g_total {
        let (sample, gd) = (g / groups_per_sample, digits(g % groups_per_sample, group_radix));
        for l in 0..len {
            let td = digits(l, token_radix);
            // coordinate = block * p + offset; Window: group digits are blocks; Strided: token digits are.
            let coord: Vec<usize> = (0..3)
                .map(|a| match layout {
                    PimLayout::Window => gd[a] * p[a] + td[a],
                    PimLayout::Strided => td[a] * p[a] + gd[a],
                })
                .collect();
            for ch in 0..c {
                let idx = (((sample * c + ch) * s[0] + coord[0]) * s[1] + coord[1]) * s[2] + coord[2];
                out.push(x[idx]);
            }
        }
    }
    (out, [g_total, len, c])
}

fn check_against_naive(dev: &Device, map: &[usize], window: &[usize], layout: PimLayout) {
    let x = iota(dev, map);
    let t = partition(&mut Tape::new(), &x, window, layout).unwrap();
    let (expected, shape) = naive_partition(&values(&x), map, window, layout);
    assert_eq!(t.shape(), &shape, "{layout:?} {map:?} {window:?}");
    assert_eq!(values(&t), expected, "{layout:?} {map:?} {window:?}");
    assert_eq!(grouping(map, window, layout).unwrap(), (shape[0], shape[1]));
}

fn pim_window_3d_matches_naive(dev: &Device) {
    check_against_naive(dev, &[2, 3, 4, 6, 10], &[2, 3, 5], PimLayout::Window);
}
device_test!(pim_window_3d_matches_naive);

fn pim_window_2d_matches_naive(dev: &Device) {
    check_against_naive(dev, &[2, 3, 6, 10], &[3, 5], PimLayout::Window);
}
device_test!(pim_window_2d_matches_naive);

fn pim_strided_3d_matches_naive(dev: &Device) {
    check_against_naive(dev, &[2, 3, 4, 6, 10], &[2, 3, 5], PimLayout::Strided);
}
device_test!(pim_strided_3d_matches_naive);

fn pim_strided_2d_matches_naive(dev: &Device) {
    check_against_naive(dev, &[2, 3, 6, 10], &[3, 5], PimLayout::Strided);
}
device_test!(pim_strided_2d_matches_naive);

fn pim_window_small_2d_by_hand(dev: &Device) {
    // Map 1x1x2x4 = [[0 1 2 3], [4 5 6 7]], window 2x2: blocks {0,1,4,5} and {2,3,6,7}.
    let x = iota(dev, &[1, 1, 2, 4]);
    let w = partition(&mut Tape::new(), &x, &[2, 2], PimLayout::Window).unwrap();
    assert_eq!(w.shape(), &[2, 4, 1]);
    assert_eq!(values(&w), [0., 1., 4., 5., 2., 3., 6., 7.]);
    // Strided with p = 2: groups by (j_h, j_w) = (0,0), (0,1), (1,0), (1,1), tokens over (i_h, i_w).
    let s = partition(&mut Tape::new(), &x, &[2, 2], PimLayout::Strided).unwrap();
    assert_eq!(s.shape(), &[4, 2, 1]);
    assert_eq!(values(&s), [0., 2., 1., 3., 4., 6., 5., 7.]);
}
device_test!(pim_window_small_2d_by_hand);

/// y = x.permute(perm) for a row-major array of shape `shape`.
fn permute(x: &[f64], shape: &[usize], perm: &[usize]) -> Vec<f64> {
    let rank = shape.len();
    let mut strides = vec![1; rank];
    for a in (0..rank - 1).rev() {
        strides[a] = strides[a + 1] * shape[a + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
    let mut idx = vec![0; rank];
    let mut out = Vec::with_capacity(x.len());
    for _ in 0..x.len() {
        out.push(x[(0..rank).map(|k| idx[k] * strides[perm[k]]).sum::<usize>()]);
        for k in (0..rank).rev() {
            idx[k] += 1;
            if idx[k] < out_shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

fn pim_strided_matches_pytorch_reshape_permute(dev: &Device) {
    // x.reshape(B, C, D/p, p, H/p, p, W/p, p).permute(0, 3, 5, 7, 1, 2, 4, 6).reshape(B p^3, C, L).transpose(1, 2)
    let (b, c, s, p) = (2, 3, [4, 6, 10], [2, 3, 5]);
    let x = iota(dev, &[b, c, s[0], s[1], s[2]]);
    let split = [b, c, s[0] / p[0], p[0], s[1] / p[1], p[1], s[2] / p[2], p[2]];
    let permuted = permute(&values(&x), &split, &[0, 3, 5, 7, 1, 2, 4, 6]);
    let (g, l) = (b * p.iter().product::<usize>(), s.iter().zip(&p).map(|(s, p)| s / p).product::<usize>());
    let expected = permute(&permuted, &[g, c, l], &[0, 2, 1]);
    let t = partition(&mut Tape::new(), &x, &p, PimLayout::Strided).unwrap();
    assert_eq!(t.shape(), &[g, l, c]);
    assert_eq!(values(&t), expected);
}
device_test!(pim_strided_matches_pytorch_reshape_permute);

fn pim_strided_group0_holds_every_pth_voxel(dev: &Device) {
    let (map, p) = ([1, 2, 4, 6, 10], [2, 3, 5]);
    let x = iota(dev, &map);
    let xv = values(&x);
    let t = partition(&mut Tape::new(), &x, &p, PimLayout::Strided).unwrap();
    let tv = values(&t);
    let c = map[1];
    let mut l = 0;
    for d in (0..map[2]).step_by(p[0]) {
        for h in (0..map[3]).step_by(p[1]) {
            for w in (0..map[4]).step_by(p[2]) {
                for ch in 0..c {
                    let voxel = ((ch * map[2] + d) * map[3] + h) * map[4] + w;
                    assert_eq!(tv[l * c + ch], xv[voxel], "token {l} = voxel ({d}, {h}, {w}) channel {ch}");
                }
                l += 1;
            }
        }
    }
    assert_eq!(l, t.shape()[1]);
}
device_test!(pim_strided_group0_holds_every_pth_voxel);

#[test]
fn pim_merge_inverts_partition() {
    let cases: [(&[usize], &[usize]); 3] =
        [(&[2, 3, 4, 6, 10], &[2, 3, 5]), (&[2, 3, 6, 10], &[3, 5]), (&[1, 4, 3, 5, 7], &[3, 1, 7])];
    for (map, window) in cases {
        for layout in [PimLayout::Window, PimLayout::Strided] {
            let x = randn64(map, 11);
            let t = partition(&mut Tape::new(), &x, window, layout).unwrap();
            let back = merge(&mut Tape::new(), &t, map, window, layout).unwrap();
            assert_eq!(back.shape(), map);
            assert_eq!(values(&back), values(&x), "{layout:?} {map:?} {window:?}");
        }
    }
}

fn pim_whole_map_window_is_one_sequence_per_sample(dev: &Device) {
    // PaM: window = whole map, so token l of sample n is voxel l in raster order: tokens[n] = x[n].reshape(C, V)^T.
    let map = [2, 3, 3, 4, 5];
    let x = iota(dev, &map);
    let t = partition(&mut Tape::new(), &x, &map[2..], PimLayout::Window).unwrap();
    let (n, c, v) = (2, 3, 60);
    assert_eq!(t.shape(), &[n, v, c]);
    assert_eq!(grouping(&map, &map[2..], PimLayout::Window).unwrap(), (n, v));
    assert_eq!(values(&t), permute(&values(&x), &[n, c, v], &[0, 2, 1]));
}
device_test!(pim_whole_map_window_is_one_sequence_per_sample);

#[test]
fn grad_pim_window_2d() {
    assert_gradients(&[randn64(&[2, 3, 6, 10], 21)], 1e-6, |t, x| partition(t, &x[0], &[3, 5], PimLayout::Window));
}

#[test]
fn grad_pim_window_3d() {
    assert_gradients(&[randn64(&[2, 3, 4, 6, 10], 22)], 1e-6, |t, x| {
        partition(t, &x[0], &[2, 3, 5], PimLayout::Window)
    });
}

#[test]
fn grad_pim_strided_2d() {
    assert_gradients(&[randn64(&[2, 3, 6, 10], 23)], 1e-6, |t, x| partition(t, &x[0], &[3, 5], PimLayout::Strided));
}

#[test]
fn grad_pim_strided_3d() {
    assert_gradients(&[randn64(&[2, 3, 4, 6, 10], 24)], 1e-6, |t, x| {
        partition(t, &x[0], &[2, 3, 5], PimLayout::Strided)
    });
}

#[test]
fn grad_pim_merge_3d() {
    let (map, window) = ([2, 3, 4, 6, 10], [2, 3, 5]);
    for layout in [PimLayout::Window, PimLayout::Strided] {
        let (g, l) = grouping(&map, &window, layout).unwrap();
        assert_gradients(&[randn64(&[g, l, 3], 25)], 1e-6, |t, x| merge(t, &x[0], &map, &window, layout));
    }
}

fn pim_rejects_window_that_does_not_divide(dev: &Device) {
    let err = check_window(&[2, 64, 40, 30, 24], &[20, 20, 12], "PiM stage 2").unwrap_err().to_string();
    for part in ["PiM stage 2", "axis H", "size 30", "window 20"] {
        assert!(err.contains(part), "missing {part:?} in: {err}");
    }
    let x = randn_on(dev, &[1, 2, 6, 10], 1.0, 0);
    let err = partition(&mut Tape::new(), &x, &[4, 5], PimLayout::Window).unwrap_err().to_string();
    for part in ["PiM", "axis H", "size 6", "window 4"] {
        assert!(err.contains(part), "missing {part:?} in: {err}");
    }
    let err = grouping(&[1, 2, 6, 10], &[3, 4], PimLayout::Strided).unwrap_err().to_string();
    assert!(err.contains("axis W") && err.contains("size 10") && err.contains("window 4"), "{err}");
}
device_test!(pim_rejects_window_that_does_not_divide);

fn pim_rejects_window_with_wrong_number_of_axes(dev: &Device) {
    let x = randn_on(dev, &[1, 2, 6, 10], 1.0, 0);
    let err = partition(&mut Tape::new(), &x, &[3, 5, 5], PimLayout::Window).unwrap_err().to_string();
    assert!(err.contains("[3, 5, 5]") && err.contains("2 spatial axes"), "{err}");
    let err = check_window(&[1, 2, 4, 6, 10], &[2, 3], "PiM stage 0").unwrap_err().to_string();
    assert!(err.contains("PiM stage 0") && err.contains("3 spatial axes"), "{err}");
}
device_test!(pim_rejects_window_with_wrong_number_of_axes);

fn pim_merge_rejects_tokens_of_wrong_shape(dev: &Device) {
    let t = randn_on(dev, &[4, 15, 2], 1.0, 0);
    let err = merge(&mut Tape::new(), &t, &[1, 3, 6, 10], &[3, 5], PimLayout::Window).unwrap_err().to_string();
    assert!(err.contains("[4, 15, 3]") && err.contains("[4, 15, 2]"), "{err}");
}
device_test!(pim_merge_rejects_tokens_of_wrong_shape);

fn concat_channels_by_hand(dev: &Device) {
    // a: (2, 1, 2), b: (2, 2, 2); per sample the channels of a come first.
    let a = common::tensor_on(dev, vec![0., 1., 10., 11.], &[2, 1, 2]);
    let b = common::tensor_on(dev, vec![2., 3., 4., 5., 12., 13., 14., 15.], &[2, 2, 2]);
    let y = concat_channels(&mut Tape::new(), &[&a, &b]).unwrap();
    assert_eq!(y.shape(), &[2, 3, 2]);
    assert_eq!(values(&y), [0., 1., 2., 3., 4., 5., 10., 11., 12., 13., 14., 15.]);
}
device_test!(concat_channels_by_hand);

#[test]
fn grad_concat_two() {
    let xs = [randn64(&[2, 3, 3, 5], 31), randn64(&[2, 2, 3, 5], 32)];
    assert_gradients(&xs, 1e-6, |t, x| concat_channels(t, &[&x[0], &x[1]]));
}

#[test]
fn grad_concat_three() {
    let xs = [randn64(&[2, 1, 3, 2, 5], 33), randn64(&[2, 4, 3, 2, 5], 34), randn64(&[2, 2, 3, 2, 5], 35)];
    assert_gradients(&xs, 1e-6, |t, x| concat_channels(t, &[&x[0], &x[1], &x[2]]));
}

fn concat_rejects_mismatched_spatial_sizes(dev: &Device) {
    let (a, b) = (randn_on(dev, &[2, 3, 4, 5], 1.0, 0), randn_on(dev, &[2, 3, 4, 6], 1.0, 0));
    let err = concat_channels(&mut Tape::new(), &[&a, &b]).unwrap_err().to_string();
    assert!(err.contains("[2, 3, 4, 5]") && err.contains("[2, 3, 4, 6]"), "{err}");
    let c = randn_on(dev, &[2, 3, 4], 1.0, 0);
    assert!(concat_channels(&mut Tape::new(), &[&a, &c]).is_err());
}
device_test!(concat_rejects_mismatched_spatial_sizes);

fn flip_seq_by_hand(dev: &Device) {
    // (G, L, C) = (2, 3, 2): token rows reversed within each sequence.
    let y = flip_seq(&mut Tape::new(), &iota(dev, &[2, 3, 2])).unwrap();
    assert_eq!(values(&y), [4., 5., 2., 3., 0., 1., 10., 11., 8., 9., 6., 7.]);
}
device_test!(flip_seq_by_hand);

#[test]
fn grad_flip_seq() {
    assert_gradients(&[randn64(&[3, 7, 5], 41)], 1e-6, |t, x| flip_seq(t, &x[0]));
}

fn narrow_by_hand(dev: &Device) {
    // (2, 5) holding 0..10: columns 1..4 of each row, then row 1 whole.
    let y = narrow(&mut Tape::new(), &iota(dev, &[2, 5]), 1, 1, 3).unwrap();
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(values(&y), [1., 2., 3., 6., 7., 8.]);
    let y = narrow(&mut Tape::new(), &iota(dev, &[2, 5]), 0, 1, 1).unwrap();
    assert_eq!(y.shape(), &[1, 5]);
    assert_eq!(values(&y), [5., 6., 7., 8., 9.]);
    // (2, 3, 2) holding 0..12, the middle axis [1, 3): element (o, k, i) is 6 o + 2 (1 + k) + i.
    let y = narrow(&mut Tape::new(), &iota(dev, &[2, 3, 2]), 1, 1, 2).unwrap();
    assert_eq!(y.shape(), &[2, 2, 2]);
    assert_eq!(values(&y), [2., 3., 4., 5., 8., 9., 10., 11.]);
}
device_test!(narrow_by_hand);

#[test]
fn grad_narrow_each_axis() {
    for (axis, start, len) in [(0, 1, 2), (1, 2, 3), (2, 3, 5)] {
        assert_gradients(&[randn64(&[4, 5, 11], 51)], 1e-6, |t, x| narrow(t, &x[0], axis, start, len));
    }
}

/// Two row slices of one weight, each in its own product, as Mamba's in_proj uses them: the tape must add both
/// slices' gradients (each zero outside its rows) into the weight's.
#[test]
fn grad_narrow_two_row_slices_of_one_weight() {
    // Rows (6, 4) of tokens: the products are (6, 2) and (6, 4), concatenated along the channels into (6, 6).
    let xs = [randn64(&[6, 4], 52), randn64(&[6, 4], 53)];
    assert_gradients(&xs, 1e-6, |t, v| {
        let (w_a, w_b) = (narrow(t, &v[1], 0, 0, 2)?, narrow(t, &v[1], 0, 2, 4)?);
        let a = linear(t, &v[0], &w_a, None)?;
        let b = linear(t, &v[0], &w_b, None)?;
        concat_channels(t, &[&a, &b])
    });
}

/// Overlapping slices of one tensor, each weighted by its own product: the second and later slices' gradients are
/// added into the first's in place (`Backward::add_into`), the overlap twice; finite differences agree.
#[test]
fn grad_narrow_overlapping_slices_add_into_one_gradient() {
    let xs = [randn64(&[5, 34], 54), randn64(&[3, 16], 55), randn64(&[3, 16], 56), randn64(&[3, 9], 57)];
    assert_gradients(&xs, 1e-6, |t, v| {
        let (sa, sb, sc) = (narrow(t, &v[0], 1, 2, 16)?, narrow(t, &v[0], 1, 18, 16)?, narrow(t, &v[0], 1, 10, 9)?);
        let a = linear(t, &sa, &v[1], None)?;
        let b = linear(t, &sb, &v[2], None)?;
        let c = linear(t, &sc, &v[3], None)?;
        let ab = add(t, &a, &b)?;
        add(t, &ab, &c)
    });
}

fn narrow_rejects_out_of_range(dev: &Device) {
    let x = randn_on(dev, &[3, 11], 1.0, 0);
    let err = narrow(&mut Tape::new(), &x, 1, 8, 4).unwrap_err().to_string();
    assert!(err.contains("[8, 12)") && err.contains("axis 1 of size 11"), "{err}");
    assert!(narrow(&mut Tape::new(), &x, 1, 12, 0).is_err());
    assert!(narrow(&mut Tape::new(), &x, 1, usize::MAX, 2).is_err());
    assert!(narrow(&mut Tape::new(), &x, 0, 2, 2).is_err());
    let err = narrow(&mut Tape::new(), &x, 2, 0, 1).unwrap_err().to_string();
    assert!(err.contains("axis 2") && err.contains("rank 2"), "{err}");
}
device_test!(narrow_rejects_out_of_range);

fn reshape_keeps_data(dev: &Device) {
    let x = iota(dev, &[2, 3, 4]);
    let y = reshape(&mut Tape::new(), &x, &[6, 4]).unwrap();
    assert_eq!(y.shape(), &[6, 4]);
    assert_eq!(values(&y), values(&x));
    assert!(reshape(&mut Tape::new(), &x, &[5, 5]).is_err());
}
device_test!(reshape_keeps_data);

#[test]
fn grad_reshape() {
    // Reshape, then flip along the new L axis, so the gradient depends on where the reshape puts each element.
    assert_gradients(&[randn64(&[3, 5, 7], 61)], 1e-6, |t, x| {
        let y = reshape(t, &x[0], &[15, 7])?;
        let z = reshape(t, &y, &[5, 3, 7])?;
        flip_seq(t, &z)
    });
}
