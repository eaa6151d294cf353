//! nnU-Net v2 raw datasets on disk.
//!
//! Layout of a dataset folder (the one nnU-Net calls `nnUNet_raw/Dataset001_Name`):
//!
//! ```text
//! dataset.json                  {"channel_names": {"0": "CT"},
//!                                "labels": {"background": 0, "liver": 1, ...},
//!                                "numTraining": N, "file_ending": ".nii.gz"}
//! imagesTr/{case}_{NNNN}.nii.gz one file per channel NNNN = 0000, 0001, ...
//! labelsTr/{case}.nii.gz        the label map of each training case, values 0..K-1
//! imagesTs/{case}_{NNNN}.nii.gz optional unlabelled test images
//! ```
//!
//! [`Dataset::open`] checks everything that can be checked without reading voxels (dataset.json keys, label values
//! 0..K-1 with background 0, numTraining against the files, every channel and label file present), so that a broken
//! dataset fails at once with a message naming the file or key, not hours into training. [`Dataset::load_case`]
//! checks what needs the voxels (shapes, spacings, label values).
//!
//! Not supported (each is a clear error): region-based labels (a label mapped to a list of values), the "ignore"
//! label, and the v1 `training`/`test` file lists in place of the folder layout.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::nifti::{header_for, read_volume, write_image, write_label};
use super::Case;
use crate::{bail, ensure, Error, Result};

/// An opened and validated nnU-Net v2 raw dataset folder.
#[derive(Clone, Debug)]
pub struct Dataset {
    root: PathBuf,
    channel_names: Vec<String>,
    label_names: Vec<String>,
    file_ending: String,
    training: Vec<String>,
    test: Vec<String>,
}

/// Relative agreement required between the spacings of a case's files.
const SPACING_RTOL: f64 = 1e-3;

impl Dataset {
    /// Opens `dir`, reads and validates `dataset.json`, and lists the training and test cases (sorted by name).
    pub fn open(dir: impl AsRef<Path>) -> Result<Dataset> {
        let root = dir.as_ref().to_path_buf();
        ensure!(root.is_dir(), Data, "{}: no such dataset folder", root.display());
        let json_path = root.join("dataset.json");
        let jp = json_path.display().to_string();
        let text = fs::read(&json_path).map_err(|e| Error::Io(format!("{jp}: {e}")))?;
        let DatasetJson { channel_names, label_names, num_training, file_ending, has_v1_file_list } =
            DatasetJson::parse(&text, &jp)?;
        ensure!(
            !has_v1_file_list || root.join("imagesTr").is_dir(),
            Data,
            "{jp}: has a \"training\" file list (nnU-Net v1) but no imagesTr folder; convert the dataset to the v2 \
             layout (nnUNetv2_convert_old_nnUNet_dataset)"
        );

        let channels = channel_names.len();
        let images_tr = root.join("imagesTr");
        let labels_tr = root.join("labelsTr");
        ensure!(images_tr.is_dir(), Data, "{}: missing folder (the training images)", images_tr.display());
        ensure!(labels_tr.is_dir(), Data, "{}: missing folder (the training labels)", labels_tr.display());
        let training = list_image_cases(&images_tr, &file_ending, channels)?;
        if training.is_empty() {
            if let Some(other) = list_files(&images_tr, "")?.first() {
                bail!(
                    Data,
                    "{jp}: \"file_ending\" is \"{file_ending}\" but no file in {} ends in it (it holds e.g. {other}); \
                     set \"file_ending\" to the files' ending (\".nii.gz\" or \".nii\")",
                    images_tr.display()
                );
            }
        }
        let label_cases = list_label_cases(&labels_tr, &file_ending)?;
        for case in &training {
            let label = labels_tr.join(format!("{case}{file_ending}"));
            ensure!(
                label_cases.contains(case),
                Data,
                "{}: missing label file for training case \"{case}\"",
                label.display()
            );
        }
        for case in &label_cases {
            ensure!(
                training.contains(case),
                Data,
                "{}: missing image for the label file {}",
                images_tr.join(format!("{case}_0000{file_ending}")).display(),
                labels_tr.join(format!("{case}{file_ending}")).display()
            );
        }
        ensure!(
            training.len() == num_training,
            Data,
            "{jp}: \"numTraining\" is {num_training} but {} holds {} training cases",
            images_tr.display(),
            training.len()
        );

        let images_ts = root.join("imagesTs");
        let test =
            if images_ts.is_dir() { list_image_cases(&images_ts, &file_ending, channels)? } else { BTreeSet::new() };

        Ok(Dataset {
            root,
            channel_names,
            label_names,
            file_ending,
            training: training.into_iter().collect(),
            test: test.into_iter().collect(),
        })
    }

