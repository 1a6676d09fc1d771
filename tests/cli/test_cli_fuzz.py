"""The command line fuzzed in process (Hypothesis): hostile values for every --model.*, --train.* and --optim.*
field and the main flags of prepare, sample, finetune, eval and tune (boundaries, negative, zero, huge, NaN/inf,
wrong types, existing outputs). The invariant: exit 0, or exactly one `error:` line and a non-zero exit; never a
traceback or an exception out of main(); never a change to a file that existed before.

A valid configuration that starts long work is stopped by a per-example time budget (counted as "ran").
SCRATCHGPT_FUZZ_EXAMPLES=N runs N random examples per command instead of the quick, fixed default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import typing
from pathlib import Path
from typing import Literal, Union

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import count_fuzz
from scratchgpt.cli import main
from scratchgpt.flags import _flag
from scratchgpt.data import PrepareConfig
from scratchgpt.finetune import ClassifyOptions, FinetuneOptions, SFTOptions
from scratchgpt.generate import GenerationConfig
from scratchgpt.model import ModelConfig
from scratchgpt.optim import OptimConfig
from scratchgpt.train import TrainConfig

pytestmark = pytest.mark.slow  # subprocesses, signals, torchrun or many fuzz examples

LONG = os.environ.get("SCRATCHGPT_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(LONG or 0) or 40, deadline=None, derandomize=not LONG, database=None,
                suppress_health_check=list(HealthCheck))
BUDGET_S = 3.0

# ---------------------------------------------------------------- hostile values, from the type hints
INTS = ["-1", "0", "1", "2", "3", str(2**31), str(2**63), str(10**30), str(-(2**63) - 1)]
FLOATS = ["-1.0", "-0.0", "0", "1e-300", "0.5", "1", "2.5", "1e300", "nan", "inf", "-inf", "1e999"]
JUNK = ["abc", "", "1.5", "true", "null", "[1, 2]", "{}", "0x10", "1_000", "é"]
BOOLS = ["true", "false", "yes", "maybe", "1", "0", "null"]


def hostile(hint) -> st.SearchStrategy[str]:
    """Command-line text for a value of type `hint`: good values, edge cases and junk."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return st.one_of(*[hostile(a) for a in args if a is not type(None)], st.just("null"))
    if origin is Literal:
        return st.sampled_from([str(a) for a in args] + ["bogus"] + JUNK)
    if origin in (tuple, list):
        return st.sampled_from(["[0.9, 0.99]", "[0.9]", "[1.5, 0.9]", "[nan, 0.9]", "[-1, 0.5]", "[]", "abc"])
    if hint is bool:
        return st.sampled_from(BOOLS)
    if hint is int:
        return st.sampled_from(INTS + JUNK)
    if hint is float:
        return st.sampled_from(FLOATS + JUNK)
    return st.one_of(st.sampled_from(JUNK), st.text(max_size=8))


