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
from .data.readers import read_text
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
    template = ChatTemplate.from_config(config)
    jinja = JinjaChatTemplate.of(tokenizer, config)  # an imported instruct model's own template
    stop = tuple(gen.stop) + tuple(s for s in (template.stop if template else []) if s not in gen.stop)
    system_ids = tokenizer.bos_ids + (encode_with_eot(tokenizer, template.system) if template else [])
    turns: list[list[int]] = []  # token ids of each finished exchange
    bs = model.cfg.block_size
    reserve = min(max(gen.max_new_tokens, 1), bs // 2)  # room left for the reply
    n_reply = 0

    def note(msg: str) -> None:
        print(f"note: {msg}", file=err)

    messages: list[dict] = []  # the conversation so far, for a jinja template (re-rendered whole each turn)
    if interactive:
        kind = "the imported model's chat template" if jinja else "chat template" if template else \
            "plain continuation (no chat template in this checkpoint)"
        print(f"chat: {kind}; /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply", file=err)
    for line in lines:
        msg = line.rstrip("\r\n")
        if msg.strip() == "/exit":
            break
        if msg.strip() == "/reset":
            turns.clear()
            messages.clear()
            print("(history cleared)", file=err)
            continue
        if jinja:
            try:  # (a template's raise_exception, or a message it cannot keep plain: this message only)
                prompt, kept = fit_messages(jinja, messages + [{"role": "user", "content": msg}], bs - reserve)
            except UserError as e:
                print(f"error: {one_line_message(str(e))}", file=err)
                continue
            dropped, messages = (len(messages) + 1 - len(kept)) // 2, kept
        else:
            try:
                user_ids = template.user_ids(tokenizer, msg) if template else tokenizer.encode(msg + "\n")
            except UserError as e:  # e.g. characters a char tokenizer doesn't know: this message only
                print(f"error: {one_line_message(str(e))}", file=err)
                continue
            dropped = 0
            while turns and len(system_ids) + sum(map(len, turns)) + len(user_ids) > bs - reserve:
                turns.pop(0)
                dropped += 1
            prompt = system_ids + [t for turn in turns for t in turn] + user_ids
        if dropped:
            note(f"dropped the {dropped} oldest turn(s) to fit the context of {bs} tokens")
        seed = gen.seed + n_reply if gen.seed is not None else None
        s = stream(model, tokenizer, prompt, replace(gen, stop=stop, seed=seed), note=note)
        try:
            for piece in s:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            s.close()
            print("\n(reply stopped)", file=err)
        out.write("\n")
        out.flush()
        n_reply += 1
        reply = s.text
        if jinja:
            messages.append({"role": "assistant", "content": reply})
        elif template:
            turns.append(user_ids + tokenizer.encode(reply) + encode_with_eot(tokenizer, template.assistant_end))
        else:
            turns.append(user_ids + tokenizer.encode(reply if reply.endswith("\n") or not reply else reply + "\n"))


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

    if prompt is not None and prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            prompt = read_text(prompt_file)
        except UserError as e:
            raise UserError(f"--prompt-file {e}") from None
    prompt = prompt or ""
    check_range("--num-samples", num_samples, "[1, 10000]")
    model, tokenizer, config = _load_for_generation(run, which, device, quantize, "sample")
    gen = replace(gen, seed=resolve_seed(gen))  # one base seed, so streamed and batched samples agree
    tokenizer.encode(prompt)  # unknown characters fail here, before any output
    sep = "\n---------------\n" if num_samples > 1 else "\n"
    template = None if raw else ChatTemplate.from_config(config)
    if template is not None:
        # a fine-tuned run answers inside its template: wrap the prompt, stop where a reply ends, print the reply
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
