#!/usr/bin/env python3
"""Builds cuda-emu: a stand-in libcuda.so that runs the engine's own kernels (cuda/*.cu) on the CPU.

    python3 tools/cuda-emu/build.py            # -> target/cuda-emu/libcuda.so (and .so.1)
    LD_LIBRARY_PATH=$PWD/target/cuda-emu cargo test --release --test gpu_norm_pool -- --ignored

Each kernel file is copied to target/cuda-emu/src with two rewrites, so that g++ compiles it as host C++ under
tools/cuda-emu/emu.h: every inline-assembly statement becomes a call of emu::ptx with the same instruction text and
its operands (outputs by address, inputs by value), and `extern __shared__ T name[];` becomes a pointer to the
emulator's dynamic shared memory. The kernels (`extern "C" __global__` functions, found after preprocessing) are
registered by name with a launcher that unpacks cuLaunchKernel's argument array into their parameters. The cuda/
files themselves are not changed.

The kernels' host-side contract (parameter structs, grids, shared memory sizes, routing) is the engine's own, so a GPU
test that passes here has exercised it; numerics differ from the GPU in the last bits (libm's expf, no fused
multiply-adds, float64 sums inside emulated tensor-core products), and timing means nothing.
"""
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(ROOT, "target", "cuda-emu")
SRC = os.path.join(OUT, "src")
# Kernel files left out (none: every file compiles under emu.h).
SKIP = set()


def cuda_include():
    for d in [os.path.join(ROOT, ".toolchain", "cuda", "include"), os.environ.get("CUDA_HOME", "") + "/include",
              "/usr/local/cuda/include"]:
        if os.path.isfile(os.path.join(d, "cuda.h")):
            return d
    sys.exit("cuda-emu: cuda.h not found (run tools/install-nvcc.sh)")


