"""Training throughput at GPT-2-124M shape: nanoGPT's train.py and scratchgpt side by side, on a GPU.

    python bench/gpu.py --nanogpt /path/to/nanoGPT                     # eager and compiled, 2 rounds
    python bench/gpu.py --nanogpt /path/to/nanoGPT --variants all      # and every switch of ours (VARIANTS)
    python bench/gpu.py --nanogpt /path/to/nanoGPT --device cpu --shape tiny --compile eager \\
        --iters 12 --warmup 4 --log-interval 2 --rounds 1               # a dry run on a CPU

Both trainers get the same model (12 layers, 12 heads, 768 wide, context 1024, no biases, no dropout,
tied head, learned positions, GELU, LayerNorm), batch (16 x 1024 tokens, no accumulation), dtype
(bf16 autocast on GPUs, fp32 on CPUs), character vocabulary (the same text, prepared in each one's
own format: nanoGPT's train.bin/val.bin/meta.pkl, ours by `scratchgpt prepare`) and log interval
(each logs the loss every --log-interval steps: the host sync of both). nanoGPT's source is given
by path and never copied here.

Timing: the wall clock over steps [--warmup, --iters], which leaves out start-up and compilation.
nanoGPT's is the arrival time of its "iter N" lines (printed right after its loss sync, unbuffered);
ours is metrics.jsonl's elapsed_s (taken right after ours). MFU is computed here for both with one
formula (GPT.flops_per_token: 6N + attention, causal) and one peak (scratchgpt.runtime.peak_flops:
the GPU's datasheet dense figure for the dtype, else a measured one), so the two compare; nanoGPT's
own printed MFU (A100 peak, non-causal attention) is kept in --json.

Runs alternate (N S S N ...) over --rounds; the table gives medians and ours / nanoGPT's tok/s.
VARIANTS are switches measured on our side: CUDA graphs under compile, fused AdamW, the SDPA backend,
TF32, pinned batches, the GPU-side finite check and a host sync every step.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import race_nanogpt as race  # noqa: E402  (its data preparation and environment for our subprocesses)

REPO = race.REPO
SHAPES = {  # the model and batch of each contender
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64),  # nanoGPT's shakespeare_char
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4),  # CPU dry runs
}
# Ours, with one switch changed each: (extra train flags, Python run before scratchgpt's CLI, compiled?).
# None for compiled: as the round's setting.
VARIANTS: dict[str, tuple[list[str], str, bool | None]] = {
    "default": ([], "", None),
    "cudagraphs": (["--train.compile_mode", "reduce-overhead"], "", True),
    "max-autotune": (["--train.compile_mode", "max-autotune-no-cudagraphs"], "", True),
    "adamw-unfused": (["--optim.fused", "false"], "", None),
    "log-every-step": (["--train.log_interval", "1"], "", None),
    "sdpa-flash": ([], "import torch; b = torch.backends.cuda; b.enable_mem_efficient_sdp(False); "
                       "b.enable_cudnn_sdp(False); b.enable_math_sdp(False)", None),
    "sdpa-cudnn": ([], "import torch; b = torch.backends.cuda; b.enable_flash_sdp(False); "
                       "b.enable_mem_efficient_sdp(False); b.enable_math_sdp(False)", None),
    "sdpa-efficient": ([], "import torch; b = torch.backends.cuda; b.enable_flash_sdp(False); "
                           "b.enable_cudnn_sdp(False); b.enable_math_sdp(False)", None),
    "tf32-off": ([], "import scratchgpt.train as t; t.configure_device = lambda device: None", None),
    "pageable-batches": ([], "import scratchgpt.train as t\n"
                             "def micro_batch(s, offsets, k):\n"
                             "    x, y = s.train_ds.get_batch(offsets)\n"
                             "    return x.to(s.device), y.to(s.device)\n"
                             "t.micro_batch = micro_batch", None),
    "host-finite-check": ([], "import scratchgpt.train as t\n"
                              "setup = t.setup\n"
                              "def host_check(*a, **k):\n"
                              "    s = setup(*a, **k)\n"
                              "    s.deferred_check = False\n"
                              "    return s\n"
                              "t.setup = host_check", None),
}


def flops_and_peak(shape: dict, vocab: int, device: str, dtype: str) -> tuple[float, "object"]:
    """Training FLOPs per token (our formula, for both) and the device's peak for the dtype."""
    import torch

    from scratchgpt.model import GPT, ModelConfig
    from scratchgpt.runtime import configure_device, peak_flops

    with torch.device("meta"):
        net = GPT(ModelConfig(vocab_size=vocab, bias=False, **{k: v for k, v in shape.items() if k != "batch_size"}))
    dev = torch.device(device)
    configure_device(dev)  # what a training run sets (TF32), so fp32 finds the same table column
    return net.flops_per_token(), peak_flops(dev, getattr(torch, dtype))


