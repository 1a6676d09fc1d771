"""Fine-tuning a trained run: classification, supervised fine-tuning (SFT), LoRA, and MLM masking.

    scratchgpt finetune classify RUN --train FILE --val FILE --out RUN2 [--lora | --freeze-except N]
    scratchgpt finetune sft RUN --train FILE --val FILE --out RUN2 [--lora] [--pack] [--no-mask-prompt]
    scratchgpt predict RUN2 --input FILE [--output FILE]
    scratchgpt merge-lora RUN2 --out RUN3

Data files are CSV/TSV (header row) or JSONL (one object a line), chosen by extension.

Classification: a linear head on one pooled hidden state of the base GPT. `last` pooling
(default) takes the final hidden state of the last real token, which under causal attention
has seen the whole text; `mean` averages the hidden states of the real tokens. Batches are
right-padded: with causal attention no real token sees padding, so padding changes nothing.
A bidirectional (MLM) base would see padding, so its batches are split into rows of equal
length instead. Texts longer than the context keep their first block_size tokens; how many
were cut is reported. Labels are strings, sorted, stored in the run's config.json.
The best checkpoint is the one with the highest val macro-F1 (ties: lower val loss).

SFT: each example becomes chat-template text (default, for tokenizers with <|endoftext|>):

    ### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}<|endoftext|>

(char tokenizers have no EOT token, so the response ends with "\\n### End\\n" instead).
The template is stored as `chat_template` in the checkpoint's config.json, in the format
`generate.ChatTemplate` reads, so `scratchgpt chat` formats turns exactly as in training.
Loss is on response tokens only (prompt labels are -100) unless --no-mask-prompt. Examples
longer than the context keep their first block_size + 1 tokens (counted and reported); an
example whose prompt alone fills the context is an error. --pack puts several whole examples
in one row (no attention reset between them, as in GPT-style packing); otherwise one example
a row, right-padded. The best checkpoint has the lowest val loss.

Training modes: the whole model (default); --freeze-except N (only the last N blocks, the
final norm and the head train; 0 = a linear probe); --lora (PEFT LoRA on every c_attn,
c_proj and c_fc; base weights frozen; a classifier's new head trains too).

Run layout (RUN2/best and RUN2/latest are checkpoint directories; no optimizer state: a
fine-tune is short and is rerun rather than resumed):

    model.safetensors                   full weights (not with --lora), the base GPT's key names
    head.safetensors                    classifier head (classify only)
    adapter_model.safetensors           LoRA tensors only (--lora), PEFT key names
    adapter_config.json                 PEFT LoraConfig fields (--lora)
    config.json                         base config + "finetune" (+ "classifier" | "chat_template")
    tokenizer.json, state.json          as for pretraining (state.json holds sha256 of every file)

A LoRA run records its base checkpoint's path and model.safetensors sha256; loading it on a
different base is an error. `merge-lora` folds the adapter in and writes a full checkpoint,
which `sample`/`chat` (they load model.safetensors) can use.

MLM: `mlm_mask_batch` masks batches for `train.objective: mlm` (see its docstring).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import UserError
from .model import GPT, ModelConfig
from .utils import atomic_write_json, read_json, sha256_file

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
HEAD_FILE = "head.safetensors"
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # every nn.Linear in a block (c_proj matches attn and mlp)
IGNORE = -100
MLM_PROB, MLM_MASK_FRAC, MLM_RANDOM_FRAC = 0.15, 0.8, 0.1


# ---------------------------------------------------------------------------------------
# Masked-LM objective


def mlm_mask_batch(x: torch.Tensor, vocab_size: int, meta: Optional[dict], step: int, micro: int, rank: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a batch of token ids: returns (inputs, labels).

    15% of positions are chosen (at least one per row); of those 80% become the mask token,
    10% a random token, 10% stay. Labels are the original ids there and -100 elsewhere.
    The mask token is one extra id past the tokenizer's: `vocab_size` is the model's
    vocabulary (tokenizer + 1), so the mask id is `vocab_size - 1` and random replacements
    are real tokens only. The choice is a pure function of (seed, step, micro, rank), so a
    resumed run masks exactly as the uninterrupted one.
    """
    mask_id = vocab_size - 1
    if meta is not None and int(meta["vocab_size"]) != mask_id:
        raise ValueError(f"mlm: the model needs vocab_size {int(meta['vocab_size']) + 1} (tokenizer + [MASK]), "
                         f"got {vocab_size}")
    rng = np.random.default_rng([int(seed), int(step), int(micro), int(rank), 0x4D4C4D])
    ids = x.numpy() if x.device.type == "cpu" else x.cpu().numpy()
    B, T = ids.shape
    u = rng.random((B, T))
    chosen = u < MLM_PROB
    empty = ~chosen.any(axis=1)  # a row with no target would contribute nothing (and NaN alone)
    chosen[np.flatnonzero(empty), u[empty].argmin(axis=1)] = True
    r = rng.random((B, T))
    random_ids = rng.integers(0, mask_id, size=(B, T))
    inputs = ids.copy()
    inputs[chosen & (r < MLM_MASK_FRAC)] = mask_id
    swap = chosen & (r >= MLM_MASK_FRAC) & (r < MLM_MASK_FRAC + MLM_RANDOM_FRAC)
    inputs[swap] = random_ids[swap]
    labels = np.where(chosen, ids, IGNORE)
    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------
# Reading labelled files