    /// The dataset folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Names of the training cases (those with a label map), sorted.
    pub fn training_cases(&self) -> &[String] {
        &self.training
    }

    /// Names of the test cases in `imagesTs` (empty when there is no such folder), sorted.
    pub fn test_cases(&self) -> &[String] {
        &self.test
    }

    /// Number of classes K, background included; label values are 0..K-1.
    pub fn num_classes(&self) -> usize {
        self.label_names.len()
    }

    /// Class names indexed by label value (`label_names()[0] == "background"`).
    pub fn label_names(&self) -> &[String] {
        &self.label_names
    }

    /// Channel (modality) names indexed by channel number.
    pub fn channel_names(&self) -> &[String] {
        &self.channel_names
    }

    /// "CT" when channel 0 is named CT (any case), which selects the CT normalisation; otherwise channel 0's name.
    pub fn modality(&self) -> &str {
        let c0 = self.channel_names[0].as_str();
        if c0.eq_ignore_ascii_case("ct") {
            "CT"
        } else {
            c0
        }
    }

    /// The file ending of every image and label file (".nii.gz" or ".nii").
    pub fn file_ending(&self) -> &str {
        &self.file_ending
    }

    /// The image files of a case, one per channel (from `imagesTr` for training cases, `imagesTs` for test cases).
    pub fn image_paths(&self, case: &str) -> Result<Vec<PathBuf>> {
        let folder = if self.training.iter().any(|c| c == case) {
            "imagesTr"
        } else if self.test.iter().any(|c| c == case) {
            "imagesTs"
        } else {
            bail!(
                Config,
                "{}: no case named \"{case}\" ({} training and {} test cases)",
                self.root.display(),
                self.training.len(),
                self.test.len()
            )
        };
        Ok((0..self.channel_names.len())
            .map(|c| self.root.join(folder).join(format!("{case}_{c:04}{}", self.file_ending)))
            .collect())
    }

    /// The label file of a training case; `None` for test cases (and unknown names).
    pub fn label_path(&self, case: &str) -> Option<PathBuf> {
        self.training
            .iter()
            .any(|c| c == case)
            .then(|| self.root.join("labelsTr").join(format!("{case}{}", self.file_ending)))
    }

    /// Loads a case: its channels stacked (channel-major) and, for a training case, its label map. Checks that all
    /// files share one shape and (within 1e-3 relative) one spacing, and that label values are below K.
    pub fn load_case(&self, name: &str) -> Result<Case> {
        Ok(self.load_case_with_header(name)?.0)
    }

