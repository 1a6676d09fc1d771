"""Race nanoGPT's shakespeare_char recipes against scratchgpt's fastest recipes, side by side.

    python bench/race_nanogpt.py --nanogpt /path/to/nanoGPT --pairs 3                 # CPU: README's CPU recipe
    python bench/race_nanogpt.py --nanogpt /path/to/nanoGPT --pairs 3 --device cuda   # GPU: its GPU recipe

CPU: nanoGPT's README "I only have a macbook" recipe vs configs/shakespeare-char-fast.yaml, both
evaluated at context 64. GPU (--device cuda): config/train_shakespeare_char.py as it is (6L/6H/384,
context 256, batch 64, dropout 0.2, 5000 iters, torch.compile) vs configs/shakespeare-char-gpu.yaml,
both evaluated at context 256.

nanoGPT's source is given by path and never copied into this repository. Both trainers see the
same split (the first 90% of the text for training, the last 10% for validation, as nanoGPT's
shakespeare_char/prepare.py); the runs alternate (N, S, S, N, N, S, ...) so drift in machine load
hits both. For every run we record:

  wall   the whole process, from the command's start to its exit (what a user waits for), split into
         start-up (start to the first training step), loop (the training steps and their evaluations)
         and teardown (the last step to exit: final evaluation, checkpoint, report, interpreter exit).
         Ours: loop = elapsed_s of its last metrics.jsonl row. nanoGPT: from its first to its last
         "iter N" log line, each time-stamped as the line arrives.
  val    the final model on the WHOLE val split in non-overlapping --context windows, by one
         evaluator (scratchgpt.evaluate.evaluate_lm) for both trainers: nanoGPT's ckpt.pt is
         converted to safetensors by a helper run inside nanoGPT's directory, and loaded into
         our GPT (its module names map 1:1 once `_orig_mod.` is stripped)
  load   other processes' CPU use during the run, in cores (from /proc/stat minus our child's
         own CPU time); runs with load > ~0.3 cores are marked, as the 2 cores are shared

and print a table of medians and the ratio ours/nanoGPT. --json writes every figure.

--busy N starts N CPU-bound background processes (`while True: pass`, each ended by the race, and
by a deadline of its own) before the first run and keeps them for the whole race, the same for both
contenders: a laptop is seldom quiet. The table then records their load.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's scratchgpt, whatever `pip install -e` points at
# the same for the training subprocesses
OURS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"  # ../shared beside the checkout; --text for another
# nanoGPT README, "I only have a macbook" (CPU) section, verbatim but for where data and output go
NANOGPT_README_CPU = ("config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 "
                      "--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 "
                      "--lr_decay_iters=2000 --dropout=0.0")
OURS_FAST = "--config configs/shakespeare-char-fast.yaml"
# nanoGPT's GPU recipe: its config file as it is (on CUDA, torch.compile on, bf16)
NANOGPT_GPU = "config/train_shakespeare_char.py"
OURS_GPU = "--config configs/shakespeare-char-gpu.yaml"
RECIPES = {"cpu": (NANOGPT_README_CPU, OURS_FAST, 64), "cuda": (NANOGPT_GPU, OURS_GPU, 256)}

# Run inside nanoGPT's directory with nanoGPT's own torch.load: its ckpt.pt is its own file, and
# holds only tensors and plain config values, so weights_only=True loads it.
_EXPORT_NANOGPT = r"""
import sys, json, torch
from safetensors.torch import save_file
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
sd = {k.removeprefix("_orig_mod."): v.contiguous().clone() for k, v in ck["model"].items()}
sd.pop("lm_head.weight", None)  # tied to transformer.wte.weight in nanoGPT's GPT
save_file(sd, sys.argv[2])
json.dump({"model_args": ck["model_args"], "iter_num": ck["iter_num"], "best_val_loss": float(ck["best_val_loss"])},
          open(sys.argv[3], "w"))
"""


# ---------------------------------------------------------------- data
def write_nanogpt_data(text_path: Path, out: Path) -> None:
    """nanoGPT's data/shakespeare_char/prepare.py, minus the download: train.bin, val.bin, meta.pkl."""
    out.mkdir(parents=True, exist_ok=True)
    data = text_path.read_text(encoding="utf-8")
    chars = sorted(set(data))
    stoi = {c: i for i, c in enumerate(chars)}
    itos = {i: c for i, c in enumerate(chars)}
    n = len(data)
    np.array([stoi[c] for c in data[: int(n * 0.9)]], dtype=np.uint16).tofile(out / "train.bin")
    np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16).tofile(out / "val.bin")
    with open(out / "meta.pkl", "wb") as f:  # nanoGPT's own metadata format, for nanoGPT's train.py only
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)


