#!/usr/bin/env bash
# Install nvcc 13.0 (the compiler only, no driver, no GPU needed) from NVIDIA's PyPI wheels into
# .toolchain/cuda (or $1). The GPU machines run driver 580 / CUDA 13.0, so the versions are pinned to 13.0.x.
# After this, build.rs finds nvcc through .toolchain/cuda/bin or $NVCC.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.toolchain/cuda}
if [ -x "$dest/bin/nvcc" ]; then
  echo "nvcc already installed in $dest"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
  --python-version 3.11 -d "$tmp" \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
mkdir -p "$tmp/unpacked" "$dest"
for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$tmp/unpacked"; done
# Every wheel lays its files out under nvidia/cu13/ (bin, include, lib, nvvm); merge them into one CUDA root.
src=$(find "$tmp/unpacked/nvidia" -mindepth 1 -maxdepth 1 -type d -name 'cu*' | head -n 1)
cp -a "$src"/. "$dest"/
# zip does not keep permission bits.
chmod +x "$dest"/bin/* "$dest"/nvvm/bin/* 2>/dev/null || true
"$dest/bin/nvcc" --version | tail -n 2
