//! The synthetic phantom dataset: determinism, geometry of the cases, class volumes, and that intensity alone does
//! not solve the segmentation (the classes have distinct mean intensities but overlapping ranges).

use std::time::Instant;

use lkm_engine::data::synth::{phantom_case, phantom_dataset, SynthConfig, PHANTOM_LABELS, PHANTOM_SPACING};
use lkm_engine::data::Case;

const CLASSES: usize = 4;

/// Histogram of intensities per class over a set of cases: bins of `BIN` HU from `LO`, out-of-range values in the
/// end bins.
const LO: f32 = -1200.0;
const BIN: f32 = 5.0;
const BINS: usize = 700;

fn histograms(cases: &[Case]) -> Vec<Vec<u64>> {
    let mut hist = vec![vec![0u64; BINS]; CLASSES];
    for c in cases {
        let label = c.label.as_ref().unwrap();
        for (&v, &l) in c.image.iter().zip(label) {
            let b = (((v - LO) / BIN).floor().max(0.0) as usize).min(BINS - 1);
            hist[l as usize][b] += 1;
        }
    }
    hist
}

/// The value below which a fraction `p` of the histogram lies (bin centre).
fn percentile(hist: &[u64], p: f64) -> f32 {
    let total: u64 = hist.iter().sum();
    let mut acc = 0u64;
    for (b, &n) in hist.iter().enumerate() {
        acc += n;
        if acc as f64 >= p * total as f64 {
            return LO + (b as f32 + 0.5) * BIN;
        }
    }
    LO + BINS as f32 * BIN
}

/// The best Dice any intensity-interval classifier [a, b] can reach for class `c` against all other voxels; every
/// per-voxel threshold classifier assigns intervals to classes, so this bounds its Dice for `c` from above.
fn best_interval_dice(hist: &[Vec<u64>], c: usize) -> f64 {
    let mut pc = vec![0u64; BINS + 1];
    let mut pr = vec![0u64; BINS + 1];
    for b in 0..BINS {
        let rest: u64 = (0..CLASSES).filter(|&k| k != c).map(|k| hist[k][b]).sum();
        pc[b + 1] = pc[b] + hist[c][b];
        pr[b + 1] = pr[b] + rest;
    }
    let nc = pc[BINS] as f64;
    let mut best = 0.0f64;
    for a in 0..BINS {
        for b in a..BINS {
            let tp = (pc[b + 1] - pc[a]) as f64;
            let fp = (pr[b + 1] - pr[a]) as f64;
            best = best.max(2.0 * tp / (tp + fp + nc));
        }
    }
    best
}

#[test]
fn synth_deterministic() {
    let cfg = SynthConfig { cases: 4, shape: [24, 28, 32], seed: 7 };
    let a = phantom_case(2, &cfg);
    let b = phantom_case(2, &cfg);
    let bits = |c: &Case| c.image.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    assert_eq!(bits(&a), bits(&b), "same (index, seed) must give the same image bytes");
    assert_eq!(a.label, b.label);
    assert_eq!(a, phantom_dataset(&cfg)[2], "the dataset's case 2 is phantom_case(2)");

    let other_index = phantom_case(3, &cfg);
    assert_ne!(a.label, other_index.label, "different indices must give different cases");
    assert_ne!(bits(&a), bits(&other_index));
    let other_seed = phantom_case(2, &SynthConfig { seed: 8, ..cfg });
    assert_ne!(a.label, other_seed.label, "different seeds must give different cases");
}

#[test]
fn synth_shape_and_spacing() {
    let cfg = SynthConfig { cases: 3, shape: [40, 56, 48], seed: 3 };
    let cases = phantom_dataset(&cfg);
    assert_eq!(cases.len(), 3);
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(c.name, format!("phantom_{i:04}"));
        assert_eq!(c.shape, [40, 56, 48]);
        assert_eq!(c.channels, 1);
        assert_eq!(c.spacing, [1.5, 1.5, 1.5]);
        assert_eq!(c.spacing, PHANTOM_SPACING);
        assert_eq!(c.image.len(), 40 * 56 * 48);
        let label = c.label.as_ref().expect("phantoms are labelled");
        assert_eq!(label.len(), c.voxels());
        assert!(c.image.iter().all(|v| v.is_finite()), "{}: non-finite intensity", c.name);
        for &(name, v) in PHANTOM_LABELS {
            assert!(label.contains(&v), "{}: class {name} ({v}) missing", c.name);
        }
        assert!(label.iter().all(|&l| (l as usize) < CLASSES), "{}: label out of range", c.name);
    }
    let names: Vec<&str> = PHANTOM_LABELS.iter().map(|l| l.0).collect();
    assert_eq!(names, ["background", "liver", "kidneys", "spine"]);
    assert!(PHANTOM_LABELS.iter().enumerate().all(|(i, l)| l.1 as usize == i));

    // Degenerate sizes give (possibly empty) cases, never a panic.
    for shape in [[0, 8, 8], [1, 1, 1], [4, 5, 6], [8, 0, 3]] {
        let c = phantom_case(0, &SynthConfig { cases: 1, shape, seed: 0 });
        assert_eq!(c.image.len(), shape.iter().product::<usize>());
        assert_eq!(c.label.unwrap().len(), c.image.len());
    }
}

