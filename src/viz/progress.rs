//! `progress.png`: a run's curves, redrawn from `metrics.jsonl` after every epoch, as nnU-Net does.
//!
//! Four panels, one above the other, all against the epoch: the losses (training, and validation when the log has
//! one), the validation Dice of every foreground class and of their mean, each with its moving average, the learning
//! rate, and the median milliseconds per training iteration.
//!
//! The moving average is nnU-Net's exponential one: `ema_0 = d_0`, `ema_t = 0.9 ema_{t-1} + 0.1 d_t`, taken over
//! the epochs that validated.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{class_label, drawing_error, register_font, write_png, RgbImage, FONT};
use crate::train::run_dir::METRICS;
use crate::{Error, Result};

/// The picture's file name in a run folder.
pub const PROGRESS_FILE: &str = "progress.png";
/// Width and height of `progress.png` in pixels.
pub const PROGRESS_SIZE: (usize, usize) = (1200, 1200);
/// Heights of the four panels (loss, Dice, learning rate, ms per iteration), top to bottom; they add up to the
/// picture's height.
pub const PANEL_HEIGHTS: [usize; 4] = [300, 400, 250, 250];
/// Weight of the previous value in the moving average of the Dice.
const EMA_DECAY: f64 = 0.9;

/// One epoch of `metrics.jsonl`, read by field name: fields missing from older logs (or written as `null`, as JSON
/// writes NaN) read as `None`, and fields this picture does not use are ignored.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct EpochPoint {
    /// Epoch index (0-based).
    pub epoch: usize,
    /// Learning rate used.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Mean training loss.
    #[serde(default)]
    pub train_loss: Option<f64>,
    /// Validation loss, when the trainer records one.
    #[serde(default)]
    pub val_loss: Option<f64>,
    /// Validation Dice per foreground class (class 1 first), when the epoch validated.
    #[serde(default)]
    pub val_dice: Option<Vec<Option<f64>>>,
    /// Mean of the present per-class Dice values.
    #[serde(default)]
    pub val_mean_dice: Option<f64>,
    /// Seconds the epoch took.
    #[serde(default)]
    pub seconds: Option<f64>,
    /// Median milliseconds per training iteration.
    #[serde(default)]
    pub ms_per_iteration: Option<f64>,
}

/// Reads `metrics.jsonl`. A run resumed from an earlier checkpoint logs some epochs twice; the last record of an
/// epoch wins. The result is sorted by epoch.
pub fn read_metrics(path: &Path) -> Result<Vec<EpochPoint>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
    let mut by_epoch = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let point: EpochPoint = serde_json::from_str(line)
            .map_err(|e| Error::Data(format!("{} line {}: not an epoch record: {e}", path.display(), i + 1)))?;
        by_epoch.insert(point.epoch, point);
    }
    Ok(by_epoch.into_values().collect())
}

/// Redraws `run_dir/progress.png` from `run_dir/metrics.jsonl`; `class_names` (background first) name the Dice
/// curves.
pub fn write_progress(run_dir: &Path, class_names: &[String]) -> Result<()> {
    let points = read_metrics(&run_dir.join(METRICS))?;
    write_png(&run_dir.join(PROGRESS_FILE), &draw_progress(&points, class_names)?)
}

/// The moving average of a series with gaps (see the module header); `None` where the series has no value.
pub fn moving_average(values: &[Option<f64>]) -> Vec<Option<f64>> {
    let mut ema: Option<f64> = None;
    values
        .iter()
        .map(|v| {
            let v = (*v)?;
            let next = ema.map_or(v, |e| EMA_DECAY * e + (1.0 - EMA_DECAY) * v);
            ema = Some(next);
            Some(next)
        })
        .collect()
}