def prepare_data(text_path: Path, work: Path, ours_data: Path | None) -> tuple[Path, Path]:
    ng = work / "nanogpt_data"
    write_nanogpt_data(text_path, ng)
    if ours_data is None:
        ours_data = work / "data"
        run([sys.executable, "-m", "scratchgpt", "prepare", str(text_path), "--out", str(ours_data),
             "--tokenizer", "char", "--force"], quiet=True, env=OURS_ENV)
    for split in ("train", "val"):  # the race is only fair on identical splits
        a = np.fromfile(ng / f"{split}.bin", dtype=np.uint16)
        b = np.fromfile(ours_data / f"{split}.bin", dtype=np.uint16)
        if a.shape != b.shape or not (a == b).all():
            raise SystemExit(f"{split} split differs between {ng} and {ours_data}")
    return ng, ours_data


# ---------------------------------------------------------------- measuring
def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, sum(v[:8])


def foreign_load(seconds: float = 1.0) -> float:
    """Cores busy over `seconds`, from /proc/stat (nothing of ours runs while this samples)."""
    b0, t0 = _cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = _cpu_jiffies()
    return (os.cpu_count() or 1) * (b1 - b0) / max(t1 - t0, 1)


def wait_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (up to max_wait s) for other processes to use under `threshold` cores; returns the last reading."""
    deadline = time.time() + max_wait
    load = foreign_load()
    while load > threshold and time.time() < deadline:
        load = foreign_load(2.0)
    return load


def run(cmd: list[str], cwd: Path | None = None, quiet: bool = False, log: Path | None = None,
        env: dict | None = None) -> dict:
    """Run to completion; returns wall time, our CPU seconds, the other processes' load in cores, and
    each output line with the second it arrived (for the start-up / loop / teardown split)."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, j0 = _cpu_jiffies()
    t0 = time.time()
    lines: list[tuple[float, str]] = []
    out = open(log, "w") if log else None
    try:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE if log else
                             (subprocess.DEVNULL if quiet else None), stderr=subprocess.STDOUT if log else None,
                             text=True, errors="replace")
        if log:
            for line in p.stdout:
                lines.append((time.time() - t0, line.rstrip("\n")))
                out.write(line)
        p.wait()
    finally:
        if log:
            out.close()
    t1 = time.time()
    b1, j1 = _cpu_jiffies()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"command failed ({p.returncode}): {shlex.join(cmd)}\n{tail}")
    ncpu = os.cpu_count() or 1
    busy_s = (b1 - b0) / max(j1 - j0, 1) * ncpu * (t1 - t0)
    ours_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"t0": t0, "process_s": t1 - t0, "wall_s": t1 - t0, "cpu_s": ours_s,
            "load": max(0.0, (busy_s - ours_s) / (t1 - t0)), "lines": lines}


def split_phases(r: dict, loop_start: float, loop_end: float) -> None:
    """Start-up, loop and teardown seconds of a finished run (they add up to its whole-process wall)."""
    r["startup_s"] = max(0.0, loop_start)
    r["loop_s"] = max(0.0, loop_end - loop_start)
    r["teardown_s"] = max(0.0, r["process_s"] - loop_end)
    del r["lines"]


def start_busy(n: int, seconds: float) -> list[subprocess.Popen]:
    """N bounded CPU-bound processes: each spins until the race ends it or its own deadline passes."""
    spin = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(n)]


def last_mtime(paths: list[Path]) -> float:
    times = []
    for p in paths:
        if p.is_dir():
            times += [q.stat().st_mtime for q in p.rglob("*")] + [p.stat().st_mtime]
        elif p.exists():
            times.append(p.stat().st_mtime)
    if not times:
        raise SystemExit(f"no checkpoint found among {paths}")
    return max(times)


