//! The command line against bad inputs (issue 17, "Nothing silent"): each class of misuse must end with exit code 1,
//! a message naming the file or flag, and every input file unchanged (hashed before and after). Also: kill -9 during
//! training followed by `--resume` gives the uninterrupted run's checkpoint byte for byte.
//!
//! The fixtures are made by the binary itself: a small phantom dataset (4 cases of 16 x 24 x 24) and a checkpoint of
//! tiny-3d trained for one iteration on 16^3 patches (about a second on the CPU).

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lkm_engine::data::nifti::{header_for, read_volume, write_image};

const BIN: &str = env!("CARGO_BIN_EXE_lkm-engine");
/// Train flags that make a run take about a second per epoch on the CPU.
/// A quick tiny-3d run (`--data` without `--config` would plan the dataset instead).
const QUICK: &[&str] =
    &["--config", "tiny-3d", "--patch", "16,16,16", "--iters", "1", "--batch", "1", "--no-progress", "--device", "cpu"];

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lkm-bad-inputs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Command-line arguments: `&str` or `String`.
trait Arg: AsRef<std::ffi::OsStr> + std::fmt::Debug {}
impl<T: AsRef<std::ffi::OsStr> + std::fmt::Debug> Arg for T {}

/// Owned arguments from pieces (for closures that add flags to a base command).
fn owned(parts: &[&[&str]]) -> Vec<String> {
    parts.concat().into_iter().map(String::from).collect()
}

fn run(args: &[impl Arg], cwd: &Path) -> Output {
    Command::new(BIN).args(args).current_dir(cwd).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and expects exit code 1 (an error, not a panic's 101) with every `needles` in the message.
fn expect_error(args: &[impl Arg], cwd: &Path, needles: &[&str]) -> String {
    let o = run(args, cwd);
    let msg = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?} must fail cleanly; stderr:\n{msg}");
    for n in needles {
        assert!(msg.contains(n), "{args:?}: the message must name {n:?}; it is:\n{msg}");
    }
    msg
}

fn expect_ok(args: &[impl Arg], cwd: &Path) -> String {
    let o = run(args, cwd);
    assert!(o.status.success(), "{args:?} failed:\n{}", stderr(&o));
    stderr(&o)
}

/// Every file under `dir` with a hash of its bytes.
fn hashes(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(hashes(&p));
        } else {
            let mut h = DefaultHasher::new();
            std::fs::read(&p).unwrap().hash(&mut h);
            let _ = out.insert(p, h.finish());
        }
    }
    out
}

/// Copies the folder tree `from` into `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        let target = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &target);
        } else {
            let _ = std::fs::copy(&p, &target).unwrap();
        }
    }
}

/// The shared fixtures: `data` (a phantom dataset) and `run/latest.safetensors` (one iteration of training on it).
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = temp_dir("fixtures");
        let _ = expect_ok(&["synth", "--out", "data", "--cases", "4", "--shape", "16,24,24"], &d);
        let _ = expect_ok(&[&["train", "--data", "data", "--epochs", "1", "--out", "run"], QUICK].concat(), &d);
        d
    })
}

/// A copy of the fixture dataset in a fresh folder `dir/data`.
fn dataset_copy(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    copy_tree(&fixtures().join("data"), &data);
    data
}

fn checkpoint() -> String {
    fixtures().join("run/latest.safetensors").display().to_string()
}

/// Rewrites image `file` with `edit` applied to its voxels and spacing.
fn rewrite_image(file: &Path, edit: impl FnOnce(&mut Vec<f32>, &mut [f64; 3])) {
    let v = read_volume(file).unwrap();
    let (mut data, mut spacing) = (v.data, v.spacing);
    edit(&mut data, &mut spacing);
    write_image(file, &data, v.shape, &header_for(v.shape, spacing).unwrap()).unwrap();
}

