//! The dataset layer: NIfTI reading and writing, nnU-Net raw datasets, normalisation and resampling.
//!
//! Expected values for the real CT fixture (tests/fixtures/ct-chest) were read independently with Python's gzip and
//! struct modules from the raw header and voxel bytes.

use std::fs;
use std::path::{Path, PathBuf};

use lkm_engine::data::dataset::{write_dataset, Dataset};
use lkm_engine::data::nifti::{header_for, read_volume, write_image, write_label};
use lkm_engine::data::normalize::{normalize_case, CtStats, Normalization};
use lkm_engine::data::resample::{median_spacing, needs_resampling, resample_case, resampled_shape};
use lkm_engine::data::Case;
use lkm_engine::Error;

mod common;
use common::assert_close;

/// A fresh empty folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("lkm-data-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ct-chest").join(name)
}

/// The message of an error, asserting its kind.
fn data_err<T: std::fmt::Debug>(r: lkm_engine::Result<T>) -> String {
    match r {
        Err(Error::Data(m)) => m,
        other => panic!("expected Error::Data, got {other:?}"),
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} should mention {p:?}");
    }
}

/// A small deterministic pseudo-random generator (no dependency on the engine's RNG in these checks).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn synthetic_case(name: &str, shape: [usize; 3], channels: usize, k: u8, seed: u64) -> Case {
    let n: usize = shape.iter().product();
    let mut rng = Lcg(seed);
    let image = (0..channels * n).map(|_| (rng.next() * 200.0 - 100.0) as f32).collect();
    let label = (0..n).map(|_| (rng.next() * k as f64) as u8).collect();
    Case { name: name.into(), image, channels, shape, label: Some(label), spacing: [2.5, 0.75, 0.8] }
}

/// A NIfTI-1 file written byte by byte (independently of the engine and the nifti crate's writer).
struct RawNifti {
    dims: Vec<u16>,
    datatype: i16,
    bitpix: i16,
    pixdim: [f32; 4], // qfac, dx, dy, dz
    slope: f32,
    inter: f32,
    qform: Option<[f32; 6]>, // b, c, d, qx, qy, qz
    big_endian: bool,
}

impl RawNifti {
    fn new(dims: &[u16], datatype: i16, bitpix: i16) -> RawNifti {
        RawNifti {
            dims: dims.to_vec(),
            datatype,
            bitpix,
            pixdim: [1.0, 1.0, 1.0, 1.0],
            slope: 0.0,
            inter: 0.0,
            qform: None,
            big_endian: false,
        }
    }

    /// `data` must already be in the file's byte order.
    fn bytes(&self, data: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 352];
        let be = self.big_endian;
        let put = |h: &mut Vec<u8>, off: usize, b: &[u8]| h[off..off + b.len()].copy_from_slice(b);
        let i32b = |v: i32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let i16b = |v: i16| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let f32b = |v: f32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        put(&mut h, 0, &i32b(348));
        put(&mut h, 40, &i16b(self.dims.len() as i16));
        for (i, &d) in self.dims.iter().enumerate() {
            put(&mut h, 42 + 2 * i, &i16b(d as i16));
        }
        put(&mut h, 70, &i16b(self.datatype));
        put(&mut h, 72, &i16b(self.bitpix));
        for (i, &p) in self.pixdim.iter().enumerate() {
            put(&mut h, 76 + 4 * i, &f32b(p));
        }
        put(&mut h, 108, &f32b(352.0));
        put(&mut h, 112, &f32b(self.slope));
        put(&mut h, 116, &f32b(self.inter));
        h[123] = 2; // mm
        if let Some(q) = self.qform {
            put(&mut h, 252, &i16b(1));
            for (i, &v) in q.iter().enumerate() {
                put(&mut h, 256 + 4 * i, &f32b(v));
            }
        }
        put(&mut h, 344, b"n+1\0");
        h.extend_from_slice(data);
        h
    }
}

// ---------------------------------------------------------------------------------------------------------------
// NIfTI

