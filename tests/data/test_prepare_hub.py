"""`prepare --hf-dataset NAME --hf-config C --split S`: a dataset streamed through the `datasets` library,
offline: a local script-free dataset repo folder, and the same repo in huggingface_hub's cache with
HF_HUB_OFFLINE=1. Its rows go through the same cleaning and tokenizing as local files, byte for byte."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from scratchgpt import UserError
from scratchgpt.data import prepare

pytest.importorskip("datasets", reason="needs the datasets library (pip install datasets)")
pa = pytest.importorskip("pyarrow", reason="needs pyarrow (the data extra)")
pytestmark = pytest.mark.slow  # importing datasets alone takes over a second

COMMIT = "0123456789abcdef0123456789abcdef01234567"
README = """---
configs:
- config_name: small
  data_files:
  - split: train
    path: data/train-*.jsonl
  - split: validation
    path: data/validation-*.jsonl
  default: true
- config_name: wiki
  data_files:
  - split: train
    path: wiki/*.jsonl
---
# A tiny dataset laid out as the hub lays one out
"""


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "naïve", "café", "数据", "tab\there", "line\r\nend"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(n)]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A script-free dataset repo: jsonl data files and a README.md whose `configs:` header names them."""
    d = tmp_path_factory.mktemp("hub") / "tiny"
    _jsonl(d / "data" / "train-00000-of-00002.jsonl", _docs(40, 1))
    _jsonl(d / "data" / "train-00001-of-00002.jsonl", _docs(40, 2))
    _jsonl(d / "data" / "validation-00000-of-00001.jsonl", _docs(10, 3))
    _jsonl(d / "wiki" / "part.jsonl", _docs(30, 4))
    (d / "README.md").write_text(README, encoding="utf-8")
    return d


def _split_bytes(d: Path) -> dict[str, bytes]:
    return {name: (d / name).read_bytes() for name in ("train.bin", "val.bin", "tokenizer.json")}


def test_a_local_dataset_folder_prepares_as_its_files_do(repo, tmp_path):
    meta = prepare([], tmp_path / "hub", hf_dataset=str(repo), hf_config="small", split="train", vocab_size=300,
                   progress=False)
    local = prepare(sorted(str(p) for p in (repo / "data").glob("train-*.jsonl")), tmp_path / "local",
                    vocab_size=300, progress=False)
    assert _split_bytes(tmp_path / "hub") == _split_bytes(tmp_path / "local")
    assert meta["train_documents"] + meta["val_documents"] == 80 and meta["cleaning"] == local["cleaning"]
    assert meta["settings"]["inputs"] == [] and meta["settings"]["hf_dataset"] == {
        "name": str(repo), "config": "small", "split": "train", "revision": None}
    assert "hf_dataset" not in local["settings"]  # directories made from files keep their meta.json as it was


def test_local_inputs_and_a_dataset_together(repo, tmp_path):
    extra = _jsonl(tmp_path / "extra.jsonl", _docs(5, 9))
    meta = prepare([str(extra)], tmp_path / "o", hf_dataset=str(repo), hf_config="wiki", tokenizer="char",
                   progress=False)
    assert meta["train_documents"] + meta["val_documents"] == 35 and meta["settings"]["inputs"] == [str(extra)]


@pytest.mark.parametrize("options, message", [
    (dict(split="test"),
     r"^--hf-dataset .*tiny/small:test: Bad split: test\. Available splits: \['train', 'validation'\]$"),
    (dict(hf_config="nope"), r"^--hf-dataset .*tiny/nope:train: BuilderConfig 'nope' not found"),
    (dict(text_field="nope"),
     r"tiny/small:train: no column 'nope' \(columns: text, id; choose one with --text-field\)$"),
    (dict(text_field="id"), r"tiny/small:train: column 'id' holds int64, not text"),
], ids=["split", "config", "column", "not text"])
def test_a_missing_split_config_or_column_is_one_line(repo, tmp_path, options, message):
    options = {"hf_config": "small", **options}
    with pytest.raises(UserError, match=message):
        prepare([], tmp_path / "o", hf_dataset=str(repo), tokenizer="char", progress=False, **options)
    assert os.listdir(tmp_path) == []


def test_hub_flags_need_a_dataset(tmp_path):
    with pytest.raises(UserError, match="^--hf-config, --split and --hf-revision need --hf-dataset NAME$"):
        prepare([], tmp_path / "o", split="validation", tokenizer="char", progress=False)


def test_parts_refuse_a_dataset(repo, tmp_path):
    with pytest.raises(UserError, match="--num-parts needs input files"):
        prepare([], tmp_path / "p", hf_dataset=str(repo), num_parts=2, part=0, tokenizer_from=str(_tok(tmp_path)),
                progress=False)


def _tok(tmp_path: Path) -> Path:
    src = _jsonl(tmp_path / "t.jsonl", _docs(20, 5))
    prepare([str(src)], tmp_path / "tok", tokenizer="char", progress=False)
    return tmp_path / "tok"


def _hub_cache(home: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """A dataset in huggingface_hub's cache layout: refs/main names the snapshot holding the files."""
    root = home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        path = root / "snapshots" / COMMIT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_a_hub_name_offline_reads_huggingface_hubs_cache(tmp_path):
    import pyarrow.parquet as pq

    texts = _docs(60, 7)
    table = pa.table({"content": texts, "n": list(range(len(texts)))})
    pq.write_table(table.slice(0, 30), tmp_path / "a.parquet")
    pq.write_table(table.slice(30), tmp_path / "b.parquet")
    readme = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*.parquet\n---\n"
    home = tmp_path / "hf"
    _hub_cache(home, "someorg/tiny", {"README.md": readme.encode(), "data/train-0.parquet": (tmp_path / "a.parquet")
                                      .read_bytes(), "data/train-1.parquet": (tmp_path / "b.parquet").read_bytes()})
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "scratchgpt", "prepare", *args, "--vocab-size", "300"],
                              capture_output=True, text=True, timeout=300, env=env)

    r = run("--hf-dataset", "someorg/tiny", "--hf-config", "default", "--split", "train", "--text-field", "content",
            "--out", str(tmp_path / "hub"))
    assert r.returncode == 0, r.stderr
    prepare([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], tmp_path / "local", text_field="content",
            vocab_size=300, progress=False)
    assert _split_bytes(tmp_path / "hub") == _split_bytes(tmp_path / "local")
    missing = run("--hf-dataset", "someorg/absent", "--out", str(tmp_path / "o"))
    assert missing.returncode == 1 and missing.stderr == (
        "error: --hf-dataset someorg/absent: not in the local Hugging Face cache, and HF_HUB_OFFLINE or "
        "HF_DATASETS_OFFLINE is set: download it first (hf download --repo-type dataset someorg/absent) or go online\n")
    assert not (tmp_path / "o").exists()
