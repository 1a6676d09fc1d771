"""Shared fixtures of the run-directory tests: one tree of every kind of folder scratchgpt writes, built once,
and copied into each test's own folder (copies are cheap; training is not)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import tiny_flags


def main(*args) -> int:
    from scratchgpt.cli import main as cli_main

    try:
        return cli_main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` (not following links, never opening a FIFO): content hash, link target or type."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            key = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[key] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISDIR(st.st_mode):
                out[key] = "dir"
            else:
                out[key] = f"special:{stat.S_IFMT(st.st_mode)}"
    return out


def one_error(capsys, *args) -> str:
    """The command fails with exactly one `error:` line and no traceback; returns the line."""
    capsys.readouterr()
    code = main(*args)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def ok(capsys, *args) -> str:
    capsys.readouterr()
    code = main(*args)
    err = capsys.readouterr().err
    assert code == 0, err
    return err


@pytest.fixture(scope="session")
def fx(tiny_run, char_data, tmp_path_factory) -> dict[str, Path]:
    """The originals: a data dir, a run, a classifier run, a LoRA run, a Hugging Face export, a corpus and the
    fine-tuning files. Tests copy them (`tree`), never write here."""
    root = tmp_path_factory.mktemp("runs-fx")
    words = ["apple", "river", "stone", "cloud", "bread", "light", "horse", "table"]
    (root / "cls.csv").write_text("text,label\n" + "".join(f"the {w},{'a' if i % 2 else 'b'}\n"
                                                           for i, w in enumerate(words)))
    (root / "sft.jsonl").write_text("".join(json.dumps({"prompt": w, "response": w[::-1]}) + "\n" for w in words))
    (root / "template.json").write_text(json.dumps({"user": "Q {prompt}\nA ", "assistant_end": "\n", "stop": ["\n"]}))
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    fine = ["--max-steps", "2", "--eval-interval", "1", "--batch-size", "2", "--device", "cpu"]
    assert main("finetune", "classify", tiny_run, "--train", root / "cls.csv", "--val", root / "cls.csv",
                "--out", root / "cls", *fine) == 0
    assert main("finetune", "sft", tiny_run, "--train", root / "sft.jsonl", "--val", root / "sft.jsonl",
                "--out", root / "lora", "--lora", "--lora-r", "2", "--template", root / "template.json", *fine) == 0
    assert main("export", tiny_run, "--out", root / "hf") == 0
    return {"data": char_data, "run": tiny_run, "cls": root / "cls", "lora": root / "lora", "hf": root / "hf",
            "corpus": root / "corpus.txt", "cls.csv": root / "cls.csv"}


@pytest.fixture
def tree(fx, tmp_path) -> Path:
    """The test's own copies of fx (symlinks kept as links), and an unrelated folder holding the user's notes."""
    for name, src in fx.items():
        (shutil.copytree(src, tmp_path / name, symlinks=True) if src.is_dir() else shutil.copy2(src, tmp_path / name))
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("precious")
    return tmp_path


TINY = tiny_flags(**{"train.max_iters": 2, "train.eval_interval": 2, "train.eval_iters": 1,
                     "model.n_layer": 1, "model.n_embd": 16, "model.block_size": 16, "train.threads": 1})