#[test]
fn nifti_reads_real_ct() {
    let ct = read_volume(fixture("image.nii.gz")).unwrap();
    assert_eq!(ct.shape, [34, 128, 128]);
    assert_eq!(ct.data.len(), 34 * 128 * 128);
    let sp = 3.046_875_953_674_316_4;
    assert!((ct.spacing[0] - 10.0).abs() < 1e-6 && (ct.spacing[1] - sp).abs() < 1e-6);
    assert!((ct.spacing[2] - sp).abs() < 1e-6);
    // Hounsfield units: air and the scanner's -3024 padding below, bone above.
    let min = ct.data.iter().copied().fold(f32::INFINITY, f32::min);
    let max = ct.data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert_eq!((min, max), (-3024.0, 3070.0));
    let mean = ct.data.iter().map(|&v| v as f64).sum::<f64>() / ct.data.len() as f64;
    assert!((mean - -1_072.838_443_531_709_6).abs() < 1e-6, "mean {mean}");
    // Voxels (d, h, w) = (z, y, x) checked against the raw bytes: no transposition.
    let at = |d: usize, h: usize, w: usize| ct.data[(d * 128 + h) * 128 + w];
    assert_eq!([at(17, 64, 64), at(10, 40, 90), at(30, 100, 20)], [1.0, -861.0, -991.0]);
    // sform from the file: diagonal spacing and the LPS-converted origin.
    assert_eq!(ct.affine[0], [sp, 0.0, 0.0, -193.095_993_041_992_2]);
    assert_eq!(ct.affine[1], [0.0, sp, 0.0, -216.395_996_093_75]);
    assert_eq!(ct.affine[2], [0.0, 0.0, 10.0, -340.25]);

    let lab = read_volume(fixture("label.nii.gz")).unwrap();
    assert_eq!(lab.shape, ct.shape);
    let labels = lab.to_labels().unwrap();
    assert_eq!(labels.iter().max(), Some(&7));
    let lat = |d: usize, h: usize, w: usize| labels[(d * 128 + h) * 128 + w];
    assert_eq!([lat(17, 64, 64), lat(10, 40, 90), lat(30, 100, 20)], [7, 5, 0]);
    assert_eq!(labels.iter().filter(|&&v| v == 5).count(), 34450);
}

#[test]
fn nifti_label_roundtrip_gz_and_plain() {
    let dir = TempDir::new("roundtrip");
    let shape = [3, 5, 7];
    let n = 3 * 5 * 7;
    let labels: Vec<u8> = (0..n).map(|i| (i * 37 % 11) as u8).collect();
    let header = header_for(shape, [2.5, 0.7, 0.9]).unwrap();
    for name in ["lab.nii.gz", "lab.nii"] {
        let path = dir.path().join(name);
        write_label(&path, &labels, shape, &header).unwrap();
        let back = read_volume(&path).unwrap();
        assert_eq!(back.shape, shape);
        assert_eq!(back.to_labels().unwrap(), labels);
        assert_eq!(back.header.datatype, 2, "stored as uint8");
        assert_close("spacing read back", &back.spacing, &[2.5, 0.7, 0.9], 0.0, 1e-6);
        assert_eq!(back.affine[0][0], 0.9f32 as f64);
        assert_eq!(back.affine[2][2], 2.5);
    }
    // gzip is chosen by the name: the .gz file starts with the gzip magic bytes, the plain one with sizeof_hdr.
    assert_eq!(&fs::read(dir.path().join("lab.nii.gz")).unwrap()[..2], &[0x1f, 0x8b]);
    assert_eq!(&fs::read(dir.path().join("lab.nii")).unwrap()[..4], &348i32.to_le_bytes());
}

#[test]
fn nifti_label_roundtrip_keeps_real_ct_grid() {
    let dir = TempDir::new("ctgrid");
    let ct = read_volume(fixture("image.nii.gz")).unwrap();
    let (labels, _) = {
        let l = read_volume(fixture("label.nii.gz")).unwrap();
        (l.to_labels().unwrap(), l)
    };
    let path = dir.path().join("pred.nii.gz");
    write_label(&path, &labels, ct.shape, &ct.header).unwrap();
    let back = read_volume(&path).unwrap();
    assert_eq!(back.shape, ct.shape);
    assert_eq!(back.spacing, ct.spacing);
    assert_eq!(back.affine, ct.affine);
    assert_eq!(back.to_labels().unwrap(), labels);
    assert_eq!((back.header.qform_code, back.header.sform_code), (1, 1));
    assert_eq!(back.header.scl_slope, 1.0);
    // Writing on a reference of another shape is refused.
    let err = write_label(&path, &labels[..10], [1, 2, 5], &ct.header).unwrap_err();
    assert!(matches!(err, Error::Shape(ref m) if m.contains("[34, 128, 128]")), "{err}");
}

#[test]
fn nifti_qform_affine_and_roundtrip() {
    let dir = TempDir::new("qform");
    // 90 degrees about z: quaternion (a, b, c, d) = (cos 45, 0, 0, sin 45); qfac -1 flips the k axis.
    let s = std::f32::consts::FRAC_1_SQRT_2;
    let mut raw = RawNifti::new(&[2, 3, 4], 16, 32);
    raw.pixdim = [-1.0, 2.0, 3.0, 4.0];
    raw.qform = Some([0.0, 0.0, s, 10.0, 20.0, 30.0]);
    let data: Vec<u8> = (0..24).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let path = dir.path().join("q.nii");
    fs::write(&path, raw.bytes(&data)).unwrap();
    let v = read_volume(&path).unwrap();
    assert_eq!(v.shape, [4, 3, 2]);
    assert_eq!(v.spacing, [4.0, 3.0, 2.0]);
    let want = [[0.0, -3.0, 0.0, 10.0], [2.0, 0.0, 0.0, 20.0], [0.0, 0.0, -4.0, 30.0], [0.0, 0.0, 0.0, 1.0]];
    assert_close("affine (row-major)", &v.affine.concat(), &want.concat(), 0.0, 1e-5);
    let labels: Vec<u8> = (0..24).map(|i| i as u8).collect();
    let out = dir.path().join("q_label.nii.gz");
    write_label(&out, &labels, v.shape, &v.header).unwrap();
    let back = read_volume(&out).unwrap();
    assert_eq!(back.affine, v.affine);
    assert_eq!(back.spacing, v.spacing);
    assert_eq!(back.header.pixdim[0], -1.0);
    assert_eq!(back.to_labels().unwrap(), labels);
}

