//! Label maps drawn over their image, for `predict --overlay` and `evaluate --overlay`.
//!
//! For every foreground class present, one PNG shows the axial, coronal and sagittal slices through the class's
//! centroid (one row per view), one column per label map (evaluate: reference, then prediction, side by side). The
//! image is drawn in grey through a window from its 0.5th to 99.5th intensity percentiles (a robust range for CT
//! and MR alike); each class is blended over it in a fixed colour ([`class_colour`]), half opaque.
//!
//! Slices are shown at the physical aspect ratio: every pixel of a picture covers the same square of millimetres
//! ([`Grid::pixel_mm`]), sampled from the nearest voxel. Views are in voxel order, not reoriented by the affine:
//! axial slices have y down and x right, coronal and sagittal ones have z up.

use std::path::{Path, PathBuf};

use super::{class_label, text_width, write_png, RgbImage};
use crate::data::nifti::read_volume;
use crate::metrics::CaseScores;
use crate::{bail, Result};

/// The longest side of a view is drawn with at least this many pixels (small volumes are enlarged by a whole factor).
pub const MIN_SIDE: usize = 256;
/// Opacity of a class colour over the grey image.
const LABEL_ALPHA: f32 = 0.5;
/// Gap between panels, and the height of the title, column header and legend strips, in pixels.
const GAP: usize = 4;
const TITLE_HEIGHT: usize = 32;
const HEADER_HEIGHT: usize = 24;
const LEGEND_HEIGHT: usize = 28;
/// Room of a legend entry besides its name: the colour swatch and the space before the next entry.
const LEGEND_ENTRY: usize = 32;
/// Background and text colours of the picture around the panels.
const BACKGROUND: [u8; 3] = [24, 24, 24];
const TEXT: [u8; 3] = [240, 240, 240];

/// Class colours, well apart from each other and from grey (Sasha Trubetskoy's list of 20 distinct colours).
const PALETTE: [[u8; 3]; 20] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
    [0, 128, 128],
    [220, 190, 255],
    [170, 110, 40],
    [255, 250, 200],
    [128, 0, 0],
    [170, 255, 195],
    [128, 128, 0],
    [255, 215, 180],
    [0, 0, 128],
    [128, 128, 128],
];

/// The fixed colour of foreground class `k` (1-based; the palette repeats after 20 classes).
pub fn class_colour(k: usize) -> [u8; 3] {
    PALETTE[(k.max(1) - 1) % PALETTE.len()]
}

/// One of the three orthogonal slice orientations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// A plane of constant z (D index): rows y, columns x.
    Axial,
    /// A plane of constant y (H index): rows z (upward), columns x.
    Coronal,
    /// A plane of constant x (W index): rows z (upward), columns y.
    Sagittal,
}

impl View {
    /// The three views, in the order they are drawn.
    pub const ALL: [View; 3] = [View::Axial, View::Coronal, View::Sagittal];

    /// The view's name.
    pub fn name(self) -> &'static str {
        match self {
            View::Axial => "axial",
            View::Coronal => "coronal",
            View::Sagittal => "sagittal",
        }
    }

    /// The (D, H, W) axes that are fixed, along the rows and along the columns.
    fn axes(self) -> (usize, usize, usize) {
        match self {
            View::Axial => (0, 1, 2),
            View::Coronal => (1, 0, 2),
            View::Sagittal => (2, 0, 1),
        }
    }
}

/// A volume's voxel grid: shape (D, H, W) and spacing (z, y, x) in millimetres.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    /// Size (D, H, W).
    pub shape: [usize; 3],
    /// Voxel spacing (z, y, x), mm.
    pub spacing: [f64; 3],
}

impl Grid {
    /// Millimetres per picture pixel, the same for the three views: the finest spacing, divided by the smallest whole
    /// factor that draws the longest extent with at least [`MIN_SIDE`] pixels.
    pub fn pixel_mm(&self) -> f64 {
        let finest = self.spacing.iter().copied().fold(f64::INFINITY, f64::min);
        let longest = (0..3).map(|a| self.shape[a] as f64 * self.spacing[a]).fold(0.0, f64::max);
        let factor = (MIN_SIDE as f64 / (longest / finest)).ceil().max(1.0);
        finest / factor
    }

