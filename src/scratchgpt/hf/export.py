"""Export: a checkpoint -> a transformers model folder (config.json, model.safetensors, tokenizer, model card).

Classifiers (`finetune classify` runs: a linear head on the last real token's hidden state) export as
the family's `...ForSequenceClassification`. Its `score` layer has no bias, so our head's bias is
folded into the final LayerNorm's bias (exact: that norm feeds only the score); RMSNorm families
have no bias to fold into and are refused unless the bias is zero. transformers pools the rightmost
token that is not `pad_token_id`, so the pad id must be one that text never encodes to:
`<|endoftext|>` for BPE (our encoder never emits it), and for char tokenizers a new `<pad>` token
with a zero embedding row. `pooling: mean` is refused.

Tokenizer: tokenizer.json is copied as is (it is already a `tokenizers` file) with a
tokenizer_config.json for `PreTrainedTokenizerFast`. `split_special_tokens: true` keeps
`<|endoftext|>` inside text as plain characters, exactly as scratchgpt encodes it; the EOT id is the
config's bos/eos id (append `tokenizer.eos_token_id` to mark a document end). An imported model's own
tokenizer (any kind: SmolLM2's GPT-2-shaped one is "bpe") goes back byte for byte with the files that
came with it (tokenizer_config.json, chat_template.jinja, generation_config.json with its eos list);
config.json's bos_token_id is the tokenizer's bos (the BOS its post-processor adds, else its
bos_token, else the eos), eos_token_id its eos. A `finetune sft` run's chat template goes into
tokenizer_config.json as jinja (`ChatTemplate.to_jinja`), so transformers' apply_chat_template gives
the ids scratchgpt prompts it with; for that its tokenizer_config.json says `split_special_tokens:
false` (apply_chat_template encodes the rendered text whole, and the template's `<|endoftext|>` must
be the token), so there `tokenizer(text)` makes that string in text the token too, unlike scratchgpt.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .. import UserError
from ..checkpoint import (ADAPTER_FILE, CONFIG_FILE, HEAD_FILE, MODEL_FILE, TOKENIZER_FILE, load_tensors,
                          resolve_checkpoint, verify_checkpoint)
from ..checkpoint.load import checkpoint_config
from ..faults import save_tensors
from ..model import ModelConfig
from ..prompts import ChatTemplate
from ..tokenizer import EOT, HF_CONFIG_FILE, UNK, Tokenizer
from ..runs.guard import check_out
from ..runs.staging import staged
from ..utils import atomic_write, atomic_write_bytes
from .card import model_card
from .config import PAD, json_bytes
from .config_out import hf_config
from .families import FAMILIES, build_model_config, export_model_type, hf_architecture
from .layout import check_shapes, contiguous_copy, to_hf_tensors


def _fold_head_bias(cfg: ModelConfig, tensors: dict[str, torch.Tensor], weight: torch.Tensor,
                    bias: torch.Tensor, arch: str) -> None:
    """Move the head's bias c into the final norm's bias b: find d with W d = c, then b += d.

    The final norm feeds only the score layer in a ...ForSequenceClassification, so
    W (norm(x) * g + b + d) = W (norm(x) * g + b) + c exactly (to float rounding).
    """
    if not bias.any():
        return
    if cfg.norm != "layernorm":
        raise UserError(f"{arch}'s score layer has no bias and an RMSNorm has none to fold the classifier head's "
                        "bias into; only a head with a zero bias exports")
    key = "transformer.ln_f.bias" if cfg.norm_placement == "pre" else f"transformer.h.{cfg.n_layer - 1}.ln_2.bias"
    w, c = weight.double(), bias.double()
    d = torch.linalg.pinv(w) @ c  # the smallest d with W d = c when W has full row rank
    if (w @ d - c).abs().max() > 1e-6 * max(1.0, c.abs().max().item()):
        raise UserError("the classifier head's weight is rank-deficient: its bias cannot be folded into the final "
                        f"norm, and {arch}'s score layer has no bias")
    base = tensors.get(key, torch.zeros(cfg.n_embd))
    tensors[key] = (base.double() + d).float()


def _add_pad_token(tokenizer_json: bytes, pad_id: int) -> bytes:
    """tokenizer.json with `<pad>` added as a special token at `pad_id` (one past the vocabulary)."""
    spec = json.loads(tokenizer_json)
    spec.setdefault("added_tokens", []).append({"id": pad_id, "content": PAD, "single_word": False, "lstrip": False,
                                                "rstrip": False, "normalized": False, "special": True})
    return (json.dumps(spec, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def export_family(cfg: ModelConfig, config: Mapping[str, Any], model_type: Optional[str] = None) -> str:
    """The model_type a run exports as: `model_type` if given (a UserError unless it computes the model), else
    the family the run was imported from where that computes it (an imported Mistral goes back a Mistral), else
    the class export_model_type picks."""
    if model_type is not None:
        return export_model_type(cfg, model_type)
    imported = (config.get("imported_from") or {}).get("model_type")
    if imported in FAMILIES:
        try:
            return export_model_type(cfg, imported)
        except UserError:
            pass  # (changed since, e.g. fine-tuned with other options): the class that computes it now
    return export_model_type(cfg)


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, which: str = "best",
                      force: bool = False, model_type: Optional[str] = None) -> Path:
    """Write a transformers model folder for a checkpoint (or a run dir: its `which` checkpoint). Returns `out`.

    The folder holds config.json, model.safetensors, generation_config.json (language
    models), tokenizer.json, tokenizer_config.json, special_tokens_map.json and a README.md
    model card. It is built under a temporary name and renamed into place. `model_type`
    picks among classes that compute the same model (a Llama-shaped one: llama, mistral or
    phi3; see export_family).
    """
    for d in (Path(ckpt), Path(ckpt) / which):
        if (d / ADAPTER_FILE).is_file() and not (d / MODEL_FILE).is_file():
            raise UserError(f"{d} holds a LoRA adapter, not full weights: merge it first (scratchgpt merge-lora)")
    ckpt, out = resolve_checkpoint(Path(ckpt), which), Path(out)
    check_out(out, "hf-model", force=force, inputs=[ckpt])  # before the work (staged checks again)
    state = verify_checkpoint(ckpt)
    config = checkpoint_config(ckpt / CONFIG_FILE)  # (its shape checked: the sha256 list may be fixed up)
    cfg = build_model_config(config["model"], where=str(ckpt / CONFIG_FILE))
    classifier = config.get("classifier")
    mt = export_family(cfg, config, model_type)
    arch = hf_architecture(cfg, classifier.get("pooling", "last") if classifier else None, model_type=mt)
    tokenizer = Tokenizer.load(ckpt / TOKENIZER_FILE)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{ckpt}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")
    tensors = {k: v.float() for k, v in load_tensors(ckpt / MODEL_FILE).items()}
    check_shapes(cfg, tensors, str(ckpt / MODEL_FILE))
    eot, labels = tokenizer.eot_id, None
    bos = tokenizer.bos_id
    files = {"tokenizer.json": (ckpt / TOKENIZER_FILE).read_bytes()}
    special = {"bos_token": EOT, "eos_token": EOT} if eot is not None else {}
    if tokenizer.unk_id is not None:
        special["unk_token"] = UNK
    if classifier:
        labels = list(classifier["labels"])
        head = load_tensors(ckpt / HEAD_FILE)
        hf_tensors, hf_cfg, special["pad_token"] = _classifier_export(cfg, mt, tensors, head, labels, tokenizer,
                                                                      arch, files)
        n_params = sum(t.numel() for k, t in tensors.items() if k != "lm_head.weight")
        n_params += sum(t.numel() for t in head.values())
    else:
        hf_tensors = to_hf_tensors(mt, cfg, tensors, lm_head=True)
        hf_cfg = hf_config(cfg, eot_id=eot, bos_id=bos, model_type=mt)
        n_params = sum(t.numel() for t in tensors.values())
        gen = {"bos_token_id": eot if bos is None else bos, "eos_token_id": eot, "pad_token_id": eot} \
            if eot is not None else {}
        files["generation_config.json"] = json_bytes(gen)
    files["config.json"] = json_bytes(hf_cfg)
    files.update(_tokenizer_files(tokenizer, special, cfg, ChatTemplate.from_config(config)))
    card = model_card(ckpt, out, config, state, cfg, mt, arch, n_params, tokenizer, labels)
    files["README.md"] = card.encode("utf-8")
    _write_folder(out, hf_tensors, files, force, ckpt)
    return out


def _tokenizer_files(tokenizer: Tokenizer, special: dict[str, str], cfg: ModelConfig,
                     sft: ChatTemplate | None) -> dict[str, bytes]:
    """tokenizer_config.json with special_tokens_map.json, or an imported tokenizer's own files; an SFT run's
    chat template in tokenizer_config.json (instead of an imported one's)."""
    # an imported tokenizer goes back as it came (tokenizer_config.json holds its special tokens, it or
    # chat_template.jinja its chat template, generation_config.json its eos list); a classifier's pad token and an
    # SFT run's template are added
    out = dict(tokenizer.side_files)
    imported = tokenizer.kind == "hf" or HF_CONFIG_FILE in out
    if imported:
        raw = out.get(HF_CONFIG_FILE) or \
            json_bytes({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size})
        changes = {"pad_token": special["pad_token"]} if "pad_token" in special else {}
    else:
        raw = json_bytes(dict(special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=cfg.block_size,
                              clean_up_tokenization_spaces=False, split_special_tokens=True))
        out["special_tokens_map.json"] = json_bytes(special)
        changes = {}
    if sft is not None:
        for name in ("chat_template.jinja", "chat_template.json"):  # (transformers would prefer these files)
            out.pop(name, None)
        changes["chat_template"] = sft.to_jinja(tokenizer)
        if not imported:  # apply_chat_template encodes the rendered text whole: its eos must be the token
            changes["split_special_tokens"] = False
    out[HF_CONFIG_FILE] = json_bytes(dict(json.loads(raw), **changes)) if changes else raw
    return out


def _classifier_export(cfg: ModelConfig, mt: str, tensors: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                       labels: list[str], tokenizer: Tokenizer, arch: str,
                       files: dict[str, bytes]) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(tensors, config.json, pad token) of a ...ForSequenceClassification; may add <pad> to files["tokenizer.json"]."""
    if head["weight"].shape != (len(labels), cfg.n_embd):
        raise UserError(f"{HEAD_FILE}: weight shape {tuple(head['weight'].shape)} does not match "
                        f"{len(labels)} labels x n_embd {cfg.n_embd}")
    tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # the head reads hidden states, not logits
    _fold_head_bias(cfg, tensors, head["weight"].float(), head["bias"].float(), arch)
    eot = tokenizer.eot_id
    if eot is not None:  # our encoder never emits <|endoftext|> (an eos) for text, so it never ends a real row
        pad, pad_token = eot, tokenizer.eot_token
    else:  # a char vocabulary: every id is a character, so add a <pad> id with a zero embedding row
        pad, pad_token = cfg.vocab_size, PAD
        wte = tensors["transformer.wte.weight"]
        tensors["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(1, cfg.n_embd)])
        cfg = replace(cfg, vocab_size=cfg.vocab_size + 1)
        files["tokenizer.json"] = _add_pad_token(files["tokenizer.json"], pad)
    hf_tensors = to_hf_tensors(mt, cfg, tensors, lm_head=False)
    hf_tensors["score.weight"] = contiguous_copy(head["weight"].float())
    return hf_tensors, hf_config(cfg, eot_id=eot, pad_token_id=pad, labels=labels, model_type=mt), pad_token


def _write_folder(out: Path, tensors: dict[str, torch.Tensor], files: dict[str, bytes], force: bool,
                  source: Path) -> None:
    """model.safetensors and `files` into a temporary sibling of `out`, renamed to `out` once complete."""
    with staged(out, "hf-model", force=force, inputs=[source]) as tmp:
        atomic_write(tmp / MODEL_FILE, lambda path: save_tensors(tensors, path))
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
