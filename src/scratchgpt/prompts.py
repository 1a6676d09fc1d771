"""How text becomes model input: chat templates, conversations, and texts to classify.

SFT stores its chat template as `chat_template` in a checkpoint's config.json:

    "chat_template": {
        "system": "Below is an instruction ...\\n\\n",         # optional, default "": once, at the start
        "user": "### Instruction:\\n{prompt}\\n\\n### Response:\\n",  # required; {prompt} = the user's message
        "assistant_end": "<|endoftext|>",                     # optional, default "": after each reply in the history
        "stop": ["###", "<|endoftext|>"]                       # optional: a reply ends at the first of these
    }

`{prompt}` is replaced literally (no str.format, so other braces are safe). In template
fields (not in user text) the literal `<|endoftext|>` is encoded as the EOT token id (an
imported tokenizer's eos, e.g. `</s>`), and as a stop string it means "stop at the EOT token".
A conversation starts with the tokenizer's BOS ids (an imported Llama's `<s>`; none for ours). Training (`finetune sft`), `chat`, `sample`
and `serve` all build conversations with `encode_conversation`, so a model is prompted
exactly as it was trained.

An imported instruct model without such a template chats in its own jinja chat template
(`JinjaChatTemplate`: rendered and encoded as transformers' apply_chat_template does).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import UserError
from .sandbox import MAX_RENDER_CHARS, RENDER_TIMEOUT_S, compile_jinja, jinja_error, render, start_worker
from .tokenizer import EOT, Tokenizer
from .utils import read_json


def start_token(tokenizer: Tokenizer) -> int:
    """The token an empty prompt starts from: EOT, else a newline, else id 0."""
    if tokenizer.eot_id is not None:
        return tokenizer.eot_id
    try:
        ids = tokenizer.encode("\n")
    except UserError:
        ids = []
    return ids[0] if len(ids) == 1 else 0


def encode_with_eot(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode text in which a literal `<|endoftext|>` means the EOT token (for templates, not user text)."""
    if tokenizer.eot_id is None or EOT not in text:
        return tokenizer.encode(text)
    ids: list[int] = []
    for i, part in enumerate(text.split(EOT)):
        if i:
            ids.append(tokenizer.eot_id)
        if part:
            ids += tokenizer.encode(part)
    return ids


def encode_strict(tokenizer: Tokenizer, text: str) -> list[int]:
    """tokenizer.encode, but characters a char vocabulary lacks are an error even if it has <unk>.

    Fine-tuning text mapped silently to <unk> would teach the model nothing about it (and a
    label decided by unknown characters is unlearnable), so the characters are named instead.
    """
    if tokenizer.kind == "char" and tokenizer.unk_id is not None and tokenizer.count_unknown(text):
        missing = sorted(c for c in set(text) if tokenizer.token_to_id(c) is None)
        shown = ", ".join(repr(c) for c in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise UserError(f"{len(missing)} character(s) not in the char tokenizer's vocabulary: {shown}")
    return tokenizer.encode(text)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], wheres: Sequence[str], max_len: int,
                 note: Callable[[str], None] = print) -> tuple[list[list[int]], int]:
    """Token ids per text, cut to the first `max_len`; returns (ids, number cut). Errors name the row."""
    ids, cut = [], 0
    for text, where in zip(texts, wheres):
        try:
            t = encode_strict(tokenizer, text)
        except UserError as e:
            raise UserError(f"{where}: {e} (the base run's tokenizer cannot encode this file)") from None
        if not t:
            raise UserError(f"{where}: the text encodes to no tokens")
        if len(t) > max_len:
            t, cut = t[:max_len], cut + 1
        ids.append(t)
    if cut:
        note(f"note: {cut} of {len(texts)} texts in {Path(wheres[0].rsplit(':', 1)[0])} are longer than the context "
             f"of {max_len} tokens; kept their first {max_len} tokens")
    return ids, cut


