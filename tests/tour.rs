//! The tour's index of ops (the table at the end of src/tour.rs) stays true: every file, function, kernel and
//! benchmark row it names exists, and every op module has a row. Rustdoc checks the table's links; this checks the
//! names it cannot see (tests, kernels, private CPU functions, benchmark rows).

use std::collections::BTreeSet;
use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(Path::new(ROOT).join(path)).ok()
}

/// The text of every code span of `cell`, in order.
fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// The cells of every row of the index table (the `//! |` lines after its `|---|` separator), header excluded.
fn index_rows(tour: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = tour.lines().filter_map(|l| l.strip_prefix("//! |")).collect();
    let body = lines.iter().skip_while(|l| !l.starts_with("---|")).skip(1);
    body.map(|l| l.trim_end().trim_end_matches('|').split('|').map(|c| c.trim().to_string()).collect()).collect()
}

/// Whether `name` occurs in `text` as a whole identifier.
fn has_word(text: &str, name: &str) -> bool {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(name).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + name.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

/// Every `.rs` file under src/, concatenated: where kernels are launched by name.
fn rust_sources() -> String {
    fn walk(dir: &Path, text: &mut String) {
        for entry in std::fs::read_dir(dir).expect("a source folder") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, text);
            } else if path.extension().is_some_and(|e| e == "rs") {
                text.push_str(&std::fs::read_to_string(&path).expect("a source file"));
            }
        }
    }
    let mut text = String::new();
    walk(&Path::new(ROOT).join("src"), &mut text);
    text
}

/// Whether `kernel` is an instance `stem_f32` or `stem_bf16` launched through `kernel::stem::<..>()`.
fn typed_launch(sources: &str, kernel: &str) -> bool {
    let stem = kernel.strip_suffix("_f32").or_else(|| kernel.strip_suffix("_bf16"));
    stem.is_some_and(|stem| sources.contains(&format!("kernel::{stem}::<")))
}

/// Problems with a cell that names files and, after each file, items in it: Rust functions (`fn name`) in `.rs`
/// files; in `.cu` files kernels, which must occur in the file (some are defined through macros) and be launched by
/// name (a string literal) somewhere in src/, so that a kernel renamed in both places is not kept alive by a comment.
fn check_locations(cell: &str, sources: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut file: Option<(&str, Option<String>)> = None;
    for span in code_spans(cell) {
        if span.ends_with(".rs") || span.ends_with(".cu") {
            let text = read(span);
            if text.is_none() {
                problems.push(format!("{span}: no such file"));
            }
            file = Some((span, text));
            continue;
        }
        match &file {
            None => problems.push(format!("{span:?} is named before any file in {cell:?}")),
            Some((_, None)) => {}
            Some((path, Some(text))) => {
                let found =
                    if path.ends_with(".rs") { has_word(text, &format!("fn {span}")) } else { has_word(text, span) };
                if !found {
                    problems.push(format!("{path} has no {span}"));
                } else if path.ends_with(".cu")
                    && !sources.contains(&format!("\"{span}\""))
                    && !has_word(sources, &format!("kernel::{span}"))
                    && !typed_launch(sources, span)
                {
                    // Launched through its typed handle (`kernel::name`, crate::device::params), through the
                    // storage-generic handle of its pair (`kernel::stem::<T>()` for stem_f32 / stem_bf16) or, for
                    // the kernels without a parameter header yet, by its name as a string.
                    problems.push(format!("no launch of {span} (kernel::{span} or the string \"{span}\") in src/"));
                }
            }
        }
    }
    problems
}

/// Problems with a cell naming rows of the kernel benchmark (each must be a string literal in benches/kernels.rs).
fn check_bench_rows(cell: &str, bench: &str) -> Vec<String> {
    code_spans(cell)
        .into_iter()
        .filter(|row| !bench.contains(&format!("\"{row}\"")))
        .map(|row| format!("benches/kernels.rs has no row {row:?}"))
        .collect()
}

/// Every problem with the index: its rows' locations and benchmark rows, and op modules without a row.
fn index_problems(tour: &str) -> Vec<String> {
    let bench = read("benches/kernels.rs").expect("benches/kernels.rs");
    let sources = rust_sources();
    let rows = index_rows(tour);
    let mut problems = Vec::new();
    let mut ops_listed = BTreeSet::new();
    for row in &rows {
        let [op, cpu, kernels, grad, gpu, bench_rows] = row.as_slice() else {
            problems.push(format!("row {row:?} does not have 6 cells"));
            continue;
        };
        if let Some(name) = op.split("crate::ops::").nth(1) {
            ops_listed.insert(name.split(')').next().unwrap_or_default().to_string());
        }
        for cell in [cpu, kernels, grad, gpu] {
            problems.extend(check_locations(cell, &sources));
        }
        problems.extend(check_bench_rows(bench_rows, &bench));
    }
    let ops_dir = Path::new(ROOT).join("src/ops");
    for entry in std::fs::read_dir(&ops_dir).expect("src/ops") {
        let path = entry.expect("a directory entry").path();
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        if stem != "mod" && !ops_listed.contains(&stem) {
            problems.push(format!("src/ops/{stem}.rs has no row in the tour's index"));
        }
    }
    problems
}

#[test]
fn tour_index_names_only_what_exists_and_every_op() {
    let tour = read("src/tour.rs").expect("src/tour.rs");
    assert!(index_rows(&tour).len() >= 20, "the index table was not found in src/tour.rs");
    let problems = index_problems(&tour);
    assert!(problems.is_empty(), "the tour's index is out of date:\n{}", problems.join("\n"));
}

#[test]
fn index_check_catches_missing_names() {
    let tour = "//! | op | cpu | kernels | grad | gpu | bench |\n//! |---|---|---|---|---|---|\n\
                //! | [`conv`](crate::ops::conv) | `src/ops/conv.rs` `no_such_fn` | `cuda/conv.cu` `no_such_kernel` \
                `THREADS` | `tests/no_such_test.rs` `x` | `gpu_conv3d_k333` | `no such row` |\n";
    let problems = index_problems(tour).join("\n");
    for expected in [
        "src/ops/conv.rs has no no_such_fn",
        "cuda/conv.cu has no no_such_kernel",
        "no launch of THREADS",
        "tests/no_such_test.rs: no such file",
        "\"gpu_conv3d_k333\" is named before any file",
        "no row \"no such row\"",
        "src/ops/selective_scan.rs has no row",
    ] {
        assert!(problems.contains(expected), "missing {expected:?} in:\n{problems}");
    }
}
