"""`scratchgpt finetune classify` and `scratchgpt predict`: text -> label with a head on a pretrained GPT.

The head (heads.GPTClassifier) reads the last real token's final hidden state (`--pooling last`)
or the mean over real tokens. Texts longer than the context keep their first block_size tokens;
how many were cut is reported. Labels are strings, sorted, stored in the run's config.json. The
best checkpoint is the one with the highest val macro-F1 (ties: lower val loss).
"""

from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import UserError
from ..checkpoint import TOKENIZER_FILE, Which, load_run
from ..data.readers import read_labelled, read_texts
from ..heads import GPTClassifier, classifier_logits, predict_proba
from ..metrics import classification_metrics, format_confusion
from ..prompts import encode_texts
from ..runtime import pick_device
from ..runs.guard import check_output_file, write_output_file
from ..utils import json_text
from .loop import (FinetuneOptions, checkpoint_saver, finetune_record, finish_run, fit, prepare_run,
                   recorded_command, resume_checkpoint, run_config, setup_trainable, stderr_log, train_part,
                   write_run_files)


@dataclass
class ClassifyOptions:
    """What `finetune classify` reads from the files and how it pools (flags --text-field etc.)."""

    text_field: str = "text"
    """Column (CSV/TSV) or key (JSONL) holding the text."""
    label_field: str = "label"
    """Column or key holding the label (any string)."""
    pooling: Literal["last", "mean"] = "last"
    """last: the last real token's hidden state (it has seen the whole text); mean: the average over real tokens."""


