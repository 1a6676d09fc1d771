"""Text generation: batched sampling with a KV cache, and streaming (the chat loop is chat.py's).

Public API (a GPT, possibly DDP/compile/PEFT-wrapped, sampled in eval mode whatever its mode):

    complete(model, tokenizer, prompts, gen=None, **options) -> list[Completion]
    generate(model, tokenizer, prompt_or_prompts, gen=None, **options) -> str | list[str]
    generate_tokens(model, prompt_ids_list, gen=None, *, tokenizer=None, **options) -> list[list[int]]   (ids only)
    stream(model, tokenizer, prompt, gen=None, **options) -> TextStream   (iterator of text pieces)

`options` are the fields of `GenerationConfig` (temperature, top_k, top_p, ...).

Context overflow (text longer than `block_size`): a sliding window. Every new token is
predicted from the last `block_size` tokens, recomputed as a fresh window, exactly as a
model without a cache that crops its input (nanoGPT's rule; also how the model was trained).
So once the window is full the KV cache is rebuilt (one prefill of the window) for each new
token, for every positional encoding: learned and sinusoidal positions are absolute, and
even with RoPE the cached keys of layers past the first carry information from tokens that
have left the window (a RoPE ring buffer would be a different, approximate model, so it is
not used). Cost: past the context, each token costs a forward pass over `block_size` tokens,
as without a cache. `window_shift=S` (CLI `--window-shift`) trades context for speed: the
window advances S tokens at a time, so the cache is rebuilt once every S tokens and each
token sees between block_size-S+1 and block_size tokens; the uncached path applies the same
rule, so both still agree token for token.
A prompt longer than `block_size` keeps its last `block_size` tokens (a note goes to stderr).

Empty prompt: generation starts from `<|endoftext|>`; a char tokenizer without it starts from
a newline, or from id 0 if its vocabulary has no newline either. The start token is not part
of the returned text.

Batches: prompts of equal token length share one forward pass; different lengths run as
separate batches (no padding), so every row is exact. Sampling row i uses its own
`torch.Generator` seeded with `seed + i`, so a prompt's text does not depend on which
other prompts were batched with it.

Speed: the KV cache is preallocated once per call (`KVCache`, sized min(block_size, prompt +
new tokens)); decoding steps after the prefill run `model.DecodeStep`, the model's one-token
forward in plain torch calls (no module dispatch).
Everything runs under torch.inference_mode; without stop strings the only host syncs are a
stop-token check every 16 steps; sampling uses torch.multinomial on per-row generators.

UTF-8: with a byte-level tokenizer a model can sample bytes that are not UTF-8 (U+FFFD in the text). By
default (`utf8_guard`) tokens whose bytes cannot continue the pending character are masked before
top-k/top-p/argmax, from tables built once per tokenizer (utf8guard.py); greedy text that was valid is
unchanged.

Chat templates (how a fine-tuned run is prompted) live in prompts.py; the `chat` loop and the
`sample` command in chat.py.
"""
from __future__ import annotations

import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterator, Optional, Sequence, Union, overload

import torch

from . import UserError
from .checks import check_fields
from .model import GPT, DecodeStep, KVCache, gpt_of
from .prompts import start_token
from .tokenizer import EOT, Tokenizer
from .utf8guard import Utf8Guard, Utf8Tables, utf8_tables

Prompt = Union[str, Sequence[int]]
# observe(rows, logits, tokens): called at every step with the indices of the prompts in this batch, their raw
# next-token logits (B, V) as the model gave them (before penalty, temperature or truncation) and the tokens
# chosen from them (B,). A server computes logprobs from it, from the very forward the text came from.
Observer = Callable[[Sequence[int], torch.Tensor, torch.Tensor], None]


# ---------------------------------------------------------------------------------------
# Options


SEED_RANGE = 2**63  # seeds of any size are reduced modulo this (torch generators take 64 bits; row i adds i)


