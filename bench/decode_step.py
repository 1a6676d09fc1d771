"""One-token decoding step with and without scratchgpt/kernels.c, side by side (ms per token).

    python bench/decode_step.py --run RUN                 # e.g. `scratchgpt import-hf` of SmolLM2-135M-Instruct
    python bench/decode_step.py --run RUN --rounds 5 --kinds fp32 int8 int4 bf16

Each round starts one fresh process per setting, alternating (kernels on, off | off, on | ...); `off` is
SCRATCHGPT_KERNELS=0, where torch's ops run the same arithmetic. A process loads RUN's best checkpoint,
quantizes it per `--kinds`, and times `--tokens` calls of model.DecodeStep at batch 1 after a warm-up, on
`--threads` threads. Reported: the median ms per token of each kind and setting, and off / on (the speed-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import copy, json, sys, time, torch
from scratchgpt.checkpoint.load import load_run
from scratchgpt.model import DecodeStep, KVCache
from scratchgpt.quantize import quantize_model
run, kinds, tokens, threads = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
base = load_run(run, "best").language_model("sample")
out = {}
for kind in kinds:
    model = base if kind == "fp32" else quantize_model(copy.deepcopy(base), kind)
    step, tok = DecodeStep(model, KVCache(model.cfg, 1, tokens + 40)), torch.tensor([100])
    with torch.inference_mode():
        for i in range(tokens + 20):
            if i == 20:
                t0 = time.perf_counter()
            step(tok)
    out[kind] = (time.perf_counter() - t0) / tokens * 1e3
print(json.dumps(out))
"""


def one(a, kernels: bool) -> dict:
    env = {**os.environ, "SCRATCHGPT_KERNELS": "1" if kernels else "0",
           "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(a.run), ",".join(a.kinds), str(a.tokens), str(a.threads)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run directory (its best checkpoint is timed)")
    ap.add_argument("--kinds", nargs="+", default=["fp32", "int8", "int4", "bf16"], help="weight formats")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=100, help="decoding steps timed per kind and process")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    times: dict[tuple[str, bool], list[float]] = {}
    for r in range(a.rounds):
        for kernels in ([True, False] if r % 2 == 0 else [False, True]):
            for kind, ms in one(a, kernels).items():
                times.setdefault((kind, kernels), []).append(ms)
            print(f"round {r + 1} kernels {'on' if kernels else 'off'}: "
                  + ", ".join(f"{k} {times[(k, kernels)][-1]:.2f} ms" for k in a.kinds), flush=True)
    print("\n| weights | kernels on (ms/token) | kernels off (ms/token) | off / on |\n|---|---|---|---|")
    for kind in a.kinds:
        on, off = statistics.median(times[(kind, True)]), statistics.median(times[(kind, False)])
        print(f"| {kind} | {on:.2f} | {off:.2f} | {off / on:.2f}x |")


if __name__ == "__main__":
    main()