def field_flags(cls, flag=None, skip=()) -> dict[str, st.SearchStrategy]:
    """Each field's flag and hostile values: `flag(name)` for config sections; without it the dash-named flags
    of cli.add_options, where a boolean is a switch given alone (None)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, st.SearchStrategy] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        if flag is not None:
            out[flag(f.name)] = hostile(hints[f.name])
        else:
            out[_flag(f)] = st.none() if hints[f.name] is bool else hostile(hints[f.name])
    return out


SECTIONS = {**field_flags(ModelConfig, lambda n: f"--model.{n}"), **field_flags(TrainConfig, lambda n: f"--train.{n}"),
            **field_flags(OptimConfig, lambda n: f"--optim.{n}"),
            # compile=true is valid and only costs torch.compile's time: every other value is tried
            "--train.compile": st.sampled_from(["false", "maybe", "0", "null", "", "abc"])}
TINY = {"--model.n_layer": "1", "--model.n_head": "2", "--model.n_embd": "16", "--model.block_size": "16",
        "--train.batch_size": "4", "--train.max_iters": "2", "--train.eval_interval": "2", "--train.eval_iters": "1",
        "--train.sample_tokens": "0", "--train.progress": "false", "--train.tensorboard": "false",
        "--train.plot": "false", "--train.final_eval": "false", "--train.peak_flops": "1", "--train.threads": "1",
        "--train.max_time_s": "1", "--train.report": "false", "--optim.warmup_iters": "1"}


@st.composite
def flags(draw, choices: dict, base: dict, max_size: int = 3) -> list[str]:
    """`base` with one to `max_size` of `choices` given hostile values, as --flag=value arguments."""
    picked = draw(st.lists(st.sampled_from(sorted(choices)), min_size=1, max_size=max_size, unique=True))
    values = {**base, **{name: draw(choices[name]) for name in picked}}
    return [f"{k}={v}" if v is not None else k for k, v in values.items()]


# ---------------------------------------------------------------- running main() under the invariant
class _OutOfTime(BaseException):
    pass


def _alarm(signum, frame):
    raise _OutOfTime


def run(command: str, argv: list[str]) -> None:
    """main(argv) in process, checked against the invariant; the outcome is counted for the record."""
    err, threads = io.StringIO(), torch.get_num_threads()
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            signal.setitimer(signal.ITIMER_REAL, BUDGET_S)
            try:
                code = main(argv)
            except SystemExit as e:  # the parser's own errors exit through sys.exit, as argparse does
                code = e.code
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _OutOfTime:
        code = None  # a valid configuration started long work
    finally:
        signal.signal(signal.SIGALRM, old)
        torch.set_num_threads(threads)
    text = err.getvalue()
    outcome = "ran (time budget)" if code is None else "exit 0" if code == 0 else "error"
    count_fuzz(f"CLI {command}", outcome)
    assert "Traceback" not in text, f"{argv}\n{text}"
    if os.environ.get("SCRATCHGPT_FUZZ_SHOW"):
        print(command, code, text.strip().splitlines()[-1:] if text.strip() else "", file=sys.__stderr__)
    if code not in (None, 0):
        lines = [ln for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], f"{argv}\n{text}"


def digest(path: Path, skip: tuple[str, ...] = ()) -> str:
    """A hash of every file under `path` (names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        if not p.name.startswith(skip):
            h.update(str(p.relative_to(path) if p != path else p.name).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory, char_data, tiny_run):
    """What exists before the fuzzing and must stay as it is: a data dir, a run, a plain file, input files."""
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "run"
    shutil.copytree(tiny_run, run)
    (root / "file.txt").write_text("precious\n", encoding="utf-8")
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 40, encoding="utf-8")
    rows = [{"text": w, "label": "ab"[i % 2]} for i, w in enumerate("the fox and a dog sat on it".split())]
    (root / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pairs = [{"prompt": w, "response": w} for w in "the fox and a dog sat on it".split()]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs), encoding="utf-8")
    (root / "template.json").write_text(json.dumps({"user": "Q:{prompt}\nA:", "assistant_end": "\n"}), encoding="utf-8")
    protected = [char_data, run, root / "file.txt", root / "corpus.txt", root / "cls.jsonl", root / "sft.jsonl",
                 root / "template.json"]
    return {"root": root, "data": char_data, "run": run, "protected": protected}


@contextlib.contextmanager
def unchanged(world, skip: tuple[str, ...] = ()):
    """A fresh output dir for one example; every protected path must hash the same afterwards."""
    before = [digest(p, skip) for p in world["protected"]]
    scratch = Path(tempfile.mkdtemp(dir=world["root"]))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert [digest(p, skip) for p in world["protected"]] == before, "an existing file was changed"


def out_dir(draw, world, scratch: Path) -> str:
    """Mostly a new directory; sometimes an existing run, data dir or file (which must be refused)."""
    pick = draw(st.sampled_from(["new"] * 5 + ["run", "data", "file"]))
    return str({"new": scratch / "out", "run": world["run"], "data": world["data"],
                "file": world["root"] / "file.txt"}[pick])


# ---------------------------------------------------------------- the commands
@FUZZ
@given(data=st.data())
def test_train(world, data):
    with unchanged(world) as scratch:
        argv = ["train", "--data", str(world["data"]), "--out", out_dir(data.draw, world, scratch),
                *data.draw(flags(SECTIONS, TINY))]
        run("train", argv)


PREPARE = {**field_flags(PrepareConfig, skip=("force", "val")),
           "--val": st.sampled_from(["corpus", "missing"])}


@FUZZ
@given(data=st.data())
def test_prepare(world, data):
    with unchanged(world) as scratch:
        argv = data.draw(flags(PREPARE, {"--tokenizer": "char", "--workers": "1"}))
        argv = [a.replace("=corpus", f"={world['root'] / 'corpus.txt'}").replace("=missing", f"={scratch / 'no.txt'}")
                for a in argv]
        source = data.draw(st.sampled_from([world["root"] / "corpus.txt", scratch / "missing.txt", world["data"]]))
        run("prepare", ["prepare", str(source), "--out", out_dir(data.draw, world, scratch), *argv])


