"""Training loop behaviour: learning, every option, exact resume, NaN handling, crash-safe checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, load_lm, poison_loss, run_cli, TINY, tiny_flags
from scratchgpt import UserError
from scratchgpt.model import GPT, ModelConfig
from scratchgpt.optim import OptimConfig, lr_at
from scratchgpt.train import TrainConfig, train


SHORT = OptimConfig(warmup_iters=2)  # runs of a few steps need a warmup shorter than the run


def quiet_train(**kw) -> TrainConfig:
    base = dict(batch_size=8, eval_iters=2, sample_tokens=0, progress=False, tensorboard=False, plot=False,
                final_eval=False, log_interval=1, report=False, device="cpu", dtype="float32")  # CPU numerics (tests/test_gpu.py: CUDA)
    base.update(kw)
    return TrainConfig(**base)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_model_overfits_tiny_text(tmp_path):
    from scratchgpt.data import prepare

    text = "the quick brown fox jumps over the lazy dog. " * 3 + "pack my box with five dozen liquor jugs.\n"
    src = tmp_path / "tiny.txt"
    src.write_text(text * 20)
    data = tmp_path / "d"
    prepare(inputs=[str(src)], out=data, tokenizer="char", progress=False)
    result = train(data=data, out=tmp_path / "run", model=ModelConfig(**TINY),
                   train=quiet_train(max_iters=250, eval_interval=250, batch_size=16),
                   optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_iters=10, weight_decay=0.0))
    assert metrics(tmp_path / "run")[-1]["train_loss"] < 0.1
    assert result["best_val_loss"] < 0.2


OPTIONS = [
    dict(pos="learned"), dict(pos="sinusoidal"), dict(pos="rope"),
    dict(mlp="relu"), dict(mlp="swiglu"), dict(mlp="relu2"),
    dict(norm="rmsnorm"), dict(norm_placement="post"), dict(qk_norm=True), dict(tie_embeddings=False),
    dict(zero_init_proj=True, tie_embeddings=False), dict(logit_softcap=15.0), dict(bias=False), dict(dropout=0.1),
    dict(pos="rope", mlp="relu2", norm="rmsnorm", qk_norm=True, tie_embeddings=False, bias=False,
         zero_init_proj=True, logit_softcap=30.0),
]


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_model_option_trains(tmp_path, char_data, option):
    train(data=char_data, out=tmp_path / "r", model=ModelConfig(**{**TINY, **option}),
          train=quiet_train(max_iters=30, eval_interval=30), optim=OptimConfig(lr=3e-3, warmup_iters=2))
    rows = metrics(tmp_path / "r")
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3  # it learns, whatever the option


@pytest.mark.slow
def test_gqa_model_trains_samples_and_reports_from_the_cli(tmp_path, char_data, capsys):
    """--model.n_kv_head 1: one key/value head for both query heads; the run trains, saves the option,
    loads with the narrower c_attn, samples with the KV cache and reports its parameter count."""
    from scratchgpt.checkpoint import load_run

    run = tmp_path / "r"
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", run, "--model.n_kv_head", "1",
                       *tiny_flags(**{"model.pos": "rope", "model.norm_eps": 1e-5, "train.max_iters": 30,
                                      "train.eval_interval": 30, "train.log_interval": 1}))
    assert code == 0, err
    rows = metrics(run)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3
    saved = json.loads((run / "config.json").read_text())["model"]
    assert (saved["n_kv_head"], saved["norm_eps"]) == (1, 1e-5)
    gpt = load_run(run).gpt
    assert gpt.transformer.h[0].attn.c_attn.weight.shape == (32 + 2 * 16, 32)
    code, out, err = cli(capsys, "sample", run, "--max-new-tokens", "20", "--device", "cpu", "--prompt", "The ")
    assert code == 0 and len(out) > 20, err
    code, out, _ = cli(capsys, "info", run)
    assert code == 0 and json.loads(out)["params"] == gpt.num_params()


@pytest.mark.slow
def test_llama3_rope_scaling_trains_from_the_cli(tmp_path, char_data, capsys):
    """--model.rope_scaling llama3 (with a pretraining context of 8, so the scaling changes every frequency):
    the run trains, saves the options, and the loaded model's RoPE table is the scaled one."""
    from scratchgpt.checkpoint import load_run
    from scratchgpt.model import rope_cos_sin

    run = tmp_path / "r"
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", run, "--model.rope_scaling", "llama3",
                       *tiny_flags(**{"model.pos": "rope", "model.rope_factor": 16, "model.rope_original_context": 8,
                                      "train.max_iters": 30, "train.eval_interval": 30, "train.log_interval": 1}))
    assert code == 0, err
    rows = metrics(run)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3
    saved = json.loads((run / "config.json").read_text())["model"]
    assert (saved["rope_scaling"], saved["rope_factor"], saved["rope_original_context"]) == ("llama3", 16.0, 8)
    gpt = load_run(run).gpt
    assert gpt.cfg.rope_scaling == "llama3"
    assert torch.equal(gpt.rope_cos, rope_cos_sin(torch.arange(32), 16, 10000.0, gpt.cfg)[0])
    assert not torch.equal(gpt.rope_cos, rope_cos_sin(torch.arange(32), 16, 10000.0)[0])


