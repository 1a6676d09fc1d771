"""Metrics: language modelling (loss, perplexity, bits per byte), classification (accuracy,
macro-F1, confusion matrix) and generation (BLEU, chrF, exact match)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from . import UserError


def confusion_matrix(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """Rows: true label, columns: predicted label, both in `labels` order."""
    index = {lab: i for i, lab in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        m[index[t]][index[p]] += 1
    return m


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str],
                           labels: Optional[Sequence[str]] = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

    Macro-F1 averages over the classes that occur in y_true or y_pred (as scikit-learn does
    by default); a class never predicted has precision 0.
    """
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError("y_true and y_pred must be non-empty and of equal length")
    labels = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred))
    cm = confusion_matrix(y_true, y_pred, labels)
    per_class, f1s = {}, []
    present = set(y_true) | set(y_pred)
    for i, lab in enumerate(labels):
        tp = cm[i][i]
        fp = sum(cm[r][i] for r in range(len(labels))) - tp
        fn = sum(cm[i]) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": sum(cm[i])}
        if lab in present:
            f1s.append(f1)
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    return {"accuracy": correct / len(y_true), "macro_f1": sum(f1s) / len(f1s), "n": len(y_true),
            "labels": labels, "confusion_matrix": cm, "per_class": per_class}


def generation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenization, 4-grams) and exact match."""
    try:
        import sacrebleu
    except ImportError:
        raise UserError("BLEU/chrF need sacrebleu: pip install 'scratchgpt[finetune]'") from None
    hyps, refs = list(hypotheses), list(references)
    if len(hyps) != len(refs) or not hyps:
        raise ValueError("need equally many hypotheses and references, at least one")
    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
            "exact_match": sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / len(hyps), "n": len(hyps)}


def format_confusion(cm: list[list[int]], labels: Sequence[str]) -> str:
    """A small text table (rows true, columns predicted) for the training log."""
    names = [str(lab)[:12] for lab in labels]
    w = max(6, *(len(n) for n in names), *(len(str(v)) for row in cm for v in row))
    head = " " * (w + 2) + " ".join(n.rjust(w) for n in names) + "   <- predicted"
    rows = [f"{n.rjust(w)}: " + " ".join(str(v).rjust(w) for v in row) for n, row in zip(names, cm)]
    return "\n".join([head, *rows])


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