GENERATION = {**field_flags(GenerationConfig, skip=("stop",)),
              "--stop": st.sampled_from(["x", "\\n", ""]), "--num-samples": st.sampled_from(INTS + JUNK),
              "--prompt": st.text(max_size=12), "--which": st.sampled_from(["best", "latest", "bogus"]),
              "--quantize": st.sampled_from(["none", "int8", "int4", "bogus"]),
              "--device": st.sampled_from(["cpu", "auto", "cuda", "bogus", ""]),
              "--stream": st.none(), "--raw": st.none()}


@FUZZ
@given(data=st.data())
def test_sample(world, data):
    with unchanged(world):
        run("sample", ["sample", str(world["run"]), *data.draw(flags(GENERATION, {"--max-new-tokens": "4",
                                                                                   "--device": "cpu"}))])


EVAL = {"--task": st.sampled_from(["lm", "classify", "generate", "bogus"]), "--context": st.sampled_from(INTS + JUNK),
        "--batch-size": st.sampled_from(INTS + JUNK), "--max-new-tokens": st.sampled_from(INTS + JUNK),
        "--limit": st.sampled_from(INTS + JUNK), "--which": st.sampled_from(["best", "latest", "bogus"]),
        "--data": st.sampled_from(["data", "corpus", "cls", "sft", "missing"]),
        "--quantize": st.sampled_from(["none", "int8", "bogus"]), "--text-field": st.sampled_from(["text", "x", ""])}


@FUZZ
@given(data=st.data())
def test_eval(world, data):
    names = {"data": world["data"], "corpus": world["root"] / "corpus.txt", "cls": world["root"] / "cls.jsonl",
             "sft": world["root"] / "sft.jsonl", "missing": world["root"] / "missing"}
    with unchanged(world, skip=("eval",)):  # eval-<task>.json in the run is eval's own output
        argv = [a.split("=")[0] + "=" + str(names[a.split("=")[1]]) if a.startswith("--data=") else a
                for a in data.draw(flags(EVAL, {"--data": "data", "--max-new-tokens": "2"}))]
        run("eval", ["eval", str(world["run"]), *argv])


FINETUNE = {**field_flags(FinetuneOptions), **field_flags(ClassifyOptions),
            "--which": st.sampled_from(["best", "latest", "bogus"])}
SFT_FLAGS = {**field_flags(FinetuneOptions), **field_flags(SFTOptions, skip=("template",)),
             "--template": st.sampled_from(["missing.json", "sft.jsonl", "template.json"])}


@FUZZ
@given(data=st.data())
def test_finetune(world, data):
    mode = data.draw(st.sampled_from(["classify", "sft"]))
    rows = world["root"] / ("cls.jsonl" if mode == "classify" else "sft.jsonl")
    base = {"--max-steps": "2", "--batch-size": "4", "--device": "cpu"}
    if mode == "sft":  # a short template: the tiny run's 32-token context leaves room for the responses
        base["--template"] = "template.json"
    with unchanged(world) as scratch:
        argv = data.draw(flags(FINETUNE if mode == "classify" else SFT_FLAGS, base))
        argv = [a.replace("=sft.jsonl", f"={rows}").replace("=missing.json", f"={scratch / 'no.json'}")
                .replace("=template.json", f"={world['root'] / 'template.json'}") for a in argv]
        run("finetune", ["finetune", mode, str(world["run"]), "--train", str(rows), "--val", str(rows),
                         "--out", out_dir(data.draw, world, scratch), *argv])


TUNE = {"--trials": st.sampled_from(INTS + JUNK), "--seed": st.sampled_from(INTS + JUNK),
        "--method": st.sampled_from(["grid", "random", "bayes", "bogus"]),
        "--space": st.sampled_from(['{"optim.lr": [0.001, 0.002]}', '{"optim.lr": {"low": 1, "high": 0}}',
                                    '{"model.n_layer": {"low": 1, "high": 2}}', '{"nope.x": [1]}', "[1, 2]", "{",
                                    '{"optim.lr": {"low": 0.001, "high": 0.01, "log": true}}', "{}", "missing.yaml"]),
        **{k: v for k, v in SECTIONS.items() if k.startswith(("--optim.", "--train.max_iters", "--model.n_"))}}


@settings(FUZZ, max_examples=int(LONG or 0) or 20)  # a valid example runs a trial and draws search.png
@given(data=st.data())
def test_tune(world, data):
    pytest.importorskip("optuna")
    with unchanged(world) as scratch:
        argv = data.draw(flags(TUNE, {**TINY, "--trials": "1", "--method": "random",
                                      "--space": '{"optim.lr": [0.001]}'}, max_size=2))
        run("tune", ["tune", "--data", str(world["data"]), "--out", out_dir(data.draw, world, scratch), *argv])
