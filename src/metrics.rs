//! Segmentation metrics as used to evaluate LKM-UNet: the Dice coefficient per class and the normalised surface Dice
//! (NSD), per case, with a text summary and a CSV export.
//!
//! Label maps are (D, H, W) row-major `u8` class indices with W fastest (the convention of [`crate::data`]); spacings
//! are [D, H, W] in millimetres. Class 0 is background; scores are reported for the foreground classes
//! k = 1 .. num_classes - 1, and every per-class vector below is indexed by k - 1.
//!
//! ```text
//!   Dice_k = 2 |P_k ∩ R_k| / (|P_k| + |R_k|)                          P_k, R_k: voxels of class k in pred, reference
//!   S(M)   = { v in M : v lies on the volume border, or a 6-neighbour of v is not in M }
//!   d(v, S) = min over u in S of || (v - u) * spacing ||_2            in mm, anisotropic
//!   NSD_k  = ( |{p in S(P_k) : d(p, S(R_k)) <= tau}| + |{r in S(R_k) : d(r, S(P_k)) <= tau}| ) / ( |S(P_k)| + |S(R_k)| )
//! ```
//! Both scores are undefined (0/0) when the class is absent from pred and reference; nnU-Net reports NaN there and
//! leaves it out of its means, and we return `None` and do the same. When exactly one of the two masks is empty both
//! scores are 0.
//!
//! The NSD follows Nikolov et al. 2021 ("Clinically applicable segmentation of head and neck anatomy for
//! radiotherapy") and DeepMind's `surface-distance` package, with one simplification: that package places surface
//! elements on the voxel corners and weights each by its area, whereas here every surface voxel counts once, at its
//! centre. The two agree for identical masks (1) and for masks farther apart than the tolerance (0), but in between
//! they can differ on coarse grids, so compare NSD values only with values computed the same way.
//!
//! Distances come from an exact squared Euclidean distance transform of the surface map (Felzenszwalb and
//! Huttenlocher 2012), with f = 0 on the sites and +inf elsewhere, done one axis at a time:
//! ```text
//!   D(z, y, x) = min_z' [ ((z - z') s_d)^2 + min_y' [ ((y - y') s_h)^2 + min_x' [ ((x - x') s_w)^2 + f(z', y', x') ] ] ]
//! ```
//! each 1D step being the lower envelope of the parabolas `(x - q s)^2 + f(q)` over the finite f(q). This is
//! O(voxels) per axis, so a 128 x 128 x 34 volume takes milliseconds. Each class is moreover cropped to the bounding
//! box of the union of its two masks: the sites and the query points all lie in that box, so the distances are
//! unchanged, and a small organ costs only its box.
//!
//! ```
//! use lkm_engine::metrics::dice_per_class;
//!
//! # fn main() -> lkm_engine::Result<()> {
//! // Eight voxels, classes 0 (background), 1, 2 and 3.
//! let reference = [0, 1, 1, 1, 0, 2, 2, 0];
//! let pred = [0, 1, 1, 0, 1, 2, 2, 0];
//! let dice = dice_per_class(&pred, &reference, 4)?;
//! // Class 1: |P| = 3, |R| = 3, two voxels in common: 2 * 2 / (3 + 3). Class 2: identical. Class 3: absent from both.
//! assert_eq!(dice, [Some(4.0 / 6.0), Some(1.0), None]);
//! assert!(dice_per_class(&pred, &reference[..7], 4).is_err()); // sizes differ
//! # Ok(())
//! # }
//! ```

use crate::Result;

/// Relative slack in the comparison `d <= tau`, so that a distance equal to the tolerance up to rounding (e.g. a
/// shift of one voxel of spacing 0.7 against a tolerance of 0.7 mm) counts as within it.
const TOLERANCE_SLACK: f64 = 1e-9;

/// Scores of one case, indexed by foreground class k - 1 (the first entry is class 1).
#[derive(Clone, Debug, PartialEq)]
pub struct CaseScores {
    /// The case identifier.
    pub case: String,
    /// Dice per foreground class; `None` when the class is absent from both prediction and reference.
    pub dice: Vec<Option<f64>>,
    /// Normalised surface Dice per foreground class at that class's tolerance; `None` as for `dice`.
    pub nsd: Vec<Option<f64>>,
}

