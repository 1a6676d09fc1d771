"""The Llama variants' edges: which class a model exports as (Mistral and Phi-3 on request or by origin),
sliding windows and the families refused with their reason, Gemma's (1+w) norms, and bad folders refused
in one line that names the file, with nothing written. (Parity with transformers and byte-for-byte round
trips of every family: test_hf.py's VARIANTS and IMPORTS.)"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import cli, english_text, load_lm, randomize
from scratchgpt import UserError
from scratchgpt.checkpoint import save_checkpoint
from scratchgpt.hf import config_from_hf, export_checkpoint, hf_architecture, hf_config, import_hf, state_dict_to_hf
from scratchgpt.model import GPT, ModelConfig
from scratchgpt.tokenizer import train_char_tokenizer

LLAMA_SHAPE = dict(vocab_size=48, block_size=32, n_layer=2, n_head=2, n_embd=32, pos="rope", norm="rmsnorm",
                   mlp="swiglu", bias=False, mlp_hidden=64)
BASE = {"vocab_size": 48, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}
MISTRAL = {**BASE, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}
PHI3 = {**BASE, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}
QWEN2 = {**BASE, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
GEMMA = {**BASE, "model_type": "gemma", "architectures": ["GemmaForCausalLM"], "head_dim": 16}


def one_line(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------------------
# Export: which class


def test_llama_shaped_models_export_as_mistral_or_phi3_only_when_exact():
    cfg = ModelConfig(**LLAMA_SHAPE)
    assert hf_architecture(cfg) == "LlamaForCausalLM"
    assert hf_architecture(cfg, model_type="mistral") == "MistralForCausalLM"
    assert hf_config(cfg, model_type="phi3")["architectures"] == ["Phi3ForCausalLM"]
    biased = ModelConfig(**{**LLAMA_SHAPE, "bias": True})
    assert "MistralForCausalLM has no biases" in one_line(lambda: hf_architecture(biased, model_type="mistral"))
    assert "GPT2LMHeadModel does not compute this model: it exports as LlamaForCausalLM" in one_line(
        lambda: hf_architecture(cfg, model_type="gpt2"))
    assert "model_type 'bogus' is not one scratchgpt writes" in one_line(lambda: hf_config(cfg, model_type="bogus"))
    scaled = ModelConfig(**LLAMA_SHAPE, rope_scaling="llama3")
    assert hf_architecture(scaled, model_type="mistral") == "MistralForCausalLM"
    assert "model.rope_scaling=llama3 has no Phi3ForCausalLM equivalent" in one_line(
        lambda: hf_architecture(scaled, model_type="phi3"))
    qwen2 = ModelConfig(**LLAMA_SHAPE, qkv_bias=True)
    assert "MistralForCausalLM does not compute this model: it exports as Qwen2ForCausalLM" in one_line(
        lambda: hf_architecture(qwen2, model_type="mistral"))


def test_phi3_fuses_and_gemma_shifts_tensors_exactly():
    """Phi-3's qkv_proj and gate_up_proj are our c_attn and c_fc as they are; Gemma's norm weights are ours - 1."""
    cfg = ModelConfig(**{**LLAMA_SHAPE, "n_head": 4, "n_kv_head": 1})
    model = GPT(cfg)
    randomize(model, 1)
    sd = model.state_dict()
    phi3 = state_dict_to_hf(cfg, sd, model_type="phi3")
    assert torch.equal(phi3["model.layers.1.self_attn.qkv_proj.weight"], sd["transformer.h.1.attn.c_attn.weight"])
    assert torch.equal(phi3["model.layers.0.mlp.gate_up_proj.weight"], sd["transformer.h.0.mlp.c_fc.weight"])
    gemma_cfg = ModelConfig(**{**LLAMA_SHAPE, "scale_embeddings": True, "mlp": "geglu_tanh"})
    gemma = GPT(gemma_cfg)
    randomize(gemma, 2)
    hf = state_dict_to_hf(gemma_cfg, gemma.state_dict())
    ours = gemma.transformer.h[0].ln_2.weight.detach()
    assert torch.equal(hf["model.layers.0.post_attention_layernorm.weight"], ours - 1)
    assert torch.equal(hf["model.layers.0.post_attention_layernorm.weight"] + 1, ours)  # exact both ways here
    assert torch.equal(hf["model.norm.weight"], gemma.transformer.ln_f.weight.detach() - 1)


# ---------------------------------------------------------------------------------------
# Import: what each family's config.json may say


@pytest.mark.parametrize("hf_cfg,want", [
    ({**MISTRAL, "sliding_window": None}, {}),
    ({**MISTRAL, "sliding_window": 64}, {}),  # a window as long as the context changes nothing there
    ({**MISTRAL, "head_dim": 24, "num_key_value_heads": 1}, {"head_size": 24, "n_kv_head": 1}),  # window: 4096
    ({**PHI3, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}},
     {"rope_base": 500.0}),
    ({**QWEN2, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}, {"qkv_bias": True}),
    ({**GEMMA, "hidden_act": "gelu"}, {"mlp": "geglu_tanh", "scale_embeddings": True, "tie_embeddings": True}),
    ({**GEMMA, "hidden_act": "silu"}, {"mlp": "swiglu"}),
    ({k: v for k, v in GEMMA.items() if k != "head_dim"}, {"head_size": 256, "block_size": 64}),
    ({**QWEN2, "hidden_act": "gelu_pytorch_tanh"}, {"mlp": "geglu_tanh", "bias": False}),
], ids=["mistral-no-window", "mistral-window-=-context", "mistral-default-window", "phi3", "qwen2-window-unused",
        "gemma-gelu", "gemma-silu", "gemma-head-dim-256", "qwen2-geglu"])
def test_family_configs_import(hf_cfg, want):
    cfg = config_from_hf(hf_cfg)
    assert {k: getattr(cfg, k) for k in want} == want
    assert (cfg.pos, cfg.norm, cfg.norm_placement) == ("rope", "rmsnorm", "pre")


@pytest.mark.parametrize("hf_cfg,named", [
    ({**MISTRAL, "sliding_window": 16}, "sliding_window=16 is shorter than the context (max_position_embeddings=64)"),
    ({k: v for k, v in MISTRAL.items() if k != "max_position_embeddings"}, "sliding_window=4096 is shorter"),
    ({**PHI3, "max_position_embeddings": 4096, "sliding_window": 2047}, "sliding_window=2047 is shorter"),
    ({**PHI3, "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     "rope_type='longrope'"),
    ({**PHI3, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.75}}, "partial_rotary_factor=0.75"),
    ({**QWEN2, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, "sliding_window=16"),
    ({**GEMMA, "hidden_act": "relu"}, "hidden_act='relu' in GemmaForCausalLM's gated MLP"),
    ({**GEMMA, "attention_bias": True}, "attention_bias=True has no scratchgpt equivalent"),
    ({**GEMMA, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({**GEMMA, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]},
     "model_type 'gemma2' has no scratchgpt equivalent (Gemma 2 adds attention-logit softcapping"),
    ({**GEMMA, "model_type": "gemma3_text"}, "model_type 'gemma3_text' has no scratchgpt equivalent (Gemma 3"),
    ({**MISTRAL, "model_type": "mixtral"}, "(a mixture-of-experts MLP)"),
    ({**MISTRAL, "model_type": "mamba"}, "model_type 'mamba' is not supported; scratchgpt imports gpt2, opt"),
], ids=["mistral-window", "mistral-default-window", "phi3-mini-4k-window", "phi3-longrope", "phi4-partial-rope",
        "qwen2-window", "gemma-relu", "gemma-attention-bias", "gemma-bidirectional", "gemma2", "gemma3", "mixtral",
        "unknown"])
def test_family_configs_refused_in_one_line(hf_cfg, named):
    assert named in one_line(lambda: config_from_hf(hf_cfg))


# ---------------------------------------------------------------------------------------
# Bad folders: one line naming the file, nothing written


def llama_folder(tmp: Path, **options) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """A Llama folder (config.json, model.safetensors; no tokenizer: the model is refused before it is read)."""
    cfg = ModelConfig(**{**LLAMA_SHAPE, **options})
    model = GPT(cfg)
    randomize(model, 0)
    hf_cfg, tensors = hf_config(cfg), state_dict_to_hf(cfg, model.state_dict())
    src = tmp / "src"
    src.mkdir()
    return src, hf_cfg, tensors


def write_folder(src: Path, hf_cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    (src / "config.json").write_text(json.dumps(hf_cfg))
    save_file(tensors, str(src / "model.safetensors"))


def refused_import(tmp: Path, src: Path) -> str:
    message = one_line(lambda: import_hf(src, tmp / "run"))
    assert not (tmp / "run").exists() and not [p for p in tmp.iterdir() if p.name.startswith(".")]
    return message


def test_unknown_family_names_the_config_file(tmp_path):
    src, hf_cfg, tensors = llama_folder(tmp_path)
    write_folder(src, {**hf_cfg, "model_type": "mamba"}, tensors)
    assert refused_import(tmp_path, src).startswith(f"{src / 'config.json'}: model_type 'mamba' is not supported")


def test_missing_tensor_names_the_weights_file_and_tensor(tmp_path):
    src, hf_cfg, tensors = llama_folder(tmp_path, n_kv_head=1)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_folder(src, hf_cfg, tensors)
    assert refused_import(tmp_path, src) == (f"{src / 'model.safetensors'}: LlamaForCausalLM weights lack tensor "
                                             "model.layers.1.mlp.up_proj.weight")


@pytest.mark.parametrize("key,shape", [("model.layers.0.self_attn.k_proj.weight", (32, 32)),  # GQA: needs (16, 32)
                                       ("model.layers.1.mlp.down_proj.weight", (32, 60)),
                                       ("model.norm.weight", (32, 1))])
def test_misshaped_tensor_names_the_weights_file_tensor_and_shapes(tmp_path, key, shape):
    src, hf_cfg, tensors = llama_folder(tmp_path, n_kv_head=1)
    want = tuple(tensors[key].shape)
    tensors[key] = torch.randn(shape)
    write_folder(src, hf_cfg, tensors)
    assert refused_import(tmp_path, src) == (f"{src / 'model.safetensors'}: tensor {key} has shape {shape}, where "
                                             f"config.json makes a LlamaForCausalLM with {want}")


# ---------------------------------------------------------------------------------------
# A run remembers its family; the CLI picks one


def make_run(tmp: Path, **options) -> tuple[Path, GPT]:
    tok = train_char_tokenizer([english_text(2000)])
    cfg = ModelConfig(**{**LLAMA_SHAPE, "vocab_size": tok.vocab_size, **options})
    model = GPT(cfg)
    randomize(model, 3)
    tok.save(tmp / "tok")
    config = {"format_version": 1, "data": None, "model": asdict(cfg), "train": {}, "optim": {}, "tokenizer": tok.kind}
    save_checkpoint(tmp / "run", model=model, optimizer=None, state={"step": 1, "tokens": 8, "best_val_loss": None},
                    config=config, tokenizer_file=tmp / "tok" / "tokenizer.json", is_best=True)
    return tmp / "run", model


def test_export_model_type_flag_and_an_imported_family_that_stays(tmp_path, capsys):
    run, model = make_run(tmp_path, n_head=4, n_kv_head=2)
    code, _, err = cli(capsys, "export", run, "--out", tmp_path / "phi3", "--model-type", "phi3")
    assert code == 0, err
    assert json.loads((tmp_path / "phi3" / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    imported = import_hf(tmp_path / "phi3", tmp_path / "imported")
    again, _, config = load_lm(imported)
    assert config["imported_from"]["model_type"] == "phi3" and again.cfg == model.cfg
    assert json.loads((export_checkpoint(imported, tmp_path / "back") / "config.json").read_text())["model_type"] == "phi3"
    llama = export_checkpoint(imported, tmp_path / "llama", model_type="llama")  # asked: the natural class
    assert json.loads((llama / "config.json").read_text())["model_type"] == "llama"
    code, _, err = cli(capsys, "export", run, "--out", tmp_path / "bad", "--model-type", "gpt2")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert "GPT2LMHeadModel does not compute this model" in lines[0] and not (tmp_path / "bad").exists()