# ---------------------------------------------------------------- the two contenders
def run_nanogpt(nanogpt: Path, args: str, data: Path, out: Path, log: Path, eval_data: Path, context: int = 64) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    # --dataset=<absolute path>: nanoGPT joins it onto 'data/', which keeps an absolute path as is
    cmd = [sys.executable, "train.py", *shlex.split(args), f"--dataset={data}", f"--out_dir={out}"]
    r = run(cmd, cwd=nanogpt, log=log)
    iters = [t for t, line in r["lines"] if re.match(r"(step|iter) \d+", line)]
    if not iters:
        raise SystemExit(f"no 'iter N' lines in {log}")
    split_phases(r, iters[0], iters[-1])
    r["checkpoint_s"] = last_mtime([out / "ckpt.pt"]) - r["t0"]
    st, meta = out / "model.safetensors", out / "export.json"
    subprocess.run([sys.executable, "-c", _EXPORT_NANOGPT, str(out / "ckpt.pt"), str(st), str(meta)], cwd=nanogpt,
                   check=True)
    info = json.loads(meta.read_text())
    r["iters"] = info["iter_num"]
    r["est_val"] = info["best_val_loss"]
    r["val"] = evaluate_nanogpt(st, info["model_args"], eval_data, context)  # our data dir: same tokens, checked above
    return r


def run_ours(args: str, data: Path, out: Path, log: Path, context: int = 64, repo: Path = REPO) -> dict:
    """`scratchgpt train` of the checkout `repo` (this one, or an older commit's for a before/after race)."""
    cmd = [sys.executable, "-m", "scratchgpt", "train", "--data", str(data), "--out", str(out), "--force",
           "--train.progress", "false", *shlex.split(args)]
    env = {**OURS_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo / "src"), os.environ.get("PYTHONPATH")]))}
    r = run(cmd, cwd=repo, log=log, env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    loop = max(row.get("elapsed_s", 0.0) for row in rows)
    # the loop ends where the last "step N:" line arrives (the final evaluation follows it)
    ends = [t for t, line in r["lines"] if re.match(r"step \d+: ", line)]
    loop_end = ends[-1] if ends else r["process_s"]
    split_phases(r, loop_end - loop, loop_end)
    r["checkpoint_s"] = last_mtime([out / "latest", out / "best"]) - r["t0"]
    res = json.loads((out / "result.json").read_text())
    r["iters"], r["est_val"] = res["step"], res.get("best_val_loss")
    r["stop"] = res.get("stop_reason")
    r["val"] = evaluate_ours(out, data, context)
    return r


def _evaluate(model, data: Path, context: int) -> float:
    import torch
    from scratchgpt.data import TokenDataset
    from scratchgpt.metrics import evaluate_lm

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    return evaluate_lm(model, TokenDataset(data, "val", 1), context=context)["val_loss"]


def evaluate_nanogpt(weights: Path, model_args: dict, data: Path, context: int = 64) -> float:
    from safetensors.torch import load_file
    from scratchgpt.model import GPT, ModelConfig

    a = model_args
    cfg = ModelConfig(vocab_size=a["vocab_size"], block_size=a["block_size"], n_layer=a["n_layer"], n_head=a["n_head"],
                      n_embd=a["n_embd"], bias=a["bias"], dropout=0.0, pos="learned", mlp="gelu", norm="layernorm",
                      tie_embeddings=True)
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"nanoGPT weights do not map onto GPT: missing {missing}, unexpected {unexpected}")
    return _evaluate(model, data, context)