/// Number of voxels of `shape`, or an error naming the metric if it overflows.
fn voxel_count(shape: [usize; 3], what: &str) -> Result<usize> {
    match shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n)) {
        Some(n) => Ok(n),
        None => crate::bail!(Shape, "{what}: volume shape {shape:?} has too many voxels"),
    }
}

fn check_spacing(spacing: [f64; 3], what: &str) -> Result<()> {
    crate::ensure!(
        spacing.iter().all(|s| s.is_finite() && *s > 0.0),
        Data,
        "{what}: voxel spacing {spacing:?} mm must be positive and finite"
    );
    Ok(())
}

fn check_tolerance(tolerance_mm: f64, what: &str) -> Result<()> {
    crate::ensure!(
        tolerance_mm.is_finite() && tolerance_mm >= 0.0,
        Config,
        "{what}: NSD tolerance {tolerance_mm} mm must be finite and >= 0"
    );
    Ok(())
}

fn check_pair(pred: &[u8], reference: &[u8], what: &str) -> Result<()> {
    crate::ensure!(
        pred.len() == reference.len(),
        Shape,
        "{what}: prediction has {} voxels but reference has {}",
        pred.len(),
        reference.len()
    );
    Ok(())
}

/// Checks that every label of `labels` is below `num_classes`.
fn check_labels(labels: &[u8], num_classes: usize, which: &str, what: &str) -> Result<()> {
    let max = labels.iter().copied().max().unwrap_or(0);
    crate::ensure!(
        (max as usize) < num_classes,
        Data,
        "{what}: {which} contains label {max} but there are only {num_classes} classes (0..{})",
        num_classes.saturating_sub(1)
    );
    Ok(())
}

/// Dice coefficient 2|P ∩ R| / (|P| + |R|) for each foreground class k = 1 .. num_classes - 1 (entry k - 1).
///
/// `None` when class k is absent from both maps (the score is 0/0; nnU-Net reports NaN and skips it in means); 0 when
/// it is present in exactly one. Errors if the maps differ in length, `num_classes` is 0 or above 256, or a label is
/// `>= num_classes`.
pub fn dice_per_class(pred: &[u8], reference: &[u8], num_classes: usize) -> Result<Vec<Option<f64>>> {
    const WHAT: &str = "dice_per_class";
    check_pair(pred, reference, WHAT)?;
    crate::ensure!(
        (1..=256).contains(&num_classes),
        Config,
        "{WHAT}: num_classes {num_classes} must be in 1..=256 (labels are u8)"
    );
    check_labels(pred, num_classes, "prediction", WHAT)?;
    check_labels(reference, num_classes, "reference", WHAT)?;
    Ok(dice_unchecked(pred, reference, num_classes))
}

fn dice_unchecked(pred: &[u8], reference: &[u8], num_classes: usize) -> Vec<Option<f64>> {
    let mut in_pred = [0u64; 256];
    let mut in_ref = [0u64; 256];
    let mut both = [0u64; 256];
    for (&p, &r) in pred.iter().zip(reference) {
        in_pred[p as usize] += 1;
        in_ref[r as usize] += 1;
        both[p as usize] += u64::from(p == r);
    }
    (1..num_classes)
        .map(|k| {
            let denom = in_pred[k] + in_ref[k];
            (denom > 0).then(|| 2.0 * both[k] as f64 / denom as f64)
        })
        .collect()
}

/// Inclusive-exclusive box [lo, hi) per axis.
#[derive(Clone, Copy, Debug)]
struct BBox {
    lo: [usize; 3],
    hi: [usize; 3],
}

impl BBox {
    fn union(a: Option<BBox>, b: Option<BBox>) -> Option<BBox> {
        match (a, b) {
            (Some(a), Some(b)) => Some(BBox {
                lo: std::array::from_fn(|i| a.lo[i].min(b.lo[i])),
                hi: std::array::from_fn(|i| a.hi[i].max(b.hi[i])),
            }),
            (a, None) => a,
            (None, b) => b,
        }
    }
}

/// Bounding box of every label value present (index = label), in one pass over the map.
fn label_boxes(labels: &[u8], shape: [usize; 3], num_labels: usize) -> Vec<Option<BBox>> {
    let [_, h, w] = shape;
    let mut boxes: Vec<Option<BBox>> = vec![None; num_labels];
    if h == 0 || w == 0 {
        return boxes;
    }
    for (row_index, row) in labels.chunks_exact(w).enumerate() {
        let (z, y) = (row_index / h, row_index % h);
        for (x, &l) in row.iter().enumerate() {
            let Some(slot) = boxes.get_mut(l as usize) else { continue };
            match slot {
                Some(b) => {
                    b.lo = [b.lo[0].min(z), b.lo[1].min(y), b.lo[2].min(x)];
                    b.hi = [b.hi[0].max(z + 1), b.hi[1].max(y + 1), b.hi[2].max(x + 1)];
                }
                None => {
                    *slot = Some(BBox { lo: [z, y, x], hi: [z + 1, y + 1, x + 1] });
                }
            }
        }
    }
    boxes
}

