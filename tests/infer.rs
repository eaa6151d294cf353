//! Sliding-window prediction: tile positions and the Gaussian map against nnU-Net's formulas, host flips, and whole
//! predictions (3D and 2D, with padding, batching and mirroring) against a naive reference written here with
//! explicit padding, one tile per network call and per-voxel loops.

use lkm_engine::autograd::Tape;
use lkm_engine::device::Device;
use lkm_engine::infer::{
    flip, gaussian_importance, predict_labels, predict_probabilities, sliding_window_steps, InferConfig,
};
use lkm_engine::nn::mamba::MambaConfig;
use lkm_engine::nn::{LkmUnet, ModelConfig, Params};
use lkm_engine::ops::pim::PimLayout;
use lkm_engine::Tensor;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

mod common;
use common::max_abs_diff;

/// `ModelConfig::tiny_3d` shrunk to a 16^3 patch (stage maps 16, 8, 4, 2) and half the features, to keep the
/// tests quick.
fn tiny_3d() -> (LkmUnet, Params) {
    let mut cfg = ModelConfig::tiny_3d();
    cfg.features = vec![4, 8, 16, 32];
    cfg.patch = vec![16, 16, 16];
    cfg.pim_windows = vec![vec![4, 4, 4], vec![2, 4, 4], vec![2, 2, 2], vec![1, 1, 1]];
    cfg.pam_pools = vec![vec![2, 2, 2], vec![2, 2, 2], vec![1, 1, 1], vec![1, 1, 1]];
    LkmUnet::new(cfg, 7).unwrap()
}

/// A 3-stage 2D model with 2 input channels and 3 classes, patch 16 x 16.
fn tiny_2d() -> (LkmUnet, Params) {
    let cfg = ModelConfig {
        in_channels: 2,
        num_classes: 3,
        features: vec![4, 8, 16],
        kernels: vec![vec![3, 3]; 3],
        strides: vec![vec![1, 1], vec![2, 2], vec![2, 2]],
        blocks_enc: vec![1, 1, 1],
        blocks_dec: vec![1, 1],
        deep_supervision: true,
        pim_windows: vec![vec![4, 4], vec![2, 2], vec![1, 1]],
        pim_layout: PimLayout::Window,
        pam_pools: vec![vec![2, 2], vec![1, 1], vec![1, 1]],
        mamba: MambaConfig { d_state: 4, d_conv: 4, expand: 2, recompute: false },
        patch: vec![16, 16],
    };
    LkmUnet::new(cfg, 3).unwrap()
}

fn random_image(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect()
}

fn cfg(patch: &[usize], mirror: bool, batch: usize) -> InferConfig {
    InferConfig { patch: patch.to_vec(), step_fraction: 0.5, mirror, batch }
}

fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for a in (0..shape.len()).rev() {
        idx[a] = i % shape[a];
        i /= shape[a];
    }
    idx
}

fn ravel(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &s)| acc * s + i)
}

/// Element-by-element flip through multi-indices.
fn naive_flip(data: &[f32], shape: &[usize], axes: &[usize]) -> Vec<f32> {
    (0..data.len())
        .map(|i| {
            let mut idx = unravel(i, shape);
            for &a in axes {
                idx[a] = shape[a] - 1 - idx[a];
            }
            data[ravel(&idx, shape)]
        })
        .collect()
}

/// Full-resolution logits of one network call on (1, C, spatial...).
fn logits(model: &LkmUnet, params: &Params, x: &[f32], shape: &[usize]) -> Vec<f32> {
    let t = Tensor::from_vec(x.to_vec(), shape).unwrap();
    model.forward(&mut Tape::no_grad(), params, &t).unwrap()[0].to_vec_f32().unwrap()
}

/// Softmax over the leading (class) axis of (K, V).
fn softmax_classes(z: &[f32], k: usize) -> Vec<f32> {
    let v = z.len() / k;
    let mut p = vec![0.0; z.len()];
    for i in 0..v {
        let m = (0..k).map(|c| z[c * v + i]).fold(f32::NEG_INFINITY, f32::max);
        let s: f32 = (0..k).map(|c| (z[c * v + i] - m).exp()).sum();
        for c in 0..k {
            p[c * v + i] = (z[c * v + i] - m).exp() / s;
        }
    }
    p
}

fn argmax_classes(p: &[f32], k: usize) -> Vec<u8> {
    let v = p.len() / k;
    (0..v)
        .map(|i| {
            let mut best = 0;
            for c in 1..k {
                if p[c * v + i] > p[best * v + i] {
                    best = c;
                }
            }
            best as u8
        })
        .collect()
}

