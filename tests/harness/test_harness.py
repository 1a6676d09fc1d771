"""`scratchgpt eval --task harness`: lm-evaluation-harness through ScratchLM gives the metrics its own
transformers backend (HFLM) gives on the `scratchgpt export` of the same model; the command's table, its
eval-harness.json, and its one-line errors."""

from __future__ import annotations

import json
import math
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import cli
from harness_fixtures import bpe_data, family_runs, gpt2_run, harness_tasks, hflm, metrics  # noqa: F401 (fixtures)
from local_tasks import LOGLIKELIHOOD_TASKS, TASKS

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from scratchgpt.harness.lm import ScratchLM  # noqa: E402

pytestmark = pytest.mark.slow


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


def test_every_metric_equals_hflm_on_the_export(gpt2_run, harness_tasks):
    """acc, acc_norm, perplexity, word/byte perplexity, bits per byte, exact_match: within 1e-6 (in float64, where
    neither side rounds to float32; in float32 within 1e-6 relative), at batch sizes that pack differently."""
    run, export = gpt2_run
    ours = metrics(ScratchLM.from_run(run, dtype="float64", batch_size=3), TASKS, harness_tasks)
    theirs = metrics(hflm(export), TASKS, harness_tasks)
    assert {k.split(",")[0].split("/")[1] for k in ours} >= {"acc", "acc_norm", "perplexity", "word_perplexity",
                                                             "byte_perplexity", "bits_per_byte", "exact_match"}
    assert max_diff(ours, theirs) <= 1e-6
    assert not all(v in (0.0, 1.0) for k, v in ours.items() if "acc" in k)  # figures that can disagree
    ours32 = metrics(ScratchLM.from_run(run, batch_size=16), LOGLIKELIHOOD_TASKS, harness_tasks)
    theirs32 = metrics(hflm(export, "float32", 16), LOGLIKELIHOOD_TASKS, harness_tasks)
    assert all(math.isclose(ours32[k], theirs32[k], rel_tol=1e-6, abs_tol=1e-6) for k in ours32)


def requests(lm) -> dict[str, list[Instance]]:
    """One request of each kind per text, as tasks make them (a shared context; an empty one; long texts)."""
    texts = ["The quick brown fox", "jumps over", "the lazy dog " * 30, "Return the value of x."]
    ll = [Instance("loglikelihood", {}, (c, k), i) for i, (c, k) in enumerate(
        [(texts[0], " jumps"), (texts[0], " sleeps"), (texts[0], " jumps over the lazy dog"), ("", "Hello there"),
         (texts[2], " the end"), (texts[3] + " ", "It returns x.")])]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    gen = [Instance("generate_until", {}, (t, {"until": ["\n\n", "."], "max_gen_toks": 10, "do_sample": False}), i)
           for i, t in enumerate(texts[:2] + texts[3:])]
    return {"loglikelihood": ll, "loglikelihood_rolling": rolling, "generate_until": gen}


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "llama", "arcee", "qwen2", "qwen3", "gemma",
                                    "mistral", "phi3"])
def test_each_family_answers_as_hflm(family_runs, family):
    """Each request kind, on a trained tiny run of each exported family: the same numbers (within 1e-6,
    relative) and the same texts."""
    run, export = family_runs[family]
    ours, theirs = ScratchLM.from_run(run, dtype="float64", batch_size=4), hflm(export)
    assert (ours.prefix_token_id, ours.eot_token_id, ours.max_length) == (
        theirs.prefix_token_id, theirs.eot_token_id, theirs.max_length)
    for kind, reqs in requests(ours).items():
        a, b = getattr(ours, kind)(reqs), getattr(theirs, kind)(reqs)
        if kind == "loglikelihood":
            assert [g for _, g in a] == [g for _, g in b]
            a, b = [x for x, _ in a], [x for x, _ in b]
        if kind == "generate_until":
            assert a == b
        else:
            # (transformers' RMSNorm computes in float32 whatever the model's dtype: Llama's rows round there)
            assert all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b)), (kind, a, b)


def test_cli_prints_the_table_and_keeps_results(capsys, tmp_path, gpt2_run, harness_tasks):
    run, _ = gpt2_run
    code, out, err = cli(capsys, "eval", run, "--task", "harness", "--tasks", "tiny_arc_easy,tiny_lambada",
                         "--include-path", harness_tasks, "--limit", "5", "--batch-size", "4")
    assert code == 0, err
    assert "|tiny_arc_easy|" in out and "acc_norm" in out and "perplexity" in out
    saved = json.loads((run / "eval-harness.json").read_text())
    assert saved["harness_version"] == version("lm_eval")
    assert set(saved["results"]) == {"tiny_arc_easy", "tiny_lambada"}
    assert saved["versions"]["tiny_arc_easy"] == 1.0 and saved["n-samples"]["tiny_lambada"]["effective"] == 5
    assert saved["settings"]["tiny_arc_easy"]["limit"] == 5
    # a later run of another task adds to the file
    code, _, err = cli(capsys, "eval", run, "--task", "harness", "--tasks", "tiny_hellaswag", "--include-path",
                       harness_tasks, "--limit", "3")
    assert code == 0, err
    assert set(json.loads((run / "eval-harness.json").read_text())["results"]) == {
        "tiny_arc_easy", "tiny_lambada", "tiny_hellaswag"}
    # the report and the model card show them
    code, _, err = cli(capsys, "report", run)
    assert code == 0, err
    page = (run / "report.html").read_text()
    assert "eval-harness.json" in page and "tiny_hellaswag" in page and "acc_norm" in page
    code, _, err = cli(capsys, "export", run, "--out", tmp_path / "hf")
    assert code == 0, err
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "## Evaluation" in card and "| tiny_lambada | perplexity |" in card


