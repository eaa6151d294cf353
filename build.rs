//! Compiles every `cuda/*.cu` file with nvcc into an sm_90 fatbin (SASS for Hopper plus PTX for later GPUs) and
//! embeds them in the binary through a generated `kernels.rs`.
//!
//! nvcc is looked up in `$NVCC`, then `.toolchain/cuda/bin/nvcc` (where `tools/install-nvcc.sh` puts it), then
//! `$CUDA_HOME/bin`, `/usr/local/cuda/bin` and `PATH`. Without nvcc the crate still builds, CPU-only, and says so; with
//! `LKM_REQUIRE_NVCC=1` (CI) a missing nvcc or a kernel that does not compile fails the build. So does a wgmma kernel
//! whose products ptxas serialises (its note C7515, asked for with `-Xptxas -v` on the sm_90a files): the tensor cores
//! would idle between them, a slowdown nothing else reports.
//!
//! It also reads the kernel parameter headers, `cuda/X.cuh` beside each `cuda/X.cu` (the subset of C++ described in
//! src/device/header.rs), and generates their Rust side, `params.rs` (structs, constants and typed kernel handles,
//! included by src/device/params.rs), with or without nvcc; a header outside the subset fails the build naming its
//! file and line. With nvcc it also compiles `params_check.cu`, generated here, whose static_asserts hold nvcc's
//! layout of every struct to the one the Rust side was generated with.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

// The crate's tests use the parts build.rs does not (the parse of a whole file into a layout table, for instance).
#[allow(dead_code)]
#[path = "src/device/header.rs"]
mod header;

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
/// `NAME_KERNEL(kernel_name, ..., CONSTANT, 16, false)` macro at the start of a line (a macro whose definition
/// declares the kernels): its lower-case arguments other than C++ keywords (`true`, `false`, `float`, `double`,
/// `int`) are kernel names; upper-case ones, numbers, booleans and types are settings. Kernel names are lower case.
/// Of common.cuh's `TYPED_KERNEL(name_f32, name_bf16, body, Params)` only the first two arguments are kernels.
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
            let setting = |a: &str| matches!(a, "true" | "false" | "float" | "double" | "int");
            // TYPED_KERNEL(name_f32, name_bf16, body, Params) (common.cuh): its first two arguments are the kernels.
            let take = if mac.trim() == "TYPED_KERNEL" { 2 } else { usize::MAX };
            let names = args.split(',').map(str::trim).take(take).filter(|a| is_kernel_name(a) && !setting(a));
            is_instance.then(|| names.map(String::from).collect::<Vec<_>>())
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
        // An upper-case name is a macro's parameter (`extern "C" __global__ void NAME(` in a #define), not a kernel.
        if let Some(name) = head.split_whitespace().last().map(|n| n.trim_start_matches('*')).filter(is_kernel_name) {
            out.push(name.to_string());
        }
    }
    out
}

/// The parameter headers: every `cuda/X.cuh` beside a `cuda/X.cu` (so not `common.cuh`), parsed, by stem. A header
/// outside the subset, a name defined by two headers, or a kernel declared in `X.cuh` but not defined in `X.cu` (or
/// the other way round) fails the build with the file and line.
fn read_headers(root: &Path, sources: &[PathBuf]) -> Vec<(String, header::Header)> {
    let mut out: Vec<(String, header::Header)> = Vec::new();
    for src in sources {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let path = root.join("cuda").join(format!("{stem}.cuh"));
        if !path.is_file() {
            continue;
        }
        println!("cargo::rerun-if-changed={}", path.display());
        let shown = format!("cuda/{stem}.cuh");
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {shown}: {e}"));
        // A header may take structs of the headers before it (sources are sorted): conv_tc.cuh uses conv.cuh's.
        let earlier: Vec<header::Struct> = out.iter().flat_map(|(_, h)| h.structs.iter().cloned()).collect();
        let parsed = header::parse_with(&shown, &text, &earlier).unwrap_or_else(|e| panic!("{e}"));
        let defined = kernel_names(&fs::read_to_string(src).unwrap());
        for k in &parsed.kernels {
            if !defined.contains(&k.name) {
                panic!(
                    "{shown}:{}: kernel `{}` is declared here but cuda/{stem}.cu does not define it",
                    k.line, k.name
                );
            }
        }
        for name in &defined {
            if !parsed.kernels.iter().any(|k| &k.name == name) {
                panic!(
                    "cuda/{stem}.cu defines kernel `{name}` but {shown} does not declare it: add \
                     `extern \"C\" __global__ void {name}(const SomeParams p);` to {shown}"
                );
            }
        }
        let names = |h: &header::Header| -> Vec<String> {
            let consts = h.consts.iter().map(|c| c.name.clone());
            let structs = h.structs.iter().map(|s| s.name.clone());
            consts.chain(structs).chain(h.kernels.iter().map(|k| k.name.clone())).collect()
        };
        for name in names(&parsed) {
            if let Some((other, _)) = out.iter().find(|(_, h)| names(h).contains(&name)) {
                panic!("{shown}: `{name}` is also defined in cuda/{other}.cuh: names are shared by all headers");
            }
        }
        out.push((stem, parsed));
    }
    out
}

