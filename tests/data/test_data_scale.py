"""Corpora at scale: parquet, datasets folders and compressed inputs, sharded token files, prepare split
into parts and merged, BPE sampling, the summary line, char vocabularies, tokenizer checks.

Every input is made here, small: parquet and arrow with pyarrow, compressed files with the standard
library and zstandard.
"""

from __future__ import annotations

import bz2
import gzip
import importlib
import json
import lzma
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

from scratchgpt import UserError  # noqa: E402
from scratchgpt.data import ShardedTokens, TokenDataset, data_info, load_meta, prepare, split_tokens  # noqa: E402
from scratchgpt.tokenizer import Tokenizer  # noqa: E402

units_module = importlib.import_module("scratchgpt.data.units")
WORDS = ("the a of river stone light green old quiet house under over near far bright cold warm "
         "walks sings reads builds sees finds keeps Ana Bo Cyd café über naïve 12 345").split()


def _docs(n: int, seed: int = 0, words: tuple[int, int] = (20, 200)) -> list[str]:
    """Documents of a few lines, no blank lines inside (so joining with "\\n\\n" can be undone)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."
                 for _ in range(rng.randint(words[0], words[1]) // 8 + 1)]
        out.append(f"Doc {seed}-{i}.\n" + "\n".join(lines))
    return out


def _jsonl(docs: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def _save_to_disk_folder(d: Path, docs: list[str], field: str = "text") -> None:
    """What datasets.Dataset.save_to_disk writes: arrow stream files, state.json, dataset_info.json."""
    d.mkdir(parents=True)
    names = []
    for k, chunk in enumerate((docs[: len(docs) // 2], docs[len(docs) // 2:])):
        names.append(f"data-{k:05d}-of-00002.arrow")
        table = pa.table({"n": list(range(len(chunk))), field: chunk})
        with pa.OSFile(str(d / names[-1]), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            for batch in table.to_batches(max_chunksize=7):
                w.write_batch(batch)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (d / "dataset_info.json").write_text(json.dumps({"features": {field: {"dtype": "string", "_type": "Value"}}}))


def _tokens(d: Path, split: str) -> np.ndarray:
    return np.asarray(split_tokens(d, load_meta(d), split))


def _decoded_docs(d: Path, split: str) -> list[str]:
    return Tokenizer.load(d).decode(_tokens(d, split)).split("\n\n")


# -- inputs -------------------------------------------------------------------------------


def test_parquet_arrow_and_compressed_inputs_give_their_documents_in_order(tmp_path):
    docs = _docs(60, seed=1)
    src = tmp_path / "in"
    (src / "pq").mkdir(parents=True)
    pq.write_table(pa.table({"body": docs[:15], "n": list(range(15))}), src / "pq" / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"body": pa.array(docs[15:25], pa.large_string())}), src / "pq" / "b.parquet")
    (src / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(docs[25:32], "body")))
    (src / "d.ndjson.gz").write_bytes(gzip.compress(_jsonl(docs[32:38], "body")))
    (src / "e.jsonl.xz").write_bytes(lzma.compress(_jsonl(docs[38:42], "body")))
    (src / "f.txt.bz2").write_bytes(bz2.compress(docs[42].encode()))
    (src / "g.md.gz").write_bytes(gzip.compress(docs[43].encode()))
    # several zstd frames in one file, as parallel compressors write them
    frames = b"".join(zstandard.ZstdCompressor().compress(_jsonl([d], "body")) for d in docs[44:47])
    (src / "h.jsonl.zst").write_bytes(frames)
    saved = tmp_path / "more" / "saved"  # a save_to_disk folder inside a folder counts too
    _save_to_disk_folder(saved, docs[47:57], "body")
    (tmp_path / "val.txt.xz").write_bytes(lzma.compress("\n".join(docs[57:]).encode()))

    out = tmp_path / "o"
    meta = prepare([src / "pq", src, tmp_path / "more"], out, tokenizer="char", text_field="body",
                   val=[tmp_path / "val.txt.xz"], workers=1)
    # the folder of parquet files comes first; then `src` (its parquet files again: skipped), in sorted order
    assert _decoded_docs(out, "train") == docs[:57]
    assert _decoded_docs(out, "val") == ["\n".join(docs[57:])]
    assert meta["train_documents"] == 57 and meta["bytes_in"] > sum(len(d) for d in docs)
    assert meta["settings"]["text_field"] == "body"


def test_save_to_disk_folder_written_by_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = _docs(30, seed=2)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    pq.write_table(pa.table({"text": docs}), tmp_path / "same.parquet")
    a, b = tmp_path / "a", tmp_path / "b"
    prepare([tmp_path / "ds"], a, tokenizer="char", workers=1)
    prepare([tmp_path / "same.parquet"], b, tokenizer="char", workers=1)
    for split in ("train", "val"):
        assert np.array_equal(_tokens(a, split), _tokens(b, split))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="DatasetDict: give one split"):
        prepare([tmp_path / "dd"], tmp_path / "c", tokenizer="char")


@pytest.mark.slow
def test_bad_table_and_compressed_inputs_are_one_line_errors(tmp_path, capsys):
    from scratchgpt.cli import main

    docs = _docs(20)
    pq.write_table(pa.table({"content": docs}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": docs[:9] + [None] + docs[10:]}), tmp_path / "null.parquet", row_group_size=4)
    pq.write_table(pa.table({"text": list(range(20))}), tmp_path / "ints.parquet")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 this is not parquet")
    gz = gzip.compress(_jsonl(docs))
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "garbage.txt.xz").write_bytes(b"not xz at all " * 10)
    zst = zstandard.ZstdCompressor().compress(_jsonl(docs))
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    (tmp_path / "nulltext.jsonl").write_bytes(_jsonl(docs[:3]) + b'{"text": null}\n')
    cases = {
        "nocol.parquet": "nocol.parquet: no column 'text' (columns: content; choose one with --text-field)",
        "null.parquet": "null.parquet: row 9: the text field 'text' is null",
        "ints.parquet": "ints.parquet: column 'text' holds int64, not text",
        "fake.parquet": "fake.parquet: not a readable parquet file",
        "cut.jsonl.gz": "cut.jsonl.gz: corrupt gzip data after",
        "garbage.txt.xz": "garbage.txt.xz: corrupt xz data after 0 decompressed bytes",
        "cut.jsonl.zst": "cut.jsonl.zst: corrupt zstd data after",
        "nulltext.jsonl": "nulltext.jsonl:4: the text field 'text' is null",
    }
    for name, message in cases.items():
        out = tmp_path / "out"
        rc = main(["prepare", str(tmp_path / name), "--out", str(out), "--tokenizer", "char"])
        err = capsys.readouterr().err
        assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert message in err, (name, err)
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")], name
    # the old flag name still works
    assert main(["prepare", str(tmp_path / "nocol.parquet"), "--out", str(tmp_path / "ok"), "--tokenizer", "char",
                 "--jsonl-field", "content"]) == 0


# -- shards -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    docs = _docs(240, seed=3)
    for k in range(6):  # six files, so the inputs can be split in parts
        pq.write_table(pa.table({"text": docs[k * 40:(k + 1) * 40]}), d / f"part-{k}.parquet", row_group_size=16)
    return d


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "d"
    prepare([corpus / "part-0.parquet"], out, tokenizer="bpe", vocab_size=300, workers=1)
    return out


def test_shards_read_like_one_file_batches_eval_and_verify(corpus, tok_dir, tmp_path):
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    prepare([corpus], one, tokenizer_from=str(tok_dir), workers=1)
    meta = prepare([corpus], sharded, tokenizer_from=str(tok_dir), shard_tokens=1000, workers=1)
    n = meta["train_tokens"]
    assert sorted(os.listdir(one)) == [".scratchgpt", "meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert load_meta(one)["format_version"] == 1 and meta["format_version"] == 2
    names = [s["file"] for s in meta["shards"]["train"]]
    assert names == [f"train-{i:05d}.bin" for i in range(-(-n // 1000))]
    assert [s["tokens"] for s in meta["shards"]["train"]] == [1000] * (n // 1000) + ([n % 1000] if n % 1000 else [])
    for split in ("train", "val"):
        assert np.array_equal(_tokens(one, split), _tokens(sharded, split))
    a, b = TokenDataset(one, "train", 64), TokenDataset(sharded, "train", 64)
    assert isinstance(b.tokens, ShardedTokens) and isinstance(a.tokens, np.memmap)
    for step in range(5):  # 16 windows of 65 tokens over 1000-token shards: many span two files
        offsets = a.batch_offsets(step, 16, seed=7)
        assert np.array_equal(offsets, b.batch_offsets(step, 16, seed=7))
        for x, y in zip(a.get_batch(offsets), b.get_batch(offsets)):
            assert torch.equal(x, y)
    assert np.array_equal(np.asarray(b.tokens[995:1010]), np.asarray(a.tokens[995:1010]))
    assert int(b.tokens[-1]) == int(a.tokens[-1]) and len(b.tokens) == len(a.tokens)
    windows = np.arange(0, n - 101, 100)[:, None] + np.arange(101)  # what metrics.evaluate_lm reads, across files
    assert np.array_equal(np.asarray(a.tokens[windows]), np.asarray(b.tokens[windows]))
    # data-info --verify checks every shard
    n_files = len(names) + len(meta["shards"]["val"]) + 1  # and tokenizer.json
    assert f"sha256: all files match meta.json ({n_files} files)" in data_info(sharded, verify=True)
    last = sharded / names[-1]
    last.write_bytes(last.read_bytes()[::-1])
    with pytest.raises(UserError, match=f"{names[-1]}: sha256"):
        data_info(sharded, verify=True)
    last.write_bytes(last.read_bytes()[:-2])
    with pytest.raises(UserError, match="damaged"):
        load_meta(sharded)


@pytest.mark.slow
def test_training_on_shards_matches_one_file_and_resumes_bit_exactly(corpus, tok_dir, tmp_path):
    from conftest import TINY
    from scratchgpt.model import ModelConfig
    from scratchgpt.optim import OptimConfig
    from scratchgpt.train import TrainConfig, train

    def run(data: Path, out: Path, max_iters: int, resume: bool = False) -> dict:
        cfg = TrainConfig(max_iters=max_iters, eval_interval=3, eval_iters=2, batch_size=8, log_interval=1,
                          sample_tokens=0, progress=False, tensorboard=False, plot=False, final_eval=True,
                          device="cpu", dtype="float32")  # bit-exact CPU numerics
        return train(data=data, out=out, model=ModelConfig(**TINY), train=cfg,
                     optim=OptimConfig(warmup_iters=2, decay_iters=6), resume=resume,
                     overrides={"train.max_iters": max_iters} if resume else None)

    def losses(out: Path) -> list[float]:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if "train_loss" in r]

    one, sharded = tmp_path / "one", tmp_path / "sharded"
    prepare([corpus], one, tokenizer_from=str(tok_dir), workers=1)
    meta = prepare([corpus], sharded, tokenizer_from=str(tok_dir), shard_tokens=1500, workers=1)
    assert len(meta["shards"]["train"]) > 8 and len(meta["shards"]["val"]) > 1
    results = [run(one, tmp_path / "run-one", 6), run(sharded, tmp_path / "run-sharded", 6)]
    assert losses(tmp_path / "run-one") == losses(tmp_path / "run-sharded") and len(losses(tmp_path / "run-one")) == 6
    assert results[0]["final_val_loss"] == results[1]["final_val_loss"]  # whole-split eval across the val shards
    run(sharded, tmp_path / "resumed", 3)
    resumed = run(sharded, tmp_path / "resumed", 6, resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "run-one")
    assert resumed["final_val_loss"] == results[0]["final_val_loss"]


# -- parts and merge ----------------------------------------------------------------------


def test_parts_merged_equal_one_process_byte_for_byte(corpus, tok_dir, tmp_path, capsys):
    one = tmp_path / "one"
    prepare([corpus], one, tokenizer_from=str(tok_dir), workers=1)
    parts = [tmp_path / "parts" / f"p{i}" for i in range(3)]
    for i, d in enumerate(parts):
        meta = prepare([corpus], d, tokenizer_from=str(tok_dir), num_parts=3, part=i, shard_tokens=2000, workers=1)
        assert meta["part"]["index"] == i and meta["part"]["files"] == 2
    capsys.readouterr()
    merged = tmp_path / "merged"
    meta = prepare(parts[::-1], merged, merge=True)  # any order
    assert "merged 3 parts" in capsys.readouterr().err
    single = load_meta(one)
    for split in ("train", "val"):
        assert np.array_equal(_tokens(merged, split), _tokens(one, split))
        for key in (f"{split}_tokens", f"{split}_documents", f"{split}_bytes"):
            assert meta[key] == single[key], key
    assert (merged / "tokenizer.json").read_bytes() == (one / "tokenizer.json").read_bytes()
    assert meta["shards"]["train"][0]["file"] == "../parts/p0/" + load_meta(parts[0])["shards"]["train"][0]["file"]
    assert not [f for f in os.listdir(merged) if f.startswith("train")]  # nothing copied
    assert "all files match" in data_info(merged, verify=True)
    a, b = TokenDataset(one, "train", 32), TokenDataset(merged, "train", 32)
    offsets = a.batch_offsets(3, 64, seed=1)
    assert torch.equal(a.get_batch(offsets)[0], b.get_batch(offsets)[0])


def test_part_and_merge_mistakes_are_one_line_errors(corpus, tok_dir, tmp_path):
    with pytest.raises(UserError, match="--num-parts needs --tokenizer-from"):
        prepare([corpus], tmp_path / "x", num_parts=2, part=0)
    with pytest.raises(UserError, match="--part must be between 0 and"):
        prepare([corpus], tmp_path / "x", tokenizer_from=str(tok_dir), num_parts=2, part=2)
    with pytest.raises(UserError, match="would get no input file"):
        prepare([corpus], tmp_path / "x", tokenizer_from=str(tok_dir), num_parts=7, part=0)
    with pytest.raises(UserError, match="--dedup cannot be combined"):
        prepare([corpus], tmp_path / "x", tokenizer_from=str(tok_dir), num_parts=2, part=0, dedup=True)
    p = [tmp_path / f"p{i}" for i in range(2)]
    for i in range(2):
        prepare([corpus], p[i], tokenizer_from=str(tok_dir), num_parts=2, part=i, workers=1)
    with pytest.raises(UserError, match=r"part\(s\) \[1\] missing"):
        prepare([p[0]], tmp_path / "m", merge=True)
    with pytest.raises(UserError, match="is not a part directory"):
        prepare([p[0], tok_dir], tmp_path / "m", merge=True)
    with pytest.raises(UserError, match="must not be or hold a part directory"):
        prepare(p, tmp_path, merge=True, force=True)
    other = tmp_path / "other"
    prepare([corpus], other, tokenizer_from=str(tok_dir), num_parts=2, part=1, seed=5, workers=1)
    with pytest.raises(UserError, match="different --seed"):
        prepare([p[0], other], tmp_path / "m", merge=True)
    assert sorted(os.listdir(tmp_path)) == ["other", "p0", "p1"]


# -- BPE sampling, progress summary, char vocabulary, tokenizer checks ---------------------


@pytest.mark.slow
def test_bpe_sample_is_bounded_and_the_output_ignores_workers_and_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr(units_module, "UNIT_BYTES", 32 << 10)  # many blocks in a small corpus
    text = "\n\n".join(_docs(600, seed=4, words=(400, 1200)))
    src = tmp_path / "big.txt"
    src.write_text(text, encoding="utf-8")
    assert len(text.encode()) > 2.2e6
    outs = []
    for i, (workers, buffer_mb) in enumerate(((1, 64), (2, 1))):
        outs.append(tmp_path / f"o{i}")
        meta = prepare([src], outs[-1], vocab_size=400, bpe_sample_mb=1, workers=workers, buffer_mb=buffer_mb)
        bpe = meta["bpe_training"]
        assert (1 << 20) - (64 << 10) <= bpe["sample_bytes"] <= (1 << 20) + (64 << 10) < bpe["train_bytes"]
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    tok = Tokenizer.load(outs[0])
    n = len(text)
    assert tok.decode(_tokens(outs[0], "train")) == text[: int(n * 0.9)]
    assert _tokens(outs[0], "val").tolist() == tok._hf.encode(text[int(n * 0.9):]).ids


@pytest.mark.slow
def test_summary_line_when_stderr_is_not_a_terminal(tmp_path):
    src = tmp_path / "a.jsonl.gz"
    src.write_bytes(gzip.compress(_jsonl(_docs(30))))
    r = subprocess.run([sys.executable, "-m", "scratchgpt", "prepare", str(src), "--out", str(tmp_path / "o"),
                        "--vocab-size", "300"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().split("\n")
    assert len(lines) == 1 and "\r" not in r.stderr  # no progress bar when not on a terminal
    meta = load_meta(tmp_path / "o")
    line = lines[0]
    assert line.startswith(f"prepared {tmp_path / 'o'}: train {meta['train_documents']:,} docs")
    for part in (f"{meta['train_tokens']:,} tokens", f"{meta['val_tokens']:,} tokens", "bpe vocab 300",
                 "0 unknown chars", "BPE trained on", "(all of it)", " s ("):
        assert part in line, part


def test_char_val_characters_unseen_in_train_warn_and_char_vocab_all(tmp_path, capsys):
    train_text, val_text = "abc abc cab\n" * 50, "abc xyz é\n" * 5
    (tmp_path / "t.txt").write_text(train_text)
    (tmp_path / "v.txt").write_text(val_text)
    capsys.readouterr()
    meta = prepare([tmp_path / "t.txt"], tmp_path / "o", tokenizer="char", val=[tmp_path / "v.txt"])
    err = capsys.readouterr().err.strip().split("\n")
    assert err[0] == ("warning: the val split holds 4 character(s) unseen in train ('x', 'y', 'z', 'é'): "
                      "20 occurrence(s) became <unk>; --char-vocab all builds the vocabulary from every split")
    assert meta["val_unseen_chars"] == "xyzé" and meta["cleaning"]["val_unknown_chars"] == 20
    assert meta["unk_id"] is not None
    meta = prepare([tmp_path / "t.txt"], tmp_path / "all", tokenizer="char", val=[tmp_path / "v.txt"], char_vocab="all")
    assert "warning" not in capsys.readouterr().err
    assert meta["unk_id"] is None and meta["val_unseen_chars"] == "xyzé"
    assert meta["vocab_size"] == len(set(train_text + val_text))
    assert Tokenizer.load(tmp_path / "all").decode(_tokens(tmp_path / "all", "val")) == val_text
    assert meta["settings"]["char_vocab"] == "all"


def test_a_replaced_tokenizer_is_a_one_line_error_naming_both(tmp_path, tok_dir, corpus, capsys):
    from scratchgpt.cli import main

    d = tmp_path / "d"
    shutil.copytree(tok_dir, d)
    other = tmp_path / "other"
    prepare([corpus / "part-1.parquet"], other, vocab_size=280, workers=1)
    shutil.copyfile(other / "tokenizer.json", d / "tokenizer.json")
    with pytest.raises(UserError, match=r"tokenizer.json \(vocab 280, sha256 \w{12}\) is not the tokenizer meta.json "
                                        r"was written with \(vocab 300, sha256 \w{12}\)"):
        TokenDataset(d, "train", 8)
    capsys.readouterr()
    assert main(["train", "--data", str(d), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "vocab 280" in err


def test_document_split_is_stable_when_documents_are_added(tmp_path):
    docs = _docs(200, seed=6)
    (tmp_path / "a.jsonl").write_bytes(_jsonl(docs[:100]))
    (tmp_path / "b.jsonl").write_bytes(_jsonl(docs[100:]))
    small = prepare([tmp_path / "a.jsonl"], tmp_path / "small", tokenizer="char", workers=1)
    prepare([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "big", tokenizer="char", workers=1)
    assert small["split"] == "documents" and 3 <= small["val_documents"] <= 25
    big_val = set(_decoded_docs(tmp_path / "big", "val"))
    assert set(_decoded_docs(tmp_path / "small", "val")) == big_val & set(docs[:100])
