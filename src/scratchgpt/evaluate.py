"""Evaluation (`scratchgpt eval RUN --task lm|classify|generate --data ...`).

* lm: loss, perplexity and bits per byte over the val split of a prepared data dir (the
  run's by default), or over a plain text file (.txt, any other non-CSV/JSONL file)
  tokenized with the run's tokenizer.
* classify: accuracy, macro-F1, per-class figures and the confusion matrix of a
  classification run on a CSV/JSONL file with text and label fields.
* generate: BLEU and chrF (sacrebleu) and exact match of greedy replies against the
  references of an SFT file (prompt/response or messages; the last assistant turn is the
  reference), prompted through the run's chat template. BLEU is standard corpus BLEU-4, so
  replies shorter than 4 tokens (single words) score 0 whatever they are: read chrF and exact
  match there.

The result is printed as JSON and saved as RUN/eval-<task>.json (lm also as RUN/eval.json).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from . import UserError
from .checks import check_fields
from .checkpoint import Which, load_run
from .runs.files import OLD_EVAL_FILE, eval_file
from .runs.guard import is_checkpoint
from .data import TokenDataset, load_meta
from .data.readers import read_labelled, read_sft, read_text
from .generate import MAX_NEW_TOKENS, complete
from .heads import predict_proba
from .metrics import classification_metrics, evaluate_lm, generation_metrics
from .prompts import JinjaChatTemplate, default_template, encode_texts, prompt_ids
from .quantize import Quantize, quantize_model
from .utils import atomic_write_json, finite_or_null, json_text


@dataclass(frozen=True)
class EvalOptions:
    """What `scratchgpt eval` measures, on what data, and how (flags: --task, --batch-size, ...)."""

    task: Literal["lm", "classify", "generate", "harness"] = "lm"
    """What to measure; harness: lm-evaluation-harness tasks (--tasks; pip install 'scratchgpt[harness]')."""
    data: Optional[Path] = None
    """lm: prepared data dir (default: the run's) or a text file; classify/generate: CSV/JSONL file."""
    context: int = 0
    """lm: window length in tokens; 0: the model's block_size."""
    batch_size: int = 16
    """Windows (lm) or texts (classify) per forward pass."""
    text_field: Optional[str] = None
    """classify: the text field of the file; null: the run's."""
    label_field: Optional[str] = None
    """classify: the label field of the file; null: the run's."""
    max_new_tokens: int = 128
    """generate: reply length limit. Shorter than sampling's default: replies are scored against short
    references, and a reply that never stops costs its whole length."""
    utf8_guard: bool = True
    """generate: replies never hold a token whose bytes would break UTF-8 (byte-level tokenizers), as `sample`;
    --no-utf8-guard scores the unconstrained greedy replies."""
    limit: int = 0
    """generate, harness: only the first N examples (harness: of each task); 0: all (the default harness suite: 500)."""
    tasks: Optional[str] = None
    """harness: comma-separated lm-evaluation-harness task names (hellaswag,arc_easy,...); none: the default suite
    (hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada_openai)."""
    num_fewshot: Optional[int] = None
    """harness: examples shown before each question; none: each task's own default (a prompt past the context
    is an error once set)."""
    apply_chat_template: bool = False
    """harness: prompts in the run's chat template (an SFT run's, or an imported instruct model's)."""
    include_path: Optional[Path] = None
    """harness: a directory (or YAML file) of extra task YAMLs, e.g. over local dataset copies."""

    def __post_init__(self) -> None:
        check_fields(self, lambda name: "--" + name.replace("_", "-"), {
            "context": "[0, 1048576]", "batch_size": "[1, 65536]", "max_new_tokens": f"[1, {MAX_NEW_TOKENS}]",
            "limit": "[0, inf)", "num_fewshot": "[0, 1048576]"})


def evaluate_lm_cli(run: Path, o: EvalOptions, *, which: Which, base: Optional[Path], quantize: Quantize) -> dict:
    """`scratchgpt eval RUN [--task lm]`: val_loss, perplexity, bits_per_byte; printed, saved as RUN/eval-lm.json.

    `o.data` is a prepared data dir (its val split; default: the run's) or a text file.
    """
    data = o.data
    loaded = load_run(run, which, base=base)
    model, tokenizer, config = loaded.gpt, loaded.tokenizer, loaded.config  # a classifier's backbone is still an LM
    if not model.cfg.causal:
        raise UserError(f"{run} is a bidirectional (mlm) model: --task lm measures next-token prediction, "
                        "which needs a causal model")
    quantize_model(model, quantize)
    context = o.context or model.cfg.block_size
    if not (data or config.get("data")):
        raise UserError(f"{run} records no data directory (an imported model?): pass --data DIR or a text file")
    data = Path(data or config["data"])
    if data.exists() and not data.is_dir():  # a text file (read_text refuses a FIFO or a device in one line)
        dataset, split = _text_dataset(data, tokenizer), "file"
    else:
        meta = load_meta(data)
        # (an imported model may have more embedding rows than its tokenizer has tokens, as hub models pad them)
        if meta["vocab_size"] > model.cfg.vocab_size or (meta["vocab_size"] != model.cfg.vocab_size
                                                        and meta.get("tokenizer") != "hf"):
            raise UserError(f"vocabulary mismatch: the model has {model.cfg.vocab_size} tokens, {data} has {meta['vocab_size']}")
        dataset, split = TokenDataset(data, "val", 1), "val"
    result = evaluate_lm(model, dataset, context, batch_size=o.batch_size, tokenizer=tokenizer)
    result = {"run": str(run), "task": "lm", "data": str(data), "split": split, **result, "quantize": quantize or "none"}
    _report(run, "lm", result)
    return result


class _Tokens:
    """The one attribute of a TokenDataset that evaluate_lm reads."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens


def _text_dataset(path: Path, tokenizer) -> _Tokens:
    text = read_text(path)
    try:
        tokens = tokenizer.encode_array(text)
        if tokenizer.bos_ids:  # as transformers' tokenizer(text) starts it (an imported Llama's <s>)
            tokens = np.concatenate([np.asarray(tokenizer.bos_ids, dtype=np.int64), tokens])
    except UserError as e:
        raise UserError(f"{path}: {e} (the run's tokenizer cannot encode this file)") from None
    if len(tokens) < 2:
        raise UserError(f"{path}: fewer than 2 tokens to evaluate")
    return _Tokens(np.asarray(tokens, dtype=np.int64))


def _report(run: Path, task: str, result: dict) -> None:
    quantized = result.get("quantize", "none") != "none"
    result = finite_or_null(result)
    print(json_text(result, indent=2))
    if Path(run).is_dir() and not is_checkpoint(Path(run)):  # a checkpoint's files are its hashed ones only
        names = [eval_file(task, result["quantize"] if quantized else "none")]
        names += [OLD_EVAL_FILE] if task == "lm" and not quantized else []
        for name in names:
            try:
                atomic_write_json(Path(run) / name, result)
            except OSError as e:
                print(f"warning: could not save {name}: {e}", file=sys.stderr)


def evaluate_classify_cli(run: Path, o: EvalOptions, *, which: Which, base: Optional[Path],
                          quantize: Quantize) -> dict:
    """`scratchgpt eval RUN --task classify --data FILE`: accuracy, macro-F1, confusion matrix."""
    data = o.data
    if data is None:
        raise UserError("--task classify needs --data FILE (CSV or JSONL with text and label fields)")
    loaded = load_run(run, which, base=base)
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    cls = config.get("classifier")
    if not cls:
        raise UserError(f"{run} is not a classification run (make one with `scratchgpt finetune classify`)")
    quantize_model(model, quantize)
    labels = cls["labels"]
    texts, y_true, wheres = read_labelled(data, o.text_field or cls.get("text_field", "text"),
                                          o.label_field or cls.get("label_field", "label"))
    for lab, where in zip(y_true, wheres):
        if lab not in labels:
            raise UserError(f"{where}: label {lab!r} is not one the model knows ({', '.join(map(repr, labels))})")
    ids, cut = encode_texts(tokenizer, texts, wheres, loaded.gpt.cfg.block_size,
                            lambda m: print(m, file=sys.stderr))
    probs = predict_proba(model, ids, "cpu", o.batch_size)
    y_pred = [labels[i] for i in probs.argmax(-1).tolist()]
    metrics = classification_metrics(y_true, y_pred, labels)
    result = {"run": str(run), "task": "classify", "data": str(data), "truncated": cut, **metrics,
              "quantize": quantize or "none"}
    _report(run, "classify", result)
    return result


def evaluate_generate_cli(run: Path, o: EvalOptions, *, which: Which, base: Optional[Path],
                          quantize: Quantize) -> dict:
    """`scratchgpt eval RUN --task generate --data FILE`: BLEU, chrF and exact match of greedy replies (prompted in
    the run's SFT template, else an imported instruct model's own jinja template, else the default SFT one)."""
    data, max_new_tokens = o.data, o.max_new_tokens
    if data is None:
        raise UserError("--task generate needs --data FILE (SFT JSONL: prompt/response or messages)")
    loaded = load_run(run, which, base=base)
    if loaded.is_classifier:
        raise UserError(f"{run} is a classification run: use --task classify")
    model, tokenizer, config = loaded.language_model("eval --task generate"), loaded.tokenizer, loaded.config
    quantize_model(model, quantize)
    jinja = JinjaChatTemplate.of(tokenizer, config)  # an imported instruct model is asked in its own template
    template = config.get("chat_template") or default_template(tokenizer)
    examples = read_sft(data)
    if o.limit:
        examples = examples[:o.limit]
    prompts = []
    for ex in examples:
        try:
            prompts.append(jinja.encode([{"role": r, "content": c} for r, c in ex.context]) if jinja
                           else prompt_ids(tokenizer, template, ex.context))
        except UserError as e:
            raise UserError(f"{ex.where}: {e}") from None
    # replies end at any of the model's eos ids (complete's default) or the SFT template's stop strings
    done = complete(model, tokenizer, prompts, temperature=0.0, max_new_tokens=max_new_tokens,
                    stop=() if jinja else tuple(template.get("stop") or ()), utf8_guard=o.utf8_guard,
                    note=lambda m: None)
    hyps = [c.text.strip() for c in done]
    refs = [ex.reference.strip() for ex in examples]
    result = {"run": str(run), "task": "generate", "data": str(data), **generation_metrics(hyps, refs),
              "quantize": quantize or "none",
              "max_new_tokens": max_new_tokens,
              "samples": [{"prompt": ex.context[-1][1], "reference": r, "output": h}
                          for ex, r, h in list(zip(examples, refs, hyps))[:5]]}
    _report(run, "generate", result)
    return result


def _harness(run: Path, o: EvalOptions, *, which: Which, base: Optional[Path], quantize: Quantize) -> dict:
    from .harness import evaluate_harness_cli  # lm-eval is an optional extra

    return evaluate_harness_cli(run, o, which=which, base=base, quantize=quantize)


def evaluate_cli(run: Path, options: Optional[EvalOptions] = None, *, which: Which = "best",
                 base: Optional[Path] = None, quantize: Quantize = "none") -> dict:
    """`scratchgpt eval`: measure RUN/which as `options` say (EvalOptions: task, data, ...)."""
    o = options or EvalOptions()
    measure = {"lm": evaluate_lm_cli, "classify": evaluate_classify_cli, "generate": evaluate_generate_cli,
               "harness": _harness}.get(o.task)
    if measure is None:
        raise UserError(f"--task must be lm, classify, generate or harness, not {o.task!r}")
    return measure(run, o, which=which, base=base, quantize=quantize)
