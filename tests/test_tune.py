"""`scratchgpt tune`: search-space checks, grid/random/bayes searches of tiny real trainings, resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

pytest.importorskip("optuna")

from scratchgpt import UserError  # noqa: E402
from scratchgpt.cli import main  # noqa: E402
from scratchgpt.model import ModelConfig  # noqa: E402
from scratchgpt.optim import OptimConfig  # noqa: E402
from scratchgpt.train import TrainConfig  # noqa: E402
from scratchgpt.tune import grid_values, load_space, tune  # noqa: E402

# a 1-layer, 16-dim model trained for 3 steps: a trial takes a fraction of a second
MODEL = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
TRAIN = TrainConfig(batch_size=4, max_iters=3, eval_interval=3, eval_iters=1, sample_tokens=0, progress=False,
                    tensorboard=False, plot=False, final_eval=False, peak_flops=1e15, keep_last=1, threads=1,
                    device="cpu", dtype="float32")
OPTIM = OptimConfig(warmup_iters=1)
BASE = dict(model=MODEL, train=TRAIN, optim=OPTIM)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the search space
def test_space_forms_are_normalised(tmp_path):
    inline = load_space('{"optim.lr": {"low": 1e-4, "high": 1e-2, "log": true}, "model.n_embd": [32, 64]}')
    assert inline == {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True, "step": None},
                      "model.n_embd": {"choices": [32, 64]}}
    # YAML file, nested sections, and PyYAML's string `1e-4` all mean the same
    f = tmp_path / "space.yaml"
    f.write_text("optim:\n  lr: {low: 1e-4, high: 1e-2, log: true}\nmodel.n_embd: [32, 64, 32]\n")
    assert load_space(f) == load_space(str(f)) == inline
    assert load_space({"model.n_layer": {"low": 2, "high": 6, "step": 2}})["model.n_layer"]["type"] == "int"
    assert load_space({"optim.weight_decay": [0, 0.1]})["optim.weight_decay"] == {"choices": [0.0, 0.1]}
    assert load_space({"model.pos": ["rope", "learned"], "train.target_val_loss": [None, 2.0]})


@pytest.mark.parametrize("space, message", [
    ({"optim.learning_rate": [1e-3]}, r"unknown key 'optim.learning_rate' \(did you mean optim.lr\?\)"),
    ({"model.nembd": [16]}, r"did you mean model.n_embd"),
    ({}, "empty"),
    ("", "must be a mapping"),
    ("[1, 2]", "must be a mapping"),
    ("missing.yaml", "does not exist"),
    ({"optim.lr": []}, "no choices"),
    ({"optim.lr": {"low": 0.1, "high": 0.01}}, "low < high"),
    ({"optim.lr": {"low": 0, "high": 0.01, "log": True}}, "low > 0"),
    ({"optim.lr": {"low": 0.1}}, "needs low and high"),
    ({"optim.lr": {"low": 0.1, "high": 1, "steps": 2}}, "needs low and high"),
    ({"model.n_embd": {"low": 16.0, "high": 64.5}}, "integer field"),
    ({"model.n_embd": [16, "big"]}, "not valid"),
    ({"model.pos": ["alibi"]}, "expected 'learned', 'sinusoidal', 'rope'"),
    ({"model.pos": {"low": 1, "high": 2}}, "not numeric"),
    ({"optim.betas": [[0.9, 0.95]]}, "can't be searched"),
])
def test_space_errors_name_the_problem(space, message):
    with pytest.raises(UserError, match=message):
        load_space(space)


def test_grid_values():
    assert grid_values("k", load_space({"optim.lr": {"low": 0.1, "high": 0.3, "step": 0.1}})["optim.lr"]) == [0.1, 0.2, 0.3]
    assert grid_values("k", load_space({"model.n_layer": {"low": 1, "high": 3}})["model.n_layer"]) == [1, 2, 3]
    with pytest.raises(UserError, match="grid search needs a finite set"):
        grid_values("optim.lr", load_space({"optim.lr": {"low": 0.1, "high": 0.3}})["optim.lr"])


def test_bad_arguments_fail_before_any_training(char_data, tmp_path):
    with pytest.raises(UserError, match="at least 1"):
        tune({"optim.lr": [1e-3]}, tmp_path / "a", data=char_data, trials=0, **BASE)
    with pytest.raises(UserError, match="--space is required"):
        tune(None, tmp_path / "a", data=char_data, **BASE)
    with pytest.raises(UserError, match="nothing to resume"):
        tune(None, tmp_path / "a", trials=2, resume=True)
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_a_base_config_every_trial_would_fail_on_is_refused_before_the_first(char_data, tmp_path):
    long_warmup = dict(BASE, optim=OptimConfig(warmup_iters=100))  # > max_iters 3
    with pytest.raises(UserError, match="the base config, which every trial starts from: --optim.warmup_iters 100"):
        tune({"optim.lr": [1e-3]}, tmp_path / "w", data=char_data, trials=2, **long_warmup)
    assert not (tmp_path / "w").exists()
    # a searched key may mend it: the trials decide (here one fails and one completes)
    tune({"optim.warmup_iters": [100, 1]}, tmp_path / "m", data=char_data, method="grid", trials=2, **long_warmup)
    assert sorted(r["status"] for r in records(tmp_path / "m")) == ["complete", "failed"]


@pytest.mark.slow
def test_cli_tune_starts_from_trains_recipe(char_data, tmp_path, capsys):
    """Without --config, a search's base config is the recipe `train` runs (Muon, its warmup), not the classes'."""
    import yaml

    from conftest import tiny_flags
    from scratchgpt.cli import RECIPE

    flags = [f for f in tiny_flags(**{"train.eval_interval": 4, "train.eval_iters": 1, "train.peak_flops": 1e15})
             if not f.startswith("--optim.")]
    argv = ["tune", "--data", str(char_data), "--trials", "1", "--method", "random", "--space",
            '{"optim.muon_lr": [0.02]}', *flags]
    assert main([*argv, "--out", str(tmp_path / "t"), "--train.max_iters", "8"]) == 0, capsys.readouterr().err
    base, recipe = json.loads((tmp_path / "t/study.json").read_text())["base"], yaml.safe_load(RECIPE.read_text())
    assert {k: base["optim"][k] for k in recipe["optim"] if k != "betas"} == \
        {k: v for k, v in recipe["optim"].items() if k != "betas"}
    assert base["model"]["mlp_ratio"] == recipe["model"]["mlp_ratio"] and base["model"]["n_embd"] == 32
    # a schedule shorter than the recipe's warmup: shrunk as `train` shrinks it, with the same note
    assert main([*argv, "--out", str(tmp_path / "short"), "--train.max_iters", "4"]) == 0
    assert "warmup shortened from 5 to 0 steps" in capsys.readouterr().err


# ---------------------------------------------------------------- searches
@pytest.mark.slow
def test_grid_covers_every_combination_and_records_failures(char_data, tmp_path, capsys):
    out = tmp_path / "grid"
    # n_head=3 does not divide n_embd=16: those trials fail, and the search goes on
    best = tune({"optim.lr": [1e-3, 3e-3], "model.n_head": [2, 3]}, out, data=char_data, method="grid", trials=10,
                **BASE)
    err = capsys.readouterr().err
    assert "the grid has 4 combinations: running 4 trials, not 10" in err
    recs = records(out)
    assert sorted((r["params"]["optim.lr"], r["params"]["model.n_head"]) for r in recs) == [
        (1e-3, 2), (1e-3, 3), (3e-3, 2), (3e-3, 3)]
    failed = [r for r in recs if r["status"] == "failed"]
    assert {r["params"]["model.n_head"] for r in failed} == {3} and len(failed) == 2
    assert all("divisible" in r["error"] and r["val_loss"] is None for r in failed)
    done = [r for r in recs if r["status"] == "complete"]
    assert all(r["val_loss"] > 0 and r["step"] == 3 and r["wall_s"] >= 0 for r in done)
    winner = min(done, key=lambda r: r["val_loss"])
    assert best["trial"] == winner["trial"] and best["val_loss"] == winner["val_loss"]
    on_disk = json.loads((out / "best.json").read_text())
    assert on_disk["params"] == winner["params"] and on_disk["trials_failed"] == 2
    # the resolved config is the base with the winning params applied, and what the trial trained with
    cfg = on_disk["config"]
    assert cfg["optim"]["lr"] == winner["params"]["optim.lr"] and cfg["model"]["n_head"] == 2
    assert cfg["train"]["max_iters"] == 3 and cfg["model"]["vocab_size"] > 0
    assert json.loads((out / "best-config.json").read_text()) == cfg
    trial_cfg = json.loads((out / winner["run"] / "config.json").read_text())
    assert trial_cfg["optim"]["lr"] == winner["params"]["optim.lr"]
    assert (out / winner["run"] / "train.log").exists()
    assert "val loss" in err and "failed: --model.n_embd 16 must be divisible" in err


@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_search(char_data, tmp_path):
    method = "bayes"  # its first trial is random-sampled, the rest TPE: both samplers' replays are covered
    space = {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "model.n_embd": [16, 32]}
    tune(space, tmp_path / "whole", data=char_data, method=method, trials=3, seed=7, **BASE)
    part = tmp_path / "part"
    tune(space, part, data=char_data, method=method, trials=2, seed=7, **BASE)
    first = (part / "trial-000" / "config.json").stat().st_mtime_ns
    # resuming needs only the total; the saved space, method, seed and base config are used
    tune(None, part, trials=3, resume=True)
    assert [r["params"] for r in records(part)] == [r["params"] for r in records(tmp_path / "whole")]
    assert [r["trial"] for r in records(part)] == [0, 1, 2]
    assert (part / "trial-000" / "config.json").stat().st_mtime_ns == first  # not retrained
    assert len({r["params"]["optim.lr"] for r in records(part)}) == 3


@pytest.mark.slow
def test_resume_refuses_changed_settings(char_data, tmp_path):
    out = tmp_path / "s"
    tune({"optim.lr": [1e-3, 2e-3]}, out, data=char_data, method="random", trials=1, **BASE)
    with pytest.raises(UserError, match="already holds a search"):
        tune({"optim.lr": [1e-3, 2e-3]}, out, data=char_data, trials=1, **BASE)
    with pytest.raises(UserError, match="search space differs"):
        tune({"optim.lr": [1e-3]}, out, trials=2, resume=True)
    with pytest.raises(UserError, match="--method differs"):
        tune(None, out, method="grid", trials=2, resume=True)
    with pytest.raises(UserError, match="optim.min_lr differs"):
        tune(None, out, trials=2, resume=True, optim=replace(OPTIM, min_lr=0.5))
    # asking for no more trials than are recorded runs nothing and reports the best
    assert tune(None, out, trials=1, resume=True, **BASE)["trial"] == 0
    # --force starts over, and leaves files it does not own alone
    (out / "notes.txt").write_text("mine")
    tune({"optim.lr": [5e-3]}, out, data=char_data, trials=1, force=True, **BASE)
    assert records(out)[0]["params"] == {"optim.lr": 5e-3} and (out / "notes.txt").exists()


@pytest.mark.slow
def test_a_torn_last_line_is_run_again(char_data, tmp_path):
    out = tmp_path / "t"
    tune({"optim.lr": [1e-3, 2e-3]}, out, data=char_data, method="grid", trials=2, **BASE)
    lines = (out / "trials.jsonl").read_text().splitlines()
    (out / "trials.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # a crash mid-write
    tune(None, out, trials=2, resume=True)
    assert [r["params"] for r in records(out)] == [json.loads(line)["params"] for line in lines]


def test_all_trials_failing_is_an_error(char_data, tmp_path):
    with pytest.raises(UserError, match="no trial finished: --model.n_embd"):
        tune({"model.n_head": [3, 5]}, tmp_path / "f", data=char_data, method="grid", trials=2, **BASE)


# ---------------------------------------------------------------- the command line
@pytest.mark.slow
def test_cli(char_data, tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(json.dumps({"model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
                                "train": {"batch_size": 4, "max_iters": 3, "eval_interval": 3, "eval_iters": 1,
                                          "sample_tokens": 0, "progress": False, "tensorboard": False,
                                          "plot": False, "final_eval": False, "peak_flops": 1e15, "threads": 1,
                                          "device": "cpu", "dtype": "float32"},
                                "optim": {"warmup_iters": 1}}))
    out = tmp_path / "cli"
    argv = ["tune", "--config", str(base), "--data", str(char_data), "--out", str(out), "--method", "random",
            "--trials", "1", "--space", '{"optim.lr": {"low": 1e-3, "high": 1e-2, "log": true}}']
    assert main(argv) == 0
    captured = capsys.readouterr()
    best = json.loads(captured.out.strip().splitlines()[-1])
    assert best["trial"] == 0 and 1e-3 <= best["params"]["optim.lr"] <= 1e-2
    assert "best: trial-000" in captured.err and "search.png" in captured.err
    assert json.loads((out / "best.json").read_text())["config"]["model"]["n_embd"] == 16

    assert main(["tune", "--data", str(char_data), "--out", str(tmp_path / "x"), "--space",
                 '{"optim.learning_rate": [0.1]}']) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: search space: unknown key 'optim.learning_rate' (did you mean optim.lr?)"
    assert main(argv) == 1  # out already holds a search
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_resume_checks_exactly_the_keys_given(char_data, tmp_path, capsys):
    """A base-config flag on `tune --resume` must match the saved search, even when it equals the default."""
    out = tmp_path / "s"
    tune({"optim.lr": [1e-3, 2e-3]}, out, data=char_data, method="random", trials=1, **BASE)
    capsys.readouterr()
    assert main(["tune", "--out", str(out), "--resume", "--trials", "1", "--train.max_iters", "1000"]) == 1
    assert "train.max_iters differs from the saved search (3 there, 1000 now)" in capsys.readouterr().err
    assert main(["tune", "--out", str(out), "--resume", "--trials", "1", "--train.max_iters", "3"]) == 0


# ---------------------------------------------------------------- pruning, interrupts, the picture
LONGER = replace(TRAIN, max_iters=40, eval_interval=10)
SPACE = {"optim.lr": [1e-2, 5e-3, 0.0, 3e-3, 1e-9, 2e-3, 1e-8]}  # three rates that can't learn


@pytest.mark.slow
def test_pruning_stops_bad_trials_and_resume_replays_it(char_data, tmp_path):
    kw = dict(data=char_data, method="random", seed=3, model=MODEL, train=LONGER, optim=OPTIM)
    best = tune(SPACE, tmp_path / "whole", trials=7, **kw)
    recs = records(tmp_path / "whole")
    pruned = [r for r in recs if r["status"] == "pruned"]
    assert pruned and all(r["params"]["optim.lr"] < 1e-6 for r in pruned)  # only rates that can't learn
    assert all(10 <= r["step"] < 40 and [e[0] for e in r["evals"]] == list(range(10, r["step"] + 1, 10)) for r in pruned)
    assert all(r["status"] == "complete" and len(r["evals"]) == 4 for r in recs if r not in pruned)
    assert best["trials_pruned"] == len(pruned) and best["params"]["optim.lr"] >= 2e-3
    assert (tmp_path / "whole" / "search.png").read_bytes()[:4] == b"\x89PNG"
    # the pruner's decisions replay exactly on --resume
    tune(SPACE, tmp_path / "part", trials=4, **kw)
    tune(None, tmp_path / "part", trials=7, resume=True)
    assert records(tmp_path / "part") == [dict(r, wall_s=p["wall_s"]) for r, p in zip(recs, records(tmp_path / "part"))]
    # without a pruner every trial runs to the end
    tune(SPACE, tmp_path / "none", trials=7, pruner="none", **kw)
    assert all(r["status"] == "complete" and r["step"] == 40 for r in records(tmp_path / "none"))


@pytest.mark.slow
def test_ctrl_c_records_the_trial_and_resume_finishes_it_exactly(char_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    slow = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
            "train": {**{k: v for k, v in TRAIN.__dict__.items() if k != "sample_prompt"}, "max_iters": 300,
                      "eval_interval": 100, "log_interval": 10}, "optim": {"warmup_iters": 1}}
    config = tmp_path / "base.json"
    config.write_text(json.dumps(slow))
    space = '{"optim.lr": {"low": 1e-3, "high": 1e-2, "log": true}}'
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "scratchgpt", "tune", "--config", str(config), "--data",
                             str(char_data), "--out", str(out), "--trials", "2", "--method", "random", "--space", space],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "trial-001" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: trial-001 saved a checkpoint" in err and "--resume continues it" in err
    cut = records(out)
    assert [r["status"] for r in cut] == ["complete", "interrupted"] and 0 < cut[1]["step"] < 300
    assert json.loads((out / "trial-001" / "result.json").read_text())["stop_reason"] == "interrupted"

    tune(None, out, trials=2, resume=True)  # continues trial-001 from its checkpoint
    assert main(["tune", "--config", str(config), "--data", str(char_data), "--out", str(tmp_path / "whole"),
                 "--trials", "2", "--method", "random", "--space", space]) == 0
    done, whole = records(out), records(tmp_path / "whole")
    assert [r["status"] for r in done] == ["complete", "complete"]
    for a, b in zip(done, whole):
        assert (a["params"], a["val_loss"], a["evals"], a["step"]) == (b["params"], b["val_loss"], b["evals"], b["step"])
