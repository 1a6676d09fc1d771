"""Model cards (README.md) of exported folders: what the model is, how it was trained, how to load it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ..checkpoint import STATE_FILE
from ..model import ModelConfig
from ..runs.files import RESULT_FILE, eval_file
from ..tokenizer import EOT, Tokenizer
from ..utils import human_number, read_json
from .config import PAD
from .families import FAMILIES


def _run_metrics(ckpt: Path, state: dict) -> tuple[Optional[float], Optional[float], str]:
    """(val loss, perplexity, where they come from), the most telling record first: `scratchgpt eval`'s
    eval-lm.json, the final whole-split eval (result.json), a fine-tuned checkpoint's own eval on its
    val file (state.json), then the best periodic estimate."""
    runs = (ckpt, ckpt.parent)
    for d in runs:
        path = d / eval_file("lm")
        if path.is_file():
            r = read_json(path)
            if r.get("val_loss") is not None:
                return r["val_loss"], r.get("perplexity"), f"`scratchgpt eval` ({path.name}, {r.get('split', 'val')})"
        path = d / RESULT_FILE
        if path.is_file():
            r = read_json(path)
            if r.get("final_val_loss") is not None:
                return r["final_val_loss"], r.get("final_perplexity"), "final evaluation on the whole val split (result.json)"
    val = state.get("val") or {}
    if val.get("val_loss") is not None:
        return val["val_loss"], None, "this checkpoint on the fine-tuning val file (state.json)"
    for d in runs:
        path = d / RESULT_FILE
        if path.is_file() and read_json(path).get("best_val_loss") is not None:
            return read_json(path)["best_val_loss"], None, "best periodic val estimate (result.json)"
    return state.get("best_val_loss"), None, "best periodic val estimate (state.json)"


def source_name(imported: dict) -> str:
    """The name of the model a run was imported from: its hub name, else its folder's name (never a machine path:
    runs recorded before `name` existed give the last part of their `path`)."""
    return imported.get("name") or Path(str(imported.get("path") or "unknown")).name


def _run_name(path) -> str:
    """A run's name (its directory's, not a checkpoint's best/latest), without the machine path before it."""
    p = Path(str(path or "unknown"))
    return p.parent.name if p.name in ("best", "latest") and p.parent.name else p.name


def _origin(config: dict) -> str:
    """The card's first words: where the weights came from."""
    imported = config.get("imported_from")
    tuned = " and fine-tuned with scratchgpt" if config.get("finetune") else ""
    if imported:
        return f"`{source_name(imported)}`, imported into scratchgpt from its transformers weights{tuned}"
    return f"A small GPT trained from scratch with scratchgpt{tuned}"


def _finetune_line(ft: dict) -> str:
    lora = ft.get("lora") or {}
    return (f"- fine-tuned ({ft.get('task', 'finetune')}"
            + (f", LoRA r={lora.get('r')} alpha={lora.get('lora_alpha')}" if lora else "")
            + (", LoRA merged into the weights" if ft.get("merged_from") else "")
            + f") from `{_run_name(ft.get('base'))}`"
            + (f" on `{ft['train_file']}` (val: `{ft.get('val_file')}`)" if ft.get("train_file") else ""))


def _training_lines(ckpt: Path, config: dict, state: dict, labels: Optional[list[str]]) -> list[str]:
    """The model card's "Training" section: data, tokens, val loss, the command, the fine-tune."""
    imported = config.get("imported_from")
    loss, ppl, source = _run_metrics(ckpt, state)
    command = config.get("command")
    if isinstance(command, list):
        command = " ".join(map(str, command))
    ft = config.get("finetune") or {}
    lines = ["## Training", ""]
    if imported:
        lines.append(f"- imported from `{source_name(imported)}` ({imported.get('architecture')}); "
                     "its training history is not recorded here")
    lines += [
        f"- data: `{config.get('data')}`" if config.get("data") else "- data: not recorded",
        f"- tokens seen: {state.get('tokens', 0):,} in {state.get('step', 0):,} steps",
    ]
    if ft:
        lines.append(_finetune_line(ft))
    val = state.get("val") or {}
    if labels and val.get("accuracy") is not None:  # a classifier's loss is over labels: no perplexity
        lines.append(f"- val accuracy: {val['accuracy']:.4f}, macro-F1 {val.get('macro_f1', float('nan')):.4f}, "
                     f"loss {val.get('val_loss', float('nan')):.4f} (this checkpoint on the fine-tuning val file)")
    elif loss is not None:
        ppl = ppl if ppl is not None else math.exp(min(loss, 700))
        lines.append(f"- val loss: {loss:.4f} nats/token (perplexity {ppl:.2f}); source: {source}")
    else:
        lines.append("- val loss: not recorded")
    lines.append(f"- command: `{command}`" if command else "- command: not recorded")
    if labels:
        lines.append(f"- classifier labels: {', '.join(labels)} (pooling: last token)")
    return lines


