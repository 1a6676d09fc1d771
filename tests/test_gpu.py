"""CUDA: what the CPU suite checks, on a GPU. Every test is marked `gpu` and skipped where CUDA is absent
(conftest.py); run them alone with `python -m pytest -m gpu`. Each takes seconds on one GPU.

- training: bf16 autocast (the CUDA default), torch.compile, the GPU-side finite check;
- decoding: KV-cache == no cache (and == the CPU's tokens), --quantize int8 and int4 on CUDA kernels;
- torchrun: DDP and FSDP2 under nccl with as many ranks as GPUs, against one process;
- checkpoints: saved on the GPU, resumed on the CPU, and back.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from conftest import poison_loss, TINY
from scratchgpt import UserError
from scratchgpt import generate as G
from scratchgpt.model import GPT, ModelConfig
from scratchgpt.optim import OptimConfig
from scratchgpt.train import TrainConfig, train

pytestmark = pytest.mark.gpu


def gpu_train(**kw) -> TrainConfig:
    base = dict(batch_size=8, eval_iters=2, sample_tokens=0, progress=False, tensorboard=False, plot=False,
                final_eval=False, log_interval=1, device="cuda")
    return TrainConfig(**{**base, **kw})


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def rel_error(a: dict, b: dict) -> float:
    return max(((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12)).item() for k in b)


@pytest.fixture(autouse=True)
def keep_tf32_setting():
    """Training turns TF32 on for the whole process: give the tests after these the setting they found."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


@pytest.fixture
def exact_fp32():
    """fp32 matmuls without TF32 (an earlier training may have turned it on): decode comparisons want exact fp32."""
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"


# ---------------------------------------------------------------- training
def test_bf16_autocast_is_the_default_and_learns(tmp_path, char_data, capsys):
    run = tmp_path / "bf16"
    train(data=char_data, out=run, model=ModelConfig(**TINY), train=gpu_train(max_iters=40, eval_interval=40),
          optim=OptimConfig(lr=3e-3, warmup_iters=2))
    err = capsys.readouterr().err
    assert "bfloat16 autocast" in err and "device: cuda:0 (" in err
    assert "MFU peak: " in err and ("(table: " in err or "(measured: " in err)
    r = rows(run)
    assert r[-1]["train_loss"] < r[0]["train_loss"] - 0.3
    assert all(0 < x["mfu"] <= 1 for x in r)
    weights = load_file(run / "latest/model.safetensors")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())  # fp32 master weights


def test_compile_matches_eager(tmp_path, char_data):
    for name, compile_ in (("eager", False), ("compiled", True)):
        train(data=char_data, out=tmp_path / name, model=ModelConfig(**TINY),
              train=gpu_train(max_iters=20, eval_interval=20, compile=compile_), optim=OptimConfig(lr=3e-3, warmup_iters=2))
    eager, compiled = rows(tmp_path / "eager"), rows(tmp_path / "compiled")
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-2)  # same init, same batch
    assert compiled[-1]["train_loss"] < compiled[0]["train_loss"] - 0.3
    assert compiled[-1]["train_loss"] == pytest.approx(eager[-1]["train_loss"], rel=5e-2)


def test_nonfinite_step_is_caught_on_the_gpu_without_a_sync_per_step(tmp_path, char_data, monkeypatch):
    calls = poison_loss(monkeypatch, {7})
    run = tmp_path / "nan"
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step 6 \(1 step\(s\) through 6 skipped\)"):
        train(data=char_data, out=run, model=ModelConfig(**TINY), train=gpu_train(max_iters=20, eval_interval=5),
              optim=OptimConfig(warmup_iters=2))
    assert json.loads((run / "latest/state.json").read_text())["step"] == 5
    assert not (run / "checkpoints/step-0000006").exists()
    calls["n"] = 0
    result = train(data=char_data, out=tmp_path / "skip", model=ModelConfig(**TINY),
                   train=gpu_train(max_iters=10, eval_interval=10, skip_nonfinite=True),
                   optim=OptimConfig(warmup_iters=2))
    assert result["step"] == 10
    weights = load_file(tmp_path / "skip/latest/model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the fused AdamW kernel skipped step 6


# ---------------------------------------------------------------- checkpoints move between devices
def test_saved_on_gpu_resumed_on_cpu_and_back(tmp_path, char_data):
    # no biases: the key bias's true gradient is exactly zero, so its updates are rounding noise Adam scales up
    model = ModelConfig(**TINY, bias=False)
    cfg = dict(max_iters=20, eval_interval=5, dtype="float32")
    optim = OptimConfig(lr=3e-3, warmup_iters=2, decay_iters=20)
    train(data=char_data, out=tmp_path / "ref", model=model, train=gpu_train(**cfg), optim=optim)
    run = tmp_path / "moves"
    train(data=char_data, out=run, model=model, train=gpu_train(**{**cfg, "max_iters": 10}), optim=optim)
    train(out=run, resume=True, overrides={"train.max_iters": 15, "train.device": "cpu"})
    assert json.loads((run / "latest/state.json").read_text())["step"] == 15
    train(out=run, resume=True, overrides={"train.max_iters": 20, "train.device": "cuda"})
    ref, moved = {r["step"]: r["train_loss"] for r in rows(tmp_path / "ref")}, {r["step"]: r["train_loss"] for r in rows(run)}
    assert sorted(moved) == list(range(1, 21))
    for step in range(11, 21):  # TF32 on the GPU vs fp32 on the CPU: close, not equal
        assert moved[step] == pytest.approx(ref[step], rel=1e-2)
    assert rel_error(load_file(run / "latest/model.safetensors"), load_file(tmp_path / "ref/latest/model.safetensors")) < 1e-2


# ---------------------------------------------------------------- decoding
def tiny_lm(vocab: int, **kw) -> GPT:
    torch.manual_seed(0)  # init_std 0.3: spread logits, so greedy choices are not near-ties
    return GPT(ModelConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32, init_std=0.3, **kw)).eval()


PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8]]


@pytest.mark.parametrize("kw", [{}, dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)])
def test_kv_cache_decode_equals_no_cache_and_the_cpu(exact_fp32, kw):
    cpu = tiny_lm(40, **kw)
    gpu = tiny_lm(40, **kw).cuda()
    cached = G.generate_tokens(gpu, PROMPTS, max_new_tokens=30, temperature=0)  # past block_size 16
    assert cached == G.generate_tokens(gpu, PROMPTS, max_new_tokens=30, temperature=0, use_cache=False)
    assert cached == G.generate_tokens(cpu, PROMPTS, max_new_tokens=30, temperature=0)


@pytest.mark.parametrize("mode, tol", [("int8", 0.06), ("int4", 0.5)])
def test_quantized_decode_on_cuda(exact_fp32, mode, tol):
    from scratchgpt.quantize import Int4Linear, Int8Linear, quantize_model

    model = tiny_lm(48).cuda()  # vocab 48: the head fits the int4 kernel too
    x = torch.tensor([PROMPTS[0]], device="cuda")
    with torch.no_grad():
        ref = model(x)[0]
    major, _ = torch.cuda.get_device_capability()
    if mode == "int4" and major < 8:
        with pytest.raises(UserError) as e:  # refused in one line, naming the way out
            quantize_model(model, mode)
        assert "\n" not in str(e.value) and "int8" in str(e.value)
        return
    quantize_model(model, mode)
    assert isinstance(model.transformer.h[0].mlp.c_fc, Int8Linear if mode == "int8" else Int4Linear)
    with torch.no_grad():
        got = model(x)[0]
    assert (got - ref).abs().max() / ref.abs().max() < tol
    cached = G.generate_tokens(model, PROMPTS, max_new_tokens=30, temperature=0)
    assert cached == G.generate_tokens(model, PROMPTS, max_new_tokens=30, temperature=0, use_cache=False)


def test_int4_cuda_kernel_reads_the_same_groups_as_the_cpu_kernel():
    from scratchgpt.quantize import Int4Linear

    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("tinygemm needs compute capability 8.0+")
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96)
    x = torch.randn(5, 128)
    on_cpu = Int4Linear(lin)(x)
    on_gpu = Int4Linear(lin.cuda())(x.cuda()).cpu()
    assert (on_gpu - on_cpu).abs().max() < 0.02 * on_cpu.abs().max()  # bf16 products, different summation orders
    eye = Int4Linear(lin)(torch.eye(128, device="cuda")) - lin.bias  # row i = W[:, i] as the kernel sees it
    assert (eye.t() - lin.weight).abs().max() < 0.6 * (lin.weight.abs().max() / 7.5)  # within a 4-bit step


def test_cli_sample_quantized_on_cuda(tmp_path, capsys):
    from scratchgpt.checkpoint import save_checkpoint
    from scratchgpt.cli import main
    from scratchgpt.data import prepare

    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. pack my box with jugs.\n" * 20)
    meta = prepare([str(tmp_path / "t.txt")], tmp_path / "data", tokenizer="char", progress=False)
    model = tiny_lm(meta["vocab_size"])
    save_checkpoint(tmp_path / "run", model=model, optimizer=None, state={"step": 0},
                    config={"model": asdict(model.cfg), "data": str(tmp_path / "data")},
                    tokenizer_file=tmp_path / "data/tokenizer.json", is_best=True)
    for mode in ("none", "int8", "int4"):
        code = main(["sample", str(tmp_path / "run"), "--prompt", "the ", "--max-new-tokens", "10", "--seed", "1",
                     "--quantize", mode, "--device", "cuda"])
        out, err = capsys.readouterr()
        if mode == "int4" and torch.cuda.get_device_capability()[0] < 8:
            assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1
        else:
            assert code == 0 and out.startswith("the "), err


# ---------------------------------------------------------------- torchrun + nccl
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_nccl_with_a_rank_per_gpu_matches_one_process(tmp_path, char_data, parallel):
    """DDP / FSDP2 wrap even one rank when asked (--train.parallel), so a one-GPU machine runs nccl too."""
    from test_distributed import flags, loss_error, single, torchrun, weight_error, weights

    world = torch.cuda.device_count()
    shape = {"train.device": "auto", "train.dtype": "float32", "train.batch_size": 4 * world, "train.micro_batch_size": 2}
    single(f"--data={char_data}", f"--out={tmp_path / 'single'}", *flags(**shape))
    proc = torchrun(f"--data={char_data}", f"--out={tmp_path / parallel}", *flags(**shape, **{"train.parallel": parallel}),
                    nproc=world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{world} rank(s) ({parallel}, cuda)" in proc.stderr  # the start-up summary
    assert loss_error(tmp_path / parallel, tmp_path / "single", range(1, 11)) < 1e-3
    assert weight_error(weights(tmp_path / parallel), weights(tmp_path / "single")) < 1e-3
