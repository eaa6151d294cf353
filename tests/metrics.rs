//! Segmentation metrics: Dice and normalised surface Dice on hand-counted masks, anisotropic spacing, the distance
//! transform and the NSD against brute force, the per-case evaluation, the summary table and the CSV.

use lkm_engine::metrics::{
    dice_per_class, evaluate_case, scores_csv, squared_distance_transform, summary_table, surface_dice, surface_map,
    CaseScores,
};
use lkm_engine::Error;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

mod common;
use common::assert_close;

/// A metric that must be defined (not `None`) and equal `want` to 1e-12 absolute.
fn assert_metric(got: Option<f64>, want: f64) {
    let g = got.unwrap_or_else(|| panic!("metric: got None, want {want}"));
    assert_close("metric", &[g], &[want], 0.0, 1e-12);
}

/// A label map of `shape` with label 1 on the box z in zr, y in yr, x in xr (half-open ranges).
fn boxed(shape: [usize; 3], zr: (usize, usize), yr: (usize, usize), xr: (usize, usize)) -> Vec<u8> {
    let [d, h, w] = shape;
    let mut m = vec![0u8; d * h * w];
    for z in zr.0..zr.1 {
        for y in yr.0..yr.1 {
            for x in xr.0..xr.1 {
                m[(z * h + y) * w + x] = 1;
            }
        }
    }
    m
}

const S7: [usize; 3] = [7, 7, 7];
const ISO: [f64; 3] = [1.0, 1.0, 1.0];

#[test]
fn dice_hand_computed() {
    // Index:       0  1  2  3  4  5  6  7  8  9
    let pred = [0, 1, 1, 2, 2, 1, 1, 0, 0, 2];
    let refr = [0, 1, 2, 2, 0, 1, 0, 0, 2, 2];
    // Class 1: P = {1,2,5,6} (4), R = {1,5} (2), P∩R = {1,5} (2): 2*2/(4+2) = 2/3.
    // Class 2: P = {3,4,9} (3), R = {2,3,8,9} (4), P∩R = {3,9} (2): 2*2/(3+4) = 4/7.
    let d = dice_per_class(&pred, &refr, 3).unwrap();
    assert_eq!(d.len(), 2);
    assert_metric(d[0], 2.0 / 3.0);
    assert_metric(d[1], 4.0 / 7.0);
    // Identical maps score 1 wherever the class is present.
    let same = dice_per_class(&refr, &refr, 3).unwrap();
    assert_metric(same[0], 1.0);
    assert_metric(same[1], 1.0);
}

#[test]
fn dice_absent_class_is_none() {
    let pred = [0, 1, 1, 0];
    let refr = [0, 1, 0, 0];
    // Class 1: 2*1/(2+1) = 2/3; classes 2 and 3 appear in neither map.
    let d = dice_per_class(&pred, &refr, 4).unwrap();
    assert_metric(d[0], 2.0 / 3.0);
    assert_eq!(d[1], None);
    assert_eq!(d[2], None);
    // Only background: no foreground entries at all.
    assert!(dice_per_class(&pred[..1], &refr[..1], 1).unwrap().is_empty());
}

#[test]
fn dice_one_empty_is_zero() {
    // Class 1 only in pred, class 2 only in the reference.
    let pred = [1, 1, 0, 0];
    let refr = [0, 0, 2, 0];
    let d = dice_per_class(&pred, &refr, 3).unwrap();
    assert_eq!(d, vec![Some(0.0), Some(0.0)]);
}

