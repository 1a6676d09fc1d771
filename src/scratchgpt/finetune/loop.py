"""The fine-tuning loop both tasks share (`fit`), its options, and run setup and saving.

Training modes: the whole model (default); --freeze-except N (only the last N blocks, the
final norm and the head train; 0 = a linear probe); --lora (PEFT LoRA on every c_attn,
c_proj and c_fc; base weights frozen; a classifier's new head trains too).

Run layout: as a pretraining run (RUN/checkpoints/step-N, RUN/latest, RUN/best, written by
checkpoint.write_checkpoint), without optimizer state, except in the `latest/` that a Ctrl-C or
SIGTERM leaves: that one also holds optimizer.safetensors and state.json's "resume" (the loop's
counters, the shuffling generator, the RNG), and the same command with `--resume` continues it
bit-exactly. Its checkpoint holds model.safetensors (not with --lora), head.safetensors
(classify), adapter_model.safetensors + adapter_config.json (--lora), config.json (the base
config + "finetune" (+ "classifier" | "chat_template")), tokenizer.json and state.json.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .. import UserError
from ..checks import F32, LR, SEED_MAX, check_fields
from ..checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, CONFIG_FILE, HEAD_FILE, MODEL_FILE, OPTIM_FILE, STATE_FILE,
                          LoadedRun, load_model_tensors, load_run, load_tensors, model_tensors, optimizer_from_tensors,
                          rng_state, set_rng_state, verify_checkpoint, weights_sha256, write_checkpoint)
from ..checkpoint.load import checkpoint_config
from ..checkpoint.store import optimizer_files
from ..heads import classifier_of
from ..lora import add_lora, adapter_tensors, lora_config_dict, set_adapter_tensors
from ..model import GPT, gpt_of
from ..optim import OptimConfig, build_optimizer, lr_at, set_lr
from ..runtime import INTERRUPTED, configure_threads, environment, pick_device, stop_on_signals
from ..runs.config import write_run_config
from ..runs.files import ENVIRONMENT_FILE, METRICS_FILE, RESULT_FILE
from ..runs.guard import check_out, write_marker
from ..runs.rows import append_row, cut_back
from ..runs.staging import remove_replaced
from ..utils import atomic_write_json, finite_or_null


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

    def __post_init__(self) -> None:
        check_fields(self, lambda name: "--" + name.replace("_", "-"), {
            "epochs": "[1, inf)", "max_steps": "[0, inf)", "batch_size": "[1, 1048576]", "lr": LR,
            "weight_decay": LR, "warmup_steps": "[0, inf)", "grad_clip": f"[0, {F32}]",
            "eval_interval": "[0, inf)", "patience": "[0, inf)", "seed": f"[0, {SEED_MAX}]", "lora_r": "[1, 65536]",
            "lora_alpha": f"[0, {F32}]",
            "lora_dropout": "[0, 1)", "freeze_except": "[0, 1024]", "log_interval": "[1, inf)"})

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

    def optim_config(self) -> OptimConfig:
        """optim.py's AdamW and schedule as fine-tuning uses them: linear warmup, then cosine decay to 10% of
        the peak; betas (0.9, 0.99); torch's unfused step (with build_optimizer's decay_embeddings=True)."""
        peak = self.learning_rate
        return OptimConfig(optimizer="adamw", lr=peak, min_lr=0.1 * peak, warmup_iters=self.warmup_steps,
                           schedule="cosine", weight_decay=self.weight_decay, betas=(0.9, 0.99),
                           grad_clip=self.grad_clip, fused=False)


@dataclass
class Progress:
    """The fine-tuning loop's counters: what an interrupted run saves and `--resume` restores."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    position: int = 0  # batches of this epoch already trained on
    best: Optional[dict] = None
    bad: int = 0  # evaluations since the best
    running: list = field(default_factory=list)  # train losses since the last evaluation
    first: Optional[dict] = None  # the evaluation before any step
    last: Optional[dict] = None  # the latest evaluation
    elapsed_s: float = 0.0
    shuffle: Optional[str] = None  # the batch order generator's state when this epoch's order was drawn (base64)
    rng: Optional[dict] = None  # the global RNGs (dropout) at the interrupt


def fit(model: nn.Module, batches: Callable[[int], list], loss_of: Callable[[Any], torch.Tensor],
        evaluate: Callable[[], dict], better: Callable[[dict, Optional[dict]], bool],
        save: Callable[..., None], o: FinetuneOptions, out: Path,
        describe: Callable[[int, dict, Optional[float]], str], log: Callable[[str], None],
        tokens_of: Callable[[Any], int] = lambda batch: 0, generator: Optional[torch.Generator] = None,
        resume: Optional[Path] = None) -> dict:
    """Optimise, evaluate every eval_interval steps, keep the best, stop early; returns a summary.

    save(name, {"step", "tokens"[, "resume"]}, val metrics[, optimizer]) writes checkpoint `name`
    ("best" or "latest"). The first Ctrl-C / SIGTERM ends the current step and saves latest with
    the optimizer and the loop's state ("interrupted"); `resume` (that checkpoint) continues from
    it. `generator` is what `batches` shuffles with: its state is part of that state.
    """
    with stop_on_signals() as signals:
        return _fit(model, batches, loss_of, evaluate, better, save, o, out, describe, log, tokens_of, signals,
                    generator, resume)


