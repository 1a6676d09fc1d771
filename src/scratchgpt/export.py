"""`scratchgpt export` and `scratchgpt import-hf`: runs leave and enter through the Hugging Face format.

    scratchgpt export RUN --out DIR          a folder stock transformers loads (AutoModelForCausalLM,
                                             AutoTokenizer), with a model card; hf/ has the mapping
    scratchgpt import-hf DIR --out RUN       a GPT-2 / OPT / GPT-NeoX / Llama / Arcee / Qwen2 / Qwen3 /
                                             Mistral / Gemma / Phi-3 folder saved by transformers, as a
                                             scratchgpt run every command takes

A LoRA run exports merged (its adapter folded into the base weights) or, with `--adapter`, as
a PEFT adapter folder beside its exported base.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from . import UserError
from . import hf
from .checkpoint import ADAPTER_FILE, Which, resolve_checkpoint
from .runs.guard import check_out


def export_cli(run: Path, out: Path, *, which: Which = "best", adapter: bool = False, base: Path | None = None,
               model_type: str | None = None, force: bool = False, push_to_hub: str | None = None,
               private: bool = False) -> Path:
    """Export RUN/which (or a checkpoint dir) as a transformers folder; prints where it went and how to load it.

    Args:
        out: the folder to write
        adapter: LoRA runs: a PEFT adapter folder (with the base exported into OUT/base) instead of merged weights
        model_type: the transformers model_type to write where several compute the model (a Llama-shaped one
            without biases: llama, mistral or phi3); default: the one it was imported from, else the natural one
        push_to_hub: then upload the folder to this hub model repo (ORG/NAME; created if missing) with
            huggingface_hub (its token: HF_TOKEN or `hf auth login`)
        private: --push-to-hub: create the repo private
    """
    if push_to_hub is not None:
        hf.check_repo_id(push_to_hub, "--push-to-hub")  # (before anything is written)
    ckpt = resolve_checkpoint(Path(run), which)
    is_lora = (ckpt / ADAPTER_FILE).exists()
    if adapter and not is_lora:
        raise UserError(f"{ckpt} holds full weights, not a LoRA adapter: export it without --adapter")
    if adapter:
        written = hf.export_adapter(ckpt, out, force=force, base=base, model_type=model_type)
        how = (f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(written / 'base')!r}), "
               f"{str(written)!r})")
    else:
        written = (_export_merged(ckpt, Path(out), force, base, model_type) if is_lora
                   else hf.export_checkpoint(ckpt, out, force=force, model_type=model_type))
        how = f"AutoModelForCausalLM.from_pretrained({str(written)!r})"
    print(f"exported {ckpt} to {written}: load it with {how}", file=sys.stderr)
    if push_to_hub is not None:
        url = hf.push_folder(written, push_to_hub, private=private)
        print(f"pushed {written} to the hub as {push_to_hub} ({url}): from_pretrained({push_to_hub!r}) loads it",
              file=sys.stderr)
    return written


def _export_merged(ckpt: Path, out: Path, force: bool, base: Path | None, model_type: str | None) -> Path:
    """A LoRA run, its adapter folded into the base (in a temporary run beside `out`), exported as full weights."""
    from .finetune import merge_lora

    check_out(out, "hf-model", force=force, inputs=[ckpt])  # before the merge's work
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merge-", dir=out.parent) as tmp:
        merged = merge_lora(ckpt, Path(tmp) / "run", base=base, force=True)
        return hf.export_checkpoint(merged, out, force=force, model_type=model_type)


def import_cli(hf_dir: Path, out: Path, *, tokenizer: Path | None = None, force: bool = False,
               revision: str | None = None) -> Path:
    """Import a transformers folder, or a hub model by name, as a scratchgpt run; prints what to do with it.

    Args:
        hf_dir: a folder written by transformers' save_pretrained, or a hub model name ORG/NAME (downloaded with
            huggingface_hub into its cache: only the files import reads; HF_TOKEN and HF_HUB_OFFLINE apply)
        out: the run directory to write
        tokenizer: tokenizer.json (or its folder) if it is not in HF_DIR
        revision: a hub name's branch, tag or commit (default: main)
    """
    name = None
    if hf.is_hub_name(hf_dir):
        name = str(hf_dir)
        hf_dir = hf.download_model(name, revision)
    elif revision is not None:
        raise UserError(f"--revision is for hub names (ORG/NAME); {hf_dir} is a folder")
    run = hf.import_hf(hf_dir, out, tokenizer=tokenizer, force=force, name=name)
    print(f"imported {name or hf_dir} as {run}: sample, chat, eval, serve and finetune take it; train --train.init_from "
          f"{run} continues pretraining on new data prepared with its tokenizer", file=sys.stderr)
    return run
