"""Task heads on a GPT: a classifier over its pooled final hidden state.

`last` pooling (the default) takes the final hidden state of the last real token, which under
causal attention has seen the whole text; `mean` averages the hidden states of the real
tokens. Batches are right-padded: with causal attention no real token sees padding, so
padding changes nothing. A bidirectional (MLM) base would see padding, so its batches are
split into rows of equal length instead.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from . import UserError
from .model import GPT, gpt_of


class GPTClassifier(nn.Module):
    """A GPT whose pooled final hidden state feeds a linear head: idx (B, T), lengths (B,) -> logits (B, K)."""

    def __init__(self, gpt: GPT, n_classes: int, pooling: str = "last"):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise UserError(f"pooling must be 'last' or 'mean', not {pooling!r}")
        self.gpt = gpt
        self.pooling = pooling
        self.head = nn.Linear(gpt.cfg.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=gpt.cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.gpt(idx, return_hidden=True)
        if self.pooling == "last":
            pooled = h[torch.arange(h.size(0), device=h.device), lengths - 1]
        else:
            real = (torch.arange(h.size(1), device=h.device)[None, :] < lengths[:, None]).to(h.dtype)
            pooled = (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        return self.head(pooled)


def classifier_of(model: nn.Module) -> Optional[GPTClassifier]:
    """The classifier inside a (PEFT-wrapped) model, or None for a language model."""
    for m in model.modules():
        if isinstance(m, GPTClassifier):
            return m
    return None


def pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-padded (N, longest) tensor of token id lists."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def classifier_logits(model: nn.Module, seqs: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits (N, K) for token sequences of any lengths, right-padded (split by length for bidirectional bases)."""
    causal = gpt_of(model).cfg.causal
    groups = [list(range(len(seqs)))] if causal else _by_length(seqs)
    out: list[Optional[torch.Tensor]] = [None] * len(seqs)
    for members in groups:
        idx = pad([seqs[i] for i in members], 0).to(device)  # pad id is arbitrary: no real token attends to it
        lengths = torch.tensor([len(seqs[i]) for i in members], device=device)
        logits = model(idx, lengths)
        for k, i in enumerate(members):
            out[i] = logits[k]
    return torch.stack(out)  # type: ignore[arg-type]


def _by_length(seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(len(s), []).append(i)
    return list(groups.values())


@torch.no_grad()
def predict_proba(model: nn.Module, seqs: Sequence[Sequence[int]], device: torch.device | str = "cpu",
                  batch_size: int = 64) -> torch.Tensor:
    """Class probabilities (N, K) on the CPU; batches sorted by length so padding stays small."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    parts = []
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        parts.append((chunk, classifier_logits(model, [seqs[j] for j in chunk], device).float().softmax(-1).cpu()))
    out = torch.empty(len(seqs), parts[0][1].size(1))
    for chunk, p in parts:
        out[chunk] = p
    return out
