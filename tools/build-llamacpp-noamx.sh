#!/usr/bin/env bash
# Builds llama.cpp's CPU tools as ../shared/peers/build-llamacpp.sh does (same source: the
# llama-cpp-python sdist on PyPI), but without ggml's AMX kernels, which segfault at their first
# `ldtilecfg` on this project's Intel Xeon under KVM. AVX2, AVX-512, VNNI and BF16 stay on, so the
# peer keeps every fast path this CPU runs. About 10 minutes on 2 cores, once.
# Usage: tools/build-llamacpp-noamx.sh [DEST]   (default: ~/.cache/ember-peers/llama.cpp-noamx)
# `ember bench --compare --peers llama.cpp` and `python -m ember.server.benchmark` find DEST/bin.
set -euo pipefail
DEST=${1:-$HOME/.cache/ember-peers/llama.cpp-noamx}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
if [ -x "$DEST/bin/llama-bench" ]; then echo "already built: $DEST/bin"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF >/dev/null
cmake --build "$work/build" -j"$(nproc)" --target llama-bench llama-batched-bench llama-server llama-cli llama-quantize >/dev/null
mkdir -p "$DEST/bin"
cp "$work"/build/bin/llama-* "$DEST/bin/"
echo "built: $DEST/bin"