/// Normalised surface Dice of class `class` between `pred` and `reference` at `tolerance_mm` (see the module doc for
/// the formula; surface voxels count once each instead of being weighted by surface area as in DeepMind's package).
///
/// `None` when both masks are empty, 0 when exactly one is. Errors if a map's length is not the product of `shape`,
/// a spacing is not positive and finite, or the tolerance is negative or not finite.
pub fn surface_dice(
    pred: &[u8],
    reference: &[u8],
    shape: [usize; 3],
    spacing: [f64; 3],
    class: u8,
    tolerance_mm: f64,
) -> Result<Option<f64>> {
    const WHAT: &str = "surface_dice";
    check_volume(pred, reference, shape, spacing, WHAT)?;
    check_tolerance(tolerance_mm, WHAT)?;
    let c = class as usize;
    let pb = label_boxes(pred, shape, c + 1)[c];
    let rb = label_boxes(reference, shape, c + 1)[c];
    Ok(nsd_in_box(pred, reference, shape, spacing, class, tolerance_mm, pb, rb))
}

fn check_volume(pred: &[u8], reference: &[u8], shape: [usize; 3], spacing: [f64; 3], what: &str) -> Result<()> {
    check_pair(pred, reference, what)?;
    let n = voxel_count(shape, what)?;
    crate::ensure!(pred.len() == n, Shape, "{what}: label maps have {} voxels but shape {shape:?} has {n}", pred.len());
    check_spacing(spacing, what)
}

/// NSD given the class's bounding boxes in pred (`pb`) and reference (`rb`); inputs already validated.
#[allow(clippy::too_many_arguments)]
fn nsd_in_box(
    pred: &[u8],
    reference: &[u8],
    shape: [usize; 3],
    spacing: [f64; 3],
    class: u8,
    tolerance_mm: f64,
    pb: Option<BBox>,
    rb: Option<BBox>,
) -> Option<f64> {
    match (pb, rb) {
        (None, None) => return None,
        (Some(_), None) | (None, Some(_)) => return Some(0.0),
        _ => {}
    }
    let bbox = BBox::union(pb, rb)?;
    // Crop both masks to the union box. A voxel on the box face whose outer neighbour lies inside the volume is a
    // surface voxel either way, since that neighbour is in neither mask, so surfaces computed on the crop are exact.
    let dims: [usize; 3] = std::array::from_fn(|i| bbox.hi[i] - bbox.lo[i]);
    let [_, h, w] = shape;
    let n = dims.iter().product();
    let mut pm = Vec::with_capacity(n);
    let mut rm = Vec::with_capacity(n);
    for z in bbox.lo[0]..bbox.hi[0] {
        for y in bbox.lo[1]..bbox.hi[1] {
            let start = (z * h + y) * w;
            let range = start + bbox.lo[2]..start + bbox.hi[2];
            pm.extend(pred[range.clone()].iter().map(|&l| l == class));
            rm.extend(reference[range].iter().map(|&l| l == class));
        }
    }
    let sp = surface_map_unchecked(&pm, dims);
    let sr = surface_map_unchecked(&rm, dims);
    let limit = tolerance_mm * tolerance_mm * (1.0 + TOLERANCE_SLACK);

    let mut grid = vec![0.0; n];
    let mut within = 0usize;
    let mut total = 0usize;
    for (sites, queries) in [(&sr, &sp), (&sp, &sr)] {
        for (g, &s) in grid.iter_mut().zip(sites.iter()) {
            *g = if s { 0.0 } else { f64::INFINITY };
        }
        squared_edt_in_place(&mut grid, dims, spacing);
        for (&d2, &q) in grid.iter().zip(queries.iter()) {
            total += usize::from(q);
            within += usize::from(q && d2 <= limit);
        }
    }
    Some(within as f64 / total as f64)
}