@dataclass(frozen=True)
class GenerationConfig:
    """How to sample. One declaration for `sample`, `chat`, `serve` and the Python API; bad values
    raise UserError when the config is built."""

    max_new_tokens: int = 256
    """Most tokens to generate (a stop token or string may end the text sooner)."""
    temperature: float = 0.8
    """Divides the logits before sampling: lower is more conservative; 0 is greedy (argmax)."""
    top_k: Optional[int] = 200
    """Sample among the k most likely tokens only; 0 or null: off."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p, in (0, 1]; 1: off."""
    repetition_penalty: float = 1.0
    """Above 1 discourages tokens already in the prompt or output (CTRL's penalty); 1: off."""
    stop: tuple[str, ...] = ()
    """Stop strings: the text ends before the first one (\\n and \\t escapes are understood)."""
    stop_tokens: Optional[tuple[int, ...]] = field(default=None, metadata={"cli": False})
    """Token ids that end the text; null: the tokenizer's stop ids (its <|endoftext|> or eos, and an imported
    model's other eos ids)."""
    seed: Optional[int] = None
    """The same seed gives the same text; null: a fresh random seed. Any integer (reduced to 63 bits)."""
    use_cache: bool = field(default=True, metadata={"cli": False})
    """False recomputes the whole window every step (the reference path the KV cache is tested against)."""
    window_shift: int = 1
    """Past the context, slide the window this many tokens at a time (faster, less context per token)."""
    utf8_guard: bool = True
    """Never sample a token whose bytes would break UTF-8 (byte-level tokenizers), so text has no U+FFFD from
    split characters; greedy text that was valid UTF-8 is unchanged. --no-utf8-guard samples every token."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if self.stop_tokens is not None:
            object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
        check_fields(self, lambda name: "--" + name.replace("_", "-"), GENERATION_RANGES)
        if self.seed is not None:
            object.__setattr__(self, "seed", self.seed % SEED_RANGE)


MAX_NEW_TOKENS = 2**20  # the token history is preallocated: a typo of 10**12 must not try to allocate it
# What every entry point accepts (`sample`/`chat` flags, serve's request schema, the Python API).
GENERATION_RANGES = {"max_new_tokens": f"[0, {MAX_NEW_TOKENS}]", "temperature": "[0, inf)", "top_k": "[0, inf)",
                     "top_p": "(0, 1]", "repetition_penalty": "(0, inf)", "window_shift": "[1, inf)"}


def _config(gen: Optional[GenerationConfig], overrides: dict) -> GenerationConfig:
    names = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown generation option(s): {', '.join(unknown)}")
    return replace(gen or GenerationConfig(), **overrides)


@dataclass
class Completion:
    """One generated continuation. `token_ids` excludes a stop token, includes a stop string's ids."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or string) or "length" (max_new_tokens reached)
    prompt_tokens: int  # tokens the model was conditioned on (after keeping the tail)


# ---------------------------------------------------------------------------------------
# Prompts


def _prompt_ids(tokenizer: Optional[Tokenizer], prompt: Prompt, block_size: int, note: Callable[[str], None]) -> list[int]:
    # a text prompt gets what transformers' tokenizer(text) puts first (an imported Llama's <s>; [] for ours)
    ids = tokenizer.bos_ids + tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        return [start_token(tokenizer)]
    if len(ids) > block_size:
        note(f"prompt is {len(ids)} tokens, longer than the model's context of {block_size}; keeping the last {block_size}")
        ids = ids[-block_size:]
    return ids


def _stderr_note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _stops(tokenizer: Tokenizer, gen: GenerationConfig) -> tuple[set[int], list[str]]:
    """Stop token ids and stop strings; the stop string `<|endoftext|>` also stops at the EOT id.

    By default the tokenizer's stop ids: its EOT, and an imported model's other eos ids (Llama 3's list)."""
    ids = set(gen.stop_tokens) if gen.stop_tokens is not None else set(tokenizer.stop_ids)
    strings = [s for s in gen.stop if s]
    if EOT in strings and tokenizer.eot_id is not None:
        ids.add(tokenizer.eot_id)
    return ids, strings


# ---------------------------------------------------------------------------------------
# Decoding engine


