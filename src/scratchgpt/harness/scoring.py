"""Log-likelihoods of continuations, with each shared context computed once.

A multiple-choice question asks for log P(choice | context) of each of its choices (HellaSwag: 4 endings after
the same ~60-token context). Scored one request at a time, as transformers-based backends do, the context runs
through the model once per choice. Here the requests that share a context become one packed row:

    context  choice 1[:-1]  choice 2[:-1]  ...

each choice at the positions it would have after the context, attending to the context and to its own earlier
tokens only (a `mask`, and `positions`, for GPT.forward). The context's last position predicts every choice's
first token, so a one-token choice (MMLU's " A") costs nothing past the context. The output head runs on the
scored positions only, not on every position of the row. Each request is cut as lm-evaluation-harness's HFLM
cuts it: (context + continuation)[-(max_length + 1):], the continuation scored from the logits before it.
The figures are those of one request per forward up to float rounding (the tests compare them with HFLM's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..model import gpt_of

Request = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)
TOKENS_PER_BATCH = 16384  # packed rows of a forward: (rows x longest) at most this many tokens (and --batch-size)


@dataclass
class _Group:
    """The requests that share a prefix: one packed row."""

    prefix: list[int]
    members: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation)

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(c) - 1 for _, c in self.members)


def group_requests(requests: Sequence[Request], max_length: int) -> list[_Group]:
    """Requests grouped by the prefix they are scored after, the longest rows first."""
    groups: dict[tuple[int, ...], _Group] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError("an empty continuation")
        # (HFLM refuses a continuation longer than the context; here its last max_length tokens are scored)
        whole = (list(ctx) + list(cont))[-(max_length + 1):]
        cont = list(cont)[-max_length:]
        prefix = whole[: len(whole) - len(cont)]
        if not prefix:
            raise ValueError("a request without context tokens (lm-eval puts a prefix token before an empty one)")
        groups.setdefault(tuple(prefix), _Group(prefix)).members.append((i, cont))
    return sorted(groups.values(), key=lambda g: -g.length)


def _batches(groups: list[_Group], batch_size: int) -> list[list[_Group]]:
    """Groups in batches of up to `batch_size` requests and TOKENS_PER_BATCH padded tokens (a longer row alone)."""
    out: list[list[_Group]] = []
    for g in groups:  # longest first: a batch's first row is its widest
        last = out[-1] if out else None
        if last and (sum(len(x.members) for x in last) + len(g.members) <= batch_size
                     and (len(last) + 1) * last[0].length <= TOKENS_PER_BATCH):
            last.append(g)
        else:
            out.append([g])
    return out


def _pack(batch: list[_Group], device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Tokens, positions and attention mask of the batch's rows, and per request the (row, index) of each
    position whose logits score it (first the prefix's last, then its own tokens but the last)."""
    width = batch[0].length
    idx = torch.zeros(len(batch), width, dtype=torch.long)
    pos = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(len(batch), 1, 1)  # padding attends to itself
    rows, cols, targets, owners = [], [], [], []
    for r, g in enumerate(batch):
        p = len(g.prefix)
        idx[r, :p] = torch.tensor(g.prefix)
        pos[r, :p] = torch.arange(p)
        mask[r, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        at = p
        for i, cont in g.members:
            n = len(cont) - 1  # the tokens fed in; the last one is only predicted
            idx[r, at : at + n] = torch.tensor(cont[:-1], dtype=torch.long)
            pos[r, at : at + n] = torch.arange(p, p + n)
            mask[r, at : at + n, :p] = True
            mask[r, at : at + n, at : at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            rows += [r] * (n + 1)
            cols += [p - 1, *range(at, at + n)]
            targets += cont
            owners += [i] * (n + 1)
            at += n
    # additive (0 / -inf) rather than bool: CPU SDPA runs a bool mask 3-4x slower (measured, GQA shapes)
    additive = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return (idx.to(device), pos.to(device), additive[:, None].to(device), torch.tensor(rows), torch.tensor(cols),
            torch.tensor(targets), owners)


@torch.inference_mode()
def score(model: torch.nn.Module, requests: Sequence[Request], max_length: int, batch_size: int,
          progress: Callable[[int], None] = lambda n: None) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether greedy decoding gives the continuation) per request.

    `model`: a GPT, or anything gpt_of finds one in (an unmerged LoRA's PEFT wrapper runs its adapters).
    `progress(n)` is told each batch's request count."""
    gpt = gpt_of(model)
    param = next(gpt.parameters())
    device, dtype = param.device, param.dtype if param.is_floating_point() else torch.float32
    out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    for batch in _batches(group_requests(requests, max_length), max(1, batch_size)):
        idx, pos, mask, rows, cols, targets, owners = _pack(batch, device, dtype)
        hidden = gpt(idx, positions=pos, mask=mask, return_hidden=True)
        logits = gpt.logits(hidden[rows.to(device), cols.to(device)])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = targets.to(device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        greedy = (logits.argmax(dim=-1) == targets).tolist()
        sums: dict[int, list] = {}
        for i, lp, ok in zip(owners, chosen, greedy):
            s = sums.setdefault(i, [0.0, True])
            s[0] += lp
            s[1] = s[1] and ok
        for i, (lp, ok) in sums.items():
            out[i] = (lp, bool(ok))
        progress(len(sums))
    return out
