//! Fuzzing, on stable Rust, of the three readers of files a user hands the engine: NIfTI volumes, `dataset.json` and
//! checkpoints. Valid files are mutated by a seeded generator (bit flips, boundary values written over header
//! fields, truncation, insertion, deletion, JSON values swapped for hostile ones) and each reader must return `Ok`
//! or `Err`: no panic, no hang, and no allocation beyond what the input can hold. A counting allocator measures the
//! peak bytes each parse allocates: at most 16 times the bytes the input holds (after gunzipping, which can expand
//! at most 1032 times) plus 64 KiB, so a header that claims terabytes must be refused before anything is allocated
//! for it. A successful parse must also give a consistent result (voxel count, finite values, labels).
//!
//! `cargo test --release --test fuzz` runs a short pass (3,000 inputs per reader); the long run is
//! `LKM_FUZZ_INPUTS=1000000 cargo test --release --test fuzz -- --ignored --nocapture` (inputs per reader). A
//! failing input is written to the temporary folder and its seed printed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use lkm_engine::data::dataset::DatasetJson;
use lkm_engine::data::nifti::{header_for, parse_volume, write_image};
use lkm_engine::train::checkpoint;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// The system allocator, counting the bytes live and their peak on each thread.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn track(grow: usize, shrink: usize) {
    let _ = LIVE.try_with(|live| {
        let now = (live.get() + grow).saturating_sub(shrink);
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size(), 0);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(0, layout.size());
        // SAFETY: the caller's contract for `dealloc` is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size, layout.size());
        // SAFETY: the caller's contract for `realloc` is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `parse` and returns the peak bytes it allocated above what was live before.
fn peak_allocation(parse: impl FnOnce()) -> usize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    parse();
    PEAK.with(Cell::get) - base
}

/// Little-endian byte strings that sit on boundaries of the fields they land on.
const BOUNDARY_VALUES: &[&[u8]] = &[
    &[0],
    &[0xff],
    &[0x7f],
    &[0x80],
    &[0xff, 0x7f],             // i16::MAX: the largest dim
    &[0x00, 0x80],             // i16::MIN
    &[0xff, 0xff],             // -1 as i16, u16::MAX
    &[0x00, 0x00, 0xc0, 0x7f], // f32 NaN
    &[0x00, 0x00, 0x80, 0x7f], // f32 +inf
    &[0xff, 0xff, 0x7f, 0x7f], // f32::MAX
    &[0xbd, 0x37, 0x86, 0x35], // f32 1e-6 (a spacing, a slope)
    &[0x00, 0x00, 0x80, 0xbf], // f32 -1.0
    &[0xff, 0xff, 0xff, 0x7f], // i32::MAX
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0, 0, 0, 0, 0, 0, 0, 0x80],
];

/// One to four random edits of `seed`, three quarters of them within its first `hot` bytes (the header).
fn mutate(seed: &[u8], hot: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if b.is_empty() {
            b.push(rng.random());
        }
        let span = if rng.random_range(0..4) < 3 { hot.min(b.len()) } else { b.len() };
        let at = rng.random_range(0..span.max(1));
        match rng.random_range(0..7) {
            0 => b[at] ^= 1 << rng.random_range(0..8),
            1 => b[at] = rng.random(),
            2 => {
                let v = BOUNDARY_VALUES[rng.random_range(0..BOUNDARY_VALUES.len())];
                for (i, &x) in v.iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + i) {
                        *slot = x;
                    }
                }
            }
            3 => b.truncate(at),
            4 => {
                let extra: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                let _ = b.splice(at..at, extra);
            }
            5 => {
                let end = (at + rng.random_range(1..64)).min(b.len());
                let _ = b.drain(at..end);
            }
            _ => {
                let end = (at + rng.random_range(1..32)).min(b.len());
                let chunk = b[at..end].to_vec();
                let to = rng.random_range(0..=b.len());
                let _ = b.splice(to..to, chunk);
            }
        }
    }
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// Valid NIfTI files to start from: float32 and int16 with scaling, raw.
fn nifti_seeds() -> Vec<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("lkm-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let shape = [3, 5, 4];
    let values: Vec<f32> = (0..60).map(|i| i as f32 * 0.5 - 7.0).collect();
    let path = dir.join("seed.nii");
    write_image(&path, &values, shape, &header_for(shape, [2.0, 0.8, 0.7]).unwrap()).unwrap();
    let f32_seed = std::fs::read(&path).unwrap();
    // The same volume stored as int16 with a slope and intercept: datatype 4, bitpix 16, scl_slope 0.5 at 112.
    let mut i16_seed = f32_seed[..352].to_vec();
    i16_seed[70..72].copy_from_slice(&4i16.to_le_bytes());
    i16_seed[72..74].copy_from_slice(&16i16.to_le_bytes());
    i16_seed[112..116].copy_from_slice(&0.5f32.to_le_bytes());
    i16_seed[116..120].copy_from_slice(&(-7.0f32).to_le_bytes());
    i16_seed.extend((0..60i16).flat_map(|i| i.to_le_bytes()));
    let _ = std::fs::remove_dir_all(&dir);
    vec![f32_seed, i16_seed]
}

