"""numerics.py: the CPU's training dtype, settled once per machine (threads and Newton-Schulz: test_optim.py,
train/test_reproducible.py, train/test_distributed.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import cli, tiny_flags
from scratchgpt import numerics
from scratchgpt.model import GPT, ModelConfig

CPU = torch.device("cpu")


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=17, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.1))


def _auto(**kw):
    return SimpleNamespace(dtype="auto", **kw)


@pytest.mark.parametrize("times, chosen", [
    ({"float32": 1.0, "bfloat16": 0.5}, "bfloat16"),
    ({"float32": 1.0, "bfloat16": 0.9}, "float32"),  # within the margin: not worth bf16's rounding
    ({"float32": 1.0, "bfloat16": 4.0}, "float32"),
])
def test_auto_on_a_cpu_is_measured_once_per_machine(monkeypatch, tmp_path, times, chosen):
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(numerics, "cpu_has_bf16", lambda: True)
    calls = []
    monkeypatch.setattr(numerics, "time_train_step", lambda model, batch, block: calls.append((batch, block)) or times)
    dtype, source, got = numerics.cpu_dtype_for(_auto(), _model(), 4, CPU, None)
    assert (dtype, got, calls) == (chosen, times, [(4, 8)]) and "measured" in source
    # a later process on a busy machine reads the first one's answer, whatever its own timing would say
    monkeypatch.setattr(numerics, "time_train_step", lambda *a: pytest.fail("measured again"))
    assert numerics.cpu_dtype_for(_auto(), _model(), 4, CPU, None)[:2] == (chosen, f"cached in {tmp_path}/machine_choices.json")
    # another batch shape is another question
    monkeypatch.setattr(numerics, "time_train_step", lambda *a: {"float32": 1.0, "bfloat16": 2.0})
    assert numerics.cpu_dtype_for(_auto(), _model(), 8, CPU, None)[0] == "float32"


def test_what_auto_is_without_measuring(monkeypatch):
    monkeypatch.setattr(numerics, "time_train_step", lambda *a: pytest.fail("measured"))
    assert numerics.cpu_dtype_for(SimpleNamespace(dtype="bfloat16"), _model(), 4, CPU, None)[0] == "bfloat16"  # the flag
    assert numerics.cpu_dtype_for(_auto(), _model(), 4, torch.device("meta"), None)[0] == "auto"  # a GPU's own rule
    # a resume keeps its checkpoint's dtype (an `auto` given again included); one from before it was recorded, fp32
    assert numerics.cpu_dtype_for(_auto(), _model(), 4, CPU, {"step": 3, "dtype": "bfloat16"})[:2] == \
        ("bfloat16", "the checkpoint's")
    assert numerics.cpu_dtype_for(_auto(), _model(), 4, CPU, {"step": 3})[0] == "float32"
    # under FSDP a whole copy of the model might not fit where its shards do
    assert numerics.cpu_dtype_for(_auto(), _model(), 4, CPU, None, "fsdp")[0] == "float32"
    monkeypatch.setattr(numerics, "cpu_has_bf16", lambda: False)  # emulated bf16 would only be slower
    assert numerics.cpu_dtype_for(_auto(), _model(), 4, CPU, None)[:2] == ("float32", "no bf16 arithmetic in this CPU")


def test_timing_a_step_leaves_the_model_and_the_random_stream_alone():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    times = numerics.time_train_step(model, 2, 8, rounds=1)
    assert set(times) == {"float32", "bfloat16"} and all(0 < t < 10 for t in times.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.slow
def test_a_cpu_run_records_the_settled_dtype_and_a_resume_keeps_it(tmp_path, char_data, monkeypatch, capsys):
    """auto becomes a concrete dtype in config.json (what `--config RUN/config.json` repeats elsewhere), said in
    the start-up summary; bf16 autocast trains and its final eval is fp32's."""
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(numerics, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(numerics, "time_train_step", lambda *a: {"float32": 1.0, "bfloat16": 0.5})
    flags = tiny_flags(**{"train.dtype": "auto", "train.max_iters": 4, "train.eval_interval": 2,
                          "train.final_eval": "true"})
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / "run", *flags)
    assert code == 0, err
    assert "bfloat16 autocast (measured" in err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["dtype"] == "bfloat16"
    monkeypatch.setattr(numerics, "time_train_step", lambda *a: {"float32": 0.5, "bfloat16": 1.0})
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / "run", "--resume",
                       "--train.max_iters", "6", "--optim.decay_iters", "6")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["dtype"] == "bfloat16"
    assert "bfloat16 autocast" in err
    # `auto` given again (a flag, or a recipe's yaml through --config) keeps the checkpoint's dtype
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / "run", "--resume",
                       "--train.dtype", "auto", "--train.max_iters", "8", "--optim.decay_iters", "8")
    assert code == 0, err
    assert "bfloat16 autocast (the checkpoint's)" in err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["dtype"] == "bfloat16"