/// Naive sliding window on one image (C, spatial...) with the model's own spatial rank: pad explicitly (centred),
/// run every tile alone, weight its logits by exp(-d^2 / (2 (p/8)^2)) per axis from floor(p/2), crop, normalise and
/// take the softmax.
fn naive_probabilities(
    model: &LkmUnet,
    params: &Params,
    image: &[f32],
    spatial: &[usize],
    patch: &[usize],
) -> Vec<f32> {
    let c = model.config.in_channels;
    let k = model.config.num_classes;
    let r = spatial.len();
    let padded: Vec<usize> = spatial.iter().zip(patch).map(|(&s, &p)| s.max(p)).collect();
    let lo: Vec<usize> = spatial.iter().zip(&padded).map(|(&s, &p)| (p - s) / 2).collect();
    let mut pshape = vec![c];
    pshape.extend_from_slice(&padded);
    let mut ishape = vec![c];
    ishape.extend_from_slice(spatial);
    let mut pimg = vec![0.0f32; pshape.iter().product()];
    for (i, &v) in image.iter().enumerate() {
        let mut idx = unravel(i, &ishape);
        for a in 0..r {
            idx[a + 1] += lo[a];
        }
        pimg[ravel(&idx, &pshape)] = v;
    }
    let steps: Vec<Vec<usize>> = (0..r).map(|a| sliding_window_steps(padded[a], patch[a], 0.5).unwrap()).collect();
    let nsteps: Vec<usize> = steps.iter().map(|s| s.len()).collect();
    let pvox: usize = padded.iter().product();
    let tvox: usize = patch.iter().product();
    let mut acc = vec![0.0f32; k * pvox];
    let mut wsum = vec![0.0f32; pvox];
    let mut tshape = vec![1, c];
    tshape.extend_from_slice(patch);
    for t in 0..nsteps.iter().product() {
        let start: Vec<usize> = unravel(t, &nsteps).iter().enumerate().map(|(a, &i)| steps[a][i]).collect();
        let tile: Vec<f32> = (0..c * tvox)
            .map(|i| {
                let mut idx = unravel(i, &tshape[1..]);
                for a in 0..r {
                    idx[a + 1] += start[a];
                }
                pimg[ravel(&idx, &pshape)]
            })
            .collect();
        let z = logits(model, params, &tile, &tshape);
        for j in 0..tvox {
            let tidx = unravel(j, patch);
            let g: f32 = (0..r)
                .map(|a| {
                    let d = tidx[a] as f32 - (patch[a] / 2) as f32;
                    let s = patch[a] as f32 / 8.0;
                    (-d * d / (2.0 * s * s)).exp()
                })
                .product();
            let pidx: Vec<usize> = (0..r).map(|a| tidx[a] + start[a]).collect();
            let pv = ravel(&pidx, &padded);
            wsum[pv] += g;
            for cls in 0..k {
                acc[cls * pvox + pv] += g * z[cls * tvox + j];
            }
        }
    }
    let vox: usize = spatial.iter().product();
    let mut cropped = vec![0.0f32; k * vox];
    for i in 0..vox {
        let idx = unravel(i, spatial);
        let pidx: Vec<usize> = (0..r).map(|a| idx[a] + lo[a]).collect();
        let pv = ravel(&pidx, &padded);
        for cls in 0..k {
            cropped[cls * vox + i] = acc[cls * pvox + pv] / wsum[pv];
        }
    }
    softmax_classes(&cropped, k)
}

#[test]
fn steps_follow_nnunet_formula() {
    // Values of nnU-Net's compute_steps_for_sliding_window (NumPy rounds halves to even: 30.5 -> 30).
    let cases: [(usize, usize, f64, &[usize]); 8] = [
        (100, 40, 0.5, &[0, 20, 40, 60]),
        (40, 40, 0.5, &[0]),
        (30, 40, 0.5, &[0]),
        (41, 40, 0.5, &[0, 1]),
        (101, 40, 0.5, &[0, 15, 30, 46, 61]),
        (512, 192, 0.5, &[0, 80, 160, 240, 320]),
        (100, 40, 1.0, &[0, 30, 60]),
        (37, 16, 0.5, &[0, 7, 14, 21]),
    ];
    for (size, patch, step, expected) in cases {
        assert_eq!(sliding_window_steps(size, patch, step).unwrap(), expected, "size {size} patch {patch} step {step}");
    }
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        let e = sliding_window_steps(100, 40, bad).unwrap_err().to_string();
        assert!(e.contains("step fraction"), "{e}");
    }
}