def read_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, row) for each record of a .csv/.tsv (header row) or .jsonl/.ndjson file.

    Errors name the file and line: a ragged CSV row, a non-JSON line, a line that is not a
    JSON object. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            rows.append((i, obj))
        return rows
    if suffix in (".csv", ".tsv"):
        reader = csv.reader(io.StringIO(raw, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        rows, header, start = [], None, 1
        try:
            for record in reader:
                line, start = start, reader.line_num + 1  # a quoted field may span lines: report the first
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                if header is None:
                    header = [h.strip() for h in record]
                    dup = sorted({h for h in header if header.count(h) > 1})
                    if dup:
                        raise UserError(f"{path}:{line}: duplicate column name(s) {', '.join(map(repr, dup))}")
                    continue
                if len(record) != len(header):
                    raise UserError(f"{path}:{line}: row has {len(record)} fields, the header has {len(header)}")
                rows.append((line, dict(zip(header, record))))
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        if header is None:
            raise UserError(f"{path}: empty file (expected a header row)")
        return rows
    raise UserError(f"{path}: unknown format {suffix or '(no extension)'!r}; use .csv, .tsv or .jsonl")


def _field(path: Path, line: int, row: dict, name: str) -> Any:
    if name not in row:
        raise UserError(f"{path}:{line}: no field {name!r} (fields: {', '.join(map(repr, row))})")
    return row[name]


def _check_columns(path: Path, rows: list[tuple[int, dict]], names: Sequence[str]) -> None:
    """A CSV's missing column is one error naming the file, not one per row."""
    if path.suffix.lower() in (".csv", ".tsv") and rows:
        have = list(rows[0][1])
        for name in names:
            if name not in have:
                raise UserError(f"{path}: no column {name!r} (columns: {', '.join(map(repr, have))})")


def read_texts(path: str | os.PathLike, text_field: str) -> tuple[list[str], list[str]]:
    """(texts, where) from a CSV/JSONL file, or every non-blank line of a .txt file."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read ({e})") from None
        pairs = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
        return [t for _, t in pairs], [f"{path}:{i}" for i, _ in pairs]
    rows = read_rows(path)
    _check_columns(path, rows, [text_field])
    texts, wheres = [], []
    for line, row in rows:
        text = _field(path, line, row, text_field)
        if not isinstance(text, str):
            raise UserError(f"{path}:{line}: field {text_field!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise UserError(f"{path}:{line}: empty text in field {text_field!r}")
        texts.append(text)
        wheres.append(f"{path}:{line}")
    if not texts:
        raise UserError(f"{path}: no rows")
    return texts, wheres


def read_labelled(path: str | os.PathLike, text_field: str = "text",
                  label_field: str = "label") -> tuple[list[str], list[str], list[str]]:
    """(texts, labels, where) from a CSV/JSONL file. Labels become strings; an empty one is an error."""
    path = Path(path)
    rows = read_rows(path)
    _check_columns(path, rows, [text_field, label_field])
    texts, wheres = read_texts(path, text_field)
    labels = []
    for line, row in rows:
        label = _field(path, line, row, label_field)
        if isinstance(label, (dict, list)):
            raise UserError(f"{path}:{line}: label must be a string or number, got {type(label).__name__}")
        label = "" if label is None else str(label).strip()
        if not label:
            raise UserError(f"{path}:{line}: empty label in field {label_field!r}")
        labels.append(label)
    return texts, labels, wheres


@dataclass
class SFTExample:
    """One conversation: (role, content) turns; system first if any, then user/assistant alternating."""

    turns: list[tuple[str, str]]
    where: str

    @property
    def context(self) -> list[tuple[str, str]]:
        """Every turn before the final assistant reply: what a model is prompted with."""
        return self.turns[:-1]

    @property
    def reference(self) -> str:
        return self.turns[-1][1]


def read_sft(path: str | os.PathLike) -> list[SFTExample]:
    """{"prompt", "response"} rows (JSONL or CSV), or JSONL {"messages": [{"role", "content"}, ...]}."""
    path = Path(path)
    rows = read_rows(path)
    out = []
    for line, row in rows:
        where = f"{path}:{line}"
        if "messages" in row:
            turns = _messages(row["messages"], where)
        elif "prompt" in row and "response" in row:
            p, r = row["prompt"], row["response"]
            if not isinstance(p, str) or not isinstance(r, str):
                raise UserError(f"{where}: \"prompt\" and \"response\" must be strings")
            if not r:
                raise UserError(f"{where}: empty response")
            turns = [("user", p), ("assistant", r)]
        else:
            raise UserError(f"{where}: expected \"prompt\" and \"response\" fields, or \"messages\" "
                            f"(fields: {', '.join(map(repr, row))})")
        out.append(SFTExample(turns, where))
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def _messages(msgs: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: \"messages\" must be a non-empty list")
    turns = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {k} needs string \"role\" and \"content\"")
        turns.append((m["role"], m["content"]))
    expect = "user"
    for k, (role, _) in enumerate(turns):
        if role == "system" and k == 0:
            continue
        if role not in ("user", "assistant", "system"):
            raise UserError(f"{where}: message {k} has unknown role {role!r} (system, user, assistant)")
        if role != expect:
            raise UserError(f"{where}: message {k} is {role!r}, expected {expect!r} "
                            "(system first if any, then user and assistant alternating)")
        expect = "assistant" if role == "user" else "user"
    if turns[-1][0] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's (the reply to learn)")
    return turns


# ---------------------------------------------------------------------------------------
# Metrics


def confusion_matrix(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """Rows: true label, columns: predicted label, both in `labels` order."""
    index = {lab: i for i, lab in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        m[index[t]][index[p]] += 1
    return m


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str],
                           labels: Optional[Sequence[str]] = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

    Macro-F1 averages over the classes that occur in y_true or y_pred (as scikit-learn does
    by default); a class never predicted has precision 0.
    """
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError("y_true and y_pred must be non-empty and of equal length")
    labels = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred))
    cm = confusion_matrix(y_true, y_pred, labels)
    per_class, f1s = {}, []
    present = set(y_true) | set(y_pred)
    for i, lab in enumerate(labels):
        tp = cm[i][i]
        fp = sum(cm[r][i] for r in range(len(labels))) - tp
        fn = sum(cm[i]) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": sum(cm[i])}
        if lab in present:
            f1s.append(f1)
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    return {"accuracy": correct / len(y_true), "macro_f1": sum(f1s) / len(f1s), "n": len(y_true),
            "labels": labels, "confusion_matrix": cm, "per_class": per_class}


