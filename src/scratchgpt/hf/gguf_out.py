"""Export: a checkpoint -> one GGUF file that llama.cpp (llama-cli, llama-server), Ollama and LM Studio run.

`export_gguf` writes the run as the GGUF architecture that computes it (gguf_layout.py's table): the
transformers family export would pick (so every refusal of hf/families.py holds here too), then
llama.cpp's: llama (also Mistral- and Phi-3-shaped runs), qwen2, qwen3, gpt2, gptneox. Refused in one
line naming the reason: OPT (post-norm), Arcee and Gemma shapes, mlp other than gelu_tanh in the
LayerNorm families (llama.cpp's GELU is the tanh one), biases in a Llama-shaped run, rope_scaling,
classifier and LoRA-adapter checkpoints, and tokenizers llama.cpp cannot reproduce: char vocabularies,
and BPE whose pre-tokenizer is not one of gguf_layout.PRE_TOKENIZERS, or with a normalizer or byte
fallback.

outtype: f32 (every tensor as is), f16 (matrices in fp16, norms and biases fp32, as convert_hf_to_gguf.py
writes them), q8_0 (matrices whose rows are a multiple of 32 in Q8_0, the rest fp16).

Vocabulary: tokenizer.ggml.model "gpt2" (byte-level BPE), tokenizer.ggml.pre naming the split our
tokenizer really uses ("gpt-2" for scratchgpt's own BPE: GPT-2's regex; an imported tokenizer's own:
"smollm" for SmolLM2's, "qwen2", "llama-bpe"), the tokens (special added tokens CONTROL, other added ones
USER_DEFINED, ids past the tokenizer up to the model's vocab_size UNUSED "[PAD<id>]"), the merges, bos /
eos / pad ids, add_bos_token where the tokenizer puts a BOS first, and the chat template: an imported
model's own, or an SFT run's (ChatTemplate.to_jinja).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .. import UserError
from ..checkpoint import ADAPTER_FILE, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, load_tensors, resolve_checkpoint, \
    verify_checkpoint
from ..checkpoint.load import checkpoint_config
from ..model import ModelConfig
from ..prompts import ChatTemplate
from ..runs.guard import check_output_file
from ..tokenizer import Tokenizer
from ..utils import atomic_write
from .export import export_family
from .families import FAMILIES, build_model_config
from .gguf_layout import constant_tensors, pre_tokenizer_name, tensor_slots
from .layout import check_shapes

OUTTYPES = ("f32", "f16", "q8_0")
# the transformers family export picks -> the llama.cpp architecture that computes it
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "phi3": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gpt2": "gpt2", "gpt_neox": "gptneox"}
_NO_ARCH = {"opt": "post-norm blocks with learned positions (OPT): llama.cpp has no such architecture",
            "arcee": "a plain (ungated) MLP in a Llama-shaped model: llama.cpp's arcee computes ReLU² only",
            "gemma": "Gemma-shaped (scaled embeddings): not written as GGUF yet"}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


def gguf_architecture(cfg: ModelConfig, config: Mapping[str, Any]) -> str:
    """The llama.cpp architecture that computes exactly what `cfg` does, or a one-line UserError naming why
    none does."""
    mt = export_family(cfg, config)
    if mt not in GGUF_ARCH:
        raise UserError(f"no GGUF architecture computes this model: {_NO_ARCH.get(mt, FAMILIES[mt].causal_lm)}")
    arch = GGUF_ARCH[mt]
    if arch in ("gpt2", "gptneox") and cfg.mlp != "gelu_tanh":
        raise UserError(f"model.mlp={cfg.mlp} has no GGUF equivalent: llama.cpp's {arch} computes the tanh GELU "
                        "(model.mlp=gelu_tanh) only")
    if arch in ("llama", "qwen2", "qwen3") and cfg.bias:
        raise UserError(f"model.bias=true has no GGUF equivalent: llama.cpp's {arch} (and transformers' GGUF loader) "
                        "take no MLP or output biases; train with model.bias=false")
    if cfg.rope_scaling != "none":
        raise UserError(f"model.rope_scaling={cfg.rope_scaling} is not written as GGUF yet (llama.cpp takes it as a "
                        "rope_freqs tensor)")
    return arch


def _merges(spec: Mapping[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]


def vocab_metadata(tok: Tokenizer, vocab_size: int, chat_template: Optional[str]) -> dict[str, Any]:
    """The tokenizer.* keys of a GGUF file for `tok` (padded to the model's `vocab_size`); a tokenizer llama.cpp
    cannot reproduce is a one-line UserError."""
    if tok.kind == "char":
        raise UserError("tokenizer: a char tokenizer (one id per character) has no llama.cpp vocabulary type that "
                        "encodes the same ids; train with --tokenizer bpe")
    spec = json.loads(tok.to_json())
    model = spec.get("model") or {}
    if model.get("type", "BPE" if "merges" in model else None) != "BPE" or model.get("byte_fallback") \
            or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError("tokenizer: not byte-level BPE (llama.cpp's 'gpt2' vocabulary); scratchgpt writes GGUF "
                        "vocabularies for byte-level BPE only")
    if spec.get("normalizer"):
        raise UserError(f"tokenizer: a {spec['normalizer'].get('type')} normalizer, which llama.cpp's byte-level BPE "
                        "does not apply")
    merges = _merges(spec)
    if not merges:
        raise UserError("tokenizer: BPE without merges")
    added = tok.added_tokens()
    tokens, types = [], []
    for i in range(vocab_size):
        text = tok.id_to_token(i) if i < tok.vocab_size else ""
        tokens.append(text or f"[PAD{i}]")
        a = added.get(i)
        types.append(_TOKEN_UNUSED if not text else _TOKEN_NORMAL if a is None
                     else _TOKEN_CONTROL if a.special else _TOKEN_USER_DEFINED)
    meta: dict[str, Any] = {"model": "gpt2", "pre": pre_tokenizer_name(spec.get("pre_tokenizer")),
                            "tokens": tokens, "types": types, "merges": merges, "add_bos": bool(tok.bos_ids)}
    eos = tok.eot_id
    bos = tok.bos_id if tok.bos_id is not None else eos
    pad = tok.token_to_id(tok.special_tokens().get("pad_token", "")) if tok.special_tokens().get("pad_token") else None
    meta.update(bos=bos, eos=eos, pad=pad, chat_template=chat_template)
    return meta


def _quantized(name: str, t: torch.Tensor, outtype: str):
    """(numpy data, raw GGML type or None) of tensor `name` at `outtype`: vectors stay fp32."""
    from gguf import GGMLQuantizationType, quants

    a = t.detach().float().contiguous().numpy()
    if a.ndim == 1 or outtype == "f32":
        return a, None
    if outtype == "q8_0" and a.shape[-1] % 32 == 0:
        return quants.quantize(a, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


def gguf_tensors(arch: str, cfg: ModelConfig, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our fp32 tensors under the GGUF names of `arch` (zero biases where the model has none but llama.cpp
    needs them)."""
    out: dict[str, torch.Tensor] = {}
    for slot in tensor_slots(arch, cfg):
        t = sd.get(slot.ours)
        if t is None and slot.ours == "lm_head.weight":  # (a tied head where llama.cpp wants output.weight)
            t = sd["transformer.wte.weight"]
        if t is None and slot.ours.endswith(".bias"):
            t = torch.zeros(sd[slot.ours[: -len("bias")] + "weight"].shape[0])
        if t is None:
            raise UserError(f"checkpoint lacks tensor {slot.ours}")
        out.update(zip(slot.gguf, slot.split(t.float()), strict=True))
    out.update(constant_tensors(arch, cfg))
    return out


def _add_hparams(w, arch: str, cfg: ModelConfig) -> None:
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_head)
    if arch in ("gpt2", "gptneox"):
        w.add_layer_norm_eps(cfg.eps)
    else:
        w.add_head_count_kv(cfg.kv_heads)
        w.add_layer_norm_rms_eps(cfg.eps)
        w.add_vocab_size(cfg.vocab_size)
        if cfg.head_dim * cfg.n_head != cfg.n_embd:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
    if cfg.pos == "rope":
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_base))
    if arch == "gptneox":
        w.add_parallel_residual(False)