    /// Like [`Dataset::load_case`], also returning the header of channel 0, with which a prediction for this case is
    /// written back on its grid ([`write_label`]).
    pub fn load_case_with_header(&self, name: &str) -> Result<(Case, ::nifti::NiftiHeader)> {
        let paths = self.image_paths(name)?;
        let mut image = Vec::new();
        let mut first: Option<super::nifti::NiftiVolume> = None;
        for path in &paths {
            let vol = read_volume(path)?;
            if let Some(f) = &first {
                check_same_grid(f, &vol)?;
            } else {
                image.reserve(vol.data.len() * paths.len());
            }
            image.extend_from_slice(&vol.data);
            if first.is_none() {
                first = Some(super::nifti::NiftiVolume { data: Vec::new(), ..vol });
            }
        }
        let first = first.ok_or_else(|| Error::Data(format!("case \"{name}\" has no channels")))?;
        let label = match self.label_path(name) {
            None => None,
            Some(path) => {
                let vol = read_volume(&path)?;
                check_same_grid(&first, &vol)?;
                let labels = vol.to_labels()?;
                let k = self.num_classes();
                if let Some(i) = labels.iter().position(|&v| v as usize >= k) {
                    let (h, w) = (vol.shape[1], vol.shape[2]);
                    bail!(
                        Data,
                        "{}: label value {} at voxel (d, h, w) = ({}, {}, {}) is not below the {k} classes declared \
                         in dataset.json ({:?})",
                        path.display(),
                        labels[i],
                        i / (h * w),
                        (i / w) % h,
                        i % w,
                        self.label_names
                    );
                }
                Some(labels)
            }
        };
        let case = Case {
            name: name.to_string(),
            image,
            channels: paths.len(),
            shape: first.shape,
            label,
            spacing: first.spacing,
        };
        Ok((case, first.header))
    }
}

/// What `dataset.json` declares, parsed and checked without looking at the folder.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetJson {
    /// Channel names indexed by channel number.
    pub channel_names: Vec<String>,
    /// Class names indexed by label value, background first.
    pub label_names: Vec<String>,
    /// The declared number of training cases.
    pub num_training: usize,
    /// ".nii.gz" or ".nii".
    pub file_ending: String,
    /// Whether it has nnU-Net v1's `training` file list.
    pub has_v1_file_list: bool,
}

