#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp's CPU library and its Python bindings) from its PyPI sdist as a
# wheel, cached, so the `llamacpp` tests and bench/generate.py can run llama.cpp itself.
#   bench/build_llamacpp.sh CACHE_DIR [PYTHON]
# CACHE_DIR keeps the sdist (which also vendors llama.cpp's convert_hf_to_gguf.py and gguf-py, the
# third reference of tests/hf/test_gguf_llamacpp.py) and CACHE_DIR/wheels the built wheel; a wheel
# already there is reused. With PYTHON, the wheel is installed into that interpreter's environment.
# About 10 minutes on 2 cores; CI never builds it (.ci/run installs a cached wheel if there is one).
# SCRATCHGPT_LLAMACPP_NATIVE=OFF builds a portable wheel (no -march=native) for other machines.
# On CPUs with AMX (Sapphire Rapids and later) a native build repacks Q8_0 weights for AMX, which crashed here
# (SIGSEGV, in a VM): load models with --no-repack (llama-cli) / use_extra_bufts=False (the tests do).
# CI installs the wheel from $SCRATCHGPT_CACHE/llamacpp/wheels (~/.cache/scratchgpt/llamacpp/wheels).
set -euo pipefail
VERSION=0.3.36
CACHE=${1:?usage: bench/build_llamacpp.sh CACHE_DIR [PYTHON]}
PY=${2:-}
BUILD_PY=${PY:-python3}
mkdir -p "$CACHE/wheels"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$BUILD_PY" -m pip download --disable-pip-version-check "llama-cpp-python==$VERSION" \
        --no-deps --no-binary :all: -d "$CACHE"
fi
WHEEL=$(ls "$CACHE"/wheels/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$WHEEL" ]; then
    start=$(date +%s)
    # only the library the bindings load: no tests, tools, examples, server or multimodal (mtmd)
    export CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=${SCRATCHGPT_LLAMACPP_NATIVE:-ON}"
    export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
    "$BUILD_PY" -m pip wheel --disable-pip-version-check --no-deps "$SDIST" -w "$CACHE/wheels"
    echo "built in $(( $(date +%s) - start )) s"
    WHEEL=$(ls "$CACHE"/wheels/llama_cpp_python-"$VERSION"-*.whl | head -1)
fi
echo "wheel: $WHEEL"
if [ -n "$PY" ]; then
    "$PY" -m pip install --disable-pip-version-check --quiet "$WHEEL"
fi
