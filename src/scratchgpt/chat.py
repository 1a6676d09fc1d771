"""`scratchgpt sample` and `scratchgpt chat`: text from a trained run, on the command line.

A run fine-tuned with a chat template (`finetune sft`) answers inside that template in both;
`sample --raw` continues text as given. An imported instruct model chats in its own jinja chat
template (prompts.JinjaChatTemplate: transformers' apply_chat_template, the whole conversation
re-rendered each turn) and a reply ends at any of its eos ids (`Tokenizer.stop_ids`). Chat is
plain continuation of one running text without a template: each message plus a newline is
appended, then the reply. A LoRA run works
directly (the loader applies its adapter); a classifier is refused in one line.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Optional, TextIO

from . import UserError
from .checks import check_range
from .checkpoint import Which, load_run
from .generate import GenerationConfig, resolve_seed, complete, generate, stream
from .model import GPT, gpt_of
from .prompts import ChatTemplate, JinjaChatTemplate, encode_with_eot, fit_messages
from .quantize import Quantize, quantize_model
from .runtime import pick_device
from .tokenizer import Tokenizer
from .utils import one_line_message


def _load_for_generation(run, which: Which, device: str, quantize: Quantize, command: str) -> tuple[GPT, Tokenizer, dict]:
    loaded = load_run(run, which, device=pick_device(device))
    model = loaded.language_model(command)
    quantize_model(model, quantize)
    return model, loaded.tokenizer, loaded.config


def chat(
    model: GPT,
    tokenizer: Tokenizer,
    config: dict,
    lines: Iterable[str],
    out: TextIO,
    gen: Optional[GenerationConfig] = None,
    *,
    err: Optional[TextIO] = None,
    interactive: bool = False,
) -> None:
    """Multi-turn chat over `lines` (user messages; `/reset` clears the history, `/exit` ends).

    Replies stream to `out`. Ctrl-C during a reply stops that reply (its text so far stays in
    the history), not the session. With a seed, reply k uses seed + k, so a piped session
    is reproducible. History that outgrows the context loses its oldest turns first.
    """
    model = gpt_of(model)
    gen = gen or GenerationConfig()
    err = err or sys.stderr
    conv = _Conversation(tokenizer, config, reserve=min(max(gen.max_new_tokens, 1), model.cfg.block_size // 2),
                         block_size=model.cfg.block_size)
    stop = tuple(gen.stop) + tuple(s for s in (conv.template.stop if conv.template else []) if s not in gen.stop)
    n_reply = 0

    def note(msg: str) -> None:
        print(f"note: {msg}", file=err)

    if interactive:
        print(f"chat: {conv.describe()}; /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply",
              file=err)
    for line in lines:
        msg = line.rstrip("\r\n")
        if msg.strip() == "/exit":
            break
        if msg.strip() == "/reset":
            conv.reset()
            print("(history cleared)", file=err)
            continue
        try:  # (a template's raise_exception, or characters a char tokenizer doesn't know: this message only)
            prompt, dropped = conv.prompt(msg)
        except UserError as e:
            print(f"error: {one_line_message(str(e))}", file=err)
            continue
        if dropped:
            note(f"dropped the {dropped} oldest turn(s) to fit the context of {conv.block_size} tokens")
        seed = gen.seed + n_reply if gen.seed is not None else None
        s = stream(model, tokenizer, prompt, replace(gen, stop=stop, seed=seed), note=note)
        _write_reply(s, out, err)
        n_reply += 1
        conv.record(s.text)


def _write_reply(s, out: TextIO, err: TextIO) -> None:
    """Stream a reply to `out`; Ctrl-C stops the reply (its text so far stays in `s.text`), not the session."""
    try:
        for piece in s:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        s.close()
        print("\n(reply stopped)", file=err)
    out.write("\n")
    out.flush()


class _Conversation:
    """The history of a chat and the prompt of its next reply, in one of three forms: an imported model's jinja
    template (the whole conversation re-rendered each turn), a fine-tuned run's chat template, or plain text."""

    def __init__(self, tokenizer: Tokenizer, config: dict, *, reserve: int, block_size: int) -> None:
        self.tokenizer, self.block_size, self.reserve = tokenizer, block_size, reserve  # reserve: room for the reply
        self.template = ChatTemplate.from_config(config)
        self.jinja = JinjaChatTemplate.of(tokenizer, config)  # an imported instruct model's own template
        self.system_ids = tokenizer.bos_ids + (encode_with_eot(tokenizer, self.template.system) if self.template
                                               else [])
        self.turns: list[list[int]] = []  # token ids of each finished exchange
        self.messages: list[dict] = []  # the conversation so far, for a jinja template
        self.user_ids: list[int] = []

    def describe(self) -> str:
        return "the imported model's chat template" if self.jinja else "chat template" if self.template else \
            "plain continuation (no chat template in this checkpoint)"

    def reset(self) -> None:
        self.turns.clear()
        self.messages.clear()

    def prompt(self, msg: str) -> tuple[list[int], int]:
        """The next reply's prompt with `msg` added, and how many of the oldest turns were dropped to fit it.
        UserError when this message cannot be encoded (the history is unchanged)."""
        budget = self.block_size - self.reserve
        if self.jinja:
            prompt, kept = fit_messages(self.jinja, self.messages + [{"role": "user", "content": msg}], budget)
            dropped, self.messages = (len(self.messages) + 1 - len(kept)) // 2, kept
            return prompt, dropped
        tok = self.tokenizer
        self.user_ids = self.template.user_ids(tok, msg) if self.template else tok.encode(msg + "\n")
        dropped = 0
        while self.turns and len(self.system_ids) + sum(map(len, self.turns)) + len(self.user_ids) > budget:
            self.turns.pop(0)
            dropped += 1
        return self.system_ids + [t for turn in self.turns for t in turn] + self.user_ids, dropped

    def record(self, reply: str) -> None:
        """The reply to the last prompt joins the history."""
        tok = self.tokenizer
        if self.jinja:
            self.messages.append({"role": "assistant", "content": reply})
        elif self.template:
            self.turns.append(self.user_ids + tok.encode(reply) + encode_with_eot(tok, self.template.assistant_end))
        else:
            self.turns.append(self.user_ids + tok.encode(reply if reply.endswith("\n") or not reply else reply + "\n"))