def _fit(model, batches, loss_of, evaluate, better, save, o: FinetuneOptions, out: Path, describe, log, tokens_of,
         signals, generator, resume) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    ocfg = o.optim_config()
    opt, = build_optimizer(model, ocfg, params[0].device, decay_embeddings=True)
    per_epoch = len(batches(0))
    total = o.max_steps or o.epochs * per_epoch
    interval = o.eval_interval or per_epoch
    n_trainable = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"training {n_trainable:,} of {n_all:,} parameters for {total} steps ({per_epoch} per epoch), lr {o.learning_rate:g}")
    metrics_path = out / METRICS_FILE

    def record(row: dict) -> None:
        append_row(metrics_path, row)

    stop = "max_steps" if o.max_steps else "epochs"
    p = _start(resume, opt, metrics_path, evaluate, record, log, describe)
    model.train()
    t0 = time.time() - p.elapsed_s
    restored_shuffle = p.shuffle if resume is not None else None
    device = params[0].device  # its generator draws the dropout masks on a GPU: part of an exact resume
    if p.rng is not None:
        set_rng_state(p.rng, device)
    while p.step < total:
        if generator is not None:  # this epoch's order is drawn now: keep the state it is drawn from
            _keep_shuffle_state(generator, p, restored_shuffle)
            restored_shuffle = None
        for batch in batches(p.epoch)[p.position:]:
            _step(batch, p, opt, ocfg, total, params, o.grad_clip, loss_of, tokens_of)
            if p.step % o.log_interval == 0:
                record({"step": p.step, "epoch": p.epoch, "train_loss": sum(p.running) / len(p.running),
                        "lr": lr_at(p.step - 1, ocfg, total), "elapsed_s": round(time.time() - t0, 3)})
            if p.step % interval == 0 or p.step == total:
                _evaluate_and_keep_best(p, model, evaluate, better, save, record, log, describe)
                if o.patience and p.bad >= o.patience:
                    stop = f"early stopping: no val improvement in {p.bad} evaluations"
                    break
            if signals.requested and p.step < total:
                stop = INTERRUPTED
                break
            if p.step >= total:
                break
        if stop.startswith("early") or stop == INTERRUPTED:
            break
        p.epoch, p.position = p.epoch + 1, 0
    p.elapsed_s = time.time() - t0
    if stop == INTERRUPTED:  # everything --resume needs, with the optimizer
        p.rng = rng_state(device)
        save("latest", {"step": p.step, "tokens": p.tokens, "resume": asdict(p)}, p.last, opt)
    else:
        save("latest", {"step": p.step, "tokens": p.tokens}, p.last)  # the last evaluation's metrics
    return {"steps": p.step, "tokens": p.tokens, "stop_reason": stop, "best": p.best, "initial": p.first,
            "elapsed_s": round(p.elapsed_s, 3)}


def _start(resume: Optional[Path], opt, metrics_path: Path, evaluate, record, log, describe) -> Progress:
    """The loop's counters: an interrupted run's (its optimizer restored), or fresh after a first evaluation."""
    if resume is not None:
        p = _restore(resume, opt, metrics_path)
        log(f"resumed from {resume} at step {p.step}")
        return p
    p = Progress()
    p.first = p.last = evaluate()  # before any step: shows what training starts from
    record({"step": 0, **p.first})
    log(describe(0, p.first, None))
    return p


def _keep_shuffle_state(generator: torch.Generator, p: Progress, restored: Optional[str]) -> None:
    """Record the state this epoch's order is drawn from (a resume first puts back the one it saved)."""
    if restored is not None:
        generator.set_state(torch.frombuffer(bytearray(base64.b64decode(restored)), dtype=torch.uint8))
    p.shuffle = base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def _step(batch, p: Progress, opt, ocfg, total: int, params: list, grad_clip: float, loss_of, tokens_of) -> None:
    """One optimizer step on `batch`; a non-finite loss stops the run."""
    set_lr([opt], lr_at(p.step, ocfg, total), ocfg)
    loss = loss_of(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if not torch.isfinite(loss):
        raise UserError(f"non-finite loss at step {p.step}; lower --lr")
    opt.step()
    p.step += 1
    p.position += 1
    p.tokens += tokens_of(batch)
    p.running.append(loss.item())


def _evaluate_and_keep_best(p: Progress, model, evaluate, better, save, record, log, describe) -> None:
    """A periodic evaluation: its metrics row and line, and the best checkpoint when it improved (else one more
    evaluation without improvement)."""
    ev = p.last = evaluate()
    model.train()
    train_loss = sum(p.running) / len(p.running)
    p.running = []
    record({"step": p.step, "epoch": p.epoch, "train_loss": train_loss, **ev})
    log(describe(p.step, ev, train_loss))
    if better(ev, p.best):
        p.best, p.bad = dict(ev, step=p.step), 0
        save("best", {"step": p.step, "tokens": p.tokens}, ev)
    else:
        p.bad += 1


def _restore(ckpt: Path, opt: torch.optim.Optimizer, metrics_path: Path) -> Progress:
    """The optimizer and counters of an interrupted run; metrics.jsonl cut back to its step."""
    state = verify_checkpoint(ckpt)
    tensors = load_tensors(ckpt / OPTIM_FILE)
    optimizer_from_tensors(opt, {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("0.")},
                           state["optimizer"][0])
    p = Progress(**state["resume"])
    cut_back(metrics_path, p.step, str(ckpt / STATE_FILE))
    return p


def check_resumable(out: Path, o: FinetuneOptions) -> Path:
    """`--resume`, before anything is written: OUT/latest is an interrupted fine-tune with these options."""
    ckpt = out / "latest"
    state = verify_checkpoint(ckpt) if (ckpt / STATE_FILE).exists() else {}
    if "resume" not in state:
        raise UserError(f"{out}: nothing to resume (no fine-tune stopped by Ctrl-C or SIGTERM in {ckpt})")
    saved = (checkpoint_config(ckpt / CONFIG_FILE).get("finetune") or {}).get("options", {})
    changed = sorted(k for k, v in asdict(o).items() if saved.get(k, v) != v)
    if changed:
        raise UserError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from the run's "
                        "(resume with the command line it started with)")
    return ckpt