class _Sampler:
    """Logits (B, V) -> next tokens (B,): repetition penalty, temperature, UTF-8 guard, top-k, top-p, multinomial."""

    def __init__(self, gen: GenerationConfig, ctx: torch.Tensor, vocab: int, valid_vocab: int, row_seeds: list[int],
                 utf8: Optional[Utf8Tables] = None):
        self.gen = gen
        self.valid_vocab = valid_vocab
        self.guard = Utf8Guard(utf8, ctx.size(0), vocab, ctx.device) if utf8 is not None else None
        self.seen = None
        if gen.repetition_penalty != 1.0:
            self.seen = torch.zeros(ctx.size(0), vocab, dtype=torch.bool, device=ctx.device)
            self.seen.scatter_(1, ctx, True)
        self.generators = []
        if gen.temperature > 0:
            for s in row_seeds:
                g = torch.Generator(device=ctx.device)
                g.manual_seed(s)
                self.generators.append(g)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        gen = self.gen
        if self.seen is not None:
            p = gen.repetition_penalty
            logits = torch.where(self.seen, torch.where(logits > 0, logits / p, logits * p), logits)
        if gen.temperature > 0:
            logits = logits / gen.temperature
        # an extreme temperature or penalty overflows (inf, or inf/inf = NaN); kept finite, argmax and softmax
        # stay defined (a no-op for ordinary values)
        big = torch.finfo(logits.dtype).max
        logits = self._decodable(logits.nan_to_num(nan=-big, posinf=big, neginf=-big))
        tok = logits.argmax(dim=-1) if gen.temperature == 0 else self._sample(logits)
        if self.seen is not None:
            self.seen.scatter_(1, tok[:, None], True)
        if self.guard is not None:
            self.guard.advance(tok)
        return tok

    def _decodable(self, logits: torch.Tensor) -> torch.Tensor:
        if self.valid_vocab < logits.size(-1):  # padded vocabulary: ids past the tokenizer can't be decoded
            logits[:, self.valid_vocab :] = float("-inf")
        if self.guard is not None:  # (before top-k and top-p: they choose among tokens that keep UTF-8 valid)
            logits = self.guard.mask(logits)
        return logits

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        gen = self.gen
        idx = None
        if gen.top_k and gen.top_k < logits.size(-1):
            logits, idx = logits.topk(gen.top_k, dim=-1)  # sorted: sample among k candidates only
        if gen.top_p < 1.0:
            if idx is None:
                logits, idx = logits.sort(dim=-1, descending=True)
            probs = logits.softmax(dim=-1)
            # drop a token once the more likely ones already reach top_p (the first always stays)
            drop = probs.cumsum(dim=-1) - probs >= gen.top_p
            drop[:, 0] = False  # (also when top_p rounds to 0 in float32)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        if len(self.generators) == 1:
            choice = torch.multinomial(probs, 1, generator=self.generators[0])
        else:
            choice = torch.stack([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)])
        return (choice if idx is None else idx.gather(1, choice))[:, 0]


def _last_logits(model: GPT, idx: torch.Tensor, cache: Optional[KVCache]) -> torch.Tensor:
    """Logits of the last position only: the head over a whole prefill would be wasted work."""
    return model.logits(model(idx, cache=cache, return_hidden=True)[:, -1]).float()