@dataclass
class ChatTemplate:
    """The `chat_template` of a checkpoint's config (format in the module docstring)."""

    user: str
    system: str = ""
    assistant_end: str = ""
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: dict) -> Optional["ChatTemplate"]:
        raw = config.get("chat_template")
        if not raw:
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("user"), str) or "{prompt}" not in raw["user"]:
            raise UserError('chat_template in the checkpoint config needs a "user" string containing {prompt}')
        stop = raw.get("stop") or []
        # unknown keys are ignored, so a newer fine-tuner can add fields without breaking chat
        return cls(
            user=raw["user"],
            system=str(raw.get("system") or ""),
            assistant_end=str(raw.get("assistant_end") or ""),
            stop=[stop] if isinstance(stop, str) else [str(s) for s in stop],
        )

    def to_jinja(self, tokenizer: Tokenizer) -> str:
        """This template as a jinja chat template (what an export writes into tokenizer_config.json): transformers'
        apply_chat_template renders the text `encode_conversation` encodes, `<|endoftext|>` in the template as the
        tokenizer's eos token and its BOS first. Its token ids are ours wherever encoding the pieces apart and the
        whole text agree: a message that starts or ends with whitespace may join the template's spaces or newlines
        into other tokens; a SentencePiece normalizer (Llama's "▁" prefix) puts one before every piece ours encodes."""
        eos = tokenizer.eot_token

        def lit(text: str) -> str:  # a jinja string literal (JSON's escapes are jinja's)
            return json.dumps(text.replace(EOT, eos) if eos else text, ensure_ascii=False)

        before, _, after = self.user.partition("{prompt}")
        bos = "".join(tokenizer.id_to_token(i) for i in tokenizer.bos_ids)
        return ("{{ " + lit(bos + self.system) + " }}{% for message in messages %}"
                "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
                "{% elif message['role'] == 'user' %}{{ " + lit(before) + " + message['content'] + " + lit(after) + " }}"
                "{% else %}{{ message['content'] + " + lit(self.assistant_end) + " }}{% endif %}{% endfor %}")

    def user_ids(self, tokenizer: Tokenizer, message: str) -> list[int]:
        # the message is ordinary text: only the template around it may hold EOT markers
        before, _, after = self.user.partition("{prompt}")
        return encode_with_eot(tokenizer, before) + tokenizer.encode(message) + encode_with_eot(tokenizer, after)


# -- an imported model's own (jinja) chat template ------------------------------------------------------------
# Rendered as transformers' tokenizer.apply_chat_template(messages, add_generation_prompt=True) renders it, then
# encoded with its control tokens (the template's <|im_start|>, <|eot_id|>...) as their ids. A special-token string
# typed in a MESSAGE stays plain characters, as everywhere in scratchgpt (a user can't forge a turn): this is
# transformers' apply_chat_template(..., sanitize_control_tokens=True), whose marker scheme is mirrored below.
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"  # transformers' _CONTROL_TOKEN_START/_END (private use)


