//! Each augmentation transform does what it says: rotations move voxels where a rotation must (90 degrees is a
//! transpose and a flip), scaling 1 is a plain crop and scaling s reads s times further from the centre, labels stay
//! integer, in range and aligned with the image, gamma 1 is the identity and gamma keeps mean, std and order, noise
//! and blur have the drawn widths, contrast and low-resolution simulation keep what they promise, and the random
//! draws follow nnU-Net's probabilities and its rules for 2D, 3D and anisotropic patches.

use std::f64::consts::FRAC_PI_2;

use lkm_engine::data::augment::{
    add_gaussian_noise, adjust_contrast, bg_contrast, gamma, gaussian_blur, rotation, scale_brightness,
    simulate_low_resolution, Augmenter, Mat3, PatchGrid, IDENTITY,
};
use lkm_engine::data::synth::{phantom_dataset, SynthConfig};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

mod common;
use common::assert_close;

fn random_volume(shape: [usize; 3], seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..shape.iter().product()).map(|_| rng.random_range(-2.0..2.0f32)).collect()
}

fn index(shape: [usize; 3], d: usize, h: usize, w: usize) -> usize {
    (d * shape[1] + h) * shape[2] + w
}

/// The grid that reads a patch of the volume's own size centred on the volume.
fn centred(shape: [usize; 3], matrix: Mat3) -> PatchGrid {
    PatchGrid { patch: shape, centre: shape.map(|n| (n as f64 - 1.0) / 2.0), matrix }
}

#[test]
fn a_90_degree_rotation_is_a_flip_and_with_a_mirror_a_transpose() {
    // In the (H, W) plane: out[h][w] = x[n-1-w][h]; mirroring W as well gives out[h][w] = x[w][h].
    let shape = [1, 6, 6];
    let x = random_volume(shape, 1);
    let labels: Vec<u8> = (0..36).map(|i| (i * 7 % 5) as u8).collect();
    let quarter = centred(shape, rotation(0, FRAC_PI_2));
    let mut mirror_w = rotation(0, FRAC_PI_2);
    mirror_w.iter_mut().for_each(|row| row[2] = -row[2]);
    let transpose = centred(shape, mirror_w);
    let rotated: Vec<f32> = (0..36).map(|i| x[index(shape, 0, 5 - i % 6, i / 6)]).collect();
    let transposed: Vec<f32> = (0..36).map(|i| x[index(shape, 0, i % 6, i / 6)]).collect();
    assert_close("90-degree rotation", &quarter.sample_linear(&x, shape), &rotated, 0.0, 1e-5);
    assert_close("rotation with a mirror", &transpose.sample_linear(&x, shape), &transposed, 0.0, 1e-5);
    let transposed_labels: Vec<u8> = (0..36).map(|i| labels[index(shape, 0, i % 6, i / 6)]).collect();
    assert_eq!(transpose.sample_nearest(&labels, shape), transposed_labels);
    // About H in 3D: out[d][h][w] = x[n-1-w][h][d].
    let shape = [4, 5, 4];
    let x = random_volume(shape, 2);
    let grid = centred(shape, rotation(1, FRAC_PI_2));
    let mut expected = Vec::new();
    for d in 0..4 {
        for h in 0..5 {
            for w in 0..4 {
                expected.push(x[index(shape, 3 - w, h, d)]);
            }
        }
    }
    assert_close("rotation about the second axis", &grid.sample_linear(&x, shape), &expected, 0.0, 1e-5);
}

