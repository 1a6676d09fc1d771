"""Import: a GGUF file (llama.cpp, Ollama, LM Studio) -> a scratchgpt run.

`import_gguf` reads the file with the `gguf` package (llama.cpp's gguf-py), dequantizes every tensor to
fp32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants Q2_K..Q6_K, with gguf.quants, the
arithmetic transformers' GGUF loader uses), maps the metadata of the architectures in gguf_layout.py to a
ModelConfig and rebuilds the tokenizer: tokenizer.ggml.tokens / token_type / merges and the split named
by tokenizer.ggml.pre become a byte-level BPE tokenizer.json (control tokens special, user-defined ones
matched in text as llama.cpp does), tokenizer.ggml.bos/eos/padding_token_id and tokenizer.chat_template
a tokenizer_config.json, the eos (and eot) ids a generation_config.json. A bos that
tokenizer.ggml.add_bos_token asks for goes before every text (the post-processor adds it).

Refused in one line naming the file and the reason, with nothing written: a file that is not GGUF or is
cut short, an architecture or option our blocks lack (partial or scaled RoPE, a parallel residual,
experts, sliding windows...), a tensor type the gguf package cannot dequantize, SentencePiece
vocabularies ("llama" tokenizer model: scores, no merges), a BPE vocabulary without merges or with a
pre-tokenizer we do not rebuild.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .. import UserError
from ..model import LAYERNORM_EPS, RMSNORM_EPS
from ..tokenizer import HF_CONFIG_FILE, HF_GENERATION_FILE, TOKENIZER_FILE, Tokenizer
from ..runs.guard import check_out
from ..utils import sha256_file
from .config import json_bytes
from .families import FAMILIES, build_model_config
from .gguf_layout import ARCHES, PRE_TOKENIZERS, REFUSED_ARCHES, UNTIED_ONLY, constant_tensors, tensor_slots
from .layout import check_shapes
from .load import write_imported_run

GGUF_MAGIC = b"GGUF"
# the tensor types read: the float ones and every quantization gguf.quants dequantizes that files use
READ_TYPES = ("F32", "F16", "BF16", "F64", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K")
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with GGUF's magic."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf(path: Path):
    """A gguf.GGUFReader of `path`, every tensor's bytes inside the file; anything else a one-line UserError."""
    import gguf

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if not is_gguf(path):
        raise UserError(f"{path}: not a GGUF file (no GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable GGUF file, truncated or corrupt ({str(e).splitlines()[0]})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise UserError(f"{path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                            f"the file at {size}")
    return reader


def metadata(reader) -> dict[str, Any]:
    """Every key-value field but the header's, as Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def dequantize(t, where: Path) -> torch.Tensor:
    """Tensor `t` of a GGUFReader as fp32, shaped as ours ((rows, columns): GGUF lists dimensions reversed)."""
    from gguf import quants

    kind = t.tensor_type.name
    if kind not in READ_TYPES:
        raise UserError(f"{where}: tensor {t.name} has type {kind}, which scratchgpt does not read "
                        f"({', '.join(READ_TYPES)})")
    data = np.asarray(t.data)
    out = data if kind in ("F32", "F16", "F64") else quants.dequantize(data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))
    return torch.from_numpy(np.array(out, dtype=np.float32).reshape(shape))  # (a copy: the file is mapped read-only)


def _eps(value: float, default: float) -> Optional[float]:
    """A norm eps as stored (float32) in its shortest decimal, None where it is our default for the norm."""
    eps = float(str(np.float32(value)))
    return None if eps == default else eps


class _Meta:
    """The `arch.*` keys of one file, each missing required key a one-line UserError."""

    def __init__(self, meta: dict[str, Any], arch: str, where: Path):
        self.meta, self.arch, self.where = meta, arch, where

    def __call__(self, key: str, default: Any = ...) -> Any:
        value = self.meta.get(f"{self.arch}.{key}")
        if value is None:
            if default is ...:
                raise UserError(f"{self.where}: metadata lacks {self.arch}.{key}")
            return default
        return value

    def refuse(self, why: str) -> UserError:
        return UserError(f"{self.where}: {self.arch} {why} has no scratchgpt equivalent")


def _config_kwargs(meta: dict[str, Any], arch: str, names: set[str], vocab_size: int, where: Path,
                   tied: bool) -> dict[str, Any]:
    """ModelConfig's fields from the metadata of an `arch` file holding tensors `names` (`tied`: its head is the
    embedding)."""
    m = _Meta(meta, arch, where)
    n_embd, n_head = int(m("embedding_length")), int(m("attention.head_count"))
    kv = m("attention.head_count_kv", n_head)
    if isinstance(kv, list):
        if len(set(kv)) != 1:
            raise m.refuse(f"attention.head_count_kv {kv[:4]}... (a different number of key/value heads per layer)")
        kv = kv[0]
    head_dim = int(m("attention.key_length", n_embd // n_head))
    if int(m("attention.value_length", head_dim)) != head_dim:
        raise m.refuse("attention.value_length != key_length")
    if int(m("rope.dimension_count", head_dim)) != head_dim and arch != "gpt2":
        raise m.refuse(f"rope.dimension_count={m('rope.dimension_count')} (RoPE over part of each head of {head_dim})")
    scaling = m("rope.scaling.type", "none")
    if scaling != "none" and not (scaling == "linear" and float(m("rope.scaling.factor", 1.0)) == 1.0):
        raise m.refuse(f"rope.scaling.type={scaling} (scaled RoPE)")
    for key in ("expert_count", "attention.sliding_window", "attn_logit_softcapping", "final_logit_softcapping"):
        if m(key, 0):
            raise m.refuse(f"{key}={m(key)}")
    c: dict[str, Any] = dict(vocab_size=vocab_size, block_size=int(m("context_length")), n_layer=int(m("block_count")),
                             n_head=n_head, n_embd=n_embd, mlp_hidden=int(m("feed_forward_length")),
                             tie_embeddings=tied, dropout=0.0)
    if arch in ("gpt2", "gptneox"):
        if arch == "gptneox" and m("use_parallel_residual", True):
            raise m.refuse("use_parallel_residual=true (attention and MLP in parallel)")
        c.update(pos="learned" if arch == "gpt2" else "rope", norm="layernorm", mlp="gelu_tanh", bias=True,
                 norm_eps=_eps(m("attention.layer_norm_epsilon"), LAYERNORM_EPS))
    else:
        c.update(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=arch == "qwen3",
                 qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in names,
                 n_kv_head=None if int(kv) == n_head else int(kv),
                 head_size=None if head_dim * n_head == n_embd else head_dim,
                 norm_eps=_eps(m("attention.layer_norm_rms_epsilon"), RMSNORM_EPS))
    if c["pos"] == "rope":
        c["rope_base"] = float(m("rope.freq_base", 10000.0))
    return c


def _state_dict(reader, arch: str, cfg, where: Path) -> dict[str, torch.Tensor]:
    """Our fp32 state dict (tied head omitted) from the file's tensors; a missing, unexpected or misshapen
    tensor is a UserError naming it."""
    by_name = {t.name: t for t in reader.tensors}
    slots = tensor_slots(arch, cfg)
    wanted = {n for s in slots for n in s.gguf} | set(constant_tensors(arch, cfg))
    extra = sorted(set(by_name) - wanted)
    if extra:
        raise UserError(f"{where}: tensor {extra[0]} has no place in scratchgpt's {arch} (a variant scratchgpt "
                        "cannot represent)")
    sd = {}
    for slot in slots:
        for n in slot.gguf:
            if n not in by_name:
                raise UserError(f"{where}: tensor {n} is missing")
        try:
            sd[slot.ours] = slot.join([dequantize(by_name[n], where) for n in slot.gguf])
        except RuntimeError as e:
            raise UserError(f"{where}: tensor {slot.gguf[0]} has the wrong shape for the metadata ({e})") from None
    for n, value in constant_tensors(arch, cfg).items():
        if n not in by_name or not torch.equal(dequantize(by_name[n], where), value):
            raise UserError(f"{where}: tensor {n} is not all ones: scratchgpt's qk_norm has no weight (it represents "
                            "a Qwen3 whose q/k norm weights are 1)")
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # (a copy of the embedding: gptneox files always hold one)
    check_shapes(cfg, sd, str(where))
    return sd


def _token_list(meta: dict[str, Any], key: str, where: Path) -> list:
    value = meta.get(key)
    if not isinstance(value, list):
        raise UserError(f"{where}: metadata lacks {key}")
    return value


def tokenizer_json(meta: dict[str, Any], where: Path) -> dict[str, Any]:
    """The tokenizer.json (a dict) of the file's byte-level BPE vocabulary."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"{where}: tokenizer.ggml.model {model!r} is not read by scratchgpt (it rebuilds byte-level "
                        "BPE, 'gpt2'; SentencePiece 'llama' vocabularies have scores, not merges)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    pre = "gpt-2" if pre == "default" else pre  # (llama.cpp splits "default" with GPT-2's regex too)
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{where}: tokenizer.ggml.pre {pre!r} is not a split scratchgpt rebuilds "
                        f"({', '.join(PRE_TOKENIZERS)})")
    tokens = _token_list(meta, "tokenizer.ggml.tokens", where)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise UserError(f"{where}: the BPE tokenizer has no merges (tokenizer.ggml.merges)")
    if len(set(tokens)) != len(tokens) or len(types) != len(tokens):
        raise UserError(f"{where}: tokenizer.ggml.tokens repeats a token or disagrees with token_type")
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": kind == _USER_DEFINED, "special": kind == _CONTROL}
             for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (_CONTROL, _USER_DEFINED)]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    post = None
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        first = {"SpecialToken": {"id": tokens[bos], "type_id": 0}}
        post = {"type": "TemplateProcessing", "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, first, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}}}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": pre == "llama-bpe", "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": [m.split(" ", 1) for m in merges]}}


