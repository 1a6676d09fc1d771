"""Training: configs, optimizer and schedule, the training loop, and `scratchgpt info`.

The loop (`train`) does the same things in the same order every step: batch, forward,
backward, clip, finite-check, step, schedule, log, eval, save. Batches are a pure function of
(seed, step), so a resumed run, or one on a different number of ranks, sees the same data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from . import UserError
from .checkpoint import find_resumable, load_model_tensors, load_tensors, optimizer_from_tensors, save_checkpoint
from .checkpoint import set_rng_state, rng_state, unwrap, MODEL_FILE, OPTIM_FILE
from .model import GPT, ModelConfig
from .utils import atomic_write, atomic_write_json, read_json


@dataclass
class TrainConfig:
    """The loop. Every field is a `--train.<field>` flag and a `train:` config key."""

    batch_size: int = 12  # sequences per optimizer step, summed over ranks and accumulation micro-steps
    micro_batch_size: int = 0  # sequences per forward pass and rank; 0: batch_size / world size (no accumulation)
    max_iters: int = 1000  # the default run: a few minutes on a laptop CPU
    max_time_s: float = 0.0  # >0: stop (and save) after this much wall time
    eval_interval: int = 250
    eval_iters: int = 20  # batches for the periodic train/val loss estimate
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"  # auto: cuda > mps > cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 where supported, else fp16
    compile: bool = False
    threads: int = 0  # CPU threads for torch; 0: all physical cores
    patience: int = 0  # early stopping: evals without val improvement before stopping; 0: off
    target_val_loss: Optional[float] = None  # stop once val loss reaches this
    sample_prompt: str = "\n"
    sample_tokens: int = 200  # tokens of sample text printed at each eval; 0: off
    keep_last: int = 2  # complete checkpoints kept in RUN/checkpoints (latest and best are kept besides)
    skip_nonfinite: bool = False  # on NaN/inf: skip the batch instead of stopping the run
    final_eval: bool = True  # evaluate on the whole val split at the end
    peak_flops: float = 0.0  # for MFU; 0: measured with a matmul benchmark at start
    objective: Literal["clm", "mlm"] = "clm"  # clm: next-token prediction (GPT); mlm: BERT-style masking
    parallel: Literal["none", "ddp", "fsdp"] = "none"  # under torchrun: none means ddp
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True


@dataclass
class OptimConfig:
    """Optimizer and LR schedule. Every field is an `--optim.<field>` flag and an `optim:` config key."""

    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for 2-D hidden weights, AdamW for the rest
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    schedule: Literal["cosine", "constant", "wsd", "linear"] = "cosine"
    decay_iters: int = 0  # length of the schedule; 0: max_iters
    wsd_decay_frac: float = 0.2  # wsd: the final fraction of steps that decays linearly to min_lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    fused: Optional[bool] = None  # None: fused AdamW on CUDA and CPU (one kernel per step: ~10% faster on 2 CPU cores)
    embed_lr: float = 0.0  # 0: lr. Own LRs per group, as modded-nanogpt tunes them
    head_lr: float = 0.0  # 0: lr
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon step (torch's default)


# ---------------------------------------------------------------- setup helpers
def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPUs without bf16 units run bf16 several times slower than fp32


def configure_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        # one thread per physical core; hyperthreads only add contention on matmul-bound work
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // (2 if (os.cpu_count() or 1) > 2 else 1)))


def keep_freed_memory() -> None:
    """Stop glibc from handing each step's freed activations back to the OS and faulting them in again.

    With glibc's defaults a training step at nanoGPT's CPU size takes ~1000 page faults; keeping freed
    memory in the heap (trim threshold 1 GiB, mmap threshold at glibc's 32 MiB maximum) cuts that ~5x:
    median +9% tok/s over 6 alternating runs on 2 cores. Memory is reused, not grown. A no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (fixing it also stops glibc's dynamic adjustment)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def lr_at(step: int, o: OptimConfig, max_iters: int) -> float:
    """LR multiplier schedule: linear warmup, then cosine / constant / linear / warmup-stable-decay."""
    total = o.decay_iters or max_iters
    if step < o.warmup_iters:
        return o.lr * (step + 1) / (o.warmup_iters + 1)
    if o.schedule == "constant" or step >= total:
        return o.lr if o.schedule == "constant" else o.min_lr
    if o.schedule == "wsd":
        decay_start = total - int(o.wsd_decay_frac * total)
        if step < decay_start:
            return o.lr
        frac = (step - decay_start) / max(1, total - decay_start)
        return o.lr + frac * (o.min_lr - o.lr)
    frac = (step - o.warmup_iters) / max(1, total - o.warmup_iters)
    if o.schedule == "linear":
        return o.lr + frac * (o.min_lr - o.lr)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (o.lr - o.min_lr)


def build_optimizer(model: GPT, o: OptimConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW with no decay on norms, biases and embeddings; optionally Muon for 2-D hidden weights.

    Each param group remembers its `base_lr` relative to optim.lr so one schedule drives them all.
    """
    from .muon import AdamW  # torch.optim.AdamW minus its torch._dynamo import at the first step

    embed, head, hidden_2d, other = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("transformer.wte", "transformer.wpe", "transformer.vte")):  # token/position/value tables
            embed.append(p)
        elif name.startswith("lm_head"):
            head.append(p)
        elif p.dim() == 2:
            hidden_2d.append(p)
        else:
            other.append(p)  # norms, biases, scalars
    fused = o.fused if o.fused is not None else device.type in ("cuda", "cpu")

    def scale(group_lr: float) -> float:
        return (group_lr or o.lr) / o.lr if o.lr else 1.0

    adam_groups = [
        dict(params=embed, weight_decay=0.0, lr_scale=scale(o.embed_lr)),
        dict(params=head, weight_decay=o.weight_decay, lr_scale=scale(o.head_lr)),
        dict(params=other, weight_decay=0.0, lr_scale=1.0),
    ]
    optimizers: list[torch.optim.Optimizer] = []
    if o.optimizer == "muon":
        from .muon import make_muon

        optimizers.append(make_muon(hidden_2d, o))
    else:
        adam_groups.insert(0, dict(params=hidden_2d, weight_decay=o.weight_decay, lr_scale=1.0))
    adam_groups = [g for g in adam_groups if g["params"]]
    optimizers.insert(0, AdamW(adam_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused))
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float, o: OptimConfig) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """A quick matmul benchmark: the denominator of MFU when train.peak_flops is not given."""
    a = torch.ones(n, n, device=device, dtype=dtype)  # not randn: must not consume the training RNG
    for _ in range(2):
        a @ a
    reps, t0 = 8, time.perf_counter()
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# ---------------------------------------------------------------- logging
class RunLog:
    """metrics.jsonl, TensorBoard (when installed) and loss.png, written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, plot: bool):
        self.out, self.enabled, self.plot = out, enabled, plot
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:  # tensorboard not installed: metrics.jsonl and loss.png still record everything
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def draw(self) -> None:
        if not (self.enabled and self.plot):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in open(self.out / "metrics.jsonl", encoding="utf-8")]
        fig, ax = plt.subplots(figsize=(7, 4))
        tr = [(r["tokens"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        va = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), label="train", alpha=0.7)
        if va:
            ax.plot(*zip(*va), "o-", label="val")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(self.out / "loss.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------- run setup
def _run_has_content(out: Path) -> bool:
    return out.exists() and any((out / n).exists() for n in ("config.json", "latest", "checkpoints", "metrics.jsonl"))


def default_data_dir() -> Path:
    """The embedded corpus (CPython's pydoc topics), prepared on first use."""
    from .data import prepare

    d = Path("data/default")
    if (d / "meta.json").exists():
        return d
    if int(os.environ.get("RANK", 0)) > 0:  # under torchrun only rank 0 prepares; the others wait for it
        deadline = time.time() + 600
        while not (d / "meta.json").exists():
            if time.time() > deadline:
                raise UserError(f"timed out waiting for rank 0 to prepare {d}")
            time.sleep(0.5)
        return d
    print(f"preparing the embedded default corpus into {d} ...", file=sys.stderr)
    prepare(inputs=[], out=d, tokenizer="char")
    return d


def resolve_config(out: Path, data: Optional[Path], model: ModelConfig, train: TrainConfig, optim: OptimConfig,
                   resume: bool, overrides: Optional[dict] = None):
    """On resume the saved config wins, except for train/optim keys given on the command line."""
    if not resume:
        return data, model, train, optim
    saved = read_json(out / "config.json") if (out / "config.json").exists() else None
    if saved is None:
        raise UserError(f"{out}: nothing to resume (no config.json)")
    sections = {"train": asdict(TrainConfig()) | saved["train"], "optim": asdict(OptimConfig()) | saved["optim"]}
    for key, value in (overrides or {}).items():
        section, name = key.split(".", 1)
        if section in sections:
            sections[section][name] = value
    optim_d = sections["optim"]
    optim_d["betas"] = tuple(optim_d["betas"])
    return (data or Path(saved["data"]), ModelConfig(**saved["model"]), TrainConfig(**sections["train"]),
            OptimConfig(**optim_d))


# ---------------------------------------------------------------- the loop
def train(data: Optional[Path] = None, out: Optional[Path] = None, model: ModelConfig = None, train: TrainConfig = None,
          optim: OptimConfig = None, resume: bool = False, force: bool = False, overrides: Optional[dict] = None) -> dict:
    """Train a GPT on a prepared data dir; returns the final metrics. See the module docstring for the order."""
    from .data import TokenDataset, load_meta
    from . import distributed as dist

    out = Path(out or "runs/default")
    resume, force = dist.restart_mode(out, resume, force)  # torchrun --max-restarts: a restarted worker resumes
    model_cfg, tcfg, ocfg = model or ModelConfig(), train or TrainConfig(), optim or OptimConfig()
    if _run_has_content(out) and not (resume or force):
        raise UserError(f"{out} already holds a run: pass --resume to continue it or --force to replace it")
    data, model_cfg, tcfg, ocfg = resolve_config(out, data, model_cfg, tcfg, ocfg, resume, overrides)
    data = Path(data) if data is not None else default_data_dir()
    meta = load_meta(data)
    n_vocab = meta["vocab_size"] + (tcfg.objective == "mlm")  # mlm: one extra id, the [MASK] token
    if model_cfg.vocab_size and model_cfg.vocab_size != n_vocab:
        raise UserError(f"vocabulary mismatch: the model has {model_cfg.vocab_size} tokens, {data} has {meta['vocab_size']}")
    model_cfg.vocab_size = n_vocab
    if tcfg.objective == "mlm":
        model_cfg.causal = False  # a masked token is predicted from both sides
    ctx = dist.setup(tcfg)  # rank, world size, device; a no-op without torchrun
    master = ctx.rank == 0
    configure_threads(tcfg.threads)
    keep_freed_memory()
    device = ctx.device or pick_device(tcfg.device)
    dtype = pick_dtype(tcfg.dtype, device)
    if force and master and out.exists() and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    per_rank = tcfg.batch_size // ctx.world
    micro = min(tcfg.micro_batch_size or per_rank, per_rank)  # a resume on more ranks may shrink a rank's share
    if tcfg.batch_size % ctx.world or per_rank % micro:
        raise UserError(f"train.batch_size {tcfg.batch_size} must split evenly over {ctx.world} ranks x micro-batches of {micro}")
    accum = per_rank // micro
    train_ds = TokenDataset(data, "train", model_cfg.block_size)
    val_ds = TokenDataset(data, "val", model_cfg.block_size)
    config = {"format_version": 1, "data": str(data), "model": asdict(model_cfg), "train": asdict(tcfg),
              "optim": asdict(ocfg), "world_size": ctx.world, "tokenizer": meta.get("tokenizer")}

    torch.manual_seed(tcfg.seed)
    net = GPT(model_cfg).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    step, tokens, best_val, bad_evals, elapsed_before = 0, 0, float("inf"), 0, 0.0
    if resume:
        found = find_resumable(out, log=lambda m: print(m, file=sys.stderr))
        if found is None:
            raise UserError(f"{out}: no checkpoint to resume from")
        ckpt, state = found
        load_model_tensors(net, load_tensors(ckpt / MODEL_FILE))
        step, tokens, best_val = state["step"], state["tokens"], state.get("best_val_loss") or float("inf")
        bad_evals, elapsed_before = state.get("bad_evals", 0), state.get("elapsed_s", 0.0)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if master:
            print(f"resumed from {ckpt} at step {step}", file=sys.stderr)
    if master:
        atomic_write_json(out / "config.json", config)
    model_for_step = dist.wrap(net, tcfg, ctx)
    if not tcfg.compile:
        from .muon import skip_dynamo_import

        skip_dynamo_import()  # torch.optim would import torch._dynamo: ~1.5 s of start-up, for compile's sake only
    optimizers = build_optimizer(net, ocfg, device)  # after wrap: FSDP2 replaces the parameters with sharded ones
    if resume:
        dist.load_optimizers(ckpt, net, optimizers, state, ctx)  # full or sharded checkpoint, onto any world size
    if tcfg.compile:
        model_for_step = torch.compile(model_for_step)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    log = RunLog(out, master, tcfg.tensorboard, tcfg.plot)
    flops_per_step = net.flops_per_token() * tcfg.batch_size * model_cfg.block_size
    peak = tcfg.peak_flops or measure_peak_flops(device, dtype if device.type == "cuda" else torch.float32)
    tokenizer_file = data / "tokenizer.json"
    mask_batch = None
    if tcfg.objective == "mlm":
        from .finetune import mlm_mask_batch as mask_batch  # BERT-style 80/10/10 masking

    def checkpoint(is_best: bool) -> None:
        state = {"step": step, "tokens": tokens, "best_val_loss": None if math.isinf(best_val) else best_val,
                 "bad_evals": bad_evals, "elapsed_s": elapsed_before + time.time() - t_start, "rng": rng_state(),
                 "data": {"seed": tcfg.seed, "step": step, "sampling": "stateless(seed, step)",
                          **dist.data_slices(tcfg.batch_size, per_rank, micro, ctx)},
                 "scheduler": {"step": step, "lr": lr_at(step, ocfg, tcfg.max_iters)},
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        dist.save(out, net, optimizers, state, config, tokenizer_file, tcfg, ctx, is_best)

    if resume:
        set_rng_state(state["rng"])  # last, so no setup step (init, peak measurement) shifts the stream
    t_start = time.time()
    t_last, tokens_last = time.time(), tokens
    bar = _progress(tcfg, master, step)
    metrics: dict = {}
    stop_reason = "max_iters"
    while step < tcfg.max_iters:
        dist.maybe_fail(step, ctx)  # test-only fault injection (SCRATCHGPT_FAULT_RANK/STEP); otherwise a no-op
        # batch + forward + backward (accumulating over micro-steps; DDP syncs only on the last)
        offsets = train_ds.batch_offsets(step, tcfg.batch_size, tcfg.seed)[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
        loss_sum = torch.zeros((), device=device)
        for k in range(accum):
            x, y = train_ds.get_batch(offsets[k * micro:(k + 1) * micro])
            if mask_batch is not None:
                x, y = mask_batch(x, model_cfg.vocab_size, meta, step, k, ctx.rank, tcfg.seed)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with dist.no_sync(model_for_step, last=(k == accum - 1)), autocast:
                _, loss = model_for_step(x, y)
            scaler.scale(loss / accum).backward()
            loss_sum += loss.detach() / accum
        # clip + finite check (one host sync per step: the price of never stepping on NaN)
        for opt in optimizers:
            scaler.unscale_(opt)
        grad_norm = dist.clip_grad_norm(net, ocfg.grad_clip)
        finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        if not finite:
            if not tcfg.skip_nonfinite:
                log.close()
                raise UserError(f"non-finite loss or gradient at step {step} (loss {loss_sum.item()}, grad norm "
                                f"{grad_norm.item()}); no checkpoint written. Lower optim.lr or pass --train.skip_nonfinite")
            print(f"warning: skipping step {step}: non-finite loss or gradient", file=sys.stderr)
        # step + schedule
        lr = lr_at(step, ocfg, tcfg.max_iters)
        set_lr(optimizers, lr, ocfg)
        if finite:
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        step += 1
        tokens += tcfg.batch_size * model_cfg.block_size
        # log
        elapsed = elapsed_before + time.time() - t_start
        is_eval = step % tcfg.eval_interval == 0 or step == tcfg.max_iters
        if step % tcfg.log_interval == 0 or is_eval or step == 1:
            train_loss = dist.mean(loss_sum, ctx).item()
            now = time.time()
            tok_s = (tokens - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, tokens
            metrics = {"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 3), "lr": lr,
                       "train_loss": train_loss, "grad_norm": float(grad_norm), "tok_per_s": round(tok_s, 1),
                       "mfu": round(flops_per_step * tok_s / (tcfg.batch_size * model_cfg.block_size) / peak, 4)}
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{train_loss:.4f}", tokens=_human(tokens), tok_s=_human(tok_s), mfu=f"{metrics['mfu']:.0%}")
        # eval + save
        if is_eval:
            losses = estimate_loss(net, train_ds, val_ds, tcfg, device, autocast, mask_batch, meta)
            metrics.update(val_loss=losses["val"], val_ppl=math.exp(min(losses["val"], 50)), eval_train_loss=losses["train"])
            improved = losses["val"] < best_val
            best_val, bad_evals = (losses["val"], 0) if improved else (best_val, bad_evals + 1)
            if master:
                bar.write(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f} (ppl {metrics['val_ppl']:.2f})",
                          file=sys.stderr)
            if tcfg.sample_tokens and tcfg.objective == "clm" and (master or ctx.parallel == "fsdp"):
                with dist.unsharded(net, ctx):  # FSDP: every rank runs the sample's forwards; rank 0 prints
                    text = sample_text(net, data, tcfg.sample_prompt, tcfg.sample_tokens, device, tcfg.seed)
                if master:
                    bar.write(text, file=sys.stderr)
            checkpoint(improved)
            if tcfg.patience and bad_evals >= tcfg.patience:
                stop_reason = f"early stopping: no val improvement in {bad_evals} evals"
            if tcfg.target_val_loss is not None and losses["val"] <= tcfg.target_val_loss:
                stop_reason = f"reached target val loss {tcfg.target_val_loss}"
        if metrics.get("step") == step:
            log.write(metrics)
            if is_eval:
                log.draw()
        if stop_reason != "max_iters":
            break
        if tcfg.max_time_s and dist.any_rank(elapsed >= tcfg.max_time_s, ctx):  # clocks differ: ranks stop together
            stop_reason = f"time limit {tcfg.max_time_s}s"
            if not is_eval:
                checkpoint(False)
            break
    bar.close()
    result = {"step": step, "tokens": tokens, "stop_reason": stop_reason,
              "best_val_loss": None if math.isinf(best_val) else best_val}
    if tcfg.final_eval and (master or ctx.parallel == "fsdp") and tcfg.objective == "clm":  # FSDP: all ranks forward
        from .evaluate import evaluate_lm

        result.update({"final_" + k: v for k, v in evaluate_lm(net, val_ds, model_cfg.block_size, device=device).items()})
    if master:
        atomic_write_json(out / "result.json", result)
        print(json.dumps(result), file=sys.stderr)
    log.close()
    dist.teardown(ctx)
    return result


# ---------------------------------------------------------------- helpers of the loop
@torch.no_grad()
def estimate_loss(net: GPT, train_ds, val_ds, tcfg: TrainConfig, device, autocast, mask_batch=None, meta=None) -> dict:
    """Mean loss over eval_iters fixed batches per split (fixed: comparable across evals, no RNG consumed)."""
    net.eval()
    out = {}
    for name, ds in (("train", train_ds), ("val", val_ds)):
        total = torch.zeros((), device=device)
        for i in range(tcfg.eval_iters):
            x, y = ds.get_batch(ds.batch_offsets(10**9 + i, min(tcfg.batch_size, 32), tcfg.seed))
            if mask_batch is not None:
                x, y = mask_batch(x, net.cfg.vocab_size, meta, 10**9 + i, 0, 0, tcfg.seed)
            with autocast:
                _, loss = net(x.to(device), y.to(device))
            total += loss.float()
        out[name] = (total / tcfg.eval_iters).item()
    net.train()
    return out


def sample_text(net: GPT, data: Path, prompt: str, n_tokens: int, device, seed: int) -> str:
    """A short sample during training, from its own RNG so it never perturbs the training stream."""
    from .tokenizer import Tokenizer

    try:
        from .generate import generate

        tok = Tokenizer.load(data)
        net.eval()
        try:
            text = generate(net, tok, prompt, max_new_tokens=n_tokens, temperature=0.8, top_k=50, seed=seed)
        finally:
            net.train()
        return "---\n" + (text if isinstance(text, str) else text[0]) + "\n---"
    except (UserError, ImportError) as e:
        return f"(no sample: {e})"


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _progress(tcfg: TrainConfig, master: bool, start: int):
    from tqdm import tqdm

    return tqdm(total=tcfg.max_iters, initial=start, disable=not (master and tcfg.progress), unit="step",
                dynamic_ncols=True, file=sys.stderr, mininterval=1.0)


def run_info(run: Path) -> dict:
    """`scratchgpt info RUN`: config, parameter count, steps, best val loss, files."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise UserError(f"{run}: not a run directory (no config.json)")
    config = read_json(run / "config.json")
    net = GPT(ModelConfig(**config["model"]))
    info = {"run": str(run), "params": net.num_params(), "flops_per_token": net.flops_per_token(), "config": config}
    for name in ("latest", "best"):
        if (run / name / "state.json").exists():
            st = read_json(run / name / "state.json")
            info[name] = {"step": st["step"], "tokens": st["tokens"], "best_val_loss": st.get("best_val_loss")}
    if (run / "result.json").exists():
        info["result"] = read_json(run / "result.json")
    info["files"] = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "tb" not in p.parts)
    print(json.dumps(info, indent=2))
    return info
