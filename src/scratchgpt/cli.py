"""`scratchgpt` command line: each subcommand parses its flags and calls one plain function.

Options are declared once, as typed dataclasses with a docstring per field, and the flags
come from them: `--model.*`, `--train.*`, `--optim.*` (ModelConfig, TrainConfig, OptimConfig,
through jsonargparse: every field is also a config-file key), and the dash-named flags of
`prepare` (PrepareConfig), `finetune` (FinetuneOptions, ClassifyOptions, SFTOptions) and
`sample`/`chat` (GenerationConfig) and `serve` (ServeOptions). Heavy imports (torch) happen inside the
subcommands where they can, so `--help` is quick.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shlex
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from . import UserError

# field docstrings (LitGPT's args.py style) become the --help text of --model.* / --train.* / --optim.*
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class Parser(ArgumentParser):
    """jsonargparse parser whose errors are one line, naming the closest valid key."""

    def error(self, message: str, ex: Optional[Exception] = None):  # type: ignore[override]
        lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
        msg = self._type_error(lines) or (lines[0] if lines else "invalid arguments")
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
        print(f"error: {_one_line(msg)}", file=sys.stderr)
        sys.exit(2)


    def _type_error(self, lines: list[str]) -> Optional[str]:
        """jsonargparse's several-line type error as one line: the flag, what it takes, the value given."""
        key = re.match(r'Parser key "([^"]+)":', lines[0]) if lines else None
        got = next((m.group(1) for ln in lines if (m := re.search(r"(?:Got|Given) value:\s*(.*)", ln))), None)
        if key is None or got is None:
            return None
        flag = next((a.option_strings[-1] for p in _all_parsers(self) for a in p._actions
                     if a.dest == key.group(1) and a.option_strings), "--" + key.group(1))
        subtypes = next((ln for ln in lines if ln.startswith(("Subtypes:", "Expected a"))), "")
        choices = re.search(r"Literal\[(.*?)\]", subtypes)
        if choices:
            want = "one of " + ", ".join(c.strip(" '\"") for c in choices.group(1).split(","))
        elif n := re.search(r"tuple with (\d+) elements", subtypes):
            want = f"a list of {n.group(1)} values"
        else:
            names = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>", subtypes)
            want = " or ".join(dict.fromkeys(_TYPE_NAMES.get(n, n) for n in names)) or subtypes or "another value"
        return f"{flag} takes {want}, got {({'None': 'null', 'True': 'true', 'False': 'false'}).get(got, got)!r}"


_TYPE_NAMES = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
               "NoneType": "null", "Path": "a path", "dict": "a mapping"}


def _one_line(message: str) -> str:
    """An error stays one line even when it quotes text with line breaks in it."""
    return message.strip().replace("\r", "\\r").replace("\n", "\\n")


def _all_parsers(parser: ArgumentParser):
    yield parser
    subs = getattr(parser, "_subcommands_action", None)
    if subs is not None:
        for p in subs.choices.values():
            yield from _all_parsers(p)


# ---------------------------------------------------------------- options from dataclasses
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), the one source of its --help line."""
    import docstring_parser

    return {p.arg_name: " ".join((p.description or "").split()) for p in docstring_parser.parse_from_object(cls).params}


def _flag(f: dataclasses.Field) -> str:
    name = f.name.replace("_", "-")
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    return f"--no-{name}" if f.type in (bool, "bool") and f.default is True else f"--{name}"


def add_options(parser: ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """A dash-named flag per field of `cls` (bools: `--x`, or `--no-x` when on by default)."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        hint, help_text = hints[f.name], docs.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flags = (_flag(f), *f.metadata.get("aliases", ()))  # aliases: a field's older flag names
        if hint is bool:
            action = "store_false" if default is True else "store_true"
            parser.add_argument(*flags, dest=f.name, action=action, help=help_text)
            continue
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        inner = [a for a in args if a is not type(None)]
        if origin in (tuple, list) or (origin is typing.Union and inner and typing.get_origin(inner[0]) in (tuple, list)):
            parser.add_argument(*flags, dest=f.name, nargs="+", default=default, help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, type=hint, default=default, help=help_text)


