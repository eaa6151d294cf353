//! `lkm-engine report RUN_DIR`: one self-contained HTML page about a training run, readable offline and easy to
//! attach: the configuration and plan (from the checkpoint's metadata), the environment of each training session
//! (`environment.jsonl`, appended by [`record_environment`]), the curves of `metrics.jsonl`, the final validation
//! metrics per class, a table of every epoch, and every other PNG found under the run folder (overlays). Pictures are
//! embedded as base64 `data:` URIs, so the page is one file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::Value;

use super::progress::{draw_progress, read_metrics, EpochPoint, PROGRESS_FILE};
use super::{class_label, class_names, encode_png};
use crate::device::Device;
use crate::train::checkpoint::{read_meta, write_atomically};
use crate::train::run_dir::{CHECKPOINT, METRICS};
use crate::{bail, Error, Result};

/// The file in a run folder that holds one line per training session: where and how it ran.
pub const ENVIRONMENT_FILE: &str = "environment.jsonl";

/// Appends this training session's environment (engine version, device, GPU and CUDA driver version, precision of
/// the arithmetic, CPU threads, operating system) to `run_dir/environment.jsonl`, with the epoch the session starts at.
pub fn record_environment(run_dir: &Path, device: &Device, first_epoch: usize) -> Result<()> {
    // Weights, activations, gradients and optimiser state are float32 on every device; on a GPU the convolutions'
    // products run on the tf32 tensor cores (float32 accumulation) unless exact float32 was chosen (`--math`).
    let (gpu, driver, precision) = match device {
        Device::Cpu => (None, None, "float32"),
        Device::Cuda(g) => {
            let driver = g.driver_version().map_or_else(|e| format!("unknown ({e})"), |(a, b)| format!("CUDA {a}.{b}"));
            let precision = if g.exact_f32() { "float32 (exact)" } else { "float32, tf32 matrix products" };
            (Some(g.name().to_string()), Some(driver), precision)
        }
    };
    let line = serde_json::json!({
        "first_epoch": first_epoch,
        "engine": format!("lkm-engine {}", env!("CARGO_PKG_VERSION")),
        "device": format!("{device:?}"),
        "gpu": gpu,
        "driver": driver,
        "precision": precision,
        "cpu_threads": rayon::current_num_threads(),
        "os": format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
    });
    let path = run_dir.join(ENVIRONMENT_FILE);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::Io(format!("opening {}: {e}", path.display())))?;
    writeln!(f, "{line}").map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
}

/// Writes the report of `run_dir` to `out` (default `run_dir/report.html`), atomically, and returns its path.
pub fn write_report(run_dir: &Path, out: Option<&Path>) -> Result<PathBuf> {
    let html = render_report(run_dir)?;
    let out = out.map_or_else(|| run_dir.join("report.html"), Path::to_path_buf);
    write_atomically(&out, html.as_bytes())?;
    Ok(out)
}

/// The report page of `run_dir` (see the module header). A folder with neither `metrics.jsonl` nor
/// `latest.safetensors` is refused; what is missing from a run folder is said on the page.
pub fn render_report(run_dir: &Path) -> Result<String> {
    let metrics_path = run_dir.join(METRICS);
    let checkpoint_path = run_dir.join(CHECKPOINT);
    if !metrics_path.is_file() && !checkpoint_path.is_file() {
        bail!(Data, "{}: not a run folder (no {METRICS} and no {CHECKPOINT})", run_dir.display());
    }
    let points = if metrics_path.is_file() { read_metrics(&metrics_path)? } else { Vec::new() };
    let meta = if checkpoint_path.is_file() { read_meta(&checkpoint_path)? } else { Value::Null };
    let names = class_names(&meta["run"]);

    let mut page = Page::default();
    page.h(1, &format!("Run report: {}", run_dir.display()));
    page.p(&format!(
        "Written by lkm-engine {} from the run folder's {METRICS}, {CHECKPOINT} and {ENVIRONMENT_FILE}.",
        env!("CARGO_PKG_VERSION")
    ));

    page.h(2, "Configuration and plan");
    if meta.is_null() {
        page.p(&format!("No {CHECKPOINT} (or it holds no lkm-engine metadata): the configuration is unknown."));
    } else {
        page.p(&format!("Epochs completed: {}.", meta["epoch"]));
        for (title, value) in [("Model", &meta["config"]), ("Training", &meta["options"]), ("Data", &meta["run"])] {
            page.h(3, title);
            page.object_table(value);
        }
    }

    page.h(2, "Environment");
    page.environment(&run_dir.join(ENVIRONMENT_FILE))?;

    page.h(2, "Curves");
    if points.is_empty() {
        page.p(&format!("No {METRICS} records: no curves."));
    } else {
        page.img(&encode_png(&draw_progress(&points, &names)?)?, "training curves");
    }

    page.h(2, "Final validation metrics");
    page.final_metrics(&points, &names);

    page.h(2, "Epochs");
    page.epochs(&points);

    page.h(2, "Overlays");
    let pictures = pngs_under(run_dir)?;
    if pictures.is_empty() {
        page.p(
            "No PNG files under the run folder besides progress.png (write some with predict or evaluate --overlay).",
        );
    }
    for path in pictures {
        let bytes = std::fs::read(&path).map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
        let caption = path.strip_prefix(run_dir).unwrap_or(&path).display().to_string();
        page.figure(&bytes, &caption);
    }
    Ok(page.finish(&format!("lkm-engine run report: {}", run_dir.display())))
}

