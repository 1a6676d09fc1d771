"""Data-parallel scaling on this machine: 2 DDP processes against 1 process, same global batch.

    python bench/scaling.py                      # 3 rounds, ~4 minutes on 2 cores
    python bench/scaling.py --rounds 5 --steps 40 --json scaling.json

Configurations (each `scratchgpt train` in a fresh process, same model, data and global batch):

    1p x 1t   one process, one thread              the unit of work
    1p x 2t   one process, two intra-op threads    the best a single process does on 2 cores
    2p x 1t   torchrun, 2 DDP ranks, 1 thread each each rank computes half the batch
    (--fsdp adds 2p x 1t under FSDP2)

Rounds interleave the configurations (A, B, C, A, B, C, ...) because the cores may be shared;
the table reports the median steady-state tok/s: tokens from step --skip to the last step over
the wall time between them, read from metrics.jsonl (process start-up, imports and the final
eval are outside the window). The load average before each round is recorded: figures taken
while other jobs compete for the cores understate every configuration, and not equally
(intra-op threads suffer most: each parallel region waits for its slowest, descheduled thread).

Because wall-clock figures on a shared machine mostly measure the other jobs, each run's CPU
time is also taken (getrusage of the children: torchrun's agent and all ranks), minus that of a
run stopped at --skip (start-up, imports, the final save), giving tokens per CPU-second in the
window. Its ratio to 1p x 1t is the work efficiency: the share of the CPU spent that goes into
useful work, what the scaling efficiency would be on otherwise idle cores (upper bound: on idle
cores wall time may still include waiting in the all-reduce, which costs no CPU).

Two ratios:
  scaling efficiency  = tok/s(2p x 1t) / (2 * tok/s(1p x 1t))   how much of a second worker DDP keeps
  work efficiency     = tok/CPU-s(2p x 1t) / tok/CPU-s(1p x 1t) the same, from CPU time (robust to load)
  vs threads          = tok/s(2p x 1t) / tok/s(1p x 2t)        whether torchrun beats intra-op threads
                                                              for the same 2 cores
What they mean and do not: on one 2-core CPU both workers share memory bandwidth and caches, the
all-reduce goes over loopback TCP (gloo), and nothing is overlapped the way NCCL overlaps it on
GPUs. So this measures DDP's overhead on one small machine, not multi-node or GPU scaling, where
the interconnect, not the cores, sets the limit. A model too small for its batch makes any
parallelism look bad; too large and memory bandwidth dominates both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = {"model.n_layer": 4, "model.n_head": 4, "model.n_embd": 256, "model.block_size": 128}
QUIET = {"train.eval_interval": 10**6, "train.eval_iters": 1, "train.log_interval": 1, "train.sample_tokens": 0,
         "train.progress": "false", "train.tensorboard": "false", "train.plot": "false", "train.final_eval": "false",
         "train.peak_flops": 1e12, "train.keep_last": 1, "optim.warmup_iters": 5}


def make_data(d: Path, n_chars: int = 400_000) -> Path:
    """A char-level data dir from CPython's bundled pydoc topics (no network)."""
    import numpy as np
    from pydoc_data.topics import topics

    from scratchgpt.tokenizer import train_char_tokenizer

    text = "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]
    tok = train_char_tokenizer([text])
    ids = tok.encode_array(text).astype(np.uint16)
    split = len(ids) * 9 // 10
    d.mkdir(parents=True, exist_ok=True)
    ids[:split].tofile(d / "train.bin")
    ids[split:].tofile(d / "val.bin")
    tok.save(d)
    (d / "meta.json").write_text(json.dumps({"format_version": 1, "tokenizer": "char", "vocab_size": tok.vocab_size,
                                             "dtype": "uint16", "train_tokens": split, "val_tokens": len(ids) - split}))
    return d


def command(procs: int, threads: int, parallel: str, data: Path, out: Path, steps: int, batch: int) -> list[str]:
    flags = {**MODEL, **QUIET, "train.batch_size": batch, "train.max_iters": steps, "train.threads": threads,
             "train.parallel": parallel}
    args = ["train", f"--data={data}", f"--out={out}", "--force", *(f"--{k}={v}" for k, v in flags.items())]
    if procs == 1:
        return [sys.executable, "-m", "scratchgpt", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
            "-m", "scratchgpt", *args]


def steady_tok_s(run: Path, skip: int) -> float:
    rows = {r["step"]: r for r in map(json.loads, open(run / "metrics.jsonl"))}
    last = max(rows)
    return (rows[last]["tokens"] - rows[skip]["tokens"]) / (rows[last]["elapsed_s"] - rows[skip]["elapsed_s"])