def options_from(args: Any, cls: type, **values: Any):
    """The dataclass `cls` from the parsed flags of add_options (fields not on the command line keep defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    try:
        return cls(**{**given, **values})
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def unescape(text: str) -> str:
    r"""`\n`, `\t` and `\\` typed on a command line, as the characters they stand for."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


# ---------------------------------------------------------------- data
def _prepare_parser() -> Parser:
    from .data import PrepareConfig

    p = Parser(description="Clean and tokenize raw text into train.bin / val.bin (or shards) / tokenizer.json / "
                           "meta.json; or, with --merge, combine the parts of a corpus prepared apart.")
    p.add_argument("inputs", nargs="*", default=[], help="files, directories, globs, .jsonl, .parquet, datasets "
                   "save_to_disk folders, .gz/.bz2/.xz/.zst text or JSONL, or - for stdin; none: embedded corpus "
                   "(or --hf-dataset alone); with --merge: the part directories")
    p.add_argument("--out", type=Path, default=Path("data/default"), help="output directory")
    add_options(p, PrepareConfig)
    return p


def cmd_prepare(a) -> None:
    from .data import PrepareConfig, prepare

    prepare(list(a.inputs), a.out, options_from(a, PrepareConfig))


def _data_info_parser() -> Parser:
    p = Parser(description="Show a prepared data directory: manifest, token counts, a decoded sample.")
    p.add_argument("dir", type=Path, help="a prepared data directory")
    p.add_argument("--sample-tokens", type=int, default=200, help="tokens to decode from each split")
    p.add_argument("--verify", action="store_true", help="check the sha256 of every file (each shard too) against "
                   "meta.json, and every token id against the vocabulary")
    return p


def cmd_data_info(a) -> None:
    from .data import data_info

    print(data_info(a.dir, sample_tokens=a.sample_tokens, verify=a.verify))


# ---------------------------------------------------------------- train / eval / info
def _config_sections(p: Parser) -> None:
    from .model import ModelConfig
    from .optim import OptimConfig
    from .train import TrainConfig

    p.add_class_arguments(ModelConfig, "model")
    p.add_class_arguments(TrainConfig, "train")
    p.add_class_arguments(OptimConfig, "optim")


RECIPE = Path(__file__).parent / "recipes" / "default.yaml"


def _train_parser() -> Parser:
    p = Parser(description="Train a GPT. Every --model.*/--train.*/--optim.* flag is also a config-file key. "
                           "Without --config the defaults are the project's best-known CPU recipe (scratchgpt/"
                           f"recipes/{RECIPE.name}: 1000 steps, ~3 min on 2 cores; shown below); with --config FILE "
                           "they are the config classes' own defaults, then FILE (--config '{}': those defaults alone).")
    p.add_argument("--config", action=ActionConfigFile, help="YAML/JSON config file (replaces the built-in recipe)")
    p.add_argument("--data", type=Optional[Path], default=None, help="prepared data dir (default: embedded corpus)")
    p.add_argument("--out", type=Optional[Path], default=None, help="run directory (default: runs/default)")
    p.add_argument("--resume", action="store_true", help="continue RUN/latest bit-exactly")
    p.add_argument("--force", action="store_true", help="replace a run that is already in --out")
    _config_sections(p)
    return p


def use_recipe(parser: Parser, argv: list[str]) -> None:
    """`train` without --config starts from RECIPE: its values become the defaults that flags override."""
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        return
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    parser.set_defaults({f"{section}.{key}": value for section, values in recipe.items() for key, value in values.items()})


