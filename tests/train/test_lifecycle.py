"""A run's life around the loop: Ctrl-C / SIGTERM keep the work (real signals to real processes),
resume hygiene (metrics cut back to the checkpoint, stale temp folders, a run with no checkpoint
yet, a longer max_iters), the final eval of best/, and `--stop` escapes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, run_cli, tiny_flags
from scratchgpt import runtime
from scratchgpt.checkpoint import remove_stale_temps
from scratchgpt.cli import main
from scratchgpt.model import ModelConfig
from scratchgpt.optim import OptimConfig, lr_at
from scratchgpt.train import TrainConfig, train

pytestmark = pytest.mark.slow  # subprocesses, signals, torchrun or many fuzz examples


def quiet(**kw) -> TrainConfig:
    base = dict(batch_size=8, eval_iters=2, sample_tokens=0, progress=False, tensorboard=False, plot=False,
                final_eval=False, log_interval=1, report=False, device="cpu", dtype="float32")  # exact on any machine
    return TrainConfig(**{**base, **kw})


def rows(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scratchgpt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never reached {n} lines")
        time.sleep(0.02)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- interrupts
def test_ctrl_c_saves_and_resume_is_bit_exact(tmp_path, char_data):
    """A real SIGINT to a real `scratchgpt train`: it finishes the step, saves latest/, the plot and
    result.json, exits 130; --resume then continues exactly as if nothing had happened."""
    flags = tiny_flags(**{"train.log_interval": 1, "train.eval_interval": 1000, "model.dropout": 0.1,
                          "optim.schedule": "constant", "train.plot": "true"})
    run = tmp_path / "run"
    proc = start("train", "--data", char_data, "--out", run, *flags, "--train.max_iters=100000")
    wait_for_lines(run / "metrics.jsonl", 5, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT: stopping after this step and saving" in err and "Traceback" not in err
    result = json.loads((run / "result.json").read_text())
    k = result["step"]
    assert result["stop_reason"] == "interrupted" and "final_val_loss" not in result
    assert json.loads((run / "latest/state.json").read_text())["step"] == k
    assert (run / "loss.png").exists() and [r["step"] for r in rows(run)] == list(range(1, k + 1))

    resumed = run_cli("train", "--out", run, "--resume", f"--train.max_iters={k + 12}")
    assert resumed.returncode == 0, resumed.stderr
    assert main(["train", "--data", str(char_data), "--out", str(tmp_path / "ref"), *flags,
                 f"--train.max_iters={k + 12}"]) == 0
    got, want = rows(run), rows(tmp_path / "ref")
    assert [r["step"] for r in got] == list(range(1, k + 13))  # no step twice, none missing
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in want]
    assert same_weights(run / "latest", tmp_path / "ref" / "latest")


def test_a_second_signal_quits_at_once_and_handlers_are_restored(monkeypatch):
    monkeypatch.setattr(runtime, "REPEAT_GRACE_S", 0.3)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with runtime.stop_on_signals() as stop:
        with runtime.stop_on_signals() as inner:  # nested (tune's trials): the same request
            assert inner is stop
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs the handler between bytecodes
        assert stop.requested and stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # at once after the first: torchrun forwarding the same Ctrl-C
        time.sleep(0.01)
        time.sleep(0.35)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_during_finetune_saves_and_resume_is_bit_exact(tmp_path, char_data):
    base = tmp_path / "base"
    train(data=char_data, out=base, model=ModelConfig(**TINY, dropout=0.1), train=quiet(max_iters=2, eval_interval=2),
          optim=OptimConfig(warmup_iters=1))
    lines = [{"text": f"sample number {i} " + "ab" * (i % 7), "label": "even" if i % 2 == 0 else "odd"}
             for i in range(64)]
    for name in ("train", "val"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    def command(out: Path) -> list:
        return ["finetune", "classify", base, "--train", tmp_path / "train.jsonl", "--val", tmp_path / "val.jsonl",
                "--out", out, "--max-steps", "120", "--batch-size", "4", "--device", "cpu"]

    out = tmp_path / "cls"
    proc = start(*command(out))
    wait_for_lines(out / "metrics.jsonl", 3, proc)  # the step-0 evaluation and two more rows
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    result = json.loads((out / "result.json").read_text())
    assert result["stop_reason"] == "interrupted" and "saved" in err and "Traceback" not in err
    k = result["steps"]
    assert 10 <= k < 120 and json.loads((out / "latest/state.json").read_text())["step"] == k
    assert (out / "latest/optimizer.safetensors").exists() and (out / "report.html").exists()

    assert main([str(a) for a in command(out)] + ["--resume", "--lr", "1e-3"]) == 1  # other options: refused
    assert main([str(a) for a in command(out)] + ["--resume"]) == 0
    assert main([str(a) for a in command(tmp_path / "ref")]) == 0
    got, want = rows(out), rows(tmp_path / "ref")
    assert [r["step"] for r in got] == [r["step"] for r in want]  # nothing twice, nothing missing
    assert [r.get("train_loss") for r in got] == [r.get("train_loss") for r in want]
    assert [r.get("val_loss") for r in got] == [r.get("val_loss") for r in want]
    assert same_weights(out / "latest", tmp_path / "ref" / "latest")
    assert "--resume" not in json.loads((out / "config.json").read_text())["command"]  # the run's own command
    assert json.loads((out / "result.json").read_text())["best"] == json.loads((tmp_path / "ref/result.json").read_text())["best"]


# ---------------------------------------------------------------- resume hygiene
def test_resume_cuts_metrics_back_and_removes_stale_temps(tmp_path, char_data, capsys):
    run = tmp_path / "run"
    train(data=char_data, out=run, model=ModelConfig(**TINY), train=quiet(max_iters=10, eval_interval=5, sample_tokens=8),
          optim=OptimConfig(warmup_iters=2))
    ref = [r["train_loss"] for r in rows(run)]
    # a crash after step 10's rows but before its checkpoint, during a save that left temp folders behind
    shutil.rmtree(run / "latest")
    shutil.rmtree(run / "checkpoints" / "step-0000010")
    stale = [run / "checkpoints" / ".tmp-step-0000011", run / ".tmp-latest-x1y2", run / ".latest.old"]
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half a model")
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert not any(d.exists() for d in stale)
    # a swap of best/ killed between its two renames left only .best.old: it is best/, so it goes back
    os.replace(run / "best", run / ".best.old")
    before = (run / ".best.old" / "state.json").read_text()
    remove_stale_temps(run)
    assert (run / "best" / "state.json").read_text() == before and not (run / ".best.old").exists()
    got = rows(run)
    assert [r["step"] for r in got] == list(range(1, 11)) and [r["train_loss"] for r in got] == ref
    assert [r["step"] for r in got if "val_loss" in r] == [5, 10]  # the checkpoint step's row survived the cut
    assert [s["step"] for s in rows(run, "samples.jsonl")] == [5, 10]


def test_resume_without_a_checkpoint_starts_afresh(tmp_path, char_data, capsys):
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    for out in (run, fresh):
        train(data=char_data, out=out, model=ModelConfig(**TINY), train=quiet(max_iters=6, eval_interval=6),
              optim=OptimConfig(warmup_iters=2))
    for name in ("latest", "best", "checkpoints", "result.json"):  # as if it died before its first save
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert main(["train", "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "has no checkpoint yet (it stopped before its first save): starting it afresh" in err
    assert [r["step"] for r in rows(run)] == list(range(1, 7))
    assert same_weights(run / "latest", fresh / "latest")


def test_longer_max_iters_on_resume_keeps_the_schedule(tmp_path, char_data, capsys):
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=2, schedule="cosine")
    for name in ("keep", "given"):
        train(data=char_data, out=tmp_path / name, model=ModelConfig(**TINY), optim=optim,
              train=quiet(max_iters=10, eval_interval=10))
    assert main(["train", "--out", str(tmp_path / "keep"), "--resume", "--train.max_iters=16"]) == 0
    assert "the LR schedule keeps its original length of 10 steps" in capsys.readouterr().err
    lrs = {r["step"]: r["lr"] for r in rows(tmp_path / "keep")}
    assert lrs[10] == pytest.approx(lr_at(9, optim, 10)) and lrs[13] == pytest.approx(1e-4)  # no jump back up
    assert main(["train", "--out", str(tmp_path / "given"), "--resume", "--train.max_iters=16",
                 "--optim.decay_iters=16"]) == 0
    assert "keeps its original length" not in capsys.readouterr().err
    lrs = {r["step"]: r["lr"] for r in rows(tmp_path / "given")}
    assert lrs[13] == pytest.approx(lr_at(12, OptimConfig(**{**optim.__dict__, "decay_iters": 16}), 16))


def test_extending_a_run_that_ended_at_lr_0_is_refused_with_the_ways_forward(tmp_path, char_data, capsys):
    """The recipe's schedule ends at min_lr 0: more steps would train nothing, so --resume with a larger
    max_iters says so, in one line, before anything changes; each way it names then works, saying the LR."""
    optim = OptimConfig(lr=1e-3, min_lr=0.0, warmup_iters=2, schedule="wsd", wsd_decay_frac=0.5)
    run = tmp_path / "done"
    train(data=char_data, out=run, model=ModelConfig(**TINY), optim=optim, train=quiet(max_iters=10, eval_interval=10))
    before = (run / "metrics.jsonl").read_text(), (run / "config.json").read_text()
    assert main(["train", "--out", str(run), "--resume", "--train.max_iters=16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "at LR 0" in err and "--optim.decay_iters" in err and "--optim.min_lr" in err
    assert ((run / "metrics.jsonl").read_text(), (run / "config.json").read_text()) == before
    assert main(["train", "--out", str(run), "--resume", "--train.max_iters=16", "--optim.decay_iters=20"]) == 0
    assert "note: step 10 trains at LR 0.001; the schedule it was saved with had 0" in capsys.readouterr().err
    assert {r["step"]: r["lr"] for r in rows(run)}[11] == pytest.approx(1e-3)


# ---------------------------------------------------------------- the final eval, --stop
def test_final_val_loss_is_that_of_best(tmp_path, char_data, monkeypatch, capsys):
    """Val estimates that only get worse after the first: early stopping keeps best/ at step 2, and the
    final whole-split figures in result.json are best/'s, as `scratchgpt eval` (best by default) reports."""
    import scratchgpt.train as train_module

    real, calls = train_module.estimate_loss, {"n": 0}

    def worsening(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        return {"train": out["train"], "val": 1.0 + calls["n"]}

    monkeypatch.setattr(train_module, "estimate_loss", worsening)
    run = tmp_path / "run"
    result = train(data=char_data, out=run, model=ModelConfig(**TINY),
                   train=quiet(max_iters=50, eval_interval=2, patience=2, final_eval=True),
                   optim=OptimConfig(lr=3e-3, warmup_iters=2))
    assert result["stop_reason"].startswith("early stopping") and result["step"] == 6
    assert result["final_eval_checkpoint"] == "best (step 2)"
    capsys.readouterr()
    main(["eval", str(run)])
    best = json.loads(capsys.readouterr().out)
    main(["eval", str(run), "--which", "latest"])
    latest = json.loads(capsys.readouterr().out)
    assert result["final_val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    assert abs(result["final_val_loss"] - latest["val_loss"]) > 1e-4


def test_stop_understands_escapes(tmp_path, char_data, capsys):
    from scratchgpt.cli import _generation_config, _sample_parser

    args = _sample_parser().parse_args(["run", "--stop", "\\n\\n", "a\\tb", "\\\\n"])
    assert _generation_config(args).stop == ("\n\n", "a\tb", "\\n")  # typed backslash-n is a newline; \\n is literal
    run = tmp_path / "run"
    train(data=char_data, out=run, model=ModelConfig(**TINY), train=quiet(max_iters=30, eval_interval=30),
          optim=OptimConfig(lr=3e-3, warmup_iters=2))
    for seed in range(1, 30):  # a sample with a line break of its own
        common = ["sample", str(run), "--prompt", "a", "--max-new-tokens", "300", "--seed", str(seed)]
        assert main(common) == 0
        free = capsys.readouterr().out[:-1]  # sample adds one newline at the end
        if "\n" in free:
            break
    assert main(common + ["--stop", "\\n"]) == 0
    assert capsys.readouterr().out[:-1] == free[: free.index("\n")]


# ---------------------------------------------------------------- the main command
def test_train_without_config_starts_from_the_recipe(tmp_path, char_data, capsys):
    """`scratchgpt train` (any --data) gets recipes/default.yaml; --config FILE gets the config classes'
    defaults + FILE (the nanoGPT comparison); either way it ends with a sample, perplexity and the report."""
    import yaml

    from scratchgpt.cli import RECIPE, _sections, _train_parser, use_recipe

    def parsed(argv):
        p = _train_parser()
        use_recipe(p, argv)
        return _sections(p.parse_args(argv))

    recipe = yaml.safe_load(RECIPE.read_text())
    model, tcfg, optim = parsed(["--data", "mine", "--train.max_iters", "5"])
    assert {k: getattr(model, k) for k in recipe["model"]} == recipe["model"]
    assert tcfg.max_iters == 5 and tcfg.sample_tokens == recipe["train"]["sample_tokens"] and tcfg.report
    assert optim.optimizer == "muon" and optim.schedule == recipe["optim"]["schedule"]
    nanogpt = REPO / "configs" / "shakespeare-char-nanogpt.yaml"
    model, tcfg, optim = parsed(["--config", str(nanogpt)])
    assert (model.n_head, model.pos, model.mlp_hidden, optim.optimizer, tcfg.max_iters) == (4, "learned", 0, "adamw", 2000)
    assert (model, tcfg, optim) == parsed(["--config", str(nanogpt)]) != parsed([])
    assert parsed(["--config", "{}"]) == (ModelConfig(), TrainConfig(), OptimConfig())

    # the recipe end to end, shrunk: the last lines are the sample, the val perplexity and the report's path
    run = tmp_path / "run"
    assert main(["train", "--data", str(char_data), "--out", str(run), "--model.n_layer=1", "--model.n_embd=32",
                 "--train.batch_size=4", "--train.max_iters=4", "--train.eval_iters=1", "--train.sample_tokens=16",
                 "--train.progress=false", "--optim.warmup_iters=2"]) == 0
    tail = capsys.readouterr().err.rstrip().splitlines()[-30:]
    assert any(line.startswith("| val perplexity |") for line in tail) and "Sample at step 4:" in tail
    assert tail[-1] == f"Report: {run / 'report.html'}" and (run / "report.html").exists()
