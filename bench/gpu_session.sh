#!/usr/bin/env bash
# One session on a GPU machine: the CUDA tests, throughput against nanoGPT at GPT-2 size, the GPU race.
# Each stage has its own time limit and writes into $OUT; run the stages in one call or split them.
#
#   NANOGPT=data/nanoGPT TEXT=data/tinyshakespeare.txt OUT=out/gpu bash bench/gpu_session.sh tests throughput race
#
# Stages (default: all but variants), with their limits and rough times on one H200:
#   tests       python -m pytest -m gpu                                  limit 240 s (~2 min)
#   throughput  bench/gpu.py, GPT-2 shape, eager and compiled, 1 round   limit 360 s (~3 min: compiling dominates)
#   variants    bench/gpu.py, eager, each of ours' switches, 1 round     limit 360 s
#   race        bench/race_nanogpt.py --device cuda, 1 pair              limit 420 s (~3-4 min: nanoGPT's 5000 iters)
# nanoGPT (a checkout of karpathy/nanoGPT) and tinyshakespeare.txt are not part of this repository:
# put them under the ignored data/ directory (or point NANOGPT and TEXT elsewhere). Runs and checkpoints
# go to $WORK; $OUT gets only logs, tables and JSON. BENCH_ARGS / RACE_ARGS are added to the bench
# commands, e.g. a dry run on a CPU:
#   BENCH_ARGS="--device cpu --shape tiny --compile eager --iters 12 --warmup 4 --log-interval 2" \
#       bash bench/gpu_session.sh tests throughput
set -u
cd "$(dirname "$0")/.."
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
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    lscpu | grep -E "Model name|^CPU\(s\)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

stage() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
    echo "== $name: exit $? after $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.out"
}

for s in $STAGES; do
    case $s in
        tests) stage tests 240 python -m pytest -m gpu -p no:cacheprovider -rs --timeout 120 ;;
        throughput) stage throughput 360 python bench/gpu.py --nanogpt "$NANOGPT" "${TEXT_ARG[@]}" --rounds 1 \
                        --work "$WORK/throughput" --json "$OUT/throughput.json" ${BENCH_ARGS:-} ;;
        variants) stage variants 360 python bench/gpu.py --nanogpt "$NANOGPT" "${TEXT_ARG[@]}" --rounds 1 --compile eager \
                      --variants all --work "$WORK/variants" --json "$OUT/variants.json" ${BENCH_ARGS:-} ;;
        race) stage race 420 python bench/race_nanogpt.py --nanogpt "$NANOGPT" --text "$TEXT" --device cuda --pairs 1 \
                  --quiet-wait 0 --work "$WORK/race" --json "$OUT/race.json" ${RACE_ARGS:-} ;;
        *) echo "unknown stage $s (tests, throughput, variants, race)"; exit 2 ;;
    esac
done