def _add_vocab(w, v: Mapping[str, Any]) -> None:
    w.add_tokenizer_model(v["model"])
    w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    w.add_token_merges(v["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if v[key] is not None:
            add(v[key])
    w.add_add_bos_token(v["add_bos"])
    if v["chat_template"]:
        w.add_chat_template(v["chat_template"])


def write_gguf(path: Path, arch: str, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], vocab: Mapping[str, Any],
               outtype: str, name: str) -> None:
    """One GGUF file at `path` (written under a temporary name, renamed into place when complete)."""
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(w, arch, cfg)
        _add_vocab(w, vocab)
        for key, t in tensors.items():
            data, raw = _quantized(key, t, outtype)
            w.add_tensor(key, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)


def export_gguf(ckpt: str | os.PathLike, out: str | os.PathLike, *, which: str = "best", outtype: str = "f32",
                force: bool = False) -> Path:
    """Write a checkpoint (or a run dir: its `which` checkpoint) as the GGUF file `out`. Returns `out`."""
    if outtype not in OUTTYPES:
        raise UserError(f"outtype {outtype!r} is not one scratchgpt writes ({', '.join(OUTTYPES)})")
    for d in (Path(ckpt), Path(ckpt) / which):
        if (d / ADAPTER_FILE).is_file() and not (d / MODEL_FILE).is_file():
            raise UserError(f"{d} holds a LoRA adapter, not full weights: merge it first (scratchgpt merge-lora)")
    ckpt, out = resolve_checkpoint(Path(ckpt), which), Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: a GGUF export is one file (e.g. {out / 'model.gguf'})")
    if out.exists() and not force:
        raise UserError(f"{out} already exists: pass --force to replace it")
    target, how = check_output_file(out, inputs=[ckpt], flag="--out")
    if how != "file":
        raise UserError(f"--out {out} is not a regular file: a GGUF export is written to a file")
    verify_checkpoint(ckpt)
    config = checkpoint_config(ckpt / CONFIG_FILE)
    if config.get("classifier"):
        raise UserError(f"{ckpt} is a classifier: llama.cpp runs language models (export it with --format hf)")
    cfg = build_model_config(config["model"], where=str(ckpt / CONFIG_FILE))
    arch = gguf_architecture(cfg, config)
    tok = Tokenizer.load(ckpt / TOKENIZER_FILE)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{ckpt}: the tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    sft = ChatTemplate.from_config(config)
    template = sft.to_jinja(tok) if sft is not None else tok.chat_template
    vocab = vocab_metadata(tok, cfg.vocab_size, template if isinstance(template, str) else None)
    sd = {k: v.float() for k, v in load_tensors(ckpt / MODEL_FILE).items()}
    check_shapes(cfg, sd, str(ckpt / MODEL_FILE))
    name = Path(config.get("imported_from", {}).get("path") or ckpt.parent).stem
    write_gguf(target, arch, cfg, gguf_tensors(arch, cfg, sd), vocab, outtype, name)
    return out