#[test]
fn nifti_stored_types_and_scaling() {
    let dir = TempDir::new("types");
    let path = dir.path().join("t.nii");
    let vals: [i16; 6] = [-3, -1, 0, 1, 2, 300];
    // int16 with slope 2 and intercept -1024, little-endian.
    let mut raw = RawNifti::new(&[3, 2, 1], 4, 16);
    raw.slope = 2.0;
    raw.inter = -1024.0;
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(&path, raw.bytes(&bytes)).unwrap();
    let v = read_volume(&path).unwrap();
    assert_eq!(v.shape, [1, 2, 3]);
    let want: Vec<f32> = vals.iter().map(|&x| 2.0 * x as f32 - 1024.0).collect();
    assert_eq!(v.data, want);
    // The same big-endian, as a 4-D file with one volume.
    let mut raw = RawNifti::new(&[3, 2, 1, 1], 4, 16);
    raw.big_endian = true;
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_be_bytes()).collect();
    fs::write(&path, raw.bytes(&bytes)).unwrap();
    let v = read_volume(&path).unwrap();
    assert_eq!(v.data, vals.map(|x| x as f32).to_vec());
    // uint8 and float64; slope 0 means no scaling.
    fs::write(&path, RawNifti::new(&[3, 2, 1], 2, 8).bytes(&[0, 1, 2, 250, 254, 255])).unwrap();
    assert_eq!(read_volume(&path).unwrap().data, vec![0.0, 1.0, 2.0, 250.0, 254.0, 255.0]);
    let f: [f64; 6] = [-1.5, 0.25, 1e3, -2e3, 0.0, 7.0];
    let bytes: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(&path, RawNifti::new(&[3, 2, 1], 64, 64).bytes(&bytes)).unwrap();
    assert_eq!(read_volume(&path).unwrap().data, f.map(|x| x as f32).to_vec());
    // Float labels: whole numbers are accepted, fractions are not.
    let bytes: Vec<u8> = [0.0f32, 1.0, 2.0, 0.5, 0.0, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(&path, RawNifti::new(&[3, 2, 1], 16, 32).bytes(&bytes)).unwrap();
    let m = data_err(read_volume(&path).unwrap().to_labels());
    assert_contains(&m, &["t.nii", "0.5", "(0, 1, 0)"]);
}

#[test]
fn nifti_rejects_bad_files() {
    let dir = TempDir::new("bad");
    let p = dir.path();
    // Missing file: an I/O error naming it.
    match read_volume(p.join("nothere.nii.gz")) {
        Err(Error::Io(m)) => assert!(m.contains("nothere.nii.gz"), "{m}"),
        other => panic!("expected Error::Io, got {other:?}"),
    }
    // Not a NIfTI file (plain text, long enough for a header).
    fs::write(p.join("text.nii"), "x".repeat(400)).unwrap();
    assert_contains(&data_err(read_volume(p.join("text.nii"))), &["text.nii", "not a NIfTI"]);
    fs::write(p.join("short.nii"), "hello").unwrap();
    assert_contains(&data_err(read_volume(p.join("short.nii"))), &["short.nii", "not a NIfTI"]);
    // Truncated gzip: the real CT cut in half.
    let gz = fs::read(fixture("image.nii.gz")).unwrap();
    fs::write(p.join("cut.nii.gz"), &gz[..gz.len() / 2]).unwrap();
    assert_contains(&data_err(read_volume(p.join("cut.nii.gz"))), &["cut.nii.gz", "gzip"]);
    // Only the gzip trailer (CRC and length) missing: still caught.
    fs::write(p.join("notrailer.nii.gz"), &gz[..gz.len() - 8]).unwrap();
    assert_contains(&data_err(read_volume(p.join("notrailer.nii.gz"))), &["notrailer.nii.gz", "gzip"]);
    // A flipped byte inside the compressed stream.
    let mut bad = gz.clone();
    bad[gz.len() / 2] ^= 0x55;
    fs::write(p.join("flip.nii.gz"), &bad).unwrap();
    assert_contains(&data_err(read_volume(p.join("flip.nii.gz"))), &["flip.nii.gz", "gzip"]);
    // Truncated uncompressed voxel data.
    let full = RawNifti::new(&[4, 4, 4], 2, 8).bytes(&[7u8; 64]);
    fs::write(p.join("trunc.nii"), &full[..full.len() - 10]).unwrap();
    assert_contains(&data_err(read_volume(p.join("trunc.nii"))), &["trunc.nii", "truncated"]);
    // A shape with zero size.
    fs::write(p.join("zero.nii"), RawNifti::new(&[4, 0, 4], 2, 8).bytes(&[])).unwrap();
    assert_contains(&data_err(read_volume(p.join("zero.nii"))), &["zero.nii", "zero"]);
    // A real 4th axis.
    fs::write(p.join("four.nii"), RawNifti::new(&[2, 2, 2, 2], 2, 8).bytes(&[1u8; 16])).unwrap();
    assert_contains(&data_err(read_volume(p.join("four.nii"))), &["four.nii", "4-D", "[2, 2, 2, 2]"]);
    // A non-positive spacing.
    let mut raw = RawNifti::new(&[2, 2, 2], 2, 8);
    raw.pixdim = [1.0, 1.0, 0.0, 1.0];
    fs::write(p.join("sp.nii"), raw.bytes(&[1u8; 8])).unwrap();
    assert_contains(&data_err(read_volume(p.join("sp.nii"))), &["sp.nii", "pixdim[2]"]);
    // Writing needs a NIfTI name and matching sizes.
    let h = header_for([1, 2, 2], [1.0, 1.0, 1.0]).unwrap();
    assert!(matches!(write_label(p.join("x.png"), &[0; 4], [1, 2, 2], &h), Err(Error::Config(_))));
    assert!(matches!(write_label(p.join("x.nii"), &[0; 3], [1, 2, 2], &h), Err(Error::Shape(_))));
}

