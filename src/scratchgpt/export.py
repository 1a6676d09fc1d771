"""`scratchgpt export` and `scratchgpt import-hf`: runs leave and enter through the Hugging Face format.

    scratchgpt export RUN --out DIR          a folder stock transformers loads (AutoModelForCausalLM,
                                             AutoTokenizer), with a model card; hf/ has the mapping
    scratchgpt export RUN --format gguf --out FILE.gguf [--outtype f32|f16|q8_0]
                                             one file llama.cpp, Ollama and LM Studio run (hf/gguf_out.py)
    scratchgpt import-hf DIR --out RUN       a GPT-2 / OPT / GPT-NeoX / Llama / Arcee / Qwen2 / Qwen3 /
                                             Mistral / Gemma / Phi-3 folder saved by transformers, as a
                                             scratchgpt run every command takes
    scratchgpt import-hf FILE.gguf --out RUN a GGUF file (llama, qwen2, qwen3, gpt2, gptneox; quantized
                                             ones dequantized to fp32: hf/gguf_in.py)

A LoRA run exports merged (its adapter folded into the base weights) or, with `--adapter`, as
a PEFT adapter folder beside its exported base.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Literal

from . import UserError
from . import hf
from .checkpoint import ADAPTER_FILE, Which, resolve_checkpoint
from .runs.guard import check_out
from .utils import read_json

ExportFormat = Literal["hf", "gguf"]
GGUFOutType = Literal["f32", "f16", "q8_0"]


def export_cli(run: Path, out: Path, *, which: Which = "best", adapter: bool = False, base: Path | None = None,
               model_type: str | None = None, format: ExportFormat = "hf", outtype: GGUFOutType = "f32",
               force: bool = False, push_to_hub: str | None = None, private: bool = False) -> Path:
    """Export RUN/which (or a checkpoint dir) as a transformers folder or a GGUF file; prints where it went and
    how to load it.

    Args:
        out: the folder to write (--format gguf: the .gguf file)
        format: hf (a transformers folder) or gguf (one file for llama.cpp, Ollama, LM Studio)
        outtype: --format gguf: f32, f16 or q8_0 weights (norms and biases stay f32)
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
    if format == "gguf":
        if adapter or push_to_hub is not None:
            raise UserError("--adapter and --push-to-hub are for transformers folders: a GGUF export is one file of "
                            "merged weights (leave them out)")
        written = _export_merged(ckpt, Path(out), force, base, model_type, _gguf(outtype)) if is_lora \
            else hf.export_gguf(ckpt, out, outtype=outtype, force=force)
        print(f"exported {ckpt} to {written} ({outtype}): run it with llama-cli -m {written}, or in Ollama with a "
              f"Modelfile holding FROM {written}", file=sys.stderr)
        return written
    if adapter and not is_lora:
        raise UserError(f"{ckpt} holds full weights, not a LoRA adapter: export it without --adapter")
    if adapter:
        written = hf.export_adapter(ckpt, out, force=force, base=base, model_type=model_type)
        how = (f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(written / 'base')!r}), "
               f"{str(written)!r})")
    else:
        written = (_export_merged(ckpt, Path(out), force, base, model_type) if is_lora
                   else hf.export_checkpoint(ckpt, out, force=force, model_type=model_type))
        arch = (read_json(written / "config.json").get("architectures") or ["?"])[0]
        auto = "AutoModelForSequenceClassification" if arch.endswith("ForSequenceClassification") else \
            "AutoModelForCausalLM"
        how = f"{auto}.from_pretrained({str(written)!r}) (a {arch})"
    print(f"exported {ckpt} to {written}: load it with {how}", file=sys.stderr)
    if push_to_hub is not None:
        url = hf.push_folder(written, push_to_hub, private=private)
        print(f"pushed {written} to the hub as {push_to_hub} ({url}): from_pretrained({push_to_hub!r}) loads it",
              file=sys.stderr)
    return written


def _gguf(outtype: str):
    def export(ckpt: Path, out: Path, *, force: bool, model_type: str | None) -> Path:
        return hf.export_gguf(ckpt, out, outtype=outtype, force=force)
    return export


def _export_merged(ckpt: Path, out: Path, force: bool, base: Path | None, model_type: str | None,
                   export=hf.export_checkpoint) -> Path:
    """A LoRA run, its adapter folded into the base (in a temporary run beside `out`), exported as full weights
    by `export` (a transformers folder, or a GGUF file)."""
    from .finetune import merge_lora

    if export is hf.export_checkpoint:  # (a GGUF file is checked by export_gguf, before any work of its own)
        check_out(out, "hf-model", force=force, inputs=[ckpt])  # before the merge's work
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merge-", dir=out.parent) as tmp:
        merged = merge_lora(ckpt, Path(tmp) / "run", base=base, force=True)
        return export(merged, out, force=force, model_type=model_type)


def import_cli(hf_dir: Path, out: Path, *, tokenizer: Path | None = None, force: bool = False,
               revision: str | None = None) -> Path:
    """Import a transformers folder, a hub model by name, or a GGUF file as a scratchgpt run; prints what to do
    with it.

    Args:
        hf_dir: a folder written by transformers' save_pretrained, a hub model name ORG/NAME (downloaded with
            huggingface_hub into its cache: only the files import reads; HF_TOKEN and HF_HUB_OFFLINE apply), or a
            .gguf file (llama.cpp's format, dequantized to fp32)
        out: the run directory to write
        tokenizer: tokenizer.json (or its folder) if it is not in HF_DIR (a GGUF file holds its own)
        revision: a hub name's branch, tag or commit (default: main)
    """
    name = None
    if hf.is_gguf(hf_dir):
        if tokenizer is not None or revision is not None:
            raise UserError(f"{hf_dir} is a GGUF file, which holds its own tokenizer: leave out --tokenizer and "
                            "--revision")
        run = hf.import_gguf(hf_dir, out, force=force)
    else:
        if hf.is_hub_name(hf_dir):
            name = str(hf_dir)
            hf_dir = hf.download_model(name, revision)
        elif revision is not None:
            raise UserError(f"--revision is for hub names (ORG/NAME); {hf_dir} is a folder")
        run = hf.import_hf(hf_dir, out, tokenizer=tokenizer, force=force, name=name)
    print(f"imported {name or hf_dir} as {run}: sample, chat, eval, serve and finetune take it; train --train.init_from "
          f"{run} continues pretraining on new data prepared with its tokenizer", file=sys.stderr)
    return run