#[test]
fn dice_bad_inputs() {
    match dice_per_class(&[0, 1, 0], &[0, 1], 2) {
        Err(Error::Shape(m)) => assert!(m.contains("3 voxels") && m.contains('2'), "{m}"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    match dice_per_class(&[0, 5, 0], &[0, 1, 0], 3) {
        Err(Error::Data(m)) => assert!(m.contains("prediction") && m.contains("label 5"), "{m}"),
        other => panic!("expected a data error, got {other:?}"),
    }
    match dice_per_class(&[0, 1, 0], &[0, 3, 0], 3) {
        Err(Error::Data(m)) => assert!(m.contains("reference") && m.contains("label 3"), "{m}"),
        other => panic!("expected a data error, got {other:?}"),
    }
    assert!(matches!(dice_per_class(&[0], &[0], 0), Err(Error::Config(_))));
}

#[test]
fn surface_map_hand_counts() {
    let count = |m: &[u8], shape| surface_map(&m.iter().map(|&l| l == 1).collect::<Vec<_>>(), shape).unwrap();
    let n = |s: Vec<bool>| s.iter().filter(|&&b| b).count();
    // 3x3x3 cube inside 7x7x7: every voxel but the centre touches the outside: 27 - 1 = 26.
    let cube = boxed(S7, (2, 5), (2, 5), (2, 5));
    let s = count(&cube, S7);
    assert_eq!(n(s.clone()), 26);
    assert!(!s[(3 * 7 + 3) * 7 + 3], "the centre is interior");
    // 5x5x5 cube: 125 - 3^3 = 98.
    assert_eq!(n(count(&boxed(S7, (1, 6), (1, 6), (1, 6)), S7)), 98);
    // A 3x3x3 volume filled completely: the volume border counts as outside, so again 26.
    assert_eq!(n(count(&[1u8; 27], [3, 3, 3])), 26);
    // A bar in a 1x1x10 volume: every voxel is on the border.
    assert_eq!(n(count(&boxed([1, 1, 10], (0, 1), (0, 1), (2, 6)), [1, 1, 10])), 4);
    assert!(matches!(surface_map(&[true; 5], [1, 2, 3]), Err(Error::Shape(_))));
}

#[test]
fn nsd_identical_is_one() {
    let cube = boxed(S7, (1, 4), (2, 6), (0, 3));
    for tol in [0.0, 1.0, 5.0] {
        assert_metric(surface_dice(&cube, &cube, S7, [2.0, 0.7, 1.3], 1, tol).unwrap(), 1.0);
    }
}

#[test]
fn nsd_empty_masks() {
    let empty = vec![0u8; 343];
    let cube = boxed(S7, (2, 5), (2, 5), (2, 5));
    assert_eq!(surface_dice(&empty, &empty, S7, ISO, 1, 2.0).unwrap(), None);
    assert_eq!(surface_dice(&cube, &empty, S7, ISO, 1, 100.0).unwrap(), Some(0.0));
    assert_eq!(surface_dice(&empty, &cube, S7, ISO, 1, 100.0).unwrap(), Some(0.0));
    // Class 2 appears in neither map.
    assert_eq!(surface_dice(&cube, &cube, S7, ISO, 2, 2.0).unwrap(), None);
}

#[test]
fn nsd_bar_shifted_by_one() {
    // 1x1x10 volume: P = x in {2,3,4,5}, R = x in {3,4,5,6}; all 4 + 4 voxels are surface voxels.
    let shape = [1, 1, 10];
    let p = boxed(shape, (0, 1), (0, 1), (2, 6));
    let r = boxed(shape, (0, 1), (0, 1), (3, 7));
    // Tolerance 0: shared points {3,4,5} on each side: (3 + 3) / 8.
    assert_metric(surface_dice(&p, &r, shape, ISO, 1, 0.0).unwrap(), 0.75);
    // Tolerance 1 mm with 1 mm spacing: x = 2 and x = 6 are 1 mm from the other bar: 8 / 8.
    assert_metric(surface_dice(&p, &r, shape, ISO, 1, 1.0).unwrap(), 1.0);
    // Spacing 2 mm along x: the two end points are 2 mm away, outside 1.5 mm, inside 2 mm.
    assert_metric(surface_dice(&p, &r, shape, [1.0, 1.0, 2.0], 1, 1.5).unwrap(), 0.75);
    assert_metric(surface_dice(&p, &r, shape, [1.0, 1.0, 2.0], 1, 2.0).unwrap(), 1.0);
}

#[test]
fn nsd_cube_shifted_by_one_voxel() {
    // A: z, y in {2,3,4}, x in {1,2,3}; B: the same shifted to x in {2,3,4}. |S_A| = |S_B| = 26.
    let a = boxed(S7, (2, 5), (2, 5), (1, 4));
    let b = boxed(S7, (2, 5), (2, 5), (2, 5));
    // S_A ∩ S_B: layer x = 2 has 9 voxels in both cubes, minus A's centre (3,3,2): 8; layer x = 3 likewise minus
    // B's centre (3,3,3): 8. So 16 points of each surface are at distance 0: (16 + 16) / 52 = 8/13.
    assert_metric(surface_dice(&a, &b, S7, ISO, 1, 0.0).unwrap(), 8.0 / 13.0);
    assert_metric(surface_dice(&a, &b, S7, ISO, 1, 0.5).unwrap(), 8.0 / 13.0);
    // The other 10 points of S_A (face x = 1 and B's centre (3,3,3)) are 1 mm from S_B (the face x = 2 of B, and
    // (3,3,2) resp.), and symmetrically for S_B: all 52 are within 1 mm.
    assert_metric(surface_dice(&a, &b, S7, ISO, 1, 1.0).unwrap(), 1.0);
}

#[test]
fn nsd_cube_shifted_by_two_voxels() {
    // A: x in {1,2,3}; B: x in {3,4,5}; z, y in {2,3,4}. They share the layer x = 3 (9 voxels, on both surfaces).
    let a = boxed(S7, (2, 5), (2, 5), (1, 4));
    let b = boxed(S7, (2, 5), (2, 5), (3, 6));
    // Tolerance 0: (9 + 9) / 52 = 9/26.
    assert_metric(surface_dice(&a, &b, S7, ISO, 1, 0.0).unwrap(), 9.0 / 26.0);
    // Tolerance 1: add the 8 surface points of A's middle layer x = 2 (1 mm from x = 3) but not its face x = 1
    // (2 mm away); same for B: (17 + 17) / 52 = 17/26.
    assert_metric(surface_dice(&a, &b, S7, ISO, 1, 1.0).unwrap(), 17.0 / 26.0);
    assert_metric(surface_dice(&a, &b, S7, ISO, 1, 2.0).unwrap(), 1.0);
}

#[test]
fn nsd_anisotropic_spacing() {
    let spacing = [3.0, 1.0, 1.0];
    let a = boxed(S7, (2, 5), (2, 5), (2, 5));
    // Shift along z (3 mm voxels): A has z in {1,2,3}, B z in {2,3,4}. As in the x-shift case, 16 points of each
    // surface are shared. The 9 points of A's face z = 1 are 3 mm from every point of S_B (all have z >= 2): outside
    // 2 mm. A's point (3,3,3) (B's centre) is 1 mm from (3,2,3) on S_B: inside. Same for B: (17 + 17) / 52.
    let az = boxed(S7, (1, 4), (2, 5), (2, 5));
    assert_metric(surface_dice(&az, &a, S7, spacing, 1, 2.0).unwrap(), 17.0 / 26.0);
    assert_metric(surface_dice(&az, &a, S7, spacing, 1, 3.0).unwrap(), 1.0);
    // The same shift along x (1 mm voxels) is inside 2 mm everywhere.
    let ax = boxed(S7, (2, 5), (2, 5), (1, 4));
    assert_metric(surface_dice(&ax, &a, S7, spacing, 1, 2.0).unwrap(), 1.0);
    // And the z shift with isotropic spacing is too.
    assert_metric(surface_dice(&az, &a, S7, ISO, 1, 2.0).unwrap(), 1.0);
}

#[test]
fn nsd_bad_inputs() {
    let a = boxed(S7, (2, 5), (2, 5), (2, 5));
    match surface_dice(&a, &a, [7, 7, 6], ISO, 1, 1.0) {
        Err(Error::Shape(m)) => assert!(m.contains("343") && m.contains("294"), "{m}"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    match surface_dice(&a, &a[..300], S7, ISO, 1, 1.0) {
        Err(Error::Shape(m)) => assert!(m.contains("300"), "{m}"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    match surface_dice(&a, &a, S7, [1.0, 0.0, 1.0], 1, 1.0) {
        Err(Error::Data(m)) => assert!(m.contains("spacing"), "{m}"),
        other => panic!("expected a data error, got {other:?}"),
    }
    for tol in [-1.0, f64::NAN] {
        match surface_dice(&a, &a, S7, ISO, 1, tol) {
            Err(Error::Config(m)) => assert!(m.contains("tolerance"), "{m}"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }
}

fn coords(i: usize, shape: [usize; 3]) -> [usize; 3] {
    [i / (shape[1] * shape[2]), (i / shape[2]) % shape[1], i % shape[2]]
}

fn dist2(a: [usize; 3], b: [usize; 3], spacing: [f64; 3]) -> f64 {
    (0..3).map(|k| ((a[k] as f64 - b[k] as f64) * spacing[k]).powi(2)).sum()
}

/// Surface voxels found by probing the six neighbours with bounds checks (a different route from the library's).
fn brute_surface(mask: &[bool], shape: [usize; 3]) -> Vec<usize> {
    let at = |c: [i64; 3]| -> bool {
        if (0..3).any(|k| c[k] < 0 || c[k] >= shape[k] as i64) {
            return false;
        }
        mask[(c[0] as usize * shape[1] + c[1] as usize) * shape[2] + c[2] as usize]
    };
    (0..mask.len())
        .filter(|&i| {
            let c = coords(i, shape).map(|v| v as i64);
            mask[i]
                && (0..3).any(|k| {
                    [-1, 1].iter().any(|&step| {
                        let mut n = c;
                        n[k] += step;
                        !at(n)
                    })
                })
        })
        .collect()
}

fn random_mask(rng: &mut StdRng, n: usize, p: f64) -> Vec<bool> {
    (0..n).map(|_| rng.random::<f64>() < p).collect()
}

#[test]
fn edt_matches_brute_force() {
    let mut rng = StdRng::seed_from_u64(7);
    let cases: [([usize; 3], [f64; 3], f64); 6] = [
        ([5, 7, 6], [2.5, 0.8, 1.3], 0.1),
        ([5, 7, 6], [1.0, 1.0, 1.0], 0.02),
        ([3, 9, 4], [0.7, 3.1, 1.9], 0.3),
        ([1, 11, 13], [5.0, 0.9, 1.1], 0.05),
        ([9, 1, 8], [1.7, 1.0, 0.6], 0.1),
        ([4, 5, 3], [1.0, 2.0, 3.0], 0.0), // no site: infinity everywhere
    ];
    for (shape, spacing, p) in cases {
        let n = shape.iter().product();
        let sites = random_mask(&mut rng, n, p);
        let got = squared_distance_transform(&sites, shape, spacing).unwrap();
        let site_list: Vec<usize> = (0..n).filter(|&i| sites[i]).collect();
        for (i, &g) in got.iter().enumerate() {
            let want = site_list
                .iter()
                .map(|&j| dist2(coords(i, shape), coords(j, shape), spacing))
                .fold(f64::INFINITY, f64::min);
            if want.is_infinite() {
                assert!(g.is_infinite(), "voxel {i} of {shape:?}: got {g}, want inf");
            } else {
                assert!((g - want).abs() < 1e-9 * (1.0 + want), "voxel {i} of {shape:?}: got {g}, want {want}");
            }
        }
    }
    assert!(matches!(squared_distance_transform(&[true; 4], [1, 2, 3], ISO), Err(Error::Shape(_))));
}

/// NSD by the definition: all pairs of surface points.
fn brute_nsd(p: &[bool], r: &[bool], shape: [usize; 3], spacing: [f64; 3], tol: f64) -> Option<f64> {
    let (sp, sr) = (brute_surface(p, shape), brute_surface(r, shape));
    if sp.is_empty() && sr.is_empty() {
        return None;
    }
    let within = |from: &[usize], to: &[usize]| {
        from.iter()
            .filter(|&&i| to.iter().any(|&j| dist2(coords(i, shape), coords(j, shape), spacing).sqrt() <= tol))
            .count()
    };
    Some((within(&sp, &sr) + within(&sr, &sp)) as f64 / (sp.len() + sr.len()) as f64)
}

#[test]
fn nsd_matches_brute_force() {
    let mut rng = StdRng::seed_from_u64(11);
    let shape = [5, 8, 7];
    let n = 5 * 8 * 7;
    let spacings = [[1.0, 1.0, 1.0], [2.9, 0.83, 1.37], [0.6, 2.2, 1.1]];
    let mut nontrivial = 0;
    for trial in 0..12 {
        // Labels 0..3 at random, so the masks are ragged and touch the border; class 3 is made empty in one map
        // for some trials.
        let mut pred: Vec<u8> = (0..n).map(|_| (rng.random::<f64>() * 3.0) as u8).collect();
        let refr: Vec<u8> = (0..n).map(|_| (rng.random::<f64>() * 4.0) as u8).collect();
        if trial % 3 == 0 {
            pred.iter_mut().for_each(|l| *l = (*l).min(2));
        }
        let spacing = spacings[trial % 3];
        for class in 1..=3u8 {
            for tol in [0.0, 0.9, 1.5, 2.4, 4.0] {
                let pm: Vec<bool> = pred.iter().map(|&l| l == class).collect();
                let rm: Vec<bool> = refr.iter().map(|&l| l == class).collect();
                let want = brute_nsd(&pm, &rm, shape, spacing, tol);
                let got = surface_dice(&pred, &refr, shape, spacing, class, tol).unwrap();
                match (got, want) {
                    (Some(g), Some(w)) => {
                        assert_close(&format!("NSD class {class} tol {tol} {spacing:?}"), &[g], &[w], 0.0, 1e-12);
                        nontrivial += usize::from(w > 0.0 && w < 1.0);
                    }
                    _ => assert_eq!(got, want, "class {class} tol {tol}"),
                }
            }
        }
    }
    assert!(nontrivial > 50, "only {nontrivial} comparisons strictly between 0 and 1");
}

#[test]
fn evaluate_case_per_class() {
    // Class 1: the cube pair shifted by one voxel along x (Dice: 18 shared of 27 + 27 = 2/3; NSD 8/13 at 0 mm, 1
    // at 1 mm). Class 2: a single voxel in both maps at the same place (Dice 1, NSD 1). Class 3: absent.
    let mut pred = boxed(S7, (2, 5), (2, 5), (1, 4));
    let mut refr = boxed(S7, (2, 5), (2, 5), (2, 5));
    pred[0] = 2;
    refr[0] = 2;
    let s = evaluate_case("c1", &pred, &refr, S7, ISO, 4, &[0.0, 3.0, 3.0]).unwrap();
    assert_eq!(s.case, "c1");
    assert_metric(s.dice[0], 2.0 / 3.0);
    assert_metric(s.dice[1], 1.0);
    assert_eq!(s.dice[2], None);
    assert_metric(s.nsd[0], 8.0 / 13.0);
    assert_metric(s.nsd[1], 1.0);
    assert_eq!(s.nsd[2], None);
    // One tolerance for all classes.
    let s = evaluate_case("c1", &pred, &refr, S7, ISO, 4, &[1.0]).unwrap();
    assert_metric(s.nsd[0], 1.0);
    // The same numbers as the single-class functions.
    let d = dice_per_class(&pred, &refr, 4).unwrap();
    assert_eq!(s.dice, d);
    assert_eq!(s.nsd[0], surface_dice(&pred, &refr, S7, ISO, 1, 1.0).unwrap());
}

#[test]
fn evaluate_case_bad_inputs() {
    let a = boxed(S7, (2, 5), (2, 5), (2, 5));
    match evaluate_case("c9", &a, &a, S7, ISO, 3, &[1.0, 2.0, 3.0]) {
        Err(Error::Config(m)) => assert!(m.contains("c9") && m.contains("3 NSD tolerances") && m.contains('2'), "{m}"),
        other => panic!("expected a config error, got {other:?}"),
    }
    match evaluate_case("c9", &a, &a, S7, ISO, 1, &[]) {
        Err(Error::Data(m)) => assert!(m.contains("label 1"), "{m}"),
        other => panic!("expected a data error, got {other:?}"),
    }
    assert!(matches!(evaluate_case("c9", &a, &a, [7, 7, 8], ISO, 2, &[1.0]), Err(Error::Shape(_))));
    assert!(matches!(evaluate_case("c9", &a, &a, S7, ISO, 2, &[-2.0]), Err(Error::Config(_))));
}

fn two_cases() -> Vec<CaseScores> {
    vec![
        CaseScores { case: "a".into(), dice: vec![Some(0.5), None], nsd: vec![Some(0.25), None] },
        CaseScores { case: "b,2".into(), dice: vec![Some(1.0), Some(0.8)], nsd: vec![Some(0.75), Some(0.6)] },
    ]
}

#[test]
fn summary_table_numbers() {
    let names: Vec<String> = ["background", "liver", "spleen"].iter().map(|s| s.to_string()).collect();
    let t = summary_table(&two_cases(), &names);
    let line = |start: &str| {
        t.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("no line {start:?} in\n{t}")).to_string()
    };
    // liver: Dice (0.5 + 1) / 2, NSD (0.25 + 0.75) / 2, both cases; spleen: only case b.
    let liver = line("liver");
    assert!(liver.contains("0.7500") && liver.contains("0.5000") && liver.contains("2/2"), "{liver}");
    let spleen = line("spleen");
    assert!(spleen.contains("0.8000") && spleen.contains("0.6000") && spleen.contains("1/2"), "{spleen}");
    // Mean of the class means: (0.75 + 0.8) / 2, (0.5 + 0.6) / 2.
    let mean = line("mean of classes");
    assert!(mean.contains("0.7750") && mean.contains("0.5500"), "{mean}");
    // Per case, over the defined classes: a (0.5, 0.25); b (0.9, 0.675).
    let a = line("a ");
    assert!(a.contains("0.5000") && a.contains("0.2500"), "{a}");
    let b = line("b,2");
    assert!(b.contains("0.9000") && b.contains("0.6750"), "{b}");
    assert!(!t.contains("background"), "{t}");
    // Foreground-only names, and missing names.
    let t = summary_table(&two_cases(), &["liver".to_string()]);
    assert!(t.contains("liver") && t.contains("class 2"), "{t}");
}

#[test]
fn scores_csv_rows() {
    let names: Vec<String> = ["liver", "spleen"].iter().map(|s| s.to_string()).collect();
    let csv = scores_csv(&two_cases(), &names);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines,
        vec![
            "case,class,dice,nsd",
            "a,liver,0.500000,0.250000",
            "a,spleen,,",
            "\"b,2\",liver,1.000000,0.750000",
            "\"b,2\",spleen,0.800000,0.600000",
        ]
    );
    let csv = scores_csv(&two_cases(), &[]);
    assert!(csv.lines().any(|l| l == "a,1,0.500000,0.250000"), "{csv}");
}

#[test]
fn evaluate_full_size_volume_quickly() {
    // A 34 x 128 x 128 volume (the AMOS-like patch of lkm-unet.md) with two large ellipsoids per map, the reference
    // shifted by a voxel or two; the evaluation should take milliseconds in release builds.
    let shape = [34, 128, 128];
    let spacing = [2.5, 0.8, 0.8];
    let ellipsoids = |shift: f64| -> Vec<u8> {
        let mut m = vec![0u8; 34 * 128 * 128];
        for z in 0..34 {
            for y in 0..128 {
                for x in 0..128 {
                    let (zf, yf, xf) = (z as f64, y as f64, x as f64 + shift);
                    let e1 = ((zf - 16.0) / 12.0).powi(2) + ((yf - 50.0) / 40.0).powi(2) + ((xf - 60.0) / 45.0).powi(2);
                    let e2 = ((zf - 20.0) / 6.0).powi(2) + ((yf - 100.0) / 12.0).powi(2) + ((xf - 90.0) / 15.0).powi(2);
                    m[(z * 128 + y) * 128 + x] = if e2 <= 1.0 { 2 } else { u8::from(e1 <= 1.0) };
                }
            }
        }
        m
    };
    let pred = ellipsoids(0.0);
    let refr = ellipsoids(1.5);
    let start = std::time::Instant::now();
    let s = evaluate_case("big", &pred, &refr, shape, spacing, 3, &[5.0, 2.0]).unwrap();
    let elapsed = start.elapsed();
    eprintln!("evaluate_case on 34x128x128: {elapsed:?}, scores {s:?}");
    // A 1-2 voxel (0.8-1.6 mm) shift is within 5 mm and 2 mm tolerances; the Dice reflects the overlap.
    // (The caps of the small ellipsoid, 2.5 mm slices, leave a few surface points just beyond 2 mm.)
    assert_metric(s.nsd[0], 1.0);
    assert!(s.nsd[1].unwrap() > 0.99 && s.nsd[1].unwrap() <= 1.0, "{s:?}");
    assert!(s.dice[0].unwrap() > 0.9 && s.dice[1].unwrap() > 0.8 && s.dice[1].unwrap() < 1.0, "{s:?}");
    // Below one voxel of tolerance only the shared surface counts.
    let tight = surface_dice(&pred, &refr, shape, spacing, 2, 0.5).unwrap().unwrap();
    assert!(tight > 0.0 && tight < 1.0, "{tight}");
    assert!(elapsed.as_secs_f64() < 1.0, "evaluate_case took {elapsed:?}");
}
