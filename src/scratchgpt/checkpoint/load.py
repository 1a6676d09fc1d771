"""The one loader: any run directory (or checkpoint directory) -> a ready model.

Every command that takes a RUN loads it here: `sample`, `chat`, `serve`, `eval`, `predict`,
`info`, `finetune` (its base) and `merge-lora`. What a checkpoint holds decides what comes back:

    model.safetensors                         a GPT (pretrained, SFT, merged)
    + head.safetensors, config "classifier"    a GPTClassifier around it
    adapter_model.safetensors (LoRA)           the base run it names, loaded the same way, with the
                                               adapter applied by PEFT (and folded in unless merge=False)

Every file is checked against the sha256 in state.json first. A command that cannot use a
kind of run says so in one line (`LoadedRun.language_model`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .. import UserError
from ..model import GPT, ModelConfig, gpt_of
from ..runs.kind import RunKind, run_kind
from ..runtime import release_freed_memory
from ..tokenizer import Tokenizer
from ..utils import read_json
from .store import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, CONFIG_FILE, HEAD_FILE, MODEL_FILE, TOKENIZER_FILE,
                    load_model_tensors, load_tensors, resolve_checkpoint, weights_sha256)
from .verify import verify_checkpoint


@dataclass
class LoadedRun:
    """A loaded checkpoint: the model (in eval mode), its tokenizer and its config.json."""

    model: nn.Module  # a GPT, or a GPTClassifier; a LoRA run's adapter is applied
    tokenizer: Tokenizer
    config: dict
    checkpoint: Path

    @property
    def gpt(self) -> GPT:
        """The language model inside (a classifier's backbone)."""
        return gpt_of(self.model)

    @property
    def kind(self) -> RunKind:
        """lm, sft or classifier (runs/kind.py: the one vocabulary of info, report, serve and export)."""
        return run_kind(self.config)

    @property
    def is_classifier(self) -> bool:
        return self.kind == "classifier"

    @property
    def is_lora(self) -> bool:
        return (self.checkpoint / ADAPTER_FILE).exists()

    def language_model(self, command: str) -> GPT:
        """The GPT, for a command that generates or scores text; a one-line refusal where it can't."""
        if self.is_classifier:
            raise UserError(f"{self.checkpoint} is a classification run: `{command}` needs a language model; use "
                            "`scratchgpt predict` or `scratchgpt eval --task classify` with it")
        if not self.gpt.cfg.causal:
            raise UserError(f"{self.checkpoint} is a bidirectional (model.causal=false, mlm) model: `{command}` needs "
                            "a causal model that predicts the next token")
        return self.gpt


def load_run(run: str | Path, which: str = "best", *, device: str | torch.device = "cpu",
             base: Optional[str | Path] = None, merge: bool = True, verify: bool = True) -> LoadedRun:
    """Load RUN/which (falling back to latest) or a checkpoint directory, whatever kind of run it is.

    `base` overrides the base run a LoRA adapter records (when it moved). merge=True folds a LoRA
    adapter into the weights (faster, and what quantization needs); merge=False keeps PEFT's wrapper.
    """
    ckpt = resolve_checkpoint(Path(run), which)
    if not verify:
        return _released(_load(ckpt, device, base, merge))
    # the sha256 of every file (~0.5 s for 540 MB) runs beside the loading (hashlib lets go of the GIL), which
    # reads the same files: a fresh `sample` starts sooner. A damaged file still decides the error: its
    # mismatch is raised first, whether the load failed or not.
    pool = ThreadPoolExecutor(1, thread_name_prefix="verify")
    check = pool.submit(verify_checkpoint, ckpt)
    pool.shutdown(wait=False)
    try:
        loaded = _load(ckpt, device, base, merge)
    except BaseException:
        check.result()
        raise
    check.result()
    return _released(loaded)


def _released(loaded: LoadedRun) -> LoadedRun:
    # what the load freed goes back to the OS before the weights' pages are faulted in by a first forward: the
    # peak a fresh `sample` or `serve` reaches is then the model, not the model plus the load's garbage
    release_freed_memory()
    return loaded


def _load(ckpt: Path, device: str | torch.device, base: Optional[str | Path], merge: bool) -> LoadedRun:
    config = checkpoint_config(ckpt / CONFIG_FILE)
    lora = (ckpt / ADAPTER_FILE).exists()
    if lora:
        gpt = _base_for_adapter(ckpt, config.get("finetune") or {}, base)
    else:
        try:
            cfg = ModelConfig(**config["model"])
        except TypeError as e:  # an unknown or missing key (bad values are ConfigErrors, one line already)
            raise UserError(f"{ckpt / CONFIG_FILE}: its model section does not describe a model ({e})") from None
        gpt = gpt_from_file(cfg, ckpt / MODEL_FILE)
    model: nn.Module = gpt
    if "classifier" in config:
        from ..heads import GPTClassifier

        cls = config["classifier"]
        model = GPTClassifier(gpt, len(cls["labels"]), cls.get("pooling", "last"))
        try:
            model.head.load_state_dict(load_tensors(ckpt / HEAD_FILE))
        except RuntimeError as e:
            raise UserError(f"{ckpt / HEAD_FILE}: does not match the config ({str(e).splitlines()[0][:200]})") from None
    if lora:
        from ..lora import load_adapter

        model = load_adapter(model, read_json(ckpt / ADAPTER_CONFIG_FILE), load_tensors(ckpt / ADAPTER_FILE),
                             str(ckpt / ADAPTER_FILE))
        if merge:
            model = model.merge_and_unload()
    model.to(device).eval()
    tokenizer = Tokenizer.load(ckpt / TOKENIZER_FILE)
    check_vocabulary(tokenizer, gpt_of(model).cfg, config, ckpt / TOKENIZER_FILE)
    return LoadedRun(model, tokenizer, config, ckpt)


def check_vocabulary(tokenizer: Tokenizer, cfg: ModelConfig, config: dict, where: Path) -> None:
    """The tokenizer is the model's: of the kind the run recorded, no id past the embeddings, and, for a run
    trained here from scratch (whose vocab_size was the data's), exactly as many tokens as the model has
    (mlm: plus its [MASK]). Imported models and runs started from them may have spare embedding rows."""
    kind = config.get("tokenizer")
    if isinstance(kind, str) and kind != tokenizer.kind:
        raise UserError(f"{where}: a {tokenizer.kind} tokenizer, but the run was trained with a {kind} one "
                        "(a tokenizer.json from another run?)")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{where}: {tokenizer.vocab_size} tokens, but the model has only {cfg.vocab_size} "
                        "embeddings (a tokenizer.json from another run?)")
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    if config.get("data") and not train.get("init_from") and "imported_from" not in config:
        want = tokenizer.vocab_size + (train.get("objective") == "mlm")
        if cfg.vocab_size != want:
            raise UserError(f"{where}: {tokenizer.vocab_size} tokens, but the model was trained on "
                            f"{cfg.vocab_size - (want - tokenizer.vocab_size)} (a tokenizer.json from another run?)")