impl DatasetJson {
    /// Parses the bytes of a `dataset.json`; `jp` names the file in messages.
    pub fn parse(bytes: &[u8], jp: &str) -> Result<DatasetJson> {
        let json: Value =
            serde_json::from_slice(bytes).map_err(|e| Error::Data(format!("{jp}: not valid JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| Error::Data(format!("{jp}: the top level must be a JSON object")))?;
        let channel_names = parse_channel_names(obj, jp)?;
        let label_names = parse_labels(obj, jp)?;
        let num_training = match obj.get("numTraining") {
            None => bail!(Data, "{jp}: missing key \"numTraining\" (the number of training cases)"),
            Some(v) => v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                Error::Data(format!("{jp}: \"numTraining\" must be a non-negative integer, found {v}"))
            })?,
        };
        let file_ending = match obj.get("file_ending") {
            None => bail!(Data, "{jp}: missing key \"file_ending\" (\".nii.gz\" or \".nii\")"),
            Some(Value::String(s)) if s == ".nii.gz" || s == ".nii" => s.clone(),
            Some(v) => {
                bail!(Data, "{jp}: \"file_ending\" is {v}; only \".nii.gz\" and \".nii\" (NIfTI) are supported")
            }
        };
        let has_v1_file_list = obj.get("training").is_some();
        Ok(DatasetJson { channel_names, label_names, num_training, file_ending, has_v1_file_list })
    }
}

/// Two files of one case (channels, label, prediction) must describe the same grid: equal shapes, and spacings that
/// agree within 1e-3 relative.
pub fn check_same_grid(a: &super::nifti::NiftiVolume, b: &super::nifti::NiftiVolume) -> Result<()> {
    ensure!(
        a.shape == b.shape,
        Data,
        "{} has shape [D, H, W] = {:?} but {} has shape {:?}; the files of one case must share one grid",
        b.path.display(),
        b.shape,
        a.path.display(),
        a.shape
    );
    let close = a.spacing.iter().zip(&b.spacing).all(|(&x, &y)| (x - y).abs() <= SPACING_RTOL * x.abs().max(y.abs()));
    ensure!(
        close,
        Data,
        "{} has spacing [z, y, x] = {:?} mm but {} has {:?} mm (they must agree within {SPACING_RTOL} relative)",
        b.path.display(),
        b.spacing,
        a.path.display(),
        a.spacing
    );
    Ok(())
}

/// `channel_names` (or the v1 name `modality`): {"0": "CT", "1": "..."} with keys 0..C-1.
fn parse_channel_names(obj: &serde_json::Map<String, Value>, jp: &str) -> Result<Vec<String>> {
    let (key, value) = match (obj.get("channel_names"), obj.get("modality")) {
        (Some(v), _) => ("channel_names", v),
        (None, Some(v)) => ("modality", v),
        (None, None) => bail!(Data, "{jp}: missing key \"channel_names\" (e.g. \"channel_names\": {{\"0\": \"CT\"}})"),
    };
    let map = value
        .as_object()
        .ok_or_else(|| Error::Data(format!("{jp}: \"{key}\" must be an object like {{\"0\": \"CT\"}}")))?;
    let mut by_index = BTreeMap::new();
    for (k, v) in map {
        let idx: usize = k.trim().parse().map_err(|_| {
            Error::Data(format!("{jp}: \"{key}\" has key \"{k}\"; keys must be channel numbers \"0\", \"1\", ..."))
        })?;
        let name =
            v.as_str().ok_or_else(|| Error::Data(format!("{jp}: \"{key}\"[\"{k}\"] must be a string, found {v}")))?;
        let _ = by_index.insert(idx, name.to_string());
    }
    ensure!(!by_index.is_empty(), Data, "{jp}: \"{key}\" is empty; at least channel \"0\" is needed");
    let n = by_index.len();
    ensure!(
        by_index.keys().copied().eq(0..n),
        Data,
        "{jp}: \"{key}\" keys are {:?}; they must be 0..{} without gaps",
        by_index.keys().collect::<Vec<_>>(),
        n - 1
    );
    Ok(by_index.into_values().collect())
}

/// `labels`: {"background": 0, "name": 1, ...}; returns names indexed by value after checking that the values are
/// 0..K-1, each once, with "background" = 0.
fn parse_labels(obj: &serde_json::Map<String, Value>, jp: &str) -> Result<Vec<String>> {
    let map = match obj.get("labels") {
        None => bail!(Data, "{jp}: missing key \"labels\" (e.g. \"labels\": {{\"background\": 0, \"liver\": 1}})"),
        Some(Value::Object(m)) => m,
        Some(v) => bail!(Data, "{jp}: \"labels\" must be an object of name: value, found {v}"),
    };
    let mut pairs = Vec::with_capacity(map.len());
    for (name, v) in map {
        ensure!(
            !name.eq_ignore_ascii_case("ignore"),
            Data,
            "{jp}: label \"{name}\": the nnU-Net \"ignore\" label (sparse annotation) is not supported"
        );
        let value = match v {
            Value::Array(_) => bail!(
                Data,
                "{jp}: label \"{name}\" maps to {v}: region-based labels are not supported; give each class one \
                 value"
            ),
            v => v.as_u64().filter(|&x| x <= 255).ok_or_else(|| {
                Error::Data(format!("{jp}: label \"{name}\" has value {v}; values must be integers 0..=255"))
            })?,
        };
        pairs.push((name.as_str(), value as u8));
    }
    validate_labels(&pairs).map_err(|m| Error::Data(format!("{jp}: \"labels\": {m}")))
}

/// Label names indexed by value, or why the (name, value) list is not 0..K-1 consecutive with background 0.
fn validate_labels(pairs: &[(&str, u8)]) -> std::result::Result<Vec<String>, String> {
    let k = pairs.len();
    if k < 2 {
        return Err(format!("{k} label(s) given; need \"background\": 0 and at least one class"));
    }
    match pairs.iter().find(|(n, _)| *n == "background") {
        None => return Err("no \"background\" label (it must exist and be 0)".into()),
        Some((_, v)) if *v != 0 => return Err(format!("\"background\" is {v}; it must be 0")),
        _ => {}
    }
    let mut names = vec![None; k];
    for &(name, v) in pairs {
        let slot = names.get_mut(v as usize).ok_or_else(|| {
            format!("label \"{name}\" has value {v}, but with {k} labels the values must be 0..{}", k - 1)
        })?;
        if let Some(other) = slot {
            return Err(format!("labels \"{other}\" and \"{name}\" share the value {v}"));
        }
        *slot = Some(name.to_string());
    }
    // k names into k slots with no collision and none out of range: every value 0..K-1 is taken.
    Ok(names.into_iter().map(|n| n.unwrap_or_default()).collect())
}

/// File names in `dir` ending in `ending`, without hidden files (`.name`, macOS `._name`), sorted.
fn list_files(dir: &Path, ending: &str) -> Result<Vec<String>> {
    let io = |e: std::io::Error| Error::Io(format!("{}: {e}", dir.display()));
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let name = utf8_name(&entry.map_err(io)?.path())?;
        if name.ends_with(ending) && !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The file name of `path` as UTF-8; case names are text, so any other name is an error naming the file.
pub fn utf8_name(path: &Path) -> Result<String> {
    let name = path.file_name().unwrap_or_default();
    name.to_str().map(str::to_string).ok_or_else(|| {
        Error::Data(format!(
            "{}: the file name is not valid UTF-8 (its undecodable bytes are shown as U+FFFD); rename it",
            path.display()
        ))
    })
}

/// Cases of an images folder (`{case}_{NNNN}{ending}`), each with exactly the channels 0..C-1.
fn list_image_cases(dir: &Path, ending: &str, channels: usize) -> Result<BTreeSet<String>> {
    let mut found: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for name in list_files(dir, ending)? {
        let stem = &name[..name.len() - ending.len()];
        let split = stem.len().checked_sub(5).filter(|&i| stem.is_char_boundary(i));
        let parsed = split.and_then(|i| {
            let (case, suffix) = stem.split_at(i);
            let digits = suffix.strip_prefix('_')?;
            (digits.len() == 4 && digits.bytes().all(|b| b.is_ascii_digit()) && !case.is_empty())
                .then(|| (case.to_string(), digits.parse::<usize>().unwrap_or(usize::MAX)))
        });
        let (case, channel) = parsed.ok_or_else(|| {
            Error::Data(format!(
                "{}: image file names must be {{case}}_{{NNNN}}{ending} with a 4-digit channel number",
                dir.join(&name).display()
            ))
        })?;
        ensure!(
            channel < channels,
            Data,
            "{}: channel {channel}, but dataset.json declares {channels} channel(s)",
            dir.join(&name).display()
        );
        let _ = found.entry(case).or_default().insert(channel);
    }
    for (case, chans) in &found {
        if let Some(missing) = (0..channels).find(|c| !chans.contains(c)) {
            bail!(
                Data,
                "{}: missing channel {missing} of case \"{case}\" (dataset.json declares {channels} channel(s))",
                dir.join(format!("{case}_{missing:04}{ending}")).display()
            );
        }
    }
    Ok(found.into_keys().collect())
}

/// Cases of a labels folder (`{case}{ending}`).
fn list_label_cases(dir: &Path, ending: &str) -> Result<BTreeSet<String>> {
    Ok(list_files(dir, ending)?.into_iter().map(|n| n[..n.len() - ending.len()].to_string()).collect())
}

/// Writes `cases` as an nnU-Net v2 raw dataset in `dir` (created; it must not exist or be empty): labelled cases go
/// to `imagesTr`/`labelsTr`, unlabelled ones to `imagesTs`, all as `.nii.gz` (images float32, labels uint8) with
/// an axis-aligned header of the case's spacing, and `dataset.json` from `labels` (name, value) and
/// `channel_names`.
pub fn write_dataset(
    dir: impl AsRef<Path>,
    cases: &[Case],
    labels: &[(&str, u8)],
    channel_names: &[&str],
) -> Result<()> {
    let dir = dir.as_ref();
    let d = dir.display();
    let names = validate_labels(labels).map_err(|m| Error::Config(format!("write_dataset({d}): labels: {m}")))?;
    ensure!(!channel_names.is_empty(), Config, "write_dataset({d}): at least one channel name is needed");
    let mut seen = BTreeSet::new();
    for case in cases {
        let n = case.voxels();
        let c = &case.name;
        ensure!(
            !c.is_empty() && !c.contains(['/', '\\']) && seen.insert(c.as_str()),
            Config,
            "write_dataset({d}): case name \"{c}\" is empty, contains a path separator or is repeated"
        );
        ensure!(
            case.channels == channel_names.len() && case.image.len() == case.channels * n,
            Shape,
            "write_dataset({d}): case \"{c}\" has {} channel(s) and {} image values for shape {:?}; expected {} \
             channel(s) ({channel_names:?})",
            case.channels,
            case.image.len(),
            case.shape,
            channel_names.len()
        );
        if let Some(label) = &case.label {
            ensure!(
                label.len() == n,
                Shape,
                "write_dataset({d}): case \"{c}\" has {} label values for shape {:?} ({n} voxels)",
                label.len(),
                case.shape
            );
            if let Some(&v) = label.iter().find(|&&v| v as usize >= names.len()) {
                bail!(
                    Config,
                    "write_dataset({d}): case \"{c}\" has label value {v}, but only {} labels are declared",
                    names.len()
                );
            }
        }
    }
    if dir.exists() {
        let empty = fs::read_dir(dir).map_err(|e| Error::Io(format!("{d}: {e}")))?.next().is_none();
        ensure!(
            empty,
            Config,
            "write_dataset: {d} exists and is not empty; choose a new folder (nothing is overwritten)"
        );
    }
    // Written into a hidden sibling folder and renamed at the end, so that a failure leaves nothing behind (a
    // half-written folder would make the retry fail as "not empty").
    let name = dir.file_name().ok_or_else(|| Error::Config(format!("write_dataset: {d} is not a folder name")))?;
    let staging = dir.with_file_name(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let written = write_dataset_files(&staging, &name.to_string_lossy(), cases, labels, channel_names).and_then(|()| {
        if dir.exists() {
            fs::remove_dir(dir).map_err(|e| Error::Io(format!("{d}: {e}")))?;
        }
        fs::rename(&staging, dir).map_err(|e| Error::Io(format!("renaming {} to {d}: {e}", staging.display())))
    });
    if written.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    written
}

/// The files of [`write_dataset`], written into `dir`; `name` is the dataset's name in dataset.json.
fn write_dataset_files(
    dir: &Path,
    name: &str,
    cases: &[Case],
    labels: &[(&str, u8)],
    channel_names: &[&str],
) -> Result<()> {
    let mkdir = |sub: &str| {
        let p = dir.join(sub);
        fs::create_dir_all(&p).map_err(|e| Error::Io(format!("{}: {e}", p.display())))?;
        Ok::<PathBuf, Error>(p)
    };
    let images_tr = mkdir("imagesTr")?;
    let labels_tr = mkdir("labelsTr")?;
    let images_ts = if cases.iter().any(|c| c.label.is_none()) { Some(mkdir("imagesTs")?) } else { None };

    let ending = ".nii.gz";
    let mut num_training = 0usize;
    for case in cases {
        let header = header_for(case.shape, case.spacing)?;
        let n = case.voxels();
        let folder = match &case.label {
            Some(label) => {
                write_label(labels_tr.join(format!("{}{ending}", case.name)), label, case.shape, &header)?;
                num_training += 1;
                &images_tr
            }
            None => images_ts.as_ref().unwrap_or(&images_tr),
        };
        for (c, chunk) in case.image.chunks(n).enumerate() {
            write_image(folder.join(format!("{}_{c:04}{ending}", case.name)), chunk, case.shape, &header)?;
        }
    }

    let channel_json: serde_json::Map<String, Value> =
        channel_names.iter().enumerate().map(|(i, n)| (i.to_string(), Value::from(*n))).collect();
    let label_json: serde_json::Map<String, Value> =
        labels.iter().map(|(n, v)| (n.to_string(), Value::from(*v))).collect();
    let json = serde_json::json!({
        "channel_names": channel_json,
        "labels": label_json,
        "numTraining": num_training,
        "file_ending": ending,
        "name": name,
        "description": "written by lkm-engine",
    });
    let path = dir.join("dataset.json");
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    fs::write(&path, text + "\n").map_err(|e| Error::Io(format!("{}: {e}", path.display())))
}
