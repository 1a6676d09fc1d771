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
