//! Segmenting NIfTI files with a trained checkpoint: read the channels, crop them to their nonzero region, bring them
//! to the training spacing, normalise as in training, predict by sliding window, bring the labels back to the cropped
//! grid (nearest), put them into a full-size map (background outside the crop) and write it with the input's header,
//! so the output overlays the input in any viewer.
//!
//! From training to a label map on disk: one iteration of the tiny model writes a checkpoint, which then segments a
//! NIfTI image whose slices are twice as thick as the training data's (so the image is resampled for the network
//! and the labels back to the image's grid).
//!
//! ```
//! use lkm_engine::data::nifti::{header_for, read_volume, write_image};
//! use lkm_engine::data::synth::{phantom_case, SynthConfig, PHANTOM_SPACING};
//! use lkm_engine::device::Device;
//! use lkm_engine::nn::{LkmUnet, ModelConfig};
//! use lkm_engine::predict::{input_cases, Predictor};
//! use lkm_engine::train::prepare;
//! use lkm_engine::train::trainer::{Run, Start, TrainOptions};
//!
//! # fn main() -> lkm_engine::Result<()> {
//! let dir = std::env::temp_dir().join(format!("lkm-doc-predict-{}", std::process::id()));
//! let phantoms = SynthConfig { cases: 2, shape: [20, 20, 20], seed: 1 };
//! let data = prepare::synthetic(&phantoms, 0.0)?; // CT-normalised, all cases train
//! let mut config = ModelConfig::tiny_3d();
//! config.patch = vec![16, 16, 16];
//! let (model, params) = LkmUnet::new(config, 0)?;
//! let opts = TrainOptions { epochs: 1, iters_per_epoch: 1, batch: 1, progress: false, ..TrainOptions::default() };
//! let run = Run { model: &model, device: Device::Cpu, opts, out_dir: dir.clone(), meta: data.meta() };
//! run.train(&data.train, &data.val, Start { params, momentum: Vec::new(), epoch: 0 })?;
//!
//! // A new image in HU, with 3 mm slices where training had 1.5 mm.
//! let case = phantom_case(7, &phantoms);
//! let spacing = [2.0 * PHANTOM_SPACING[0], PHANTOM_SPACING[1], PHANTOM_SPACING[2]];
//! std::fs::create_dir_all(dir.join("images")).expect("a temporary folder");
//! write_image(dir.join("images/ct_0000.nii.gz"), &case.image, case.shape, &header_for(case.shape, spacing)?)?;
//!
//! let predictor = Predictor::from_checkpoint(&dir.join("latest.safetensors"), Device::Cpu, false)?;
//! for (name, files) in input_cases(&dir.join("images"))? {
//!     let out = predictor.predict_files(&name, &files, &dir.join("pred"))?;
//!     assert_eq!(out, dir.join("pred/ct.nii.gz"));
//!     let labels = read_volume(&out)?;
//!     assert_eq!((labels.shape, labels.spacing), (case.shape, spacing)); // the input's grid
//!     assert!(labels.to_labels()?.iter().all(|&l| l < 4));
//! }
//! std::fs::remove_dir_all(&dir).expect("cleanup");
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use crate::data::crop::{crop_to_nonzero, uncrop_labels};
use crate::data::dataset::{check_same_grid, utf8_name};
use crate::data::nifti::{read_volume, write_label};
use crate::data::normalize::{normalize_case, Normalization};
use crate::data::resample::{needs_resampling, resample_case, resample_nearest};
use crate::data::Case;
use crate::device::Device;
use crate::infer::{predict_labels, InferConfig};
use crate::nn::{LkmUnet, ModelConfig, Params};
use crate::plan::Plan;
use crate::tensor::DType;
use crate::train::checkpoint;
use crate::{bail, ensure, Error, Result};

