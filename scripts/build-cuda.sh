#!/usr/bin/env bash
# Builds `streambed` with the `cuda` feature on a machine without a GPU or a CUDA install:
#   scripts/build-cuda.sh            -> target/release/streambed (CUDA build), and a stripped,
#                                       gzipped copy in .tools/gpu/streambed.gz for carrying
# CUDA 13.0 comes from NVIDIA's PyPI wheels (pinned), unpacked into .tools/cuda. Linking
# needs libcuda.so.1, which only a driver installs; a stub exporting the driver functions
# cudarc binds (each returns CUDA_ERROR_STUB_LIBRARY) is put on the link path. It is never
# shipped: on a GPU machine the binary loads the driver's real libcuda.so.1, and cuBLAS,
# cuRAND and NVRTC 13 from that machine's CUDA (PyTorch's `nvidia/cu13/lib` will do).
# Kernels are compiled to PTX for sm_90 (H100/H200) and JIT-compiled by the driver on first
# use; set CUDA_COMPUTE_CAP for other cards. Needs driver 580+ on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD/.tools/cuda
WHEELS=$PWD/.tools/cuda-wheels
PKGS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35
)

if [[ ! -x "$ROOT/bin/nvcc" ]]; then
  mkdir -p "$WHEELS"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${PKGS[@]}"
  rm -rf "$ROOT.tmp" && mkdir -p "$ROOT.tmp"
  for w in "$WHEELS"/*.whl; do python3 -m zipfile -e "$w" "$ROOT.tmp"; done
  rm -rf "$ROOT" && mv "$ROOT.tmp/nvidia/cu13" "$ROOT" && rm -rf "$ROOT.tmp"
  chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/* 2>/dev/null || true
  for lib in libcublas libcublasLt libcurand libnvrtc libcudart; do
    ln -sf "$(cd "$ROOT/lib" && ls $lib.so.* | head -n1)" "$ROOT/lib/$lib.so"
  done
fi

if [[ ! -f "$ROOT/lib/stubs/libcuda.so" ]]; then
  cargo fetch -q
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$(awk '/name = "cudarc"/{getline; gsub(/[" ]/,""); sub("version=",""); print; exit}' Cargo.lock)"/src/driver/sys/mod.rs | head -n1)
  mkdir -p "$ROOT/lib/stubs"
  grep -oP '^pub unsafe fn \Kcu\w+' "$sys" | sort -u \
    | awk '{print "int " $1 "(void) { return 34; }"}' >"$ROOT/lib/stubs/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so.1" "$ROOT/lib/stubs/stub.c"
  ln -sf libcuda.so.1 "$ROOT/lib/stubs/libcuda.so"
fi

export CUDA_ROOT=$ROOT CUDA_PATH=$ROOT CUDA_HOME=$ROOT PATH=$ROOT/bin:$PATH
export CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
cargo build --release --locked --features cuda --bin streambed
mkdir -p .tools/gpu
strip -o .tools/gpu/streambed target/release/streambed
gzip -f .tools/gpu/streambed
ls -la .tools/gpu/streambed.gz
