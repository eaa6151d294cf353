//! Pictures: progress.png (size, curves that move with the data, written by the trainer), overlays (physical aspect
//! ratio, an empty label map leaves the grey image, colours where the labels are, file names) and the HTML report
//! (well-formed, text escaped, every embedded data URI a PNG).

use std::io::Cursor;
use std::path::{Path, PathBuf};

mod common;

use base64::Engine as _;
use lkm_engine::data::nifti::{header_for, write_image, write_label};
use lkm_engine::data::synth::{phantom_dataset, SynthConfig};
use lkm_engine::device::Device;
use lkm_engine::metrics::CaseScores;
use lkm_engine::nn::LkmUnet;
use lkm_engine::train::run_dir::RunDir;
use lkm_engine::train::trainer::{Run, Start, TrainOptions};
use lkm_engine::viz::overlay::{
    centroid, class_colour, draw_slice, grey_window, write_evaluation, write_prediction, CaseOverlay, Grid, View,
};
use lkm_engine::viz::progress::{
    draw_progress, moving_average, read_metrics, EpochPoint, PANEL_HEIGHTS, PROGRESS_SIZE,
};
use lkm_engine::viz::report::render_report;
use lkm_engine::viz::{encode_png, RgbImage};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lkm-viz-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Decodes a PNG into (width, height, RGB bytes), failing the test if it is not an 8-bit RGB PNG.
fn decode(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
    let mut reader = png::Decoder::new(Cursor::new(bytes)).read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut pixels).expect("PNG data");
    assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight));
    pixels.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, pixels)
}

