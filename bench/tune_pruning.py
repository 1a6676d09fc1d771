"""What pruning saves in `scratchgpt tune`: the same search with and without a pruner.

The random sampler proposes the same trials whatever the results, so both searches train the
same trials in the same order; the pruned one stops the bad ones at an evaluation. The table
gives trials pruned, the wall time of each search (and the saving) and the best val loss of
each, which should be the same trial's.

    python bench/tune_pruning.py                       # the embedded corpus, 12 trials
    python bench/tune_pruning.py --data data/shakespeare_char --trials 20 --max-iters 300
    python bench/tune_pruning.py --pruners median halving --trials 6 --max-iters 40   # a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

from scratchgpt.data import default_data_dir
from scratchgpt.model import ModelConfig
from scratchgpt.optim import OptimConfig
from scratchgpt.train import TrainConfig
from scratchgpt.tune import tune

SPACE = {"optim.lr": {"low": 1e-5, "high": 3e-2, "log": True}, "model.n_embd": [32, 64]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="prepared data dir (default: the embedded corpus)")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--max-iters", type=int, default=200)
    ap.add_argument("--eval-interval", type=int, default=0, help="default: max_iters / 8")
    ap.add_argument("--pruners", nargs="+", default=["median"], choices=["median", "halving"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the searches here (default: a temp dir)")
    a = ap.parse_args()
    data = a.data or default_data_dir()
    root = a.out or Path(tempfile.mkdtemp(prefix="tune-pruning-"))
    base = dict(
        model=ModelConfig(n_layer=2, n_head=2, block_size=64),
        train=TrainConfig(batch_size=16, max_iters=a.max_iters, eval_interval=a.eval_interval or max(1, a.max_iters // 8),
                          eval_iters=5, sample_tokens=0, progress=False, tensorboard=False, plot=False, report=False,
                          peak_flops=1e11, keep_last=1),
        optim=OptimConfig(warmup_iters=10))
    rows = []
    for pruner in ["none", *a.pruners]:
        out = root / pruner
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            best = tune(SPACE, out, data=data, method="random", trials=a.trials, seed=a.seed, pruner=pruner, **base)
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
        steps = sum(r.get("step") or 0 for r in records)
        rows.append((pruner, best["trials_pruned"], steps, wall, best["val_loss"], best["trial"]))
    full_wall, full_steps = rows[0][3], rows[0][2]
    print(f"{a.trials} trials of up to {a.max_iters} steps, data {data}, searches in {root}\n")
    print(f"{'pruner':8} {'pruned':>6} {'steps trained':>14} {'wall s':>8} {'saved':>7} {'best val loss':>14} {'best trial':>10}")
    for pruner, pruned, steps, wall, loss, trial in rows:
        saved = f"{1 - wall / full_wall:.0%}" if pruner != "none" else "-"
        print(f"{pruner:8} {pruned:>6} {steps:>7} ({steps / full_steps:4.0%}) {wall:8.1f} {saved:>7} {loss:14.4f} "
              f"{'trial-%03d' % trial:>10}")


if __name__ == "__main__":
    main()