#[test]
fn synth_class_volumes() {
    let cfg = SynthConfig::default();
    assert_eq!((cfg.cases, cfg.shape), (24, [48, 48, 48]));
    let cases = phantom_dataset(&cfg);
    let mut lo = [f64::INFINITY; CLASSES];
    let mut hi = [0.0f64; CLASSES];
    for c in &cases {
        let label = c.label.as_ref().unwrap();
        let mut count = [0usize; CLASSES];
        for &l in label {
            count[l as usize] += 1;
        }
        for k in 0..CLASSES {
            let f = count[k] as f64 / label.len() as f64;
            lo[k] = lo[k].min(f);
            hi[k] = hi[k].max(f);
            if k > 0 {
                assert!((0.005..=0.25).contains(&f), "{}: {} fraction {f:.4}", c.name, PHANTOM_LABELS[k].0);
            }
        }
        // The body: a sizeable part of the volume is tissue, and the corners are air.
        let tissue = c.image.iter().filter(|&&v| v > -500.0).count() as f64 / c.image.len() as f64;
        assert!((0.3..0.9).contains(&tissue), "{}: tissue fraction {tissue:.3}", c.name);
        assert!(c.image[0] < -700.0, "{}: corner voxel {} is not air", c.name, c.image[0]);
    }
    for k in 0..CLASSES {
        println!("{:>10}: volume fraction {:.4} .. {:.4}", PHANTOM_LABELS[k].0, lo[k], hi[k]);
    }
}

#[test]
fn synth_intensity_alone_is_not_enough() {
    let cases = phantom_dataset(&SynthConfig::default());
    let hist = histograms(&cases);
    let mut means = [0.0f64; CLASSES];
    for c in &cases {
        let label = c.label.as_ref().unwrap();
        let mut sum = [0.0f64; CLASSES];
        let mut n = [0usize; CLASSES];
        for (&v, &l) in c.image.iter().zip(label) {
            sum[l as usize] += v as f64;
            n[l as usize] += 1;
        }
        for k in 0..CLASSES {
            means[k] += sum[k] / n[k] as f64 / cases.len() as f64;
        }
    }
    // Soft tissue of the body: background voxels that are not air.
    let mut soft = hist[0].clone();
    for (b, n) in soft.iter_mut().enumerate() {
        if LO + (b as f32 + 1.0) * BIN < -300.0 {
            *n = 0;
        }
    }
    let p = |h: &[u64], q: f64| percentile(h, q);
    println!("soft tissue: p1 {:.0} p50 {:.0} p99 {:.0}", p(&soft, 0.01), p(&soft, 0.5), p(&soft, 0.99));
    for k in 1..CLASSES {
        println!(
            "{:>10}: mean {:.1}  p1 {:.0} p50 {:.0} p99 {:.0}",
            PHANTOM_LABELS[k].0,
            means[k],
            p(&hist[k], 0.01),
            p(&hist[k], 0.5),
            p(&hist[k], 0.99)
        );
    }

    // Distinct means, in the CT order background < liver < kidneys < spine, at least 40 HU apart.
    for k in 1..CLASSES {
        assert!(means[k] > means[k - 1] + 40.0, "means not distinct: {means:?}");
    }
    // Overlapping ranges: each organ's 1-99 % intensity range overlaps its neighbour's, and the liver's overlaps
    // the body's soft tissue.
    assert!(p(&soft, 0.99) > p(&hist[1], 0.01) + 20.0, "soft tissue and liver do not overlap");
    for k in 2..CLASSES {
        assert!(
            p(&hist[k - 1], 0.99) > p(&hist[k], 0.01),
            "{} and {} do not overlap",
            PHANTOM_LABELS[k - 1].0,
            PHANTOM_LABELS[k].0
        );
    }

    // The best possible intensity-interval classifier per class.
    let dice: Vec<f64> = (1..CLASSES).map(|k| best_interval_dice(&hist, k)).collect();
    for (k, d) in dice.iter().enumerate() {
        println!("{:>10}: best intensity-interval Dice {d:.3}", PHANTOM_LABELS[k + 1].0);
    }
    let worst = dice.iter().copied().fold(1.0, f64::min);
    assert!(worst < 0.8, "a threshold on intensity alone segments every class well: {dice:?}");
    // Intensity still carries information: each class is better than chance.
    assert!(dice.iter().all(|&d| d > 0.1), "{dice:?}");
}

#[test]
fn synth_generation_time() {
    let cfg = SynthConfig::default();
    let t = Instant::now();
    let cases = phantom_dataset(&cfg);
    let dt = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (i, c) in cases.iter().enumerate().take(4) {
        assert_eq!(&phantom_case(i, &cfg), c, "threaded and sequential generation differ");
    }
    let one = t.elapsed().as_secs_f64() / 4.0;
    let voxels = cases[0].voxels() as f64;
    println!(
        "default dataset: {} cases of {:?} in {:.1} ms on all cores; one case on one core {:.2} ms \
         ({:.2} ms per 100k voxels)",
        cases.len(),
        cfg.shape,
        dt * 1e3,
        one * 1e3,
        one * 1e3 / (voxels / 1e5)
    );
}