def model_card(ckpt: Path, out: Path, config: dict, state: dict, cfg: ModelConfig, model_type: str, arch: str,
               n_params: int, tokenizer: Tokenizer, labels: Optional[list[str]]) -> str:
    """README.md of a folder exported as `arch` (a classifier's when `labels` are given)."""
    merged_from = Path((config.get("finetune") or {}).get("merged_from") or "")
    if merged_from.name and (merged_from / STATE_FILE).is_file():
        # a merged LoRA run (merge-lora, or export's merge into a temporary run): the LoRA run's name and record
        ckpt, state = merged_from, read_json(merged_from / STATE_FILE)
    name = ckpt.parent.name if ckpt.name in ("best", "latest") else out.name
    auto = "AutoModelForSequenceClassification" if labels else "AutoModelForCausalLM"
    kind = {"char": "character-level", "bpe": "byte-level BPE", "hf": "the imported model's own"}[tokenizer.kind]
    mlp = f"{cfg.mlp}, hidden {cfg.hidden_dim}"
    heads = f"{cfg.n_head} ({cfg.kv_heads} key/value)" if cfg.kv_heads != cfg.n_head else str(cfg.n_head)
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'text-classification' if labels else 'text-generation'}",
        f"tags: [scratchgpt, {model_type}]",
        "---",
        "",
        f"# {name}",
        "",
        f"{_origin(config)}, exported as a stock `{arch}`: it loads with "
        f"`{auto}.from_pretrained` (no `trust_remote_code`) and computes what scratchgpt computes "
        "(fp32 logits within 1e-4).",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{arch}` |",
        f"| parameters | {human_number(n_params)} ({n_params:,}) |",
        f"| layers / heads / width | {cfg.n_layer} / {heads} / {cfg.n_embd} |",
        f"| context | {cfg.block_size} tokens |",
        f"| positions / norm / MLP | {cfg.pos} / {cfg.norm} ({cfg.norm_placement}{', qk norm' * cfg.qk_norm}) / {mlp} |",
        f"| biases / tied embeddings | {'yes' if cfg.bias else 'no'} / {'yes' if cfg.tie_embeddings else 'no'} |",
        f"| tokenizer | {kind}, {tokenizer.vocab_size} tokens |",
        "",
        *_training_lines(ckpt, config, state, labels),
    ]
    lines += _harness_lines(ckpt) + _usage_lines(out, auto, labels) + _token_notes(cfg, tokenizer, labels)
    return "\n".join(lines + _limits_lines(cfg))


def _harness_lines(ckpt: Path) -> list[str]:
    """The "Evaluation" section: `scratchgpt eval --task harness` results (eval-harness.json), where recorded."""
    from ..harness import read_summary

    for d in (ckpt, ckpt.parent):
        data, rows = read_summary(d)
        if rows:
            break
    else:
        return []
    lines = ["", "## Evaluation", "",
             f"lm-evaluation-harness {data.get('harness_version', '')} through scratchgpt's own backend "
             "(`scratchgpt eval --task harness`; the same figures as its `hf` backend on this folder):", "",
             "| task | metric | value | ± | shots | examples | version |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        stderr = f"{r['stderr']:.4f}" if r["stderr"] is not None else ""
        lines.append(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {stderr} | {r['n_shot'] if r['n_shot'] is not None else ''} "
                     f"| {r['samples'] if r['samples'] is not None else ''} | {r['version'] if r['version'] is not None else ''} |")
    return lines


def _usage_lines(out: Path, auto: str, labels: Optional[list[str]]) -> list[str]:
    lines = ["", "## Usage", "", "```python", f"from transformers import AutoTokenizer, {auto}", "",
             f'tokenizer = AutoTokenizer.from_pretrained("{out.name}")',
             f'model = {auto}.from_pretrained("{out.name}")']
    if labels:
        lines += ['batch = tokenizer(["some text"], return_tensors="pt", padding=True)',
                  "label = model.config.id2label[model(**batch).logits.argmax(-1).item()]"]
    else:
        lines += ['ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
                  "out = model.generate(ids, max_new_tokens=100, do_sample=True, top_k=50)",
                  "print(tokenizer.decode(out[0]))"]
    return lines + ["```", ""]


