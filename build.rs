//! Compiles every `cuda/*.cu` file with nvcc into an sm_90 fatbin (SASS for Hopper plus PTX for later GPUs) and
//! embeds them in the binary through a generated `kernels.rs`.
//!
//! nvcc is looked up in `$NVCC`, then `.toolchain/cuda/bin/nvcc` (where `tools/install-nvcc.sh` puts it), then
//! `$CUDA_HOME/bin`, `/usr/local/cuda/bin` and `PATH`. Without nvcc the crate still builds, CPU-only, and says so; with
//! `LKM_REQUIRE_NVCC=1` (CI) a missing nvcc or a kernel that does not compile fails the build.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        candidates.push(p.into());
    }
    candidates.push(root.join(".toolchain/cuda/bin/nvcc"));
    if let Ok(h) = env::var("CUDA_HOME") {
        candidates.push(Path::new(&h).join("bin/nvcc"));
    }
    candidates.push("/usr/local/cuda/bin/nvcc".into());
    if let Ok(path) = env::var("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// The names of the `extern "C" __global__` kernels a .cu source defines, and of those instantiated through a
/// `NAME_KERNEL(kernel_name, ..., CONSTANT, 16)` macro at the start of a line (a macro whose definition declares the
/// kernels): its lower-case arguments are kernel names, upper-case ones and numbers are settings.
fn kernel_names(source: &str) -> Vec<String> {
    let is_kernel_name = |a: &&str| {
        a.starts_with(|c: char| c.is_ascii_lowercase())
            && a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let mut out: Vec<String> = source
        .lines()
        .filter_map(|l| {
            let (mac, args) = l.split_once('(')?;
            let is_instance = mac.ends_with("_KERNEL") && mac.chars().all(|c| c.is_ascii_uppercase() || c == '_');
            let args = args.split(')').next().unwrap_or("");
            is_instance
                .then(|| args.split(',').map(str::trim).filter(is_kernel_name).map(String::from).collect::<Vec<_>>())
        })
        .flatten()
        .collect();
    for (i, _) in source.match_indices("__global__") {
        let mut rest = source[i + "__global__".len()..].to_string();
        // `__launch_bounds__(...)` sits between the return type and the name.
        if let Some(lb) = rest.find("__launch_bounds__") {
            if let Some(close) = rest[lb..].find(')') {
                rest.replace_range(lb..lb + close + 1, "");
            }
        }
        let Some(open) = rest.find('(') else { continue };
        let head = &rest[..open];
        if !source[..i].trim_end().ends_with("extern \"C\"") || head.contains('<') {
            continue;
        }
        if let Some(name) = head.split_whitespace().last() {
            out.push(name.trim_start_matches('*').to_string());
        }
    }
    out
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lkm_kernels)");
    println!("cargo::rerun-if-changed=cuda");
    for var in ["NVCC", "CUDA_HOME", "LKM_REQUIRE_NVCC", "LKM_NVCC_ARCH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let required = env::var("LKM_REQUIRE_NVCC").is_ok_and(|v| v == "1");

    let mut sources: Vec<PathBuf> = fs::read_dir(root.join("cuda"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "cu")).collect()
        })
        .unwrap_or_default();
    sources.sort();
    for s in &sources {
        println!("cargo::rerun-if-changed={}", s.display());
    }

    let nvcc = find_nvcc(&root);
    let mut entries = Vec::new();
    let mut names = Vec::new();
    match &nvcc {
        None if required => panic!("LKM_REQUIRE_NVCC=1 but no nvcc was found: run tools/install-nvcc.sh or set NVCC"),
        None => println!("cargo::warning=nvcc not found: building lkm-engine CPU-only (run tools/install-nvcc.sh)"),
        Some(nvcc) => {
            let arch = env::var("LKM_NVCC_ARCH").unwrap_or_else(|_| "90".into());
            // Compile the files in parallel: nvcc is slow and single-threaded per file.
            let results: Vec<(PathBuf, PathBuf, std::process::Output)> = std::thread::scope(|scope| {
                let handles: Vec<_> = sources
                    .iter()
                    .map(|src| {
                        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                        let fatbin = out.join(format!("{stem}.fatbin"));
                        let mut cmd = Command::new(nvcc);
                        cmd.args(["-fatbin", "-O3", "-std=c++17", "-lineinfo"])
                            .arg(format!("-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]"))
                            .arg("-I")
                            .arg(root.join("cuda"))
                            .arg("-o")
                            .arg(&fatbin)
                            .arg(src);
                        scope.spawn(move || {
                            let output = cmd.output().expect("failed to run nvcc");
                            (src.clone(), fatbin, output)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (src, fatbin, output) in results {
                if !output.status.success() {
                    panic!(
                        "nvcc failed on {}:\n{}{}",
                        src.display(),
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
                let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                entries.push(format!("    ({stem:?}, include_bytes!({:?})),", fatbin.display().to_string()));
                for kernel in kernel_names(&fs::read_to_string(&src).unwrap()) {
                    names.push(format!("    ({kernel:?}, {stem:?}),"));
                }
            }
            println!("cargo::rustc-cfg=lkm_kernels");
        }
    }
    let code = format!(
        "/// The compiled kernel files: (file stem, sm_{} fatbin).\npub const KERNEL_FILES: &[(&str, &[u8])] = &[\n{}\n];\n\
         /// Which file defines each kernel: (kernel name, file stem).\npub const KERNEL_NAMES: &[(&str, &str)] = &[\n{}\n];\n",
        env::var("LKM_NVCC_ARCH").unwrap_or_else(|_| "90".into()),
        entries.join("\n"),
        names.join("\n")
    );
    fs::write(out.join("kernels.rs"), code).unwrap();
}