#[test]
fn gaussian_is_centred_symmetric_with_max_one() {
    let patch = [16, 11, 4];
    let g = gaussian_importance(&patch);
    assert_eq!(g.len(), 16 * 11 * 4);
    let at = |z: usize, y: usize, x: usize| g[(z * 11 + y) * 4 + x];
    let max = g.iter().cloned().fold(0.0f32, f32::max);
    assert_eq!(max, 1.0);
    assert_eq!(at(8, 5, 2), 1.0, "maximum at floor(patch / 2)");
    assert!(g.iter().all(|&v| v > 0.0));
    // Symmetric about the centre on every axis (even axes: one voxel more below the centre than above).
    for z in 1..8 {
        for y in 0..11 {
            for x in 0..4 {
                assert!((at(8 + z, y, x) - at(8 - z, y, x)).abs() < 1e-7);
                assert!((at(z, y, x) - at(z, 10 - y, x)).abs() < 1e-7);
            }
        }
    }
    // sigma = patch / 8: at the corner (0, 0, 0) the distances are 8, 5, 2 with sigmas 2, 11/8, 1/2.
    let expected = (-(64.0 / 8.0) - 25.0 / (2.0 * (11.0f64 / 8.0).powi(2)) - 4.0 / 0.5).exp();
    assert!((at(0, 0, 0) as f64 / expected - 1.0).abs() < 1e-5, "{} vs {expected}", at(0, 0, 0));
}

#[test]
fn flip_matches_elementwise_reversal() {
    let shape = [2, 3, 4, 5];
    let data = random_image(120, 1);
    for axes in [vec![], vec![3], vec![1, 3], vec![0, 1, 2, 3], vec![2]] {
        assert_eq!(flip(&data, &shape, &axes).unwrap(), naive_flip(&data, &shape, &axes), "axes {axes:?}");
    }
    assert!(flip(&data, &shape, &[4]).unwrap_err().to_string().contains("axis 4"));
    assert!(flip(&data[1..], &shape, &[0]).is_err());
}

#[test]
fn one_patch_volume_equals_network_argmax() {
    let (model, params) = tiny_3d();
    let image = random_image(16 * 16 * 16, 2);
    let z = logits(&model, &params, &image, &[1, 1, 16, 16, 16]);
    let c = cfg(&[16, 16, 16], false, 1);
    let labels = predict_labels(&model, &params, &Device::Cpu, &image, 1, [16, 16, 16], &c).unwrap();
    let expected = argmax_classes(&z, 4);
    assert_eq!(labels, expected);
    assert!(expected.iter().any(|&l| l != expected[0]), "the test needs more than one predicted class");
    let probs = predict_probabilities(&model, &params, &Device::Cpu, &image, 1, [16, 16, 16], &c).unwrap();
    assert!(max_abs_diff(&probs, &softmax_classes(&z, 4)) < 1e-6);
}

#[test]
fn odd_volume_matches_naive_sliding_window() {
    // 21 and 30 need 2 and 3 tiles; 13 is padded to 16 (1 before, 2 after). Batches of 4 leave a partial batch.
    let (model, params) = tiny_3d();
    let shape = [21, 30, 13];
    let image = random_image(shape.iter().product(), 3);
    let c = cfg(&[16, 16, 16], false, 4);
    let probs = predict_probabilities(&model, &params, &Device::Cpu, &image, 1, shape, &c).unwrap();
    let labels = predict_labels(&model, &params, &Device::Cpu, &image, 1, shape, &c).unwrap();
    assert_eq!(probs.len(), 4 * 21 * 30 * 13);
    assert_eq!(labels.len(), 21 * 30 * 13);
    let reference = naive_probabilities(&model, &params, &image, &shape, &[16, 16, 16]);
    let diff = max_abs_diff(&probs, &reference);
    assert!(diff < 1e-5, "max |difference| {diff}");
    assert_eq!(labels, argmax_classes(&probs, 4));
}

#[test]
fn mirroring_averages_all_flips_and_is_flip_equivariant() {
    let (model, params) = tiny_3d();
    let shape = [16, 16, 16];
    let image = random_image(16 * 16 * 16, 4);
    let dev = Device::Cpu;
    let plain = predict_probabilities(&model, &params, &dev, &image, 1, shape, &cfg(&[16, 16, 16], false, 1)).unwrap();
    let mirrored =
        predict_probabilities(&model, &params, &dev, &image, 1, shape, &cfg(&[16, 16, 16], true, 2)).unwrap();
    // The mean logits over the 8 flips, computed directly.
    let xshape = [1, 1, 16, 16, 16];
    let mut mean = vec![0.0f32; 4 * 4096];
    for mask in 0..8 {
        let axes: Vec<usize> = (0..3).filter(|a| mask >> a & 1 == 1).map(|a| a + 2).collect();
        let z = logits(&model, &params, &naive_flip(&image, &xshape, &axes), &xshape);
        for (m, v) in mean.iter_mut().zip(naive_flip(&z, &[1, 4, 16, 16, 16], &axes)) {
            *m += v / 8.0;
        }
    }
    assert!(max_abs_diff(&mirrored, &softmax_classes(&mean, 4)) < 1e-5);
    assert!(max_abs_diff(&mirrored, &plain) > 1e-3, "mirroring should change an untrained network's output");
    // Flip the input along D and W, predict, flip back: mirroring gives the same result, the plain prediction not.
    let flipped = naive_flip(&image, &[1, 16, 16, 16], &[1, 3]);
    let back = |p: Vec<f32>| naive_flip(&p, &[4, 16, 16, 16], &[1, 3]);
    let m2 =
        back(predict_probabilities(&model, &params, &dev, &flipped, 1, shape, &cfg(&[16, 16, 16], true, 3)).unwrap());
    assert!(max_abs_diff(&m2, &mirrored) < 1e-5);
    let p2 =
        back(predict_probabilities(&model, &params, &dev, &flipped, 1, shape, &cfg(&[16, 16, 16], false, 1)).unwrap());
    assert!(max_abs_diff(&p2, &plain) > 1e-3);
}

