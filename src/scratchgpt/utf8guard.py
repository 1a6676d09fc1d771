"""Sampling that never breaks a character: next tokens whose bytes cannot continue valid UTF-8 are masked.

A byte-level tokenizer (scratchgpt's BPE, an imported GPT-2/SmolLM2/Qwen one, or Llama's `<0xNN>` byte
fallback) has tokens that hold part of a character, so a model may sample bytes that are not UTF-8 (a
continuation byte with no lead, a lead byte followed by another lead); the text then shows U+FFFD.

UTF-8's byte grammar is a small automaton. Its states are the pending character: nothing pending, or the
number of bytes still expected with the allowed range of the next one (80-BF, or E0's A0-BF, ED's 80-9F,
F0's 90-BF, F4's 80-8F): 8 states. Once per tokenizer, every token's bytes are run through it from every
state, giving a table state x token -> the state after the token, or "rejected". A token is allowed in a
state when its bytes are valid there, whether it completes a character, starts new ones or both. Per
sampling step the row's state picks a precomputed mask (blocked logits set to -inf before top-k/top-p and
argmax), and after the choice one gather gives the next state: no host sync, two small kernels a step.

Greedy text that was valid UTF-8 is unchanged: each of its tokens was allowed, and masking other tokens
does not move an argmax. Stop tokens count by their text (an ASCII `<|endoftext|>` ends a reply only
between characters). Each continuation starts between characters, so it is valid on its own (the prompt's
bytes are decoded apart from it). Vocabularies whose every token is whole characters (char, WordPiece)
never leave the first state: the guard is off for them. Tokens that would lead only into states from
which no token can go on are blocked too, so generation never gets stuck.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import numpy as np
import torch

# (bytes still expected, allowed range of the next byte) for each state; 0 is "between characters"
STATES = ((0, (0x00, 0x7F)), (1, (0x80, 0xBF)), (2, (0x80, 0xBF)), (2, (0xA0, 0xBF)), (2, (0x80, 0x9F)),
          (3, (0x80, 0xBF)), (3, (0x90, 0xBF)), (3, (0x80, 0x8F)))
ACCEPT, REJECT = 0, len(STATES)
# a lead byte's range -> the state it starts
_LEADS = (((0x00, 0x7F), 0), ((0xC2, 0xDF), 1), ((0xE0, 0xE0), 3), ((0xE1, 0xEC), 2), ((0xED, 0xED), 4),
          ((0xEE, 0xEF), 2), ((0xF0, 0xF0), 6), ((0xF1, 0xF3), 5), ((0xF4, 0xF4), 7))


def byte_automaton() -> np.ndarray:
    """(states + 1, 256): the state after a byte; REJECT (the last row, a sink) where the byte is invalid."""
    t = np.full((REJECT + 1, 256), REJECT, dtype=np.uint8)  # (9 states: a byte each keeps the tables small)
    for (lo, hi), state in _LEADS:
        t[ACCEPT, lo:hi + 1] = state
    after = {1: ACCEPT, 2: 1, 3: 2}  # a continuation byte leaves one fewer to come, in 80-BF
    for state, (need, (lo, hi)) in enumerate(STATES):
        if need:
            t[state, lo:hi + 1] = after[need]
    return t


def token_transitions(table: Sequence[bytes]) -> np.ndarray:
    """(states, tokens): the state after each token's bytes from each state, REJECT where they are invalid."""
    auto = byte_automaton()
    lens = np.fromiter(map(len, table), dtype=np.int64, count=len(table))
    flat = np.frombuffer(b"".join(table), dtype=np.uint8)
    starts = np.cumsum(lens) - lens
    order = np.argsort(-lens, kind="stable")  # longest first: position i concerns a prefix of `order`
    state = np.repeat(np.arange(len(STATES), dtype=np.uint8)[:, None], len(table), axis=1)
    sorted_lens, sorted_starts = lens[order], starts[order]
    for i in range(int(lens.max(initial=0))):
        k = int(np.searchsorted(-sorted_lens, -i, side="left"))  # tokens longer than i
        cols = order[:k]
        state[:, cols] = auto[state[:, cols], flat[sorted_starts[:k] + i]]
    return state


class Utf8Tables:
    """A tokenizer's masks and next states per UTF-8 state (numpy), with torch copies per device."""

    def __init__(self, trans: np.ndarray) -> None:
        allowed = trans != REJECT
        while True:  # block tokens into states where nothing may follow (a vocabulary missing some bytes)
            dead = np.flatnonzero(~allowed.any(axis=1))
            blocked = allowed & np.isin(trans, dead)
            if not blocked.any():
                break
            allowed &= ~blocked
        self.allowed = allowed
        self.trans = np.where(allowed, trans, ACCEPT)
        self._on: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def needed(self) -> bool:
        """False where every token keeps text between characters (char and WordPiece vocabularies), or no token
        can start valid text (then the guard could only stop generation, so it stays off)."""
        first = self.allowed[ACCEPT]
        return bool(first.any()) and not bool(first.all() and (self.trans[ACCEPT] == ACCEPT).all())

    def on(self, device: torch.device, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocked (states, vocab) bool, next state (states, vocab) long) on `device`; ids past the tokenizer's
        vocabulary (a padded embedding) are blocked."""
        key = (str(device), vocab)
        if key not in self._on:
            n = min(vocab, self.allowed.shape[1])
            blocked = torch.ones(len(STATES), vocab, dtype=torch.bool)
            blocked[:, :n] = torch.from_numpy(~self.allowed[:, :n])
            trans = torch.zeros(len(STATES), vocab, dtype=torch.long)
            trans[:, :n] = torch.from_numpy(self.trans[:, :n])
            self._on[key] = (blocked.to(device), trans.to(device))
        return self._on[key]


_CACHE: "weakref.WeakKeyDictionary[object, Optional[Utf8Tables]]" = weakref.WeakKeyDictionary()


def utf8_tables(tokenizer) -> Optional[Utf8Tables]:
    """The tokenizer's guard tables, built on first use and kept as long as the tokenizer; None where no
    token can break a character (the guard is then a no-op and skipped)."""
    if tokenizer not in _CACHE:
        tables = Utf8Tables(token_transitions(tokenizer.token_bytes_table()))
        _CACHE[tokenizer] = tables if tables.needed else None
    return _CACHE[tokenizer]


class Utf8Guard:
    """The UTF-8 state of each row of a batch being sampled: masks its logits, follows its tokens."""

    def __init__(self, tables: Utf8Tables, rows: int, vocab: int, device: torch.device) -> None:
        self.blocked, self.trans = tables.on(device, vocab)
        self.state = torch.full((rows,), ACCEPT, dtype=torch.long, device=device)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (rows, vocab) with the tokens that would break a character at -inf (in place)."""
        return logits.masked_fill_(self.blocked[self.state], float("-inf"))

    def advance(self, tokens: torch.Tensor) -> None:
        self.state = self.trans[self.state, tokens]