    /// The (width, height) in pixels of a view: each axis's physical extent over [`Grid::pixel_mm`].
    pub fn view_size(&self, view: View) -> (usize, usize) {
        let (_, row, col) = view.axes();
        let pixels = |a: usize| ((self.shape[a] as f64 * self.spacing[a] / self.pixel_mm()).round() as usize).max(1);
        (pixels(col), pixels(row))
    }

    fn index(&self, z: usize, y: usize, x: usize) -> usize {
        (z * self.shape[1] + y) * self.shape[2] + x
    }
}

/// The grey window of an image: its 0.5th and 99.5th percentiles (over at most a million evenly strided voxels, so
/// that large CT volumes cost no full sort), widened to a range of 1 when the image is flat.
pub fn grey_window(image: &[f32]) -> (f32, f32) {
    let step = image.len().div_ceil(1_000_000).max(1);
    let mut sample: Vec<f32> = image.iter().step_by(step).copied().filter(|v| v.is_finite()).collect();
    if sample.is_empty() {
        return (0.0, 1.0);
    }
    let mut percentile = |q: f64| {
        let i = ((sample.len() - 1) as f64 * q).round() as usize;
        *sample.select_nth_unstable_by(i, f32::total_cmp).1
    };
    let (lo, hi) = (percentile(0.005), percentile(0.995));
    if hi > lo {
        (lo, hi)
    } else {
        (lo, lo + 1.0)
    }
}

/// The slice `index` of `view` through `image` in grey, at the physical aspect ratio, with the classes of `labels`
/// (same grid; all zero draws the grey image alone) blended over it.
pub fn draw_slice(image: &[f32], labels: &[u8], grid: &Grid, view: View, index: usize, window: (f32, f32)) -> RgbImage {
    let (fixed, row_axis, col_axis) = view.axes();
    let (width, height) = grid.view_size(view);
    let mm = grid.pixel_mm();
    // The voxel under the centre of pixel i along an axis of n voxels of spacing s: floor((i + 1/2) mm / s).
    let voxel =
        |i: usize, axis: usize| (((i as f64 + 0.5) * mm / grid.spacing[axis]) as usize).min(grid.shape[axis] - 1);
    let mut picture = RgbImage::filled(width, height, [0, 0, 0]);
    for y in 0..height {
        // Rows along z run upward: the picture's top row is the last slice.
        let r = if row_axis == 0 { grid.shape[0] - 1 - voxel(y, 0) } else { voxel(y, row_axis) };
        for x in 0..width {
            let mut at = [0; 3];
            at[fixed] = index.min(grid.shape[fixed] - 1);
            at[row_axis] = r;
            at[col_axis] = voxel(x, col_axis);
            let i = grid.index(at[0], at[1], at[2]);
            let g = ((image[i] - window.0) / (window.1 - window.0)).clamp(0.0, 1.0) * 255.0;
            let colour = match labels[i] {
                0 => [g as u8; 3],
                k => class_colour(k as usize).map(|c| ((1.0 - LABEL_ALPHA) * g + LABEL_ALPHA * c as f32) as u8),
            };
            picture.put(x, y, colour);
        }
    }
    picture
}

/// The voxel nearest to the centroid of class `k`, or `None` if no voxel has it.
pub fn centroid(labels: &[u8], shape: [usize; 3], k: u8) -> Option<[usize; 3]> {
    let (mut sum, mut count) = ([0.0f64; 3], 0usize);
    for (i, _) in labels.iter().enumerate().filter(|(_, &l)| l == k) {
        let at = [i / (shape[1] * shape[2]), i / shape[2] % shape[1], i % shape[2]];
        for a in 0..3 {
            sum[a] += at[a] as f64;
        }
        count += 1;
    }
    (count > 0).then(|| sum.map(|s| (s / count as f64).round() as usize))
}

