"""The run kind: one vocabulary, read from the run's config.json, for info, report, serve and export.

    lm          a language model (pretrained, imported, or trained on from another run)
    sft         a chat model fine-tuned on conversations (finetune sft): its config holds the chat template
    classifier  a sequence classifier (finetune classify): its config holds the labels

A LoRA run is any of these with its adapter beside the base (`is_lora`).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

RunKind = Literal["lm", "sft", "classifier"]
# what the report calls each kind (its headline reads "(pretraining, stopped by max_iters)")
REPORT_WORDS: dict[str, str] = {"lm": "pretraining", "sft": "sft", "classifier": "classifier"}


def run_kind(config: Mapping[str, Any]) -> RunKind:
    if config.get("classifier"):
        return "classifier"
    finetune = config.get("finetune")
    if config.get("chat_template") or (isinstance(finetune, Mapping) and finetune.get("task") == "sft"):
        return "sft"
    return "lm"