@pytest.mark.parametrize("optim", [dict(optimizer="muon", schedule="wsd"), dict(schedule="constant"),
                                   dict(schedule="linear", grad_clip=0.0)])
def test_optimizers_and_schedules_train(tmp_path, char_data, optim):
    train(data=char_data, out=tmp_path / "r", model=ModelConfig(**TINY),
          train=quiet_train(max_iters=30, eval_interval=30), optim=OptimConfig(lr=3e-3, warmup_iters=2, **optim))
    rows = metrics(tmp_path / "r")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3


def test_gradient_accumulation_matches_full_batch(tmp_path, char_data):
    model = ModelConfig(**TINY)
    train(data=char_data, out=tmp_path / "full", model=model, train=quiet_train(max_iters=5, eval_interval=5), optim=SHORT)
    train(data=char_data, out=tmp_path / "acc", model=ModelConfig(**TINY),
          train=quiet_train(max_iters=5, eval_interval=5, micro_batch_size=2), optim=SHORT)
    full, acc = metrics(tmp_path / "full"), metrics(tmp_path / "acc")
    for a, b in zip(full, acc):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    wa, wb = load_file(tmp_path / "full/latest/model.safetensors"), load_file(tmp_path / "acc/latest/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_schedules_shape():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=10, schedule="cosine")
    assert lr_at(0, o, 100) == pytest.approx(1 / 11)
    assert lr_at(10, o, 100) == pytest.approx(1.0)
    assert lr_at(100, o, 100) == pytest.approx(0.1)
    wsd = OptimConfig(lr=1.0, min_lr=0.0, warmup_iters=0, schedule="wsd", wsd_decay_frac=0.2)
    assert lr_at(79, wsd, 100) == 1.0 and lr_at(90, wsd, 100) == pytest.approx(0.5)


@pytest.mark.slow
def test_resume_is_bit_exact_in_a_new_process(tmp_path, char_data):
    flags = tiny_flags(**{"train.log_interval": 1, "train.eval_interval": 10, "optim.decay_iters": 40,
                          "model.dropout": 0.1})
    run_cli("train", "--data", char_data, "--out", tmp_path / "one", *flags, "--train.max_iters=40", check=True)
    run_cli("train", "--data", char_data, "--out", tmp_path / "two", *flags, "--train.max_iters=20", check=True)
    resumed = run_cli("train", "--out", tmp_path / "two", "--resume", "--train.max_iters=40", check=True)
    assert "resumed from" in resumed.stderr
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(1, 41))
    assert [r["train_loss"] for r in one] == [r["train_loss"] for r in two]
    wa, wb = load_file(tmp_path / "one/latest/model.safetensors"), load_file(tmp_path / "two/latest/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_stops_before_the_optimizer_step(tmp_path, char_data, monkeypatch):
    calls = poison_loss(monkeypatch, {7})
    run = tmp_path / "r"
    with pytest.raises(UserError, match="non-finite loss or gradient at step 6"):
        train(data=char_data, out=run, model=ModelConfig(**TINY), train=quiet_train(max_iters=20, eval_interval=5), optim=SHORT)
    # the step-5 checkpoint exists; nothing of the poisoned state was written
    assert json.loads((run / "latest/state.json").read_text())["step"] == 5
    assert not (run / "checkpoints/step-0000006").exists()
    weights = load_file(run / "latest/model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())

    calls["n"] = 0
    result = train(data=char_data, out=tmp_path / "skip", model=ModelConfig(**TINY),
                   train=quiet_train(max_iters=10, eval_interval=10, skip_nonfinite=True), optim=SHORT)
    assert result["step"] == 10
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "skip/latest/model.safetensors").values())