/// One case's overlays: an image, its label maps and what to write on the pictures.
pub struct CaseOverlay<'a> {
    /// The case name (file names and titles).
    pub case: &'a str,
    /// Intensities on `grid`, (D, H, W) row-major.
    pub image: &'a [f32],
    /// The grid of the image and the label maps.
    pub grid: Grid,
    /// Label maps with their column titles, drawn side by side; the first one places the slices (its centroid of a
    /// class, else the next map's).
    pub maps: &'a [(&'a str, &'a [u8])],
    /// Class names, background first.
    pub class_names: &'a [String],
    /// The case's Dice per foreground class (class 1 first), written in the titles when given.
    pub dice: Option<&'a [Option<f64>]>,
}

impl CaseOverlay<'_> {
    /// The pictures with their file names: `CASE_classK.png` for each class K present in any map, or one
    /// `CASE_center.png` through the volume's centre when no map has any foreground.
    pub fn pictures(&self) -> Result<Vec<(String, RgbImage)>> {
        let voxels = self.grid.shape.iter().product::<usize>();
        if voxels == 0 || self.image.len() != voxels || self.maps.iter().any(|(_, m)| m.len() != voxels) {
            bail!(
                Shape,
                "overlay of case {}: the image ({} voxels) and label maps ({:?} voxels) must all fill the non-empty \
                 grid {:?}",
                self.case,
                self.image.len(),
                self.maps.iter().map(|(_, m)| m.len()).collect::<Vec<_>>(),
                self.grid.shape
            );
        }
        let window = grey_window(self.image);
        let largest = self.maps.iter().flat_map(|(_, m)| m.iter()).copied().max().unwrap_or(0);
        let present: Vec<u8> = (1..=largest).filter(|&k| self.maps.iter().any(|(_, m)| m.contains(&k))).collect();
        let mut pictures = Vec::new();
        for &k in &present {
            let at = self.maps.iter().find_map(|(_, m)| centroid(m, self.grid.shape, k)).expect("k is present");
            let mut title = format!("{}  ·  {}  ·  slices through its centroid", self.case, self.class_title(k));
            if let Some(d) = self.dice {
                let score = d.get(k as usize - 1).copied().flatten().map_or("-".into(), |v| format!("{v:.3}"));
                title.push_str(&format!("  ·  Dice {score}"));
            }
            pictures.push((format!("{}_class{k}.png", self.case), self.compose(&title, at, window, &present)?));
        }
        if present.is_empty() {
            let centre = self.grid.shape.map(|n| n / 2);
            let title = format!("{}  ·  no foreground: slices through the centre", self.case);
            pictures.push((format!("{}_center.png", self.case), self.compose(&title, centre, window, &present)?));
        }
        Ok(pictures)
    }

    /// Writes [`CaseOverlay::pictures`] into `dir` (created if needed) and returns their paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut paths = Vec::new();
        for (name, picture) in self.pictures()? {
            let path = dir.join(name);
            write_png(&path, &picture)?;
            paths.push(path);
        }
        Ok(paths)
    }

    fn class_name(&self, k: u8) -> String {
        class_label(self.class_names, k as usize)
    }

    /// The class's name with its label value, e.g. `liver (class 1)`; `class 1` alone when it has no name.
    fn class_title(&self, k: u8) -> String {
        match self.class_name(k) {
            name if name == format!("class {k}") => name,
            name => format!("{name} (class {k})"),
        }
    }

    /// One picture: the title, the map names over their columns, one row per view through `at`, and a legend of the
    /// classes in `present`.
    fn compose(&self, title: &str, at: [usize; 3], window: (f32, f32), present: &[u8]) -> Result<RgbImage> {
        let sizes = View::ALL.map(|v| self.grid.view_size(v));
        let column = sizes.iter().map(|s| s.0).max().unwrap_or(1);
        let width = GAP + self.maps.len() * (column + GAP);
        let top = TITLE_HEIGHT + HEADER_HEIGHT;
        let height = top + sizes.iter().map(|s| s.1 + GAP).sum::<usize>() + LEGEND_HEIGHT;
        let legend: Vec<(u8, String)> = present.iter().map(|&k| (k, self.class_name(k))).collect();
        let legend_width: usize = legend.iter().map(|(_, name)| LEGEND_ENTRY + text_width(name, 14)).sum();
        // Text widths are estimates: leave some slack after the title.
        let width = width.max(4 * GAP + text_width(title, 16)).max(GAP + legend_width);
        let mut picture = RgbImage::filled(width, height, BACKGROUND);
        picture.text(title, GAP as i32, 8, 16, TEXT)?;
        let mut y = top;
        for (view, (_, h)) in View::ALL.into_iter().zip(sizes) {
            let (fixed, _, _) = view.axes();
            for (c, (_, labels)) in self.maps.iter().enumerate() {
                let x = GAP + c * (column + GAP);
                picture.paste(&draw_slice(self.image, labels, &self.grid, view, at[fixed], window), x, y);
                let axis = ["z", "y", "x"][fixed];
                picture.text(
                    &format!("{} {axis} = {}", view.name(), at[fixed]),
                    x as i32 + 4,
                    y as i32 + 4,
                    13,
                    TEXT,
                )?;
            }
            y += h + GAP;
        }
        for (c, (name, _)) in self.maps.iter().enumerate() {
            picture.text(name, (GAP + c * (column + GAP)) as i32, TITLE_HEIGHT as i32, 15, TEXT)?;
        }
        let mut x = GAP;
        for (k, name) in &legend {
            picture.paste(&RgbImage::filled(14, 14, class_colour(*k as usize)), x, y + 6);
            picture.text(name, x as i32 + 18, y as i32 + 5, 14, TEXT)?;
            x += LEGEND_ENTRY + text_width(name, 14);
        }
        Ok(picture)
    }
}