class _Decoder:
    """Produces one token per `next()` for a batch of equal-length contexts.

    The model sees `seq[w:n]`: the window start `w` advances by `shift` whenever the window
    would exceed block_size (the module doc's rule). The cached path holds exactly the keys
    and values of `seq[w:n]`, so it computes what the uncached path computes.
    """

    def __init__(self, model: GPT, ctx: torch.Tensor, max_new: int, sampler: _Sampler, use_cache: bool, shift: int):
        cfg = model.cfg
        self.model, self.sampler, self.bs = model, sampler, cfg.block_size
        self.shift = max(1, min(shift, self.bs))
        B, T0 = ctx.shape
        self.seq = torch.empty(B, T0 + max_new, dtype=torch.long, device=ctx.device)  # preallocated history
        self.seq[:, :T0] = ctx
        self.n, self.w = T0, 0
        self.cache = None
        if use_cache:
            param = next(model.parameters())
            # the last sampled token is never fed back, hence -1
            self.cache = KVCache(cfg, B, max(T0, min(self.bs, T0 + max_new - 1)), param.device, param.dtype)
        self.logits: Optional[torch.Tensor] = None
        self.observe: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None
        self.fast = DecodeStep(model, self.cache) if self.cache is not None and DecodeStep.supports(model) else None

    @torch.inference_mode()
    def next(self) -> torch.Tensor:
        return self.step()

    def step(self) -> torch.Tensor:
        """`next()` for callers that hold inference mode across the whole loop (saves a switch per token)."""
        if self.logits is None:
            self.logits = self._forward()
        tok = self.sampler(self.logits)
        if self.observe is not None:
            self.observe(self.logits, tok)
        self.seq.select(1, self.n).copy_(tok)
        self.n += 1
        self.logits = None  # computed lazily, so the last token costs no forward pass
        return tok

    def _forward(self) -> torch.Tensor:
        n, cache = self.n, self.cache
        slid = n - self.w > self.bs
        if slid:
            self.w += self.shift
        window = self.seq[:, self.w : n]
        if cache is None:
            return _last_logits(self.model, window, None)
        if slid or cache.length == 0:
            # (re)build: after a slide every cached key and value is stale, for every positional
            # encoding, since layers past the first mixed in tokens that left the window
            cache.reset()
            return _last_logits(self.model, window, cache)
        if self.fast is None:
            return _last_logits(self.model, self.seq[:, n - 1 : n], cache)
        return self.fast(self.seq[:, n - 1])


def _device(model: GPT) -> torch.device:
    return next(model.parameters()).device


def _check_model(model: torch.nn.Module) -> GPT:
    """The plain GPT inside DDP / torch.compile / PEFT wrappers (the decode loop drives it directly)."""
    model = gpt_of(model)
    if not model.cfg.causal:
        raise UserError("this model was trained with bidirectional attention (model.causal=false); it cannot generate text")
    return model