def generation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenization, 4-grams) and exact match."""
    try:
        import sacrebleu
    except ImportError:
        raise UserError("BLEU/chrF need sacrebleu: pip install 'scratchgpt[finetune]'") from None
    hyps, refs = list(hypotheses), list(references)
    if len(hyps) != len(refs) or not hyps:
        raise ValueError("need equally many hypotheses and references, at least one")
    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
            "exact_match": sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / len(hyps), "n": len(hyps)}


def format_confusion(cm: list[list[int]], labels: Sequence[str]) -> str:
    """A small text table (rows true, columns predicted) for the training log."""
    names = [str(lab)[:12] for lab in labels]
    w = max(6, *(len(n) for n in names), *(len(str(v)) for row in cm for v in row))
    head = " " * (w + 2) + " ".join(n.rjust(w) for n in names) + "   <- predicted"
    rows = [f"{n.rjust(w)}: " + " ".join(str(v).rjust(w) for v in row) for n, row in zip(names, cm)]
    return "\n".join([head, *rows])


# ---------------------------------------------------------------------------------------
# Models


class GPTClassifier(nn.Module):
    """A GPT whose pooled final hidden state feeds a linear head: idx (B, T), lengths (B,) -> logits (B, K)."""

    def __init__(self, gpt: GPT, n_classes: int, pooling: str = "last"):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise UserError(f"pooling must be 'last' or 'mean', not {pooling!r}")
        self.gpt = gpt
        self.pooling = pooling
        self.head = nn.Linear(gpt.cfg.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=gpt.cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.gpt(idx, return_hidden=True)
        if self.pooling == "last":
            pooled = h[torch.arange(h.size(0), device=h.device), lengths - 1]
        else:
            real = (torch.arange(h.size(1), device=h.device)[None, :] < lengths[:, None]).to(h.dtype)
            pooled = (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        return self.head(pooled)


def _gpt_of(model: nn.Module) -> GPT:
    """The GPT inside a classifier and/or a PEFT wrapper."""
    for m in model.modules():
        if isinstance(m, GPT):
            return m
    raise TypeError("no GPT inside this model")


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def classifier_logits(model: nn.Module, seqs: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits (N, K) for token sequences of any lengths, right-padded (split by length for bidirectional bases)."""
    causal = _gpt_of(model).cfg.causal
    groups = [list(range(len(seqs)))] if causal else _by_length(seqs)
    out: list[Optional[torch.Tensor]] = [None] * len(seqs)
    for members in groups:
        idx = _pad([seqs[i] for i in members], 0).to(device)  # pad id is arbitrary: no real token attends to it
        lengths = torch.tensor([len(seqs[i]) for i in members], device=device)
        logits = model(idx, lengths)
        for k, i in enumerate(members):
            out[i] = logits[k]
    return torch.stack(out)  # type: ignore[arg-type]


def _by_length(seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(len(s), []).append(i)
    return list(groups.values())


def encode_strict(tokenizer: Tokenizer, text: str) -> list[int]:
    """tokenizer.encode, but characters a char vocabulary lacks are an error even if it has <unk>.

    Fine-tuning text mapped silently to <unk> would teach the model nothing about it (and a
    label decided by unknown characters is unlearnable), so the characters are named instead.
    """
    if tokenizer.kind == "char" and tokenizer.unk_id is not None and tokenizer.count_unknown(text):
        missing = sorted(c for c in set(text) if tokenizer.token_to_id(c) is None)
        shown = ", ".join(repr(c) for c in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise UserError(f"{len(missing)} character(s) not in the char tokenizer's vocabulary: {shown}")
    return tokenizer.encode(text)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], wheres: Sequence[str], max_len: int,
                 note: Callable[[str], None] = print) -> tuple[list[list[int]], int]:
    """Token ids per text, cut to the first `max_len`; returns (ids, number cut). Errors name the row."""
    ids, cut = [], 0
    for text, where in zip(texts, wheres):
        try:
            t = encode_strict(tokenizer, text)
        except UserError as e:
            raise UserError(f"{where}: {e} (the base run's tokenizer cannot encode this file)") from None
        if not t:
            raise UserError(f"{where}: the text encodes to no tokens")
        if len(t) > max_len:
            t, cut = t[:max_len], cut + 1
        ids.append(t)
    if cut:
        note(f"note: {cut} of {len(texts)} texts in {Path(wheres[0].rsplit(':', 1)[0])} are longer than the context "
             f"of {max_len} tokens; kept their first {max_len} tokens")
    return ids, cut


# ---------------------------------------------------------------------------------------
# LoRA (PEFT)


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'scratchgpt[finetune]'") from None
    return peft


def lora_config_dict(r: int, alpha: float, dropout: float) -> dict:
    """The adapter_config.json content: PEFT LoraConfig fields (loadable by peft.LoraConfig(**d))."""
    if r < 1:
        raise UserError(f"--lora-r must be at least 1, not {r}")
    return {"peft_type": "LORA", "r": int(r), "lora_alpha": float(alpha), "lora_dropout": float(dropout),
            "target_modules": list(LORA_TARGETS), "bias": "none"}


def add_lora(model: nn.Module, adapter_config: dict) -> nn.Module:
    """Wrap `model` with PEFT LoRA on its c_attn/c_proj/c_fc Linears; everything else is frozen.

    A classifier's head is new, so it is unfrozen again (saved in head.safetensors, not the adapter).
    """
    peft = _peft()
    kwargs = {k: v for k, v in adapter_config.items() if k != "peft_type"}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        head.requires_grad_(True)
    return wrapped


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    peft = _peft()
    return {k: v.detach().contiguous().cpu() for k, v in peft.get_peft_model_state_dict(model).items()}