/// The surface voxels of a binary mask: voxels of the mask with a 6-neighbour outside the mask or lying on the volume
/// border (outside the volume counts as outside the mask). Errors if `mask.len()` is not the product of `shape`.
pub fn surface_map(mask: &[bool], shape: [usize; 3]) -> Result<Vec<bool>> {
    let n = voxel_count(shape, "surface_map")?;
    crate::ensure!(mask.len() == n, Shape, "surface_map: mask has {} voxels but shape {shape:?} has {n}", mask.len());
    Ok(surface_map_unchecked(mask, shape))
}

fn surface_map_unchecked(mask: &[bool], shape: [usize; 3]) -> Vec<bool> {
    let [d, h, w] = shape;
    let plane = h * w;
    let mut out = vec![false; mask.len()];
    for z in 0..d {
        for y in 0..h {
            let row = (z * h + y) * w;
            let edge_zy = z == 0 || z + 1 == d || y == 0 || y + 1 == h;
            for x in 0..w {
                let i = row + x;
                if !mask[i] {
                    continue;
                }
                out[i] = edge_zy
                    || x == 0
                    || x + 1 == w
                    || !mask[i - 1]
                    || !mask[i + 1]
                    || !mask[i - w]
                    || !mask[i + w]
                    || !mask[i - plane]
                    || !mask[i + plane];
            }
        }
    }
    out
}