#[test]
fn two_d_model_predicts_slice_by_slice() {
    // 3 slices of 23 x 11 with 2 channels: 2 tiles per slice (11 padded to 16); batches of 4 span slices.
    let (model, params) = tiny_2d();
    let shape = [3, 23, 11];
    let image = random_image(2 * 3 * 23 * 11, 5);
    let c = cfg(&[16, 16], false, 4);
    let probs = predict_probabilities(&model, &params, &Device::Cpu, &image, 2, shape, &c).unwrap();
    assert_eq!(probs.len(), 3 * 3 * 23 * 11);
    let slice = 23 * 11;
    for d in 0..3 {
        let one: Vec<f32> =
            (0..2).flat_map(|ch| image[(ch * 3 + d) * slice..(ch * 3 + d + 1) * slice].to_vec()).collect();
        let reference = naive_probabilities(&model, &params, &one, &[23, 11], &[16, 16]);
        for k in 0..3 {
            let got = &probs[(k * 3 + d) * slice..(k * 3 + d + 1) * slice];
            let diff = max_abs_diff(got, &reference[k * slice..(k + 1) * slice]);
            assert!(diff < 1e-5, "slice {d} class {k}: max |difference| {diff}");
        }
    }
    let labels = predict_labels(&model, &params, &Device::Cpu, &image, 2, shape, &c).unwrap();
    assert_eq!(labels, argmax_classes(&probs, 3));
    // Mirroring in 2D averages the 4 flips of H and W.
    let img1: Vec<f32> = random_image(2 * 16 * 16, 6);
    let mirrored =
        predict_probabilities(&model, &params, &Device::Cpu, &img1, 2, [1, 16, 16], &cfg(&[16, 16], true, 1)).unwrap();
    let mut mean = vec![0.0f32; 3 * 256];
    for axes in [vec![], vec![2], vec![3], vec![2, 3]] {
        let z = logits(&model, &params, &naive_flip(&img1, &[1, 2, 16, 16], &axes), &[1, 2, 16, 16]);
        for (m, v) in mean.iter_mut().zip(naive_flip(&z, &[1, 3, 16, 16], &axes)) {
            *m += v / 4.0;
        }
    }
    assert!(max_abs_diff(&mirrored, &softmax_classes(&mean, 3)) < 1e-5);
}

#[test]
fn bad_arguments_name_the_problem() {
    let (model, params) = tiny_3d();
    let dev = Device::Cpu;
    let image = random_image(16 * 16 * 16, 7);
    let shape = [16, 16, 16];
    let err = |image: &[f32], channels: usize, c: InferConfig| {
        predict_labels(&model, &params, &dev, image, channels, shape, &c).unwrap_err().to_string()
    };
    let e = err(&image, 2, cfg(&[16, 16, 16], false, 1));
    assert!(e.contains("2 channels") && e.contains("expects 1"), "{e}");
    let e = err(&image[1..], 1, cfg(&[16, 16, 16], false, 1));
    assert!(e.contains("4095 values"), "{e}");
    let e = err(&image, 1, cfg(&[16, 16], false, 1));
    assert!(e.contains("2 axes") && e.contains("3D"), "{e}");
    let e = err(&image, 1, cfg(&[16, 16, 12], false, 1));
    assert!(e.contains("does not divide"), "{e}");
    let e = err(&image, 1, cfg(&[16, 16, 16], false, 0));
    assert!(e.contains("batch"), "{e}");
    let e = err(&image, 1, InferConfig { step_fraction: 0.0, ..cfg(&[16, 16, 16], false, 1) });
    assert!(e.contains("step fraction"), "{e}");
    let e = predict_labels(&model, &params, &dev, &[], 1, [0, 16, 16], &cfg(&[16, 16, 16], false, 1)).unwrap_err();
    assert!(e.to_string().contains("empty volume"), "{e}");
}