def resume_checkpoint(out: Path, model: nn.Module, o: FinetuneOptions) -> Path:
    """`--resume`: load the interrupted run's weights (full or adapter, and a head) into the freshly set-up
    model; returns the checkpoint for fit(resume=...)."""
    ckpt = out / "latest"
    if o.lora:
        set_adapter_tensors(model, load_tensors(ckpt / ADAPTER_FILE), str(ckpt / ADAPTER_FILE))
    else:
        load_model_tensors(model, load_tensors(ckpt / MODEL_FILE))
    head = classifier_of(model)
    if head is not None:
        head.head.load_state_dict(load_tensors(ckpt / HEAD_FILE))
    return ckpt


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
                which: str, resume: bool = False) -> FinetuneSetup:
    """Check the options and the output dir, load the base run, pick the device and threads."""
    o.check()
    out = Path(out)
    if resume and force:
        raise UserError("--resume continues --out, --force replaces it: give one")
    if resume:
        check_resumable(out, o)
    elif check_out(out, "run", force=force, inputs=[Path(base)]):
        remove_replaced(out)  # a run scratchgpt wrote (runs.guard)
    base_run = load_run(base, which)
    base_run.gpt.train()
    configure_threads(0)
    device = pick_device(o.device)
    torch.manual_seed(o.seed)
    return FinetuneSetup(out, base_run, device)


def write_run_files(out: Path, config: dict, device: torch.device) -> None:
    """config.json and environment.json (for the report) of a new fine-tuning run."""
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "run")
    write_run_config(out, config)
    atomic_write_json(out / ENVIRONMENT_FILE, environment(device, torch.float32))


def finish_run(out: Path, result: dict, log: Callable[[str], None]) -> None:
    """result.json, the report and its summary; after an interrupt, how to see what was saved."""
    from ..report import report_at_end

    atomic_write_json(out / RESULT_FILE, result)
    if result["stop_reason"] == INTERRUPTED:
        log(f"interrupted at step {result['steps']}: saved {out}/latest")
    report_at_end(out)


def finetune_record(kind: str, base_ckpt: Path, o: FinetuneOptions, train_file, val_file, **extra) -> dict:
    """config.json's "finetune" entry: the task, the base (path and weights hash) and the options."""
    return {"task": kind, "base": str(base_ckpt.resolve()), "base_sha256": weights_sha256(base_ckpt),
            "train_file": str(train_file), "val_file": str(val_file), "options": asdict(o),
            "lora": o.lora_dict(), **extra}


def recorded_command(out: Path, command: Optional[str], resume: bool) -> Optional[str]:
    """The command line config.json records: after --resume still the run's own, not the resume's."""
    if resume:
        return checkpoint_config(out / "latest" / CONFIG_FILE).get("command")
    return command


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
    """save(name, progress, val metrics[, optimizer]) for fit(): "best" moves latest and best, "latest" latest only."""
    json_files = {CONFIG_FILE: config}
    if o.lora:
        json_files[ADAPTER_CONFIG_FILE] = o.lora_dict()

    def save(name: str, progress: dict, ev: dict, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        tensors, state = run_files(model, o.lora), finite_or_null({**progress, "val": ev})
        if optimizer is not None:  # an interrupted run: what --resume continues from
            tensors[OPTIM_FILE], state["optimizer"] = optimizer_files([optimizer])
        write_checkpoint(out, progress["step"], tensors=tensors, json_files=json_files,
                         tokenizer_file=tokenizer_file, state=state,
                         aliases=["latest", "best"] if name == "best" else ["latest"])

    return save


def train_part(train_loss: Optional[float]) -> str:
    return "" if train_loss is None else f"train loss {train_loss:.4f}, "


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
