"""`scratchgpt` command line: each subcommand parses its flags and calls one plain function.

Every option is declared once, in the function the command calls (its signature: name, type,
default; its docstring: the help line) or in the typed dataclass that function takes (a docstring
per field), and the flags are built from that (flags.py): dash-named flags (`--batch-size`,
`--no-mask-prompt`) for the commands' own parameters and for EvalOptions, GenerationConfig,
PrepareConfig, FinetuneOptions, ClassifyOptions and SFTOptions; jsonargparse sections `--model.*`,
`--train.*`, `--optim.*` (ModelConfig, TrainConfig, OptimConfig: every field also a config-file
key) for `train` and `tune`. This module adds only what is the command line's own: each command's
description, which parameters are positional, and the help line of a parameter whose function
does not describe it (HELP). Heavy imports (torch) happen when a command's parser is built, so
`scratchgpt --help` is quick.
"""

from __future__ import annotations

import difflib
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from . import UserError, cpu_wait
from .faults import NamedStdout, is_machine_fault, one_line, quiet_stdout
from .flags import ConfigFile, Parser, _one_line, add_signature, call, field_docs, kwargs_for, unescape  # noqa: F401 (field_docs)

# The help line of a parameter many commands share, where the function's docstring has none.
HELP = {
    "run": "run directory (or a checkpoint directory)",
    "which": "checkpoint; best falls back to latest",
    "base": "LoRA runs: the base run, if it moved",
    "device": "cpu, cuda, ...; auto: cuda > mps > cpu",
    "quantize": "weight-only quantized Linear layers for faster CPU decoding of large models: bf16 (half the bytes, "
                "fp32 sums), int8, or int4 (faster still, at a larger quality cost; CPUs and Ampere+ GPUs); the speeds "
                "are in BENCHMARKS.md",
    "force": "replace --out if it exists",
}


def _parser(description: str, fn: Callable, *, positional: tuple[str, ...] = ("run",), help: dict = {},
            **options: Any) -> Parser:
    """A command's parser: its description, and the flags of `fn`'s signature (flags.add_signature)."""
    p = Parser(description=description)
    add_signature(p, fn, positional=positional, help={**HELP, **help}, **options)
    return p


# ---------------------------------------------------------------- data
def _prepare_parser() -> Parser:
    from .data import prepare
    from .data.prepare import DEFAULT_DATA_DIR

    return _parser("Clean and tokenize raw text into train.bin / val.bin (or shards) / tokenizer.json / meta.json; "
                   "or, with --merge, combine the parts of a corpus prepared apart.", prepare, positional=("inputs",),
                   skip=("progress", "stdin"), defaults={"out": DEFAULT_DATA_DIR},
                   help={"inputs": "files, directories, globs, .jsonl, .parquet, datasets save_to_disk folders, "
                                   ".gz/.bz2/.xz/.zst text or JSONL, or - for stdin; none: embedded corpus (or "
                                   "--hf-dataset alone); with --merge: the part directories",
                         "out": "output directory"})


def cmd_prepare(a) -> None:
    from .data import prepare

    call(prepare, a)


def _data_info_parser() -> Parser:
    from .data import data_info

    return _parser("Show a prepared data directory: manifest, token counts, a decoded sample.", data_info,
                   positional=("data_dir",))


def cmd_data_info(a) -> None:
    from .data import data_info

    print(call(data_info, a))


# ---------------------------------------------------------------- train / eval / info
RECIPE = Path(__file__).parent / "recipes" / "default.yaml"
SECTIONS = ("model", "train", "optim")  # the config sections of train and tune: --model.*, --train.*, --optim.*
_TRAIN_HELP = {"data": "prepared data dir (default: embedded corpus)", "out": "run directory (default: runs/default)",
               "resume": "continue RUN/latest bit-exactly", "force": "replace a run that is already in --out"}


def _train_parser() -> Parser:
    from .train import train

    p = Parser(description="Train a GPT. Every --model.*/--train.*/--optim.* flag is also a config-file key. "
                           "Without --config the defaults are the project's best-known CPU recipe (scratchgpt/"
                           f"recipes/{RECIPE.name}: 1000 steps, ~3 min on 2 cores; shown below); with --config FILE "
                           "they are the config classes' own defaults, then FILE (--config '{}': those defaults alone).")
    p.add_argument("--config", action=ConfigFile, help="YAML/JSON config file (replaces the built-in recipe)")
    add_signature(p, train, sections=SECTIONS, skip=("overrides", "command", "on_eval"), help=_TRAIN_HELP)
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
    from .train import train

    kwargs = kwargs_for(train, a)
    return tuple(kwargs[name] for name in SECTIONS)


