"""GGUF out and in: every family llama.cpp runs exports, and transformers' own GGUF loader (a reader nobody
here wrote) computes the same logits (1e-4 at f32) and greedy tokens; import dequantizes back exactly;
what llama.cpp cannot express, and bad files, are refused in one line with nothing written. (llama.cpp
itself: test_gguf_llamacpp.py; the released SmolLM2 GGUF: test_gguf_real.py.)"""

from __future__ import annotations

import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, english_text, load_lm, randomize, train_bpe_tokenizer
from scratchgpt import UserError
from scratchgpt.checkpoint import save_checkpoint
from scratchgpt.generate import generate_tokens
from scratchgpt.hf import export_gguf, import_gguf
from scratchgpt.model import GPT, ModelConfig
from scratchgpt.tokenizer import train_char_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) is not installed")

SMALL = dict(block_size=64, n_layer=2, n_head=2, n_embd=64)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
# (id, ModelConfig options, GGUF architecture, transformers reads it)
FAMILIES = [
    ("llama-gqa", dict(LLAMA, n_head=4, n_kv_head=2, norm_eps=1e-5), "llama", True),
    ("llama-untied-head-size", dict(LLAMA, n_head=4, n_kv_head=1, head_size=24, tie_embeddings=False,
                                    rope_base=500.0), "llama", True),
    ("qwen2", dict(LLAMA, qkv_bias=True, tie_embeddings=False), "qwen2", True),
    # (transformers' GGUF loader takes Qwen3's head_dim from its config class, 128, not attention.key_length)
    ("qwen3-gqa", dict(LLAMA, qk_norm=True, n_head=2, n_kv_head=1, head_size=128), "qwen3", True),
    # (transformers' GGUF loader sizes GPT-2's position table by n_positions, its 1024 default, and its MLP 4x)
    ("gpt2", dict(mlp="gelu_tanh", block_size=1024), "gpt2", True),
    ("gpt2-nobias-untied", dict(mlp="gelu_tanh", bias=False, tie_embeddings=False, block_size=1024), "gpt2", True),
    ("gptneox", dict(pos="rope", mlp="gelu_tanh", rope_base=500.0), "gptneox", False),  # (transformers: no gptneox)
]
FAMILY_IDS = [f[0] for f in FAMILIES]


@pytest.fixture(scope="module")
def bpe_tok():
    return train_bpe_tokenizer([english_text(30_000)], 300)