def load_adapter(model: nn.Module, adapter_config: dict, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """LoRA-wrap `model` and load saved adapter tensors into it; a mismatch names `where`."""
    peft = _peft()
    wrapped = add_lora(model, adapter_config)
    try:
        result = peft.set_peft_model_state_dict(wrapped, tensors)
    except RuntimeError as e:  # shape mismatch: a base of another size
        raise UserError(f"{where}: adapter does not fit this base model ({str(e).splitlines()[0][:200]})") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UserError(f"{where}: adapter does not fit this base model (unexpected {unexpected[:3]})")
    return wrapped


def setup_trainable(model: nn.Module, *, lora: Optional[dict] = None, freeze_except: Optional[int] = None) -> nn.Module:
    """Apply a training mode: LoRA (returns the PEFT wrapper), freeze all but the last N blocks, or full."""
    if lora is not None and freeze_except is not None:
        raise UserError("--lora and --freeze-except are alternatives: give one")
    if lora is not None:
        return add_lora(model, lora)
    if freeze_except is not None:
        gpt = _gpt_of(model)
        n_layer = len(gpt.transformer.h)
        if not 0 <= freeze_except <= n_layer:
            raise UserError(f"--freeze-except must be between 0 and the model's {n_layer} blocks, not {freeze_except}")
        model.requires_grad_(False)
        for block in list(gpt.transformer.h)[n_layer - freeze_except:]:
            block.requires_grad_(True)
        if freeze_except:
            gpt.transformer.ln_f.requires_grad_(True)
        head = getattr(model, "head", None)
        if head is not None:
            head.requires_grad_(True)
        elif freeze_except:  # an LM's head is its output layer (tied to wte: then that trains too)
            gpt.lm_head.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------
# Checkpoints of fine-tuned runs


def _write_checkpoint(run_dir: Path, name: str, tensor_files: dict[str, dict[str, torch.Tensor]], json_files: dict,
                      tokenizer_file: Path, state: dict) -> Path:
    """RUN/name as a verifiable checkpoint (sha256 of every file in state.json), swapped in atomically."""
    from safetensors.torch import save_file

    from .checkpoint import FORMAT_VERSION, STATE_FILE, TOKENIZER_FILE, _swap_dir

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=run_dir))
    try:
        for fname, tensors in tensor_files.items():
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            with open(tmp / fname, "rb+") as f:
                os.fsync(f.fileno())
        for fname, obj in json_files.items():
            atomic_write_json(tmp / fname, obj)
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        names = [*tensor_files, *json_files, TOKENIZER_FILE]
        full = dict(state, format_version=FORMAT_VERSION, optimizer=None,
                    sha256={n: sha256_file(tmp / n) for n in names})
        atomic_write_json(tmp / STATE_FILE, full)
        _swap_dir(tmp, run_dir / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / name


def resolve_run_checkpoint(run: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint dir holding full weights or an adapter: `run` itself, or run/which, falling back to latest."""
    from .checkpoint import MODEL_FILE

    run = Path(run)
    if not run.exists():
        raise UserError(f"{run}: no such run directory")
    has = lambda d: (d / MODEL_FILE).exists() or (d / ADAPTER_FILE).exists()  # noqa: E731
    if has(run):
        return run
    for name in [which, "latest"] if which != "latest" else ["latest"]:
        if has(run / name):
            return run / name
    raise UserError(f"{run}: no checkpoint found (expected {run}/{which}/{MODEL_FILE} or {ADAPTER_FILE})")


def load_base(run: str | os.PathLike, which: str = "best") -> tuple[GPT, "Tokenizer", dict, Path]:
    """A pretrained (or merged) full checkpoint: (GPT in train mode, tokenizer, config, checkpoint dir)."""
    from .checkpoint import MODEL_FILE, load_model

    ckpt = resolve_run_checkpoint(run, which)
    if not (ckpt / MODEL_FILE).exists():
        raise UserError(f"{ckpt} holds a LoRA adapter, not full weights: merge it first (scratchgpt merge-lora)")
    model, tokenizer, config = load_model(ckpt)
    model.train()
    return model, tokenizer, config, ckpt


def load_finetuned(run: str | os.PathLike, which: str = "best", *, base: Optional[str | os.PathLike] = None,
                   device: str | torch.device = "cpu", merge: bool = True) -> tuple[nn.Module, "Tokenizer", dict]:
    """Load any run for inference: a base/SFT GPT, or a GPTClassifier; LoRA runs are put on their base.

    merge=True folds a LoRA adapter into the weights (faster); merge=False keeps the PEFT wrapper.
    Returns (model in eval mode, tokenizer, config).
    """
    from .checkpoint import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, load_model_tensors, load_tensors, verify_checkpoint
    from .tokenizer import Tokenizer

    ckpt = resolve_run_checkpoint(run, which)
    verify_checkpoint(ckpt)
    config = read_json(ckpt / CONFIG_FILE)
    ft = config.get("finetune") or {}
    if (ckpt / ADAPTER_FILE).exists():
        gpt = _base_for_adapter(ckpt, ft, base)
    else:
        gpt = GPT(ModelConfig(**config["model"]))
        load_model_tensors(gpt, load_tensors(ckpt / MODEL_FILE))
    model: nn.Module = gpt
    if "classifier" in config:
        cls = config["classifier"]
        model = GPTClassifier(gpt, len(cls["labels"]), cls.get("pooling", "last"))
        head = load_tensors(ckpt / HEAD_FILE)
        try:
            model.head.load_state_dict(head)
        except RuntimeError as e:
            raise UserError(f"{ckpt / HEAD_FILE}: does not match the config ({str(e).splitlines()[0][:200]})") from None
    if (ckpt / ADAPTER_FILE).exists():
        model = load_adapter(model, read_json(ckpt / ADAPTER_CONFIG_FILE), load_tensors(ckpt / ADAPTER_FILE), str(ckpt))
        if merge:
            model = model.merge_and_unload()
    model.to(device).eval()
    return model, Tokenizer.load(ckpt / TOKENIZER_FILE), config


def _base_for_adapter(ckpt: Path, ft: dict, base: Optional[str | os.PathLike]) -> GPT:
    """The base GPT an adapter was trained on; a different base (by sha256 of its weights) is an error."""
    from .checkpoint import MODEL_FILE

    recorded = ft.get("base")
    if base is None and not recorded:
        raise UserError(f"{ckpt}: LoRA run without a recorded base; pass --base")
    base_path = Path(base) if base is not None else Path(recorded)
    if base is None and not base_path.exists():
        raise UserError(f"{ckpt}: its base {base_path} is gone; pass --base with a copy of it")
    gpt, _, _, base_ckpt = load_base(base_path)
    want, got = ft.get("base_sha256"), sha256_file(base_ckpt / MODEL_FILE)
    if want and want != got:
        raise UserError(f"{ckpt}: this adapter was trained on a different base ({recorded}, weights sha256 "
                        f"{want[:12]}...); {base_ckpt} has {got[:12]}...")
    return gpt


def _tensor_files(model: nn.Module, lora: bool) -> dict[str, dict[str, torch.Tensor]]:
    from .checkpoint import MODEL_FILE, model_tensors

    files = {ADAPTER_FILE: adapter_tensors(model)} if lora else {MODEL_FILE: model_tensors(_gpt_of(model))}
    head = _classifier_of(model)
    if head is not None:
        files[HEAD_FILE] = {k: v.detach().contiguous().cpu() for k, v in head.head.state_dict().items()}
    return files


def _classifier_of(model: nn.Module) -> Optional[GPTClassifier]:
    for m in model.modules():
        if isinstance(m, GPTClassifier):
            return m
    return None


def merge_lora(run: str | os.PathLike, out: str | os.PathLike, *, base: Optional[str | os.PathLike] = None,
               which: str = "best", force: bool = False) -> Path:
    """Fold a LoRA run's adapter into its base: a full checkpoint at out/best (out/latest links to it)."""
    from .checkpoint import CONFIG_FILE, _link_or_copy, _swap_dir

    ckpt = resolve_run_checkpoint(run, which)
    if not (ckpt / ADAPTER_FILE).exists():
        raise UserError(f"{ckpt} holds no LoRA adapter ({ADAPTER_FILE}); nothing to merge")
    out = Path(out)
    _check_out(out, force, [Path(run)])
    model, tokenizer, config = load_finetuned(ckpt, base=base, merge=True)
    config = dict(config)
    config["finetune"] = dict(config.get("finetune") or {}, lora=None, merged_from=str(ckpt.resolve()))
    state = read_json(ckpt / "state.json")
    tok_file = ckpt / "tokenizer.json"
    _write_checkpoint(out, "best", _tensor_files(model, lora=False), {CONFIG_FILE: config}, tok_file,
                      {"step": state.get("step", 0), "tokens": state.get("tokens", 0), "merged": True})
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-latest-", dir=out))
    for f in (out / "best").iterdir():
        _link_or_copy(f, tmp / f.name)
    _swap_dir(tmp, out / "latest")
    atomic_write_json(out / CONFIG_FILE, config)
    print(f"merged {ckpt} into {out / 'best'}", file=sys.stderr)
    return out / "best"


def _check_out(out: Path, force: bool, inputs: Sequence[Path]) -> None:
    for p in inputs:
        if p.exists() and out.exists() and p.resolve().is_relative_to(out.resolve()):
            raise UserError(f"--out {out} holds the input run {p}; choose a new directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out} already exists and is not empty: pass --force to replace it")
        shutil.rmtree(out)


# ---------------------------------------------------------------------------------------
# The training loop shared by both tasks


@dataclass
class FinetuneOptions:
    """Optimisation and training-mode options of `scratchgpt finetune` (CLI flags of the same names)."""

    epochs: int = 3
    max_steps: int = 0  # >0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 16
    lr: float = 0.0  # 0: 3e-4 (full or partial), 1e-3 (LoRA: adapters start at zero and need larger steps)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0: off
    eval_interval: int = 0  # optimizer steps between val evaluations; 0: once per epoch
    patience: int = 0  # early stopping: evaluations without improvement; 0: off
    seed: int = 1337
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    freeze_except: Optional[int] = None  # train only the last N blocks (+ final norm and head)
    device: str = "auto"
    log_interval: int = 10

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_steps", "warmup_steps", "eval_interval", "patience"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        if self.lr < 0:
            raise UserError("--lr must be >= 0")
        if self.lora and self.freeze_except is not None:
            raise UserError("--lora and --freeze-except are alternatives: give one")

    @property
    def learning_rate(self) -> float:
        return self.lr or (1e-3 if self.lora else 3e-4)

    def lora_dict(self) -> Optional[dict]:
        return lora_config_dict(self.lora_r, self.lora_alpha, self.lora_dropout) if self.lora else None


def _lr(step: int, total: int, o: FinetuneOptions) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    peak = o.learning_rate
    if step < o.warmup_steps:
        return peak * (step + 1) / (o.warmup_steps + 1)
    frac = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _fit(model: nn.Module, batches: Callable[[int], list], loss_of: Callable[[Any], torch.Tensor],
         evaluate: Callable[[], dict], better: Callable[[dict, Optional[dict]], bool],
         save: Callable[[str, dict, dict], None], o: FinetuneOptions, out: Path,
         describe: Callable[[int, dict, Optional[float]], str], log: Callable[[str], None],
         tokens_of: Callable[[Any], int] = lambda batch: 0) -> dict:
    """Optimise, evaluate every eval_interval steps, keep the best, stop early; returns a summary.

    save(name, {"step", "tokens"}, val metrics) writes checkpoint `name` ("best" or "latest").
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=o.learning_rate, betas=(0.9, 0.99))
    per_epoch = len(batches(0))
    total = o.max_steps or o.epochs * per_epoch
    interval = o.eval_interval or per_epoch
    n_trainable = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"training {n_trainable:,} of {n_all:,} parameters for {total} steps ({per_epoch} per epoch), lr {o.learning_rate:g}")
    metrics_path = out / "metrics.jsonl"

    def record(row: dict) -> None:
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    step, tokens, best, bad, stop = 0, 0, None, 0, "max_steps" if o.max_steps else "epochs"
    t0 = time.time()
    first = last = evaluate()  # before any step: shows what training starts from
    record({"step": 0, **first})
    log(describe(0, first, None))
    model.train()
    epoch, running = 0, []
    while step < total:
        for batch in batches(epoch):
            for g in opt.param_groups:
                g["lr"] = _lr(step, total, o)
            loss = loss_of(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            if not torch.isfinite(loss):
                raise UserError(f"non-finite loss at step {step}; lower --lr")
            opt.step()
            step += 1
            tokens += tokens_of(batch)
            running.append(loss.item())
            if step % o.log_interval == 0:
                record({"step": step, "epoch": epoch, "train_loss": sum(running) / len(running), "lr": _lr(step - 1, total, o),
                        "elapsed_s": round(time.time() - t0, 3)})
            if step % interval == 0 or step == total:
                ev = last = evaluate()
                model.train()
                train_loss = sum(running) / len(running)
                running = []
                record({"step": step, "epoch": epoch, "train_loss": train_loss, **ev})
                log(describe(step, ev, train_loss))
                if better(ev, best):
                    best, bad = dict(ev, step=step), 0
                    save("best", {"step": step, "tokens": tokens}, ev)
                else:
                    bad += 1
                if o.patience and bad >= o.patience:
                    stop = f"early stopping: no val improvement in {bad} evaluations"
                    break
            if step >= total:
                break
        if stop.startswith("early"):
            break
        epoch += 1
    save("latest", {"step": step, "tokens": tokens}, last)  # every loop exit follows an evaluation
    return {"steps": step, "tokens": tokens, "stop_reason": stop, "best": best, "initial": first, "elapsed_s": round(time.time() - t0, 3)}


def _prepare_run(base: str | os.PathLike, out: str | os.PathLike, o: FinetuneOptions, force: bool, which: str):
    from .train import configure_threads, pick_device

    o.check()
    out = Path(out)
    _check_out(out, force, [Path(base)])
    gpt, tokenizer, base_config, base_ckpt = load_base(base, which)
    configure_threads(0)
    device = pick_device(o.device)
    torch.manual_seed(o.seed)
    return out, gpt, tokenizer, base_config, base_ckpt, device


def _finetune_record(kind: str, base_ckpt: Path, o: FinetuneOptions, train_file, val_file, **extra) -> dict:
    from .checkpoint import MODEL_FILE

    return {"task": kind, "base": str(base_ckpt.resolve()), "base_sha256": sha256_file(base_ckpt / MODEL_FILE),
            "train_file": str(train_file), "val_file": str(val_file), "options": asdict(o),
            "lora": o.lora_dict(), **extra}


def _train_part(train_loss: Optional[float]) -> str:
    return "" if train_loss is None else f"train loss {train_loss:.4f}, "


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Classification


def train_classifier(model: nn.Module, train_ids: list[list[int]], train_y: list[int], val_ids: list[list[int]],
                     val_y: list[int], labels: list[str], o: FinetuneOptions, out: Path,
                     save: Callable[[str, dict, dict], None] = lambda *a: None, device: torch.device | str = "cpu",
                     log: Callable[[str], None] = _stderr) -> dict:
    """Train a (possibly LoRA-wrapped or partly frozen) GPTClassifier; val metrics each evaluation."""
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
        return (f"step {step}: {_train_part(train_loss)}val loss {ev['val_loss']:.4f}, accuracy {ev['accuracy']:.4f}, "
                f"macro-F1 {ev['macro_f1']:.4f}\n{format_confusion(ev['confusion_matrix'], labels)}")

    model.to(device)
    return _fit(model, batches, loss_of, evaluate, better, save, o, out, describe, log,
                lambda batch: sum(len(train_ids[i]) for i in batch))


@torch.no_grad()
def predict_proba(model: nn.Module, seqs: Sequence[Sequence[int]], device: torch.device | str = "cpu",
                  batch_size: int = 64) -> torch.Tensor:
    """Class probabilities (N, K) on the CPU; batches sorted by length so padding stays small."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    parts = []
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        parts.append((chunk, classifier_logits(model, [seqs[j] for j in chunk], device).float().softmax(-1).cpu()))
    out = torch.empty(len(seqs), parts[0][1].size(1))
    for chunk, p in parts:
        out[chunk] = p
    return out


def finetune_classify(base: str | os.PathLike, train_file: str | os.PathLike, val_file: str | os.PathLike,
                      out: str | os.PathLike, *, text_field: str = "text", label_field: str = "label",
                      pooling: str = "last", options: Optional[FinetuneOptions] = None, which: str = "best",
                      force: bool = False, log: Callable[[str], None] = _stderr) -> dict:
    """`scratchgpt finetune classify`: returns the summary also written to out/result.json."""
    from .checkpoint import CONFIG_FILE

    o = options or FinetuneOptions()
    if pooling not in ("last", "mean"):
        raise UserError(f"--pooling must be 'last' or 'mean', not {pooling!r}")
    out, gpt, tokenizer, base_config, base_ckpt, device = _prepare_run(base, out, o, force, which)
    texts, y_train, w_train = read_labelled(train_file, text_field, label_field)
    val_texts, y_val, w_val = read_labelled(val_file, text_field, label_field)
    labels = sorted(set(y_train))
    if len(labels) < 2:
        raise UserError(f"{train_file}: needs at least 2 different labels, found {labels}")
    known = set(labels)
    for lab, where in zip(y_val, w_val):
        if lab not in known:
            raise UserError(f"{where}: label {lab!r} does not occur in the training file {train_file}")
    bs = gpt.cfg.block_size
    train_ids, cut_train = encode_texts(tokenizer, texts, w_train, bs, log)
    val_ids, cut_val = encode_texts(tokenizer, val_texts, w_val, bs, log)
    index = {lab: i for i, lab in enumerate(labels)}
    model = setup_trainable(GPTClassifier(gpt, len(labels), pooling), lora=o.lora_dict(), freeze_except=o.freeze_except)
    config = dict(base_config)
    config["finetune"] = _finetune_record("classify", base_ckpt, o, train_file, val_file,
                                          truncated={"train": cut_train, "val": cut_val})
    config["classifier"] = {"labels": labels, "pooling": pooling, "text_field": text_field, "label_field": label_field}
    config.pop("chat_template", None)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_FILE, config)
    tok_file = base_ckpt / "tokenizer.json"

    def save(name: str, progress: dict, ev: dict) -> None:
        json_files = {CONFIG_FILE: config}
        if o.lora:
            json_files[ADAPTER_CONFIG_FILE] = o.lora_dict()
        _write_checkpoint(out, name, _tensor_files(model, o.lora), json_files, tok_file, {**progress, "val": ev})

    majority = max(labels, key=y_val.count)
    result = train_classifier(model, train_ids, [index[y] for y in y_train], val_ids, [index[y] for y in y_val], labels,
                              o, out, save, device, log)
    result.update(labels=labels, majority_baseline=y_val.count(majority) / len(y_val), truncated=cut_train + cut_val)
    atomic_write_json(out / "result.json", result)
    log(f"best: step {result['best']['step']}, accuracy {result['best']['accuracy']:.4f}, macro-F1 "
        f"{result['best']['macro_f1']:.4f} (majority baseline {result['majority_baseline']:.4f}); saved {out}/best")
    return result


def predict(run: str | os.PathLike, input: str | os.PathLike, output: Optional[str | os.PathLike] = None, *,
            text_field: Optional[str] = None, which: str = "best", base: Optional[str | os.PathLike] = None,
            batch_size: int = 64, device: str = "cpu", stdout=None) -> list[dict]:
    """`scratchgpt predict`: a label and per-label probabilities for every row of `input`.

    Output: JSONL (default; stdout without --output) or CSV (columns text, label, prob_<label>...).
    """
    from .train import pick_device

    model, tokenizer, config = load_finetuned(run, which, base=base, device=pick_device(device))
    if "classifier" not in config:
        raise UserError(f"{run} is not a classification run (make one with `scratchgpt finetune classify`)")
    labels = config["classifier"]["labels"]
    texts, wheres = read_texts(input, text_field or config["classifier"].get("text_field", "text"))
    ids, _ = encode_texts(tokenizer, texts, wheres, _gpt_of(model).cfg.block_size, _stderr)
    probs = predict_proba(model, ids, pick_device(device), batch_size)
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
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output is None:
        (stdout or sys.stdout).write(text)
    else:
        from .utils import atomic_write_bytes

        atomic_write_bytes(output, text.encode("utf-8"))
        _stderr(f"wrote {len(rows)} predictions to {output}")
    return rows


# ---------------------------------------------------------------------------------------
# SFT


def default_template(tokenizer: Tokenizer) -> dict:
    """The chat template SFT uses unless --template gives one (format: generate.py's module doc)."""
    from .tokenizer import EOT

    user = "### Instruction:\n{prompt}\n\n### Response:\n"
    if tokenizer.eot_id is not None:
        return {"system": "", "user": user, "assistant_end": EOT, "stop": [EOT, "### Instruction:"]}
    # char tokenizers have no EOT token: a visible end marker the model learns to write
    return {"system": "", "user": user, "assistant_end": "\n### End\n", "stop": ["\n### End", "### Instruction:"]}


def load_template(path: Optional[str | os.PathLike], tokenizer: Tokenizer) -> dict:
    from .generate import ChatTemplate

    if path is None:
        return default_template(tokenizer)
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the template JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the template must be a JSON object with a \"user\" field")
    return asdict(ChatTemplate.from_config({"chat_template": raw}))  # validates: "user" holds {prompt}


