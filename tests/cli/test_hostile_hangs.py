"""Inputs that are not regular files are refused in one line, never read for ever: a FIFO nobody writes to
would block, /dev/zero never ends (and grew memory until killed), and a checkpoint file symlinked to it was
hashed for ever (the 2026-12-06 reliability sweep: S05, S12, S21; P06 is in tests/data/test_prepare_safety.py)."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import assert_held, cli


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("source", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("command", [
    ("sample", "RUN", "--max-new-tokens", "3", "--prompt-file", "SOURCE"),
    ("eval", "RUN", "--data", "SOURCE"),
    ("train", "--config", "SOURCE", "--out", "OUT"),
    ("tune", "--space", "SOURCE", "--out", "OUT", "--data", "DATA"),
], ids=["sample-prompt-file", "eval-data", "train-config", "tune-space"])
def test_non_regular_inputs_are_refused(capsys, tmp_path, deadline, tiny_run, char_data, fifo, command, source):
    path = str(fifo) if source == "fifo" else source
    if command[0] == "tune" and source == "/dev/zero":
        path = str(tmp_path / "zero.yaml")  # (a name without .yaml is taken as inline YAML)
        os.symlink("/dev/zero", path)
    args = [{"RUN": tiny_run, "SOURCE": path, "OUT": tmp_path / "o", "DATA": char_data}.get(a, a) for a in command]
    code, _, err = cli(capsys, *args)
    assert_held(code, err, path, "not a regular file")
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_file_linked_to_dev_zero_is_refused(capsys, tmp_path, deadline, tiny_run):
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run, symlinks=True)
    for ckpt in ("best", "latest"):
        (run / ckpt / "model.safetensors").unlink()
        (run / ckpt / "model.safetensors").symlink_to("/dev/zero")
    code, _, err = cli(capsys, "sample", run, "--max-new-tokens", "3")
    assert_held(code, err, "model.safetensors", "not a regular file")


@pytest.mark.parametrize("command", [("finetune", "classify", "RUN", "--train", "FIFO", "--val", "FIFO", "--out", "OUT"),
                                     ("finetune", "sft", "RUN", "--train", "FIFO", "--val", "FIFO", "--out", "OUT")],
                         ids=["classify", "sft"])
def test_finetune_refuses_a_fifo_as_its_data(capsys, tmp_path, deadline, tiny_run, command):
    fifo = tmp_path / ("data.csv" if "classify" in command else "data.jsonl")
    os.mkfifo(fifo)
    args = [{"RUN": tiny_run, "FIFO": fifo, "OUT": tmp_path / "o"}.get(a, a) for a in command]
    code, _, err = cli(capsys, *args)
    assert_held(code, err, str(fifo), "not a regular file")
    assert not (tmp_path / "o").exists()


def test_chat_refuses_endless_input_lines(capsys, monkeypatch, deadline, tiny_run):
    with open("/dev/zero", encoding="utf-8") as zero:  # NUL characters, and never a line break
        monkeypatch.setattr("sys.stdin", zero)
        code, _, err = cli(capsys, "chat", tiny_run, "--max-new-tokens", "2")
    assert_held(code, err, "standard input", "longer than 1,048,576 characters")