def sample_cli(
    run: Path,
    *,
    which: Which = "best",
    gen: Optional[GenerationConfig] = None,
    device: str = "auto",
    quantize: Quantize = "none",
    prompt: Optional[str] = None,
    prompt_file: Optional[Path] = None,
    num_samples: int = 1,
    stream_output: bool = False,
    raw: bool = False,
    out: Optional[TextIO] = None,
) -> None:
    """Print `num_samples` continuations (prompt included); sample i uses seed + i, streamed or not.

    A run fine-tuned with a chat template gets the prompt wrapped in it and prints only the reply;
    `raw` continues the text as given instead.

    Args:
        prompt: text to continue (default: empty)
        prompt_file: read the prompt from a file
        num_samples: independent samples (sample i uses seed + i)
        stream_output: print text as it is generated
        raw: ignore a fine-tuned run's chat template; continue the prompt as is
        out: where the text goes (default: stdout)
    """
    out, gen = out or sys.stdout, gen or GenerationConfig()
    prompt = _read_prompt(prompt, prompt_file)
    check_range("--num-samples", num_samples, "[1, 10000]")
    model, tokenizer, config = _load_for_generation(run, which, device, quantize, "sample")
    gen = replace(gen, seed=resolve_seed(gen))  # one base seed, so streamed and batched samples agree
    tokenizer.encode(prompt)  # unknown characters fail here, before any output
    sep = "\n---------------\n" if num_samples > 1 else "\n"
    template = None if raw else ChatTemplate.from_config(config)
    if template is not None:
        _sample_replies(model, tokenizer, template, prompt, gen, num_samples, stream_output, out, sep)
        return
    if stream_output:
        for i in range(num_samples):
            out.write(prompt)
            out.flush()
            for piece in stream(model, tokenizer, prompt, replace(gen, seed=gen.seed + i)):
                out.write(piece)
                out.flush()
            out.write(sep)
    else:
        for text in generate(model, tokenizer, [prompt] * num_samples, gen):
            out.write(prompt + text + sep)
    out.flush()


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt is not None and prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        from .data.readers import read_text  # (here: the data package costs a fresh `sample` ~45 ms of imports)

        try:
            prompt = read_text(prompt_file)
        except UserError as e:
            raise UserError(f"--prompt-file {e}") from None
    return prompt or ""


def _sample_replies(model: GPT, tokenizer: Tokenizer, template: ChatTemplate, prompt: str, gen: GenerationConfig,
                    num_samples: int, stream_output: bool, out: TextIO, sep: str) -> None:
    """A fine-tuned run answers inside its template: wrap the prompt, stop where a reply ends, print the reply."""
    ids = tokenizer.bos_ids + encode_with_eot(tokenizer, template.system) + template.user_ids(tokenizer, prompt)
    gen = replace(gen, stop=tuple(gen.stop) + tuple(s for s in template.stop if s not in gen.stop))
    for i in range(num_samples):
        g = replace(gen, seed=gen.seed + i)
        pieces = stream(model, tokenizer, ids, g) if stream_output else [complete(model, tokenizer, [ids], g)[0].text]
        for piece in pieces:
            out.write(piece)
            out.flush()
        out.write(sep)
    out.flush()


MAX_MESSAGE_CHARS = 1 << 20  # a piped line longer than this is not a message (/dev/zero has no line breaks at all)


def _stdin_lines(err: TextIO) -> Iterator[str]:
    if not sys.stdin.isatty():  # piped: one message per line, EOF ends the session
        while True:
            try:
                line = sys.stdin.readline(MAX_MESSAGE_CHARS + 1)
            except UnicodeDecodeError as e:
                raise UserError(f"standard input: not UTF-8 text ({e.reason} at byte {e.start} of a read)") from None
            if len(line) > MAX_MESSAGE_CHARS:
                raise UserError(f"standard input: a line longer than {MAX_MESSAGE_CHARS:,} characters (chat reads one "
                                "message a line: is it text?)")
            if not line:
                return
            yield line
    while True:
        try:
            yield input("> ")
        except EOFError:
            print(file=err)
            return
        except KeyboardInterrupt:  # at the prompt: don't end the session by accident
            print("\n(Ctrl-C stops a reply; /exit or Ctrl-D quits)", file=err)


def chat_cli(run: Path, *, which: Which = "best", gen: Optional[GenerationConfig] = None, device: str = "auto",
             quantize: Quantize = "none") -> None:
    """The interactive (or piped) chat session of `scratchgpt chat`."""
    gen = gen or GenerationConfig()
    model, tokenizer, config = _load_for_generation(run, which, device, quantize, "chat")
    chat(model, tokenizer, config, _stdin_lines(sys.stderr), sys.stdout, gen, interactive=sys.stdin.isatty())