def encode_conversation(tokenizer: Tokenizer, template: dict, turns: Sequence[tuple[str, str]],
                        where: str = "") -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in the template, and which of them are the assistant's (to learn).

    Built exactly as `generate.chat` builds its prompts: system, then per exchange the user
    template around the message, the reply, and assistant_end. A system message is placed,
    masked, at the start followed by a blank line.
    """
    from .generate import ChatTemplate, encode_with_eot

    t = ChatTemplate.from_config({"chat_template": template})
    ids: list[int] = []
    learn: list[bool] = []

    def add(toks: list[int], flag: bool) -> None:
        ids.extend(toks)
        learn.extend([flag] * len(toks))

    try:
        for _, content in turns:
            encode_strict(tokenizer, content)  # names characters the vocabulary lacks
        add(encode_with_eot(tokenizer, t.system), False)
        for role, content in turns:
            if role == "system":
                add(tokenizer.encode(content + "\n\n"), False)
            elif role == "user":
                add(t.user_ids(tokenizer, content), False)
            else:
                add(tokenizer.encode(content), True)
                add(encode_with_eot(tokenizer, t.assistant_end), True)
    except UserError as e:
        raise UserError(f"{where}: {e} (the base run's tokenizer cannot encode this example)" if where else str(e)) from None
    return ids, learn


def sft_labels(ids: Sequence[int], learn: Sequence[bool], mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """(inputs, labels) for next-token training: labels[i] predicts ids[i+1], -100 where not learned."""
    x = list(ids[:-1])
    y = [t if (m or not mask_prompt) else IGNORE for t, m in zip(ids[1:], learn[1:])]
    return x, y


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions (-100 positions contribute nothing)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE)


def build_sft_examples(tokenizer: Tokenizer, template: dict, examples: Sequence[SFTExample], block_size: int, mask_prompt: bool,
                       note: Callable[[str], None] = _stderr) -> list[tuple[list[int], list[bool]]]:
    """Encoded examples cut to block_size + 1 tokens (the count is reported); errors name the line."""
    out, cut = [], 0
    for ex in examples:
        ids, learn = encode_conversation(tokenizer, template, ex.turns, ex.where)
        if len(ids) > block_size + 1:
            ids, learn, cut = ids[:block_size + 1], learn[:block_size + 1], cut + 1
            if mask_prompt and not any(learn[1:]):
                raise UserError(f"{ex.where}: the prompt fills the whole context of {block_size} tokens, "
                                "leaving no response token to learn")
        out.append((ids, learn))
    if cut:
        note(f"note: {cut} of {len(examples)} examples in {examples[0].where.rsplit(':', 1)[0]} are longer than the "
             f"context of {block_size} tokens; kept their first {block_size + 1} tokens")
    return out


def pack_rows(examples: Sequence[tuple[list[int], list[bool]]], order: Sequence[int],
              max_len: int) -> list[tuple[list[int], list[bool]]]:
    """Whole examples concatenated, in `order`, into rows of at most max_len tokens (none is split)."""
    rows: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    learn: list[bool] = []
    for i in order:
        e_ids, e_learn = examples[i]
        if ids and len(ids) + len(e_ids) > max_len:
            rows.append((ids, learn))
            ids, learn = [], []
        ids, learn = ids + e_ids, learn + e_learn
    if ids:
        rows.append((ids, learn))
    return rows


def _sft_batch(rows: Sequence[tuple[list[int], list[bool]]], mask_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [sft_labels(ids, learn, mask_prompt) for ids, learn in rows]
    return _pad([p[0] for p in pairs], 0), _pad([p[1] for p in pairs], IGNORE)


def train_sft(model: nn.Module, train_ex: list[tuple[list[int], list[bool]]], val_ex: list[tuple[list[int], list[bool]]],
              o: FinetuneOptions, out: Path, *, mask_prompt: bool = True, pack: bool = False,
              save: Callable[[str, dict, dict], None] = lambda *a: None, device: torch.device | str = "cpu",
              log: Callable[[str], None] = _stderr) -> dict:
    """Train a (possibly LoRA-wrapped) GPT on encoded examples; val loss over response tokens."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(o.seed)
    bs = _gpt_of(model).cfg.block_size
    cache: dict[int, list] = {}

    def batches(epoch: int) -> list:
        if epoch not in cache:  # _fit asks for epoch 0 twice (once to count steps)
            cache.clear()
            order = torch.randperm(len(train_ex), generator=gen).tolist()
            rows = pack_rows(train_ex, order, bs + 1) if pack else [train_ex[i] for i in order]
            cache[epoch] = [rows[i:i + o.batch_size] for i in range(0, len(rows), o.batch_size)]
        return cache[epoch]

    def loss_of(rows) -> torch.Tensor:
        x, y = _sft_batch(rows, mask_prompt)
        return sft_loss(model(x.to(device)), y.to(device))

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(val_ex), o.batch_size * 4):
            x, y = _sft_batch(val_ex[i:i + o.batch_size * 4], mask_prompt)
            logits = model(x.to(device))
            y = y.to(device)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
            count += int((y != IGNORE).sum())
        return {"val_loss": total / max(count, 1), "val_tokens": count}

    def better(ev: dict, best: Optional[dict]) -> bool:
        return best is None or ev["val_loss"] < best["val_loss"]

    model.to(device)
    return _fit(model, batches, loss_of, evaluate, better, save, o, out,
                lambda step, ev, tl: f"step {step}: {_train_part(tl)}val loss {ev['val_loss']:.4f}", log,
                lambda rows: sum(len(ids) - 1 for ids, _ in rows))