def one_line_error(capsys, *args) -> str:
    code, _, err = cli(capsys, "eval", *args)
    # (what is not the error: the task being run, lm-eval's log lines and progress bars)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("harness: ", "20")) and "/s]" not in ln]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_is_one_line(capsys, gpt2_run, harness_tasks):
    run, _ = gpt2_run
    err = one_line_error(capsys, run, "--task", "harness", "--tasks", "hellaswg", "--include-path", harness_tasks)
    assert "unknown harness task 'hellaswg'" in err and "hellaswag" in err
    err = one_line_error(capsys, run, "--task", "harness", "--tasks", "tiny_arc_easy", "--num-fewshot", "50",
                         "--include-path", harness_tasks, "--limit", "2")
    assert "--num-fewshot 50: tiny_arc_easy has fewer examples than that to show" in err
    err = one_line_error(capsys, run, "--task", "harness", "--tasks", "tiny_arc_easy", "--num-fewshot", "7",
                         "--include-path", harness_tasks, "--limit", "2")
    assert "--num-fewshot 7" in err and "past the" in err and "context of 96" in err


def test_mlm_models_and_a_missing_extra_are_refused(capsys, monkeypatch, gpt2_run):
    from scratchgpt import UserError
    from scratchgpt.model import GPT, ModelConfig
    from scratchgpt.tokenizer import Tokenizer

    tok = Tokenizer.load(gpt2_run[0] / "best")
    with pytest.raises(UserError, match="bidirectional") as e:
        ScratchLM(GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, causal=False)), tok)
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    err = one_line_error(capsys, gpt2_run[0], "--task", "harness", "--tasks", "tiny_arc_easy")
    assert "pip install 'scratchgpt[harness]'" in err


def test_lora_unmerged_in_its_chat_template_and_quantized(capsys, tmp_path, gpt2_run, harness_tasks):
    """An SFT LoRA run scored with its adapters unmerged, prompts in its chat template (--apply-chat-template):
    HFLM's figures on its export (merged, the template as jinja); --quantize int8 keeps its own file."""
    run, _ = gpt2_run
    rows = [{"prompt": f"What is {a} plus {b}", "response": f"The sum is {a + b}."} for a in range(2, 6) for b in (3, 7)]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(capsys, "finetune", "sft", run, "--train", sft, "--val", sft, "--out", tmp_path / "lora",
                       "--lora", "--max-steps", "4", "--eval-interval", "4", "--batch-size", "4", "--lr", "0.01")
    assert code == 0, err
    ours = ScratchLM.from_run(tmp_path / "lora", dtype="float64")
    assert ours.model is not ours.gpt  # PEFT's wrapper: the adapters run beside the frozen weights
    code, _, err = cli(capsys, "export", tmp_path / "lora", "--out", tmp_path / "hf")
    assert code == 0, err
    tasks = ("tiny_lambada", "tiny_gsm8k")
    a = metrics(ours, tasks, harness_tasks, apply_chat_template=True)
    b = metrics(hflm(tmp_path / "hf"), tasks, harness_tasks, apply_chat_template=True)
    assert all(math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-6) for k in a), (a, b)
    assert a != metrics(ours, tasks, harness_tasks)  # the template changed the prompts
    code, out, err = cli(capsys, "eval", run, "--task", "harness", "--tasks", "tiny_arc_easy", "--include-path",
                         harness_tasks, "--quantize", "int8", "--limit", "4")
    assert code == 0, err
    assert json.loads((run / "eval-harness-int8.json").read_text())["quantize"] == "int8"


def test_default_suite_offline_says_so_in_one_line(gpt2_run, tmp_path):
    """No --tasks: the default suite; its datasets unreachable (offline, empty cache): one line naming --include-path."""
    from conftest import run_cli

    env = {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    r = run_cli("eval", str(gpt2_run[0]), "--task", "harness", env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("harness: ", "20"))]
    assert r.returncode == 1 and lines == [lines[-1]] and "--include-path" in lines[-1], r.stderr
    assert "could not fetch the dataset of hellaswag (offline?)" in lines[-1]


def test_ctrl_c_keeps_the_finished_tasks(capsys, monkeypatch, tmp_path, gpt2_run, harness_tasks):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(gpt2_run[0], run)
    (run / "eval-harness.json").unlink(missing_ok=True)

    def interrupted(self, requests, disable_tqdm=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(ScratchLM, "generate_until", interrupted)
    code, _, err = cli(capsys, "eval", run, "--task", "harness", "--tasks", "tiny_arc_easy,tiny_gsm8k,tiny_lambada",
                       "--include-path", harness_tasks, "--limit", "3")
    assert code == 130 and f"interrupted: kept tiny_arc_easy in {run / 'eval-harness.json'}" in err, err
    assert set(json.loads((run / "eval-harness.json").read_text())["results"]) == {"tiny_arc_easy"}