def _token_notes(cfg: ModelConfig, tokenizer: Tokenizer, labels: Optional[list[str]]) -> list[str]:
    """What the card says about the eos and pad tokens."""
    lines = []
    if tokenizer.eot_token not in (None, EOT):  # an imported model's own eos
        lines += [f"`{tokenizer.eot_token}` (id {tokenizer.eot_id}) is the eos token; scratchgpt encodes special-token "
                  "strings inside text as plain characters (transformers' `split_special_tokens=True`).", ""]
    elif tokenizer.eot_id is not None:
        lines += [f"`{EOT}` (id {tokenizer.eot_id}) is the bos/eos token. As in scratchgpt, that string inside text is "
                  "encoded as plain characters (`split_special_tokens`); append `tokenizer.eos_token_id` to end a "
                  "document.", ""]
    if labels and tokenizer.eot_id is None:
        lines += [f"`{PAD}` (id {cfg.vocab_size}) was added as the padding token, with a zero embedding: "
                  "the classifier pools the last token that is not padding.", ""]
    return lines


def _limits_lines(cfg: ModelConfig) -> list[str]:
    return [
        "## Intended use and limits",
        "",
        "An educational and experimental model: small, trained on a small corpus, for studying how language "
        "models train and behave. It produces fluent-looking but unreliable text: it has no knowledge beyond its "
        "training data, makes up facts, and has had no safety tuning. Do not use it for decisions about people "
        "or for anything that needs correct output. It sees at most "
        f"{cfg.block_size} tokens"
        + (" (learned positions: longer input is an error)" if cfg.pos == "learned" else
           " (RoPE runs past that, but it was not trained there)") + ".",
        "",
    ]


def adapter_card(ckpt: Path, out: Path, config: dict, state: dict, cfg: ModelConfig, model_type: str, adapter: dict,
                 n_params: int) -> str:
    """README.md of a PEFT adapter folder whose base (a `model_type` model) sits in out/base."""
    name = ckpt.parent.name if ckpt.name in ("best", "latest") else out.name
    arch = FAMILIES[model_type].causal_lm
    scale = "alpha/sqrt(r)" if adapter["use_rslora"] else "alpha/r"
    lines = [
        "---",
        "library_name: peft",
        "pipeline_tag: text-generation",
        f"tags: [scratchgpt, lora, {model_type}]",
        "---",
        "",
        f"# {name}",
        "",
        f"A LoRA adapter trained with scratchgpt, as a PEFT adapter over `base/`: the base model it was "
        f"fine-tuned from, exported as a stock `{arch}` (with its tokenizer and its own model card). "
        "Base plus adapter compute what scratchgpt computes with the adapter applied (fp32 logits within 1e-4).",
        "",
        "## Adapter",
        "",
        "| | |",
        "|---|---|",
        f"| base | `base/` (`{arch}`; {cfg.n_layer} layers, width {cfg.n_embd}) |",
        f"| rank r / lora_alpha / scale | {adapter['r']} / {adapter['lora_alpha']} / {scale} |",
        f"| target modules | {', '.join(adapter['target_modules'])} |",
        f"| adapter parameters | {human_number(n_params)} ({n_params:,}) |",
        "",
        *_training_lines(ckpt, config, state, None),
        "",
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{out.name}/base")',
        f'base = AutoModelForCausalLM.from_pretrained("{out.name}/base")',
        f'model = PeftModel.from_pretrained(base, "{out.name}")',
        "# model = model.merge_and_unload()  # optional: plain weights, faster",
        'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
        "out = model.generate(input_ids=ids, max_new_tokens=100, do_sample=True, top_k=50)",
        "print(tokenizer.decode(out[0]))",
        "```",
        "",
        "adapter_config.json names its base `base`, a relative path: `AutoPeftModelForCausalLM` would look for "
        "it in the working directory, so load the base explicitly as above.",
        "",
    ]
    if config.get("chat_template"):
        lines += ["Fine-tuned on prompts in this scratchgpt chat template (`{prompt}` is the user's message); format "
                  "prompts the same way:", "", "```json", json.dumps(config["chat_template"], indent=2,
                                                                       ensure_ascii=False), "```", ""]
    return "\n".join(lines + _limits_lines(cfg))
