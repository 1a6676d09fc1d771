"""`scratchgpt finetune sft`: supervised fine-tuning on prompt/response (or multi-turn) examples.

Each example becomes chat-template text (prompts.py; default, for tokenizers with <|endoftext|>):

    ### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}<|endoftext|>

(char tokenizers have no EOT token, so the response ends with "\\n### End\\n" instead).
The template is stored as `chat_template` in the checkpoint's config.json, so `chat`, `sample`
and `serve` format turns exactly as in training. Loss is on response tokens only (prompt
labels are -100) unless --no-mask-prompt. Examples longer than the context keep their first
block_size + 1 tokens (counted and reported); an example whose prompt alone fills the context
is an error. --pack puts several whole examples in one row (no attention reset between them,
as in GPT-style packing); otherwise one example a row, right-padded. The best checkpoint has
the lowest val loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import UserError
from ..checkpoint import TOKENIZER_FILE, Which
from ..data.masking import IGNORE
from ..data.readers import SFTExample, read_sft
from ..heads import pad
from ..model import gpt_of
from ..prompts import encode_conversation, load_template
from ..tokenizer import Tokenizer
from .loop import (FinetuneOptions, checkpoint_saver, finetune_record, finish_run, fit, prepare_run,
                   recorded_command, resume_checkpoint, run_config, setup_trainable, stderr_log, train_part,
                   write_run_files)


@dataclass
class SFTOptions:
    """How `finetune sft` formats and batches examples (flags --template, --no-mask-prompt, --pack)."""

    template: Optional[str] = None
    """Chat template JSON file (user, system, assistant_end, stop); default: ### Instruction / ### Response."""
    mask_prompt: bool = True
    """Loss on the responses only (--no-mask-prompt learns the prompt tokens too)."""
    pack: bool = False
    """Several whole examples per row instead of padding each."""


def sft_labels(ids: Sequence[int], learn: Sequence[bool], mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """(inputs, labels) for next-token training: labels[i] predicts ids[i+1], -100 where not learned."""
    x = list(ids[:-1])
    y = [t if (m or not mask_prompt) else IGNORE for t, m in zip(ids[1:], learn[1:])]
    return x, y


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions (-100 positions contribute nothing)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE)


def build_sft_examples(tokenizer: Tokenizer, template: dict, examples: Sequence[SFTExample], block_size: int, mask_prompt: bool,
                       note: Callable[[str], None] = stderr_log) -> list[tuple[list[int], list[bool]]]:
    """Encoded examples cut to block_size + 1 tokens (the count is reported); errors name the line."""
    out, cut = [], 0
    for ex in examples:
        ids, learn = encode_conversation(tokenizer, template, ex.turns, ex.where)
        if len(ids) > block_size + 1:
            ids, learn, cut = ids[:block_size + 1], learn[:block_size + 1], cut + 1
            if mask_prompt and not any(learn[1:]):
                raise UserError(f"{ex.where}: the prompt fills the whole context of {block_size} tokens, "
                                "leaving no response token to learn")
        out.append((ids, learn))
    if cut:
        note(f"note: {cut} of {len(examples)} examples in {examples[0].where.rsplit(':', 1)[0]} are longer than the "
             f"context of {block_size} tokens; kept their first {block_size + 1} tokens")
    return out


def pack_rows(examples: Sequence[tuple[list[int], list[bool]]], order: Sequence[int],
              max_len: int) -> list[tuple[list[int], list[bool]]]:
    """Whole examples concatenated, in `order`, into rows of at most max_len tokens (none is split)."""
    rows: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    learn: list[bool] = []
    for i in order:
        e_ids, e_learn = examples[i]
        if ids and len(ids) + len(e_ids) > max_len:
            rows.append((ids, learn))
            ids, learn = [], []
        ids, learn = ids + e_ids, learn + e_learn
    if ids:
        rows.append((ids, learn))
    return rows