@contextmanager
def _eval_mode(model: GPT) -> Iterator[None]:
    """Dropout off while sampling (e.g. samples taken during training), then the mode as it was."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


def resolve_seed(gen: GenerationConfig) -> int:
    return gen.seed if gen.seed is not None else random.SystemRandom().randrange(2**62)  # room for + row


def _decoder(model: GPT, valid_vocab: int, rows: list[list[int]], gen: GenerationConfig, seeds: list[int],
             utf8: Optional[Utf8Tables] = None) -> _Decoder:
    ctx = torch.tensor(rows, dtype=torch.long, device=_device(model))
    sampler = _Sampler(gen, ctx, model.cfg.vocab_size, min(valid_vocab, model.cfg.vocab_size), seeds, utf8)
    return _Decoder(model, ctx, gen.max_new_tokens, sampler, gen.use_cache, gen.window_shift)


class _Text:
    """Incremental detokenizer for one row: never emits part of a UTF-8 character (tokenizer.StreamDecoder
    holds the bytes until it is complete), cuts at stop strings.

    Text that could be the start of a stop string is held back until it can't be.
    """

    def __init__(self, tokenizer: Tokenizer, stops: list[str], context: Sequence[int] = ()):
        self._dec = tokenizer.stream_decoder(context)
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self._sent = 0
        self.stopped = False

    def push(self, tok: int) -> str:
        return self._advance(self._dec.push([tok]), final=False)

    def flush(self) -> str:
        return self._advance(self._dec.flush(), final=True)

    def _advance(self, new: str, final: bool) -> str:
        if self.stopped:
            return ""
        search_from = max(0, len(self.text) - self._hold)
        self.text += new
        if self._stops and new:
            hits = [i for s in self._stops if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                self.text, self.stopped, final = self.text[: min(hits)], True, True
        end = len(self.text)
        if not final and self._stops:
            partial = max((k for s in self._stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = max(self._sent, end - partial)
        piece, self._sent = self.text[self._sent : end], end
        return piece


class _Row:
    def __init__(self, tokenizer: Optional[Tokenizer], stop_ids: set[int], stops: Optional[list[str]],
                 prompt: Sequence[int]):
        self.stop_ids = stop_ids
        self.text = _Text(tokenizer, stops, prompt) if stops is not None else None
        self.prompt = prompt
        self.ids: list[int] = []
        self.done = False
        self.finish_reason = "length"
        self.prompt_tokens = len(prompt)

    def push(self, tok: int) -> str:
        if self.done:
            return ""
        if tok in self.stop_ids:
            self.done, self.finish_reason = True, "stop"
            return ""
        self.ids.append(tok)
        piece = self.text.push(tok) if self.text is not None else ""
        if self.text is not None and self.text.stopped:
            self.done, self.finish_reason = True, "stop"
        return piece


# ---------------------------------------------------------------------------------------
# Public API


def complete(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    gen: Optional[GenerationConfig] = None,
    *,
    note: Callable[[str], None] = _stderr_note,
    should_stop: Optional[Callable[[], bool]] = None,
    observe: Optional[Observer] = None,
    **options,
) -> list[Completion]:
    """Continue each prompt (text, or a list of token ids); one Completion per prompt, in order.

    `options` override fields of `gen` (see GenerationConfig). Stop tokens are checked on the
    device and synced every 16 steps; stop strings need the text, so they sync every step.
    `should_stop()`, asked before every token, ends generation early (a server's deadline). `observe` sees
    each step's raw logits (see Observer).
    """
    gen = _config(gen, options)
    model = _check_model(model)
    if isinstance(prompts, str):
        raise TypeError("complete() takes a list of prompts; use generate() for a single string")
    rows = [_prompt_ids(tokenizer, p, model.cfg.block_size, note) for p in prompts]
    stop_ids, stops = _stops(tokenizer, gen)
    states = [_Row(tokenizer, stop_ids, stops or None, r) for r in rows]
    _run_batches(model, tokenizer.vocab_size, rows, gen, states, host_every_step=bool(stops), should_stop=should_stop,
                 utf8=_utf8(tokenizer, gen), observe=observe)
    out = []
    for st in states:
        if st.text is not None:
            st.text.flush()
            text = st.text.text
        else:  # as streamed: an incomplete last character is dropped, not shown as U+FFFD
            text = tokenizer.stream_decoder(st.prompt).decode(st.ids)
        out.append(Completion(text=text, token_ids=st.ids, finish_reason=st.finish_reason, prompt_tokens=st.prompt_tokens))
    return out


def generate_tokens(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    gen: Optional[GenerationConfig] = None,
    *,
    note: Callable[[str], None] = _stderr_note,
    tokenizer: Optional[Tokenizer] = None,
    **options,
) -> list[list[int]]:
    """Token-level generation: new ids for each prompt of ids, no text.

    Stops only at `stop_tokens` (default: none); stop strings need text (use complete()).
    Prompts must be non-empty; longer than block_size, they keep their tail. With a `tokenizer`, ids past its
    vocabulary are never sampled and the UTF-8 guard (`utf8_guard`) applies as in complete().
    """
    gen = _config(gen, options)
    model = _check_model(model)
    if gen.stop:
        raise UserError("stop strings need a tokenizer: use complete()")
    if any(len(p) == 0 for p in prompts):
        raise UserError("generate_tokens needs non-empty prompts (complete() starts empty ones from EOT)")
    rows = [_prompt_ids(None, p, model.cfg.block_size, note) for p in prompts]
    states = [_Row(None, set(gen.stop_tokens or ()), None, r) for r in rows]
    valid = tokenizer.vocab_size if tokenizer is not None else model.cfg.vocab_size
    utf8 = _utf8(tokenizer, gen) if tokenizer is not None else None
    _run_batches(model, valid, rows, gen, states, host_every_step=False, utf8=utf8)
    return [st.ids for st in states]


def _utf8(tokenizer: Tokenizer, gen: GenerationConfig) -> Optional[Utf8Tables]:
    return utf8_tables(tokenizer) if gen.utf8_guard else None


def _run_batches(model: GPT, valid_vocab: int, rows: list[list[int]], gen: GenerationConfig, states: list[_Row],
                 host_every_step: bool, should_stop: Optional[Callable[[], bool]] = None,
                 utf8: Optional[Utf8Tables] = None, observe: Optional[Observer] = None) -> None:
    """Run equal-length prompts as one batch each; row i samples with seed + i."""
    if not gen.max_new_tokens:
        return
    base = resolve_seed(gen)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(len(r), []).append(i)
    with _eval_mode(model):
        for members in groups.values():
            dec = _decoder(model, valid_vocab, [rows[i] for i in members], gen, [base + i for i in members], utf8)
            if observe is not None:
                dec.observe = lambda logits, tok, members=members: observe(members, logits, tok)
            _run_group(dec, gen, [states[i] for i in members], host_every_step, should_stop or (lambda: False))


def _run_group(dec: _Decoder, gen: GenerationConfig, states: list[_Row], host_every_step: bool,
               should_stop: Callable[[], bool]) -> None:
    if host_every_step:
        for _ in range(gen.max_new_tokens):
            if should_stop():
                return
            for st, t in zip(states, dec.next().tolist()):
                st.push(t)
            if all(st.done for st in states):
                return
        return
    stop_ids = states[0].stop_ids
    stop_t = torch.tensor(sorted(stop_ids), device=dec.seq.device) if stop_ids else None
    done = torch.zeros(len(states), dtype=torch.bool, device=dec.seq.device)
    steps = []
    # inference mode held over the loop (only should_stop's check runs inside it), not switched per token
    with torch.inference_mode():
        for step in range(gen.max_new_tokens):
            if should_stop():
                break
            tok = dec.step()
            steps.append(tok)
            if stop_t is not None:
                done |= torch.isin(tok, stop_t)
                if step % 16 == 15 and bool(done.all()):  # the only host sync in this loop
                    break
        ids_per_row = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in states]
    for st, ids in zip(states, ids_per_row):
        for t in ids:
            st.push(t)
            if st.done:
                break


@overload
def generate(model: GPT, tokenizer: Tokenizer, prompts: str, gen: Optional[GenerationConfig] = None, **options) -> str: ...
@overload
def generate(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], gen: Optional[GenerationConfig] = None, **options) -> list[str]: ...
def generate(model, tokenizer, prompts, gen=None, **options):
    """Generated text (without the prompt) for one prompt, or a list of texts for a list of prompts."""
    if isinstance(prompts, str):
        return complete(model, tokenizer, [prompts], gen, **options)[0].text
    return [c.text for c in complete(model, tokenizer, list(prompts), gen, **options)]


class TextStream:
    """Iterator over text pieces of one continuation, yielded as soon as they decode.

    After it is exhausted, `text`, `token_ids` and `finish_reason` describe the result;
    `close()` stops early (the partial result stays available).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, prompt: Prompt, gen: GenerationConfig, note: Callable[[str], None],
                 observe: Optional[Observer] = None):
        model = _check_model(model)
        ids = _prompt_ids(tokenizer, prompt, model.cfg.block_size, note)
        stop_ids, stops = _stops(tokenizer, gen)
        self._row = _Row(tokenizer, stop_ids, stops, ids)
        self._gen = self._run(model, tokenizer, ids, gen, observe)
        self.prompt_tokens = len(ids)

    def _run(self, model, tokenizer, ids, gen, observe: Optional[Observer]) -> Iterator[str]:
        row = self._row
        if gen.max_new_tokens:
            dec = _decoder(model, tokenizer.vocab_size, [ids], gen, [resolve_seed(gen)], _utf8(tokenizer, gen))
            if observe is not None:
                dec.observe = lambda logits, tok: observe([0], logits, tok)
            for _ in range(gen.max_new_tokens):
                with _eval_mode(model):  # per step: the caller's code between pieces sees its own mode
                    tok = int(dec.next()[0])
                piece = row.push(tok)
                if piece:
                    yield piece
                if row.done:
                    break
        tail = row.text.flush()
        if tail:
            yield tail

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    @property
    def text(self) -> str:
        return self._row.text.text

    @property
    def token_ids(self) -> list[int]:
        return self._row.ids

    @property
    def finish_reason(self) -> str:
        return self._row.finish_reason


def stream(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: Prompt,
    gen: Optional[GenerationConfig] = None,
    *,
    note: Callable[[str], None] = _stderr_note,
    observe: Optional[Observer] = None,
    **options,
) -> TextStream:
    """Stream one continuation: `for piece in stream(...)`; pieces join to what generate() returns. `observe`
    sees each step's raw logits (see Observer)."""
    return TextStream(model, tokenizer, prompt, _config(gen, options), note, observe)