/// Header comment text as a Rust doc line: outside `code spans`, the characters rustdoc would read as links, HTML or
/// emphasis (`[`, `]`, `<`, `>`, `*`) are escaped, so a comment like `[S][CH]` stays text.
fn doc_line(indent: &str, text: &str) -> String {
    let mut out = format!("{indent}///");
    if !text.is_empty() {
        out.push(' ');
    }
    let mut code = false;
    for c in text.chars() {
        if c == '`' {
            code = !code;
        } else if !code && "[]<>*".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\n');
    out
}

fn doc_block(indent: &str, lines: &[String]) -> String {
    lines.iter().map(|l| doc_line(indent, l)).collect()
}

/// The Rust type of a field (element type, then the array around it).
fn rust_type(f: &header::Field, param: Option<&str>) -> String {
    use header::{FieldType, Pointee};
    let elem = match f.ty {
        FieldType::Scalar(s) => s.rust().to_string(),
        FieldType::Ptr { pointee, mutable } => {
            let t = match pointee {
                Pointee::Scalar(s) => s.rust(),
                Pointee::Param => param.expect("a generic struct"),
            };
            format!("{}<{t}>", if mutable { "MutPtr" } else { "ConstPtr" })
        }
        FieldType::TensorMap => "TensorMap".to_string(),
    };
    match f.count {
        Some(n) => format!("[{elem}; {n}]"),
        None => elem,
    }
}

/// The Rust side of the headers: constants, `#[repr(C)]` structs, kernel handles and the layout table of the tests.
fn rust_params(headers: &[(String, header::Header)]) -> String {
    let mut code = String::from("// Generated by build.rs from the kernel parameter headers cuda/*.cuh: edit those.\n");
    let mut kernels = String::new();
    let mut layouts = String::new();
    for (stem, h) in headers {
        code.push_str(&format!("\n// cuda/{stem}.cuh\n"));
        for c in &h.consts {
            code.push_str(&doc_block("", &c.doc));
            code.push_str(&format!("pub const {}: usize = {};\n", c.name, c.value));
        }
        for s in &h.structs {
            let (generics, param) = match &s.param {
                Some(p) => (format!("<{p}>"), Some(p.as_str())),
                None => (String::new(), None),
            };
            code.push_str(&doc_block("", &s.doc));
            if !s.doc.is_empty() {
                code.push_str("///\n");
            }
            code.push_str(&format!("/// Declared in `cuda/{stem}.cuh` (line {}).\n", s.line));
            // Field names are the header's, which are the math's (L, D, N): the same on both sides.
            code.push_str("#[repr(C)]\n#[derive(Clone, Copy, Debug, Default)]\n#[allow(non_snake_case)]\n");
            code.push_str(&format!("pub struct {}{generics} {{\n", s.name));
            for f in &s.fields {
                code.push_str(&doc_block("    ", &f.doc));
                code.push_str(&format!("    pub {}: {},\n", f.name, rust_type(f, param)));
            }
            code.push_str("}\n");
            let bound = s.param.as_ref().map_or(String::new(), |p| format!("<{p}: Copy>"));
            code.push_str(&format!(
                "// SAFETY: #[repr(C)], fields in the C order with types of the C sizes and alignments (checked by the\n\
                 // static_asserts of params_check.cu under nvcc and by the layout test of src/device/params.rs).\n\
                 unsafe impl{bound} cudarc::driver::DeviceRepr for {}{generics} {{}}\n",
                s.name
            ));
            let concrete = match &s.param {
                Some(_) => format!("{}<f32>", s.name),
                None => s.name.clone(),
            };
            let offsets: Vec<String> = s
                .fields
                .iter()
                .map(|f| format!("({:?}, std::mem::offset_of!({concrete}, {}))", f.name, f.name))
                .collect();
            layouts.push_str(&format!(
                "    ({:?}, {:?}, std::mem::size_of::<{concrete}>(), std::mem::align_of::<{concrete}>(), &[{}]),\n",
                format!("cuda/{stem}.cuh"),
                s.name,
                offsets.join(", ")
            ));
        }
        for k in &h.kernels {
            let ty = match k.arg {
                Some(a) => format!("{}<{}>", k.params, a.rust()),
                None => k.params.clone(),
            };
            kernels.push_str(&doc_block("    ", &k.doc));
            if !k.doc.is_empty() {
                kernels.push_str("    ///\n");
            }
            kernels.push_str(&format!(
                "    /// Defined in `cuda/{stem}.cu`, declared in `cuda/{stem}.cuh` (line {}).\n",
                k.line
            ));
            kernels.push_str(&format!("    pub const {}: Kernel<{ty}> = Kernel::new({:?});\n", k.name, k.name));
        }
        kernels.push_str(&typed_accessors(h));
    }
    code.push_str(
        "\n/// The kernels declared in the headers, each typed by the parameter struct it takes: launch with\n\
         /// [`Gpu::launch`](crate::device::Gpu::launch).\n\
         #[allow(non_upper_case_globals)]\npub mod kernel {\n    use super::*;\n\n",
    );
    code.push_str(&kernels);
    code.push_str("}\n");
    code.push_str(
        "\n/// (header, struct, size_of, align_of, [(field, offset_of)]) of every generated struct, for the layout test.\n\
         #[cfg(test)]\n#[allow(clippy::type_complexity)]\n\
         pub(crate) const RUST_LAYOUTS: &[(&str, &str, usize, usize, &[(&str, usize)])] = &[\n",
    );
    code.push_str(&layouts);
    code.push_str("];\n");
    code
}

/// The storage-generic handles of a header: for each kernel `X_f32` taking `P<float>` with a sibling `X_bf16` taking
/// `P<__nv_bfloat16>` (the two instances of one template, common.cuh's `TYPED_KERNEL`), a function
/// `X::<T>() -> Kernel<P<T>>` that picks the instance by storage type. Not for a stem that also has an `X_tf32`
/// kernel: there `X_f32` is the exact float32 kernel, a different algorithm from `X_bf16`'s tensor cores.
fn typed_accessors(h: &header::Header) -> String {
    let mut out = String::new();
    for k in &h.kernels {
        let Some(stem) = k.name.strip_suffix("_f32") else { continue };
        let bf16 = format!("{stem}_bf16");
        let tf32 = format!("{stem}_tf32");
        let pair = h.kernels.iter().find(|o| o.name == bf16 && o.params == k.params);
        if k.arg != Some(header::Scalar::F32)
            || pair.is_none_or(|o| o.arg != Some(header::Scalar::Bf16))
            || h.kernels.iter().any(|o| o.name == tf32)
        {
            continue;
        }
        out.push_str(&format!(
            "    /// `{}` or `{bf16}`, by storage type `T` (`f32` or `half::bf16`).\n    \
             pub fn {stem}<T: crate::device::cuda::GpuElement>() -> Kernel<{}<T>> {{\n        \
             Kernel::new(T::pick({:?}, {bf16:?}))\n    }}\n",
            k.name, k.params, k.name
        ));
    }
    out
}

/// A CUDA file that includes every header and asserts the layout the Rust side was generated with, so nvcc itself
/// confirms that the two sides agree (sizes, alignments, offsets).
fn layout_check_cu(headers: &[(String, header::Header)]) -> String {
    let mut code =
        String::from("// Generated by build.rs: nvcc's layout of each parameter struct is the Rust side's.\n");
    code.push_str("#include <stddef.h>\n");
    for (stem, _) in headers {
        code.push_str(&format!("#include \"{stem}.cuh\"\n"));
    }
    for (stem, h) in headers {
        for s in &h.structs {
            let l = header::layout(s);
            let ty = match &s.param {
                Some(_) => format!("{}<float>", s.name),
                None => s.name.clone(),
            };
            let at = format!("cuda/{stem}.cuh:{}: {}", s.line, s.name);
            code.push_str(&format!(
                "static_assert(sizeof({ty}) == {}, \"{at}: size differs from the Rust side's\");\n",
                l.size
            ));
            code.push_str(&format!("static_assert(alignof({ty}) == {}, \"{at}: alignment differs\");\n", l.align));
            for (f, off) in s.fields.iter().zip(&l.offsets) {
                code.push_str(&format!(
                    "static_assert(offsetof({ty}, {}) == {off}, \"{at}: offset of {} differs\");\n",
                    f.name, f.name
                ));
            }
        }
    }
    code
}

/// Kernel files that use instructions of one chip only (wgmma: `sm_90a`). They are built for that chip's
/// arch-specific target when the build is for sm_90 and left out otherwise; the engine loads them where the GPU takes
/// them and routes to their kernels only then (src/device/cuda.rs, `Gpu::has_kernel`).
const ARCH_SPECIFIC: &[&str] = &["conv_tma", "conv_wgmma", "gemm_wgmma"];

/// A source file's stem: `conv` for cuda/conv.cu.
fn stem_of(src: &Path) -> String {
    src.file_stem().unwrap().to_string_lossy().to_string()
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

    // The Rust side of the parameter headers exists with or without nvcc: it comes from the headers alone.
    let headers = read_headers(&root, &sources);
    fs::write(out.join("params.rs"), rust_params(&headers)).unwrap();
    let check = out.join("params_check.cu");
    fs::write(&check, layout_check_cu(&headers)).unwrap();

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
                // params_check.cu is compiled for its static_asserts only; its (empty) fatbin is not embedded.
                let handles: Vec<_> = sources
                    .iter()
                    .chain([&check])
                    .filter(|src| arch == "90" || !ARCH_SPECIFIC.contains(&stem_of(src).as_str()))
                    .map(|src| {
                        let stem = stem_of(src);
                        let fatbin = out.join(format!("{stem}.fatbin"));
                        // An arch-specific file's machine code runs on sm_90 only: no PTX for newer chips beside it.
                        let target = if ARCH_SPECIFIC.contains(&stem.as_str()) {
                            format!("-gencode=arch=compute_{arch}a,code=sm_{arch}a")
                        } else {
                            format!("-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]")
                        };
                        let mut cmd = Command::new(nvcc);
                        cmd.args(["-fatbin", "-O3", "-std=c++17", "-lineinfo"])
                            .arg(target)
                            // ptxas's report on the wgmma files, for the check on C7515 below.
                            .args(if ARCH_SPECIFIC.contains(&stem.as_str()) { &["-Xptxas", "-v"][..] } else { &[] })
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
                if src == check {
                    continue;
                }
                // ptxas says C7515 (only with -v) where it serialises a kernel's wgmma instructions, the tensor cores
                // then idle between products: a silent slowdown, so it fails the build (conv_tma.cu's tma_consume
                // names one cause: a register read between two k-blocks' products).
                let serialised: Vec<_> = String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .filter(|l| l.contains("C7515"))
                    .map(String::from)
                    .collect();
                if !serialised.is_empty() {
                    panic!("ptxas serialised wgmma instructions in {}:\n{}", src.display(), serialised.join("\n"));
                }
                let stem = stem_of(&src);
                let specific = ARCH_SPECIFIC.contains(&stem.as_str());
                entries
                    .push(format!("    ({stem:?}, include_bytes!({:?}), {specific}),", fatbin.display().to_string()));
                for kernel in kernel_names(&fs::read_to_string(&src).unwrap()) {
                    names.push(format!("    ({kernel:?}, {stem:?}),"));
                }
            }
            println!("cargo::rustc-cfg=lkm_kernels");
        }
    }
    let code = format!(
        "/// The compiled kernel files: (file stem, sm_{} fatbin, whether it is built for the arch-specific target only).\n\
         pub const KERNEL_FILES: &[(&str, &[u8], bool)] = &[\n{}\n];\n\
         /// Which file defines each kernel: (kernel name, file stem).\npub const KERNEL_NAMES: &[(&str, &str)] = &[\n{}\n];\n",
        env::var("LKM_NVCC_ARCH").unwrap_or_else(|_| "90".into()),
        entries.join("\n"),
        names.join("\n")
    );
    fs::write(out.join("kernels.rs"), code).unwrap();
}