// ---------------------------------------------------------------------------------------------------------------
// Datasets

const LABELS: [(&str, u8); 3] = [("background", 0), ("liver", 1), ("tumour", 2)];

/// Two labelled 2-channel MR cases and one unlabelled test case.
fn write_small_dataset(dir: &Path) -> Vec<Case> {
    let mut cases = vec![
        synthetic_case("case_a", [3, 6, 5], 2, 3, 1),
        synthetic_case("case_b", [4, 5, 7], 2, 3, 2),
        synthetic_case("test_c", [2, 3, 4], 2, 3, 3),
    ];
    cases[2].label = None;
    write_dataset(dir, &cases, &LABELS, &["T1", "T2"]).unwrap();
    cases
}

fn set_json(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("dataset.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn dataset_write_open_load() {
    let tmp = TempDir::new("ds");
    let dir = tmp.path().join("Dataset001_Test");
    let cases = write_small_dataset(&dir);
    let ds = Dataset::open(&dir).unwrap();
    assert_eq!(ds.training_cases(), ["case_a", "case_b"]);
    assert_eq!(ds.test_cases(), ["test_c"]);
    assert_eq!(ds.num_classes(), 3);
    assert_eq!(ds.label_names(), ["background", "liver", "tumour"]);
    assert_eq!(ds.channel_names(), ["T1", "T2"]);
    assert_eq!(ds.modality(), "T1");
    assert!(dir.join("imagesTr/case_b_0001.nii.gz").is_file());
    assert!(dir.join("imagesTs/test_c_0000.nii.gz").is_file());
    for want in &cases {
        let got = ds.load_case(&want.name).unwrap();
        assert_eq!(got.name, want.name);
        assert_eq!((got.channels, got.shape), (2, want.shape));
        assert_eq!(got.image, want.image, "float32 images round-trip exactly");
        assert_eq!(got.label, want.label);
        assert_close("spacing", &got.spacing, &want.spacing, 0.0, 1e-6);
    }
    let (_, header) = ds.load_case_with_header("case_a").unwrap();
    assert_eq!(&header.dim[..4], &[3, 5, 6, 3]);
    assert!(matches!(ds.load_case("nope"), Err(Error::Config(m)) if m.contains("nope")));
    // A CT dataset (channel name in any case) selects the CT modality.
    set_json(&dir, |v| v["channel_names"] = serde_json::json!({"0": "ct", "1": "PET"}));
    assert_eq!(Dataset::open(&dir).unwrap().modality(), "CT");
    // Nothing is overwritten.
    assert!(matches!(write_dataset(&dir, &cases, &LABELS, &["T1", "T2"]), Err(Error::Config(_))));
}

#[test]
fn dataset_json_errors() {
    let tmp = TempDir::new("dsjson");
    let dir = tmp.path().join("ds");
    write_small_dataset(&dir);
    let original = fs::read_to_string(dir.join("dataset.json")).unwrap();
    let reset = || fs::write(dir.join("dataset.json"), &original).unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Edit, Vec<&str>)> = vec![
        (
            Box::new(|v| {
                let _ = v.as_object_mut().unwrap().remove("numTraining");
            }),
            vec!["dataset.json", "numTraining"],
        ),
        (
            Box::new(|v| {
                let _ = v.as_object_mut().unwrap().remove("channel_names");
            }),
            vec!["dataset.json", "channel_names"],
        ),
        (
            Box::new(|v| {
                let _ = v.as_object_mut().unwrap().remove("labels");
            }),
            vec!["dataset.json", "labels"],
        ),
        (
            Box::new(|v| {
                let _ = v.as_object_mut().unwrap().remove("file_ending");
            }),
            vec!["dataset.json", "file_ending"],
        ),
        (Box::new(|v| v["numTraining"] = 3.into()), vec!["numTraining", "is 3", "2 training cases"]),
        (
            Box::new(|v| v["labels"] = serde_json::json!({"background": 0, "liver": 1, "tumour": 3})),
            vec!["labels", "tumour", "0..2"],
        ),
        (
            Box::new(|v| v["labels"] = serde_json::json!({"background": 1, "liver": 0, "tumour": 2})),
            vec!["background", "must be 0"],
        ),
        (Box::new(|v| v["labels"] = serde_json::json!({"bg": 0, "liver": 1, "tumour": 2})), vec!["no \"background\""]),
        (
            Box::new(|v| v["labels"] = serde_json::json!({"background": 0, "liver": 1, "tumour": 1})),
            vec!["share the value 1"],
        ),
        (Box::new(|v| v["labels"] = serde_json::json!({"background": 0, "organ": [1, 2]})), vec!["region-based"]),
        (
            Box::new(|v| v["channel_names"] = serde_json::json!({"0": "T1"})),
            vec!["case_a_0001.nii.gz", "channel 1", "1 channel"],
        ),
        (
            Box::new(|v| v["channel_names"] = serde_json::json!({"0": "T1", "1": "T2", "2": "FLAIR"})),
            vec!["case_a_0002.nii.gz", "missing channel 2"],
        ),
        (Box::new(|v| v["file_ending"] = ".mha".into()), vec!["file_ending", ".mha"]),
    ];
    for (edit, parts) in cases {
        reset();
        set_json(&dir, edit);
        assert_contains(&data_err(Dataset::open(&dir)), &parts);
    }
    reset();
    fs::write(dir.join("dataset.json"), "{\"labels\": ").unwrap();
    assert_contains(&data_err(Dataset::open(&dir)), &["dataset.json", "JSON"]);
    fs::remove_file(dir.join("dataset.json")).unwrap();
    assert!(matches!(Dataset::open(&dir), Err(Error::Io(m)) if m.contains("dataset.json")));
}