def evaluate_ours(run_dir: Path, data: Path, context: int = 64) -> float:
    from scratchgpt.checkpoint import load_run

    model = load_run(run_dir, "best").gpt
    return _evaluate(model, data, context)


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT (never committed here)")
    ap.add_argument("--pairs", type=int, default=3, help="side-by-side pairs (nanoGPT run + our run)")
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--data", type=Path, default=None, help="our prepared data dir (default: prepared from --text)")
    ap.add_argument("--device", choices=sorted(RECIPES), default="cpu",
                    help="cpu: the README's CPU recipe vs the fast config; cuda: the GPU recipe vs the GPU config")
    ap.add_argument("--nanogpt-args", default=None, help="default: the --device's recipe")
    ap.add_argument("--ours-args", default=None, help="scratchgpt train flags (default: the --device's config)")
    ap.add_argument("--context", type=int, default=None, help="evaluation windows (default: 64 on cpu, 256 on cuda)")
    ap.add_argument("--only", choices=["both", "ours", "nanogpt"], default="both")
    ap.add_argument("--ours-repo", type=Path, default=REPO,
                    help="the scratchgpt checkout to race (default: this one; e.g. a worktree of an older commit)")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="wait up to this long for a quiet CPU before each run")
    ap.add_argument("--busy", type=int, default=0,
                    help="N CPU-bound background processes for the whole race, the same for both contenders")
    ap.add_argument("--busy-limit", type=float, default=7200.0, help="each busy process ends itself after this long")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a new temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    a = ap.parse_args()
    recipe = RECIPES[a.device]
    a.nanogpt_args = a.nanogpt_args or recipe[0]
    a.ours_args = a.ours_args or recipe[1]
    a.context = a.context or recipe[2]

    work = a.work or Path(tempfile.mkdtemp(prefix="race-"))
    work.mkdir(parents=True, exist_ok=True)
    ng_data, data = prepare_data(a.text, work, a.data)
    contenders = {"nanogpt": lambda i: run_nanogpt(a.nanogpt.resolve(), a.nanogpt_args, ng_data, work / f"ng{i}",
                                                   work / f"ng{i}.log", data, a.context),
                  "ours": lambda i: run_ours(a.ours_args, data, work / f"ours{i}", work / f"ours{i}.log", a.context,
                                                a.ours_repo.resolve())}
    names = ["nanogpt", "ours"] if a.only == "both" else [a.only]
    results: dict[str, list[dict]] = {n: [] for n in names}
    print(f"work dir {work}; {a.device} race, val at context {a.context}; load before start {os.getloadavg()}",
          file=sys.stderr)
    # quiet means: nothing but the busy processes we started ourselves
    before = wait_quiet(a.quiet_wait)
    busy = start_busy(a.busy, a.busy_limit)
    try:
        for i in range(a.pairs):
            order = names if i % 2 == 0 else names[::-1]  # N S | S N | N S ...: drift hits both equally
            for name in order:
                if i or name != order[0]:
                    before = wait_quiet(a.quiet_wait, threshold=a.busy + 0.3)
                r = contenders[name](i)
                r["load_before"] = before
                results[name].append(r)
                print(f"pair {i} {name:8s} wall {r['wall_s']:7.1f}s (start-up {r['startup_s']:.1f}, loop "
                      f"{r['loop_s']:.1f}, teardown {r['teardown_s']:.1f})  val {r['val']:.4f}  (est {r['est_val']}, "
                      f"{r['iters']} iters, {r.get('stop', '')})  cpu {r['cpu_s']:.0f}s  other load "
                      f"{r['load']:.2f} cores", file=sys.stderr, flush=True)
    finally:
        for p in busy:
            p.kill()

    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "val", "process_s", "load", "startup_s",
                                                                 "loop_s", "teardown_s")}
           for n, rs in results.items()}
    print(f"\nwhole process, start to exit; {a.busy} busy process(es) beside both contenders")
    for n in names:
        print(f"{n}: median start-up {med[n]['startup_s']:.1f} s, loop {med[n]['loop_s']:.1f} s, teardown "
              f"{med[n]['teardown_s']:.1f} s, other load {med[n]['load']:.2f} cores")
    print("\n| run | " + " | ".join(f"{n} wall s | {n} val" for n in names) + (" | wall ratio |" if len(names) == 2 else " |"))
    print("|---" * (1 + 2 * len(names) + (len(names) == 2)) + "|")
    ratios = []
    for i in range(a.pairs):
        row = [f"{results[n][i]['wall_s']:.1f} | {results[n][i]['val']:.4f}" for n in names]
        line = f"| {i} | " + " | ".join(row)
        if len(names) == 2:
            ratios.append(results["ours"][i]["wall_s"] / results["nanogpt"][i]["wall_s"])
            line += f" | {ratios[-1]:.3f}"
        print(line + " |")
    line = "| median | " + " | ".join(f"{med[n]['wall_s']:.1f} | {med[n]['val']:.4f}" for n in names)
    if len(names) == 2:
        line += f" | {statistics.median(ratios):.3f}"
    print(line + " |")
    if len(names) == 2:
        ok = med["ours"]["val"] <= med["nanogpt"]["val"] and statistics.median(ratios) <= 0.2
        goal = "G1" if a.device == "cpu" else "GPU goal"
        print(f"\n{goal} (val <= nanoGPT's and wall <= 1/5 of its): {'met' if ok else 'not met'}; median wall ratio "
              f"{statistics.median(ratios):.3f} (nanoGPT/ours {1 / statistics.median(ratios):.2f}x); "
              f"median other load {statistics.median(r['load'] for rs in results.values() for r in rs):.2f} cores")
        ok3 = med["ours"]["val"] <= 1.70 and statistics.median(ratios) <= 1.0
        if a.device == "cpu":  # 1.70 is a figure of the CPU recipes
            print(f"G3 (val <= 1.70 within nanoGPT's wall time): {'met' if ok3 else 'not met'}; ours "
                  f"{med['ours']['val']:.4f} in {med['ours']['wall_s']:.1f} s vs nanoGPT's {med['nanogpt']['wall_s']:.1f} s")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results,
                                      "medians": med, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
