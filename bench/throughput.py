"""Training throughput on this machine: nanoGPT versus scratchgpt, and in-process A/B of our options.

    # G2: nanoGPT's train.py and ours, same architecture and hyperparameters, alternating processes
    python bench/throughput.py g2 --nanogpt /path/to/nanoGPT --size small --pairs 3
    python bench/throughput.py g2 --nanogpt /path/to/nanoGPT --size 10m --pairs 3

    # A/B inside one process: variants take turns every few steps, so load from other processes
    # hits all of them alike; prints median tok/s per variant and the ratio to the first
    python bench/throughput.py ab --variants base fused_adamw --rounds 20

    # A/B of whole `scratchgpt train` processes at the 0.8M G2 shape, taking turns: what only a
    # fresh process shows (allocator, thread binding, torchrun). A variant is "label;ENV=V ...;flags;processes"
    # (processes > 1: launched by torchrun, batch split over the ranks)
    python bench/throughput.py runs --rounds 4 --variants "base;;" "bind;OMP_PROC_BIND=true;" \
        "tcmalloc;LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4;" "mb6;;--train.micro_batch_size 6" \
        "torchrun2;OMP_NUM_THREADS=1;--train.threads 1;2"

tok/s in g2 is steady state: tokens from step 10 to the last step over the time between them,
read from each trainer's own log (nanoGPT's per-iteration `time`, our metrics.jsonl elapsed_s),
with no evaluation in between. The 0.8M size is nanoGPT's README CPU recipe; 10m is its
config/train_shakespeare_char.py (6 layers, 384 dims, context 256, dropout 0.2) at batch 8.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from race_nanogpt import OURS_ENV, REPO, TEXT, prepare_data, run, wait_quiet  # noqa: E402  (puts REPO/src first)

SIZES = {
    # name: (nanoGPT flags, our flags, iterations, tokens per iteration)
    "small": ("config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 "
              "--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters={n} "
              "--lr_decay_iters=2000 --dropout=0.0 --eval_interval=1000000",
              "--config configs/shakespeare-char-nanogpt.yaml --train.max_iters {n} --train.eval_interval 1000000 "
              "--optim.decay_iters 2000",
              400, 12 * 64),
    "10m": ("config/train_shakespeare_char.py --device=cpu --compile=False --batch_size=8 --log_interval=1 "
            "--max_iters={n} --eval_interval=1000000 --eval_iters=1",
            "--config configs/shakespeare-char-nanogpt.yaml --model.n_layer 6 --model.n_head 6 --model.n_embd 384 "
            "--model.block_size 256 --model.dropout 0.2 --train.batch_size 8 --train.max_iters {n} "
            "--train.eval_interval 1000000 --train.eval_iters 1 --optim.decay_iters 5000",
            40, 8 * 256),
}
FIRST = 10  # steps before the window: allocator and thread pools warm


def nanogpt_tok_s(log: Path, tokens_per_iter: int) -> float:
    dts = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", log.read_text())}
    last = max(dts)
    window = [dts[i] for i in range(FIRST, last)]  # iter i's time covers its own step; iter `last` ends the run
    return tokens_per_iter * len(window) / (sum(window) / 1000)


def ours_tok_s(run_dir: Path, tokens_per_iter: int) -> float:
    rows = {r["step"]: r for r in map(json.loads, open(run_dir / "metrics.jsonl"))}
    last = max(rows)
    return tokens_per_iter * (last - FIRST) / (rows[last]["elapsed_s"] - rows[FIRST]["elapsed_s"])


def our_train_cmd(data: Path, out: Path, flags: str, nproc: int = 1) -> list[str]:
    """`scratchgpt train` for a throughput window: log every 10 steps, no final eval, bar or samples."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "scratchgpt", "train", "--data", str(data), "--out", str(out), "--force",
            *shlex.split(flags), "--train.log_interval", "10", "--train.final_eval", "false", "--train.progress", "false",
            "--train.sample_tokens", "0"]