#[test]
fn dataset_file_errors() {
    let tmp = TempDir::new("dsfiles");
    let dir = tmp.path().join("ds");
    let cases = write_small_dataset(&dir);
    Dataset::open(&dir).unwrap();

    // Missing channel file.
    let ch1 = dir.join("imagesTr/case_b_0001.nii.gz");
    let saved = fs::read(&ch1).unwrap();
    fs::remove_file(&ch1).unwrap();
    assert_contains(&data_err(Dataset::open(&dir)), &["case_b_0001.nii.gz", "missing channel 1"]);
    fs::write(&ch1, &saved).unwrap();

    // Missing label file.
    let lab = dir.join("labelsTr/case_a.nii.gz");
    let saved_label = fs::read(&lab).unwrap();
    fs::remove_file(&lab).unwrap();
    assert_contains(&data_err(Dataset::open(&dir)), &["labelsTr/case_a.nii.gz", "missing label"]);
    fs::write(&lab, &saved_label).unwrap();

    // Image/label shape mismatch: opens, fails on load naming both files and shapes.
    let wrong = header_for([3, 6, 4], [2.5, 0.75, 0.8]).unwrap();
    write_label(&lab, &[0; 72], [3, 6, 4], &wrong).unwrap();
    let ds = Dataset::open(&dir).unwrap();
    assert_contains(
        &data_err(ds.load_case("case_a")),
        &["labelsTr/case_a.nii.gz", "[3, 6, 4]", "case_a_0000.nii.gz", "[3, 6, 5]"],
    );

    // Label value >= K.
    let mut labels = cases[0].label.clone().unwrap();
    labels[5 + 2] = 3; // (d, h, w) = (0, 1, 2): h * W + w
    let header = header_for([3, 6, 5], [2.5, 0.75, 0.8]).unwrap();
    write_label(&lab, &labels, [3, 6, 5], &header).unwrap();
    assert_contains(&data_err(ds.load_case("case_a")), &["case_a.nii.gz", "label value 3", "(0, 1, 2)", "3 classes"]);

    // Spacing disagreement between channels.
    fs::write(&lab, &saved_label).unwrap();
    let ch0 = dir.join("imagesTr/case_a_0000.nii.gz");
    let saved0 = fs::read(&ch0).unwrap();
    let n = 3 * 6 * 5;
    let other = header_for([3, 6, 5], [2.6, 0.75, 0.8]).unwrap();
    write_image(&ch0, &cases[0].image[..n], [3, 6, 5], &other).unwrap();
    assert_contains(&data_err(ds.load_case("case_a")), &["case_a_0001.nii.gz", "spacing", "case_a_0000.nii.gz"]);
    fs::write(&ch0, &saved0).unwrap();
    ds.load_case("case_a").unwrap();

    // A corrupt (truncated) .nii.gz and a file that is not NIfTI at all.
    fs::write(&ch1, &saved[..saved.len() / 2]).unwrap();
    assert_contains(&data_err(ds.load_case("case_b")), &["case_b_0001.nii.gz", "gzip"]);
    fs::write(&ch1, b"<html>404 not found</html>").unwrap();
    assert_contains(&data_err(ds.load_case("case_b")), &["case_b_0001.nii.gz", "not a NIfTI"]);

    // numTraining counts the cases found.
    fs::write(&ch1, &saved).unwrap();
    fs::remove_file(dir.join("imagesTr/case_b_0000.nii.gz")).unwrap();
    fs::remove_file(&ch1).unwrap();
    fs::remove_file(dir.join("labelsTr/case_b.nii.gz")).unwrap();
    assert_contains(&data_err(Dataset::open(&dir)), &["numTraining", "is 2", "1 training cases"]);
}