def run_nanogpt(a, shape: dict, data: Path, out: Path, compiled: bool, log: Path) -> dict:
    """nanoGPT's train.py, unbuffered; each "iter N" line timestamped as it arrives."""
    args = {**{k: v for k, v in shape.items()}, "dropout": 0.0, "bias": False, "dtype": a.dtype, "device": a.device,
            "compile": compiled, "max_iters": a.iters, "lr_decay_iters": a.iters, "eval_interval": 10**9,
            "eval_iters": 1, "log_interval": a.log_interval, "gradient_accumulation_steps": 1,
            "always_save_checkpoint": False, "dataset": str(data), "out_dir": str(out)}
    cmd = [sys.executable, "-u", "train.py", *(f"--{k}={v}" for k, v in args.items())]
    stamps: dict[int, float] = {}
    printed_mfu = []
    t0 = time.monotonic()
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=a.nanogpt, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True) as p:
        for line in p.stdout:
            now = time.monotonic()
            f.write(line)
            if line.startswith("iter "):
                it = int(line.split()[1].rstrip(":"))
                stamps[it] = now
                printed_mfu.append(float(line.rsplit("mfu", 1)[1].strip().rstrip("%")))
    if p.returncode != 0:
        raise SystemExit(f"nanoGPT failed ({p.returncode}): {shlex.join(cmd)}\n{log.read_text()[-3000:]}")
    return {**window(stamps, a.warmup), "process_s": time.monotonic() - t0, "nanogpt_printed_mfu": printed_mfu[-1:]}


def run_ours(a, shape: dict, data: Path, out: Path, compiled: bool, variant: str, log: Path) -> dict:
    extra, prelude, _ = VARIANTS[variant]
    flags = {**{f"model.{k}": v for k, v in shape.items() if k != "batch_size"}, "model.dropout": 0.0,
             "model.bias": "false", "train.batch_size": shape["batch_size"], "train.max_iters": a.iters,
             "train.eval_interval": a.iters, "train.eval_iters": 1, "train.log_interval": a.log_interval,
             "train.dtype": a.dtype, "train.device": a.device, "train.compile": str(compiled).lower(),
             "train.sample_tokens": 0, "train.final_eval": "false", "train.tensorboard": "false",
             "train.plot": "false", "train.progress": "false", "train.keep_last": 1,
             "optim.warmup_iters": min(100, a.iters)}  # (a warmup longer than the run is refused)
    args = ["train", "--data", str(data), "--out", str(out), "--force", *(f"--{k}={v}" for k, v in flags.items()), *extra]
    code = prelude + "\nimport sys\nfrom scratchgpt.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    t0 = time.monotonic()
    race.run([sys.executable, "-c", code, *args], cwd=REPO, log=log, env=race.OURS_ENV)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stamps = {r["step"]: r["elapsed_s"] for r in rows if "train_loss" in r}
    return {**window(stamps, a.warmup), "process_s": time.monotonic() - t0}