/// A trained model ready to segment files.
pub struct Predictor {
    /// The network.
    pub model: LkmUnet,
    params: Params,
    device: Device,
    normalization: Normalization,
    spacing: [f64; 3],
    plan: Option<Plan>,
    /// Class names, background first (empty for checkpoints without them).
    pub class_names: Vec<String>,
    /// Sliding-window settings.
    pub infer: InferConfig,
}

impl Predictor {
    /// Loads a checkpoint written by `lkm-engine train` onto `device`.
    pub fn from_checkpoint(path: &Path, device: Device, mirror: bool) -> Result<Predictor> {
        let ck = checkpoint::load(path)?;
        let bad = |what: &str, e: String| {
            Error::Data(format!("{}: {what} missing or invalid in the checkpoint: {e}", path.display()))
        };
        let config: ModelConfig =
            serde_json::from_value(ck.meta["config"].clone()).map_err(|e| bad("model config", e.to_string()))?;
        let run = &ck.meta["run"];
        let normalization =
            Normalization::from_json(&run["normalization"]).map_err(|e| bad("normalisation", e.to_string()))?;
        let spacing: [f64; 3] =
            serde_json::from_value(run["spacing"].clone()).map_err(|e| bad("training spacing", e.to_string()))?;
        let plan: Option<Plan> = serde_json::from_value(run["plan"].clone()).map_err(|e| bad("plan", e.to_string()))?;
        let (model, fresh) = LkmUnet::new(config, 0)?;
        let params = ck.params_like(&fresh)?.to(DType::F32, &device)?;
        let infer = InferConfig { mirror, ..InferConfig::for_model(&model.config) };
        let class_names = crate::viz::class_names(run);
        Ok(Predictor { model, params, device, normalization, spacing, plan, class_names, infer })
    }

    /// Segments the case made of `files` (one per channel, same grid) and writes `output_dir/<name>.nii.gz`.
    pub fn predict_files(&self, name: &str, files: &[PathBuf], output_dir: &Path) -> Result<PathBuf> {
        if files.len() != self.model.config.in_channels {
            bail!(
                Data,
                "case {name}: {} channel file(s) but the model takes {}",
                files.len(),
                self.model.config.in_channels
            );
        }
        let volumes = files.iter().map(read_volume).collect::<Result<Vec<_>>>()?;
        let first = &volumes[0];
        for v in &volumes[1..] {
            check_same_grid(first, v)?;
        }
        let case = Case {
            name: name.to_string(),
            image: volumes.iter().flat_map(|v| v.data.iter().copied()).collect(),
            channels: volumes.len(),
            shape: first.shape,
            label: None,
            spacing: first.spacing,
        };
        let (cropped, bbox) = crop_to_nonzero(&case)?;
        let target = self.plan.as_ref().map_or(self.spacing, |p| p.target_spacing_for(case.spacing));
        let mut work =
            if needs_resampling(case.spacing, target) { resample_case(&cropped, target)? } else { cropped.clone() };
        normalize_case(&mut work, &self.normalization)?;
        let labels = predict_labels(
            &self.model,
            &self.params,
            &self.device,
            &work.image,
            work.channels,
            work.shape,
            &self.infer,
        )?;
        let labels = uncrop_labels(&resample_nearest(&labels, work.shape, cropped.shape), &bbox, case.shape);
        std::fs::create_dir_all(output_dir)
            .map_err(|e| Error::Io(format!("creating {}: {e}", output_dir.display())))?;
        let out = output_dir.join(format!("{name}.nii.gz"));
        write_label(&out, &labels, case.shape, &first.header)?;
        Ok(out)
    }
}