def _two_checkpoint_run(tmp_path, char_data) -> Path:
    run = tmp_path / "run"
    train(data=char_data, out=run, model=ModelConfig(**TINY), train=quiet_train(max_iters=10, eval_interval=5), optim=SHORT)
    return run


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_corrupt_checkpoint_is_named_and_resume_falls_back(tmp_path, char_data, damage, capsys):
    run = _two_checkpoint_run(tmp_path, char_data)
    target = run / "latest/model.safetensors"  # a hard link: checkpoints/step-0000010 is damaged with it
    blob = bytearray(target.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) - 100] ^= 0x01
    target.write_bytes(bytes(blob))

    code, _, err = cli(capsys, "eval", run, "--which", "latest")
    assert code != 0 and err.startswith("error:") and "model.safetensors" in err

    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--train.max_iters=12")
    assert code == 0, err
    assert "skipping corrupt checkpoint" in err and "model.safetensors" in err
    assert "resumed from" in err and "step-0000005" in err
    assert json.loads((run / "latest/state.json").read_text())["step"] == 12


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch as st
    real = st.save_file
    count = {"n": 0}
    def save_then_die(tensors, path, metadata=None):
        count["n"] += 1
        if count["n"] == 3:  # the second checkpoint's model file: write half of it, then SIGKILL ourselves
            real(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, path, metadata=metadata)
    st.save_file = save_then_die  # (faults.save_tensors, the checkpoint writer's, looks it up per call)
    from scratchgpt.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path, char_data):
    run = tmp_path / "run"
    script = tmp_path / "die.py"
    script.write_text(KILL_DURING_SAVE)
    proc = subprocess.run([sys.executable, str(script), "train", "--data", str(char_data), "--out", str(run),
                           *tiny_flags(**{"train.max_iters": 10, "train.eval_interval": 5})], capture_output=True, text=True)
    assert proc.returncode == -9
    from scratchgpt.checkpoint import find_resumable

    ckpt, state = find_resumable(run)
    assert state["step"] == 5
    load_lm(run, "latest")  # loads and verifies
    assert not list((run / "checkpoints").glob("step-0000010"))
    res = run_cli("train", "--out", run, "--resume")  # a new process, as after a real crash
    assert res.returncode == 0, res.stderr
    assert json.loads((run / "latest/state.json").read_text())["step"] == 10


@pytest.mark.slow
def test_run_outputs_metrics_plot_and_eval(tmp_path, char_data, capsys):
    run = tmp_path / "run"
    flags = tiny_flags(**{"train.max_iters": 20, "train.eval_interval": 10, "train.plot": "true",
                          "train.final_eval": "true", "train.sample_tokens": 20})
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", run, *flags)
    assert code == 0, err
    assert "step 10: train" in err
    rows = metrics(run)
    for key in ("step", "tokens", "elapsed_s", "lr", "train_loss", "grad_norm", "tok_per_s"):
        assert key in rows[0]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and all("val_ppl" in r for r in evals)
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("model.safetensors", "optimizer.safetensors", "state.json", "config.json", "tokenizer.json"):
        assert (run / "latest" / name).exists() and (run / "best" / name).exists()
    state = json.loads((run / "latest/state.json").read_text())
    for key in ("step", "tokens", "rng", "data", "scheduler", "best_val_loss", "format_version"):
        assert key in state
    result = json.loads((run / "result.json").read_text())
    code, stdout, _ = cli(capsys, "eval", run, "--which", "latest")
    out = json.loads(stdout)
    assert set(out) >= {"val_loss", "perplexity", "bits_per_byte"}
    assert out["val_loss"] == pytest.approx(result["final_val_loss"], rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(out["val_loss"]))
    info = json.loads(cli(capsys, "info", run)[1])
    assert info["params"] > 0 and info["latest"]["step"] == 20


