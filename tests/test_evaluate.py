"""`scratchgpt eval`: metrics against hand-computed values, and --task lm on a data dir or a text file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

from scratchgpt.cli import main  # noqa: E402
from scratchgpt.metrics import classification_metrics, generation_metrics  # noqa: E402
from scratchgpt.model import GPT, ModelConfig  # noqa: E402


# ---------------------------------------------------------------- metrics by hand
def test_accuracy_f1_and_confusion_by_hand():
    y_true = ["a", "a", "b", "b", "c"]
    y_pred = ["a", "b", "b", "b", "a"]
    m = classification_metrics(y_true, y_pred)
    # a: tp 1, fp 1, fn 1 -> P = R = F1 = 1/2;  b: tp 2, fp 1, fn 0 -> P 2/3, R 1, F1 4/5;  c: tp 0 -> F1 0
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["c"]["f1"] == 0.0 and m["per_class"]["c"]["support"] == 1
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["labels"] == ["a", "b", "c"]
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # rows true, columns predicted
    # a label listed but absent from both sides does not dilute macro-F1 (as scikit-learn)
    assert classification_metrics(["x", "y"], ["x", "y"], ["x", "y", "z"])["macro_f1"] == 1.0


def test_bleu_and_chrf_by_hand():
    # one sentence, same length (brevity penalty 1); n-gram precisions 4/5, 3/4, 2/3, 1/2
    m = generation_metrics(["a b c d e"], ["a b c d f"])
    assert m["bleu"] == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-6)
    assert m["exact_match"] == 0.0
    # a hypothesis half the reference's length: brevity penalty exp(1 - 8/4), all precisions 1
    short = generation_metrics(["a b c d"], ["a b c d e f g h"])
    assert short["bleu"] == pytest.approx(100 * math.exp(1 - 8 / 4), abs=1e-6)
    same = generation_metrics(["the cat sat on it", "on the big red mat"], ["the cat sat on it", " on the big red mat "])
    assert same["bleu"] == pytest.approx(100) and same["chrf"] == pytest.approx(100) and same["exact_match"] == 1.0
    assert generation_metrics(["xyz"], ["abc"])["chrf"] == 0.0


# ---------------------------------------------------------------- --task lm
@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> tuple[Path, Path]:
    """An untrained 2-layer, 32-dim GPT saved as a run over a prepared char data dir."""
    from scratchgpt.checkpoint import save_checkpoint
    from scratchgpt.data import prepare

    root = tmp_path_factory.mktemp("evalrun")
    text = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs.\n" * 40
    (root / "t.txt").write_text(text)
    data = root / "data"
    meta = prepare([str(root / "t.txt")], data, tokenizer="char", progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=meta["vocab_size"], n_layer=2, n_head=2, n_embd=32, block_size=32)
    from dataclasses import asdict

    save_checkpoint(root / "run", model=GPT(cfg), optimizer=None, state={"step": 0},
                    config={"model": asdict(cfg), "data": str(data)}, tokenizer_file=data / "tokenizer.json",
                    is_best=True)
    return root / "run", data


def run_eval(capsys, *args) -> tuple[int, dict | str]:
    code = main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def test_lm_on_text_file_matches_prepared_split(lm_run, tmp_path, capsys):
    from scratchgpt.data import TokenDataset
    from scratchgpt.tokenizer import Tokenizer

    run, data = lm_run
    code, on_dir = run_eval(capsys, run)  # default: --task lm on the run's data dir
    assert code == 0 and on_dir["split"] == "val"
    val = TokenDataset(data, "val", 1)
    text = Tokenizer.load(data).decode(val.tokens.tolist())
    (tmp_path / "val.txt").write_text(text, encoding="utf-8")
    code, on_txt = run_eval(capsys, run, "--task", "lm", "--data", tmp_path / "val.txt")
    assert code == 0 and on_txt["split"] == "file"
    assert on_txt["tokens"] == on_dir["tokens"] and on_txt["val_loss"] == pytest.approx(on_dir["val_loss"], rel=1e-6)
    # bits per byte = nats / ln 2 / bytes of the predicted text (all ASCII here: one byte a character)
    assert on_txt["bits_per_byte"] == pytest.approx(on_txt["val_loss"] * on_txt["tokens"] / math.log(2) / (len(text) - 1))
    assert on_txt["perplexity"] == pytest.approx(math.exp(on_txt["val_loss"]))
    saved = json.loads((run / "eval-lm.json").read_text())
    assert saved["val_loss"] == on_txt["val_loss"] and (run / "eval.json").exists()


def test_eval_errors_are_one_line(lm_run, tmp_path, capsys):
    run, _ = lm_run
    (tmp_path / "zh.txt").write_text("你好")
    for args, needle in [
        (("--task", "lm", "--data", tmp_path / "zh.txt"), "zh.txt"),
        (("--task", "classify", "--data", tmp_path / "zh.txt"), "not a classification run"),
        (("--task", "classify"), "needs --data"),
        (("--task", "generate"), "needs --data"),
    ]:
        code, err = run_eval(capsys, run, *args)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 1 and len(lines) == 1 and needle in lines[0], err