/// A series to draw: one value (or a gap) per epoch.
struct Curve {
    /// The legend's name for it; a curve with a name also marks each epoch's value with a dot, one without (a moving
    /// average) is a plain line that the legend leaves out.
    label: Option<String>,
    colour: RGBColor,
    values: Vec<Option<f64>>,
    /// Line width in pixels.
    width: u32,
}

/// A panel: a title, a y-axis name and range, its curves, and where their legend goes (none for a single curve:
/// the title names it).
struct Panel {
    title: String,
    y_desc: &'static str,
    y_range: Range<f64>,
    curves: Vec<Curve>,
    legend: Option<SeriesLabelPosition>,
}

/// Draws the four panels for `points` (sorted by epoch, as [`read_metrics`] returns them).
pub fn draw_progress(points: &[EpochPoint], class_names: &[String]) -> Result<RgbImage> {
    register_font();
    let (width, height) = PROGRESS_SIZE;
    let mut image = RgbImage::filled(width, height, [255, 255, 255]);
    let epochs: Vec<f64> = points.iter().map(|p| p.epoch as f64).collect();
    let panels = panels(points, class_names);
    {
        let root = BitMapBackend::with_buffer(&mut image.pixels, (width as u32, height as u32)).into_drawing_area();
        // Where each panel but the first starts: the running sums of the heights above it.
        let tops: Vec<i32> = PANEL_HEIGHTS[..PANEL_HEIGHTS.len() - 1]
            .iter()
            .scan(0, |y, h| {
                *y += *h as i32;
                Some(*y)
            })
            .collect();
        let areas = root.split_by_breakpoints::<i32, i32, _, _>([], tops);
        for (area, panel) in areas.iter().zip(&panels) {
            draw_panel(area, &epochs, panel)?;
        }
        root.present().map_err(|e| drawing_error("progress.png", e))?;
    }
    Ok(image)
}

/// What the four panels show.
fn panels(points: &[EpochPoint], class_names: &[String]) -> Vec<Panel> {
    let series = |f: &dyn Fn(&EpochPoint) -> Option<f64>| -> Vec<Option<f64>> { points.iter().map(f).collect() };
    let line = |label: &str, colour: RGBColor, values: Vec<Option<f64>>| Curve {
        label: Some(label.to_string()),
        colour,
        values,
        width: 2,
    };

    let train_loss = series(&|p| p.train_loss);
    let val_loss = series(&|p| p.val_loss);
    let has_val_loss = val_loss.iter().any(Option::is_some);
    let mut loss = vec![line("training loss", BLUE, train_loss)];
    if has_val_loss {
        loss.push(line("validation loss", RED, val_loss));
    }
    let loss_title = if has_val_loss { "loss" } else { "training loss (the log has no validation loss)" };

    let classes = points.iter().filter_map(|p| p.val_dice.as_ref().map(Vec::len)).max().unwrap_or(0);
    let mut dice = Vec::new();
    for k in 1..=classes {
        let values = series(&|p| p.val_dice.as_ref().and_then(|d| d.get(k - 1).copied().flatten()));
        let colour = super::overlay::class_colour(k);
        let colour = RGBColor(colour[0], colour[1], colour[2]);
        dice.push(Curve { label: None, width: 3, ..line("", colour, moving_average(&values)) });
        dice.push(Curve { width: 1, ..line(&class_label(class_names, k), colour, values) });
    }
    let mean = series(&|p| p.val_mean_dice);
    dice.push(Curve { label: None, width: 3, ..line("", BLACK, moving_average(&mean)) });
    dice.push(Curve { width: 1, ..line("mean", BLACK, mean) });

    let lr = series(&|p| p.lr);
    let ms = series(&|p| p.ms_per_iteration);
    vec![
        Panel {
            title: loss_title.into(),
            y_desc: "loss",
            y_range: padded_range(&loss),
            legend: has_val_loss.then_some(SeriesLabelPosition::UpperRight),
            curves: loss,
        },
        Panel {
            title: "validation Dice per class (dots: each epoch; thick lines: moving average)".into(),
            y_desc: "Dice",
            y_range: 0.0..1.0,
            curves: dice,
            // Dice rises: the lower right corner is where the curves are least likely to be.
            legend: Some(SeriesLabelPosition::LowerRight),
        },
        Panel {
            title: "learning rate".into(),
            y_desc: "lr",
            y_range: 0.0..upper(&lr),
            curves: vec![line("learning rate", BLUE, lr)],
            legend: None,
        },
        Panel {
            title: "median time per training iteration".into(),
            y_desc: "ms / iteration",
            y_range: 0.0..upper(&ms),
            curves: vec![line("ms per iteration", BLUE, ms)],
            legend: None,
        },
    ]
}

