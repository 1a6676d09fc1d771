"""What scratchgpt writes gets the user's umask, as files made by open() and mkdir() do: atomically written
files were 0600 and exported or imported folders 0700 whatever the umask, so a run or an export copied to a
shared place could not be read by the team (the 2026-12-06 reliability sweep, section D's notes)."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest
from conftest import cli, tiny_flags

from scratchgpt.utils import atomic_write_json, make_temp_dir, replace_dir

UMASK = 0o027  # not the usual 022, so following it can't be a coincidence


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def wrong_modes(root) -> list[str]:
    """Everything under `root` (itself included) whose mode is not 0666/0777 less UMASK."""
    bad = []
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        want = (0o777 if stat.S_ISDIR(st.st_mode) else 0o666) & ~UMASK
        if stat.S_IMODE(st.st_mode) != want:
            bad.append(f"{p.relative_to(root.parent)} {stat.S_IMODE(st.st_mode):o}")
    return bad


def test_atomic_writes_and_directory_swaps_follow_the_umask(tmp_path):
    with umask(UMASK):
        atomic_write_json(tmp_path / "out" / "a.json", {"x": 1})
        new = make_temp_dir(".final.tmp-", tmp_path)
        (new / "f").write_text("x")
        replace_dir(new, tmp_path / "final")
    assert wrong_modes(tmp_path / "out") == [] and wrong_modes(tmp_path / "final") == []


@pytest.mark.slow
def test_runs_reports_exports_and_imports_follow_the_umask(capsys, tmp_path, char_data):
    run, hf, imported = tmp_path / "run", tmp_path / "hf", tmp_path / "imported"
    with umask(UMASK):
        for args in (("train", *tiny_flags(**{"train.max_iters": 2, "train.eval_interval": 2}), "--data", char_data,
                      "--out", run), ("report", run), ("export", run, "--out", hf), ("import-hf", hf, "--out", imported)):
            code, _, err = cli(capsys, *args)
            assert code == 0, err
    assert (run / "report.html").exists() and (run / "best" / "model.safetensors").exists()
    assert [bad for root in (run, hf, imported) for bad in wrong_modes(root)] == []
