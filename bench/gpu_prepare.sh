#!/usr/bin/env bash
# Run HERE, before a GPU session (no GPU needed): what the GPU image lacks, into ignored folders that the
# device tool's `carry` takes along (64 MiB in all; this is ~6 MiB).
#
#   bash bench/gpu_prepare.sh /path/to/nanoGPT ../shared/data/tinyshakespeare.txt
#
# -> .whl/                     wheels for CPython 3.12 x86-64: what `scratchgpt` imports (jsonargparse,
#                              docstring-parser, typeshed-client) and the serve extra, so the whole suite runs
#    data/nanoGPT/             nanoGPT's train.py, model.py, configurator.py and config/ (no .git)
#    data/tinyshakespeare.txt  the race's corpus
#
# Then, on the device (each call under 600 s; limits in bench/gpu_session.sh):
#   carry [".whl", "data"], command: bash bench/gpu_session.sh tests throughput
#   carry [".whl", "data"], command: bash bench/gpu_session.sh race
# gpu_session.sh installs .whl/ into /tmp/site when it finds it. Versions are pinned to what the suite
# passes with here; the image already has PyYAML, typing-extensions, h11, anyio, click, httpx.
set -euo pipefail
cd "$(dirname "$0")/.."
NANOGPT=${1:?usage: gpu_prepare.sh NANOGPT_DIR TINYSHAKESPEARE_TXT}
TEXT=${2:?usage: gpu_prepare.sh NANOGPT_DIR TINYSHAKESPEARE_TXT}
WHEELS=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
        fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
        typing-inspection==0.4.2 uvicorn==0.54.0)
PLATFORMS=()
for n in 2_28 2_27 2_17; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p .whl data/nanoGPT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
cp "$NANOGPT"/train.py "$NANOGPT"/model.py "$NANOGPT"/configurator.py data/nanoGPT/
cp -r "$NANOGPT"/config data/nanoGPT/
cp "$TEXT" data/tinyshakespeare.txt
du -sh .whl data/nanoGPT data/tinyshakespeare.txt