def g2(a) -> None:
    ng_flags, our_flags, n, tpi = SIZES[a.size]
    n = a.iters or n
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ng_data, data = prepare_data(TEXT, work, None)
    res = {"nanogpt": [], "ours": []}
    for i in range(a.pairs):
        for name in (["nanogpt", "ours"] if i % 2 == 0 else ["ours", "nanogpt"]):
            load_before = wait_quiet(a.quiet_wait)
            if name == "nanogpt":
                log = work / f"ng{i}.log"
                cmd = [sys.executable, "train.py", *shlex.split(ng_flags.format(n=n)), f"--dataset={ng_data}",
                       f"--out_dir={work / 'ngout'}"]
                r = run(cmd, cwd=Path(a.nanogpt).resolve(), log=log)
                r["tok_s"] = nanogpt_tok_s(log, tpi)
            else:
                out = work / f"ours{i}"
                cmd = our_train_cmd(data, out, f"{our_flags.format(n=n)} {a.ours_args}")
                r = run(cmd, cwd=REPO, log=work / f"ours{i}.log", env=OURS_ENV)
                r["tok_s"] = ours_tok_s(out, tpi)
            r["load_before"] = load_before
            res[name].append(r)
            print(f"pair {i} {name:8s} {r['tok_s']:8.0f} tok/s  other load {r['load']:.2f} cores", file=sys.stderr,
                  flush=True)
    ratios = [o["tok_s"] / g["tok_s"] for o, g in zip(res["ours"], res["nanogpt"])]
    print(f"\n| size {a.size} | nanoGPT tok/s | ours tok/s | ratio | other load (cores) |\n|---|---|---|---|---|")
    for i, (g, o) in enumerate(zip(res["nanogpt"], res["ours"])):
        print(f"| pair {i} | {g['tok_s']:.0f} | {o['tok_s']:.0f} | {ratios[i]:.3f} | {g['load']:.2f} / {o['load']:.2f} |")
    print(f"| median | {statistics.median(g['tok_s'] for g in res['nanogpt']):.0f} | "
          f"{statistics.median(o['tok_s'] for o in res['ours']):.0f} | {statistics.median(ratios):.3f} | |")
    if a.json:
        Path(a.json).write_text(json.dumps({"size": a.size, "results": res, "ratios": ratios}, indent=2))


# ---------------------------------------------------------------- in-process A/B
def _variant(name: str):
    """name -> (ModelConfig kwargs, OptimConfig kwargs, batch size, extra) from '+'-joined tokens."""
    from scratchgpt.model import ModelConfig
    from scratchgpt.optim import OptimConfig

    model = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)
    optim = dict()
    extra = dict(batch=12, fused=None, compile=False, threads=0, dtype="float32", precision="highest")
    for tok in name.split("+"):
        if tok == "base":
            continue
        key, _, val = tok.partition("=")
        val = val or "true"
        conv = (lambda v: v.lower() == "true") if val.lower() in ("true", "false") else (
            (lambda v: int(v)) if val.lstrip("-").isdigit() else (lambda v: float(v) if re.match(r"^[\d.e+-]+$", v) else v))
        if key in ModelConfig.__dataclass_fields__:
            model[key] = conv(val)
        elif key in OptimConfig.__dataclass_fields__:
            optim[key] = conv(val)
        elif key in extra:
            extra[key] = conv(val)
        else:
            raise SystemExit(f"unknown variant key {key}")
    return ModelConfig(**model), OptimConfig(**optim), extra


def ab(a) -> None:
    import numpy as np
    import torch

    from scratchgpt.data import TokenDataset
    from scratchgpt.model import GPT
    from scratchgpt.optim import build_optimizer, lr_at, set_lr
    from scratchgpt.runtime import configure_threads
    from scratchgpt import distributed as dist

    configure_threads(a.threads)
    data = Path(a.data)
    runs = []
    for name in a.variants:
        mcfg, ocfg, extra = _variant(name)
        if extra["fused"] is not None:
            ocfg.fused = extra["fused"]
        torch.manual_seed(0)
        net = GPT(mcfg)
        opts = build_optimizer(net, ocfg, torch.device("cpu"), compiled=extra["compile"])
        step_model = torch.compile(net) if extra["compile"] else net
        ds = TokenDataset(data, "train", mcfg.block_size)
        runs.append(dict(name=name, net=net, opts=opts, model=step_model, ds=ds, ocfg=ocfg, batch=extra["batch"],
                         tokens=extra["batch"] * mcfg.block_size, times=[], step=0, precision=extra["precision"],
                         autocast=torch.autocast("cpu", dtype=getattr(torch, extra["dtype"]), enabled=extra["dtype"] != "float32")))

    def one_step(r) -> None:
        torch.set_float32_matmul_precision(r["precision"])  # global: set for whichever variant runs
        offsets = r["ds"].batch_offsets(r["step"], r["batch"], 1337)
        x, y = r["ds"].get_batch(offsets)
        with r["autocast"]:
            _, loss = r["model"](x, y)
        loss.backward()
        gn = dist.clip_grad_norm(r["net"], r["ocfg"].grad_clip)
        if not bool(torch.isfinite(loss) & torch.isfinite(gn)):
            raise SystemExit("non-finite")
        set_lr(r["opts"], lr_at(r["step"], r["ocfg"], 2000), r["ocfg"])
        for o in r["opts"]:
            o.step()
        for o in r["opts"]:
            o.zero_grad(set_to_none=True)
        r["step"] += 1

    for r in runs:  # warm-up (and compile) outside the timed rounds
        t = time.perf_counter()
        for _ in range(a.warmup):
            one_step(r)
        print(f"{r['name']}: warm-up {time.perf_counter() - t:.1f}s", file=sys.stderr)
    for rnd in range(a.rounds):
        for r in (runs if rnd % 2 == 0 else runs[::-1]):
            t = time.perf_counter()
            for _ in range(a.steps):
                one_step(r)
            r["times"].append((time.perf_counter() - t) / a.steps)
    base = statistics.median(runs[0]["times"])
    print(f"\n| variant | tok/s (median) | ms/step | ratio to {runs[0]['name']} |\n|---|---|---|---|")
    for r in runs:
        m = statistics.median(r["times"])
        ratio = statistics.median(b / t for b, t in zip(runs[0]["times"], r["times"]))  # per-round ratio
        print(f"| {r['name']} | {r['tokens'] / m:.0f} | {1000 * m:.1f} | {ratio * r['tokens'] / runs[0]['tokens']:.3f} |")