def gpt_from_file(cfg: ModelConfig, path: Path) -> GPT:
    """The GPT of a model.safetensors, its weights held once (GPT.with_weights); a mismatch is one line."""
    try:
        gpt, missing, unexpected = GPT.with_weights(cfg, load_tensors(path))
    except RuntimeError as e:  # a tensor of the wrong shape
        raise UserError(f"{path}: does not match the config ({str(e).splitlines()[-1].strip()[:200]})") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return gpt


def checkpoint_config(path: Path) -> dict:
    """A checkpoint's config.json, with the sections a load reads checked for their shape (its sha256 list may
    have been fixed up by hand after an edit)."""
    try:
        config = read_json(path)
    except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError)
        raise UserError(f"{path}: not JSON ({str(e)[:80]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"{path}: not a run's config (it needs a \"model\" object)")
    for key in ("finetune", "classifier", "train"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise UserError(f"{path}: its {key} section must be an object, got {str(config[key])[:40]}")
    labels = (config.get("classifier") or {}).get("labels", [])
    if not isinstance(labels, list) or ("classifier" in config and not labels):
        raise UserError(f"{path}: classifier.labels must be a list of labels")
    return config


def _base_for_adapter(ckpt: Path, finetune: dict, base: Optional[str | Path]) -> GPT:
    """The base GPT an adapter was trained on; a different base (by sha256 of its weights) is an error."""
    recorded = finetune.get("base")
    if base is None and not recorded:
        raise UserError(f"{ckpt}: LoRA run without a recorded base; pass --base")
    base_path = Path(base) if base is not None else Path(recorded)
    if base is None and not base_path.exists():
        raise UserError(f"{ckpt}: its base {base_path} is gone; pass --base with a copy of it")
    base_run = load_run(base_path)
    want, got = finetune.get("base_sha256"), weights_sha256(base_run.checkpoint)
    if want and want != got:
        raise UserError(f"{ckpt}: this adapter was trained on a different base ({recorded}, weights sha256 "
                        f"{want[:12]}...); {base_run.checkpoint} has {got[:12]}...")
    gpt = base_run.gpt
    gpt.train()
    return gpt
