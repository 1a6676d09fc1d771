"""The weights' sha256 started early (while the CLI imports torch): used only while the file is what was hashed."""

from __future__ import annotations

import hashlib
import os

from scratchgpt import cli, utils


def test_an_early_hash_is_used_and_a_changed_file_is_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "_EARLY", {})
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 3_000_000)
    utils.sha256_early([f, tmp_path / "missing", tmp_path])  # (what is not a regular file is skipped)
    assert len(utils._EARLY) == 1
    assert utils.sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    (key, early), = utils._EARLY.items()
    assert early.result() == utils.sha256_file(f)  # (taken from there)
    f.write_bytes(b"y" * 3_000_000)  # same size, new times: the early digest no longer applies
    os.utime(f, ns=(key[3] + 10**9, key[3] + 10**9))
    assert utils.sha256_file(f) == hashlib.sha256(b"y" * 3_000_000).hexdigest()


def test_the_cli_hashes_the_checkpoint_it_will_load(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(utils, "sha256_early", lambda paths: started.extend(paths))
    for ckpt in ("best", "latest"):
        (tmp_path / ckpt).mkdir()
        (tmp_path / ckpt / "model.safetensors").write_bytes(b"w")
    cli._hash_weights_early([str(tmp_path), "--prompt", "hi"])
    cli._hash_weights_early(["--which", "latest", str(tmp_path)])
    cli._hash_weights_early(["--prompt=hi"])  # no run named: nothing
    cli._hash_weights_early([str(tmp_path / "nowhere")])
    assert started == [tmp_path / "best" / "model.safetensors", tmp_path / "latest" / "model.safetensors"]
