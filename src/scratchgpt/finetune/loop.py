"""The fine-tuning loop both tasks share (`fit`), its options, and run setup and saving.

Training modes: the whole model (default); --freeze-except N (only the last N blocks, the
final norm and the head train; 0 = a linear probe); --lora (PEFT LoRA on every c_attn,
c_proj and c_fc; base weights frozen; a classifier's new head trains too).

Run layout: as a pretraining run (RUN/checkpoints/step-N, RUN/latest, RUN/best, written by
checkpoint.write_checkpoint), without optimizer state: a fine-tune is short and is rerun
rather than resumed. Its checkpoint holds model.safetensors (not with --lora), head.safetensors
(classify), adapter_model.safetensors + adapter_config.json (--lora), config.json (the base
config + "finetune" (+ "classifier" | "chat_template")), tokenizer.json and state.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from .. import UserError
from ..checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, CONFIG_FILE, HEAD_FILE, MODEL_FILE, LoadedRun, load_run,
                          model_tensors, weights_sha256, write_checkpoint)
from ..heads import classifier_of
from ..lora import add_lora, adapter_tensors, lora_config_dict
from ..model import GPT, gpt_of
from ..runtime import INTERRUPTED, configure_threads, environment, pick_device, stop_on_signals
from ..utils import atomic_write_json


@dataclass
class FinetuneOptions:
    """Optimisation and training-mode options of `scratchgpt finetune classify|sft` (flag: --max-steps etc.)."""

    epochs: int = 3
    """Passes over the training file."""
    max_steps: int = 0
    """Stop after this many optimizer steps (overrides --epochs); 0: off."""
    batch_size: int = 16
    """Examples per optimizer step."""
    lr: float = 0.0
    """Peak learning rate; 0: 3e-4, or 1e-3 with --lora (adapters start at zero and need larger steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the 2-D weights."""
    warmup_steps: int = 0
    """Linear warmup steps, then cosine decay to 10% of the peak."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0: off."""
    eval_interval: int = 0
    """Optimizer steps between val evaluations; 0: once per epoch."""
    patience: int = 0
    """Early stopping after this many evaluations without improvement; 0: off."""
    seed: int = 1337
    """Seeds the head's init, the shuffling and dropout."""
    lora: bool = False
    """Train LoRA adapters (PEFT) on every c_attn, c_proj and c_fc instead of the weights."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    freeze_except: Optional[int] = None
    """Train only the last N blocks (and the final norm and head); 0: the head alone (a linear probe)."""
    device: str = "auto"
    """cpu, cuda, cuda:1, mps; auto: cuda > mps > cpu."""
    log_interval: int = field(default=10, metadata={"cli": False})
    """Optimizer steps between metrics.jsonl rows."""

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_steps", "warmup_steps", "eval_interval", "patience"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        if self.lr < 0:
            raise UserError("--lr must be >= 0")
        if self.lora and self.freeze_except is not None:
            raise UserError("--lora and --freeze-except are alternatives: give one")

    @property
    def learning_rate(self) -> float:
        return self.lr or (1e-3 if self.lora else 3e-4)

    def lora_dict(self) -> Optional[dict]:
        return lora_config_dict(self.lora_r, self.lora_alpha, self.lora_dropout) if self.lora else None


def _lr(step: int, total: int, o: FinetuneOptions) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    peak = o.learning_rate
    if step < o.warmup_steps:
        return peak * (step + 1) / (o.warmup_steps + 1)
    frac = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def fit(model: nn.Module, batches: Callable[[int], list], loss_of: Callable[[Any], torch.Tensor],
         evaluate: Callable[[], dict], better: Callable[[dict, Optional[dict]], bool],
         save: Callable[[str, dict, dict], None], o: FinetuneOptions, out: Path,
         describe: Callable[[int, dict, Optional[float]], str], log: Callable[[str], None],
         tokens_of: Callable[[Any], int] = lambda batch: 0) -> dict:
    """Optimise, evaluate every eval_interval steps, keep the best, stop early; returns a summary.

    save(name, {"step", "tokens"}, val metrics) writes checkpoint `name` ("best" or "latest").
    The first Ctrl-C / SIGTERM ends the current step, saves latest and stops ("interrupted").
    """
    with stop_on_signals() as signals:
        return _fit(model, batches, loss_of, evaluate, better, save, o, out, describe, log, tokens_of, signals)


def _fit(model, batches, loss_of, evaluate, better, save, o: FinetuneOptions, out: Path, describe, log, tokens_of,
         signals) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=o.learning_rate, betas=(0.9, 0.99))
    per_epoch = len(batches(0))
    total = o.max_steps or o.epochs * per_epoch
    interval = o.eval_interval or per_epoch
    n_trainable = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"training {n_trainable:,} of {n_all:,} parameters for {total} steps ({per_epoch} per epoch), lr {o.learning_rate:g}")
    metrics_path = out / "metrics.jsonl"

    def record(row: dict) -> None:
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    step, tokens, best, bad, stop = 0, 0, None, 0, "max_steps" if o.max_steps else "epochs"
    t0 = time.time()
    first = last = evaluate()  # before any step: shows what training starts from
    record({"step": 0, **first})
    log(describe(0, first, None))
    model.train()
    epoch, running = 0, []
    while step < total:
        for batch in batches(epoch):
            for g in opt.param_groups:
                g["lr"] = _lr(step, total, o)
            loss = loss_of(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            if not torch.isfinite(loss):
                raise UserError(f"non-finite loss at step {step}; lower --lr")
            opt.step()
            step += 1
            tokens += tokens_of(batch)
            running.append(loss.item())
            if step % o.log_interval == 0:
                record({"step": step, "epoch": epoch, "train_loss": sum(running) / len(running), "lr": _lr(step - 1, total, o),
                        "elapsed_s": round(time.time() - t0, 3)})
            if step % interval == 0 or step == total:
                ev = last = evaluate()
                model.train()
                train_loss = sum(running) / len(running)
                running = []
                record({"step": step, "epoch": epoch, "train_loss": train_loss, **ev})
                log(describe(step, ev, train_loss))
                if better(ev, best):
                    best, bad = dict(ev, step=step), 0
                    save("best", {"step": step, "tokens": tokens}, ev)
                else:
                    bad += 1
                if o.patience and bad >= o.patience:
                    stop = f"early stopping: no val improvement in {bad} evaluations"
                    break
            if signals.requested and step < total:
                stop = INTERRUPTED
                break
            if step >= total:
                break
        if stop.startswith("early") or stop == INTERRUPTED:
            break
        epoch += 1
    save("latest", {"step": step, "tokens": tokens}, last)  # the last evaluation's metrics (none after an interrupt)
    return {"steps": step, "tokens": tokens, "stop_reason": stop, "best": best, "initial": first, "elapsed_s": round(time.time() - t0, 3)}


@dataclass
class FinetuneSetup:
    """What both tasks start from: the output dir, the base run (its GPT in train mode) and the device."""

    out: Path
    base: LoadedRun
    device: torch.device

    @property
    def gpt(self) -> GPT:
        return self.base.gpt


def prepare_run(base: str | os.PathLike, out: str | os.PathLike, o: FinetuneOptions, force: bool,
                which: str) -> FinetuneSetup:
    """Check the options and the output dir, load the base run, pick the device and threads."""
    o.check()
    out = Path(out)
    check_out(out, force, [Path(base)])
    base_run = load_run(base, which)
    base_run.gpt.train()
    configure_threads(0)
    device = pick_device(o.device)
    torch.manual_seed(o.seed)
    return FinetuneSetup(out, base_run, device)


def write_run_files(out: Path, config: dict, device: torch.device) -> None:
    """config.json and environment.json (for the report) of a new fine-tuning run."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_FILE, config)
    atomic_write_json(out / "environment.json", environment(device, torch.float32))


def finish_run(out: Path, result: dict, log: Callable[[str], None]) -> None:
    """result.json, the report and its summary; after an interrupt, how to see what was saved."""
    from ..report import report_cli

    atomic_write_json(out / "result.json", result)
    if result["stop_reason"] == INTERRUPTED:
        log(f"interrupted at step {result['steps']}: saved {out}/latest")
    report_cli(out)


def finetune_record(kind: str, base_ckpt: Path, o: FinetuneOptions, train_file, val_file, **extra) -> dict:
    """config.json's "finetune" entry: the task, the base (path and weights hash) and the options."""
    return {"task": kind, "base": str(base_ckpt.resolve()), "base_sha256": weights_sha256(base_ckpt),
            "train_file": str(train_file), "val_file": str(val_file), "options": asdict(o),
            "lora": o.lora_dict(), **extra}


def run_config(base: LoadedRun, record: dict, command: Optional[str]) -> dict:
    """The fine-tuned run's config.json: the base's, with its "finetune" record and its own command (not the base's)."""
    config = dict(base.config, finetune=record)
    config.pop("command", None)
    if command:
        config["command"] = command
    return config


def run_files(model: nn.Module, lora: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The tensor files of a fine-tuned checkpoint: full weights or the LoRA adapter, and a classifier's head."""
    files = {ADAPTER_FILE: adapter_tensors(model)} if lora else {MODEL_FILE: model_tensors(gpt_of(model))}
    head = classifier_of(model)
    if head is not None:
        files[HEAD_FILE] = {k: v.detach().contiguous().cpu() for k, v in head.head.state_dict().items()}
    return files


def checkpoint_saver(out: Path, model: nn.Module, o: FinetuneOptions, config: dict,
                     tokenizer_file: Path) -> Callable[[str, dict, dict], None]:
    """save(name, {"step", "tokens"}, val metrics) for fit(): "best" moves latest and best, "latest" latest only."""
    json_files = {CONFIG_FILE: config}
    if o.lora:
        json_files[ADAPTER_CONFIG_FILE] = o.lora_dict()

    def save(name: str, progress: dict, ev: dict) -> None:
        write_checkpoint(out, progress["step"], tensors=run_files(model, o.lora), json_files=json_files,
                         tokenizer_file=tokenizer_file, state={**progress, "val": ev},
                         aliases=["latest", "best"] if name == "best" else ["latest"])

    return save


def train_part(train_loss: Optional[float]) -> str:
    return "" if train_loss is None else f"train loss {train_loss:.4f}, "


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_out(out: Path, force: bool, inputs: Sequence[Path]) -> None:
    for p in inputs:
        if p.exists() and out.exists() and p.resolve().is_relative_to(out.resolve()):
            raise UserError(f"--out {out} holds the input run {p}; choose a new directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out} already exists and is not empty: pass --force to replace it")
        shutil.rmtree(out)


def setup_trainable(model: nn.Module, *, lora: Optional[dict] = None, freeze_except: Optional[int] = None) -> nn.Module:
    """Apply a training mode: LoRA (returns the PEFT wrapper), freeze all but the last N blocks, or full."""
    if lora is not None and freeze_except is not None:
        raise UserError("--lora and --freeze-except are alternatives: give one")
    if lora is not None:
        return add_lora(model, lora)
    if freeze_except is not None:
        gpt = gpt_of(model)
        n_layer = len(gpt.transformer.h)
        if not 0 <= freeze_except <= n_layer:
            raise UserError(f"--freeze-except must be between 0 and the model's {n_layer} blocks, not {freeze_except}")
        model.requires_grad_(False)
        for block in list(gpt.transformer.h)[n_layer - freeze_except:]:
            block.requires_grad_(True)
        if freeze_except:
            gpt.transformer.ln_f.requires_grad_(True)
        head = getattr(model, "head", None)
        if head is not None:
            head.requires_grad_(True)
        elif freeze_except:  # an LM's head is its output layer (tied to wte: then that trains too)
            gpt.lm_head.requires_grad_(True)
    return model