/// Exact squared Euclidean distance, in mm², from every voxel to the nearest site (`true` voxel), with voxel spacing
/// `spacing` ([D, H, W] mm); `f64::INFINITY` everywhere when there is no site. Errors if `sites.len()` is not the
/// product of `shape` or a spacing is not positive and finite.
pub fn squared_distance_transform(sites: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Result<Vec<f64>> {
    const WHAT: &str = "squared_distance_transform";
    let n = voxel_count(shape, WHAT)?;
    crate::ensure!(sites.len() == n, Shape, "{WHAT}: site map has {} voxels but shape {shape:?} has {n}", sites.len());
    check_spacing(spacing, WHAT)?;
    let mut grid: Vec<f64> = sites.iter().map(|&s| if s { 0.0 } else { f64::INFINITY }).collect();
    squared_edt_in_place(&mut grid, shape, spacing);
    Ok(grid)
}

/// Replaces `grid` (0 at sites, +inf elsewhere; more generally any sampled function f) by
/// `min_u (|(v - u) * spacing|^2 + f(u))`, one axis at a time.
fn squared_edt_in_place(grid: &mut [f64], shape: [usize; 3], spacing: [f64; 3]) {
    let [d, h, w] = shape;
    if grid.is_empty() {
        return;
    }
    let longest = d.max(h).max(w);
    let mut f = vec![0.0; longest];
    let mut out = vec![0.0; longest];
    let mut env = Envelope { v: vec![0; longest], z: vec![0.0; longest + 1] };
    let mut block = vec![0.0; STRIDED_BLOCK * longest];

    // W: contiguous rows.
    for row in grid.chunks_exact_mut(w) {
        f[..w].copy_from_slice(row);
        env.transform(&f[..w], &mut out[..w], spacing[2]);
        row.copy_from_slice(&out[..w]);
    }
    // H: columns of stride w inside each plane.
    for plane in grid.chunks_exact_mut(h * w) {
        strided_pass(plane, h, w, spacing[1], &mut env, &mut block, &mut out);
    }
    // D: lines of stride h * w.
    strided_pass(grid, d, h * w, spacing[0], &mut env, &mut block, &mut out);
}

/// Lines transformed together by [`strided_pass`]: their elements are read and written as contiguous runs of this
/// length instead of one element per cache line.
const STRIDED_BLOCK: usize = 64;

/// The 1D transform along every line `chunk[k * stride + i]`, k in 0..len, of `chunk` (len * stride values). Lines
/// go through `block` in groups of [`STRIDED_BLOCK`], transposed so that each is contiguous there.
fn strided_pass(
    chunk: &mut [f64],
    len: usize,
    stride: usize,
    s: f64,
    env: &mut Envelope,
    block: &mut [f64],
    out: &mut [f64],
) {
    let mut i0 = 0;
    while i0 < stride {
        let b = STRIDED_BLOCK.min(stride - i0);
        for k in 0..len {
            let run = &chunk[k * stride + i0..k * stride + i0 + b];
            for (j, &v) in run.iter().enumerate() {
                block[j * len + k] = v;
            }
        }
        for line in block[..b * len].chunks_exact_mut(len) {
            env.transform(line, &mut out[..len], s);
            line.copy_from_slice(&out[..len]);
        }
        for k in 0..len {
            let run = &mut chunk[k * stride + i0..k * stride + i0 + b];
            for (j, v) in run.iter_mut().enumerate() {
                *v = block[j * len + k];
            }
        }
        i0 += b;
    }
}

/// Scratch for the 1D lower envelope of parabolas: `v[j]` is the site of the j-th parabola of the envelope and
/// `z[j], z[j + 1]` (in mm) the interval where it is lowest.
struct Envelope {
    v: Vec<usize>,
    z: Vec<f64>,
}

impl Envelope {
    /// out[p] = min_q ((p - q) s)^2 + f[q] over the finite f[q]; +inf if there is none.
    fn transform(&mut self, f: &[f64], out: &mut [f64], s: f64) {
        let (v, z) = (&mut self.v, &mut self.z);
        // Abscissa where the parabolas of sites r < q cross:
        // ((x - q s)^2 + f_q = (x - r s)^2 + f_r)  =>  x = (f_q - f_r) / (2 (q - r) s) + (q + r) s / 2.
        let cross = |r: usize, q: usize, fr: f64, fq: f64| {
            let (rf, qf) = (r as f64, q as f64);
            (fq - fr) / (2.0 * (qf - rf) * s) + 0.5 * (qf + rf) * s
        };
        let mut k = 0usize;
        let mut any = false;
        for (q, &fq) in f.iter().enumerate() {
            if !fq.is_finite() {
                continue;
            }
            if !any {
                any = true;
                v[0] = q;
                z[0] = f64::NEG_INFINITY;
                z[1] = f64::INFINITY;
                continue;
            }
            // z[0] = -inf stops the loop at k = 0, as `cross` of finite values is finite.
            let mut x = cross(v[k], q, f[v[k]], fq);
            while x <= z[k] {
                k -= 1;
                x = cross(v[k], q, f[v[k]], fq);
            }
            k += 1;
            v[k] = q;
            z[k] = x;
            z[k + 1] = f64::INFINITY;
        }
        if !any {
            out.fill(f64::INFINITY);
            return;
        }
        let mut k = 0usize;
        for (p, o) in out.iter_mut().enumerate() {
            let xp = p as f64 * s;
            while z[k + 1] < xp {
                k += 1;
            }
            let dx = (p as f64 - v[k] as f64) * s;
            *o = dx * dx + f[v[k]];
        }
    }
}

/// Dice and NSD of every foreground class of one case.
///
/// `tolerances` gives the NSD tolerance in mm of each foreground class (entry k - 1 for class k, so
/// `num_classes - 1` entries), or a single value used for all classes. Errors as [`dice_per_class`] and
/// [`surface_dice`] do, and if `tolerances` has another length.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_case(
    name: &str,
    pred: &[u8],
    reference: &[u8],
    shape: [usize; 3],
    spacing: [f64; 3],
    num_classes: usize,
    tolerances: &[f64],
) -> Result<CaseScores> {
    let what = format!("evaluate_case({name})");
    check_volume(pred, reference, shape, spacing, &what)?;
    crate::ensure!(
        (1..=256).contains(&num_classes),
        Config,
        "{what}: num_classes {num_classes} must be in 1..=256 (labels are u8)"
    );
    check_labels(pred, num_classes, "prediction", &what)?;
    check_labels(reference, num_classes, "reference", &what)?;
    let foreground = num_classes - 1;
    crate::ensure!(
        tolerances.len() == foreground || tolerances.len() == 1,
        Config,
        "{what}: {} NSD tolerances given for {foreground} foreground classes (give one per class or a single one)",
        tolerances.len()
    );
    for &t in tolerances {
        check_tolerance(t, &what)?;
    }
    let dice = dice_unchecked(pred, reference, num_classes);
    let pboxes = label_boxes(pred, shape, num_classes);
    let rboxes = label_boxes(reference, shape, num_classes);
    let nsd = (1..num_classes)
        .map(|k| {
            let tol = if tolerances.len() == 1 { tolerances[0] } else { tolerances[k - 1] };
            nsd_in_box(pred, reference, shape, spacing, k as u8, tol, pboxes[k], rboxes[k])
        })
        .collect();
    Ok(CaseScores { case: name.to_string(), dice, nsd })
}