/// One NIfTI input: a mutated raw file, a mutated raw file gzipped, or a mutated gzip stream.
fn nifti_input(seeds: &[Vec<u8>], rng: &mut StdRng) -> Vec<u8> {
    let seed = &seeds[rng.random_range(0..seeds.len())];
    match rng.random_range(0..4) {
        0 | 1 => mutate(seed, 352, rng),
        2 => gzip(&mutate(seed, 352, rng)),
        _ => mutate(&gzip(seed), 64, rng),
    }
}

fn check_nifti(bytes: &[u8]) -> bool {
    let raw_len = if bytes.starts_with(&[0x1f, 0x8b]) { bytes.len() * 1032 } else { bytes.len() };
    let mut result = None;
    let peak = peak_allocation(|| result = Some(parse_volume(bytes, Path::new("fuzz.nii"))));
    assert!(peak <= 16 * raw_len + (64 << 10), "parsing {} bytes allocated {peak} bytes", bytes.len());
    let Some(Ok(v)) = result else { return false };
    assert_eq!(v.data.len(), v.shape.iter().product::<usize>());
    assert!(v.data.iter().all(|x| x.is_finite()) && v.spacing.iter().all(|s| s.is_finite() && *s > 0.0));
    true
}

const DATASET_JSON: &str = r#"{
    "channel_names": {"0": "CT", "1": "T2"},
    "labels": {"background": 0, "liver": 1, "kidneys": 2},
    "numTraining": 12,
    "file_ending": ".nii.gz",
    "name": "Dataset001"
}"#;

/// JSON values that break assumptions: wrong types, out-of-range numbers, the unsupported label forms.
const HOSTILE_JSON: &[&str] = &[
    "-1",
    "0",
    "256",
    "1e400",
    "18446744073709551616",
    "3.5",
    "null",
    "true",
    "\"\"",
    "\"ignore\"",
    "\".nii\"",
    "[]",
    "[1, 2]",
    "{}",
    "{\"0\": 0}",
    "{\"background\": 1}",
    "\"\\ud800\"",
];

/// One dataset.json input: a hostile value swapped in after a random `:`, or byte-level edits.
fn dataset_input(rng: &mut StdRng) -> Vec<u8> {
    let text = DATASET_JSON.as_bytes();
    if rng.random_range(0..2) == 0 {
        return mutate(text, text.len(), rng);
    }
    let colons: Vec<usize> = text.iter().enumerate().filter(|(_, &c)| c == b':').map(|(i, _)| i).collect();
    let at = colons[rng.random_range(0..colons.len())] + 1;
    let end = text[at..].iter().position(|&c| c == b',' || c == b'}').map_or(text.len(), |e| at + e);
    let value = HOSTILE_JSON[rng.random_range(0..HOSTILE_JSON.len())];
    [&text[..at], value.as_bytes(), &text[end..]].concat()
}