def make_run(tmp: Path, tok, options: dict, seed: int = 0, extra: dict | None = None) -> tuple[Path, GPT]:
    """A run dir with one checkpoint of a randomized model and `tok`."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, **{**SMALL, **options})
    model = GPT(cfg)
    randomize(model, seed)
    model.eval()
    tok.save(tmp / "tok")
    config = {"format_version": 1, "data": None, "model": asdict(cfg), "train": {}, "optim": {}, "tokenizer": tok.kind,
              **(extra or {})}
    save_checkpoint(tmp / "run", model=model, optimizer=None, state={"step": 1, "tokens": 1, "best_val_loss": None},
                    config=config, tokenizer_file=tmp / "tok" / "tokenizer.json", is_best=True)
    return tmp / "run", model


def one_line(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def hf_gguf(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name,options,arch,hf_reads", FAMILIES, ids=FAMILY_IDS)
def test_f32_export_is_what_transformers_reads_and_imports_back_exactly(tmp_path, bpe_tok, name, options, arch,
                                                                        hf_reads):
    run, ours = make_run(tmp_path, bpe_tok, options, seed=len(name))
    out = export_gguf(run, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # scratchgpt's BPE splits with GPT-2's regex
    back = import_gguf(out, tmp_path / "back")
    again, tok, _ = load_lm(back)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert tok.encode(english_text(3000)) == bpe_tok.encode(english_text(3000))
    if not hf_reads:
        return
    theirs = hf_gguf(out)
    x = torch.randint(0, bpe_tok.vocab_size, (2, SMALL["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours(x)
        assert ref.abs().max() > 1.0  # logits big enough for a 1e-4 bound to mean something
        assert (theirs(x).logits - ref).abs().max().item() <= 1e-4
    prompt = x[0, :8].tolist()
    hf_ids = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40, eos_token_id=None,
                             pad_token_id=0)[0, 8:].tolist()
    assert generate_tokens(ours, [prompt], temperature=0, max_new_tokens=40)[0] == hf_ids


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_f16_and_q8_0_exports_import_as_their_dequantized_weights(tmp_path, bpe_tok, outtype):
    from gguf import GGMLQuantizationType, quants

    run, ours = make_run(tmp_path, bpe_tok, dict(LLAMA, n_head=4, n_kv_head=2))
    out = export_gguf(run, tmp_path / "m.gguf", outtype=outtype)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert kinds["blk.0.ffn_down.weight"] == outtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
    back, _, _ = load_lm(import_gguf(out, tmp_path / "back"))
    w = ours.state_dict()["transformer.h.1.mlp.c_proj.weight"]
    if outtype == "f16":
        want = w.half().float()
    else:
        want = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), GGMLQuantizationType.Q8_0),
                                                  GGMLQuantizationType.Q8_0))
    assert torch.equal(back.state_dict()["transformer.h.1.mlp.c_proj.weight"], want)
    x = torch.randint(0, bpe_tok.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back(x) - ours(x)).abs().max().item() < (0.05 if outtype == "f16" else 0.2)


def test_export_and_import_through_the_cli(tmp_path, bpe_tok, capsys):
    run, ours = make_run(tmp_path, bpe_tok, dict(LLAMA), extra={"chat_template": {"user": "Q: {prompt}\nA:",
                                                                                   "stop": ["\n"]}})
    code, _, err = cli(capsys, "export", run, "--format", "gguf", "--outtype", "f32", "--out", tmp_path / "m.gguf")
    assert code == 0, err
    assert "llama-cli -m" in err
    meta = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert "Q: " in meta["tokenizer.chat_template"]  # the SFT run's template, as jinja
    assert meta["tokenizer.ggml.eos_token_id"] == bpe_tok.eot_id and meta["tokenizer.ggml.add_bos_token"] is False
    code, _, err = cli(capsys, "import-hf", tmp_path / "m.gguf", "--out", tmp_path / "back")
    assert code == 0, err
    back, tok, _ = load_lm(tmp_path / "back")
    assert torch.equal(back.state_dict()["transformer.wte.weight"], ours.state_dict()["transformer.wte.weight"])
    assert tok.eot_id == bpe_tok.eot_id and "Q: " in tok.chat_template
    code, _, err = cli(capsys, "export", run, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert code != 0 and err.strip().startswith("error:") and "--force" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("options,named", [
    (dict(), "model.mlp=gelu has no GGUF equivalent: llama.cpp's gpt2 computes the tanh GELU"),
    (dict(norm_placement="post", mlp="gelu_tanh"), "post-norm blocks with learned positions"),
    (dict(LLAMA, bias=True), "model.bias=true has no GGUF equivalent"),
    (dict(LLAMA, rope_scaling="llama3"), "model.rope_scaling=llama3 is not written as GGUF yet"),
    (dict(pos="rope", norm="rmsnorm", mlp="relu2", bias=False), "llama.cpp's arcee computes ReLU² only"),
    (dict(pos="sinusoidal"), "model.pos=sinusoidal has no transformers decoder"),
])
def test_runs_llama_cpp_cannot_express_are_refused_in_one_line(tmp_path, bpe_tok, options, named):
    run, _ = make_run(tmp_path, bpe_tok, options)
    assert named in one_line(lambda: export_gguf(run, tmp_path / "m.gguf"))
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))


def test_a_char_tokenizer_is_refused(tmp_path):
    run, _ = make_run(tmp_path, train_char_tokenizer([english_text(5000)]), dict(LLAMA))
    assert "a char tokenizer" in one_line(lambda: export_gguf(run, tmp_path / "m.gguf"))
    assert not (tmp_path / "m.gguf").exists()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, bpe_tok) -> Path:
    tmp = tmp_path_factory.mktemp("gguf")
    run, _ = make_run(tmp, bpe_tok, dict(LLAMA, n_layer=1))
    return export_gguf(run, tmp / "m.gguf")


def _tensor_type_offset(data: bytes, name: str) -> int:
    """Byte offset of tensor `name`'s type field in a GGUF header (name, n_dims, dims, then the u32 type)."""
    i = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, i)[0]
    return i + 4 + 8 * n_dims


@pytest.mark.parametrize("damage,named", [
    ("truncate", "truncated"),
    ("unknown type", "not a readable GGUF file"),
    ("Q8_1", "has type Q8_1, which scratchgpt does not read"),
    ("text", "not a GGUF file"),
    ("arch", "architecture 'mamba' has no scratchgpt equivalent"),
    ("spm", "tokenizer.ggml.model 'llama' is not read"),
])
def test_bad_files_are_refused_in_one_line_naming_the_file_and_nothing_is_written(tmp_path, small_gguf, damage,
                                                                                  named):
    data = small_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage in ("unknown type", "Q8_1"):
        at = _tensor_type_offset(data, "blk.0.ffn_down.weight")
        code = 99 if damage == "unknown type" else int(gguf.GGMLQuantizationType.Q8_1)
        data = data[:at] + struct.pack("<I", code) + data[at + 4:]
    elif damage == "text":
        data = b"not a model\n"
    elif damage in ("arch", "spm"):
        key, old, new = {"arch": ("general.architecture", b"llama", b"mamba"),
                         "spm": ("tokenizer.ggml.model", b"gpt2", b"llama")}[damage]
        at = data.index(key.encode()) + len(key) + 4 + 8  # the key, its value type, the string's length
        assert data[at:at + len(old)] == old
        data = data[:at] + new[: len(old)] + data[at + len(old):] if len(new) == len(old) else \
            data[:at - 8] + struct.pack("<Q", len(new)) + new + data[at + len(old):]
    bad.write_bytes(data)
    message = one_line(lambda: import_gguf(bad, tmp_path / "run"))
    assert str(bad) in message and named in message
    assert not (tmp_path / "run").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]