def matching(text, i, open_ch="(", close_ch=")"):
    """Index of the bracket closing the one at text[i], skipping string literals."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == '"':
            j += 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
        elif c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise ValueError("unbalanced brackets")


def split_top(text, sep):
    """Splits at `sep` outside brackets and string literals."""
    parts, depth, cur, j = [], 0, "", 0
    while j < len(text):
        c = text[j]
        if c == '"':
            k = j + 1
            while text[k] != '"':
                k += 2 if text[k] == "\\" else 1
            cur += text[j:k + 1]
            j = k + 1
            continue
        if c in "([{<" and not (c == "<" and sep == ":"):
            depth += 1
        elif c in ")]}>" and not (c == ">" and sep == ":"):
            depth -= 1
        if c == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
        j += 1
    parts.append(cur)
    return parts


def rewrite_asm(text):
    """asm [volatile] ("..." : outs : ins : clobbers); -> emu::ptx("...", {emu::out(o).., emu::in(i)..});"""
    out, pos = "", 0
    for m in re.finditer(r"\basm\s+(volatile\s*)?\(|\basm\(", text):
        if m.start() < pos:
            continue
        open_at = m.end() - 1
        close_at = matching(text, open_at)
        sections = split_top(text[open_at + 1:close_at], ":")
        tmpl = sections[0].strip()
        operands = []
        for kind, section in (("out", sections[1] if len(sections) > 1 else ""),
                              ("in", sections[2] if len(sections) > 2 else "")):
            for op in split_top(section, ","):
                op = op.strip()
                if not op:
                    continue
                cm = re.match(r'"([^"]*)"\s*\((.*)\)\s*$', op, re.S)
                if not cm:
                    raise ValueError(f"operand {op!r}")
                operands.append(f"emu::{kind}({cm.group(2)})")
        out += text[pos:m.start()] + f"emu::ptx({tmpl}, {{{', '.join(operands)}}})"
        pos = close_at + 1
    return out + text[pos:]


def rewrite_shared(text):
    return re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+\w+)?)\s+(\w+)\[\];",
                  r"\1* \2 = reinterpret_cast<\1*>(emu::dyn_smem);", text)


def kernels(preprocessed):
    """(name, [parameter types]) of every extern "C" kernel in preprocessed source."""
    found = []
    for m in re.finditer(r'extern\s+"C"\s+EMU_GLOBAL\s+void\s+(\w+)\s*\(', preprocessed):
        close = matching(preprocessed, m.end() - 1)
        params = preprocessed[m.end():close].strip()
        types = []
        for p in split_top(params, ",") if params else []:
            p = p.strip()
            pm = re.match(r"(.*?)(\w+)\s*$", p, re.S)
            types.append(pm.group(1).strip())
        found.append((m.group(1), types))
    return found


def write_if_changed(path, text):
    """Writes text to path unless it already holds it (so that make-style staleness checks see no change)."""
    if not os.path.exists(path) or open(path).read() != text:
        open(path, "w").write(text)


def compile_if_stale(flags, src, obj, deps, what):
    """Compiles src to obj with flags when obj is older than src or any of deps."""
    if os.path.exists(obj) and os.path.getmtime(obj) >= max(os.path.getmtime(d) for d in deps + [src]):
        return
    r = subprocess.run(flags + ["-c", src, "-o", obj], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"cuda-emu: compiling {what} failed:\n{r.stderr[:20000]}")


def main():
    include = cuda_include()
    os.makedirs(SRC, exist_ok=True)
    cuda_dir = os.path.join(ROOT, "cuda")
    files = sorted(f for f in os.listdir(cuda_dir) if f.endswith((".cu", ".cuh")) and f not in SKIP)
    for f in files:
        text = open(os.path.join(cuda_dir, f)).read()
        write_if_changed(os.path.join(SRC, f), rewrite_shared(rewrite_asm(text)))
    flags = ["g++", "-std=c++20", "-O2", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-w",
             "-include", os.path.join(HERE, "emu.h"), "-I", SRC, "-I", HERE, "-I", include]

    def build_unit(f):
        src = os.path.join(SRC, f)
        pre = subprocess.run(flags + ["-DEMU_SCAN", "-E", "-x", "c++", src], capture_output=True, text=True)
        if pre.returncode:
            sys.exit(f"cuda-emu: preprocessing {f} failed:\n{pre.stderr}")
        found = kernels(pre.stdout)
        unit = os.path.join(SRC, f[:-3] + ".emu.cpp")
        lines = [f'#include "{f}"', '#include <type_traits>',
                 'extern "C" void emu_register(const char*, void (*)(void**));', "namespace {",
                 "struct EmuRegister {", "    EmuRegister() {"]
        for name, types in found:
            args = ", ".join(f"*reinterpret_cast<std::remove_cv_t<{t}>*>(a[{i}])" for i, t in enumerate(types))
            lines.append(f'        emu_register("{name}", [](void** a) {{ {name}({args}); }});')
        lines += ["    }", "} emu_register_" + f[:-3] + ";", "}  // namespace", ""]
        write_if_changed(unit, "\n".join(lines))
        obj = unit[:-4] + ".o"
        compile_if_stale(flags, unit, obj, [os.path.join(SRC, g) for g in files] + [os.path.join(HERE, "emu.h")], f)
        return obj, len(found)

    units = [f for f in files if f.endswith(".cu")]
    runtime = ["fibers.cpp", "ptx.cpp", "driver.cpp"]

    def build_runtime(f):
        obj = os.path.join(OUT, f[:-4] + ".o")
        compile_if_stale(flags, os.path.join(HERE, f), obj, [os.path.join(HERE, h) for h in ("emu.h", "internal.h")], f)
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        built = list(pool.map(build_unit, units))
        objs = [o for o, _ in built] + list(pool.map(build_runtime, runtime))
    lib = os.path.join(OUT, "libcuda.so.1")
    r = subprocess.run(["g++", "-shared", "-o", lib] + objs + ["-lpthread"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"cuda-emu: linking failed:\n{r.stderr}")
    link = os.path.join(OUT, "libcuda.so")
    if not os.path.islink(link):
        os.symlink("libcuda.so.1", link)
    print(f"cuda-emu: {sum(n for _, n in built)} kernels from {len(units)} files -> {lib}")


if __name__ == "__main__":
    main()
