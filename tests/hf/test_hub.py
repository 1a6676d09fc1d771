"""Hub names without a network: `import-hf ORG/NAME` reads huggingface_hub's own cache layout offline
(HF_HUB_OFFLINE=1, a cache this test fills), `--revision` picks a ref; `export --push-to-hub` is checked at the
HfApi boundary (create_repo, upload_folder mocked: what would be sent)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import cli

pytest.importorskip("huggingface_hub")

COMMITS = {"main": "a" * 40, "v1": "b" * 40}


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    from scratchgpt.hf import export_checkpoint

    return export_checkpoint(tiny_run, tmp_path_factory.mktemp("hub") / "tiny-hf")


@pytest.fixture
def offline_cache(exported, tmp_path, monkeypatch) -> Path:
    """huggingface_hub's cache holding model me/tiny at two refs (main, v1), the library in offline mode."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    repo = cache / "models--me--tiny"
    for ref, commit in COMMITS.items():
        snap = repo / "snapshots" / commit
        shutil.copytree(exported, snap)
        (snap / "pytorch_model.bin").write_bytes(b"never read")
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    (repo / "snapshots" / COMMITS["v1"] / "README.md").write_text("revision v1\n")
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_import_by_hub_name_reads_the_hub_cache_offline(offline_cache, tiny_run, tmp_path, capsys):
    from scratchgpt.checkpoint import load_run

    code, _, err = cli(capsys, "import-hf", "me/tiny", "--out", tmp_path / "run")
    assert code == 0, err
    assert "imported me/tiny as" in err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["imported_from"]["name"] == "me/tiny"
    assert Path(config["imported_from"]["path"]).name == COMMITS["main"]
    assert "pytorch_model.bin" not in config["imported_from"]["sha256"]
    a, b = load_run(tiny_run).gpt.state_dict(), load_run(tmp_path / "run").gpt.state_dict()
    assert all((a[k] == b[k]).all() for k in b)
    code, _, err = cli(capsys, "import-hf", "me/tiny", "--revision", "v1", "--out", tmp_path / "v1")
    assert code == 0, err
    config = json.loads((tmp_path / "v1" / "config.json").read_text())
    assert Path(config["imported_from"]["path"]).name == COMMITS["v1"]
    code, _, err = cli(capsys, "export", tmp_path / "run", "--out", tmp_path / "again")
    assert code == 0, err
    card = (tmp_path / "again" / "README.md").read_text()
    assert "`me/tiny`" in card and str(offline_cache) not in card


def test_hub_name_errors_are_one_line_and_write_nothing(offline_cache, tmp_path, capsys):
    for args, named in ((["nobody/missing"], "not in the hub cache"),
                        (["me/tiny", "--revision", "nope"], "not in the hub cache"),
                        ([str(tmp_path), "--revision", "v1"], "--revision is for hub names")):
        code, out, err = cli(capsys, "import-hf", *args, "--out", tmp_path / "run")
        assert code == 1 and named in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not (tmp_path / "run").exists()


def test_download_asks_only_for_the_files_import_reads(monkeypatch, exported):
    import huggingface_hub

    from scratchgpt.hf import download_model
    from scratchgpt.hf.hub import HUB_FILES

    seen = {}

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(exported)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert download_model("me/tiny", "v1") == exported
    assert seen["repo_id"] == "me/tiny" and seen["revision"] == "v1" and "token" not in seen  # (the library reads HF_TOKEN)
    from huggingface_hub.utils import filter_repo_objects

    files = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "chat_template.jinja", "pytorch_model.bin", "onnx/model.safetensors", "model.gguf",
             "flax_model.msgpack", "tf_model.h5", "README.md"]
    kept = set(filter_repo_objects(files, allow_patterns=seen["allow_patterns"]))
    assert kept == set(files[:6]) and seen["allow_patterns"] == HUB_FILES


def test_push_to_hub_uploads_the_exported_folder(tiny_run, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        calls.append(("upload_folder", sorted(p.name for p in Path(kw["folder_path"]).iterdir()), kw))
        return type("CommitInfo", (), {"commit_url": "hub://me/tiny/commit/1"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    code, _, err = cli(capsys, "export", tiny_run, "--out", tmp_path / "hf", "--push-to-hub", "me/tiny", "--private")
    assert code == 0, err
    (_, repo, create), (_, files, upload) = calls
    assert repo == "me/tiny" and create["exist_ok"] is True and create["private"] is True
    assert upload["repo_id"] == "me/tiny" and Path(upload["folder_path"]) == tmp_path / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert "pushed" in err and "me/tiny" in err
    calls.clear()
    code, _, err = cli(capsys, "export", tiny_run, "--out", tmp_path / "bad", "--push-to-hub", "not a name")
    assert code == 1 and "not a hub name" in err and not calls and not (tmp_path / "bad").exists()