#[test]
fn evaluate_pairs_cases_by_exact_name_and_checks_grids() {
    let d = temp_dir("evaluate");
    // Label maps named like synth's cases, phantom_NNNN: each is a case of its own, not a channel.
    let reference = d.join("ref");
    copy_tree(&fixtures().join("data/labelsTr"), &reference);
    let pred = d.join("pred");
    copy_tree(&reference, &pred);
    let before = hashes(&reference);
    let _ = expect_ok(&["evaluate", "--pred", "pred", "--ref", "ref"], &d);
    let csv = std::fs::read_to_string(pred.join("scores.csv")).unwrap();
    let cases: std::collections::BTreeSet<&str> = csv.lines().skip(1).filter_map(|l| l.split(',').next()).collect();
    assert_eq!(cases.into_iter().collect::<Vec<_>>(), ["phantom_0000", "phantom_0001", "phantom_0002", "phantom_0003"]);
    std::fs::remove_file(pred.join("phantom_0001.nii.gz")).unwrap();
    std::fs::remove_file(pred.join("phantom_0003.nii.gz")).unwrap();
    let _ = expect_error(&["evaluate", "--pred", "pred", "--ref", "ref"], &d, &["phantom_0001, phantom_0003", "pred"]);
    copy_tree(&reference, &pred);
    rewrite_image(&pred.join("phantom_0002.nii.gz"), |_, s| s[0] *= 2.0);
    let _ = expect_error(&["evaluate", "--pred", "pred", "--ref", "ref"], &d, &["phantom_0002.nii.gz", "spacing"]);
    assert_eq!(hashes(&reference), before, "evaluate changed a reference file");
}

#[test]
fn predict_never_writes_over_its_inputs_and_names_outputs_by_case() {
    let d = temp_dir("predict");
    let data = dataset_copy(&d);
    let before = hashes(&data);
    let ck = checkpoint();
    let _ = expect_error(
        &["predict", "--model", &ck, "--input", "data/imagesTr", "--output", "data/imagesTr"],
        &d,
        &["--output", "data/imagesTr"],
    );
    let _ = expect_error(
        &["predict", "--model", &ck, "--input", "data/labelsTr/phantom_0000.nii.gz", "--output", "data/labelsTr"],
        &d,
        &["--output", "phantom_0000.nii.gz"],
    );
    assert_eq!(hashes(&data), before, "a refused predict changed an input");
    // A one-channel input named without _0000 and with dots in its name: the output is CASE.nii.gz, nothing else.
    let input = d.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let _ = std::fs::copy(data.join("imagesTr/phantom_0000_0000.nii.gz"), input.join("ct.v2.nii")).unwrap();
    let _ =
        expect_ok(&["predict", "--model", &ck, "--input", "in/ct.v2.nii", "--output", "out", "--device", "cpu"], &d);
    assert_eq!(names(&d.join("out")), ["ct.v2.nii.gz"]);
}

