"""Evaluation: loss, perplexity and bits per byte over a whole split (`scratchgpt eval`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import UserError
from .utils import atomic_write_json


@torch.no_grad()
def evaluate_lm(model, dataset, context: int, device="cpu", batch_size: int = 16, tokenizer=None) -> dict:
    """Mean next-token loss over the whole split in non-overlapping windows of `context` tokens.

    Every token after the first is predicted exactly once, with at most `context - 1` tokens of
    history (the same rule for every model, so figures from different tools compare).
    With a tokenizer, bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted text.
    """
    tokens = dataset.tokens
    n = len(tokens)
    if n < 2:
        raise UserError("the split has fewer than 2 tokens")
    if context > model.cfg.block_size and model.cfg.pos != "rope":
        raise UserError(f"context {context} exceeds the model's block_size {model.cfg.block_size}")
    was_training = model.training
    model.eval()
    starts = list(range(0, n - 1, context))
    total_nats, total_tokens = 0.0, 0
    full = [s for s in starts if s + context + 1 <= n]
    tail = [s for s in starts if s + context + 1 > n]
    offsets_all = np.arange(context + 1)
    for i in range(0, len(full), batch_size):
        idx = np.asarray(full[i:i + batch_size])[:, None] + offsets_all
        block = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
        x, y = block[:, :-1].to(device), block[:, 1:].to(device)
        logits = model(x)
        nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        total_nats += nats.item()
        total_tokens += y.numel()
    for s in tail:
        block = torch.from_numpy(np.asarray(tokens[s:n], dtype=np.int64))[None]
        x, y = block[:, :-1].to(device), block[:, 1:].to(device)
        logits = model(x)
        total_nats += torch.nn.functional.cross_entropy(logits[0].float(), y[0], reduction="sum").item()
        total_tokens += y.numel()
    if was_training:
        model.train()
    loss = total_nats / total_tokens
    result = {"val_loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": total_tokens, "context": context}
    if tokenizer is not None:
        n_bytes = len(tokenizer.decode(np.asarray(tokens[1:n]).tolist()).encode("utf-8"))
        result["bytes"] = n_bytes
        result["bits_per_byte"] = total_nats / math.log(2) / max(n_bytes, 1)
    return result


def evaluate_lm_cli(run: Path, data: Optional[Path] = None, context: int = 0, which: str = "best",
                    batch_size: int = 16) -> dict:
    """`scratchgpt eval RUN`: JSON with val_loss, perplexity and bits_per_byte, printed and saved as RUN/eval.json."""
    from .checkpoint import load_model
    from .data import TokenDataset, load_meta

    model, tokenizer, config = load_model(run, which)
    data = Path(data or config.get("data") or "")
    meta = load_meta(data)
    if meta["vocab_size"] != model.cfg.vocab_size:
        raise UserError(f"vocabulary mismatch: the model has {model.cfg.vocab_size} tokens, {data} has {meta['vocab_size']}")
    context = context or model.cfg.block_size
    if context < 1:
        raise UserError("--context must be at least 1")
    dataset = TokenDataset(data, "val", 1)
    result = evaluate_lm(model, dataset, context, batch_size=batch_size, tokenizer=tokenizer)
    result = {"run": str(run), "data": str(data), "split": "val", **result}
    print(json.dumps(result, indent=2))
    if Path(run).is_dir():
        try:
            atomic_write_json(Path(run) / "eval.json", result)
        except OSError as e:
            print(f"warning: could not save eval.json: {e}", file=sys.stderr)
    return result