def run_once(cmd: list[str], threads: int) -> float:
    """Run to completion; returns the CPU seconds it used (all descendants, waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode:
        sys.exit(f"failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="steps before the timed window (warm-up)")
    ap.add_argument("--batch", type=int, default=16, help="global batch in sequences of block_size tokens")
    ap.add_argument("--fsdp", action="store_true", help="also time 2 ranks under FSDP2")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    a = ap.parse_args()

    configs = [("1p x 1t", 1, 1, "none"), ("1p x 2t", 1, 2, "none"), ("2p x 1t DDP", 2, 1, "ddp")]
    if a.fsdp:
        configs.append(("2p x 1t FSDP2", 2, 1, "fsdp"))
    results: dict[str, list[float]] = {name: [] for name, *_ in configs}
    per_cpu: dict[str, list[float]] = {name: [] for name, *_ in configs}
    loads = []
    with tempfile.TemporaryDirectory(prefix="scratchgpt-scaling-") as tmp:
        data = make_data(Path(tmp) / "data")
        startup = {}  # CPU seconds of a run stopped at --skip: everything but the timed window
        for name, procs, threads, parallel in configs:
            startup[name] = run_once(command(procs, threads, parallel, data, Path(tmp) / "short", a.skip, a.batch), threads)
        for r in range(a.rounds):
            loads.append(os.getloadavg()[0])
            for name, procs, threads, parallel in configs:
                out = Path(tmp) / f"run-{r}-{procs}-{threads}-{parallel}"
                cpu = run_once(command(procs, threads, parallel, data, out, a.steps, a.batch), threads)
                rows = {row["step"]: row for row in map(json.loads, open(out / "metrics.jsonl"))}
                window_tokens = rows[a.steps]["tokens"] - rows[a.skip]["tokens"]
                results[name].append(steady_tok_s(out, a.skip))
                per_cpu[name].append(window_tokens / max(cpu - startup[name], 1e-9))
                print(f"round {r + 1}/{a.rounds} {name:14s} {results[name][-1]:9.0f} tok/s "
                      f"{per_cpu[name][-1]:9.0f} tok/CPU-s", file=sys.stderr)
    med = {name: statistics.median(v) for name, v in results.items()}
    med_cpu = {name: statistics.median(v) for name, v in per_cpu.items()}
    one, threads2, ddp = med["1p x 1t"], med["1p x 2t"], med["2p x 1t DDP"]
    report = {
        "model": MODEL, "global_batch": a.batch, "steps": a.steps, "window": [a.skip, a.steps], "rounds": a.rounds,
        "cpus": os.cpu_count(), "load_avg_before_rounds": [round(x, 2) for x in loads],
        "tok_s_median": {k: round(v, 1) for k, v in med.items()}, "tok_s_all": {k: [round(x, 1) for x in v] for k, v in results.items()},
        "scaling_efficiency_ddp": round(ddp / (2 * one), 3),
        "ddp_vs_2_threads": round(ddp / threads2, 3),
        "thread_efficiency": round(threads2 / (2 * one), 3),
        "tok_per_cpu_s_median": {k: round(v, 1) for k, v in med_cpu.items()},
        "work_efficiency": {k: round(v / med_cpu["1p x 1t"], 3) for k, v in med_cpu.items()},
    }
    if a.fsdp:
        report["scaling_efficiency_fsdp"] = round(med["2p x 1t FSDP2"] / (2 * one), 3)
    print(f"{'config':16s} {'tok/s (median)':>15s} {'tok/CPU-s':>10s} {'work eff.':>9s}   tok/s, all rounds")
    for name, v in results.items():
        print(f"{name:16s} {med[name]:15.0f} {med_cpu[name]:10.0f} {report['work_efficiency'][name]:9.2f}   "
              f"{', '.join(f'{x:.0f}' for x in v)}")
    print(f"\nscaling efficiency (DDP)  tok/s(2p x 1t) / (2 x tok/s(1p x 1t)) = {report['scaling_efficiency_ddp']:.2f}")
    print(f"DDP vs threads            tok/s(2p x 1t) / tok/s(1p x 2t)        = {report['ddp_vs_2_threads']:.2f}")
    print(f"thread efficiency         tok/s(1p x 2t) / (2 x tok/s(1p x 1t)) = {report['thread_efficiency']:.2f}")
    if a.fsdp:
        print(f"scaling efficiency (FSDP2)                                      = {report['scaling_efficiency_fsdp']:.2f}")
    print(f"load average before each round: {report['load_avg_before_rounds']} on {os.cpu_count()} CPUs")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