def window(stamps: dict[int, float], warmup: int) -> dict:
    """Seconds per step between the first logged step at or after `warmup` and the last one."""
    steps = sorted(s for s in stamps if s >= warmup)
    if len(steps) < 2:
        raise SystemExit(f"too few logged steps after --warmup {warmup}: {sorted(stamps)}")
    first, last = steps[0], steps[-1]
    return {"s_per_step": (stamps[last] - stamps[first]) / (last - first), "window": [first, last]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT (never committed here)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    ap.add_argument("--dtype", default=None, help="bfloat16 on cuda, float32 on cpu by default")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    ap.add_argument("--compile", choices=["eager", "compile", "both"], default="both")
    ap.add_argument("--variants", nargs="*", default=["default"],
                    help=f"ours' switches to measure, or 'all': {', '.join(VARIANTS)}")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (start-up, compilation)")
    ap.add_argument("--log-interval", type=int, default=10, help="steps between loss logs (a host sync) for both")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of every run")
    ap.add_argument("--text", type=Path, default=None,
                    help="text for the char vocabulary (default: tinyshakespeare if present, else CPython's pydoc text)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    a.nanogpt = a.nanogpt.resolve()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    variants = list(VARIANTS) if a.variants == ["all"] else a.variants
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
    work = a.work or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    text = a.text or (race.TEXT if race.TEXT.exists() else None)
    if text is None:  # any text serves a throughput run: the vocabulary is its characters
        from pydoc_data.topics import topics

        text = work / "pydoc.txt"
        text.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    ng_data, data = race.prepare_data(text, work, None)
    shape = SHAPES[a.shape]
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    flops_per_token, peak = flops_and_peak(shape, vocab, a.device, a.dtype)
    tokens_per_step = shape["batch_size"] * shape["block_size"]

    modes = {"eager": [False], "compile": [True], "both": [False, True]}[a.compile]
    runs = []  # (name, variant, compiled)
    for compiled in modes:
        runs.append(("nanogpt", "-", compiled))
        for v in variants:
            forced = VARIANTS[v][2]
            if forced is None or forced == compiled:
                runs.append(("ours", v, compiled))
    print(f"work dir {work}; {a.shape} {shape}, vocab {vocab}, {a.dtype} on {a.device}; MFU peak {peak.describe()}",
          file=sys.stderr)
    results: dict[tuple, list[dict]] = {r: [] for r in runs}
    for rnd in range(a.rounds):
        for name, variant, compiled in (runs if rnd % 2 == 0 else runs[::-1]):
            tag = f"r{rnd}-{name}-{variant}-{'compiled' if compiled else 'eager'}"
            if name == "nanogpt":
                r = run_nanogpt(a, shape, ng_data, work / tag, compiled, work / f"{tag}.log")
            else:
                r = run_ours(a, shape, data, work / tag, compiled, variant, work / f"{tag}.log")
            r["tok_s"] = tokens_per_step / r["s_per_step"]
            r["mfu"] = r["tok_s"] * flops_per_token / peak.flops
            results[(name, variant, compiled)].append(r)
            print(f"{tag:40s} {r['s_per_step'] * 1e3:8.2f} ms/step {r['tok_s']:11,.0f} tok/s  mfu {r['mfu']:.3f}",
                  file=sys.stderr, flush=True)

    print(f"\n{a.shape} ({shape['n_layer']}L/{shape['n_head']}H/{shape['n_embd']}, context {shape['block_size']}, "
          f"batch {shape['batch_size']}), {a.dtype} on {a.device}, log every {a.log_interval} steps, steps "
          f"{a.warmup}-{a.iters} timed, median of {a.rounds}; MFU peak {peak.describe()}\n")
    print("| trainer | variant | compile | ms/step | tok/s | MFU | vs nanoGPT |")
    print("|---|---|---|---|---|---|---|")
    medians = {}
    for key, rs in results.items():
        medians[key] = statistics.median(r["tok_s"] for r in rs)
    for (name, variant, compiled), rs in results.items():
        tok_s = medians[(name, variant, compiled)]
        base = medians[("nanogpt", "-", compiled)]
        print(f"| {name} | {variant} | {'yes' if compiled else 'no'} | {tokens_per_step / tok_s * 1e3:.2f} | "
              f"{tok_s:,.0f} | {tok_s * flops_per_token / peak.flops:.3f} | {tok_s / base:.3f}x |")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "peak": peak.describe(),
                                      "flops_per_token": flops_per_token, "tokens_per_step": tokens_per_step,
                                      "runs": [{"trainer": n, "variant": v, "compiled": c, "results": rs}
                                               for (n, v, c), rs in results.items()]}, indent=2))


if __name__ == "__main__":
    main()
