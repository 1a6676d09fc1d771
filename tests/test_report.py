"""`scratchgpt report`: one self-contained HTML file per run (pretraining and fine-tuning), the
samples persisted during training, the terminal summary, and a look in a real headless browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TINY
from scratchgpt.cli import main
from scratchgpt.model import ModelConfig
from scratchgpt.optim import OptimConfig
from scratchgpt.train import TrainConfig, train


@pytest.fixture(scope="module")
def run(char_data, tmp_path_factory) -> Path:
    """A tiny run with samples, a plot, a final eval and its report (then `scratchgpt eval` adds eval-lm.json)."""
    out = tmp_path_factory.mktemp("report") / "run"
    train(data=char_data, out=out, model=ModelConfig(**TINY),
          train=TrainConfig(batch_size=8, max_iters=30, eval_interval=10, eval_iters=2, sample_tokens=30,
                            sample_prompt="The ", progress=False, tensorboard=False, log_interval=5),
          optim=OptimConfig(lr=3e-3, warmup_iters=2))
    assert main(["eval", str(out)]) == 0
    return out


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


@pytest.mark.slow
def test_train_writes_a_self_contained_report(run, capsys):
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [10, 20, 30] and all(s["prompt"] == "The " and s["text"] for s in samples)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page) and "<script" not in page  # nothing to fetch
    pngs = images(page)
    assert len(pngs) == 1 and pngs[0][:4] == b"\x89PNG" and len(pngs[0]) > 10_000  # the curves
    result = json.loads((run / "result.json").read_text())
    for text in ("val loss (whole val split)", f"{result['final_perplexity']:.2f}", "val perplexity", "Curves",
                 "Samples during training (3)", "tokenizer", "train_tokens", "Environment", "torch"):
        assert text in page, text
    import html

    assert html.escape("The " + samples[-1]["text"]) in page  # the samples, escaped
    # `report` rewrites it from the files (now with eval-lm.json) and prints a markdown summary
    (run / "report.html").unlink()
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith(f"## {run} (pretraining, stopped by max_iters)")
    assert f"| val perplexity | {result['final_perplexity']:.2f} |" in summary
    assert "Sample at step 30:" in summary and summary.rstrip().endswith(f"Report: {run / 'report.html'}")
    assert "eval-lm.json" not in page and "eval-lm.json" in (run / "report.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_report_of_a_classifier_has_its_confusion_matrix(run, tmp_path, capsys):
    from scratchgpt.finetune import FinetuneOptions, finetune_classify

    rows = [{"text": ("yes " if i % 2 else "no ") * (1 + i % 3), "label": "yes" if i % 2 else "no"} for i in range(40)]
    for name in ("train", "val"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cls"
    finetune_classify(run, tmp_path / "train.jsonl", tmp_path / "val.jsonl", out,
                      options=FinetuneOptions(epochs=2, batch_size=8, lr=3e-3, device="cpu"))
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "classifier run" in page and "Confusion matrix (val" in page and "macro-F1" in page
    assert "Fine-tuning evaluations" in page and "train.jsonl" in page and len(images(page)) == 1
    assert "| best val accuracy |" in capsys.readouterr().err  # the summary at the end of finetune


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "config.json" in err and len(err.splitlines()) == 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser (Debian: apt-get install chromium)")
def test_report_renders_in_a_headless_browser(run, tmp_path):
    """The documented command (report.py's docstring): a real browser draws the page, images included."""
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1100,1400", f"--screenshot={shot}", str(run / "report.html")],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (1400, 1100)
    colourful = (abs(pixels[..., 0] - pixels[..., 2]) > 0.2).mean()  # the plotted lines (white page, black text)
    assert 0.001 < colourful < 0.5