@pytest.mark.slow
def test_early_stopping_and_target(tmp_path, char_data):
    res = train(data=char_data, out=tmp_path / "t", model=ModelConfig(**TINY),
                train=quiet_train(max_iters=200, eval_interval=5, target_val_loss=3.0), optim=OptimConfig(lr=1e-2))
    assert res["stop_reason"].startswith("reached target") and res["step"] < 200
    res = train(data=char_data, out=tmp_path / "p", model=ModelConfig(**TINY),
                train=quiet_train(max_iters=200, eval_interval=2, patience=2), optim=OptimConfig(lr=0.0, min_lr=0.0))
    assert res["stop_reason"].startswith("early stopping") and res["step"] <= 8


# ---------------------------------------------------------------- bad input
def _one_line_error(result: tuple[int, str, str]) -> str:
    code, _, err = result
    assert code != 0
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
def test_bad_inputs(tmp_path, char_data, capsys):
    assert "does not exist" in _one_line_error(cli(capsys, "train", "--data", tmp_path / "nope", "--out", tmp_path / "r"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text("{not json")
    assert "meta.json" in _one_line_error(cli(capsys, "train", "--data", bad, "--out", tmp_path / "r"))
    msg = _one_line_error(cli(capsys, "train", "--data", char_data, "--out", tmp_path / "r", "--model.block_size=100000"))
    assert "--model.block_size 100000" in msg and "val split" in msg
    msg = _one_line_error(cli(capsys, "train", "--data", char_data, "--out", tmp_path / "r", "--model.n_lyer=2"))
    assert "n_lyer" in msg and "model.n_layer" in msg
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_iter: 5\n")
    msg = _one_line_error(cli(capsys, "train", "--data", char_data, "--out", tmp_path / "r", "--config", cfg))
    assert "max_iter" in msg and "max_iters" in msg
    msg = _one_line_error(cli(capsys, "train", "--data", char_data, "--out", tmp_path / "r", "--model.n_head=3"))
    assert "divisible" in msg
    assert not (tmp_path / "r" / "latest").exists()


@pytest.mark.slow
def test_unknown_key_errors_in_a_real_process(tmp_path, char_data):
    proc = run_cli("train", "--data", char_data, "--out", tmp_path / "r", "--optim.lrr=1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "optim.lr" in proc.stderr


def test_existing_run_is_never_clobbered(tmp_path, char_data, capsys):
    run = _two_checkpoint_run(tmp_path, char_data)
    before = (run / "latest/model.safetensors").read_bytes()
    msg = _one_line_error(cli(capsys, "train", "--data", char_data, "--out", run, *tiny_flags()))
    assert "--resume" in msg and "--force" in msg
    assert (run / "latest/model.safetensors").read_bytes() == before


def test_vocab_mismatch_on_resume(tmp_path, char_data, capsys):
    from scratchgpt.data import prepare

    run = _two_checkpoint_run(tmp_path, char_data)
    other = tmp_path / "other.txt"
    other.write_text("abc abc abc\n" * 500)
    prepare(inputs=[str(other)], out=tmp_path / "d2", tokenizer="char", progress=False)
    before = (run / "latest/model.safetensors").read_bytes()
    msg = _one_line_error(cli(capsys, "train", "--data", tmp_path / "d2", "--out", run, "--resume"))
    assert "vocabulary mismatch" in msg
    assert (run / "latest/model.safetensors").read_bytes() == before


def test_resume_takes_exactly_the_keys_given_even_at_their_default(tmp_path, char_data, capsys):
    """--resume keeps the saved config except for keys on the command line or in --config, whatever their value."""
    run = tmp_path / "run"
    flags = tiny_flags(**{"train.max_iters": 4, "train.eval_interval": 4, "optim.lr": 3e-3, "train.log_interval": 2})
    assert cli(capsys, "train", "--data", char_data, "--out", run, *flags)[0] == 0
    (tmp_path / "more.yaml").write_text("train:\n  log_interval: 10\n")  # 10 is TrainConfig's default
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--train.max_iters", "6", "--optim.lr", "0.001",
                       "--optim.min_lr", "0.0001",  # the recipe's schedule ends at LR 0: train on at 1e-4
                       "--config", tmp_path / "more.yaml")  # 0.001 and 0.0001 are OptimConfig's defaults
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert saved["optim"]["lr"] == 0.001 and saved["optim"]["min_lr"] == 0.0001 and saved["train"]["log_interval"] == 10 and saved["train"]["max_iters"] == 6
    assert saved["optim"]["warmup_iters"] == 2 and saved["train"]["batch_size"] == 8  # not given: kept from the run
    assert "keeps its original length of 4 steps" in err and saved["optim"]["decay_iters"] == 4  # no LR jump


def test_startup_summary_says_what_the_run_will_do(tmp_path, char_data, capsys):
    meta = json.loads((char_data / "meta.json").read_text())
    train(data=char_data, out=tmp_path / "r", model=ModelConfig(**TINY),
          train=quiet_train(max_iters=4, eval_interval=4, batch_size=8, micro_batch_size=4, threads=1, peak_flops=2e12),
          optim=OptimConfig(optimizer="muon", warmup_iters=2))
    err = capsys.readouterr().err
    summary = err[:err.index("step 4:")]  # printed before the loop
    net = GPT(ModelConfig(**TINY, vocab_size=meta["vocab_size"]))
    assert f"params: {net.num_params():,} ({net.num_params(non_embedding=True):,} non-embedding)" in summary
    assert "device: cpu, float32, 1 threads" in summary
    assert f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens" in summary
    assert "step: 256 tokens (batch 8 x context 32; 2 micro-step(s) of 4 per rank)" in summary
    assert "plan: 4 steps, 1,024 tokens" in summary
    assert "optimizer: muon (Newton-Schulz in " in summary and "per iteration" in summary
    assert "MFU peak: 2 TFLOP/s (train.peak_flops)" in summary
    rows = metrics(tmp_path / "r")
    assert all(0 <= r["mfu"] <= 1 for r in rows)
    # resumed: the plan says where it continues; a measured peak names its source
    train(out=tmp_path / "r", resume=True, train=quiet_train(max_iters=6), overrides={"train.max_iters": 6,
                                                                                     "train.peak_flops": 0.0})
    err = capsys.readouterr().err
    assert "plan: 6 steps, 1,536 tokens" in err and "resuming at step 4, 2 to go" in err
    assert "MFU peak: " in err and "(measured: float32 matmul on " in err


def test_a_resumed_run_keeps_its_measured_thread_count(tmp_path, char_data, monkeypatch, capsys):
    import scratchgpt.runtime as runtime

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        monkeypatch.setattr(runtime, "default_threads", lambda: 1)  # as measured by the first process
        train(data=char_data, out=tmp_path / "r", model=ModelConfig(**TINY),
              train=quiet_train(max_iters=2, eval_interval=2, threads=0), optim=SHORT)
        assert json.loads((tmp_path / "r/latest/state.json").read_text())["threads"] == 1
        monkeypatch.setattr(runtime, "default_threads", lambda: 2)  # a new process measures otherwise
        capsys.readouterr()
        train(out=tmp_path / "r", resume=True, overrides={"train.max_iters": 3})
        assert "device: cpu, float32, 1 threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_a_short_run_shrinks_a_warmup_it_did_not_ask_for(tmp_path, char_data, capsys):
    """`--train.max_iters 3` with the recipe's warmup of 5 is a quick run, not an error; a given warmup must fit."""
    flags = [f for f in tiny_flags(**{"train.eval_interval": 3}) if not f.startswith("--optim.warmup_iters")]
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / "r", "--train.max_iters", "3", *flags)
    assert code == 0, err
    assert "warmup shortened from 5 to 0 steps" in err
    assert json.loads((tmp_path / "r/config.json").read_text())["optim"]["warmup_iters"] == 0