#[test]
fn a_fresh_train_refuses_a_folder_holding_a_run_and_a_locked_folder() {
    let d = temp_dir("fresh");
    copy_tree(&fixtures().join("run"), &d.join("run"));
    let data = fixtures().join("data").display().to_string();
    let before = hashes(&d.join("run"));
    let train = |extra: &[&str]| owned(&[&["train", "--data", &data, "--epochs", "1", "--out", "run"], QUICK, extra]);
    let _ = expect_error(&train(&[]), &d, &["run", "--overwrite", "--resume"]);
    assert_eq!(hashes(&d.join("run")), before, "a refused train changed the run");
    // A lock held by a live lkm-engine process: a second training is refused while it runs.
    let mut holder =
        spawn_train(&[&["train", "--data", &data, "--epochs", "100", "--out", "holder"], QUICK].concat(), &d);
    // `spawn` can return before the kernel renames the child (a vfork-style spawn resumes the parent before exec
    // sets the new name), and a pid named after this test binary reads as stale. The holder's own lock shows it runs
    // as lkm-engine.
    let started = std::time::Instant::now();
    while !d.join("holder/train.lock").exists() {
        assert!(holder.try_wait().unwrap().is_none(), "the lock holder exited early");
        assert!(started.elapsed().as_secs() < 60, "the lock holder did not start within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::fs::write(d.join("run/train.lock"), format!("{}\n", holder.id())).unwrap();
    let refused = run(&train(&["--overwrite"]), &d);
    holder.kill().unwrap();
    let _ = holder.wait().unwrap();
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("train.lock"), "{}", stderr(&refused));
    assert_eq!(hashes(&d.join("run")).len(), before.len() + 1, "the refused run touched the folder");
    // Its process gone (killed and reaped), the lock is stale and taken over; the latest.tmp of a killed checkpoint
    // write and the metrics.tmp of a killed metrics rewrite are cleaned up; --overwrite replaces the run (one
    // metrics row, not two).
    std::fs::write(d.join("run/latest.tmp"), b"half a checkpoint").unwrap();
    std::fs::write(d.join("run/metrics.tmp"), b"half a metrics rewrite").unwrap();
    let msg = expect_ok(&train(&["--overwrite"]), &d);
    assert!(msg.contains("stale lock"), "{msg}");
    // The new run's environment log and curves (viz) beside its checkpoint and metrics; no temporary file, no lock.
    let run_files = ["environment.jsonl", "latest.safetensors", "metrics.jsonl", "progress.png"];
    assert_eq!(names(&d.join("run")), run_files, "leftovers");
    assert_eq!(std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap().lines().count(), 1);
}

#[test]
fn resume_restores_the_run_and_refuses_conflicting_flags() {
    let d = temp_dir("resume");
    let data = dataset_copy(&d);
    copy_tree(&fixtures().join("run"), &d.join("run"));
    let before = hashes(&d.join("run"));
    let resume = |extra: &[&str]| owned(&[&["train", "--resume", "run/latest.safetensors", "--no-progress"], extra]);
    let _ = expect_error(&resume(&[]), &d, &["complete (1 of 1 epochs)", "--epochs"]);
    let _ = expect_error(&resume(&["--epochs", "1"]), &d, &["--epochs 1", "not above", "1 epochs"]);
    let _ = expect_error(&resume(&["--epochs", "2", "--patch", "32,32,32"]), &d, &["--patch", "[32, 32, 32]", "[16"]);
    let _ = expect_error(&resume(&["--epochs", "2", "--config", "flare-3d"]), &d, &["--config flare-3d", "tiny-3d"]);
    let _ = expect_error(&resume(&["--epochs", "2", "--seed", "7"]), &d, &["--seed 7", "12345"]);
    let _ = expect_error(&resume(&["--epochs", "2", "--out", "elsewhere"]), &d, &["--out elsewhere", "run"]);
    let _ = expect_error(&resume(&["--epochs", "2", "--data", "."]), &d, &["--data", "data"]);
    let _ = expect_error(&resume(&["--epochs", "2", "--overwrite"]), &d, &["--overwrite"]);
    // The dataset the run was trained on now declares another class: the 4-class model cannot continue on it.
    // (The checkpoint records the fixture's dataset; resume the copy's run from a checkpoint trained on the copy.)
    let _ = expect_ok(&[&["train", "--data", "data", "--epochs", "1", "--out", "run2"], QUICK].concat(), &d);
    let json_path = data.join("dataset.json");
    let json = std::fs::read_to_string(&json_path).unwrap().replace("\"spine\": 3", "\"spine\": 3, \"extra\": 4");
    std::fs::write(&json_path, json).unwrap();
    let _ = expect_error(
        &["train", "--resume", "run2/latest.safetensors", "--epochs", "2"],
        &d,
        &["4 classes", "the data 5"],
    );
    assert_eq!(hashes(&d.join("run")), before, "a refused resume changed the run");
    // Metrics rows of epochs the checkpoint has not done (a run killed after logging, before saving) are dropped.
    let metrics = d.join("run/metrics.jsonl");
    let mut rows = std::fs::read_to_string(&metrics).unwrap();
    rows.push_str("{\"epoch\":1,\"stale\":true}\n{\"epoch\":2,\"stale\":true}\n");
    std::fs::write(&metrics, rows).unwrap();
    let _ = expect_ok(&resume(&["--epochs", "2", "--device", "cpu"]), &d);
    let rows = std::fs::read_to_string(&metrics).unwrap();
    let epochs: Vec<u64> = rows
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [0, 1], "{rows}");
    assert!(!rows.contains("stale"), "{rows}");
}

#[test]
fn non_finite_images_and_checkpoints_are_refused_with_the_file_named() {
    let d = temp_dir("nonfinite");
    let data = dataset_copy(&d);
    let image = data.join("imagesTr/phantom_0001_0000.nii.gz");
    rewrite_image(&image, |v, _| {
        v[5] = f32::NAN;
        v[9] = f32::INFINITY;
    });
    let before = hashes(&data);
    let _ = expect_error(
        &[&["train", "--data", "data", "--epochs", "1", "--out", "run"], QUICK].concat(),
        &d,
        &["phantom_0001_0000.nii.gz", "2 of 9216 voxels are NaN or infinite"],
    );
    let _ = expect_error(
        &["predict", "--model", &checkpoint(), "--input", image.to_str().unwrap(), "--output", "out"],
        &d,
        &["phantom_0001_0000.nii.gz", "NaN"],
    );
    assert_eq!(hashes(&data), before);
    // A checkpoint whose last float is NaN (the data block ends the file).
    let mut bytes = std::fs::read(checkpoint()).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(d.join("nan.safetensors"), bytes).unwrap();
    let _ = expect_error(
        &["predict", "--model", "nan.safetensors", "--input", "data/imagesTr", "--output", "out"],
        &d,
        &["nan.safetensors", "NaN or infinite"],
    );
    assert!(!d.join("out").exists(), "a refused predict created its output folder");
}

