"""`prepare` / `data-info` and TokenDataset, on small corpora made here (no ../shared)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from scratchgpt import UserError
from scratchgpt import data
from scratchgpt.data import TokenDataset, data_info, load_meta, prepare
from scratchgpt.tokenizer import EOT, Tokenizer
from scratchgpt.utils import sha256_file

CHINESE = (
    "### 5.3 训练GPT模型\n\n训练生成预训练变换器（Generative Pre-trained Transformer，简称GPT）模型需要遵循"
    "一定的步骤，包括预处理数据、定义模型、选择优化器和损失函数、以及训练和评估模型。GPT模型通过大量的无监督"
    "文本数据进行预训练，并在特定任务上进行微调，从而生成高质量的文本。\n\n- **数据清洗**：清理原始文本数据，"
    "去除无关字符和符号，确保数据质量。\n- **标记化**：将文本数据分割为单词或子词，可以使用Byte Pair Encoding"
    "（BPE）等方法进行标记化。\n"
)


def _play(n_chars: int, seed: int = 0) -> str:
    """A nanoGPT-style single document: speakers and lines of varied words."""
    rng = random.Random(seed)
    names = ["First Citizen", "MENENIUS", "ROMEO", "JULIET", "KING RICHARD III", "Nurse"]
    words = ("what say you my lord the king is dead long live thy noble heart doth break and i will "
             "speak no more of this fair day but go to rome where all our fortunes lie o gentle sir "
             "thou art too kind nay hear me speak yet once again for love of honour").split()
    out, size = [], 0
    while size < n_chars:
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 11))).capitalize() + rng.choice(".,!?;:")
                 for _ in range(rng.randint(1, 4))]
        block = f"{rng.choice(names)}:\n" + "\n".join(lines) + "\n\n"
        out.append(block)
        size += len(block)
    return "".join(out)


def _read_split(d: Path, split: str) -> np.ndarray:
    meta = json.loads((d / "meta.json").read_text())
    return np.fromfile(d / f"{split}.bin", dtype=meta["dtype"])


@pytest.fixture(scope="module")
def play_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "play.txt"
    p.write_text(_play(60_000), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def char_dir(play_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "char"
    prepare([play_file], out, tokenizer="char", workers=1)
    return out


# -- prepare: splits and round trips ------------------------------------------------------


def test_char_single_document_gets_nanogpt_tail_split(play_file, char_dir):
    text = play_file.read_text(encoding="utf-8")
    n = len(text)
    train, val = text[: int(n * 0.9)], text[int(n * 0.9):]
    meta = load_meta(char_dir)
    assert meta["vocab_size"] == len(set(train))
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert meta["dtype"] == "uint16" and meta["split"] == "tail"
    assert meta["train_documents"] == meta["val_documents"] == 1
    chars = sorted(set(train))
    assert _read_split(char_dir, "train").tolist() == [chars.index(c) for c in train]
    tok = Tokenizer.load(char_dir)
    assert tok.decode(_read_split(char_dir, "val")) == val


def test_manifest_has_hashes_counts_and_settings(char_dir, play_file):
    meta = load_meta(char_dir)
    for key in ("format_version", "tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens",
                "train_documents", "val_documents", "bytes_in", "cleaning", "files", "settings"):
        assert key in meta, key
    assert meta["bytes_in"] == play_file.stat().st_size
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert meta["files"][name]["sha256"] == sha256_file(char_dir / name)
    assert meta["settings"]["tokenizer"] == "char" and meta["settings"]["val_fraction"] == 0.1
    assert sorted(os.listdir(char_dir)) == [".scratchgpt", "meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_bpe_val_bin_decodes_to_exactly_the_val_text(tmp_path):
    text = _play(150_000, seed=1) + CHINESE * 3 + "Tabs\tand  double  spaces, ½ ², 😀 and é.\n"
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "bpe"
    meta = prepare([src], out, tokenizer="bpe", vocab_size=400, workers=1)
    assert meta["vocab_size"] == 400 and meta["eot_id"] == 0
    n = len(text)
    tok = Tokenizer.load(out)
    assert tok.decode(_read_split(out, "val")) == text[int(n * 0.9):]
    assert tok.decode(_read_split(out, "train")) == text[: int(n * 0.9)]
    # ids are those tokenizers itself would produce
    assert _read_split(out, "val").tolist() == tok._hf.encode(text[int(n * 0.9):]).ids


def test_prepare_without_inputs_uses_the_embedded_corpus(tmp_path):
    from pydoc_data.topics import topics

    out = tmp_path / "default"
    meta = prepare([], out, tokenizer="bpe", vocab_size=1024, workers=1)
    assert meta["split"] == "documents"
    assert meta["train_documents"] + meta["val_documents"] == len(topics)
    assert 0 < meta["val_documents"] < len(topics) // 4  # each document is val with probability 0.1
    # documents are separated by <|endoftext|>
    tok = Tokenizer.load(out)
    val = _read_split(out, "val")
    assert int((val == tok.eot_id).sum()) == meta["val_documents"] - 1
    docs = tok.decode(val).split(EOT)
    assert all(d in topics.values() for d in docs)
    train_docs = tok.decode(_read_split(out, "train")).split(EOT)
    assert sorted(train_docs + docs) == sorted(topics.values())


def test_chinese_text_char_and_bpe(tmp_path):
    src = tmp_path / "zh.md"
    src.write_text(CHINESE * 40, encoding="utf-8")
    n = len(CHINESE * 40)
    for kind, vocab in (("char", 0), ("bpe", 300)):
        out = tmp_path / kind
        meta = prepare([src], out, tokenizer=kind, vocab_size=vocab or 4096, workers=1)
        tok = Tokenizer.load(out)
        assert tok.decode(_read_split(out, "val")) == (CHINESE * 40)[int(n * 0.9):]
        assert meta["val_bytes"] == len((CHINESE * 40)[int(n * 0.9):].encode("utf-8"))


def test_worker_processes_give_identical_output(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i:02d}.txt").write_text(_play(30_000, seed=i), encoding="utf-8")
    a, b = tmp_path / "a", tmp_path / "b"
    prepare([docs], a, tokenizer="bpe", vocab_size=400, workers=1, buffer_mb=1)
    prepare([docs], b, tokenizer="bpe", vocab_size=400, workers=2, buffer_mb=1)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_long_document_cut_into_tasks_encodes_like_the_whole(tmp_path):
    # buffer_mb=1 makes tasks of 64 KiB, so this document is encoded in pieces.
    text = _play(400_000, seed=5)
    src = tmp_path / "long.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "o"
    prepare([src], out, tokenizer="bpe", vocab_size=300, workers=1, buffer_mb=1)
    tok = Tokenizer.load(out)
    n = len(text)
    assert _read_split(out, "train").tolist() == tok._hf.encode(text[: int(n * 0.9)]).ids


# -- inputs ------------------------------------------------------------------------------


def test_directories_globs_jsonl_and_explicit_val(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha " * 200)
    (tmp_path / "d" / "sub" / "b.md").write_text("beta " * 200)
    (tmp_path / "d" / "skip.bin").write_bytes(b"\0\1\2")
    (tmp_path / "c.txt").write_text("gamma " * 200)
    lines = [json.dumps({"body": f"record {i} " * 30}) for i in range(5)]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n\n")
    (tmp_path / "v.txt").write_text("delta alpha beta " * 20)
    out = tmp_path / "o"
    meta = prepare([tmp_path / "d", str(tmp_path / "c*.txt"), tmp_path / "r.jsonl"], out, tokenizer="char",
                   val=[tmp_path / "v.txt"], jsonl_field="body", workers=1)
    assert meta["split"] == "explicit"
    assert (meta["train_documents"], meta["val_documents"]) == (3 + 5, 1)
    tok = Tokenizer.load(out)
    assert tok.decode(_read_split(out, "val")) == "delta alpha beta " * 20
    train = tok.decode(_read_split(out, "train")).split("\n\n")
    assert train[:3] == ["alpha " * 200, "beta " * 200, "gamma " * 200]
    assert train[3] == "record 0 " * 30


@pytest.mark.slow
def test_stdin_input_through_the_cli(tmp_path):
    text = _play(20_000, seed=7)
    out = tmp_path / "o"
    r = _cli("prepare", "-", "--out", out, "--tokenizer", "char", input=text.encode())
    assert r.returncode == 0, r.stderr
    meta = load_meta(out)
    assert meta["train_tokens"] == int(len(text) * 0.9)
    info = _cli("data-info", out, "--sample-tokens", "40", "--verify")
    assert info.returncode == 0, info.stderr
    assert f"train {meta['train_tokens']:,}" in info.stdout
    assert text[:20].split("\n")[0] in info.stdout
    assert "sha256: all files match" in info.stdout


def test_cleaning_steps_and_counts(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    body = "Some text of the book.\n" * 50
    body2 = "Some book of the text.\n" * 50  # same characters: no <unk> wherever it lands
    (docs / "1.txt").write_bytes(("\ufeffcafe\u0301\r\nline\rnext\x07\x00"[:-1] + "\n" + body).encode())
    (docs / "2.txt").write_text(
        "The Project Gutenberg eBook\nlicense blah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n"
        + body2 + "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore license\n")
    (docs / "3.txt").write_text(body)
    (docs / "4.txt").write_text(body)  # duplicate of 3
    (docs / "5.txt").write_text(" \n\t\n")  # empty after cleaning
    out = tmp_path / "o"
    meta = prepare([docs], out, tokenizer="char", strip_gutenberg=True, dedup=True, workers=1,
                   val_fraction=0.3)
    r = meta["cleaning"]
    assert r["documents_read"] == 5
    assert r["duplicate_documents_removed"] == 1 and r["empty_documents_dropped"] == 1
    assert r["newlines_normalized"] == 2 and r["control_chars_removed"] == 1
    assert r["nfc_documents_changed"] == 1 and r["byte_order_marks_removed"] == 1
    assert r["gutenberg_headers_removed"] == 1 and r["gutenberg_footers_removed"] == 1
    tok = Tokenizer.load(out)
    full = tok.decode(_read_split(out, "train")) + tok.decode(_read_split(out, "val"))
    assert "caf\u00e9\nline\nnext\n" + body in full
    assert body2 in full and "Gutenberg" not in full and "license" not in full
    # every step can be switched off
    raw = tmp_path / "raw"
    meta = prepare([docs / "1.txt"], raw, tokenizer="char", nfc=False, normalize_newlines=False,
                   strip_control=False, workers=1)
    kept = Tokenizer.load(raw).decode(np.concatenate([_read_split(raw, "train"), _read_split(raw, "val")]))
    assert kept.startswith("cafe\u0301\r\nline\rnext\x07\n")


def test_invalid_utf8_replaced_and_counted(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"good text " * 100 + b"\xff\xfe oops " + b"more good text " * 100)
    out = tmp_path / "o"
    meta = prepare([src], out, tokenizer="char", errors="replace", workers=1)
    assert meta["cleaning"]["invalid_utf8_replaced"] == 2
    assert meta["unk_id"] is None or meta["cleaning"]["val_unknown_chars"] >= 0


def test_force_replaces_and_failure_keeps_the_old_dir(tmp_path, play_file):
    out = tmp_path / "o"
    prepare([play_file], out, tokenizer="char", workers=1)
    old = (out / "train.bin").read_bytes()
    with pytest.raises(UserError):
        prepare([play_file], out, tokenizer="bpe", vocab_size=10**6, force=True, workers=1)
    assert (out / "train.bin").read_bytes() == old
    prepare([play_file], out, tokenizer="bpe", vocab_size=300, force=True, workers=1)
    assert load_meta(out)["tokenizer"] == "bpe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# -- bad input: one line on stderr, exit 1, nothing left behind ----------------------------


def _cli(*args, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchgpt", *map(str, args)], input=input,
                          capture_output=True, text=input is None, timeout=120)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list, str]]:
    ok = tmp_path / "ok.txt"
    ok.write_text(_play(3000))
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "nodocs" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "blank.txt").write_text("\n \t\x01\n")
    (tmp_path / "bin.txt").write_bytes(b"text\0\1\2\3" * 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (tmp_path / "badutf8.txt").write_bytes(b"fine text\n" * 10 + b"caf\xe9 au lait\n")
    (tmp_path / "exists").mkdir()
    (tmp_path / "afile").write_text("x")
    return {
        "missing path": ([tmp_path / "nope.txt"], "input not found"),
        "no text in dir": ([tmp_path / "nodocs"], "no text"),
        "empty after cleaning": ([tmp_path / "blank.txt"], "empty after cleaning"),
        "binary file": ([tmp_path / "bin.txt"], "binary"),
        "mostly undecodable": ([tmp_path / "latin1.txt", "--errors", "replace"], "binary"),
        "invalid utf-8": ([tmp_path / "badutf8.txt"], "badutf8.txt: invalid UTF-8 at byte offset 103"),
        "vocab too large": ([ok, "--tokenizer", "bpe", "--vocab-size", "60000"], "more than this corpus supports"),
        "vocab too small": ([ok, "--tokenizer", "bpe", "--vocab-size", "100"], "at least 257"),
        "empty val split": ([ok, "--val", tmp_path / "blank.txt"], "validation split is empty"),
        "existing output": ([ok, "--out", tmp_path / "exists"], "already exists"),
        "unwritable output": ([ok, "--out", tmp_path / "afile" / "sub"], "cannot write"),
    }


@pytest.mark.slow
def test_bad_inputs(tmp_path, capsys):
    # In-process through the CLI's main() (what `scratchgpt` runs), to keep the suite fast;
    # test_bad_input_in_a_real_process checks a real process once.
    from scratchgpt.cli import main

    before = set(os.listdir(tmp_path))
    for name, (args, message) in _bad_inputs(tmp_path).items():
        out = tmp_path / "out"
        if "--out" not in args:
            args = [*args, "--out", out]
        rc = main(["prepare", *map(str, args)])
        err = capsys.readouterr().err
        assert rc == 1, (name, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert message in err, (name, err)
        assert not out.exists(), name
        made = {"ok.txt", "nodocs", "blank.txt", "bin.txt", "latin1.txt", "badutf8.txt", "exists", "afile"}
        left = set(os.listdir(tmp_path)) - before - made
        assert not left, (name, left)
        assert os.listdir(tmp_path / "exists") == []


def test_bad_input_in_a_real_process(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"text\0" * 10)
    r = _cli("prepare", tmp_path / "bin.txt", "--out", tmp_path / "o")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == ["bin.txt"]


def test_data_info_on_a_non_data_dir(tmp_path, capsys):
    from scratchgpt.cli import main

    assert main(["data-info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a prepared data directory" in err


def test_load_meta_detects_damage(char_dir, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(char_dir, d)
    with open(d / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match="damaged"):
        load_meta(d)
    with pytest.raises(UserError, match="sha256"):
        (d / "val.bin").write_bytes((d / "val.bin").read_bytes()[:-2][::-1])
        data_info(d, verify=True)


# -- TokenDataset ------------------------------------------------------------------------


def test_shuffle_visits_every_window_once_an_epoch(char_dir):
    ds = TokenDataset(char_dir, "train", block_size=32)
    n = (ds.max_offset + 1) // 32
    batch = 7  # does not divide n: some batches span two epochs
    steps = -(-3 * n // batch)
    offsets = np.concatenate([ds.batch_offsets(s, batch, seed=5, sampling="shuffle") for s in range(steps)])
    assert offsets.min() >= 0 and offsets.max() <= ds.max_offset
    phases = []
    for epoch in range(3):
        starts = offsets[epoch * n:(epoch + 1) * n]
        phase = int(starts[0]) % 32
        assert (starts % 32 == phase).all()  # one cut of the text per epoch
        assert sorted((starts // 32).tolist()) == list(range(n))  # every window once
        assert starts[:50].tolist() != sorted(starts[:50].tolist())  # in a shuffled order
        phases.append(phase)
    # a pure function of (seed, step): a fresh dataset (a resumed run, another rank) gives the same windows
    again = TokenDataset(char_dir, "train", block_size=32)
    assert np.array_equal(again.batch_offsets(steps - 1, batch, 5, "shuffle"), offsets[-batch:])
    assert not np.array_equal(ds.batch_offsets(0, batch, 6, "shuffle"), offsets[:batch])
    # the cursor is the windows drawn so far: a resume with another batch size goes on with the same sequence
    resumed = np.concatenate([ds.batch_offsets(s, batch, 5, "shuffle", start=s * batch) for s in range(10)]
                             + [ds.batch_offsets(10 + i, 3, 5, "shuffle", start=10 * batch + 3 * i) for i in range(40)])
    assert np.array_equal(resumed, offsets[:len(resumed)])
    with pytest.raises(ValueError, match="sampling"):
        ds.batch_offsets(0, batch, 5, "shuffled")


@settings(max_examples=60, deadline=None)
@given(n_tokens=st.integers(2, 400), block=st.integers(1, 64), batch=st.integers(1, 40), step=st.integers(0, 10**6))
def test_shuffle_windows_fit_any_split(n_tokens, block, batch, step):
    """Tiny splits too (fewer tokens than two blocks: one window an epoch, at a random phase)."""
    assume(block <= n_tokens - 1)  # TokenDataset refuses larger blocks
    ds = object.__new__(TokenDataset)  # only the split's length and block size enter the windows' arithmetic
    ds.n_tokens, ds.block_size, ds.seed = n_tokens, block, 1
    offsets = ds.batch_offsets(step, batch, sampling="shuffle")
    assert offsets.shape == (batch,) and offsets.min() >= 0 and offsets.max() <= ds.max_offset


def test_batches_are_deterministic_and_shifted(char_dir):
    ds = TokenDataset(char_dir, "train", block_size=32)
    a = ds.batch_offsets(step=7, batch_size=16, seed=1)
    assert np.array_equal(a, ds.batch_offsets(7, 16, 1))
    assert not np.array_equal(a, ds.batch_offsets(8, 16, 1))
    assert a.min() >= 0 and a.max() <= ds.n_tokens - 33
    x, y = ds.get_batch(a)
    assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    tokens = np.asarray(ds.tokens)
    assert x[3].tolist() == tokens[a[3]:a[3] + 32].tolist()
    assert y[3].tolist() == tokens[a[3] + 1:a[3] + 33].tolist()
    # the extreme offsets are allowed
    ds.get_batch(np.array([0, ds.n_tokens - 33]))
    with pytest.raises(ValueError):
        ds.get_batch(np.array([ds.n_tokens - 32]))


def test_block_size_larger_than_split_is_a_user_error(char_dir):
    n = load_meta(char_dir)["val_tokens"]
    TokenDataset(char_dir, "val", block_size=n - 1)
    with pytest.raises(UserError, match="too large"):
        TokenDataset(char_dir, "val", block_size=n)


def test_missing_data_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TokenDataset(tmp_path / "nothing")
    assert data.dtype_for_vocab(65536) == "uint16" and data.dtype_for_vocab(65537) == "uint32"
