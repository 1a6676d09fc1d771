"""Same config + seed + machine = same run, with the default recipe (Muon): on a machine that got busy between
two runs, and across a resume. (Ranks that would choose differently: test_distributed.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, tiny_flags

pytestmark = pytest.mark.slow  # a few short trainings


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]


def new_process(monkeypatch) -> None:
    """Forget what this process measured: the next run reads the machine's cache, as a new process would."""
    from scratchgpt import muon, runtime

    monkeypatch.setattr(muon, "_NS_CHOICES", {})
    monkeypatch.setattr(runtime, "_THREADS", {})
    monkeypatch.setattr(runtime, "_MEASURED", {})


def test_same_seed_gives_the_same_losses_on_a_busy_machine(tmp_path, char_data, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path / "cache"))  # this machine, measured afresh
    before = torch.get_num_threads()
    flags = tiny_flags(**{"train.max_iters": 10, "train.eval_interval": 10, "train.log_interval": 1,
                          "train.dtype": "auto"})  # the CPU's dtype settled too (measured where it has bf16)
    hog = None
    try:
        new_process(monkeypatch)
        code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / "quiet", *flags)
        assert code == 0, err
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a busy core from now on
        new_process(monkeypatch)
        code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / "busy", *flags)
        assert code == 0, err
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        torch.set_num_threads(before)
    quiet, busy = (json.loads((tmp_path / r / "config.json").read_text()) for r in ("quiet", "busy"))
    assert quiet["optim"]["ns_dtype"] in ("float32", "bfloat16") and quiet["train"]["threads"] >= 1
    assert quiet["train"]["dtype"] in ("float32", "bfloat16")
    assert [busy["optim"]["ns_dtype"], busy["train"]["threads"], busy["train"]["dtype"]] == \
        [quiet["optim"]["ns_dtype"], quiet["train"]["threads"], quiet["train"]["dtype"]]
    assert "cached in" in err  # the busy run measured nothing
    assert len(losses(tmp_path / "quiet")) == 10 and losses(tmp_path / "busy") == losses(tmp_path / "quiet")


@pytest.mark.parametrize("sampling", ["random", "shuffle"])
def test_twenty_steps_then_resume_to_forty_equals_forty_straight(tmp_path, char_data, capsys, sampling):
    flags = tiny_flags(**{"train.eval_interval": 20, "train.log_interval": 1, "train.sampling": sampling})
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / "straight", *flags,
                       "--train.max_iters", "40")
    assert code == 0, err
    # the first half of the same 40-step schedule, then the rest
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / "halves", *flags,
                       "--train.max_iters", "20", "--optim.decay_iters", "40")
    assert code == 0, err
    code, _, err = cli(capsys, "train", "--out", tmp_path / "halves", "--resume", "--train.max_iters", "40")
    assert code == 0, err
    assert losses(tmp_path / "halves") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 40
    a, b = (load_file(str(tmp_path / r / "latest" / "model.safetensors")) for r in ("halves", "straight"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((tmp_path / "halves" / "config.json").read_text())["train"]["sampling"] == sampling