/// Name of foreground class k (1-based) from `class_names`: entry k if the list also names the background (one
/// more entry than foreground classes), else entry k - 1, else `None`.
fn class_name(class_names: &[String], k: usize, foreground: usize) -> Option<&str> {
    let index = if class_names.len() == foreground + 1 { k } else { k - 1 };
    class_names.get(index).map(String::as_str)
}

/// Mean of the defined values, `None` if there is none.
fn mean_defined(values: impl Iterator<Item = Option<f64>>) -> (Option<f64>, usize) {
    let (sum, count) = values.flatten().fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
    ((count > 0).then(|| sum / count as f64), count)
}

fn fmt_score(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
}

/// A readable text table: per foreground class the mean Dice and NSD over the cases where the class is defined
/// (absent-from-both cases, `None`, are skipped, as nnU-Net skips NaN) with the number of such cases, the mean of
/// the class means, then per case the mean Dice and NSD over its defined classes. Scores print with 4 decimals,
/// undefined ones as `-`.
///
/// `class_names` names the foreground classes in order (class 1 first); a list with one extra leading entry (the
/// background, as in nnU-Net's dataset.json) is accepted too. Missing names print as `class k`.
pub fn summary_table(scores: &[CaseScores], class_names: &[String]) -> String {
    let foreground = scores.iter().map(|s| s.dice.len().max(s.nsd.len())).max().unwrap_or(0);
    let names: Vec<String> = (1..=foreground)
        .map(|k| class_name(class_names, k, foreground).map_or_else(|| format!("class {k}"), str::to_string))
        .collect();
    let width = names
        .iter()
        .map(String::len)
        .chain(scores.iter().map(|s| s.case.len()))
        .chain(["mean of classes".len()])
        .max()
        .unwrap_or(0);
    let entry = |v: &Vec<Option<f64>>, k: usize| v.get(k).copied().flatten();

    let mut t = String::new();
    t.push_str(&format!("{:<width$}  {:>8}  {:>8}  {:>7}\n", "class", "Dice", "NSD", "cases"));
    let mut class_dice = Vec::with_capacity(foreground);
    let mut class_nsd = Vec::with_capacity(foreground);
    for (k, name) in names.iter().enumerate() {
        let (dice, n) = mean_defined(scores.iter().map(|s| entry(&s.dice, k)));
        let (nsd, _) = mean_defined(scores.iter().map(|s| entry(&s.nsd, k)));
        class_dice.push(dice);
        class_nsd.push(nsd);
        let cases = format!("{n}/{}", scores.len());
        t.push_str(&format!("{name:<width$}  {:>8}  {:>8}  {cases:>7}\n", fmt_score(dice), fmt_score(nsd)));
    }
    let (dice, _) = mean_defined(class_dice.into_iter());
    let (nsd, _) = mean_defined(class_nsd.into_iter());
    t.push_str(&format!("{:<width$}  {:>8}  {:>8}\n", "mean of classes", fmt_score(dice), fmt_score(nsd)));
    t.push('\n');
    t.push_str(&format!("{:<width$}  {:>8}  {:>8}\n", "case", "Dice", "NSD"));
    for s in scores {
        let (dice, _) = mean_defined(s.dice.iter().copied());
        let (nsd, _) = mean_defined(s.nsd.iter().copied());
        t.push_str(&format!("{:<width$}  {:>8}  {:>8}\n", s.case, fmt_score(dice), fmt_score(nsd)));
    }
    t
}

/// Quotes a CSV field if it holds a comma, quote or line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The scores as CSV with header `case,class,dice,nsd` and one row per case and foreground class. `class` is the
/// class name from `class_names` (read as in [`summary_table`]) or, without one, the class index k; scores print
/// with 6 decimals and an undefined score (class absent from both maps) as an empty field.
pub fn scores_csv(scores: &[CaseScores], class_names: &[String]) -> String {
    let foreground = scores.iter().map(|s| s.dice.len().max(s.nsd.len())).max().unwrap_or(0);
    let score = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.6}"));
    let mut out = String::from("case,class,dice,nsd\n");
    for s in scores {
        let case = csv_field(&s.case);
        for k in 0..s.dice.len().max(s.nsd.len()) {
            let class = class_name(class_names, k + 1, foreground).map_or_else(|| (k + 1).to_string(), csv_field);
            let dice = score(s.dice.get(k).copied().flatten());
            let nsd = score(s.nsd.get(k).copied().flatten());
            out.push_str(&format!("{case},{class},{dice},{nsd}\n"));
        }
    }
    out
}
