"""Log-probabilities for `/v1/completions` (`logprobs: k`, `echo`), in OpenAI's legacy completions shape:
{"tokens", "token_logprobs", "top_logprobs", "text_offset"}.

What the numbers are: log_softmax of the model's raw logits, before repetition penalty, temperature, top-k and
top-p, over its whole output row (as vLLM returns by default, its `raw_logprobs`, and as OpenAI's are the
model's own distribution): the same numbers whatever the sampling options. A generated token's come from the
very forward pass that produced it (generate's `observe` hook); with `echo`, the prompt's come from one forward
over the prompt, the first token's logprob being null as it has no context. `top_logprobs` holds the k most
likely tokens plus the chosen one when it is not among them (vLLM's rule), so k=0 still gives the chosen one.

Token strings are each token decoded alone; a byte-level token that is not whole UTF-8 on its own is written
`bytes:\\xe4\\xb8`, as OpenAI does. `text_offset` is where each token's text starts in the choice's text.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..model import gpt_of

Entry = tuple[int, Optional[float], Optional[dict[int, float]]]  # (token id, its logprob, {id: logprob} of the top)
_CHUNK = 256  # positions per output-head pass over a prompt: (chunk, vocab) floats at a time, not (T, vocab)


class Recorder:
    """generate's `observe` hook for `rows` prompts: per row, each step's chosen token with its logprob and the
    top `k` alternatives (ids past the tokenizer's vocabulary, padding, never among them)."""

    def __init__(self, rows: int, k: int, valid_vocab: int):
        self.k, self.valid = k, valid_vocab
        self.steps: list[list[tuple]] = [[] for _ in range(rows)]

    def __call__(self, members: Sequence[int], logits: torch.Tensor, tok: torch.Tensor) -> None:
        lp = torch.log_softmax(logits.float(), dim=-1)
        chosen = lp.gather(1, tok[:, None])[:, 0]
        vals, ids = lp[:, : self.valid].topk(min(self.k, self.valid), dim=-1)
        for j, row in enumerate(members):  # tensors stay on the device until entries() reads them
            self.steps[row].append((tok[j], chosen[j], vals[j], ids[j]))

    def entries(self, row: int, n: int) -> list[Entry]:
        """The first `n` steps of `row` (the tokens the completion kept)."""
        out = []
        for tok, chosen, vals, ids in self.steps[row][:n]:
            top = dict(zip(ids.tolist(), vals.tolist()))
            top.setdefault(int(tok), float(chosen))
            out.append((int(tok), float(chosen), top))
        return out


@torch.inference_mode()
def prompt_entries(model, ids: list[int], k: int, valid_vocab: int) -> list[Entry]:
    """Each prompt token's logprob given the tokens before it (the first: None), from one forward pass."""
    if not ids:
        return []
    gpt = gpt_of(model)
    x = torch.tensor([ids], dtype=torch.long, device=next(gpt.parameters()).device)
    hidden = gpt(x, return_hidden=True)[0, :-1]
    targets = x[0, 1:]
    out: list[Entry] = [(ids[0], None, None)]
    for s in range(0, hidden.size(0), _CHUNK):
        lp = torch.log_softmax(gpt.logits(hidden[s : s + _CHUNK]).float(), dim=-1)
        tok = targets[s : s + _CHUNK]
        chosen = lp.gather(1, tok[:, None])[:, 0]
        vals, top_ids = lp[:, :valid_vocab].topk(min(k, valid_vocab), dim=-1)
        for t, c, v, i in zip(tok.tolist(), chosen.tolist(), vals.tolist(), top_ids.tolist()):
            top = dict(zip(i, v))
            top.setdefault(t, c)
            out.append((t, c, top))
    return out


def token_text(tokenizer, i: int) -> str:
    """A token alone, as OpenAI shows it: its text, or `bytes:\\xNN...` when its bytes aren't whole UTF-8."""
    raw = tokenizer.decode_bytes([i])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def logprobs_object(tokenizer, entries: list[Entry], context: Sequence[int] = (), offset: int = 0) -> dict:
    """OpenAI's legacy `logprobs` object for `entries`; offsets count from `offset`, the text before them
    (decoded after `context`, the ids before them)."""
    dec = tokenizer.stream_decoder(context)
    offsets, at = [], offset
    for tok, _, _ in entries:
        offsets.append(at)
        at += len(dec.push([tok]))
    names: dict[int, str] = {}

    def name(i: int) -> str:
        if i not in names:
            names[i] = token_text(tokenizer, i)
        return names[i]

    tops = []
    for _, _, top in entries:
        if top is None:
            tops.append(None)
            continue
        shown: dict[str, float] = {}
        for i, v in top.items():  # most likely first: two ids spelled alike keep the larger logprob
            shown.setdefault(name(i), v)
        tops.append(shown)
    return {"tokens": [name(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": tops, "text_offset": offsets}