fn decode_file(path: &Path) -> (usize, usize, Vec<u8>) {
    decode(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn points(n: usize) -> Vec<EpochPoint> {
    (0..n)
        .map(|e| EpochPoint {
            epoch: e,
            lr: Some(0.01 * (1.0 - e as f64 / n as f64)),
            train_loss: Some(1.0 / (1.0 + e as f64)),
            val_dice: Some(vec![Some(0.1 * e as f64), None, Some(0.5)]),
            val_mean_dice: Some(0.05 * e as f64 + 0.25),
            ms_per_iteration: Some(1000.0 + e as f64),
            ..EpochPoint::default()
        })
        .collect()
}

/// The rows of two same-sized pictures where any pixel differs.
fn differing_rows(a: &RgbImage, b: &RgbImage) -> Vec<usize> {
    assert_eq!((a.width, a.height), (b.width, b.height));
    (0..a.height).filter(|&y| (0..a.width).any(|x| a.get(x, y) != b.get(x, y))).collect()
}

#[test]
fn progress_png_has_its_size_and_a_changed_value_moves_only_its_panel() {
    let names: Vec<String> = ["background", "liver", "kidneys", "spine"].map(String::from).to_vec();
    let base = draw_progress(&points(6), &names).unwrap();
    let (w, h, pixels) = decode(&encode_png(&base).unwrap());
    assert_eq!((w, h), PROGRESS_SIZE);
    assert_eq!(pixels, base.pixels, "the PNG holds the drawn pixels");
    assert_eq!(PANEL_HEIGHTS.iter().sum::<usize>(), PROGRESS_SIZE.1);

    // The training loss of epoch 3, then the Dice of class 1 at epoch 2: each moves pixels in its own panel only.
    let loss_panel = 0..PANEL_HEIGHTS[0];
    let dice_panel = PANEL_HEIGHTS[0]..PANEL_HEIGHTS[0] + PANEL_HEIGHTS[1];
    let mut changed = points(6);
    changed[3].train_loss = Some(0.6);
    let rows = differing_rows(&base, &draw_progress(&changed, &names).unwrap());
    assert!(!rows.is_empty(), "a changed loss must move the curve");
    assert!(rows.iter().all(|y| loss_panel.contains(y)), "loss change drew outside the loss panel: {rows:?}");
    let mut changed = points(6);
    changed[2].val_dice.as_mut().unwrap()[0] = Some(0.9);
    let rows = differing_rows(&base, &draw_progress(&changed, &names).unwrap());
    assert!(!rows.is_empty(), "a changed Dice must move the curve");
    assert!(rows.iter().all(|y| dice_panel.contains(y)), "Dice change drew outside the Dice panel: {rows:?}");
}

#[test]
fn progress_png_draws_a_single_epoch_and_an_empty_log() {
    for n in [0, 1] {
        let picture = draw_progress(&points(n), &[]).unwrap();
        assert_eq!((picture.width, picture.height), PROGRESS_SIZE);
        // Axes, titles and, with one epoch, its dots are drawn on the white page.
        assert!(picture.pixels.iter().any(|&v| v < 128), "{n} epochs: nothing drawn");
    }
}

#[test]
fn moving_average_is_nnunets_exponential_one_over_validated_epochs() {
    let ema = moving_average(&[Some(1.0), None, Some(0.0), Some(0.0)]);
    assert_eq!(ema[0], Some(1.0));
    assert_eq!(ema[1], None);
    assert!((ema[2].unwrap() - 0.9).abs() < 1e-12);
    assert!((ema[3].unwrap() - 0.81).abs() < 1e-12);
}

#[test]
fn metrics_reader_keeps_the_last_record_of_an_epoch_and_names_a_bad_line() {
    let dir = temp_dir("metrics");
    let path = dir.join("metrics.jsonl");
    std::fs::write(
        &path,
        "{\"epoch\":0,\"train_loss\":2.0}\n{\"epoch\":1,\"train_loss\":1.0,\"ms_per_iteration\":null}\n\n\
         {\"epoch\":1,\"train_loss\":0.5,\"later_field\":3}\n",
    )
    .unwrap();
    let read = read_metrics(&path).unwrap();
    assert_eq!(read.iter().map(|p| (p.epoch, p.train_loss)).collect::<Vec<_>>(), [(0, Some(2.0)), (1, Some(0.5))]);
    std::fs::write(&path, "{\"epoch\":0}\nnot json\n").unwrap();
    let err = read_metrics(&path).expect_err("must fail").to_string();
    assert!(err.contains("metrics.jsonl line 2"), "{err}");
}

/// The index of voxel (z, y, x) in a 4 x 8 x 8 volume.
fn voxel(z: usize, y: usize, x: usize) -> usize {
    (z * 8 + y) * 8 + x
}

/// A 4 x 8 x 8 volume with distinct intensities and spacing 1 mm.
fn small_volume() -> (Vec<f32>, Grid) {
    let grid = Grid { shape: [4, 8, 8], spacing: [1.0; 3] };
    ((0..256).map(|i| ((i * 37) % 101) as f32).collect(), grid)
}

#[test]
fn views_have_the_physical_aspect_ratio() {
    // Extents: z 10 x 3 = 30 mm, y 20 x 1 = 20 mm, x 40 x 0.5 = 20 mm. The finest spacing (0.5) is divided by
    // ceil(256 / (30 / 0.5)) = 5, so a pixel is 0.1 mm.
    let grid = Grid { shape: [10, 20, 40], spacing: [3.0, 1.0, 0.5] };
    assert!((grid.pixel_mm() - 0.1).abs() < 1e-12);
    assert_eq!(grid.view_size(View::Axial), (200, 200));
    assert_eq!(grid.view_size(View::Coronal), (200, 300));
    assert_eq!(grid.view_size(View::Sagittal), (200, 300));
    let image = vec![0.0; 8000];
    let labels = vec![0; 8000];
    for view in View::ALL {
        let picture = draw_slice(&image, &labels, &grid, view, 3, (0.0, 1.0));
        assert_eq!((picture.width, picture.height), grid.view_size(view), "{view:?}");
    }
    // A large grid is not shrunk: 512 x 512 voxels of 0.7 mm stay 512 x 512 pixels.
    let ct = Grid { shape: [100, 512, 512], spacing: [3.0, 0.7, 0.7] };
    assert_eq!(ct.view_size(View::Axial), (512, 512));
    assert_eq!(ct.view_size(View::Coronal), (512, 429));
}

#[test]
fn an_empty_label_map_draws_the_grey_image_and_a_label_its_colour() {
    let (image, grid) = small_volume();
    let window = grey_window(&image);
    let empty = vec![0u8; 256];
    let grey = draw_slice(&image, &empty, &grid, View::Axial, 2, window);
    // 8 voxels become 256 pixels: each voxel is a 32 x 32 block. The grey of voxel (2, y, x) computed here directly.
    let scale = 256 / 8;
    for y in 0..grey.height {
        for x in 0..grey.width {
            let v = image[voxel(2, y / scale, x / scale)];
            let g = (((v - window.0) / (window.1 - window.0)).clamp(0.0, 1.0) * 255.0) as u8;
            assert_eq!(grey.get(x, y), [g; 3], "pixel ({x}, {y})");
        }
    }
    // Class 2 at voxel (2, 1, 3): only its block changes, to the half-way blend of grey and the class colour.
    let mut labels = empty.clone();
    labels[voxel(2, 1, 3)] = 2;
    let drawn = draw_slice(&image, &labels, &grid, View::Axial, 2, window);
    for y in 0..grey.height {
        for x in 0..grey.width {
            let inside = y / scale == 1 && x / scale == 3;
            let expected = if inside {
                let g = grey.get(x, y)[0] as f32;
                class_colour(2).map(|c| (0.5 * g + 0.5 * c as f32) as u8)
            } else {
                grey.get(x, y)
            };
            assert_eq!(drawn.get(x, y), expected, "pixel ({x}, {y})");
        }
    }
    // The coronal view has z upward: its top rows show the last slice.
    let coronal = draw_slice(&image, &labels, &grid, View::Coronal, 1, window);
    assert_eq!(coronal.get(3 * scale, 0), grey_at(&image, [3, 1, 3], window));
    assert_eq!(coronal.get(3 * scale, coronal.height - 1), grey_at(&image, [0, 1, 3], window));
}

fn grey_at(image: &[f32], [z, y, x]: [usize; 3], window: (f32, f32)) -> [u8; 3] {
    let v = image[voxel(z, y, x)];
    [(((v - window.0) / (window.1 - window.0)).clamp(0.0, 1.0) * 255.0) as u8; 3]
}

#[test]
fn the_grey_window_is_robust_to_outliers() {
    let mut image: Vec<f32> = (0..1000).map(|i| i as f32 / 999.0).collect();
    image[17] = 1e6;
    image[18] = f32::NAN;
    let (lo, hi) = grey_window(&image);
    assert!((0.0..0.01).contains(&lo) && (0.99..=1.0).contains(&hi), "({lo}, {hi})");
    assert_eq!(grey_window(&[5.0; 10]), (5.0, 6.0), "a flat image gets a window of width 1");
}

#[test]
fn centroids_and_case_pictures_cover_each_present_class() {
    let (image, grid) = small_volume();
    let mut reference = vec![0u8; 256];
    let mut prediction = vec![0u8; 256];
    reference[voxel(1, 2, 2)] = 1;
    reference[voxel(3, 2, 2)] = 1;
    prediction[voxel(2, 5, 6)] = 3;
    assert_eq!(centroid(&reference, grid.shape, 1), Some([2, 2, 2]));
    assert_eq!(centroid(&reference, grid.shape, 3), None);
    let names: Vec<String> = ["background", "liver", "kidneys", "spine"].map(String::from).to_vec();
    let maps = [("reference", &reference[..]), ("prediction", &prediction[..])];
    let dice = [Some(0.0), None, Some(0.0)];
    let overlay = CaseOverlay { case: "c1", image: &image, grid, maps: &maps, class_names: &names, dice: Some(&dice) };
    let dir = temp_dir("overlays");
    let paths = overlay.write(&dir).unwrap();
    let files: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(files, ["c1_class1.png", "c1_class3.png"]);
    let pictures = overlay.pictures().unwrap();
    for (path, (_, picture)) in paths.iter().zip(&pictures) {
        let (w, h, pixels) = decode_file(path);
        assert_eq!((w, h), (picture.width, picture.height));
        assert_eq!(pixels, picture.pixels);
        // Two columns of views side by side (axial 256 x 256, coronal and sagittal 256 x 128), three rows of views.
        let rows: usize = View::ALL.iter().map(|&v| grid.view_size(v).1).sum();
        assert!(w >= 2 * 256 && h >= rows && rows == 512, "{w} x {h}");
        assert!(pixels.chunks(3).any(|p| p == class_colour(1) || p == class_colour(3)), "legend swatches drawn");
    }
    // Different label maps give different pictures; no foreground at all gives one picture through the centre.
    assert_ne!(pictures[0].1, pictures[1].1);
    let empty = [("prediction", &[0u8; 256][..])];
    let none = CaseOverlay { maps: &empty, dice: None, ..overlay };
    let pictures = none.pictures().unwrap();
    assert_eq!(pictures.len(), 1);
    assert_eq!(pictures[0].0, "c1_center.png");
    // A label map that does not fill the grid is refused.
    let short = [("prediction", &[0u8; 255][..])];
    let err = CaseOverlay { maps: &short, ..none }.pictures().expect_err("must fail").to_string();
    assert!(err.contains("case c1") && err.contains("255"), "{err}");
}

/// Trains the micro model up to `epochs` epochs (validating on one phantom) into `dir`, resuming from its checkpoint
/// when there is one.
fn train_micro(dir: &Path, epochs: usize, class_names: &[&str]) {
    let mut cases = phantom_dataset(&SynthConfig { cases: 3, shape: [12, 20, 20], seed: 3 });
    for c in &mut cases {
        lkm_engine::data::normalize::normalize_case(c, &lkm_engine::data::normalize::Normalization::ZScore).unwrap();
    }
    let val = cases.split_off(2);
    let (model, init) = LkmUnet::new(common::micro_config(), 5).unwrap();
    let opts = TrainOptions { epochs, iters_per_epoch: 1, batch: 1, progress: false, ..TrainOptions::default() };
    let meta = serde_json::json!({ "class_names": class_names, "spacing": [1.5, 1.5, 1.5] });
    let start = match lkm_engine::train::checkpoint::load(&dir.join("latest.safetensors")) {
        Ok(ck) => Start {
            params: ck.params_like(&init).unwrap(),
            momentum: ck.momentum_like(&init),
            epoch: ck.meta["epoch"].as_u64().unwrap() as usize,
        },
        Err(_) => Start { params: init, momentum: Vec::new(), epoch: 0 },
    };
    let run = Run { model: &model, device: Device::Cpu, opts, out_dir: dir.to_path_buf(), meta };
    run.train(&cases, &val, start).unwrap();
}

/// Checks that `html` is one well-formed document (every element closed in order, void elements aside) and returns
/// the `src` of its images.
fn check_html(html: &str) -> Vec<String> {
    let body = html.strip_prefix("<!DOCTYPE html>\n").expect("a doctype first");
    const VOID: [&str; 3] = ["meta", "img", "br"];
    let mut open: Vec<String> = Vec::new();
    let mut sources = Vec::new();
    let mut rest = body;
    while let Some(start) = rest.find('<') {
        let end = start + rest[start..].find('>').expect("every tag is closed");
        let tag = &rest[start + 1..end];
        let name: String = tag.trim_start_matches('/').chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        assert!(!name.is_empty(), "a stray '<' in the text: {}", &rest[start..end.min(start + 40)]);
        if let Some(closing) = tag.strip_prefix('/') {
            assert_eq!(open.pop().as_deref(), Some(closing), "</{closing}> closes another element");
        } else if VOID.contains(&name.as_str()) {
            if let Some(src) = tag.split("src=\"").nth(1) {
                sources.push(src.split('"').next().unwrap().to_string());
            }
        } else {
            open.push(name);
        }
        rest = &rest[end + 1..];
    }
    assert!(open.is_empty(), "unclosed elements: {open:?}");
    assert!(html.contains("<html lang=\"en\">") && html.contains("<meta charset=\"utf-8\">"));
    sources
}

#[test]
fn training_writes_progress_png_and_the_report_embeds_curves_and_overlays() {
    let dir = temp_dir("run");
    train_micro(&dir, 2, &["background", "liver <1>", "kidneys & co", "spine"]);
    let (w, h, first) = decode_file(&dir.join("progress.png"));
    assert_eq!((w, h), PROGRESS_SIZE);
    assert_eq!(read_metrics(&dir.join("metrics.jsonl")).unwrap().len(), 2);
    let environment = std::fs::read_to_string(dir.join("environment.jsonl")).unwrap();
    assert!(environment.contains("\"device\":\"cpu\"") && environment.contains("\"precision\":\"float32\""));

    // An overlay in a subfolder of the run is embedded too.
    let (image, grid) = small_volume();
    let labels: Vec<u8> = (0..256).map(|i| (i % 7 == 0) as u8).collect();
    let maps = [("prediction", &labels[..])];
    let names = vec!["background".to_string(), "liver".to_string()];
    CaseOverlay { case: "c1", image: &image, grid, maps: &maps, class_names: &names, dice: None }
        .write(&dir.join("overlays"))
        .unwrap();

    let html = render_report(&dir).unwrap();
    let sources = check_html(&html);
    assert_eq!(sources.len(), 2, "the curves and one overlay");
    let sizes: Vec<(usize, usize)> = sources
        .iter()
        .map(|src| {
            let data = src.strip_prefix("data:image/png;base64,").expect("a PNG data URI");
            let (w, h, _) = decode(&base64::engine::general_purpose::STANDARD.decode(data).expect("base64"));
            (w, h)
        })
        .collect();
    assert_eq!(sizes[0], PROGRESS_SIZE);
    let (w, h, _) = decode_file(&dir.join("overlays/c1_class1.png"));
    assert_eq!(sizes[1], (w, h));
    for section in ["Configuration and plan", "Environment", "Curves", "Final validation metrics", "Epochs", "Overlays"]
    {
        assert!(html.contains(&format!("<h2>{section}</h2>")), "section {section} missing");
    }
    assert!(html.contains("liver &lt;1&gt;") && html.contains("kidneys &amp; co"), "class names escaped");
    assert!(html.contains("<td>patch</td>") && html.contains("<td>cpu</td>"), "configuration and environment");

    // Resumed, the run's progress.png is redrawn over both sessions, and each session's environment is kept.
    train_micro(&dir, 3, &["background", "liver <1>", "kidneys & co", "spine"]);
    assert_eq!(read_metrics(&dir.join("metrics.jsonl")).unwrap().len(), 3);
    let (_, _, resumed) = decode_file(&dir.join("progress.png"));
    assert_ne!(resumed, first, "progress.png must change with a new epoch");
    let environment = std::fs::read_to_string(dir.join("environment.jsonl")).unwrap();
    let starts: Vec<u64> = environment
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["first_epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(starts, [0, 2]);
}

#[test]
fn the_report_refuses_a_folder_that_is_not_a_run() {
    let dir = temp_dir("not-a-run");
    let err = render_report(&dir).expect_err("must fail").to_string();
    assert!(err.contains("not a run folder") && err.contains("not-a-run"), "{err}");
}

#[test]
fn prediction_and_evaluation_overlays_read_their_files_and_name_bad_ones() {
    let dir = temp_dir("files");
    let (image, grid) = small_volume();
    let header = header_for(grid.shape, [2.0, 1.0, 1.0]).unwrap();
    let mut labels = vec![0u8; 256];
    labels[voxel(1, 4, 4)] = 2;
    write_image(dir.join("img_0000.nii.gz"), &image, grid.shape, &header).unwrap();
    write_label(dir.join("img.nii.gz"), &labels, grid.shape, &header).unwrap();
    let names = vec!["background".to_string(), "liver".to_string(), "spine".to_string()];

    let written =
        write_prediction(&dir.join("pred"), "img", &dir.join("img_0000.nii.gz"), &dir.join("img.nii.gz"), &names)
            .unwrap();
    assert_eq!(written, [dir.join("pred/img_class2.png")]);
    // The spacing is read from the image: z is 2 mm, so the coronal and sagittal views are twice as tall as the voxel
    // counts alone would make them, and the picture is taller than with 1 mm voxels.
    let (_, tall, _) = decode_file(&written[0]);
    let (_, flat, _) = decode(
        &encode_png(
            &CaseOverlay {
                case: "img",
                image: &image,
                grid,
                maps: &[("prediction", &labels[..])],
                class_names: &names,
                dice: None,
            }
            .pictures()
            .unwrap()[0]
                .1,
        )
        .unwrap(),
    );
    assert!(tall > flat, "{tall} vs {flat}");

    let scores = CaseScores { case: "img".into(), dice: vec![None, Some(1.0)], nsd: vec![None, Some(1.0)] };
    let written = write_evaluation(&dir.join("eval"), &dir, grid.shape, [&labels, &labels], &scores, &names).unwrap();
    assert_eq!(written, [dir.join("eval/img_class2.png")]);
    decode_file(&written[0]);

    let missing = CaseScores { case: "other".into(), ..scores.clone() };
    let err = write_evaluation(&dir, &dir, grid.shape, [&labels, &labels], &missing, &names).expect_err("no image");
    assert!(err.to_string().contains("no image for case other"), "{err}");
    let err = write_evaluation(&dir, &dir, [4, 8, 9], [&labels, &labels], &scores, &names).expect_err("other shape");
    assert!(err.to_string().contains("img_0000.nii.gz") && err.to_string().contains("[4, 8, 9]"), "{err}");
}

#[test]
fn a_fresh_run_removes_the_pictures_and_environment_of_an_earlier_one() {
    let dir = temp_dir("fresh");
    train_micro(&dir, 1, &["background", "liver", "kidneys", "spine"]);
    let leftovers = ["progress.png", "environment.jsonl"].map(|f| dir.join(f));
    assert!(leftovers.iter().all(|p| p.is_file()));
    let run_dir = RunDir::lock(&dir).unwrap();
    run_dir.start_fresh(true).unwrap();
    assert!(leftovers.iter().all(|p| !p.exists()), "--overwrite leaves no picture or environment of the old run");
    // Without a checkpoint or metrics there is no run to protect: stray pictures go without --overwrite.
    std::fs::write(&leftovers[1], "{}\n").unwrap();
    run_dir.start_fresh(false).unwrap();
    assert!(!leftovers[1].exists());
}