def _sections(a) -> tuple:
    """ModelConfig, TrainConfig, OptimConfig from the parsed --model.*/--train.*/--optim.* values."""
    from .model import ModelConfig
    from .optim import OptimConfig
    from .train import TrainConfig

    try:
        return ModelConfig(**vars(a.model)), TrainConfig(**vars(a.train)), OptimConfig(**vars(a.optim))
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def given_keys(parser: Parser, argv: list[str]) -> dict[str, Any]:
    """The dotted config keys the user set, on the command line or in --config, with their values
    (a value equal to the default counts too): what overrides a saved config on --resume."""
    explicit = parser.parse_args(argv, defaults=False)

    def walk(ns: Any, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in vars(ns).items():
            if hasattr(value, "__dict__") and key in ("model", "train", "optim"):
                out.update(walk(value, f"{key}."))
            elif prefix:
                out[prefix + key] = value
        return out

    return walk(explicit, "")


def cmd_train(a, argv: list[str], parser: Parser) -> int:
    from .runtime import INTERRUPTED
    from .train import train

    model_cfg, train_cfg, optim_cfg = _sections(a)
    result = train(data=a.data, out=a.out, model=model_cfg, train=train_cfg, optim=optim_cfg, resume=a.resume,
                   force=a.force, overrides=given_keys(parser, argv), command=shlex.join(["scratchgpt", "train", *argv]))
    return 130 if result["stop_reason"] == INTERRUPTED else 0


def _eval_parser() -> Parser:
    p = Parser(description="Evaluate a run; prints JSON and saves RUN/eval-<task>.json. lm: loss, perplexity, "
                           "bits per byte; classify: accuracy, macro-F1, confusion matrix; generate: BLEU, chrF.")
    p.add_argument("run", type=Path, help="run directory (or a checkpoint directory)")
    p.add_argument("--task", choices=["lm", "classify", "generate"], default="lm", help="what to measure")
    p.add_argument("--data", type=Optional[Path], default=None,
                   help="lm: prepared data dir (default: the run's) or a text file; classify/generate: CSV/JSONL file")
    p.add_argument("--context", type=int, default=0, help="lm: window length in tokens (default: block_size)")
    _which_arg(p)
    p.add_argument("--batch-size", type=int, default=16, help="windows (lm) or texts (classify) per forward pass")
    p.add_argument("--text-field", type=Optional[str], default=None, help="classify: default: the run's")
    p.add_argument("--label-field", type=Optional[str], default=None, help="classify: default: the run's")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generate: reply length limit")
    p.add_argument("--limit", type=int, default=0, help="generate: only the first N examples; 0: all")
    _base_arg(p)
    _quantize_arg(p)
    return p


def cmd_eval(a) -> None:
    from .evaluate import evaluate_cli

    evaluate_cli(a.run, a.task, a.data, context=a.context, which=a.which, batch_size=a.batch_size,
                 text_field=a.text_field, label_field=a.label_field, max_new_tokens=a.max_new_tokens, limit=a.limit,
                 base=a.base, quantize=a.quantize)


def _which_arg(p: Parser) -> None:
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint; best falls back to latest")


def _base_arg(p: Parser) -> None:
    p.add_argument("--base", type=Optional[Path], default=None, help="LoRA runs: the base run, if it moved")


def _info_parser() -> Parser:
    p = Parser(description="Show a run: config, kind, parameter count, steps, best val loss, files.")
    p.add_argument("run", type=Path, help="run directory")
    return p


def cmd_info(a) -> None:
    from .train import run_info

    run_info(a.run)


def _report_parser() -> Parser:
    p = Parser(description="Write RUN/report.html (config, data, curves, samples, evaluations, environment: one "
                           "self-contained file) and print a markdown summary.")
    p.add_argument("run", type=Path, help="run directory (pretraining or fine-tuning)")
    return p


def cmd_report(a) -> None:
    from .report import report_cli

    report_cli(a.run, out=sys.stdout)


# ---------------------------------------------------------------- finetune / predict / merge-lora
def _finetune_common(p: Parser) -> None:
    from .finetune import FinetuneOptions

    p.add_argument("run", type=Path, help="base run (or checkpoint dir) to fine-tune")
    p.add_argument("--train", type=Path, required=True, help="training file (.csv, .tsv or .jsonl)")
    p.add_argument("--val", type=Path, required=True, help="validation file, same format")
    p.add_argument("--out", type=Path, required=True, help="new run directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--resume", action="store_true", help="continue --out after a Ctrl-C or SIGTERM, exactly (give the "
                                                           "same command line it started with)")
    _which_arg(p)
    add_options(p, FinetuneOptions)


def _finetune_parser() -> Parser:
    from .finetune import ClassifyOptions, SFTOptions

    p = Parser(prog="scratchgpt finetune",  # before add_subcommand: the sub-parsers' usage lines copy it
               description="Fine-tune a run: `classify` (text -> label) or `sft` (prompt -> response).")
    sub = p.add_subcommands(dest="mode", help="the task: classify (text -> label) or sft (prompt -> response)")
    c = Parser(description="Classifier: a head on the last (or mean) hidden state; reports accuracy, macro-F1 "
                           "and the confusion matrix on val; keeps the best checkpoint.")
    _finetune_common(c)
    add_options(c, ClassifyOptions)
    sub.add_subcommand("classify", c, help="text -> label: a classification head on the pretrained GPT")
    s = Parser(description="Supervised fine-tuning on prompt/response (or messages) JSONL, loss on responses only; "
                           "the chat template is stored in the checkpoint for `chat`.")
    _finetune_common(s)
    add_options(s, SFTOptions)
    sub.add_subcommand("sft", s, help="prompt -> response: supervised fine-tuning in a chat template")
    return p


def cmd_finetune(a, argv: list[str], parser: Parser) -> int:
    from .finetune import ClassifyOptions, FinetuneOptions, SFTOptions, finetune_classify, finetune_sft
    from .runtime import INTERRUPTED

    f = getattr(a, a.mode)
    o = options_from(f, FinetuneOptions)
    command = shlex.join(["scratchgpt", "finetune", *argv])
    if a.mode == "classify":
        result = finetune_classify(f.run, f.train, f.val, f.out, options=o, task=options_from(f, ClassifyOptions),
                                   which=f.which, force=f.force, command=command,
                                   resume=f.resume)
    else:
        result = finetune_sft(f.run, f.train, f.val, f.out, options=o, task=options_from(f, SFTOptions), which=f.which,
                              force=f.force, command=command, resume=f.resume)
    return 130 if result["stop_reason"] == INTERRUPTED else 0


def _predict_parser() -> Parser:
    p = Parser(description="Label every row of a file with a classification run: label and probabilities.")
    p.add_argument("run", type=Path, help="a classification run (finetune classify)")
    p.add_argument("--input", type=Path, required=True, help=".csv, .tsv, .jsonl, or .txt (one text a line)")
    p.add_argument("--output", type=Optional[Path], default=None, help=".jsonl or .csv (default: JSONL to stdout)")
    p.add_argument("--text-field", type=Optional[str], default=None, help="default: the run's")
    _which_arg(p)
    _base_arg(p)
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...; auto: cuda > mps > cpu")
    return p


def cmd_predict(a) -> None:
    from .finetune import predict

    predict(a.run, a.input, a.output, text_field=a.text_field, which=a.which, base=a.base, batch_size=a.batch_size,
            device=a.device)


def _merge_lora_parser() -> Parser:
    p = Parser(description="Fold a LoRA run's adapter into its base weights: a full checkpoint of its own.")
    p.add_argument("run", type=Path, help="a LoRA run (finetune --lora)")
    p.add_argument("--out", type=Path, required=True, help="new run directory")
    _base_arg(p)
    _which_arg(p)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def cmd_merge_lora(a) -> None:
    from .finetune import merge_lora

    merge_lora(a.run, a.out, base=a.base, which=a.which, force=a.force)


# ---------------------------------------------------------------- sample / chat
def _generation_args(p: Parser) -> None:
    from .generate import GenerationConfig

    p.add_argument("run", type=Path, help="run directory (or a checkpoint directory)")
    _which_arg(p)
    add_options(p, GenerationConfig)
    p.add_argument("--device", default="auto", help="cpu, cuda, ...; auto: cuda > mps > cpu")
    _quantize_arg(p)


def _quantize_arg(p: Parser) -> None:
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantized Linear layers for faster CPU decoding of large models: int8 (~1.6x "
                        "fp32 at GPT-2 size) or int4 (~2.4x; larger quality cost; CPUs and Ampere+ GPUs; see BENCHMARKS.md)")


def _generation_config(a):
    from .generate import GenerationConfig

    return options_from(a, GenerationConfig, stop=tuple(unescape(s) for s in (a.stop or ())))


def _sample_parser() -> Parser:
    p = Parser(description="Generate text from a trained run; prints the prompt and its continuation.")
    _generation_args(p)
    p.add_argument("--prompt", type=Optional[str], default=None, help="text to continue (default: empty)")
    p.add_argument("--prompt-file", type=Optional[Path], default=None, help="read the prompt from a file")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (sample i uses seed + i)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--raw", action="store_true", help="ignore a fine-tuned run's chat template; continue the prompt as is")
    return p


def cmd_sample(a) -> None:
    from .chat import sample_cli

    sample_cli(a.run, prompt=a.prompt, prompt_file=a.prompt_file, which=a.which, device=a.device,
               num_samples=a.num_samples, stream_output=a.stream, gen=_generation_config(a), raw=a.raw,
               quantize=a.quantize)


def _chat_parser() -> Parser:
    p = Parser(description="Chat with a run (its chat template if fine-tuned for chat); reads stdin, /reset, /exit.")
    _generation_args(p)
    return p


def cmd_chat(a) -> None:
    from .chat import chat_cli

    chat_cli(a.run, which=a.which, device=a.device, gen=_generation_config(a), quantize=a.quantize)


# ---------------------------------------------------------------- export / import-hf
def _export_parser() -> Parser:
    p = Parser(description="Write a run as a Hugging Face transformers folder (config.json, model.safetensors, "
                           "tokenizer files, generation_config.json, a model card) that AutoModelForCausalLM and "
                           "AutoTokenizer load with no trust_remote_code.")
    p.add_argument("run", type=Path, help="run directory (or a checkpoint directory)")
    p.add_argument("--out", type=Path, required=True, help="the folder to write")
    _which_arg(p)
    p.add_argument("--adapter", action="store_true",
                   help="LoRA runs: a PEFT adapter folder (with the base exported into OUT/base) instead of merged weights")
    _base_arg(p)
    p.add_argument("--model-type", type=Optional[str], default=None,
                   help="the transformers model_type to write where several compute the model (a Llama-shaped one "
                        "without biases: llama, mistral or phi3); default: the one it was imported from, else the "
                        "natural one")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def cmd_export(a) -> None:
    from .export import export_cli

    export_cli(a.run, a.out, which=a.which, adapter=a.adapter, force=a.force, base=a.base, model_type=a.model_type)


def _import_hf_parser() -> Parser:
    p = Parser(description="Make a scratchgpt run from a transformers folder (GPT-2, OPT, GPT-NeoX, Llama, Arcee, Qwen2, "
                           "Qwen3, Mistral, Gemma, Phi-3; model.safetensors or sharded; fp32/fp16/bf16). "
                           "pytorch_model.bin is refused (unpickling).")
    p.add_argument("dir", type=Path, help="a folder written by transformers' save_pretrained")
    p.add_argument("--out", type=Path, required=True, help="the run directory to write")
    p.add_argument("--tokenizer", type=Optional[Path], default=None,
                   help="tokenizer.json (or its folder) if it is not in DIR")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def cmd_import_hf(a) -> None:
    from .export import import_cli

    import_cli(a.dir, a.out, tokenizer=a.tokenizer, force=a.force)


# ---------------------------------------------------------------- tune / serve
def _tune_parser() -> Parser:
    from typing import Literal, Union

    p = Parser(description="Hyperparameter search (Optuna): each trial is a short training run in OUT/trial-NNN, "
                           "scored by its val loss. Writes OUT/trials.jsonl, OUT/best.json and OUT/search.png. The "
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
    p.add_argument("--pruner", type=Optional[Literal["none", "median", "halving"]], default=None,
                   help="stop bad trials at an evaluation: median (the default: worse than the median of earlier "
                        "trials at that step), halving (successive halving) or none")
    p.add_argument("--seed", type=Optional[int], default=None, help="seeds the sampler (default 0); trials train with --train.seed")
    p.add_argument("--resume", action="store_true", help="continue the search in --out with its saved settings")
    p.add_argument("--force", action="store_true", help="replace a search that is already in --out")
    _config_sections(p)
    return p


def cmd_tune(a, argv: list[str], parser: Parser) -> int:
    try:
        import optuna  # noqa: F401  (imported by tune() itself; checked here for a one-line error)

        from .tune import tune_cli
    except ImportError as e:
        raise UserError(f"`scratchgpt tune` needs Optuna ({e}): pip install 'scratchgpt[tune]'") from None
    model_cfg, train_cfg, optim_cfg = _sections(a)
    return tune_cli(space=a.space, out=a.out, data=a.data, method=a.method, trials=a.trials, model=model_cfg,
                    train=train_cfg, optim=optim_cfg, seed=a.seed, resume=a.resume, force=a.force,
                    given=set(given_keys(parser, argv)), pruner=a.pruner)


def _serve_parser() -> Parser:
    from .serve.options import ServeOptions

    p = Parser(description="Serve a run over HTTP: a chat page at /, and an OpenAI-compatible API: POST "
                           "/v1/completions, POST /v1/chat/completions (streaming as server-sent events), GET "
                           "/v1/models, GET /health. SIGTERM or Ctrl-C stops it gracefully (exit 0).")
    p.add_argument("run", type=Path, help="run directory (or a checkpoint directory)")
    _which_arg(p)
    add_options(p, ServeOptions)
    _quantize_arg(p)
    return p


def cmd_serve(a) -> None:
    from .serve.options import ServeOptions

    options = options_from(a, ServeOptions)  # (bad values: one line, before FastAPI or the model load)
    try:
        import uvicorn  # noqa: F401

        from .serve import serve
    except ImportError as e:
        raise UserError(f"`scratchgpt serve` needs FastAPI and uvicorn ({e}): pip install 'scratchgpt[serve]'") from None
    serve(a.run, options, which=a.which, quantize=a.quantize)


# name: (parser, handler, one line for `scratchgpt --help`), in pipeline order
COMMANDS: dict[str, tuple[Callable[[], Parser], Callable, str]] = {
    "prepare": (_prepare_parser, cmd_prepare, "clean and tokenize raw text into a prepared data directory"),
    "data-info": (_data_info_parser, cmd_data_info, "show a prepared data directory (manifest, counts, a sample)"),
    "train": (_train_parser, cmd_train, "pretrain a GPT (bare `scratchgpt` trains on the embedded corpus)"),
    "eval": (_eval_parser, cmd_eval, "measure a run: perplexity, accuracy/F1, BLEU/chrF"),
    "info": (_info_parser, cmd_info, "show a run: config, parameters, steps, best val loss, files"),
    "report": (_report_parser, cmd_report, "write a run's self-contained HTML report and print a summary"),
    "sample": (_sample_parser, cmd_sample, "generate text from a run"),
    "chat": (_chat_parser, cmd_chat, "chat with a run on the terminal (or piped stdin)"),
    "finetune": (_finetune_parser, cmd_finetune, "fine-tune a run: classify or sft, full, partial or LoRA"),
    "predict": (_predict_parser, cmd_predict, "label a file with a classification run"),
    "merge-lora": (_merge_lora_parser, cmd_merge_lora, "fold a LoRA run's adapter into full weights"),
    "export": (_export_parser, cmd_export, "write a run as a Hugging Face transformers model folder"),
    "import-hf": (_import_hf_parser, cmd_import_hf, "make a run from a Hugging Face transformers model folder"),
    "tune": (_tune_parser, cmd_tune, "hyperparameter search (grid, random, Bayesian) over short runs"),
    "serve": (_serve_parser, cmd_serve, "serve a run with an OpenAI-compatible HTTP API"),
}
_TAKES_ARGV = ("train", "tune", "finetune")  # their handlers see the raw argv (given keys, the recorded command)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {line}" for name, (_, _, line) in COMMANDS.items()]
    return ("usage: scratchgpt COMMAND [options]\n\nFrom raw text to your own GPT. Commands, in pipeline order:\n"
            + "\n".join(lines) + "\n\nRun `scratchgpt COMMAND --help` for a command's options.")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            argv = ["train"]  # bare `scratchgpt` = the README's main command
        else:
            print(usage())
            return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"error: unknown command {name!r}" + (f" (did you mean {close[0]}?)" if close else ""), file=sys.stderr)
        return 2
    build, handler, _ = COMMANDS[name]
    try:
        parser = build()
        parser.prog = f"scratchgpt {name}"
        if name == "train":
            use_recipe(parser, rest)
        args = parser.parse_args(rest)
        code = handler(args, rest, parser) if name in _TAKES_ARGV else handler(args)
    except UserError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # runtime.Interrupted carries what was saved and how to continue
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return code if isinstance(code, int) else 0  # train, finetune, tune: 130 after a Ctrl-C / SIGTERM that saved


if __name__ == "__main__":
    sys.exit(main())