def runs(a) -> None:
    """Whole trainer processes at the 0.8M G2 shape, variants taking turns; steady-state tok/s as in g2."""
    _, our_flags, n, tpi = SIZES["small"]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    _, data = prepare_data(TEXT, work, None)
    specs = [(v.split(";") + ["", "", "1"])[:4] for v in a.variants]  # label;env;flags;processes
    res: dict[str, list[float]] = {spec[0]: [] for spec in specs}
    for r in range(a.rounds):
        for label, env, flags, nproc in (specs if r % 2 == 0 else specs[::-1]):
            wait_quiet(a.quiet_wait)
            out = work / f"runs-{label}"
            cmd = our_train_cmd(data, out, f"{our_flags.format(n=a.iters or n)} {flags}", int(nproc or 1))
            extra = dict(kv.split("=", 1) for kv in shlex.split(env))
            run(cmd, cwd=REPO, log=work / f"runs-{label}.log", env={**OURS_ENV, **extra})
            res[label].append(ours_tok_s(out, tpi))
            print(f"round {r} {label:12s} {res[label][-1]:8.0f} tok/s", file=sys.stderr, flush=True)
    base = specs[0][0]
    print(f"\n| variant | tok/s per round | median | ratio to {base} (median per round) |\n|---|---|---|---|")
    for label, ts in res.items():
        ratio = statistics.median(t / b for t, b in zip(ts, res[base]))
        print(f"| {label} | {', '.join(f'{t:.0f}' for t in ts)} | {statistics.median(ts):.0f} | {ratio:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("g2", help="nanoGPT vs ours at nanoGPT's architecture and hyperparameters")
    g.add_argument("--nanogpt", required=True)
    g.add_argument("--size", choices=sorted(SIZES), default="small")
    g.add_argument("--pairs", type=int, default=3)
    g.add_argument("--iters", type=int, default=0, help="steps per run (default: per size)")
    g.add_argument("--ours-args", default="", help="extra scratchgpt train flags")
    g.add_argument("--quiet-wait", type=float, default=30.0)
    g.add_argument("--work", default="/tmp/throughput")
    g.add_argument("--json", default=None)
    b = sub.add_parser("ab", help="in-process A/B of model / optimizer / batch variants")
    b.add_argument("--variants", nargs="+", default=["base"],
                   help="'+'-joined key=value tokens: model/optim fields, batch, fused, compile; e.g. base "
                        "optimizer=muon+batch=48 mlp=relu2+pos=rope")
    b.add_argument("--data", default="/tmp/data_sc")
    b.add_argument("--rounds", type=int, default=15)
    b.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--threads", type=int, default=0)
    w = sub.add_parser("runs", help="whole trainer processes at the 0.8M shape, per-variant environment and flags")
    w.add_argument("--variants", nargs="+", required=True, help='"label;ENV=V ...;flags;processes" (the first is the base)')
    w.add_argument("--rounds", type=int, default=4)
    w.add_argument("--iters", type=int, default=250)
    w.add_argument("--quiet-wait", type=float, default=30.0)
    w.add_argument("--work", default="/tmp/throughput")
    a = ap.parse_args()
    {"g2": g2, "ab": ab, "runs": runs}[a.mode](a)


if __name__ == "__main__":
    main()
