"""Every option checked before any work, in one line naming the flag, the value and what is allowed; honest
results (strict JSON, a failing status for a run that mostly skipped its steps). One test per case the
hardening sweep found on main, plus the checks behind them."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import cli, poison_loss, tiny_flags
from scratchgpt import UserError
from scratchgpt.checks import ConfigError, check_range, describe
from scratchgpt.cli import main
from scratchgpt.data import PrepareConfig
from scratchgpt.finetune import FinetuneOptions
from scratchgpt.generate import MAX_NEW_TOKENS, GenerationConfig
from scratchgpt.model import ModelConfig
from scratchgpt.optim import OptimConfig
from scratchgpt.train import TrainConfig
from scratchgpt.utils import atomic_write_json, finite_or_null, json_text


def one_error(capsys, *args) -> str:
    """The command fails with one `error: ...` line, last on stderr (after any progress it printed), no traceback."""
    code, _, err = cli(capsys, *args)
    assert code != 0 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error:") for ln in lines) == 1, err
    return lines[-1]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript, Go, jq) do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- the sweep's cases
def test_train_out_is_an_existing_file(tmp_path, char_data, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    msg = one_error(capsys, "train", "--data", char_data, "--out", f, *tiny_flags())
    assert f"--out {f} is a file" in msg and f.read_text() == "keep me"


@pytest.mark.parametrize("flag, value, expected", [
    ("--optim.lr", "-0.001", "--optim.lr must be in [0, 1000], got -0.001"),
    ("--optim.lr", "1e300", "--optim.lr must be in [0, 1000], got 1e+300"),
    ("--model.dropout", "1.5", "--model.dropout must be in [0, 1), got 1.5"),
    ("--train.batch_size", "0", "--train.batch_size must be in [1, 1048576], got 0"),
    ("--train.eval_interval", "0", "--train.eval_interval must be >= 1, got 0"),
    ("--train.max_iters", "-3", "--train.max_iters must be >= 1, got -3"),
    ("--optim.betas", "[0.9, 1.0]", "--optim.betas must be in [0, 1), got 1.0"),
    ("--train.threads", "100000", "--train.threads must be in [0, 1024], got 100000"),
    ("--model.n_layer", "abc", "--model.n_layer takes an integer, got 'abc'"),
    ("--model.n_layer", "1.5", "--model.n_layer takes an integer, got '1.5'"),
    ("--optim.lr", "nan", "--optim.lr takes a finite number, got 'nan'"),
    ("--train.target_val_loss", "x", "--train.target_val_loss takes a finite number or null, got 'x'"),
    ("--train.dtype", "f8", "--train.dtype takes one of auto, float32, bfloat16, float16, got 'f8'"),
    ("--optim.betas", "[0.9]", "--optim.betas takes a list of 2 values, got '[0.9]'"),
    ("--model.n_kv_head", "0", "--model.n_kv_head must be in [1, 1024], got 0"),
    ("--model.n_kv_head", "3", "--model.n_head 2 must be divisible by --model.n_kv_head 3"),
    ("--model.norm_eps", "0", "--model.norm_eps must be > 0, got 0.0"),
    ("--model.norm_eps", "nan", "--model.norm_eps takes a finite number or null, got 'nan'"),
    ("--model.rope_scaling", "yarn", "--model.rope_scaling takes one of none, llama3, got 'yarn'"),
    ("--model.rope_factor", "0.5", "--model.rope_factor must be >= 1, got 0.5"),
    ("--model.rope_high_freq_factor", "1", "--model.rope_high_freq_factor 1.0 must exceed --model.rope_low_freq_factor 1.0"),
    ("--model.rope_original_context", "0", "--model.rope_original_context must be in [1, 1048576], got 0"),
])
def test_bad_values_are_one_line_naming_flag_value_and_range(tmp_path, char_data, capsys, flag, value, expected):
    out = tmp_path / "r"
    msg = one_error(capsys, "train", "--data", char_data, "--out", out, *tiny_flags(), f"{flag}={value}")
    assert msg == f"error: {expected}"
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("extra, expected", [
    ({"train.micro_batch_size": 3}, "--train.micro_batch_size 3 must divide the batch of 8 per rank"),
    ({"train.max_iters": 5, "optim.warmup_iters": 10}, "--optim.warmup_iters 10 must be <= --train.max_iters 5"),
    ({"optim.decay_iters": 5, "optim.warmup_iters": 10}, "--optim.warmup_iters 10 must be <= --optim.decay_iters 5"),
    ({"model.block_size": 100000}, "--model.block_size 100000 must be < the"),
    ({"model.n_layer": 1024, "model.n_embd": 65536, "model.n_head": 1}, "GiB to train"),
    ({"model.n_embd": 30, "model.n_head": 4}, "--model.n_embd 30 must be divisible by --model.n_head 4"),
])
@pytest.mark.slow
def test_relations_are_checked_before_any_work(tmp_path, char_data, capsys, extra, expected):
    run = tmp_path / "r"
    assert main(["train", "--data", str(char_data), "--out", str(run), *tiny_flags(**{"train.max_iters": 2})]) == 0
    before = tree_hash(run)
    capsys.readouterr()
    msg = one_error(capsys, "train", "--data", char_data, "--out", run, "--force", *tiny_flags(**extra))
    assert expected in msg
    assert tree_hash(run) == before  # --force deletes nothing when the new config is refused


@pytest.mark.slow
def test_train_never_writes_into_or_deletes_a_directory_that_is_not_a_run(tmp_path, char_data, capsys):
    before = tree_hash(char_data)
    for force in ([], ["--force"]):
        msg = one_error(capsys, "train", "--data", char_data, "--out", char_data, *force, *tiny_flags())
        assert "already holds files that are not a training run" in msg
    assert tree_hash(char_data) == before


def test_sample_takes_a_seed_of_any_size(tiny_run, capsys):
    args = ["sample", tiny_run, "--max-new-tokens", "8", "--device", "cpu", "--prompt", "a"]
    code, huge, err = cli(capsys, *args, "--seed", "1180591620717411303424")
    assert code == 0 and "Traceback" not in err
    assert cli(capsys, *args, "--seed", str(1180591620717411303424 % 2**63))[1] == huge


@pytest.mark.slow
def test_a_run_that_skips_most_steps_fails_with_a_summary_and_strict_json(tmp_path, char_data, capsys, monkeypatch):
    poison_loss(monkeypatch, lambda n: n >= 2)  # every loss after the first step is NaN
    run = tmp_path / "r"
    msg = one_error(capsys, "train", "--data", char_data, "--out", run,
                    *tiny_flags(**{"train.max_iters": 300, "train.eval_interval": 2, "train.skip_nonfinite": "true",
                                   "train.log_interval": 1}))
    assert "steps were skipped for a non-finite loss or gradient" in msg and "--train.max_skipped_frac 0.1" in msg
    result = strict_json((run / "result.json").read_text())
    assert result["stop_reason"] == "too many non-finite steps" and result["skipped_steps"] > 0
    assert result["step"] < 300  # stopped as soon as the limit could no longer be met
    rows = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    nan_rows = [r for r in rows if r.get("nonfinite")]
    assert nan_rows and all(r[k] is None and v == "nan" for r in nan_rows for k, v in r["nonfinite"].items())
    strict_json((run / "latest" / "state.json").read_text())


def test_a_few_skipped_steps_are_allowed(tmp_path, char_data, capsys, monkeypatch):
    poison_loss(monkeypatch, {3}, float("inf"))
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / "r",
                       *tiny_flags(**{"train.max_iters": 10, "train.skip_nonfinite": "true"}))
    assert code == 0, err
    assert strict_json((tmp_path / "r" / "result.json").read_text())["skipped_steps"] == 1


@pytest.mark.slow
def test_the_gpus_on_device_finite_check_run_on_the_cpu(tmp_path, char_data, capsys, monkeypatch):
    """CUDA keeps the finite check on the device (fused AdamW's found_inf skips a bad step, no host sync per step);
    torch's fused CPU AdamW reads found_inf too, so the same path runs here: it names the same step as the GPU test,
    and skipping ends in the very weights the host check gives."""
    from safetensors.torch import load_file
    from scratchgpt import train as T

    calls = poison_loss(monkeypatch, {4})
    flags = tiny_flags(**{"train.max_iters": 10, "train.eval_interval": 5, "train.log_interval": 1,
                          "optim.optimizer": "adamw"})  # Muon steps cannot read found_inf
    runs = {}
    for name, devices in (("host", ("cuda",)), ("deferred", ("cuda", "cpu"))):
        monkeypatch.setattr(T, "DEFERRED_CHECK_DEVICES", devices)
        calls["n"] = 0
        msg = one_error(capsys, "train", "--data", char_data, "--out", tmp_path / f"{name}-stops", *flags)
        assert "non-finite loss or gradient at step 3" in msg, msg
        assert not (tmp_path / f"{name}-stops/latest").exists()  # no checkpoint holds the bad step
        calls["n"] = 0
        code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / name, *flags,
                           "--train.skip_nonfinite=true")
        assert code == 0, err
        runs[name] = load_file(tmp_path / name / "latest/model.safetensors")
    assert "(1 step(s) through 3 skipped)" in msg  # the deferred verdict comes at the next log, one step later
    assert runs["deferred"].keys() == runs["host"].keys()
    assert all(torch.equal(runs["deferred"][k], runs["host"][k]) for k in runs["host"])


@pytest.mark.slow
def test_fp16_gradient_overflow_backs_the_scaler_off_instead_of_stopping(tmp_path, char_data, capsys, monkeypatch):
    """fp16's GradScaler grows its scale until a gradient overflows, then skips that step and halves it: normal
    operation, not a non-finite step. A scale of 2^40 overflows at once (the same code runs on CPU and CUDA)."""
    import functools

    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(real, init_scale=2.0 ** 40))
    run = tmp_path / "fp16"
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", run,
                       *tiny_flags(**{"train.dtype": "float16", "train.max_iters": 40, "train.eval_interval": 40,
                                      "optim.optimizer": "adamw"}))
    assert code == 0, err
    state = strict_json((run / "latest/state.json").read_text())
    assert state["scaler"]["scale"] < 2.0 ** 40 / 2 ** 10  # it backed off, at least 10 times
    assert strict_json((run / "result.json").read_text()).get("skipped_steps", 0) == 0
    rows = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # and learned once the scale fit


# ---------------------------------------------------------------- the checks themselves
def test_configs_check_themselves_when_built():
    with pytest.raises(ConfigError, match=r"--model.dropout must be in \[0, 1\), got 1.5"):
        ModelConfig(dropout=1.5)
    with pytest.raises(ValueError):  # a ConfigError is a ValueError for code that builds configs itself
        TrainConfig(batch_size=True)
    with pytest.raises(UserError, match="--optim.betas must be a list of 2 values"):
        OptimConfig(betas=(0.9,))
    with pytest.raises(UserError, match="--train.dtype must be one of auto, float32, bfloat16, float16"):
        TrainConfig(dtype="f8")
    with pytest.raises(UserError, match="--optim.eps must be a finite number, got inf"):
        OptimConfig(eps=math.inf)
    assert OptimConfig(betas=[0.8, 0.9], lr=1).betas == (0.8, 0.9) and isinstance(OptimConfig(lr=1).lr, float)
    assert TrainConfig(peak_flops="1e11").peak_flops == 1e11  # YAML 1.1 reads 1e11 as a string
    with pytest.raises(UserError, match=f"--max-new-tokens must be in \\[0, {MAX_NEW_TOKENS}\\]"):
        GenerationConfig(max_new_tokens=10**12)
    assert GenerationConfig(seed=-1).seed == 2**63 - 1
    with pytest.raises(UserError, match="--workers must be at most 1024, got 2000"):
        PrepareConfig(workers=2000)
    with pytest.raises(UserError, match="--val-fraction must be a finite number, got nan"):
        PrepareConfig(val_fraction=math.nan)
    with pytest.raises(UserError, match="--lora-dropout must be in"):
        FinetuneOptions(lora_dropout=1.0)


def test_interval_checks_and_wording():
    assert describe("[1, inf)") == ">= 1" and describe("(0, inf)") == "> 0" and describe("(0, 1]") == "in (0, 1]"
    check_range("--x", 1, "(0, 1]")
    for bad in (0, 1.5, math.nan):
        with pytest.raises(ConfigError, match=r"--x must be in \(0, 1\]"):
            check_range("--x", bad, "(0, 1]")


def test_json_is_strict_with_null_and_a_reason(tmp_path):
    rec = finite_or_null({"val_loss": math.nan, "ok": 1.5, "nested": {"ppl": math.inf}, "list": [-math.inf]})
    assert rec == {"val_loss": None, "ok": 1.5, "nested": {"ppl": None}, "list": [None],
                   "nonfinite": {"val_loss": "nan", "nested.ppl": "inf", "list[0]": "-inf"}}
    atomic_write_json(tmp_path / "a.json", rec)
    assert strict_json((tmp_path / "a.json").read_text()) == rec
    with pytest.raises(ValueError):  # the writer itself refuses NaN: it never writes what strict parsers reject
        atomic_write_json(tmp_path / "b.json", {"loss": math.nan})
    assert not (tmp_path / "b.json").exists()
    with pytest.raises(ValueError):
        json_text([math.inf])


def test_extreme_sampling_values_never_crash(tiny_run, capsys):
    base = ["sample", tiny_run, "--max-new-tokens", "6", "--device", "cpu", "--seed", "1"]
    for extra in (["--temperature", "1e-300"], ["--repetition-penalty", "1e-300"], ["--top-p", "1e-300"],
                  ["--repetition-penalty", "1e300", "--temperature", "1e300"], ["--top-k", str(10**30)]):
        code, _, err = cli(capsys, *base, *extra)
        assert code == 0 and "Traceback" not in err, (extra, err)
    assert "--num-samples must be in [1, 10000]" in one_error(capsys, *base, "--num-samples", str(2**31))
    assert "--max-new-tokens must be in" in one_error(capsys, "sample", tiny_run, "--max-new-tokens", str(10**11))


def test_eval_and_finetune_outputs_are_checked(tiny_run, tmp_path, capsys):
    assert "--batch-size must be in [1, 65536], got 0" in one_error(capsys, "eval", tiny_run, "--batch-size", "0")
    assert "--context must be in" in one_error(capsys, "eval", tiny_run, "--context", str(2**63))
    f = tmp_path / "f.txt"
    f.write_text("x")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a", "label": "b"}\n')
    msg = one_error(capsys, "finetune", "classify", tiny_run, "--train", rows, "--val", rows, "--out", f)
    assert "is a file, not a directory" in msg and f.read_text() == "x"
    pytest.importorskip("optuna")
    msg = one_error(capsys, "tune", "--out", tiny_run, "--space", '{"optim.lr": [0.001]}', *tiny_flags())
    assert "already holds other files (not a search)" in msg
    assert "--seed must be in [0, 4294967295]" in one_error(capsys, "tune", "--out", tmp_path / "t", "--seed", "-1",
                                                            "--space", '{"optim.lr": [0.001]}', *tiny_flags())