#[test]
fn dataset_real_ct_pipeline() {
    let tmp = TempDir::new("dsct");
    let dir = tmp.path().join("Dataset002_Chest");
    let image = read_volume(fixture("image.nii.gz")).unwrap();
    let label = read_volume(fixture("label.nii.gz")).unwrap();
    let case = Case {
        name: "chest_001".into(),
        label: Some(label.to_labels().unwrap()),
        image: image.data,
        channels: 1,
        shape: image.shape,
        spacing: image.spacing,
    };
    let names = fs::read_to_string(fixture("labels.txt")).unwrap();
    let labels: Vec<(String, u8)> = names
        .lines()
        .map(|l| {
            let (v, n) = l.split_once(' ').unwrap();
            (n.to_string(), v.parse().unwrap())
        })
        .collect();
    let labels: Vec<(&str, u8)> = labels.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    write_dataset(&dir, std::slice::from_ref(&case), &labels, &["CT"]).unwrap();
    let ds = Dataset::open(&dir).unwrap();
    assert_eq!((ds.modality(), ds.num_classes()), ("CT", 8));
    let mut loaded = ds.load_case("chest_001").unwrap();
    assert_eq!(loaded.image, case.image);
    assert_eq!(loaded.label, case.label);

    // CT statistics over the foreground (238,413 voxels, so 100,000 evenly spread samples).
    let norm = Normalization::for_modality(ds.modality(), std::slice::from_ref(&loaded)).unwrap();
    let Normalization::Ct(stats) = norm else { panic!("CT expected") };
    assert!((stats.mean - -225.880_93).abs() < 10.0, "sampled mean {} vs full -225.88", stats.mean);
    assert!(stats.lo < -800.0 && stats.hi > 300.0 && stats.std > 100.0, "{stats:?}");
    normalize_case(&mut loaded, &norm).unwrap();
    let lo = (stats.lo - stats.mean) / stats.std;
    let hi = (stats.hi - stats.mean) / stats.std;
    assert!(loaded.image.iter().all(|&x| x >= lo - 1e-4 && x <= hi + 1e-4));

    // Resample to an isotropic 6 mm grid: 34 x 10 mm -> 57 slices, 128 x 3.05 mm -> 65 voxels.
    let r = resample_case(&loaded, [6.0, 6.0, 6.0]).unwrap();
    assert_eq!(r.shape, [57, 65, 65]);
    assert_eq!(r.label.as_ref().unwrap().iter().max(), Some(&7));
}

// ---------------------------------------------------------------------------------------------------------------
// Normalisation

/// numpy.percentile (linear) by sorting, written independently of the engine's selection.
fn np_percentile(v: &[f32], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let h = (s.len() - 1) as f64 * p / 100.0;
    let (i, f) = (h.floor() as usize, h - h.floor());
    if i + 1 < s.len() {
        s[i] * (1.0 - f) + s[i + 1] * f
    } else {
        s[i]
    }
}