#[test]
fn no_rotation_and_scaling_one_is_a_plain_crop_with_zero_padding_mirrored_or_not() {
    // Patch voxel v reads origin + v, or along a mirrored axis origin + p - 1 - v; zero outside the volume. The
    // patches stick out of the volume before it (d), after it (h) and on both sides (w: 10 > 8).
    let shape = [7, 9, 8];
    let x = random_volume(shape, 3);
    let labels: Vec<u8> = (0..x.len()).map(|i| (i % 4) as u8).collect();
    for (patch, origin) in [([4, 5, 6], [-1i64, 2, 3]), ([3, 4, 10], [2, 7, -1]), ([7, 9, 8], [0, 0, 0])] {
        for mirrors in 0..8 {
            let mirrored = [0, 1, 2].map(|a| mirrors >> a & 1 == 1);
            let mut matrix = IDENTITY;
            (0..3).filter(|&a| mirrored[a]).for_each(|a| matrix[a][a] = -1.0);
            let grid = PatchGrid {
                patch,
                centre: [0, 1, 2].map(|a| origin[a] as f64 + (patch[a] as f64 - 1.0) / 2.0),
                matrix,
            };
            let (image, label) = (grid.sample_linear(&x, shape), grid.sample_nearest(&labels, shape));
            for d in 0..patch[0] {
                for h in 0..patch[1] {
                    for w in 0..patch[2] {
                        let v = [d, h, w];
                        let src = [0, 1, 2]
                            .map(|a| origin[a] + if mirrored[a] { (patch[a] - 1 - v[a]) as i64 } else { v[a] as i64 });
                        let inside = (0..3).all(|a| src[a] >= 0 && src[a] < shape[a] as i64);
                        let (want_x, want_l) = if inside {
                            let i = index(shape, src[0] as usize, src[1] as usize, src[2] as usize);
                            (x[i], labels[i])
                        } else {
                            (0.0, 0)
                        };
                        let at = format!("at {v:?} of patch {patch:?} from {origin:?}, mirrored {mirrored:?}");
                        assert_eq!(image[index(patch, d, h, w)], want_x, "image {at}");
                        assert_eq!(label[index(patch, d, h, w)], want_l, "label {at}");
                    }
                }
            }
        }
    }
}

#[test]
fn scaling_reads_proportionally_further_from_the_centre() {
    // Trilinear interpolation is exact on a linear ramp, so the patch must equal the ramp at centre + s (v - c).
    let shape = [20, 20, 20];
    let ramp = |u: [f64; 3]| 2.0 * u[0] + 3.0 * u[1] + 5.0 * u[2];
    let mut x = Vec::new();
    for d in 0..20 {
        for h in 0..20 {
            for w in 0..20 {
                x.push(ramp([d as f64, h as f64, w as f64]) as f32);
            }
        }
    }
    let s = 1.4;
    let grid =
        PatchGrid { patch: [6, 6, 6], centre: [10.0, 9.5, 10.25], matrix: IDENTITY.map(|row| row.map(|v| v * s)) };
    let out = grid.sample_linear(&x, shape);
    for d in 0..6 {
        for h in 0..6 {
            for w in 0..6 {
                let u = [0, 1, 2].map(|a| grid.centre[a] + s * ([d, h, w][a] as f64 - 2.5));
                let got = out[index([6, 6, 6], d, h, w)];
                assert!((got as f64 - ramp(u)).abs() < 1e-3, "{got} vs {}", ramp(u));
            }
        }
    }
}

#[test]
fn augmented_labels_stay_integer_in_range_and_aligned_with_the_image() {
    let case = phantom_dataset(&SynthConfig { cases: 1, shape: [24, 32, 32], seed: 4 }).remove(0);
    let labels = case.label.unwrap();
    // An image that is its label times 10: after the same resampling, rounding it must give the label almost
    // everywhere (trilinear blends only at boundaries).
    let image: Vec<f32> = labels.iter().map(|&l| l as f32 * 10.0).collect();
    let augmenter = Augmenter::new(&[16, 24, 24], true);
    let mut rng = StdRng::seed_from_u64(5);
    let mut transformed = 0;
    for _ in 0..60 {
        let matrix = augmenter.draw_spatial(&mut rng);
        transformed += (matrix.iter().flatten().any(|v| v.abs() != 1.0 && *v != 0.0)) as usize;
        let grid = PatchGrid { patch: [16, 24, 24], centre: [11.5, 15.5, 15.5], matrix };
        let (x, l) = (grid.sample_linear(&image, case.shape), grid.sample_nearest(&labels, case.shape));
        assert!(l.iter().all(|&v| v <= 3), "a label outside 0..=3");
        let agree = x.iter().zip(&l).filter(|(x, &l)| (*x / 10.0).round() as u8 == l).count();
        assert!(agree as f64 > 0.9 * l.len() as f64, "image and labels moved apart: {agree} of {}", l.len());
    }
    assert!(transformed > 5, "rotation or scaling was drawn only {transformed} times in 60");
}

#[test]
fn gamma_one_is_the_identity_and_gamma_keeps_mean_std_and_order() {
    let x = random_volume([4, 8, 8], 6);
    for invert in [false, true] {
        let mut y = x.clone();
        gamma(&mut y, 1.0, invert);
        assert_close(&format!("gamma 1 (invert {invert})"), &y, &x, 0.0, 1e-5);
    }
    let stats = |v: &[f32]| {
        let n = v.len() as f64;
        let mean = v.iter().map(|&a| a as f64).sum::<f64>() / n;
        (mean, (v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt())
    };
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut outputs = Vec::new();
    for invert in [false, true] {
        let mut y = x.clone();
        gamma(&mut y, 1.5, invert);
        let ((m0, s0), (m1, s1)) = (stats(&x), stats(&y));
        assert!((m0 - m1).abs() < 1e-5 && (s0 - s1).abs() < 1e-5, "mean/std {m0}/{s0} became {m1}/{s1}");
        assert!(order.windows(2).all(|p| y[p[0]] <= y[p[1]]), "gamma must keep the order of values");
        assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-2), "gamma 1.5 changed nothing");
        outputs.push(y);
    }
    assert!(outputs[0].iter().zip(&outputs[1]).any(|(a, b)| (a - b).abs() > 1e-2), "inversion changed nothing");
}