/// `predict --overlay DIR`: the pictures of the prediction written to `label_file` over the first channel of its
/// image, `image_file`, into `dir`.
pub fn write_prediction(
    dir: &Path,
    case: &str,
    image_file: &Path,
    label_file: &Path,
    class_names: &[String],
) -> Result<Vec<PathBuf>> {
    let labels = read_volume(label_file)?;
    let (image, grid) = read_image(image_file, labels.shape)?;
    let maps = [("prediction", &labels.to_labels()?[..])];
    CaseOverlay { case, image: &image, grid, maps: &maps, class_names, dice: None }.write(dir)
}

/// `evaluate --overlay DIR --images IMAGES`: the pictures of one scored case, its `[reference, prediction]` label
/// maps of `shape` side by side over its image from `images` (see [`case_image`]), titled with its Dice, into `dir`.
pub fn write_evaluation(
    dir: &Path,
    images: &Path,
    shape: [usize; 3],
    [reference, prediction]: [&[u8]; 2],
    scores: &CaseScores,
    class_names: &[String],
) -> Result<Vec<PathBuf>> {
    let (image, grid) = read_image(&case_image(images, &scores.case)?, shape)?;
    let maps = [("reference", reference), ("prediction", prediction)];
    CaseOverlay { case: &scores.case, image: &image, grid, maps: &maps, class_names, dice: Some(&scores.dice) }
        .write(dir)
}

/// The first channel of case `case` in the image folder `dir`: `CASE_0000.nii.gz` (nnU-Net naming), `CASE.nii.gz`
/// or the same without `.gz`.
pub fn case_image(dir: &Path, case: &str) -> Result<PathBuf> {
    let names =
        [format!("{case}_0000.nii.gz"), format!("{case}_0000.nii"), format!("{case}.nii.gz"), format!("{case}.nii")];
    match names.iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
        Some(p) => Ok(p),
        None => bail!(Data, "--images {}: no image for case {case} (looked for {})", dir.display(), names.join(", ")),
    }
}

/// Reads the image `file` for label maps of `shape`, with its grid; a different shape is an error naming the file.
pub fn read_image(file: &Path, shape: [usize; 3]) -> Result<(Vec<f32>, Grid)> {
    let v = read_volume(file)?;
    if v.shape != shape {
        bail!(Data, "{}: image shape {:?} differs from its label map's {shape:?}", file.display(), v.shape);
    }
    Ok((v.data, Grid { shape: v.shape, spacing: v.spacing }))
}