#[test]
fn normalize_ct_percentile_clip_and_zscore() {
    // 1 x 1 x 301 voxels; the foreground is every other voxel with values 0, 1, ..., 150 (spread by a stride so that
    // order in memory differs from order in value), the background holds extreme values that must not count.
    let n = 301;
    let mut image = vec![0.0f32; n];
    let mut label = vec![0u8; n];
    let fg: Vec<f32> = (0..151).map(|i| ((i * 73) % 151) as f32).collect();
    for (k, &v) in fg.iter().enumerate() {
        image[2 * k] = v;
        label[2 * k] = 1 + (k % 2) as u8;
    }
    for k in 0..150 {
        image[2 * k + 1] = if k % 2 == 0 { -5000.0 } else { 9000.0 };
    }
    let mut case =
        Case { name: "hand".into(), image, channels: 1, shape: [1, 1, n], label: Some(label), spacing: [1.0; 3] };
    let s = CtStats::from_cases(std::slice::from_ref(&case)).unwrap();
    // Values 0..=150: percentile p sits at rank 1.5 p (interpolated between neighbours): 0.75 and 149.25; mean 75;
    // population variance (151^2 - 1) / 12.
    assert!((s.lo - 0.75).abs() < 1e-5 && (s.hi - 149.25).abs() < 1e-5, "{s:?}");
    assert!((s.lo as f64 - np_percentile(&fg, 0.5)).abs() < 1e-5);
    assert!((s.hi as f64 - np_percentile(&fg, 99.5)).abs() < 1e-5);
    assert!((s.mean - 75.0).abs() < 1e-5);
    assert!((s.std as f64 - ((151.0f64 * 151.0 - 1.0) / 12.0).sqrt()).abs() < 1e-4);
    let norm = Normalization::Ct(s);
    let before = case.image.clone();
    normalize_case(&mut case, &norm).unwrap();
    for (x, y) in before.iter().zip(&case.image) {
        let want = (x.clamp(0.75, 149.25) - 75.0) / s.std;
        assert!((y - want).abs() < 1e-5, "{x} -> {y}, want {want}");
    }
    // JSON round trip (stored with a checkpoint).
    let j = norm.to_json();
    assert_eq!(j["scheme"], "ct");
    assert_eq!(Normalization::from_json(&j).unwrap(), norm);
    assert_eq!(Normalization::from_json(&Normalization::ZScore.to_json()).unwrap(), Normalization::ZScore);
    assert!(matches!(Normalization::from_json(&serde_json::json!({"scheme": "ct", "lo": 1})), Err(Error::Data(_))));
    // No foreground at all is an error, not NaN statistics.
    case.label = Some(vec![0; n]);
    assert_contains(&data_err(CtStats::from_cases(&[case])), &["no foreground"]);
}

#[test]
fn normalize_ct_subsampling_is_deterministic_and_close() {
    // 300,000 foreground voxels: subsampled to 100,000; the statistics stay close to the full ones.
    let n = 300_000;
    let mut rng = Lcg(7);
    let image: Vec<f32> = (0..n).map(|_| (rng.next() * 1000.0 - 200.0) as f32).collect();
    let case = Case {
        name: "big".into(),
        image: image.clone(),
        channels: 1,
        shape: [3, 100, 1000],
        label: Some(vec![1; n]),
        spacing: [1.0; 3],
    };
    let a = CtStats::from_cases(std::slice::from_ref(&case)).unwrap();
    let b = CtStats::from_cases(std::slice::from_ref(&case)).unwrap();
    assert_eq!(a, b);
    let full = CtStats::from_samples(&mut image.clone());
    assert!((a.mean - full.mean).abs() < 3.0 && (a.std - full.std).abs() < 3.0, "{a:?} vs {full:?}");
    assert!((a.lo - full.lo).abs() < 3.0 && (a.hi - full.hi).abs() < 3.0, "{a:?} vs {full:?}");
}

#[test]
fn normalize_zscore_per_image_per_channel() {
    let mut case = synthetic_case("mr", [3, 7, 5], 2, 2, 11);
    let n = case.voxels();
    for v in &mut case.image[n..] {
        *v = *v * 40.0 + 3000.0; // channel 1 on another scale
    }
    normalize_case(&mut case, &Normalization::ZScore).unwrap();
    for ch in case.image.chunks(n) {
        let mean = ch.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = ch.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 1e-5 && (var.sqrt() - 1.0).abs() < 1e-5, "mean {mean} var {var}");
    }
    // A constant channel maps to zeros (std floored), never NaN.
    let mut flat = synthetic_case("flat", [1, 2, 3], 1, 2, 1);
    flat.image = vec![5.0; 6];
    normalize_case(&mut flat, &Normalization::ZScore).unwrap();
    assert_eq!(flat.image, vec![0.0; 6]);
    // Bad sizes are an error.
    flat.image.pop();
    assert!(matches!(normalize_case(&mut flat, &Normalization::ZScore), Err(Error::Shape(_))));
}

// ---------------------------------------------------------------------------------------------------------------
// Resampling

#[test]
fn resample_identity_when_spacing_equal() {
    let case = synthetic_case("id", [3, 5, 4], 2, 4, 5);
    let r = resample_case(&case, case.spacing).unwrap();
    assert_eq!(r, case);
    assert!(!needs_resampling([2.5, 0.75, 0.8], [2.52, 0.754, 0.797]));
    assert!(needs_resampling([2.5, 0.75, 0.8], [2.5, 0.75, 0.81]));
}

