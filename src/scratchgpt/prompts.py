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
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import UserError
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

    def user_ids(self, tokenizer: Tokenizer, message: str) -> list[int]:
        # the message is ordinary text: only the template around it may hold EOT markers
        before, _, after = self.user.partition("{prompt}")
        return encode_with_eot(tokenizer, before) + tokenizer.encode(message) + encode_with_eot(tokenizer, after)


def refuse_jinja_template(tokenizer: Tokenizer, template: Optional[ChatTemplate], command: str) -> None:
    """A one-line UserError for chatting with a run whose only chat template is an imported model's jinja one.

    Plain continuation would ignore the format the model was tuned on, and scratchgpt renders no jinja.
    """
    if template is None and tokenizer.chat_template:
        raise UserError(f"this imported model's chat template is a jinja template (its tokenizer files), which "
                        f"scratchgpt does not render, so `{command}` cannot prompt it as it was tuned: use `scratchgpt "
                        "sample --prompt`, transformers' apply_chat_template on an exported folder, or `scratchgpt "
                        "finetune sft` (the fine-tuned run chats in scratchgpt's template)")


def default_template(tokenizer: Tokenizer) -> dict:
    """The chat template SFT uses unless --template gives one."""
    user = "### Instruction:\n{prompt}\n\n### Response:\n"
    if tokenizer.eot_id is not None:
        return {"system": "", "user": user, "assistant_end": EOT, "stop": [EOT, "### Instruction:"]}
    # char tokenizers have no EOT token: a visible end marker the model learns to write
    return {"system": "", "user": user, "assistant_end": "\n### End\n", "stop": ["\n### End", "### Instruction:"]}


def load_template(path: Optional[str | os.PathLike], tokenizer: Tokenizer) -> dict:
    """A template JSON file (validated: "user" holds {prompt}), or the default."""
    if path is None:
        return default_template(tokenizer)
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the template JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the template must be a JSON object with a \"user\" field")
    return asdict(ChatTemplate.from_config({"chat_template": raw}))


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
