"""tokenizer.json's shapes, and the transformers files that travel beside it.

A file in exactly the shape scratchgpt writes is kind "char" or "bpe" (fast encoders that agree with
`tokenizers` on those); any other file `tokenizers` loads is kind "hf" (encoded by `tokenizers` itself).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import UserError
from ..runs.files import TOKENIZER_FILE

EOT = "<|endoftext|>"
UNK = "<unk>"
# transformers' tokenizer settings (eos_token, chat_template...), kept beside an imported tokenizer.json with
# the chat template files transformers >= 4.4x writes apart from it, and the model's generation_config.json
# (its eos_token_id list: the ids that end a turn, e.g. Llama 3's <|end_of_text|> and <|eot_id|>)
HF_CONFIG_FILE = "tokenizer_config.json"
HF_GENERATION_FILE = "generation_config.json"
HF_SIDE_FILES = (HF_CONFIG_FILE, "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                 HF_GENERATION_FILE)
# the special-token names transformers passes to a chat template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES)
HF_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def spec_model_type(spec: dict) -> str | None:
    """The model type of a parsed tokenizer.json ("BPE", "WordLevel", ...). Files from older `tokenizers`
    (GPT-2's on the Hugging Face hub) omit "type"; `tokenizers` then recognises BPE by its merges."""
    model = spec.get("model") or {}
    return model.get("type") or ("BPE" if "merges" in model else None)


def kind_of(spec: dict) -> str:
    """"char" or "bpe" for a file in exactly the shape scratchgpt writes (its fast encoders agree with
    `tokenizers` on those), else "hf" (encoded by `tokenizers` itself)."""
    return _scratchgpt_kind(spec) or "hf"


def loaded_spec(hf) -> dict:
    """What kind_of reads of a tokenizer.json, from the `tokenizers.Tokenizer` that loaded it (each component
    serializes as the file has it, defaults filled in), so loading does not parse the file a second time: 40 ms
    and ~20 MB of Python objects for SmolLM2's 3.4 MB tokenizer.json."""
    def part(component) -> dict | None:
        return json.loads(component.__getstate__()) if component is not None else None

    model = {"type": type(hf.model).__name__}
    model.update({k: getattr(hf.model, k, None) for k in ("byte_fallback", "dropout", "continuing_subword_prefix",
                                                          "end_of_word_suffix")})
    return {"model": model, "normalizer": part(hf.normalizer), "pre_tokenizer": part(hf.pre_tokenizer),
            "post_processor": part(hf.post_processor), "decoder": part(hf.decoder)}


def _scratchgpt_kind(spec: dict) -> str | None:
    kind = spec_model_type(spec)
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    post = spec.get("post_processor") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    if spec.get("normalizer") or post.get("type") not in (None, "ByteLevel", "TemplateProcessing") \
            or (post.get("type") == "TemplateProcessing" and post.get("special_tokens")):
        return None
    if kind == "BPE":
        byte_level = pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)
        plain = not (model.get("byte_fallback") or model.get("dropout") or model.get("continuing_subword_prefix")
                     or model.get("end_of_word_suffix"))
        return "bpe" if byte_level and decoder == "ByteLevel" and plain else None
    if kind == "WordLevel":
        split = pre.get("type") == "Split" and (pre.get("pattern") or {}).get("Regex") == r"[\s\S]" \
            and pre.get("behavior") == "Isolated" and not pre.get("invert")
        return "char" if split and decoder == "Fuse" else None
    return None


def json_object(data: bytes | None, name: str) -> dict:
    """The JSON object in a side file's bytes ({} when there is no such file); anything else is a UserError."""
    if data is None:
        return {}
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{name}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{name}: not a JSON object")
    return obj


def read_side_files(directory: Path) -> dict[str, bytes]:
    """The HF_SIDE_FILES found in `directory`, {name: bytes}."""
    return {name: (directory / name).read_bytes() for name in HF_SIDE_FILES if (directory / name).is_file()}


def copy_tokenizer(tokenizer_file: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Copy tokenizer.json into `directory` byte for byte, with the HF_SIDE_FILES beside it (any kind's: an
    imported GPT-2-shaped "bpe" tokenizer's eos, chat template and eos list matter as much as an "hf" one's)."""
    src = Path(tokenizer_file)
    shutil.copyfile(src, Path(directory) / TOKENIZER_FILE)
    for name in HF_SIDE_FILES:
        if (src.parent / name).is_file():
            shutil.copyfile(src.parent / name, Path(directory) / name)