fn check_dataset(bytes: &[u8]) -> bool {
    let mut result = None;
    let peak = peak_allocation(|| result = Some(DatasetJson::parse(bytes, "fuzz/dataset.json")));
    assert!(peak <= 16 * bytes.len() + (64 << 10), "parsing {} bytes allocated {peak} bytes", bytes.len());
    let Some(Ok(d)) = result else { return false };
    assert!(d.label_names.len() >= 2 && d.label_names[0] == "background", "{d:?}");
    assert!(!d.channel_names.is_empty() && (d.file_ending == ".nii.gz" || d.file_ending == ".nii"), "{d:?}");
    true
}

/// A small valid checkpoint: two parameters, one momentum buffer, the engine's metadata.
fn checkpoint_seed() -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let a: Vec<u8> = (0..6).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
    let b: Vec<u8> = (0..4).flat_map(|i| (1.0 - i as f32).to_le_bytes()).collect();
    let views = vec![
        ("conv.weight", TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap()),
        ("conv.bias", TensorView::new(Dtype::F32, vec![4], &b).unwrap()),
        ("optimizer.momentum.conv.bias", TensorView::new(Dtype::F32, vec![4], &b).unwrap()),
    ];
    let meta = std::collections::HashMap::from([(
        "lkm_engine".to_string(),
        r#"{"epoch": 3, "config": {"patch": [8, 8, 8]}}"#.to_string(),
    )]);
    safetensors::serialize(views, Some(meta)).unwrap()
}

fn check_checkpoint(bytes: &[u8]) -> bool {
    let mut result = None;
    let peak = peak_allocation(|| result = Some(checkpoint::parse(bytes, Path::new("fuzz.safetensors"))));
    assert!(peak <= 16 * bytes.len() + (64 << 10), "parsing {} bytes allocated {peak} bytes", bytes.len());
    let Some(Ok(ck)) = result else { return false };
    for t in ck.tensors.values().chain(ck.momentum.values()) {
        assert!(t.to_vec_f32().unwrap().iter().all(|x| x.is_finite()));
    }
    true
}

/// Parses `count` inputs of each reader from `seed`; a panic saves the input and names its seed.
fn fuzz(count: usize, seed: u64) {
    let nifti = nifti_seeds();
    let ck = checkpoint_seed();
    let hot = 8 + u64::from_le_bytes(ck[..8].try_into().unwrap()) as usize;
    type Case<'a> = (&'a str, Box<dyn Fn(&mut StdRng) -> Vec<u8> + 'a>, fn(&[u8]) -> bool);
    let readers: [Case; 3] = [
        ("nifti", Box::new(|rng| nifti_input(&nifti, rng)), check_nifti),
        ("dataset.json", Box::new(dataset_input), check_dataset),
        ("checkpoint", Box::new(|rng| mutate(&ck, hot, rng)), check_checkpoint),
    ];
    for (name, input, check) in &readers {
        let t0 = Instant::now();
        let (mut ok, mut refused) = (0, 0);
        for i in 0..count as u64 {
            let mut rng = StdRng::seed_from_u64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let bytes = input(&mut rng);
            match std::panic::catch_unwind(|| check(&bytes)) {
                Ok(true) => ok += 1,
                Ok(false) => refused += 1,
                Err(_) => {
                    let path = std::env::temp_dir().join(format!("lkm-fuzz-{name}-{seed}-{i}.bin"));
                    std::fs::write(&path, &bytes).unwrap();
                    panic!("{name}: input {i} of seed {seed} failed; saved to {}", path.display());
                }
            }
        }
        eprintln!(
            "fuzz {name}: {count} inputs ({ok} accepted, {refused} refused), no panic, in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        assert!(ok > 0 && refused > 0, "{name}: the mutations should give both valid and invalid inputs");
    }
}

#[test]
fn readers_survive_mutated_files() {
    fuzz(3000, 17);
}

#[test]
#[ignore = "the long run: LKM_FUZZ_INPUTS=1000000 cargo test --release --test fuzz -- --ignored --nocapture"]
fn readers_survive_mutated_files_long_run() {
    let count = std::env::var("LKM_FUZZ_INPUTS").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000_000);
    fuzz(count, 2026);
}