def tokenizer_files(meta: dict[str, Any], where: Path, context: int) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json (bos, eos, pad, chat template) and generation_config.json (eos ids)."""
    spec = tokenizer_json(meta, where)
    tokens = meta["tokenizer.ggml.tokens"]
    named = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            named[name] = tokens[i]
    config = dict(named, tokenizer_class="PreTrainedTokenizerFast", model_max_length=context,
                  clean_up_tokenization_spaces=False)
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if meta.get(k) is not None]
    files = {TOKENIZER_FILE: json.dumps(spec, ensure_ascii=False, indent=2).encode("utf-8") + b"\n",
             HF_CONFIG_FILE: json_bytes(config)}
    if eos:
        gen = {"eos_token_id": sorted(set(eos), key=eos.index) if len(set(eos)) > 1 else eos[0]}
        if meta.get("tokenizer.ggml.bos_token_id") is not None:
            gen["bos_token_id"] = meta["tokenizer.ggml.bos_token_id"]
        files[HF_GENERATION_FILE] = json_bytes(gen)
    return files


def import_gguf(path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a scratchgpt run (out/config.json, out/best, out/latest) from a GGUF file. Returns `out`.

    config["imported_from"] records the file, its sha256, its GGUF architecture and the transformers
    model_type export writes it back as.
    """
    path, out = Path(path), Path(out)
    check_out(out, "run", force=force, inputs=[path])
    reader = read_gguf(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch in REFUSED_ARCHES:
        raise UserError(f"{path}: architecture {arch!r} has no scratchgpt equivalent ({REFUSED_ARCHES[arch]}); "
                        f"scratchgpt reads {', '.join(ARCHES)}")
    if arch not in ARCHES:
        raise UserError(f"{path}: architecture {arch!r} is not supported; scratchgpt reads {', '.join(ARCHES)}")
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise UserError(f"{path}: tensor token_embd.weight is missing")
    vocab_size = int(by_name["token_embd.weight"].shape[-1])
    head = by_name.get("output.weight")
    tied = head is None or (arch in UNTIED_ONLY and head.tensor_type == by_name["token_embd.weight"].tensor_type
                            and np.array_equal(head.data, by_name["token_embd.weight"].data))
    kwargs = _config_kwargs(meta, arch, set(by_name), vocab_size, path, tied)
    cfg = build_model_config(kwargs, where=str(path))
    files = tokenizer_files(meta, path, cfg.block_size)
    sd = _state_dict(reader, arch, cfg, path)
    mt = ARCHES[arch]
    origin = {"path": str(path.resolve()), "format": "gguf", "gguf_architecture": arch,
              "architecture": FAMILIES[mt].causal_lm, "model_type": mt, "sha256": {path.name: sha256_file(path)}}
    with tempfile.TemporaryDirectory(prefix="scratchgpt-gguf-tokenizer-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        tok = Tokenizer.load(Path(tmp) / TOKENIZER_FILE)
        if tok.vocab_size > cfg.vocab_size:
            raise UserError(f"{path}: {tok.vocab_size} tokens, but the model has only {cfg.vocab_size} embeddings")
        return write_imported_run(out, cfg, sd, Path(tmp) / TOKENIZER_FILE, tok, origin, force=force, inputs=[path])