#[test]
fn noise_has_the_drawn_standard_deviation_and_is_shared_by_channels() {
    let vox = 32 * 32 * 32;
    let mut image = vec![1.0f32; 2 * vox];
    add_gaussian_noise(&mut image, vox, 0.08, &mut StdRng::seed_from_u64(7));
    let (a, b) = image.split_at(vox);
    assert_eq!(a, b, "one noise field for all channels");
    let mean = a.iter().map(|&v| v as f64 - 1.0).sum::<f64>() / vox as f64;
    let std = (a.iter().map(|&v| (v as f64 - 1.0 - mean).powi(2)).sum::<f64>() / vox as f64).sqrt();
    assert!(mean.abs() < 2e-3 && (std - 0.08).abs() < 2e-3, "noise mean {mean}, std {std}");
}

#[test]
fn blur_has_the_drawn_width_per_axis_and_keeps_constants() {
    let mut flat = vec![3.0f32; 5 * 6 * 7];
    gaussian_blur(&mut flat, [5, 6, 7], [1.0, 0.7, 0.5]);
    assert_close("blurred constant", &flat, &vec![3.0f32; 5 * 6 * 7], 0.0, 1e-5);
    // A delta blurred along W only: its profile along W has unit mass and variance sigma^2 (the kernel spans about
    // 6 sigma: for sigma >= 0.75 that keeps the variance within 1%), and nothing spreads along H.
    let shape = [1, 3, 41];
    for sigma in [0.75, 1.0] {
        let mut x = vec![0.0f32; 3 * 41];
        x[index(shape, 0, 1, 20)] = 1.0;
        gaussian_blur(&mut x, shape, [0.0, 0.0, sigma]);
        let row = &x[41..82];
        let mass: f32 = row.iter().sum();
        let var: f64 = row.iter().enumerate().map(|(i, &v)| v as f64 * (i as f64 - 20.0).powi(2)).sum();
        assert!((mass - 1.0).abs() < 1e-5 && (var - sigma * sigma).abs() < 0.03 * sigma * sigma, "var {var}");
        assert!(x[..41].iter().chain(&x[82..]).all(|&v| v == 0.0), "blur along W leaked into H");
    }
}

#[test]
fn brightness_multiplies_and_contrast_scales_around_the_mean_within_the_range() {
    let x = random_volume([2, 8, 8], 8);
    let mut y = x.clone();
    scale_brightness(&mut y, 1.2);
    assert!(y.iter().zip(&x).all(|(a, b)| *a == b * 1.2));
    let mean = x.iter().sum::<f32>() / x.len() as f32;
    let mut y = x.clone();
    adjust_contrast(&mut y, 1.0);
    assert_close("contrast 1", &y, &x, 0.0, 1e-6);
    adjust_contrast(&mut y, 0.5);
    assert_close("contrast 0.5", &y, &x.iter().map(|v| (v - mean) * 0.5 + mean).collect::<Vec<_>>(), 0.0, 1e-5);
    let (lo, hi) = x.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let mut y = x.clone();
    adjust_contrast(&mut y, 1.25);
    assert!(y.iter().all(|&v| v >= lo && v <= hi), "contrast left the original range");
    assert!(y.iter().zip(&x).any(|(a, b)| a != b));
}