#[test]
fn nonsense_values_name_the_flag_or_file_and_the_allowed_range() {
    let d = temp_dir("values");
    let data = dataset_copy(&d);
    let before = hashes(&data);
    // Each is refused before any data is read.
    let train = |extra: &[&str]| owned(&[&["train", "--data", "data", "--out", "run"], extra]);
    for (flag, value, needle) in [
        ("--val-fraction", "-0.1", "[0, 1)"),
        ("--val-fraction", "1", "[0, 1)"),
        ("--val-fraction", "NaN", "[0, 1)"),
        ("--iters", "0", "at least 1"),
        ("--epochs", "0", "at least 1"),
        ("--batch", "0", "at least 1"),
        ("--lr", "-1", "positive"),
    ] {
        let _ = expect_error(&train(&[&format!("{flag}={value}")]), &d, &[flag, needle]);
    }
    let patch = |p: &'static str| vec!["train", "--data", "data", "--out", "run", "--patch", p];
    let _ = expect_error(&patch("16,16"), &d, &["--patch [16, 16]", "3 sizes"]);
    let _ = expect_error(&patch("0,16,16"), &d, &["--patch [0, 16, 16]", "at least 1"]);
    let _ = expect_error(&["train", "--synth-cases", "0"], &d, &["--synth-cases", "at least 1"]);
    let _ = expect_error(&["train", "--data", "missing"], &d, &["--data missing", "no such folder"]);
    let _ = expect_error(&["synth", "--out", "s", "--cases", "0"], &d, &["--cases", "at least 1"]);
    let _ = expect_error(&["synth", "--out", "s", "--shape", "4,4,4"], &d, &["--shape", "8 to 512"]);
    let _ = expect_error(&["synth", "--out", "s", "--shape", "16,16"], &d, &["--shape", "3 values"]);
    let _ = expect_error(&["evaluate", "--pred", "data", "--ref", "missing"], &d, &["--ref missing"]);
    let _ = expect_error(
        &["predict", "--model", &checkpoint(), "--input", "missing", "--output", "out"],
        &d,
        &["--input missing", "no such file or folder"],
    );
    assert!(!d.join("run").exists() && !d.join("s").exists(), "a refused command created its output folder");
    assert_eq!(hashes(&data), before);
}

#[test]
fn broken_datasets_are_blamed_on_the_right_file() {
    let d = temp_dir("datasets");
    // A file_ending that matches no file.
    let data = dataset_copy(&d);
    let json_path = data.join("dataset.json");
    let json = std::fs::read_to_string(&json_path).unwrap();
    std::fs::write(&json_path, json.replace("\".nii.gz\"", "\".nii\"")).unwrap();
    let train = [&["train", "--data", "data", "--epochs", "1", "--out", "run"], QUICK].concat();
    let _ = expect_error(&train, &d, &["dataset.json", "file_ending", "phantom_0000_0000.nii.gz"]);
    std::fs::write(&json_path, json).unwrap();
    // An absurd voxel spacing.
    let label = data.join("labelsTr/phantom_0002.nii.gz");
    let original = std::fs::read(&label).unwrap();
    rewrite_image(&label, |_, s| s[2] = 1e-6);
    let _ = expect_error(&train, &d, &["phantom_0002.nii.gz", "pixdim[1]", "0.001 to 1000"]);
    std::fs::write(&label, original).unwrap();
    // A file name that is not UTF-8.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let odd = data.join("imagesTr").join(std::ffi::OsStr::from_bytes(b"bad\xff_0000.nii.gz"));
        let _ = std::fs::copy(data.join("imagesTr/phantom_0000_0000.nii.gz"), &odd).unwrap();
        let _ = expect_error(&train, &d, &["imagesTr/bad", "not valid UTF-8"]);
        std::fs::remove_file(&odd).unwrap();
    }
    let _ = expect_ok(&train, &d);
}

