"""`scratchgpt` command line: each subcommand parses its flags and calls one plain function.

Config sections (`--model.*`, `--train.*`, `--optim.*`) come straight from the typed
dataclasses through jsonargparse, so every field is both a flag and a config-file key.
Heavy imports (torch) happen inside the subcommands, so `scratchgpt prepare --help` is quick.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from . import UserError


class Parser(ArgumentParser):
    """jsonargparse parser whose errors are one line, naming the closest valid key."""

    def error(self, message: str, ex: Optional[Exception] = None):  # type: ignore[override]
        lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
        msg = lines[0] if lines else "invalid arguments"
        # jsonargparse nests the real reason ("... does not accept option 'x'") below a generic line
        for ln in lines:
            if "accept" in ln or "unrecognized" in ln or "not a valid" in ln.lower():
                msg = ln
                break
        bad = re.search(r"unrecognized arguments: (--?[\w.\-]+)", msg) or re.search(r"option '([\w.\-]+)'", msg)
        if bad:
            key = bad.group(1)
            flag = key if key.startswith("-") else f"--{key}"
            options = [o for p in _all_parsers(self) for a in p._actions for o in a.option_strings]
            close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
            if close:
                msg += f" (did you mean {close[0].lstrip('-') if not key.startswith('-') else close[0]}?)"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def _all_parsers(parser: ArgumentParser):
    yield parser
    subs = getattr(parser, "_subcommands_action", None)
    if subs is not None:
        for p in subs.choices.values():
            yield from _all_parsers(p)


# ---------------------------------------------------------------- data
def _prepare_parser() -> Parser:
    p = Parser(description="Clean and tokenize raw text into train.bin / val.bin / tokenizer.json / meta.json.")
    p.add_argument("inputs", nargs="*", default=[], help="files, directories, globs, .jsonl, or - for stdin; none: embedded corpus")
    p.add_argument("--out", type=Path, default=Path("data/default"), help="output directory")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--val", nargs="+", default=None, help="explicit validation inputs")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--jsonl-field", default="text", help="field holding the text in .jsonl inputs")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict", help="invalid UTF-8: fail, or replace and count")
    p.add_argument("--no-nfc", action="store_true", help="skip Unicode NFC normalisation")
    p.add_argument("--no-newlines", action="store_true", help="keep \\r\\n and \\r as they are")
    p.add_argument("--no-strip-control", action="store_true", help="keep control characters")
    p.add_argument("--strip-gutenberg", action="store_true", help="strip Project Gutenberg headers and footers")
    p.add_argument("--dedup", action="store_true", help="drop exact-duplicate documents")
    p.add_argument("--buffer-mb", type=int, default=64, help="text buffered in memory at once")
    p.add_argument("--min-frequency", type=int, default=2, help="BPE: merge only pairs seen at least this often")
    p.add_argument("--workers", type=Optional[int], default=None, help="worker processes (default: all cores)")
    p.add_argument("--seed", type=int, default=1337, help="seeds the document split")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    return p


def cmd_prepare(a) -> None:
    from .data import prepare

    prepare(
        inputs=list(a.inputs),
        out=a.out,
        tokenizer=a.tokenizer,
        vocab_size=a.vocab_size,
        val=a.val,
        val_fraction=a.val_fraction,
        jsonl_field=a.jsonl_field,
        errors=a.errors,
        nfc=not a.no_nfc,
        normalize_newlines=not a.no_newlines,
        strip_control=not a.no_strip_control,
        strip_gutenberg=a.strip_gutenberg,
        dedup=a.dedup,
        buffer_mb=a.buffer_mb,
        min_frequency=a.min_frequency,
        workers=a.workers,
        seed=a.seed,
        force=a.force,
    )


def _data_info_parser() -> Parser:
    p = Parser(description="Show a prepared data directory: manifest, token counts, a decoded sample.")
    p.add_argument("dir", type=Path)
    p.add_argument("--sample-tokens", type=int, default=200, help="tokens to decode from each split")
    p.add_argument("--verify", action="store_true", help="check every file's sha256 against meta.json")
    return p


def cmd_data_info(a) -> None:
    from .data import data_info

    print(data_info(a.dir, sample_tokens=a.sample_tokens, verify=a.verify))


# ---------------------------------------------------------------- train / eval / info
def _train_parser() -> Parser:
    from .model import ModelConfig
    from .train import OptimConfig, TrainConfig

    p = Parser(description="Train a GPT. Every --model.*/--train.*/--optim.* flag is also a config-file key.")
    p.add_argument("--config", action=ActionConfigFile, help="YAML/JSON config file")
    p.add_argument("--data", type=Optional[Path], default=None, help="prepared data dir (default: embedded corpus)")
    p.add_argument("--out", type=Optional[Path], default=None, help="run directory (default: runs/default)")
    p.add_argument("--resume", action="store_true", help="continue RUN/latest bit-exactly")
    p.add_argument("--force", action="store_true", help="replace a run that is already in --out")
    p.add_class_arguments(ModelConfig, "model")
    p.add_class_arguments(TrainConfig, "train")
    p.add_class_arguments(OptimConfig, "optim")
    return p


def cmd_train(a, parser: Parser) -> None:
    from .model import ModelConfig
    from .train import OptimConfig, TrainConfig, train

    try:
        model_cfg = ModelConfig(**vars(a.model))
        train_cfg = TrainConfig(**vars(a.train))
        optim_cfg = OptimConfig(**vars(a.optim))
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
    # On --resume the saved config wins; only train/optim values that differ from the defaults
    # (i.e. were given on the command line or in --config) override it, e.g. a longer max_iters.
    overrides = {}
    for section, cls in (("train", TrainConfig), ("optim", OptimConfig)):
        defaults = vars(cls())
        for key, value in vars(getattr(a, section)).items():
            if _normalise(value) != _normalise(defaults[key]):
                overrides[f"{section}.{key}"] = value
    train(data=a.data, out=a.out, model=model_cfg, train=train_cfg, optim=optim_cfg, resume=a.resume, force=a.force,
          overrides=overrides)


def _normalise(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _eval_parser() -> Parser:
    p = Parser(description="Evaluate a run; prints JSON and saves RUN/eval-<task>.json. lm: loss, perplexity, "
                           "bits per byte; classify: accuracy, macro-F1, confusion matrix; generate: BLEU, chrF.")
    p.add_argument("run", type=Path)
    p.add_argument("--task", choices=["lm", "classify", "generate"], default="lm")
    p.add_argument("--data", type=Optional[Path], default=None,
                   help="lm: prepared data dir (default: the run's) or a text file; classify/generate: CSV/JSONL file")
    p.add_argument("--context", type=int, default=0, help="lm: window length in tokens (default: block_size)")
    p.add_argument("--which", choices=["best", "latest"], default="best")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--text-field", type=Optional[str], default=None, help="classify: default: the run's")
    p.add_argument("--label-field", type=Optional[str], default=None, help="classify: default: the run's")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generate: reply length limit")
    p.add_argument("--limit", type=int, default=0, help="generate: only the first N examples; 0: all")
    p.add_argument("--base", type=Optional[Path], default=None, help="LoRA runs: the base run, if it moved")
    _quantize_arg(p)
    return p


def cmd_eval(a) -> None:
    from .evaluate import evaluate_cli

    evaluate_cli(a.run, a.task, a.data, context=a.context, which=a.which, batch_size=a.batch_size,
                 text_field=a.text_field, label_field=a.label_field, max_new_tokens=a.max_new_tokens, limit=a.limit,
                 base=a.base, quantize=a.quantize)


# ---------------------------------------------------------------- finetune / predict / merge-lora
def _finetune_common(p: Parser) -> None:
    p.add_argument("run", type=Path, help="base run (or checkpoint dir) to fine-tune")
    p.add_argument("--train", type=Path, required=True, help="training file (.csv, .tsv or .jsonl)")
    p.add_argument("--val", type=Path, required=True, help="validation file, same format")
    p.add_argument("--out", type=Path, required=True, help="new run directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint of the base run")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=0, help=">0: stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.0, help="0: 3e-4, or 1e-3 with --lora")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0: off")
    p.add_argument("--eval-interval", type=int, default=0, help="steps between val evaluations; 0: once per epoch")
    p.add_argument("--patience", type=int, default=0, help="early stopping after N evaluations without improvement")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT) instead of the weights")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--freeze-except", type=Optional[int], default=None,
                   help="train only the last N blocks (and the head); 0: the head alone")


def _finetune_parser() -> Parser:
    p = Parser(prog="scratchgpt finetune",  # before add_subcommand: the sub-parsers' usage lines copy it
               description="Fine-tune a run: `classify` (text -> label) or `sft` (prompt -> response).")
    sub = p.add_subcommands(dest="mode")
    c = Parser(description="Classifier: a head on the last (or mean) hidden state; reports accuracy, macro-F1 "
                           "and the confusion matrix on val; keeps the best checkpoint.")
    _finetune_common(c)
    c.add_argument("--text-field", default="text")
    c.add_argument("--label-field", default="label")
    c.add_argument("--pooling", choices=["last", "mean"], default="last")
    sub.add_subcommand("classify", c)
    s = Parser(description="Supervised fine-tuning on prompt/response (or messages) JSONL, loss on responses only; "
                           "the chat template is stored in the checkpoint for `chat`.")
    _finetune_common(s)
    s.add_argument("--template", type=Optional[Path], default=None, help="chat template JSON (user, system, "
                   "assistant_end, stop); default: ### Instruction/### Response")
    s.add_argument("--no-mask-prompt", action="store_true", help="learn the prompt tokens too")
    s.add_argument("--pack", action="store_true", help="several whole examples per row instead of padding")
    sub.add_subcommand("sft", s)
    return p


def cmd_finetune(a) -> None:
    from .finetune import FinetuneOptions, finetune_classify, finetune_sft

    f = getattr(a, a.mode)
    o = FinetuneOptions(epochs=f.epochs, max_steps=f.max_steps, batch_size=f.batch_size, lr=f.lr,
                        weight_decay=f.weight_decay, warmup_steps=f.warmup_steps, grad_clip=f.grad_clip,
                        eval_interval=f.eval_interval, patience=f.patience, seed=f.seed, device=f.device, lora=f.lora,
                        lora_r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout,
                        freeze_except=f.freeze_except)
    if a.mode == "classify":
        finetune_classify(f.run, f.train, f.val, f.out, text_field=f.text_field, label_field=f.label_field,
                          pooling=f.pooling, options=o, which=f.which, force=f.force)
    else:
        finetune_sft(f.run, f.train, f.val, f.out, template=f.template, mask_prompt=not f.no_mask_prompt, pack=f.pack,
                     options=o, which=f.which, force=f.force)


def _predict_parser() -> Parser:
    p = Parser(description="Label every row of a file with a classification run: label and probabilities.")
    p.add_argument("run", type=Path)
    p.add_argument("--input", type=Path, required=True, help=".csv, .tsv, .jsonl, or .txt (one text a line)")
    p.add_argument("--output", type=Optional[Path], default=None, help=".jsonl or .csv (default: JSONL to stdout)")
    p.add_argument("--text-field", type=Optional[str], default=None, help="default: the run's")
    p.add_argument("--which", choices=["best", "latest"], default="best")
    p.add_argument("--base", type=Optional[Path], default=None, help="LoRA runs: the base run, if it moved")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    return p


def cmd_predict(a) -> None:
    from .finetune import predict

    predict(a.run, a.input, a.output, text_field=a.text_field, which=a.which, base=a.base, batch_size=a.batch_size,
            device=a.device)


def _merge_lora_parser() -> Parser:
    p = Parser(description="Fold a LoRA run's adapter into its base weights: a full checkpoint for sample/chat.")
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base", type=Optional[Path], default=None, help="the base run, if it moved")
    p.add_argument("--which", choices=["best", "latest"], default="best")
    p.add_argument("--force", action="store_true")
    return p


def cmd_merge_lora(a) -> None:
    from .finetune import merge_lora

    merge_lora(a.run, a.out, base=a.base, which=a.which, force=a.force)


def _info_parser() -> Parser:
    p = Parser(description="Show a run: config, parameter count, steps, best val loss, files.")
    p.add_argument("run", type=Path)
    return p


def cmd_info(a) -> None:
    from .train import run_info

    run_info(a.run)


# ---------------------------------------------------------------- sample / chat
def _generation_args(p: Parser, max_new_tokens: int) -> None:
    p.add_argument("run", type=Path, help="run directory (or a checkpoint directory)")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint; best falls back to latest")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=200, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]; 1: off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats; 1: off")
    p.add_argument("--stop", nargs="+", default=None, help="stop strings (text ends before the first)")
    p.add_argument("--seed", type=Optional[int], default=None, help="same seed, same text (default: random)")
    p.add_argument("--window-shift", type=int, default=1, help="past the context, slide the window this many tokens at a time (faster, less context)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if available)")
    _quantize_arg(p)


def _quantize_arg(p: Parser) -> None:
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantized Linear layers for faster CPU decoding of large models: int8 (~1.6x "
                        "fp32 at GPT-2 size) or int4 (~2.4x; larger quality cost; see BENCHMARKS.md)")


def _generation_config(a):
    from .generate import GenerationConfig

    return GenerationConfig(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        repetition_penalty=a.repetition_penalty,
        stop=tuple(a.stop or ()),
        seed=a.seed,
        window_shift=a.window_shift,
    )


def _sample_parser() -> Parser:
    p = Parser(description="Generate text from a trained run; prints the prompt and its continuation.")
    _generation_args(p, max_new_tokens=500)
    p.add_argument("--prompt", type=Optional[str], default=None, help="text to continue (default: empty)")
    p.add_argument("--prompt-file", type=Optional[Path], default=None, help="read the prompt from a file")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--raw", action="store_true", help="ignore a fine-tuned run's chat template; continue the prompt as is")
    return p


def cmd_sample(a) -> None:
    from .generate import sample_cli

    sample_cli(
        a.run,
        prompt=a.prompt,
        prompt_file=a.prompt_file,
        which=a.which,
        device=a.device,
        num_samples=a.num_samples,
        stream_output=a.stream,
        gen=_generation_config(a),
        raw=a.raw,
        quantize=a.quantize,
    )


def _chat_parser() -> Parser:
    p = Parser(description="Chat with a run (its chat template if fine-tuned for chat); reads stdin, /reset, /exit.")
    _generation_args(p, max_new_tokens=256)
    return p


def cmd_chat(a) -> None:
    from .generate import chat_cli

    chat_cli(a.run, which=a.which, device=a.device, gen=_generation_config(a), quantize=a.quantize)


# ---------------------------------------------------------------- tune / serve
def _tune_parser() -> Parser:
    from typing import Literal, Union

    from .model import ModelConfig
    from .train import OptimConfig, TrainConfig

    p = Parser(description="Hyperparameter search (Optuna): each trial is a short training run in OUT/trial-NNN, "
                           "scored by its val loss. Writes OUT/trials.jsonl and OUT/best.json. The "
                           "--model.*/--train.*/--optim.* flags (or --config) set the base config of every trial.")
    p.add_argument("--config", action=ActionConfigFile, help="YAML/JSON config file (base config, and any of these options)")
    p.add_argument("--data", type=Optional[Path], default=None, help="prepared data dir (default: embedded corpus)")
    p.add_argument("--out", type=Path, default=Path("runs/tune"), help="search directory")
    p.add_argument("--space", type=Optional[Union[dict, str]], default=None,
                   help='YAML/JSON file or inline mapping, e.g. \'{"optim.lr": {"low": 1e-4, "high": 1e-2, "log": '
                        'true}, "model.n_embd": [32, 64]}\'')
    p.add_argument("--method", type=Optional[Literal["grid", "random", "bayes"]], default=None,
                   help="grid, random, or bayes (TPE; the default)")
    p.add_argument("--trials", type=int, default=20, help="total trials, counting those already done on --resume")
    p.add_argument("--seed", type=Optional[int], default=None, help="seeds the sampler (default 0); trials train with --train.seed")
    p.add_argument("--resume", action="store_true", help="continue the search in --out with its saved settings")
    p.add_argument("--force", action="store_true", help="replace a search that is already in --out")
    p.add_class_arguments(ModelConfig, "model")
    p.add_class_arguments(TrainConfig, "train")
    p.add_class_arguments(OptimConfig, "optim")
    return p


def cmd_tune(a) -> None:
    from .model import ModelConfig
    from .train import OptimConfig, TrainConfig

    try:
        import optuna  # noqa: F401  (imported by tune() itself; checked here for a one-line error)

        from .tune import tune_cli
    except ImportError as e:
        raise UserError(f"`scratchgpt tune` needs Optuna ({e}): pip install 'scratchgpt[tune]'") from None
    try:
        model_cfg = ModelConfig(**vars(a.model))
        train_cfg = TrainConfig(**vars(a.train))
        optim_cfg = OptimConfig(**vars(a.optim))
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
    tune_cli(space=a.space, out=a.out, data=a.data, method=a.method, trials=a.trials, model=model_cfg,
             train=train_cfg, optim=optim_cfg, seed=a.seed, resume=a.resume, force=a.force)


def _serve_parser() -> Parser:
    p = Parser(description="Serve a run over HTTP with an OpenAI-compatible API: POST /v1/completions, "
                           "POST /v1/chat/completions (streaming as server-sent events), GET /v1/models, GET /health.")
    p.add_argument("run", type=Path, help="run directory (or a checkpoint directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (no authentication: keep it local)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint; best falls back to latest")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if available)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    _quantize_arg(p)
    return p


def cmd_serve(a) -> None:
    try:
        import uvicorn  # noqa: F401

        from .serve import serve
    except ImportError as e:
        raise UserError(f"`scratchgpt serve` needs FastAPI and uvicorn ({e}): pip install 'scratchgpt[serve]'") from None
    serve(a.run, host=a.host, port=a.port, which=a.which, device=a.device, max_tokens_limit=a.max_tokens_limit,
          log_level=a.log_level, quantize=a.quantize)


COMMANDS = {
    "prepare": (_prepare_parser, cmd_prepare),
    "data-info": (_data_info_parser, cmd_data_info),
    "train": (_train_parser, cmd_train),
    "eval": (_eval_parser, cmd_eval),
    "info": (_info_parser, cmd_info),
    "sample": (_sample_parser, cmd_sample),
    "chat": (_chat_parser, cmd_chat),
    "finetune": (_finetune_parser, cmd_finetune),
    "predict": (_predict_parser, cmd_predict),
    "merge-lora": (_merge_lora_parser, cmd_merge_lora),
    "tune": (_tune_parser, cmd_tune),
    "serve": (_serve_parser, cmd_serve),
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        if not argv and "train" in COMMANDS:
            argv = ["train"]  # bare `scratchgpt` = the README's main command
        else:
            print("usage: scratchgpt {" + ",".join(COMMANDS) + "} [options]\n\nRun `scratchgpt COMMAND --help` for a command's options.")
            return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"error: unknown command {name!r}" + (f" (did you mean {close[0]}?)" if close else ""), file=sys.stderr)
        return 2
    build, run = COMMANDS[name]
    parser = build()
    parser.prog = f"scratchgpt {name}"
    args = parser.parse_args(rest)
    try:
        if run is cmd_train:
            run(args, parser)
        else:
            run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