#[test]
fn low_resolution_simulation_removes_fine_detail_only() {
    let shape = [8, 8, 8];
    let x = random_volume(shape, 9);
    let mut y = x.clone();
    simulate_low_resolution(&mut y, shape, [1.0; 3]);
    assert_eq!(y, x, "factor 1 is the identity");
    let mut flat = vec![0.5f32; 512];
    simulate_low_resolution(&mut flat, shape, [0.5; 3]);
    assert_close("low-resolution constant", &flat, &vec![0.5f32; 512], 0.0, 1e-6);
    // Alternating values along W are the finest detail there is: at half resolution every W row is flat; detail
    // along D (factor 1, as for the low-resolution axis of an anisotropic patch) is kept exactly.
    let board: Vec<f32> = (0..512).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
    let mut y = board.clone();
    simulate_low_resolution(&mut y, shape, [1.0, 1.0, 0.5]);
    assert!(y.chunks(8).all(|row| row.iter().all(|&v| v == row[0])), "detail along W survived");
    let slab: Vec<f32> = (0..512).map(|i| if (i / 64) % 2 == 0 { 1.0 } else { -1.0 }).collect();
    let mut y = slab.clone();
    simulate_low_resolution(&mut y, shape, [1.0, 0.5, 0.5]);
    assert_close("low-resolution slabs along D", &y, &slab, 0.0, 1e-6);
}

#[test]
fn augmenter_follows_nnunet_rules_for_2d_3d_and_anisotropic_patches() {
    let deg = |a: f64| a.to_degrees().round();
    let iso = Augmenter::new(&[32, 32, 32], true);
    assert_eq!((deg(iso.max_angle), iso.in_plane, iso.mirror_axes), (30.0, false, [true; 3]));
    let aniso = Augmenter::new(&[8, 64, 64], true);
    assert_eq!((deg(aniso.max_angle), aniso.in_plane), (180.0, true));
    assert!(!Augmenter::new(&[16, 48, 48], true).in_plane, "ratio 3 is not above the threshold");
    let square = Augmenter::new(&[64, 64], true);
    assert_eq!((deg(square.max_angle), square.in_plane, square.mirror_axes), (180.0, true, [false, true, true]));
    assert_eq!(deg(Augmenter::new(&[64, 160], true).max_angle), 15.0);
    assert_eq!(Augmenter::new(&[32, 32, 32], false).mirror_axes, [false; 3]);
}

#[test]
fn spatial_draws_follow_nnunet_probabilities_and_ranges() {
    let det = |m: &Mat3| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let mut rng = StdRng::seed_from_u64(10);
    let n = 4000;
    for (patch, in_plane) in [(vec![32, 32, 32], false), (vec![8, 64, 64], true), (vec![64, 64], true)] {
        let aug = Augmenter::new(&patch, true);
        let (mut rotated, mut scaled, mut mirrored) = (0, 0, [0; 3]);
        for _ in 0..n {
            let m = aug.draw_spatial(&mut rng);
            // Column a is where output axis a goes: its length is the scale; unrotated, its sign is the mirroring.
            let s = (0..3).map(|r| m[r][2] * m[r][2]).sum::<f64>().sqrt();
            let volume = det(&m).abs();
            scaled += ((s - 1.0).abs() > 1e-12) as usize;
            let off_diagonal = (0..9).any(|k| k / 3 != k % 3 && m[k / 3][k % 3] != 0.0);
            rotated += off_diagonal as usize;
            assert!((0.7 - 1e-12..=1.4 + 1e-12).contains(&s), "scale {s}");
            if in_plane {
                assert_eq!((m[0][0].abs(), m[0][1], m[0][2], m[1][0], m[2][0]), (1.0, 0.0, 0.0, 0.0, 0.0));
                assert!((volume - s * s).abs() < 1e-9);
            } else {
                assert!((volume - s * s * s).abs() < 1e-9);
            }
            if !off_diagonal {
                mirrored.iter_mut().enumerate().for_each(|(a, count)| *count += (m[a][a] < 0.0) as usize);
            }
        }
        let near = |count: usize, p: f64| (count as f64 / n as f64 - p).abs() < 0.03;
        assert!(near(rotated, 0.2), "{patch:?}: rotated {rotated} of {n}");
        assert!(near(scaled, 0.2), "{patch:?}: scaled {scaled} of {n}");
        // Unrotated draws (80%) show mirroring on the diagonal: half of them per allowed axis.
        for (a, &count) in mirrored.iter().enumerate() {
            let allowed = aug.mirror_axes[a];
            assert!(if allowed { near(count, 0.8 * 0.5) } else { count == 0 }, "{patch:?}: axis {a} mirrored {count}");
        }
    }
}

#[test]
fn bg_contrast_draws_reductions_and_increases_equally_often() {
    let mut rng = StdRng::seed_from_u64(11);
    let draws: Vec<f32> = (0..4000).map(|_| bg_contrast(&mut rng, (0.7, 1.5))).collect();
    assert!(draws.iter().all(|&f| (0.7..=1.5).contains(&f)));
    let below = draws.iter().filter(|&&f| f < 1.0).count();
    assert!((below as f64 / 4000.0 - 0.5).abs() < 0.03, "{below} of 4000 below 1");
}
