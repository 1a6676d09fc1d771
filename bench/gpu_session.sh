#!/usr/bin/env bash
# One session on a GPU machine: the CUDA tests, throughput against nanoGPT at GPT-2 size, the GPU race.
# Each stage has its own time limit and writes into $OUT; run the stages in one call or split them.
# First, here: bash bench/gpu_prepare.sh NANOGPT_DIR TINYSHAKESPEARE_TXT (wheels into .whl/, nanoGPT and
# the corpus into data/); then two device calls of under 600 s each, both carrying [".whl", "data"]:
#
#   bash bench/gpu_session.sh tests throughput loss # ~9 min at most
#   bash bench/gpu_session.sh race                  # ~6 min at most
#
# Stages (default: tests throughput race), with their limits and rough times on one H200:
#   tests       pytest tests/test_gpu.py (the `gpu` tests)              limit 180 s (~1-2 min)
#   suite       the whole suite, GPU tests included                     limit 420 s (~4 min; .whl has the serve extra)
#   throughput  bench/gpu.py, GPT-2 shape, eager and compiled, 1 round   limit 300 s (~3 min: compiling dominates)
#   variants    bench/gpu.py, eager, each of ours' switches, 1 round     limit 300 s
#   race        bench/race_nanogpt.py --device cuda, 1 pair              limit 360 s (~3-4 min: nanoGPT's 5000 iters)
#   loss        bench/loss_chunks.py, bf16, GPT-2 width and vocabulary   limit 60 s (seconds)
# nanoGPT (a checkout of karpathy/nanoGPT) and tinyshakespeare.txt are not part of this repository:
# they sit under the ignored data/ directory (or point NANOGPT and TEXT elsewhere). Runs and checkpoints
# go to $WORK; $OUT gets one log per stage (stdout and stderr), machine.txt and the JSON results.
# BENCH_ARGS / RACE_ARGS are added to the bench commands, e.g. a dry run on a CPU:
#   BENCH_ARGS="--device cpu --shape tiny --compile eager --iters 12 --warmup 4 --log-interval 2" \
#       bash bench/gpu_session.sh tests throughput
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU image's interpreter is python3
if ! "$PY" -c "import jsonargparse, uvicorn" 2> /dev/null && ls .whl/*.whl > /dev/null 2>&1; then
    # what the GPU image lacks (bench/gpu_prepare.sh); a machine that has it all installs nothing
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
OUT=${OUT:-out/gpu-session}
WORK=${WORK:-${TMPDIR:-/tmp}/gpu-session-work}
NANOGPT=${NANOGPT:-data/nanoGPT}
TEXT=${TEXT:-data/tinyshakespeare.txt}
STAGES=${*:-tests throughput race}
mkdir -p "$OUT" "$WORK"
TEXT_ARG=()
[ -f "$TEXT" ] && TEXT_ARG=(--text "$TEXT")  # throughput runs fall back to any text; the race needs this one
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    lscpu | grep -E "Model name|^CPU\(s\)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

stage() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    PYTHONUNBUFFERED=1 timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.log"
}

for s in $STAGES; do
    case $s in
        tests) stage tests 180 "$PY" -m pytest tests/test_gpu.py -p no:cacheprovider -rs --timeout 120 ;;
        suite) stage suite 420 "$PY" -m pytest -p no:cacheprovider -rs --timeout 200 ;;
        throughput) stage throughput 300 "$PY" bench/gpu.py --nanogpt "$NANOGPT" "${TEXT_ARG[@]}" --rounds 1 \
                        --work "$WORK/throughput" --json "$OUT/throughput.json" ${BENCH_ARGS:-} ;;
        variants) stage variants 300 "$PY" bench/gpu.py --nanogpt "$NANOGPT" "${TEXT_ARG[@]}" --rounds 1 --compile eager \
                      --variants all --work "$WORK/variants" --json "$OUT/variants.json" ${BENCH_ARGS:-} ;;
        race) stage race 360 "$PY" bench/race_nanogpt.py --nanogpt "$NANOGPT" --text "$TEXT" --device cuda --pairs 1 \
                  --quiet-wait 0 --work "$WORK/race" --json "$OUT/race.json" ${RACE_ARGS:-} ;;
        loss) stage loss 60 "$PY" bench/loss_chunks.py --device cuda --dtype bfloat16 --tokens 16384 --width 768 ;;
        *) echo "unknown stage $s (tests, suite, throughput, variants, race, loss)"; exit 2 ;;
    esac
done