/// The finite values of a series.
fn finite(values: &[Option<f64>]) -> impl Iterator<Item = f64> + '_ {
    values.iter().flatten().copied().filter(|v| v.is_finite())
}

/// 0 to 10% above the largest value (1 when there is none).
fn upper(values: &[Option<f64>]) -> f64 {
    let max = finite(values).fold(0.0, f64::max);
    if max > 0.0 {
        1.1 * max
    } else {
        1.0
    }
}

/// The range of all curves' values with 5% room on each side (0..1 when there is none).
fn padded_range(curves: &[Curve]) -> Range<f64> {
    let (lo, hi) = curves
        .iter()
        .flat_map(|c| finite(&c.values))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return 0.0..1.0;
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.05 * hi.abs().max(1.0) };
    lo - pad..hi + pad
}

/// The stretches of a series between gaps, as (epoch, value) points.
fn segments(epochs: &[f64], values: &[Option<f64>]) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for (&x, v) in epochs.iter().zip(values) {
        match v.filter(|v| v.is_finite()) {
            Some(y) => out.last_mut().expect("never empty").push((x, y)),
            None if !out.last().expect("never empty").is_empty() => out.push(Vec::new()),
            None => {}
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

fn draw_panel(area: &DrawingArea<BitMapBackend<'_>, Shift>, epochs: &[f64], panel: &Panel) -> Result<()> {
    let fail = |e| drawing_error(&format!("the {:?} panel of progress.png", panel.title), e);
    // Enough decimals to tell the ticks apart: about three significant digits of the axis's span.
    let span = panel.y_range.end - panel.y_range.start;
    let decimals = (2.0 - span.log10().floor()).clamp(0.0, 8.0) as usize;
    let first = epochs.first().copied().unwrap_or(0.0);
    let last = epochs.last().copied().unwrap_or(0.0).max(first + 1.0);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(first..last, panel.y_range.clone())
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(panel.y_desc)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .x_labels(((last - first) as usize + 1).min(11))
        .x_label_formatter(&|x| format!("{x:.0}"))
        // A tick that rounds to zero prints as 0, not -0.
        .y_label_formatter(&|y| {
            format!("{:.decimals$}", if y.abs() < 0.5 * 0.1f64.powi(decimals as i32) { 0.0 } else { *y })
        })
        .draw()
        .map_err(fail)?;
    for curve in &panel.curves {
        let style = ShapeStyle::from(&curve.colour).stroke_width(curve.width);
        for (i, segment) in segments(epochs, &curve.values).into_iter().enumerate() {
            if curve.label.is_some() {
                chart.draw_series(segment.iter().map(|&p| Circle::new(p, 3, curve.colour.filled()))).map_err(fail)?;
            }
            let drawn = chart.draw_series(LineSeries::new(segment, style)).map_err(fail)?;
            // One legend entry per curve, however many gaps split it.
            if let (Some(label), 0) = (&curve.label, i) {
                let colour = curve.colour;
                drawn.label(label).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], ShapeStyle::from(&colour).stroke_width(2))
                });
            }
        }
    }
    if let Some(position) = &panel.legend {
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(position.clone())
            .draw()
            .map_err(fail)?;
    }
    Ok(())
}