#[test]
fn a_failed_synth_leaves_nothing_and_the_retry_works() {
    let d = temp_dir("synth");
    std::fs::write(d.join("blocker"), b"a file where a folder is needed").unwrap();
    let _ = expect_error(&["synth", "--out", "blocker/data", "--cases", "1", "--shape", "16,16,16"], &d, &["blocker"]);
    let _ = expect_error(&["synth", "--out", "blocker", "--cases", "1", "--shape", "16,16,16"], &d, &["blocker"]);
    assert_eq!(names(&d), ["blocker"], "a failed synth left something");
    std::fs::create_dir(d.join("empty")).unwrap();
    let _ = expect_ok(&["synth", "--out", "empty", "--cases", "1", "--shape", "16,16,16"], &d);
    assert_eq!(names(&d), ["blocker", "empty"], "synth into an empty folder left a staging folder");
}

/// Starts `lkm-engine train` with `args` in `cwd`.
fn spawn_train(args: &[&str], cwd: &Path) -> Child {
    Command::new(BIN).args(args).current_dir(cwd).stderr(Stdio::null()).spawn().unwrap()
}

#[test]
fn kill_9_then_resume_gives_the_uninterrupted_checkpoint_byte_for_byte() {
    let d = temp_dir("kill");
    let data = fixtures().join("data").display().to_string();
    let args = |out: &'static str| [&["train", "--data", &data, "--epochs", "4", "--out", out], QUICK].concat();
    let _ = expect_ok(&args("straight"), &d);
    // Kill the same run as soon as its first checkpoint exists, then resume it with no other flag.
    let mut child = spawn_train(&args("killed"), &d);
    let ck = d.join("killed/latest.safetensors");
    let t0 = Instant::now();
    while !ck.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint after two minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run finished before it was killed; the test needs more epochs");
    let _ = expect_ok(&["train", "--resume", "killed/latest.safetensors", "--no-progress", "--device", "cpu"], &d);
    let straight = std::fs::read(d.join("straight/latest.safetensors")).unwrap();
    assert!(std::fs::read(&ck).unwrap() == straight, "the resumed run's checkpoint differs from the uninterrupted one");
    let epochs = |run: &str| -> Vec<u64> {
        let text = std::fs::read_to_string(d.join(run).join("metrics.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"].as_u64().unwrap()).collect()
    };
    assert_eq!(epochs("killed"), vec![0, 1, 2, 3], "one metrics row per epoch, none repeated");
}

/// The names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn failed_writes_leave_no_temporary_or_partial_file() {
    // The target names are taken by non-empty folders, so the final rename fails after the data was written.
    let d = temp_dir("failed-writes");
    for target in ["latest.safetensors", "case.nii.gz"] {
        std::fs::create_dir_all(d.join(target).join("occupied")).unwrap();
    }
    let err = lkm_engine::train::checkpoint::write_atomically(&d.join("latest.safetensors"), b"bytes").unwrap_err();
    assert!(err.to_string().contains("latest.safetensors"), "{err}");
    let header = header_for([2, 3, 4], [1.0; 3]).unwrap();
    let err = lkm_engine::data::nifti::write_label(d.join("case.nii.gz"), &[0; 24], [2, 3, 4], &header).unwrap_err();
    assert!(err.to_string().contains("case.nii.gz"), "{err}");
    assert_eq!(names(&d), ["case.nii.gz", "latest.safetensors"], "a failed write left a file behind");
}

/// `--precision` takes fp32 or bf16; bf16 needs a GPU and float32 arithmetic (`--math exact`) excludes it.
/// `--recompute` takes none or mamba.
#[test]
fn precision_flag_is_checked() {
    let dir = temp_dir("precision_flag");
    let base = ["dump-step", "--config", "tiny-3d", "--batch", "1", "--steps", "0", "--out", "d"];
    expect_error(&owned(&[&base, &["--device", "cpu", "--precision", "fp16"]]), &dir, &["--precision", "fp16"]);
    let bf16 = ["--device", "cpu", "--math", "tf32", "--precision", "bf16"];
    expect_error(&owned(&[&base, &bf16]), &dir, &["bf16", "needs a GPU"]);
    // dump-step's --math defaults to exact.
    expect_error(&owned(&[&base, &["--device", "cpu", "--precision", "bf16"]]), &dir, &["--math exact", "--math tf32"]);
    expect_ok(&owned(&[&base, &["--device", "cpu", "--precision", "fp32"]]), &dir);
    expect_error(&owned(&[&base, &["--device", "cpu", "--recompute", "all"]]), &dir, &["--recompute", "\"all\""]);
    expect_ok(&owned(&[&base, &["--device", "cpu", "--recompute", "mamba"]]), &dir);
}