def finetune_sft(base: str | os.PathLike, train_file: str | os.PathLike, val_file: str | os.PathLike,
                 out: str | os.PathLike, *, template: Optional[str | os.PathLike] = None, mask_prompt: bool = True,
                 pack: bool = False, options: Optional[FinetuneOptions] = None, which: str = "best",
                 force: bool = False, log: Callable[[str], None] = _stderr) -> dict:
    """`scratchgpt finetune sft`: returns the summary also written to out/result.json."""
    from .checkpoint import CONFIG_FILE

    o = options or FinetuneOptions()
    out, gpt, tokenizer, base_config, base_ckpt, device = _prepare_run(base, out, o, force, which)
    if not gpt.cfg.causal:
        raise UserError(f"{base_ckpt} is a bidirectional (mlm) model: SFT needs a causal model that can generate")
    tmpl = load_template(template, tokenizer)
    bs = gpt.cfg.block_size
    train_ex = build_sft_examples(tokenizer, tmpl, read_sft(train_file), bs, mask_prompt, log)
    val_ex = build_sft_examples(tokenizer, tmpl, read_sft(val_file), bs, mask_prompt, log)
    model = setup_trainable(gpt, lora=o.lora_dict(), freeze_except=o.freeze_except)
    config = dict(base_config)
    config["finetune"] = _finetune_record("sft", base_ckpt, o, train_file, val_file, mask_prompt=mask_prompt, pack=pack)
    config["chat_template"] = tmpl
    config.pop("classifier", None)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_FILE, config)
    tok_file = base_ckpt / "tokenizer.json"

    def save(name: str, progress: dict, ev: dict) -> None:
        json_files = {CONFIG_FILE: config}
        if o.lora:
            json_files[ADAPTER_CONFIG_FILE] = o.lora_dict()
        _write_checkpoint(out, name, _tensor_files(model, o.lora), json_files, tok_file, {**progress, "val": ev})

    result = train_sft(model, train_ex, val_ex, o, out, mask_prompt=mask_prompt, pack=pack, save=save, device=device,
                       log=log)
    atomic_write_json(out / "result.json", result)
    log(f"best: step {result['best']['step']}, val loss {result['best']['val_loss']:.4f}; saved {out}/best")
    return result


def prompt_ids(tokenizer: Tokenizer, template: dict, context: Sequence[tuple[str, str]]) -> list[int]:
    """The ids a model is prompted with for the reply after `context` (a trailing user turn)."""
    ids, _ = encode_conversation(tokenizer, template, list(context))
    return ids
