"""Every command and every flag explains itself in --help; options are declared once, as dataclasses."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from scratchgpt.cli import COMMANDS, main
from scratchgpt.flags import _all_parsers, field_docs


def flags_without_help() -> list[str]:
    missing = []
    for name, (build, _, _) in COMMANDS.items():
        for parser in _all_parsers(build()):
            for action in parser._actions:
                if action.help == argparse.SUPPRESS:
                    continue
                if not (action.help or "").strip():
                    missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_flag_of_every_command_has_a_description():
    assert flags_without_help() == []


def test_top_level_help_lists_every_command_with_a_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, _, line) in COMMANDS.items():
        assert line and f"  {name}" in out and line in out


@pytest.mark.parametrize("command, expected", [
    (["train"], ["--model.block_size", "Context length in tokens", "--optim.muon_ns_steps", "--train.keep_last"]),
    (["prepare"], ["--vocab-size", "--no-nfc", "--no-newlines", "--strip-gutenberg"]),
    (["sample"], ["--temperature", "--top-k", "--window-shift", "greedy"]),
    (["finetune", "sft"], ["--lora-r", "--no-mask-prompt", "--pack", "--freeze-except"]),
])
def test_help_text_comes_from_the_dataclass_docstrings(command, expected, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    for text in expected:
        assert text in out


def test_every_option_dataclass_field_is_documented():
    from scratchgpt.data import PrepareConfig
    from scratchgpt.finetune import ClassifyOptions, FinetuneOptions, SFTOptions
    from scratchgpt.generate import GenerationConfig
    from scratchgpt.model import ModelConfig
    from scratchgpt.optim import OptimConfig
    from scratchgpt.train import TrainConfig

    for cls in (ModelConfig, TrainConfig, OptimConfig, PrepareConfig, FinetuneOptions, ClassifyOptions, SFTOptions,
                GenerationConfig):
        docs = field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert undocumented == [], f"{cls.__name__}: {undocumented}"


def test_generation_defaults_are_one_declaration():
    """sample/chat flags, serve's request defaults and the Python API share GenerationConfig's defaults."""
    pytest.importorskip("fastapi")
    from scratchgpt.generate import GenerationConfig
    from scratchgpt.serve import CompletionRequest

    gen, req = GenerationConfig(), CompletionRequest(prompt="x")
    assert (req.temperature, req.top_k, req.top_p, req.repetition_penalty) == \
        (gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty)
    parser = COMMANDS["sample"][0]()
    args = parser.parse_args(["run"])
    assert (args.temperature, args.top_k, args.top_p, args.max_new_tokens) == \
        (gen.temperature, gen.top_k, gen.top_p, gen.max_new_tokens)


# Every flag users could type before the flags were built from signatures: commands may add flags, never lose
# or rename one (the --model.* / --train.* / --optim.* sections are the config classes' fields).
FLAGS = {
    "prepare": "--bpe-sample-mb --buffer-mb --char-vocab --dedup --errors --force --jsonl-field --merge "
               "--min-frequency --no-newlines --no-nfc --no-strip-control --num-parts --out --part --seed "
               "--shard-tokens --strip-gutenberg --text-field --tokenizer --tokenizer-from --val --val-fraction "
               "--vocab-size --workers",
    "data-info": "--sample-tokens --verify",
    "train": "--config --data --force --out --resume",
    "eval": "--base --batch-size --context --data --label-field --limit --max-new-tokens --quantize --task "
            "--text-field --which",
    "info": "",
    "report": "",
    "sample": "--device --max-new-tokens --num-samples --prompt --prompt-file --quantize --raw --repetition-penalty "
              "--seed --stop --stream --temperature --top-k --top-p --which --window-shift",
    "chat": "--device --max-new-tokens --quantize --repetition-penalty --seed --stop --temperature --top-k --top-p "
            "--which --window-shift",
    "finetune classify": "--batch-size --device --epochs --eval-interval --force --freeze-except --grad-clip "
                         "--label-field --lora --lora-alpha --lora-dropout --lora-r --lr --max-steps --out "
                         "--patience --pooling --resume --seed --text-field --train --val --warmup-steps "
                         "--weight-decay --which",
    "finetune sft": "--batch-size --device --epochs --eval-interval --force --freeze-except --grad-clip --lora "
                    "--lora-alpha --lora-dropout --lora-r --lr --max-steps --no-mask-prompt --out --pack --patience "
                    "--resume --seed --template --train --val --warmup-steps --weight-decay --which",
    "predict": "--base --batch-size --device --input --output --text-field --which",
    "merge-lora": "--base --force --out --which",
    "export": "--adapter --base --force --out --which",
    "import-hf": "--force --out --tokenizer",
    "tune": "--config --data --force --method --out --pruner --resume --seed --space --trials",
    "serve": "--api-key --device --host --insecure --log-level --max-queue --max-tokens-limit --port --quantize "
             "--request-timeout --which",
}


def test_every_flag_users_type_is_still_there():
    assert sorted(FLAGS) == sorted([n for n in COMMANDS if n != "finetune"] + ["finetune classify", "finetune sft"])
    for command, flags in FLAGS.items():
        name, _, mode = command.partition(" ")
        parser = COMMANDS[name][0]()
        if mode:
            parser = parser._subcommands_action.choices[mode]
        have = {o for a in parser._actions for o in a.option_strings}
        assert [f for f in flags.split() if f not in have] == [], command


def test_no_option_is_declared_by_hand_in_cli():
    """cli.py adds no flag of its own but --config (jsonargparse's config-file action): every other flag comes from
    a signature or an options dataclass (flags.add_signature / add_options)."""
    import ast
    import inspect

    import scratchgpt.cli as cli

    calls = [node for node in ast.walk(ast.parse(inspect.getsource(cli)))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"]
    assert [ast.literal_eval(c.args[0]) for c in calls] == ["--config", "--config"]  # train's and tune's


@pytest.mark.parametrize("argv, message", [
    (["eval", "r", "--which", "bogus"], "error: --which takes one of best, latest, got 'bogus'"),
    (["sample", "r", "--quantize", "int3"], "error: --quantize takes one of none, int8, int4, bf16, got 'int3'"),
    (["finetune", "sft", "r", "--val", "v"], "error: the following arguments are required: --train, --out"),
    (["export", "r", "--oot", "x"], "(did you mean --out?)"),  # (--outt: a prefix of --outtype now)
])
def test_parse_errors_are_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_default_paths_are_one_declaration(capsys):
    """Where commands write and read without --out/--data (data/default, runs/default, runs/tune): each spelled
    once in the package; `prepare --help` shows the same default `train` reads."""
    import ast
    from collections import Counter
    from pathlib import Path

    import scratchgpt
    from scratchgpt.data import default_data_dir  # noqa: F401 (the reader of data/default)
    from scratchgpt.data.prepare import DEFAULT_DATA_DIR

    wanted = {"data/default", "runs/default", "runs/tune"}
    seen: Counter = Counter()
    for path in Path(scratchgpt.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in wanted:
                seen[node.value] += 1
    assert seen == Counter({name: 1 for name in wanted})
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert f"default: {DEFAULT_DATA_DIR}" in " ".join(capsys.readouterr().out.split())


def test_help_quotes_no_measured_figure():
    """Speeds live in BENCHMARKS.md (issue 27): no flag's help quotes one (a "1.6x" goes stale silently)."""
    import re

    quoted = []
    for name, (build, _, _) in COMMANDS.items():
        for parser in _all_parsers(build()):
            for action in parser._actions:
                if re.search(r"\d(\.\d+)?x\b|tok/s|tokens/s", action.help or ""):
                    quoted.append(f"{name} {'/'.join(action.option_strings)}: {action.help}")
    assert quoted == []