def train_classifier(model: nn.Module, train_ids: list[list[int]], train_y: list[int], val_ids: list[list[int]],
                     val_y: list[int], labels: list[str], o: FinetuneOptions, out: Path,
                     save: Callable[..., None] = lambda *a: None, device: torch.device | str = "cpu",
                     log: Callable[[str], None] = stderr_log, resume: Optional[Path] = None) -> dict:
    """Train a (possibly LoRA-wrapped or partly frozen) GPTClassifier; val metrics each evaluation.
    `resume`: an interrupted run's latest/ (its weights already in `model`), continued exactly."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(o.seed)
    y_train = torch.tensor(train_y)

    def batches(epoch: int) -> list:
        order = torch.randperm(len(train_ids), generator=gen).tolist()
        return [order[i:i + o.batch_size] for i in range(0, len(order), o.batch_size)]

    def loss_of(batch: list[int]) -> torch.Tensor:
        logits = classifier_logits(model, [train_ids[i] for i in batch], device)
        return F.cross_entropy(logits.float(), y_train[batch].to(device))

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        probs = predict_proba(model, val_ids, device, o.batch_size * 4)
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), torch.tensor(val_y)).item()
        pred = probs.argmax(-1).tolist()
        m = classification_metrics([labels[i] for i in val_y], [labels[i] for i in pred], labels)
        return {"val_loss": loss, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                "confusion_matrix": m["confusion_matrix"]}

    def better(ev: dict, best: Optional[dict]) -> bool:
        return best is None or (ev["macro_f1"], -ev["val_loss"]) > (best["macro_f1"], -best["val_loss"])

    def describe(step: int, ev: dict, train_loss: Optional[float]) -> str:
        return (f"step {step}: {train_part(train_loss)}val loss {ev['val_loss']:.4f}, accuracy {ev['accuracy']:.4f}, "
                f"macro-F1 {ev['macro_f1']:.4f}\n{format_confusion(ev['confusion_matrix'], labels)}")

    model.to(device)
    return fit(model, batches, loss_of, evaluate, better, save, o, out, describe, log,
               lambda batch: sum(len(train_ids[i]) for i in batch), generator=gen, resume=resume)


def finetune_classify(base: str | os.PathLike, train_file: str | os.PathLike, val_file: str | os.PathLike,
                      out: str | os.PathLike, *, force: bool = False, resume: bool = False, which: Which = "best",
                      options: Optional[FinetuneOptions] = None, task: Optional[ClassifyOptions] = None,
                      log: Callable[[str], None] = stderr_log, command: Optional[str] = None,
                      **task_fields: Any) -> dict:
    """`scratchgpt finetune classify`: returns the summary also written to out/result.json.

    `task` (or its fields as keywords: text_field=..., pooling=...) says what to read and how to pool.

    Args:
        base: base run (or checkpoint dir) to fine-tune
        train_file: training file (.csv, .tsv or .jsonl)
        val_file: validation file, same format
        out: new run directory
        resume: continue `out` after a Ctrl-C or SIGTERM, exactly (give the same command line it started with)
        log: where progress lines go (default: stderr)
        command: the command line, recorded in config.json
    """
    o = options or FinetuneOptions()
    t = replace(task or ClassifyOptions(), **task_fields)
    if t.pooling not in ("last", "mean"):
        raise UserError(f"--pooling must be 'last' or 'mean', not {t.pooling!r}")
    run = prepare_run(base, out, o, force, which, resume)
    tokenizer, out = run.base.tokenizer, run.out
    texts, y_train, w_train = read_labelled(train_file, t.text_field, t.label_field)
    val_texts, y_val, w_val = read_labelled(val_file, t.text_field, t.label_field)
    labels = sorted(set(y_train))
    if len(labels) < 2:
        raise UserError(f"{train_file}: needs at least 2 different labels, found {labels}")
    known = set(labels)
    for lab, where in zip(y_val, w_val):
        if lab not in known:
            raise UserError(f"{where}: label {lab!r} does not occur in the training file {train_file}")
    bs = run.gpt.cfg.block_size
    train_ids, cut_train = encode_texts(tokenizer, texts, w_train, bs, log)
    val_ids, cut_val = encode_texts(tokenizer, val_texts, w_val, bs, log)
    index = {lab: i for i, lab in enumerate(labels)}
    model = setup_trainable(GPTClassifier(run.gpt, len(labels), t.pooling), lora=o.lora_dict(),
                            freeze_except=o.freeze_except)
    config = run_config(run.base, finetune_record("classify", run.base.checkpoint, o, train_file, val_file,
                                                   truncated={"train": cut_train, "val": cut_val}),
                        recorded_command(out, command, resume))
    config["classifier"] = {"labels": labels, "pooling": t.pooling, "text_field": t.text_field,
                            "label_field": t.label_field}
    config.pop("chat_template", None)
    write_run_files(out, config, run.device)
    save = checkpoint_saver(out, model, o, config, run.base.checkpoint / TOKENIZER_FILE)
    majority = max(labels, key=y_val.count)
    result = train_classifier(model, train_ids, [index[y] for y in y_train], val_ids, [index[y] for y in y_val], labels,
                              o, out, save, run.device, log, resume=resume_checkpoint(out, model, o) if resume else None)
    result.update(labels=labels, majority_baseline=y_val.count(majority) / len(y_val), truncated=cut_train + cut_val)
    if result["best"] is not None:
        log(f"best: step {result['best']['step']}, accuracy {result['best']['accuracy']:.4f}, macro-F1 "
            f"{result['best']['macro_f1']:.4f} (majority baseline {result['majority_baseline']:.4f}); saved {out}/best")
    finish_run(out, result, log)
    return result


def predict(run: str | os.PathLike, input: str | os.PathLike, output: Optional[str | os.PathLike] = None, *,
            text_field: Optional[str] = None, which: Which = "best", base: Optional[str | os.PathLike] = None,
            batch_size: int = 64, device: str = "cpu", stdout=None) -> list[dict]:
    """`scratchgpt predict`: a label and per-label probabilities for every row of `input`.

    Output: JSONL (default; stdout without --output) or CSV (columns text, label, prob_<label>...).

    Args:
        run: a classification run (finetune classify)
        input: .csv, .tsv, .jsonl, or .txt (one text a line)
        output: .jsonl or .csv (default: JSONL to stdout)
        text_field: the text field of the input; default: the run's
        batch_size: texts per forward pass
        stdout: where JSONL goes without `output` (default: sys.stdout)
    """
    if output is not None:
        check_output_file(output, inputs=[Path(input)])  # before the work (written under the same rules below)
    dev = pick_device(device)
    loaded = load_run(run, which, base=base, device=dev)
    if not loaded.is_classifier:
        raise UserError(f"{run} is not a classification run (make one with `scratchgpt finetune classify`)")
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    labels = config["classifier"]["labels"]
    texts, wheres = read_texts(input, text_field or config["classifier"].get("text_field", "text"))
    ids, _ = encode_texts(tokenizer, texts, wheres, loaded.gpt.cfg.block_size, stderr_log)
    probs = predict_proba(model, ids, dev, batch_size)
    rows = [{"text": t, "label": labels[int(p.argmax())], "probs": {lab: round(float(v), 6) for lab, v in zip(labels, p)}}
            for t, p in zip(texts, probs)]
    if output is not None and Path(output).suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["text", "label", *(f"prob_{lab}" for lab in labels)])
        for r in rows:
            w.writerow([r["text"], r["label"], *(r["probs"][lab] for lab in labels)])
        text = buf.getvalue()
    else:
        text = "".join(json_text(r) + "\n" for r in rows)
    if output is None:
        (stdout or sys.stdout).write(text)
    else:
        write_output_file(output, text.encode("utf-8"), inputs=[Path(input)])
        stderr_log(f"wrote {len(rows)} predictions to {output}")
    return rows