#[test]
fn resample_halving_spacing_doubles_size() {
    let case = synthetic_case("half", [3, 5, 4], 1, 4, 6);
    let target = case.spacing.map(|s| s / 2.0);
    let r = resample_case(&case, target).unwrap();
    assert_eq!(r.shape, [6, 10, 8]);
    assert_eq!(r.spacing, target);
    assert_eq!(r.image.len(), 6 * 10 * 8);
    assert_eq!(resampled_shape([34, 128, 128], [10.0, 3.0, 3.0], [6.0, 6.0, 6.0]), [57, 64, 64]);
    assert_eq!(resampled_shape([1, 2, 3], [1.0; 3], [10.0; 3]), [1, 1, 1]);
}

#[test]
fn resample_trilinear_reproduces_linear_ramp() {
    let from = [5, 6, 7];
    let ramp = |d: f64, h: f64, w: f64| 3.0 * d - 2.0 * h + 0.5 * w + 10.0;
    let mut image = Vec::new();
    for d in 0..from[0] {
        for h in 0..from[1] {
            for w in 0..from[2] {
                image.push(ramp(d as f64, h as f64, w as f64) as f32);
            }
        }
    }
    let case = Case { name: "ramp".into(), image, channels: 1, shape: from, label: None, spacing: [1.0, 1.0, 1.0] };
    for target in [[2.0, 2.0, 2.0], [0.5, 0.5, 0.5], [0.7, 1.3, 1.0 / 1.5]] {
        let r = resample_case(&case, target).unwrap();
        let to = r.shape;
        let mut checked = 0;
        for d in 0..to[0] {
            for h in 0..to[1] {
                for w in 0..to[2] {
                    // Voxel-centre mapping, computed here per voxel.
                    let u = [d, h, w]
                        .iter()
                        .enumerate()
                        .map(|(a, &i)| (i as f64 + 0.5) * from[a] as f64 / to[a] as f64 - 0.5)
                        .collect::<Vec<_>>();
                    if u.iter().zip(&from).any(|(&x, &n)| x < 0.0 || x > (n - 1) as f64) {
                        continue; // edge voxels are clamped (replicated), not extrapolated
                    }
                    let got = r.image[(d * to[1] + h) * to[2] + w] as f64;
                    let want = ramp(u[0], u[1], u[2]);
                    assert!((got - want).abs() < 1e-4, "target {target:?} at {:?}: {got} vs {want}", [d, h, w]);
                    checked += 1;
                }
            }
        }
        assert!(checked > 0, "target {target:?}: no interior voxels checked");
    }
}

#[test]
fn resample_nearest_keeps_label_values() {
    let mut case = synthetic_case("lab", [4, 6, 6], 1, 5, 9);
    let label: Vec<u8> = (0..case.voxels()).map(|i| [0u8, 3, 7, 9][i % 4]).collect();
    case.label = Some(label.clone());
    for target in [[1.25, 0.375, 0.4], [5.0, 1.5, 1.6], [1.9, 1.1, 0.5]] {
        let r = resample_case(&case, target).unwrap();
        let out = r.label.unwrap();
        assert_eq!(out.len(), r.shape.iter().product::<usize>());
        assert!(out.iter().all(|v| [0, 3, 7, 9].contains(v)), "new values appeared");
    }
    // Doubling along W only (spacing halved): each source voxel appears twice, in order.
    let r = resample_case(&case, [2.5, 0.75, 0.4]).unwrap();
    assert_eq!(r.shape, [4, 6, 12]);
    let out = r.label.unwrap();
    for (i, &v) in out.iter().enumerate() {
        assert_eq!(v, label[i / 2]);
    }
    // A third along W: output voxel w covers source voxels 3w..3w+2 and takes the centre one, 3w + 1.
    let r = resample_case(&case, [2.5, 0.75, 2.4]).unwrap();
    assert_eq!(r.shape, [4, 6, 2]);
    let out = r.label.unwrap();
    for (i, &v) in out.iter().enumerate() {
        assert_eq!(v, label[(i / 2) * 6 + 3 * (i % 2) + 1]);
    }
}

#[test]
fn resample_median_spacing() {
    let mut cases: Vec<Case> = (0..4).map(|i| synthetic_case("m", [1, 1, 1], 1, 2, i)).collect();
    let sp = [[3.0, 1.0, 0.5], [1.0, 2.0, 0.7], [2.0, 0.8, 0.9], [5.0, 0.9, 0.6]];
    for (c, s) in cases.iter_mut().zip(sp) {
        c.spacing = s;
    }
    let m = median_spacing(&cases).unwrap();
    assert_close("median spacing", &m, &[2.5, 0.95, 0.65], 0.0, 1e-12);
    assert_eq!(median_spacing(&cases[..3]).unwrap(), [2.0, 1.0, 0.7]);
    assert!(matches!(median_spacing(&[]), Err(Error::Data(_))));
    assert!(matches!(resample_case(&cases[0], [0.0, 1.0, 1.0]), Err(Error::Shape(_))));
}