/// Groups the NIfTI files of `input` (a file or a folder) into cases: `NAME_NNNN.nii[.gz]` files are the channels
/// of case NAME (nnU-Net naming); any other file is a one-channel case named by its stem.
pub fn input_cases(input: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let files = if input.is_dir() {
        nifti_files(input)?
    } else {
        ensure!(input.exists(), Config, "--input {}: no such file or folder", input.display());
        let stem = nifti_stem(&utf8_name(input)?)
            .ok_or_else(|| Error::Data(format!("{}: not a .nii or .nii.gz file", input.display())))?;
        vec![(stem, input.to_path_buf())]
    };
    let mut cases: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for (stem, f) in files {
        let case = match stem.rsplit_once('_') {
            Some((c, ch)) if ch.len() == 4 && ch.chars().all(|d| d.is_ascii_digit()) => c.to_string(),
            _ => stem,
        };
        match cases.iter_mut().find(|(c, _)| *c == case) {
            Some((_, v)) => v.push(f),
            None => cases.push((case, vec![f])),
        }
    }
    ensure!(!cases.is_empty(), Data, "{}: no .nii or .nii.gz images found", input.display());
    Ok(cases)
}

/// Refuses an `output` folder where writing predictions could destroy inputs: an existing file, or the folder that
/// holds input files (a prediction `CASE.nii.gz` has the name of a one-channel input).
pub fn check_output(cases: &[(String, Vec<PathBuf>)], output: &Path) -> Result<()> {
    if !output.exists() {
        return Ok(());
    }
    ensure!(output.is_dir(), Config, "--output {}: exists and is not a folder", output.display());
    let canonical = |p: &Path| p.canonicalize().map_err(|e| Error::Io(format!("{}: {e}", p.display())));
    let out = canonical(output)?;
    for file in cases.iter().flat_map(|(_, files)| files) {
        let folder = canonical(file)?.parent().map(Path::to_path_buf);
        ensure!(
            folder.as_deref() != Some(out.as_path()),
            Config,
            "--output {} holds the input {}; predictions must go to another folder (inputs are never overwritten)",
            output.display(),
            file.display()
        );
    }
    Ok(())
}

/// Pairs every reference label map in the folder `reference` (one file per case, named by the case) with the
/// prediction of the same case name in `pred` (`.nii.gz` or `.nii`). Reference cases without a prediction are an
/// error listing them all; predictions without a reference are not scored.
pub fn pair_labels(pred: &Path, reference: &Path) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    ensure!(reference.is_dir(), Config, "--ref {}: no such folder", reference.display());
    ensure!(pred.is_dir(), Config, "--pred {}: no such folder", pred.display());
    let predictions = nifti_files(pred)?;
    let mut pairs = Vec::new();
    let mut missing = Vec::new();
    for (case, r) in nifti_files(reference)? {
        let matches: Vec<&PathBuf> = predictions.iter().filter(|(c, _)| *c == case).map(|(_, p)| p).collect();
        match matches[..] {
            [p] => pairs.push((case, p.clone(), r)),
            [] => missing.push(case),
            _ => bail!(Data, "{}: case {case} has predictions {matches:?}; keep one", pred.display()),
        }
    }
    ensure!(
        missing.is_empty(),
        Data,
        "{}: no prediction for {} of the {} reference case(s) in {}: {}",
        pred.display(),
        missing.len(),
        missing.len() + pairs.len(),
        reference.display(),
        missing.join(", ")
    );
    ensure!(!pairs.is_empty(), Data, "--ref {}: no .nii or .nii.gz label maps found", reference.display());
    Ok(pairs)
}

/// The NIfTI files of `dir` with their stems, sorted; hidden files (temporaries, macOS `._` files) are skipped.
fn nifti_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let io = |e: std::io::Error| Error::Io(format!("{}: {e}", dir.display()));
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = utf8_name(&path)?;
        if let Some(stem) = nifti_stem(&name).filter(|_| !name.starts_with('.')) {
            files.push((stem, path));
        }
    }
    files.sort();
    Ok(files)
}

/// The file name without `.nii.gz` or `.nii`; `None` for other files.
fn nifti_stem(name: &str) -> Option<String> {
    name.strip_suffix(".nii.gz").or_else(|| name.strip_suffix(".nii")).map(str::to_string)
}