class JinjaChatTemplate:
    """An imported model's jinja chat template (its tokenizer files' `chat_template`), rendered and encoded as
    transformers does. A template that doesn't compile or render is a one-line UserError naming jinja's error.

    Rendering runs in sandbox.py's worker process, bounded: `timeout` seconds (a loop bomb is stopped, as a
    UserError), `max_chars` characters of output, and the worker's memory cap."""

    def __init__(self, tokenizer: Tokenizer, source: str | list, *, timeout: float = RENDER_TIMEOUT_S,
                 max_chars: int = MAX_RENDER_CHARS) -> None:
        if isinstance(source, list):  # named templates: transformers uses "default" when no name is asked for
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
            if not isinstance(source, str):
                raise UserError("the imported chat template is a list without a \"default\" template")
        self.tokenizer, self.source, self.timeout, self.max_chars = tokenizer, source, timeout, max_chars
        self.variables = tokenizer.special_tokens()  # bos_token, eos_token...: as transformers passes them
        try:
            _, literal_text = compile_jinja(source)  # (here too: a syntax error is found at load time)
        except Exception as e:  # jinja's TemplateSyntaxError and friends
            raise UserError(f"the imported model's jinja chat template does not compile: {jinja_error(e)}") from None
        added = list(tokenizer.added_tokens().values())
        # transformers' _get_control_tokens: special tokens, and added tokens the template writes (not whitespace)
        self._control_re = _alternation([t.content for t in added if t.special or
                                         (t.content in literal_text and not t.content.isspace())])
        self._markers_re = re.compile(f"{_MARK_START}({_alternation([t.content for t in added]).pattern}){_MARK_END}"
                                      f"|[{_MARK_START}{_MARK_END}]")

    @classmethod
    def of(cls, tokenizer: Tokenizer, config: dict, **limits: float) -> Optional["JinjaChatTemplate"]:
        """The run's jinja template, if chat should use one: an imported model's, unless SFT gave the run
        scratchgpt's own ChatTemplate (that one is what it was tuned on). `limits`: timeout, max_chars."""
        if config.get("chat_template") or not tokenizer.chat_template:
            return None
        return cls(tokenizer, tokenizer.chat_template, **limits)

    def warm(self) -> None:
        """Do the one-time work now (the render worker's start, the special-token encoder), not in a request."""
        start_worker()
        try:
            self.tokenizer.encode_with_special_tokens("")
        except ValueError:  # a kind without special-token encoding: nothing to build
            pass

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, *,
               deadline: Optional[float] = None) -> str:
        """The text apply_chat_template(messages, add_generation_prompt=..., tokenize=False) gives.
        `deadline` (a time.monotonic() value) bounds it further, e.g. by a server's request timeout."""
        return self._render([{k: v for k, v in m.items() if v is not None} for m in messages], add_generation_prompt,
                            deadline)

    def _render(self, messages: list[dict], add_generation_prompt: bool, deadline: Optional[float]) -> str:
        variables = dict(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                         **self.variables)
        try:
            return render(self.source, variables, timeout=self.timeout, max_chars=self.max_chars, deadline=deadline)
        except ValueError as e:  # TemplateError from raise_exception, or a template bug (UndefinedError, TypeError...)
            raise UserError(f"the imported model's jinja chat template failed: {e}") from None

    def encode(self, messages: Sequence[dict], add_generation_prompt: bool = True, *,
               deadline: Optional[float] = None) -> list[int]:
        """Prompt ids for `messages`: apply_chat_template(..., add_generation_prompt=True, tokenize=True,
        sanitize_control_tokens=True) (transformers' encode_marked_chat). Without control-token strings in the
        messages that is exactly its default (sanitize_control_tokens=False) too."""
        marked = [{k: self._mark(v) for k, v in m.items() if v is not None} for m in messages]
        pieces = self._markers_re.split(self._render(marked, add_generation_prompt, deadline))
        tok = self.tokenizer
        ids = tok.encode_with_special_tokens(pieces[0])
        newline = tok.encode_with_special_tokens("\n")
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1  # a control token from a message: plain characters
            enc = tok.encode if as_text else tok.encode_with_special_tokens
            # after a newline, so SentencePiece adds no prefix space (transformers' _encode_chat_piece)
            piece_ids = enc("\n" + piece)
            piece_ids = piece_ids[len(newline):] if piece_ids[:len(newline)] == newline else enc(piece)
            if as_text and tok.token_to_id(piece) in piece_ids:
                raise UserError(f"cannot keep {piece!r} in a message as plain text: this tokenizer makes it its token")
            ids += piece_ids
        return ids

    def _mark(self, value):
        # transformers' mark_control_tokens: control tokens in message strings between private markers
        if isinstance(value, str):
            value = value.replace(_MARK_START, "").replace(_MARK_END, "")
            return self._control_re.sub(f"{_MARK_START}\\g<0>{_MARK_END}", value)
        if isinstance(value, dict):
            return {k: self._mark(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._mark(v) for v in value]
        return value


def fit_messages(template: JinjaChatTemplate, messages: Sequence[dict], budget: int, *,
                 deadline: Optional[float] = None) -> tuple[list[int], list[dict]]:
    """The conversation's prompt ids, rendered whole, and its messages after dropping the oldest turns (never a
    system message; the rest still starts with a user message) until it fits in `budget` tokens or one is left."""
    system = [m for m in messages if m.get("role") == "system"]
    rest = [m for m in messages if m.get("role") != "system"]
    ids, start = fit_suffix(lambda k: template.encode(system + rest[k:], deadline=deadline),
                            [m.get("role") == "user" for m in rest], budget)
    return ids, system + rest[start:]


def fit_suffix(encode: Callable[[int], list[int]], is_user: Sequence[bool], budget: int) -> tuple[list[int], int]:
    """The longest history that fits in `budget` tokens: (encode(k), k) for the smallest start k among 0, the
    user messages and the last message, with len(encode(k)) <= budget (else the last message alone).

    Dropping turns oldest first, one at a time, would encode the conversation once per dropped turn (a
    1,024-message chat: a thousand renders); a longer history is never shorter in tokens, so a binary search
    over the starts finds the same one in log2(n) encodings."""
    n = len(is_user)
    starts = sorted({0, max(n - 1, 0), *(k for k in range(1, n) if is_user[k])})
    lo, hi = 0, len(starts) - 1  # invariant: starts[hi] is the answer if none before it fits
    found: dict[int, list[int]] = {}
    while lo < hi:
        mid = (lo + hi) // 2
        found[mid] = encode(starts[mid])
        if len(found[mid]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return (found[lo] if lo in found else encode(starts[lo])), starts[lo]


def _alternation(strings: list[str]) -> re.Pattern:
    """A regex matching any of `strings`, longer ones first (so a token wins over the tokens it contains)."""
    return re.compile("|".join(map(re.escape, sorted(strings, key=len, reverse=True))) or "(?!)")


# SFT's default templates, the first the tokenizer can encode wins: a char vocabulary learned from plays has no
# "#" (the reply's end: <|endoftext|> where the tokenizer has it, else a visible marker the model learns to write)
DEFAULT_TEMPLATES = [
    ("### Instruction:\n{prompt}\n\n### Response:\n", "\n### End\n", ["\n### End", "### Instruction:"]),
    ("Instruction:\n{prompt}\n\nResponse:\n", "\nEnd.\n", ["\nEnd.", "Instruction:"]),
]


def default_template(tokenizer: Tokenizer) -> dict:
    """The chat template SFT uses unless --template gives one: the first of DEFAULT_TEMPLATES whose text the
    tokenizer can encode (one line saying the template, not the data, is the trouble where none can be)."""
    error = ""
    for user, end, stop in DEFAULT_TEMPLATES:
        if tokenizer.eot_id is not None:
            template = {"system": "", "user": user, "assistant_end": EOT, "stop": [EOT, stop[1]]}
        else:
            template = {"system": "", "user": user, "assistant_end": end, "stop": stop}
        error = template_error(tokenizer, template)
        if error is None:
            return template
    raise UserError(f"the default chat template cannot be encoded by this tokenizer ({error}): give --template FILE "
                    "(user, assistant_end, stop) written in characters it has")


def template_error(tokenizer: Tokenizer, template: dict) -> Optional[str]:
    """Why `tokenizer` can't encode the template's own text (characters its vocabulary lacks), or None."""
    t = ChatTemplate.from_config({"chat_template": template})
    before, _, after = t.user.partition("{prompt}")
    try:
        for text in (t.system, before, after, t.assistant_end):
            text = text.replace(EOT, "") if tokenizer.eot_id is not None else text  # EOT: its own token
            if text:
                encode_strict(tokenizer, text)
    except UserError as e:
        return str(e)
    return None


def load_template(path: Optional[str | os.PathLike], tokenizer: Tokenizer) -> dict:
    """A template JSON file (validated: "user" holds {prompt}, its text encodable), or the default."""
    if path is None:
        return default_template(tokenizer)
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the template JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the template must be a JSON object with a \"user\" field")
    template = asdict(ChatTemplate.from_config({"chat_template": raw}))
    error = template_error(tokenizer, template)
    if error:
        raise UserError(f"{path}: the template (not the data) cannot be encoded by the base run's tokenizer: {error}")
    return template


def encode_conversation(tokenizer: Tokenizer, template: dict, turns: Sequence[tuple[str, str]],
                        where: str = "") -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in the template, and which of them are the assistant's (to learn).

    The tokenizer's BOS ids (if any) and the system template first, then per exchange the user template around the message, the reply,
    and assistant_end. A system message is placed, masked, at the start followed by a blank line.
    """
    t = ChatTemplate.from_config({"chat_template": template})
    ids: list[int] = []
    learn: list[bool] = []

    def add(toks: list[int], flag: bool) -> None:
        ids.extend(toks)
        learn.extend([flag] * len(toks))

    try:
        for _, content in turns:
            encode_strict(tokenizer, content)  # names characters the vocabulary lacks
        add(tokenizer.bos_ids, False)  # an imported Llama's <s>, as its own tokenizer puts it first ([] for ours)
        add(encode_with_eot(tokenizer, t.system), False)
        for role, content in turns:
            if role == "system":
                add(tokenizer.encode(content + "\n\n"), False)
            elif role == "user":
                add(t.user_ids(tokenizer, content), False)
            else:
                add(tokenizer.encode(content), True)
                add(encode_with_eot(tokenizer, t.assistant_end), True)
    except UserError as e:
        raise UserError(f"{where}: {e} (the base run's tokenizer cannot encode this example)" if where else str(e)) from None
    return ids, learn


def prompt_ids(tokenizer: Tokenizer, template: dict, context: Sequence[tuple[str, str]]) -> list[int]:
    """The ids a model is prompted with for the reply after `context` (a trailing user turn)."""
    ids, _ = encode_conversation(tokenizer, template, list(context))
    return ids