def given_keys(parser: Parser, argv: list[str]) -> dict[str, Any]:
    """The dotted config keys the user set, on the command line or in --config, with their values
    (a value equal to the default counts too): what overrides a saved config on --resume."""
    explicit = parser.parse_args(argv, defaults=False)

    def walk(ns: Any, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in vars(ns).items():
            if hasattr(value, "__dict__") and key in SECTIONS:
                out.update(walk(value, f"{key}."))
            elif prefix:
                out[prefix + key] = value
        return out

    return walk(explicit, "")


def cmd_train(a, argv: list[str], parser: Parser) -> int:
    from .runtime import INTERRUPTED
    from .train import train

    result = call(train, a, overrides=given_keys(parser, argv), command=shlex.join(["scratchgpt", "train", *argv]))
    return 130 if result["stop_reason"] == INTERRUPTED else 0


def _eval_parser() -> Parser:
    from .evaluate import evaluate_cli

    return _parser("Evaluate a run; prints JSON and saves RUN/eval-<task>.json. lm: loss, perplexity, bits per byte; "
                   "classify: accuracy, macro-F1, confusion matrix; generate: BLEU, chrF.", evaluate_cli)


def cmd_eval(a) -> None:
    from .evaluate import evaluate_cli

    call(evaluate_cli, a)


def _info_parser() -> Parser:
    from .runs.info import run_info

    return _parser("Show a run: config, kind, parameter count, steps, best val loss, files.", run_info,
                   help={"run": "run directory"})


def cmd_info(a) -> None:
    from .runs.info import run_info

    call(run_info, a)


def _report_parser() -> Parser:
    from .report import report_cli

    return _parser("Write RUN/report.html (config, data, curves, samples, evaluations, environment: one self-contained "
                   "file) and print a markdown summary.", report_cli, skip=("out",),
                   help={"run": "run directory (pretraining or fine-tuning)"})


def cmd_report(a) -> None:
    from .report import report_cli

    call(report_cli, a, out=sys.stdout)


# ---------------------------------------------------------------- finetune / predict / merge-lora
def _finetune_parser() -> Parser:
    from .finetune import finetune_classify, finetune_sft

    p = Parser(prog="scratchgpt finetune",  # before add_subcommand: the sub-parsers' usage lines copy it
               description="Fine-tune a run: `classify` (text -> label) or `sft` (prompt -> response).")
    sub = p.add_subcommands(dest="mode", help="the task: classify (text -> label) or sft (prompt -> response)")
    common = dict(positional=("base",), flags={"train_file": "--train", "val_file": "--val"}, skip=("log", "command"))
    sub.add_subcommand("classify", _parser(
        "Classifier: a head on the last (or mean) hidden state; reports accuracy, macro-F1 and the confusion matrix "
        "on val; keeps the best checkpoint.", finetune_classify, **common),
        help="text -> label: a classification head on the pretrained GPT")
    sub.add_subcommand("sft", _parser(
        "Supervised fine-tuning on prompt/response (or messages) JSONL, loss on responses only; the chat template "
        "is stored in the checkpoint for `chat`.", finetune_sft, **common),
        help="prompt -> response: supervised fine-tuning in a chat template")
    return p


def cmd_finetune(a, argv: list[str], parser: Parser) -> int:
    from .finetune import finetune_classify, finetune_sft
    from .runtime import INTERRUPTED

    fn = finetune_classify if a.mode == "classify" else finetune_sft
    result = call(fn, getattr(a, a.mode), command=shlex.join(["scratchgpt", "finetune", *argv]))
    return 130 if result["stop_reason"] == INTERRUPTED else 0


def _predict_parser() -> Parser:
    from .finetune import predict

    return _parser("Label every row of a file with a classification run: label and probabilities.", predict,
                   skip=("stdout",))


def cmd_predict(a) -> None:
    from .finetune import predict

    call(predict, a)


def _merge_lora_parser() -> Parser:
    from .finetune import merge_lora

    return _parser("Fold a LoRA run's adapter into its base weights: a full checkpoint of its own.", merge_lora)


def cmd_merge_lora(a) -> None:
    from .finetune import merge_lora

    call(merge_lora, a)


# ---------------------------------------------------------------- sample / chat
def _generation_config(a):
    """GenerationConfig from the parsed flags; a typed `\\n` or `\\t` in --stop is the character."""
    from .flags import options_from
    from .generate import GenerationConfig

    return options_from(a, GenerationConfig, stop=tuple(unescape(s) for s in (a.stop or ())))


def _sample_parser() -> Parser:
    from .chat import sample_cli

    return _parser("Generate text from a trained run; prints the prompt and its continuation.", sample_cli,
                   skip=("out",), flags={"stream_output": "--stream"})


def cmd_sample(a) -> None:
    from .chat import sample_cli

    call(sample_cli, a, gen=_generation_config(a))


def _chat_parser() -> Parser:
    from .chat import chat_cli

    return _parser("Chat with a run (its chat template if fine-tuned for chat); reads stdin, /reset, /exit.", chat_cli)


def cmd_chat(a) -> None:
    from .chat import chat_cli

    call(chat_cli, a, gen=_generation_config(a))


# ---------------------------------------------------------------- export / import-hf
def _export_parser() -> Parser:
    from .export import export_cli

    return _parser("Write a run as a Hugging Face transformers folder (config.json, model.safetensors, tokenizer "
                   "files, generation_config.json, a model card) that AutoModelForCausalLM and AutoTokenizer load "
                   "with no trust_remote_code.", export_cli)


def cmd_export(a) -> None:
    from .export import export_cli

    call(export_cli, a)


def _import_hf_parser() -> Parser:
    from .export import import_cli

    return _parser("Make a scratchgpt run from a transformers folder (GPT-2, OPT, GPT-NeoX, Llama, Arcee, Qwen2, Qwen3, "
                   "Mistral, Gemma, Phi-3; model.safetensors or sharded; fp32/fp16/bf16). pytorch_model.bin is refused "
                   "(unpickling).",
                   import_cli, positional=("hf_dir",))


def cmd_import_hf(a) -> None:
    from .export import import_cli

    call(import_cli, a)


# ---------------------------------------------------------------- tune / serve
def _tune_parser() -> Parser:
    from .tune import tune

    p = Parser(description="Hyperparameter search (Optuna): each trial is a short training run in OUT/trial-NNN, "
                           "scored by its val loss. Writes OUT/trials.jsonl, OUT/best.json and OUT/search.png. The "
                           "--model.*/--train.*/--optim.* flags (or --config) set the base config of every trial; "
                           f"without --config it starts from train's recipe (scratchgpt/recipes/{RECIPE.name}), "
                           "and it is checked before the first trial.")
    p.add_argument("--config", action=ConfigFile, help="YAML/JSON config file (base config, and any of these "
                                                             "options; replaces the built-in recipe)")
    add_signature(p, tune, sections=SECTIONS, skip=("given",))
    return p


def cmd_tune(a, argv: list[str], parser: Parser) -> int:
    try:
        import optuna  # noqa: F401  (imported by tune() itself; checked here for a one-line error)

        from .tune import tune, tune_cli
    except ImportError as e:
        raise UserError(f"`scratchgpt tune` needs Optuna ({e}): pip install 'scratchgpt[tune]'") from None
    return tune_cli(**kwargs_for(tune, a, given=set(given_keys(parser, argv))))


def _serve_parser() -> Parser:
    from .checkpoint import Which
    from .quantize import Quantize

    try:
        from .serve import serve
    except ImportError as e:
        raise UserError(f"`scratchgpt serve` needs FastAPI and uvicorn ({e}): pip install 'scratchgpt[serve]'") from None
    # (serve()'s signature types which and quantize as plain strings: their choices here)
    return _parser("Serve a run over HTTP: a chat page at /, and an OpenAI-compatible API: POST /v1/completions, POST "
                   "/v1/chat/completions (streaming as server-sent events), GET /v1/models, GET /health. SIGTERM or "
                   "Ctrl-C stops it gracefully (exit 0).", serve, types={"which": Which, "quantize": Quantize})


def cmd_serve(a) -> None:
    from .serve import serve

    call(serve, a)  # (ServeOptions is built, and checked, before the model loads)


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


_COMPUTES = ("train", "eval", "sample", "chat", "finetune", "predict", "tune", "serve")  # torch's threads at work


def _hash_weights_early(rest: list[str]) -> None:
    """Start the sha256 of the weights a loading command will verify (RUN's best, else latest, or RUN itself if it is
    a checkpoint; --which latest: latest) on another core while this one imports torch: a fresh `sample` of a 538 MB
    model prints its first token ~0.4 s sooner. A guess that misses (a flag's value taken for RUN) costs nothing."""
    from .runs.files import MODEL_FILE
    from .utils import sha256_early

    run = next((Path(a) for a in rest if not a.startswith("-") and Path(a).is_dir()), None)
    latest = "--which=latest" in rest or any(a == "--which" and b == "latest" for a, b in zip(rest, rest[1:]))
    for ckpt in ([run, run / "latest"] if latest else [run, run / "best", run / "latest"]) if run else []:
        if (ckpt / MODEL_FILE).is_file():
            sha256_early([ckpt / MODEL_FILE])
            return


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
        print(f"error: {_one_line(f'unknown command {name!r}')}" + (f" (did you mean {close[0]}?)" if close else ""),
              file=sys.stderr)
        return 2
    build, handler, _ = COMMANDS[name]
    if name in _COMPUTES:  # before anything loads torch (libgomp reads its spin count once), and before the
        cpu_wait.choose()  # early hash below starts: its thread would count as another process's load
    if name in ("sample", "chat", "serve"):
        _hash_weights_early(rest)
    stdout, sys.stdout = sys.stdout, NamedStdout(sys.stdout)
    try:
        parser = build()
        parser.prog = f"scratchgpt {name}"
        if name in ("train", "tune"):  # one set of defaults: a search starts from what `train` would run
            use_recipe(parser, rest)
        args = parser.parse_args(rest)
        code = handler(args, rest, parser) if name in _TAKES_ARGV else handler(args)
        sys.stdout.flush()  # a full disk under stdout fails here, inside the try, not at exit
    except UserError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # runtime.Interrupted carries what was saved and how to continue
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        quiet_stdout()
        return 0
    except OSError as e:  # a full disk, a size limit, a read-only or impossible path: the machine's, said in one line
        if not is_machine_fault(e):
            raise
        if e.filename == "standard output":
            quiet_stdout()
        print(f"error: {_one_line(one_line(e))}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = stdout
    return code if isinstance(code, int) else 0  # train, finetune, tune: 130 after a Ctrl-C / SIGTERM that saved


def run() -> None:
    """The `scratchgpt` command: main(), then exit_fast with its status."""
    exit_fast(main())


def exit_fast(code: int) -> None:
    """Exit with `code`, skipping the interpreter's teardown once what a normal exit does that can matter is done:
    no other non-daemon thread alive, no process group open, no profiler, tracer or debugger watching (cProfile
    writes its file after the program returns), atexit handlers run, Python's and C's output buffers flushed. The
    teardown frees each of the ~1,000 modules torch loads and every object one by one: 0.3 s after `import torch`
    alone, 0.7 s after a training run, time a user waits for after the work is saved. (Every file scratchgpt
    writes is closed, and synced, where it is written.) Otherwise, or when a flush fails, a normal exit."""
    import atexit
    import os
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    dist = sys.modules.get("torch.distributed")
    if others or _watched() or (dist is not None and dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    atexit._run_exitfuncs()  # (and clears them: a fallback exit does not run them twice)
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # (None: the descriptor was closed when Python started)
                stream.flush()
    except (OSError, ValueError, AttributeError):  # a broken or closed stream: Python's own exit reports it
        sys.exit(code)
    _flush_c_stdio()
    os._exit(code)


def _watched() -> bool:
    """A profiler, tracer or debugger runs this process: sys.setprofile/settrace ones, and from Python 3.12 the
    sys.monitoring tools (cProfile is one), and pdb (which drops its tracer while no breakpoint is set)."""
    monitoring = getattr(sys, "monitoring", None)
    tools = monitoring is not None and any(monitoring.get_tool(i) for i in range(6))
    return sys.getprofile() is not None or sys.gettrace() is not None or tools or "pdb" in sys.modules


def _flush_c_stdio() -> None:
    """fflush(NULL): what C libraries printed through stdio (os._exit skips libc's exit, which would flush it)."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to call by that name (Windows): nothing buffered
        pass


if __name__ == "__main__":
    run()