def _sft_batch(rows: Sequence[tuple[list[int], list[bool]]], mask_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [sft_labels(ids, learn, mask_prompt) for ids, learn in rows]
    return pad([p[0] for p in pairs], 0), pad([p[1] for p in pairs], IGNORE)


def train_sft(model: nn.Module, train_ex: list[tuple[list[int], list[bool]]], val_ex: list[tuple[list[int], list[bool]]],
              o: FinetuneOptions, out: Path, *, mask_prompt: bool = True, pack: bool = False,
              save: Callable[..., None] = lambda *a: None, device: torch.device | str = "cpu",
              log: Callable[[str], None] = stderr_log, resume: Optional[Path] = None) -> dict:
    """Train a (possibly LoRA-wrapped) GPT on encoded examples; val loss over response tokens.
    `resume`: an interrupted run's latest/ (its weights already in `model`), continued exactly."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(o.seed)
    bs = gpt_of(model).cfg.block_size
    cache: dict[int, list] = {}

    def batches(epoch: int) -> list:
        if epoch not in cache:  # fit asks for epoch 0 twice (once to count steps)
            cache.clear()
            order = torch.randperm(len(train_ex), generator=gen).tolist()
            rows = pack_rows(train_ex, order, bs + 1) if pack else [train_ex[i] for i in order]
            cache[epoch] = [rows[i:i + o.batch_size] for i in range(0, len(rows), o.batch_size)]
        return cache[epoch]

    def loss_of(rows) -> torch.Tensor:
        x, y = _sft_batch(rows, mask_prompt)
        return sft_loss(model(x.to(device)), y.to(device))

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(val_ex), o.batch_size * 4):
            x, y = _sft_batch(val_ex[i:i + o.batch_size * 4], mask_prompt)
            logits = model(x.to(device))
            y = y.to(device)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
            count += int((y != IGNORE).sum())
        return {"val_loss": total / max(count, 1), "val_tokens": count}

    def better(ev: dict, best: Optional[dict]) -> bool:
        return best is None or ev["val_loss"] < best["val_loss"]

    model.to(device)
    return fit(model, batches, loss_of, evaluate, better, save, o, out,
                lambda step, ev, tl: f"step {step}: {train_part(tl)}val loss {ev['val_loss']:.4f}", log,
               lambda rows: sum(len(ids) - 1 for ids, _ in rows), generator=gen, resume=resume)


def finetune_sft(base: str | os.PathLike, train_file: str | os.PathLike, val_file: str | os.PathLike,
                 out: str | os.PathLike, *, force: bool = False, resume: bool = False, which: Which = "best",
                 options: Optional[FinetuneOptions] = None, task: Optional[SFTOptions] = None,
                 log: Callable[[str], None] = stderr_log, command: Optional[str] = None, **task_fields: Any) -> dict:
    """`scratchgpt finetune sft`: returns the summary also written to out/result.json.

    `task` (or its fields as keywords: template=..., mask_prompt=..., pack=...) says how to format.

    Args:
        base: base run (or checkpoint dir) to fine-tune
        train_file: training file (.csv, .tsv or .jsonl)
        val_file: validation file, same format
        out: new run directory
        resume: continue `out` after a Ctrl-C or SIGTERM, exactly (give the same command line it started with)
        log: where progress lines go (default: stderr)
        command: the command line, recorded in config.json
    """
    o = options or FinetuneOptions()
    t = replace(task or SFTOptions(), **task_fields)
    run = prepare_run(base, out, o, force, which, resume)
    tokenizer, out, gpt = run.base.tokenizer, run.out, run.gpt
    if not gpt.cfg.causal:
        raise UserError(f"{run.base.checkpoint} is a bidirectional (mlm) model: SFT needs a causal model that can generate")
    tmpl = load_template(t.template, tokenizer)
    bs = gpt.cfg.block_size
    train_ex = build_sft_examples(tokenizer, tmpl, read_sft(train_file), bs, t.mask_prompt, log)
    val_ex = build_sft_examples(tokenizer, tmpl, read_sft(val_file), bs, t.mask_prompt, log)
    model = setup_trainable(gpt, lora=o.lora_dict(), freeze_except=o.freeze_except)
    record = finetune_record("sft", run.base.checkpoint, o, train_file, val_file, mask_prompt=t.mask_prompt,
                             pack=t.pack)
    config = run_config(run.base, record, recorded_command(out, command, resume))
    config["chat_template"] = tmpl
    config.pop("classifier", None)
    write_run_files(out, config, run.device)
    save = checkpoint_saver(out, model, o, config, run.base.checkpoint / TOKENIZER_FILE)
    result = train_sft(model, train_ex, val_ex, o, out, mask_prompt=t.mask_prompt, pack=t.pack, save=save,
                       device=run.device, log=log, resume=resume_checkpoint(out, model, o) if resume else None)
    if result["best"] is not None:
        log(f"best: step {result['best']['step']}, val loss {result['best']['val_loss']:.4f}; saved {out}/best")
    finish_run(out, result, log)
    return result