/// Every `.png` file under `dir` (recursively, sorted by path) except the top-level `progress.png`, which the report
/// redraws from the metrics.
fn pngs_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let entries =
            std::fs::read_dir(&folder).map_err(|e| Error::Io(format!("reading {}: {e}", folder.display())))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::Io(format!("reading {}: {e}", folder.display())))?.path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "png") && path != dir.join(PROGRESS_FILE) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Text with the characters that HTML gives a meaning escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as table text: strings as they are, anything else as compact JSON.
fn json_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// A number with `digits` decimals, or `-` for none.
fn number(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// The body of the page being built; every text passes through [`escape`].
#[derive(Default)]
struct Page {
    body: String,
}

impl Page {
    fn h(&mut self, level: u8, text: &str) {
        let _ = writeln!(self.body, "<h{level}>{}</h{level}>", escape(text));
    }

    fn p(&mut self, text: &str) {
        let _ = writeln!(self.body, "<p>{}</p>", escape(text));
    }

    /// A table with a header row; cells are plain text.
    fn table(&mut self, header: &[String], rows: &[Vec<String>]) {
        let cells = |tag: &str, row: &[String]| -> String {
            row.iter().map(|c| format!("<{tag}>{}</{tag}>", escape(c))).collect::<String>()
        };
        let _ = writeln!(self.body, "<table>\n<tr>{}</tr>", cells("th", header));
        for row in rows {
            let _ = writeln!(self.body, "<tr>{}</tr>", cells("td", row));
        }
        self.body.push_str("</table>\n");
    }

    /// A two-column table of a JSON object's keys and values.
    fn object_table(&mut self, value: &Value) {
        match value.as_object() {
            Some(map) => {
                let rows: Vec<Vec<String>> = map.iter().map(|(k, v)| vec![k.clone(), json_text(v)]).collect();
                self.table(&["setting".into(), "value".into()], &rows);
            }
            None => self.p("not recorded"),
        }
    }

    /// A PNG as an `<img>` with a `data:` URI.
    fn img(&mut self, png: &[u8], alt: &str) {
        let data = base64::engine::general_purpose::STANDARD.encode(png);
        let _ = writeln!(self.body, "<img src=\"data:image/png;base64,{data}\" alt=\"{}\">", escape(alt));
    }

    fn figure(&mut self, png: &[u8], caption: &str) {
        self.body.push_str("<figure>\n");
        self.img(png, caption);
        let _ = writeln!(self.body, "<figcaption>{}</figcaption>\n</figure>", escape(caption));
    }

    /// One row per training session of the environment file, or a note when it is absent.
    fn environment(&mut self, path: &Path) -> Result<()> {
        if !path.is_file() {
            self.p(&format!("No {ENVIRONMENT_FILE}: the environment was not recorded."));
            return Ok(());
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
        let keys = ["first_epoch", "engine", "device", "gpu", "driver", "precision", "cpu_threads", "os"];
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| Error::Data(format!("{} line {}: {e}", path.display(), i + 1)))?;
            rows.push(keys.iter().map(|k| if v[k].is_null() { "-".into() } else { json_text(&v[k]) }).collect());
        }
        let header: Vec<String> = keys.iter().map(|k| k.replace('_', " ")).collect();
        self.table(&header, &rows);
        Ok(())
    }

    /// Per class: the Dice of the last validated epoch, and the best Dice with its epoch.
    fn final_metrics(&mut self, points: &[EpochPoint], names: &[String]) {
        let Some(last) = points.iter().rev().find(|p| p.val_dice.is_some()) else {
            self.p("No epoch validated.");
            return;
        };
        let dice = last.val_dice.as_deref().unwrap_or_default();
        let best = |value: &dyn Fn(&EpochPoint) -> Option<f64>| {
            points
                .iter()
                .filter_map(|p| value(p).filter(|v| v.is_finite()).map(|v| (v, p.epoch)))
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map_or("-".to_string(), |(v, e)| format!("{v:.4} (epoch {e})"))
        };
        let mut rows: Vec<Vec<String>> = dice
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let of_class = |p: &EpochPoint| p.val_dice.as_ref().and_then(|d| d.get(i).copied().flatten());
                vec![class_label(names, i + 1), number(*d, 4), best(&of_class)]
            })
            .collect();
        rows.push(vec!["mean".into(), number(last.val_mean_dice, 4), best(&|p: &EpochPoint| p.val_mean_dice)]);
        self.p(&format!("Validation Dice after epoch {} (the last that validated), and the best epoch.", last.epoch));
        self.table(&["class".into(), "Dice".into(), "best Dice".into()], &rows);
    }

    /// Every epoch's loss, learning rate, mean Dice and timing.
    fn epochs(&mut self, points: &[EpochPoint]) {
        let header = ["epoch", "lr", "train loss", "val loss", "val mean Dice", "seconds", "ms / iteration"];
        let rows: Vec<Vec<String>> = points
            .iter()
            .map(|p| {
                vec![
                    p.epoch.to_string(),
                    number(p.lr, 6),
                    number(p.train_loss, 4),
                    number(p.val_loss, 4),
                    number(p.val_mean_dice, 4),
                    number(p.seconds, 1),
                    number(p.ms_per_iteration, 0),
                ]
            })
            .collect();
        self.table(&header.map(String::from), &rows);
    }

    /// The whole document around the body.
    fn finish(self, title: &str) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\n{STYLE}\n\
             </style>\n</head>\n<body>\n{}</body>\n</html>\n",
            escape(title),
            self.body
        )
    }
}

/// The page's look: readable tables, pictures no wider than the window.
const STYLE: &str = "body { font-family: sans-serif; margin: 2em; max-width: 1300px; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; font-size: 0.9em; }
img { max-width: 100%; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }";
