"""`--quantize int8`: weight-only int8 Linear layers for generation and eval."""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import pytest
import torch

from scratchgpt import UserError
from scratchgpt import generate as G
from scratchgpt.checkpoint import save_checkpoint
from scratchgpt.cli import main
from scratchgpt.model import GPT, ModelConfig
from scratchgpt.quantize import Bf16Linear, Int4Linear, Int8Linear, quantize_model
from scratchgpt.tokenizer import train_char_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs.\n" * 20


def tiny(vocab: int, **kw) -> GPT:
    torch.manual_seed(0)  # init_std 0.3: spread logits, so greedy choices are not near-ties
    return GPT(ModelConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32, init_std=0.3, **kw)).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_the_linear_within_rounding(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=bias)
    q = Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127  # each row uses the full range
    x = torch.randn(3, 5, 64)
    ref, got = lin(x), q(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got - ref).abs().max() / ref.abs().max() < 0.02  # int8 weights, bf16 inputs: ~0.5% each


def test_int4_linear_is_its_dequantized_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    q = Int4Linear(lin)
    # rebuild W from the stored groups by the documented rule and compare with the kernel's product
    x = torch.randn(5, 64)
    eye = Int4Linear(lin)(torch.eye(64)) - lin.bias  # row i = W[:, i] as the kernel sees it
    assert (eye.t() - lin.weight).abs().max() < 0.6 * (lin.weight.abs().max() / 7.5)  # within a 4-bit step of W
    ref = x.to(torch.bfloat16).float() @ eye + lin.bias
    assert torch.allclose(q(x), ref, atol=0.02)
    assert (q(x) - lin(x)).abs().max() / lin(x).abs().max() < 0.15
    assert not Int4Linear.fits(torch.nn.Linear(64, 65)) and Int4Linear.fits(torch.nn.Linear(64, 96))


@pytest.mark.parametrize("mode, tol", [("int8", 0.06), ("int4", 0.5)])  # int4: 1 group per 32-wide row here
@pytest.mark.parametrize("kw", [{}, dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
                                dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1)])  # GQA: c_attn 32 -> 64
def test_quantized_model_decodes_like_the_original(kw, mode, tol):
    tok = train_char_tokenizer([TEXT])
    model = tiny(tok.vocab_size, **kw)
    x = torch.tensor([tok.encode("the quick brown ")])
    with torch.no_grad():
        ref = model(x)[0]
    emb = model.transformer.wte.weight.clone()
    quantize_model(model, mode)
    # the head (vocab 30-something) does not fit the int4 kernel's multiple-of-16 rows: int8 there
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.transformer.h[0].mlp.c_fc, Int8Linear if mode == "int8" else Int4Linear)
    assert torch.equal(model.transformer.wte.weight, emb)  # the embedding (tied or not) stays fp32
    with torch.no_grad():
        got = model(x)[0]
    assert (got - ref).abs().max() / ref.abs().max() < tol  # random weights at std 0.3: the worst case; eval measures trained ones
    prompts = [tok.encode("the lazy"), tok.encode("pack my"), ]
    cached = G.generate_tokens(model, prompts, max_new_tokens=30, temperature=0)  # past block_size 16
    assert cached == G.generate_tokens(model, prompts, max_new_tokens=30, temperature=0, use_cache=False)
    dec = G._decoder(model, tok.vocab_size, prompts[:1], G.GenerationConfig(max_new_tokens=4, temperature=0), [0])
    for _ in range(4):
        dec.next()
    assert dec.fast is not None  # the fast decode step handles int8 layers (checked against GPT.forward)


@pytest.mark.parametrize("kw", [{}, dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1)])
def test_bf16_weights_decode_as_the_original(kw):
    """`--quantize bf16`: every Linear holds bf16 weights (half the bytes), inputs and sums stay fp32."""
    tok = train_char_tokenizer([TEXT])
    model = tiny(tok.vocab_size, **kw)
    prompts = [tok.encode("the lazy"), tok.encode("pack my")]
    x = torch.tensor([tok.encode("the quick brown ")])
    with torch.no_grad():
        ref = model(x)[0]
    want = G.generate_tokens(model, prompts, max_new_tokens=30, temperature=0)
    quantize_model(model, "bf16")
    assert isinstance(model.lm_head, Bf16Linear) and model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = model(x)[0]
    assert (got - ref).abs().max() / ref.abs().max() < 0.06  # 16 rows: torch's bf16 matmul, inputs rounded too (as int8)
    assert G.generate_tokens(model, prompts, max_new_tokens=30, temperature=0) == want
    assert G.generate_tokens(model, prompts, max_new_tokens=30, temperature=0, use_cache=False) == want
    dec = G._decoder(model, tok.vocab_size, prompts[:1], G.GenerationConfig(max_new_tokens=4, temperature=0), [0])
    dec.next()
    assert dec.fast is not None


def test_adapter_layers_are_refused():
    class Wrapped(torch.nn.Linear):
        pass

    model = tiny(20)
    model.transformer.h[0].attn.c_attn = Wrapped(32, 96)
    with pytest.raises(UserError, match="merge-lora"):
        quantize_model(model, "int8")
    with pytest.raises(UserError, match="--quantize"):
        quantize_model(tiny(20), "int3")
    assert quantize_model(model, "none") is model


@pytest.mark.slow
def test_cli_sample_chat_and_eval_quantized(tmp_path, capsys, monkeypatch):
    from scratchgpt.data import prepare

    (tmp_path / "t.txt").write_text(TEXT)
    data = tmp_path / "data"
    meta = prepare([str(tmp_path / "t.txt")], data, tokenizer="char", progress=False)
    model = tiny(meta["vocab_size"])
    run = tmp_path / "run"
    save_checkpoint(run, model=model, optimizer=None, state={"step": 0}, config={"model": asdict(model.cfg), "data": str(data)},
                    tokenizer_file=data / "tokenizer.json", is_best=True)
    assert main(["sample", str(run), "--prompt", "the ", "--max-new-tokens", "10", "--seed", "1", "--quantize", "int8",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("the ")
    assert main(["sample", str(run), "--prompt", "the ", "--max-new-tokens", "10", "--quantize", "int4",
                 "--device", "cpu"]) == 0  # the CPU kernels (test_gpu.py: CUDA's)
    assert capsys.readouterr().out.startswith("the ")
    assert main(["sample", str(run), "--prompt", "the ", "--max-new-tokens", "10", "--quantize", "bf16",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("the ")
    monkeypatch.setattr("sys.stdin", io.StringIO("the \n/exit\n"))  # piped chat, plain continuation
    assert main(["chat", str(run), "--max-new-tokens", "5", "--seed", "1", "--quantize", "int8", "--device", "cpu"]) == 0
    reply = capsys.readouterr().out
    assert reply.endswith("\n") and reply.strip()  # one streamed reply (it may contain newlines itself)
    assert main(["eval", str(run)]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--quantize", "int8"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert int8["quantize"] == "int8" and full["quantize"] == "none"
    assert int8["val_loss"] == pytest.approx(full["val_loss"], rel=0.02)
    assert main(["eval", str(run), "--quantize", "int4"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] == pytest.approx(full["val_loss"], rel=0.1)
    # the int8 figures go beside the full-precision ones, not over them
    assert json.loads((run / "eval-lm.json").read_text())["val_loss"] == full["val_loss"]
    assert json.loads((run / "eval-lm-int8.json").read_text())["val_loss"] == int8["val_loss"]
    with pytest.raises(SystemExit) as e:  # argparse's usage error: one line, exit 2
        main(["sample", str(run), "--quantize", "int3"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error:")
