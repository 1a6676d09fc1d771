"""Hugging Face interop: every mapped variant matches transformers (logits, greedy decoding, tokenizer);
imports from transformers folders (fp32/fp16/bf16, sharded) match; refusals are one line; round trips are exact.

Models are tiny and made here (no network, no downloaded weights). Tests that need
transformers skip without it; the rest (refusals, round trips) run anyway.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import cli, english_text, load_lm, one_quick_per, randomize, train_bpe_tokenizer
from scratchgpt import UserError
from scratchgpt.checkpoint import save_checkpoint
from scratchgpt.generate import generate_tokens
from scratchgpt.hf import (config_from_hf, export_checkpoint, hf_architecture, import_hf, load_hf_tokenizer,
                           read_hf_folder, state_dict_from_hf)
from scratchgpt.model import GPT, ModelConfig
from scratchgpt.tokenizer import EOT, train_char_tokenizer

CHINESE = "我们的模型到处都能用。你好，世界！这是一个小模型，从零开始训练。"
TEXTS = [
    "Hello world, it's 2024!\n  Indented line\twith a tab.",
    CHINESE,
    f"one document{EOT}the next",
    "  lots   of   spaces and 'quotes' (parens) -- dashes",
]
SMALL = dict(block_size=64, n_layer=2, n_head=2, n_embd=64)

# (id, ModelConfig options, the class it must export as): every row of the mapping table (hf/__init__.py)
VARIANTS = [
    ("gpt2", {}, "GPT2LMHeadModel"),
    ("gpt2-relu2-nobias-untied", dict(mlp="relu2", bias=False, tie_embeddings=False, mlp_hidden=96), "GPT2LMHeadModel"),
    ("gpt2-gelu_tanh", dict(mlp="gelu_tanh"), "GPT2LMHeadModel"),  # activation_function=gelu_new, as GPT-2's own
    ("opt-post", dict(norm_placement="post"), "OPTForCausalLM"),
    ("opt-post-relu-nobias-untied", dict(norm_placement="post", mlp="relu", bias=False, tie_embeddings=False),
     "OPTForCausalLM"),
    # configs/shakespeare-char-fast.yaml's recipe, scaled down: rope, layernorm without bias, gelu, 3x MLP, tied
    ("neox-fast-recipe", dict(pos="rope", bias=False, mlp="gelu", mlp_hidden=192, zero_init_proj=True), "GPTNeoXForCausalLM"),
    ("neox-relu2-bias-untied", dict(pos="rope", mlp="relu2", tie_embeddings=False, rope_base=500.0), "GPTNeoXForCausalLM"),
    ("neox-gelu_tanh", dict(pos="rope", mlp="gelu_tanh", bias=False), "GPTNeoXForCausalLM"),  # gelu_pytorch_tanh
    ("llama", dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False), "LlamaForCausalLM"),
    ("llama-bias-untied", dict(pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, rope_base=500.0),
     "LlamaForCausalLM"),
    ("arcee-relu2", dict(pos="rope", norm="rmsnorm", mlp="relu2", bias=False, tie_embeddings=False), "ArceeForCausalLM"),
    ("arcee-gelu-bias", dict(pos="rope", norm="rmsnorm", mlp="gelu"), "ArceeForCausalLM"),
    ("qwen3", dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False), "Qwen3ForCausalLM"),
    ("qwen3-untied", dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, tie_embeddings=False,
                          rope_base=500.0, mlp_hidden=96), "Qwen3ForCausalLM"),
    # grouped-query attention and other epsilons (SmolLM2 / TinyLlama: Llama, GQA, rms_norm_eps 1e-5)
    ("llama-gqa-eps", dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4, n_kv_head=2, norm_eps=1e-5),
     "LlamaForCausalLM"),
    ("arcee-gqa-bias", dict(pos="rope", norm="rmsnorm", mlp="relu2", n_head=4, n_kv_head=1), "ArceeForCausalLM"),
    ("qwen3-gqa-eps", dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, n_head=4, n_kv_head=1,
                           norm_eps=1e-5, tie_embeddings=False), "Qwen3ForCausalLM"),
    ("neox-eps", dict(pos="rope", norm_eps=1e-6), "GPTNeoXForCausalLM"),
    # Llama 3.2's shape: GQA, tied, rope_scaling llama3 (a pretraining context of 32 at head_dim 16: some
    # frequencies kept, some blended, the rest divided by the factor)
    ("llama3-rope-scaling", dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4, n_kv_head=1,
                                 norm_eps=1e-5, rope_base=500.0, rope_scaling="llama3", rope_factor=32.0,
                                 rope_original_context=32), "LlamaForCausalLM"),
    # the Llama variants: Qwen2 (q/k/v biases), Gemma ((1+w) norms, scaled embeddings, GeGLU, head_dim),
    # Mistral and Phi-3 (Llama's math: exported as them on request, EXPORT_AS), Llama with a tanh-GELU gate
    ("qwen2", dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True), "Qwen2ForCausalLM"),
    ("qwen2-gqa-untied-llama3-rope", dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True, n_head=4,
                                          n_kv_head=2, tie_embeddings=False, norm_eps=1e-5, rope_scaling="llama3",
                                          rope_factor=32.0, rope_original_context=32), "Qwen2ForCausalLM"),
    ("gemma", dict(pos="rope", norm="rmsnorm", mlp="geglu_tanh", bias=False, scale_embeddings=True, n_kv_head=1,
                   head_size=48), "GemmaForCausalLM"),
    ("gemma-swiglu-untied", dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, scale_embeddings=True,
                                 tie_embeddings=False, rope_base=500.0, norm_eps=1e-5), "GemmaForCausalLM"),
    ("mistral-gqa-head-size", dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4, n_kv_head=2,
                                   head_size=24, tie_embeddings=False), "MistralForCausalLM"),
    ("phi3-gqa-untied", dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4, n_kv_head=1,
                             tie_embeddings=False, norm_eps=1e-5), "Phi3ForCausalLM"),
    ("phi3-geglu", dict(pos="rope", norm="rmsnorm", mlp="geglu_tanh", bias=False), "Phi3ForCausalLM"),
    ("llama-geglu", dict(pos="rope", norm="rmsnorm", mlp="geglu_tanh", bias=False), "LlamaForCausalLM"),
    ("qwen3-head-size", dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, n_kv_head=1,
                             head_size=48), "Qwen3ForCausalLM"),
]
VARIANT_IDS = [v[0] for v in VARIANTS]
# classes that compute what the natural one (Llama) does: export writes them when asked
EXPORT_AS = {"MistralForCausalLM": "mistral", "Phi3ForCausalLM": "phi3"}


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bpe_tok():
    return train_bpe_tokenizer([english_text(30_000), CHINESE * 3], 300)


@pytest.fixture(scope="module")
def char_tok():
    return train_char_tokenizer([english_text(30_000), *TEXTS])


def make_run(tmp: Path, tok, options: dict, seed: int = 0, extra: dict | None = None) -> tuple[Path, GPT]:
    """A run dir with one checkpoint (best = latest) of a randomized model and `tok`."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, **{**SMALL, **options})
    model = GPT(cfg)
    randomize(model, seed)
    model.eval()
    tok_dir = tmp / "tok"
    tok.save(tok_dir)
    run = tmp / "run"
    config = {"format_version": 1, "data": "data/tiny", "model": asdict(cfg), "train": {}, "optim": {},
              "tokenizer": tok.kind, **(extra or {})}
    save_checkpoint(run, model=model, optimizer=None, state={"step": 7, "tokens": 3584, "best_val_loss": 2.5},
                    config=config, tokenizer_file=tok_dir / "tokenizer.json", is_best=True)
    return run, model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    # eos_token_id=None: decode all n tokens, as scratchgpt does when no stop token is given
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_same_lm(ours: GPT, theirs, vocab: int) -> None:
    """fp32 logits within 1e-4 on random tokens (spread enough to matter), and 50 greedy tokens alike."""
    x = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = theirs(x).logits
        assert ref.abs().max() > 1.0
        assert max_diff(ours(x), ref) <= 1e-4
    prompt = x[0, :8].tolist()
    assert generate_tokens(ours, [prompt], temperature=0, max_new_tokens=50)[0] == hf_greedy(theirs, prompt, 50)


# ---------------------------------------------------------------------------------------
# Export: logits and greedy parity for every mapped variant


@pytest.mark.parametrize("name,options,arch", one_quick_per(VARIANTS, lambda v: v[2], VARIANT_IDS))
def test_export_matches_transformers(tmp_path, transformers, bpe_tok, name, options, arch):
    run, ours = make_run(tmp_path, bpe_tok, options, seed=len(name))
    assert hf_architecture(ours.cfg, model_type=EXPORT_AS.get(arch)) == arch
    out = export_checkpoint(run, tmp_path / "hf", model_type=EXPORT_AS.get(arch))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == arch
    x = torch.randint(0, bpe_tok.vocab_size, (2, SMALL["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours(x)
        assert ref.abs().max() > 1.0  # logits big enough for a 1e-4 bound to mean something
        assert max_diff(theirs(x).logits, ref) <= 1e-4
    prompt = x[0, :8].tolist()
    assert generate_tokens(ours, [prompt], temperature=0, max_new_tokens=50)[0] == hf_greedy(theirs, prompt, 50)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_exported_tokenizer_matches(tmp_path, transformers, bpe_tok, char_tok, kind):
    tok = bpe_tok if kind == "bpe" else char_tok
    run, _ = make_run(tmp_path, tok, {})
    out = export_checkpoint(run, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = tok.encode(text)
        assert theirs(text)["input_ids"] == ids  # no BOS added, <|endoftext|> in text stays plain characters
        assert theirs.decode(ids) == tok.decode(ids) == text
    if kind == "bpe":
        assert theirs.eos_token == theirs.bos_token == EOT and theirs.eos_token_id == tok.eot_id == 0
        assert theirs.decode([tok.eot_id] + tok.encode("hi")) == tok.decode([tok.eot_id] + tok.encode("hi"))
        config = json.loads((out / "config.json").read_text())
        assert config["eos_token_id"] == config["bos_token_id"] == tok.eot_id
    else:
        assert theirs.eos_token is None  # a char vocabulary has no <|endoftext|>


CHATS = [[("user", "Say what a tokenizer is.")],
         [("system", "Answer briefly."), ("user", "Name a colour.")],
         [("user", "Hi there"), ("assistant", "Hello, how can I help."), ("user", "Tell me a story.")]]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_an_sft_run_exports_its_chat_template(tmp_path, transformers, bpe_tok, char_tok, kind):
    """transformers' apply_chat_template on the export gives the ids scratchgpt prompts the SFT run with."""
    from scratchgpt.prompts import default_template, prompt_ids

    tok = bpe_tok if kind == "bpe" else char_tok
    template = dict(default_template(tok), system="Below is an instruction.\n\n")
    run, _ = make_run(tmp_path, tok, dict(pos="rope"), extra={"chat_template": template})
    out = export_checkpoint(run, tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(out)
    for chat in CHATS:
        messages = [{"role": r, "content": c} for r, c in chat]
        theirs = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert theirs == prompt_ids(tok, template, chat)
    if kind == "bpe":  # a reply in the history ends with the eos token, as SFT taught it
        assert prompt_ids(tok, template, CHATS[2]).count(tok.eot_id) == 1


def test_export_files_and_model_card(tmp_path, bpe_tok):
    run, model = make_run(tmp_path, bpe_tok, dict(pos="rope", bias=False, mlp_hidden=192),
                          extra={"command": ["scratchgpt", "train", "--data", "data/tiny"]})
    (run / "result.json").write_text(json.dumps({"final_val_loss": 1.25, "final_perplexity": 3.49}))
    out = export_checkpoint(run, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == sorted([
        ".scratchgpt", "README.md", "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["architectures"] == ["GPTNeoXForCausalLM"]
    assert config["dtype"] == config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is True
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["split_special_tokens"] is True
    assert (out / "tokenizer.json").read_bytes() == (run / "best" / "tokenizer.json").read_bytes()
    card = (out / "README.md").read_text()
    for fact in ("GPTNeoXForCausalLM", f"{model.num_params():,}", "data/tiny", "3,584", "1.2500", "3.49",
                 "scratchgpt train --data data/tiny", "Intended use and limits"):
        assert fact in card, fact


def test_model_card_prefers_eval_lm_json_and_shows_the_command_string(tmp_path, bpe_tok):
    run, _ = make_run(tmp_path, bpe_tok, {}, extra={"command": "scratchgpt train --data data/tiny --out run"})
    (run / "result.json").write_text(json.dumps({"final_val_loss": 1.25, "final_perplexity": 3.49}))
    (run / "eval-lm.json").write_text(json.dumps({"val_loss": 1.5, "perplexity": 4.48, "split": "val"}))
    card = (export_checkpoint(run, tmp_path / "hf") / "README.md").read_text()
    assert "val loss: 1.5000 nats/token (perplexity 4.48); source: `scratchgpt eval`" in card
    assert "command: `scratchgpt train --data data/tiny --out run`" in card


def test_export_refuses_existing_out_dir(tmp_path, bpe_tok):
    run, _ = make_run(tmp_path, bpe_tok, {})
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_checkpoint(run, out)
    with pytest.raises(UserError, match="holds files scratchgpt did not write"):
        export_checkpoint(run, out, force=True)  # a folder of the user's is never replaced
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_checkpoint(run, out)
    export_checkpoint(run, out, force=True)  # an export it wrote is
    assert (out / "model.safetensors").exists()
    with pytest.raises(UserError, match="holds the input"):
        export_checkpoint(run / "best", run, force=True)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary dirs left behind


REFUSED = [
    (dict(value_embeds=True), "model.value_embeds"),
    (dict(norm_placement="post", pos="rope"), "model.norm_placement=post"),
    (dict(pos="sinusoidal"), "model.pos=sinusoidal"),
    (dict(causal=False), "model.causal=false"),
    (dict(qk_norm=True, pos="rope", norm="rmsnorm", mlp="swiglu"), "model.qk_norm=true with model.bias=true"),
    (dict(qk_norm=True, pos="rope", bias=False), "model.qk_norm=true exports only as Qwen3"),
    (dict(logit_softcap=15.0, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False), "model.logit_softcap"),
    (dict(mlp="swiglu"), "model.mlp=swiglu"),
    (dict(norm="rmsnorm"), "model.norm=rmsnorm"),
    (dict(pos="rope", mlp="swiglu"), "model.mlp=swiglu with model.norm=layernorm"),
    (dict(pos="rope", n_kv_head=1), "model.n_kv_head=1 (grouped-query attention) has no GPTNeoXForCausalLM"),
    (dict(n_kv_head=1), "model.n_kv_head=1 (grouped-query attention) has no GPT2LMHeadModel"),
    (dict(norm_placement="post", n_kv_head=1), "model.n_kv_head=1 (grouped-query attention) has no OPTForCausalLM"),
    (dict(norm_placement="post", norm_eps=1e-6), "model.norm_eps=1e-06 has no OPTForCausalLM"),
    (dict(pos="rope", rope_scaling="llama3"), "model.rope_scaling=llama3 has no GPTNeoXForCausalLM equivalent"),
    (dict(pos="rope", head_size=48), "model.head_size=48 (heads 96 wide in all, n_embd 64) has no GPTNeoXForCausalLM"),
    (dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True, qkv_bias=True),
     "model.qk_norm=true with model.qkv_bias=true has no standard transformers class"),
    (dict(pos="rope", mlp="geglu_tanh", scale_embeddings=True, bias=False), "model.scale_embeddings=true exports only as Gemma"),
    (dict(pos="rope", norm="rmsnorm", mlp="relu2", bias=False, qkv_bias=True), "model.qkv_bias=true exports only as Qwen2"),
    (dict(pos="rope", norm="rmsnorm", mlp="swiglu", scale_embeddings=True), "model.scale_embeddings=true with model.bias=true"),
    (dict(mlp="geglu_tanh"), "model.mlp=geglu_tanh with model.pos=learned"),
]


@pytest.mark.parametrize("options,named", REFUSED, ids=[r[1] for r in REFUSED])
def test_unmappable_options_refused_in_one_line(options, named):
    with pytest.raises(UserError) as e:
        hf_architecture(ModelConfig(vocab_size=50, **{**SMALL, **options}))
    assert named in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------
# Round trip: export -> import -> export is byte-identical, and the imported model is the same model


@pytest.mark.parametrize("name,options,arch", one_quick_per(VARIANTS, lambda v: v[2], VARIANT_IDS))
def test_export_import_export_is_bit_identical(tmp_path, bpe_tok, name, options, arch):
    run, ours = make_run(tmp_path, bpe_tok, options, seed=3)
    first = export_checkpoint(run, tmp_path / "hf1", model_type=EXPORT_AS.get(arch))
    imported = import_hf(first, tmp_path / "imported")
    second = export_checkpoint(imported, tmp_path / "hf2")  # an imported Mistral or Phi-3 goes back as one
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (first / f).read_bytes() == (second / f).read_bytes(), f
    model, tok, config = load_lm(imported)
    assert config["imported_from"]["architecture"] == arch and config["imported_from"]["path"] == str(first.resolve())
    assert (imported / "latest" / "model.safetensors").exists() and (imported / "config.json").exists()
    assert model.cfg.bias == ours.cfg.bias and tok.vocab_size == bpe_tok.vocab_size
    x = torch.randint(0, bpe_tok.vocab_size, (1, 32))
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))


# ---------------------------------------------------------------------------------------
# Import from folders that transformers wrote


def hf_model(transformers, family: str, vocab: int, **overrides):
    t = transformers
    # the Llama-shaped classes, with grouped-query attention and (where the class has the key) a head_dim of their own
    llama_shape = dict(vocab_size=vocab, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    if family == "gpt2":
        cfg = t.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, activation_function="gelu")
        cls = t.GPT2LMHeadModel
    elif family == "opt":
        cfg = t.OPTConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, ffn_dim=64, do_layer_norm_before=False, pad_token_id=0)
        cls = t.OPTForCausalLM
    elif family == "gpt_neox":
        cfg = t.GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64, use_parallel_residual=False,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})
        cls = t.GPTNeoXForCausalLM
    elif family == "llama":
        cfg = t.LlamaConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, bos_token_id=0, eos_token_id=0)
        cls = t.LlamaForCausalLM
    elif family == "arcee":
        cfg = t.ArceeConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0)
        cls = t.ArceeForCausalLM
    elif family == "qwen2":
        cfg, cls = t.Qwen2Config(**llama_shape, num_key_value_heads=1), t.Qwen2ForCausalLM
    elif family == "mistral":  # a window as long as the context: Llama's attention
        cfg, cls = t.MistralConfig(**llama_shape, num_key_value_heads=1, head_dim=24, sliding_window=64), t.MistralForCausalLM
    elif family == "gemma":
        cfg, cls = t.GemmaConfig(**llama_shape, num_key_value_heads=1, head_dim=24), t.GemmaForCausalLM
    elif family == "phi3":
        cfg, cls = t.Phi3Config(**llama_shape, num_key_value_heads=1, tie_word_embeddings=True), t.Phi3ForCausalLM
    else:
        cfg = t.Qwen3Config(vocab_size=vocab, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, head_dim=16, intermediate_size=64)
        cls = t.Qwen3ForCausalLM
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = cls(cfg)
    randomize(model, 5)
    if family == "qwen3":  # scratchgpt's qk_norm has no weight: it is a Qwen3 whose q/k norm weights are 1
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.data.fill_(1.0)
    return model.eval()


IMPORTS = [  # (family, dtype it is saved in, max_shard_size)
    ("gpt2", torch.float32, None),
    ("gpt2", torch.float16, "20KB"),
    ("llama", torch.float32, None),
    ("llama", torch.float16, None),
    ("llama", torch.bfloat16, None),
    ("llama", torch.float32, "20KB"),
    ("opt", torch.float32, None),
    ("gpt_neox", torch.float32, None),
    ("arcee", torch.float32, None),
    ("qwen3", torch.float32, None),
    ("qwen2", torch.float32, None),
    ("mistral", torch.float32, None),
    ("mistral", torch.bfloat16, "20KB"),
    ("gemma", torch.float32, None),
    ("gemma", torch.bfloat16, None),
    ("phi3", torch.float32, None),
]


@pytest.mark.parametrize("family,dtype,shard", one_quick_per(
    IMPORTS, lambda i: i[0], [f"{f}-{str(d).split('.')[1]}{'-sharded' if s else ''}" for f, d, s in IMPORTS]))
def test_import_matches_transformers(tmp_path, transformers, bpe_tok, family, dtype, shard):
    src = tmp_path / "src"
    hf_model(transformers, family, bpe_tok.vocab_size).to(dtype).save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    assert (src / "model.safetensors.index.json").exists() == bool(shard)
    bpe_tok.save(src)
    run = import_hf(src, tmp_path / "run")
    ours, _, _ = load_lm(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert_same_lm(ours, theirs, bpe_tok.vocab_size)


def test_read_hf_folder_widens_half_precision(tmp_path, transformers):
    src = tmp_path / "src"
    model = hf_model(transformers, "llama", 64).to(torch.bfloat16)
    model.save_pretrained(src)
    _, tensors = read_hf_folder(src)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    ref = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(tensors["model.layers.0.mlp.up_proj.weight"], ref.float())


def test_qwen3_with_trained_qk_norm_weights_refused(tmp_path, transformers, bpe_tok):
    src = tmp_path / "src"
    model = hf_model(transformers, "qwen3", bpe_tok.vocab_size)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_norm.weight[3] = 1.5
    model.save_pretrained(src)
    bpe_tok.save(src)
    with pytest.raises(UserError) as e:
        import_hf(src, tmp_path / "run")
    assert "model.layers.1.self_attn.k_norm.weight is not all ones" in str(e.value) and "\n" not in str(e.value)


def test_pytorch_bin_only_folder_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(UserError) as e:
        import_hf(src, tmp_path / "run")
    assert "pickle" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


# Qwen3's q/k norms take rms_norm_eps too: 1e-3 makes a q/k eps that ignored it miss the 1e-4 bound (1e-5 barely would)
@pytest.mark.parametrize("family,eps", [("llama", 1e-5), ("qwen3", 1e-3)])
def test_gqa_folder_imports_and_round_trips(tmp_path, transformers, bpe_tok, family, eps):
    """A SmolLM2/TinyLlama-shaped folder (grouped-query attention, rms_norm_eps 1e-5) written by transformers:
    the import matches it, and export -> import -> export is byte for byte."""
    src = tmp_path / "src"
    hf_model(transformers, family, bpe_tok.vocab_size, num_key_value_heads=1, rms_norm_eps=eps).save_pretrained(src)
    bpe_tok.save(src)
    run = import_hf(src, tmp_path / "run")
    ours, _, config = load_lm(run)
    assert (ours.cfg.n_head, ours.cfg.n_kv_head, ours.cfg.norm_eps) == (2, 1, eps)
    assert config["model"]["n_kv_head"] == 1 and config["model"]["norm_eps"] == eps
    theirs = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    assert_same_lm(ours, theirs, bpe_tok.vocab_size)
    first = export_checkpoint(run, tmp_path / "hf1")
    hf_cfg = json.loads((first / "config.json").read_text())
    assert (hf_cfg["num_key_value_heads"], hf_cfg["rms_norm_eps"]) == (1, eps)
    second = export_checkpoint(import_hf(first, tmp_path / "run2"), tmp_path / "hf2")
    for f in ("model.safetensors", "config.json"):
        assert (first / f).read_bytes() == (second / f).read_bytes(), f


def test_llama3_rope_scaling_folder_imports_and_round_trips(tmp_path, transformers, bpe_tok):
    """A Llama 3.2-shaped folder (rope_scaling llama3, GQA, tied) written by transformers imports as the same
    model (fp32 logits on 64 positions, greedy tokens with the KV cache); Meta's own config.json spelling
    (transformers 4.x: rope_scaling without rope_theta, rope_theta beside it) imports the same; export ->
    import -> export is byte for byte, and transformers reads the exported config as the same scaling."""
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    cfg = transformers.LlamaConfig(vocab_size=bpe_tok.vocab_size, max_position_embeddings=64, hidden_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   rope_parameters={**scaling, "rope_theta": 500.0}, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(cfg)
    randomize(theirs, 5)
    src = tmp_path / "src"
    theirs.eval().save_pretrained(src)
    bpe_tok.save(src)
    run = import_hf(src, tmp_path / "run")
    ours, _, config = load_lm(run)
    want = dict(rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                rope_original_context=32, rope_base=500.0, n_kv_head=1)
    assert {k: config["model"][k] for k in want} == want
    assert_same_lm(ours, theirs, bpe_tok.vocab_size)

    meta = json.loads((src / "config.json").read_text())  # as Meta's Llama-3.2-1B config.json writes it
    meta.pop("rope_parameters")
    meta.update(rope_scaling=scaling, rope_theta=500.0)
    assert config_from_hf(meta) == ours.cfg

    first = export_checkpoint(run, tmp_path / "hf1")
    hf_cfg = json.loads((first / "config.json").read_text())
    assert hf_cfg["rope_scaling"] == scaling and hf_cfg["rope_parameters"] == {**scaling, "rope_theta": 500.0}
    assert transformers.AutoConfig.from_pretrained(first).rope_parameters == {**scaling, "rope_theta": 500.0}
    second = export_checkpoint(import_hf(first, tmp_path / "run2"), tmp_path / "hf2")
    for f in ("model.safetensors", "config.json"):
        assert (first / f).read_bytes() == (second / f).read_bytes(), f


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "rms_norm_eps": 1e-6}
NEOX = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "use_parallel_residual": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_embd": 32, "n_layer": 2,
        "n_head": 2, "activation_function": "gelu"}
QWEN3 = {**LLAMA, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 16}
UNSUPPORTED = [
    ({**LLAMA, "num_key_value_heads": 3}, "num_key_value_heads=3 must be a positive integer that divides"),
    ({**LLAMA, "num_key_value_heads": 0}, "num_key_value_heads=0"),
    ({**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    ({**LLAMA, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    ({**LLAMA, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    # (sweep I32c) transformers reads yarn here: a non-empty rope_scaling replaces rope_parameters
    ({**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": {"rope_type": "yarn",
                                                                                              "factor": 4.0}},
     "rope_type='yarn'"),
    ({**LLAMA, "rope_scaling": "yarn"}, "rope_scaling must be an object"),
    ({**QWEN3, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type='longrope'"),
    ({**NEOX, "rope_parameters": {**NEOX["rope_parameters"], "rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
    ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
     "rope_type 'llama3' needs a number for factor, got None"),
    ({**LLAMA, "rms_norm_eps": 0}, "rms_norm_eps=0 must be a positive number"),
    ({**LLAMA, "rms_norm_eps": "1e-5"}, "rms_norm_eps='1e-5' must be a positive number"),
    ({**NEOX, "layer_norm_eps": -1e-5}, "layer_norm_eps=-1e-05 must be a positive number"),
    ({**LLAMA, "hidden_act": "gelu"}, "hidden_act"),
    ({**LLAMA, "architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ({**NEOX, "rope_parameters": None, "rotary_pct": 0.25}, "partial_rotary_factor"),
    ({**NEOX, "use_parallel_residual": True}, "use_parallel_residual"),
    ({**GPT2, "activation_function": "quick_gelu"}, "quick_gelu"),
    ({**GPT2, "model_type": "mamba"}, "model_type 'mamba' is not supported"),
    ({**QWEN3, "num_key_value_heads": 4}, "num_key_value_heads=4"),
    ({**QWEN3, "head_dim": 0}, "head_dim=0 must be a positive integer"),
    ({**QWEN3, "use_sliding_window": True}, "use_sliding_window"),
    ({**QWEN3, "layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({**QWEN3, "attention_bias": True}, "attention_bias=true"),
    ({**QWEN3, "hidden_act": "gelu"}, "hidden_act"),
]


@pytest.mark.parametrize("text,kind", [("[]", "list"), ('"gpt2"', "str"), ("3", "int")])
def test_a_config_json_that_is_not_an_object_is_one_line(tmp_path, text, kind):
    (tmp_path / "config.json").write_text(text)  # (sweep I02/I03)
    with pytest.raises(UserError, match=f"config.json: expected a JSON object .*, got a {kind}"):
        read_hf_folder(tmp_path)


def test_rope_keys_read_as_transformers_reads_them(transformers):
    """rope_scaling and rope_parameters together (as exports and hand-edited configs have them): the RoPE
    transformers builds is the one we import."""
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    for keys in ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
                 {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "rope_scaling": llama3,
                  "rope_theta": 500.0},
                 {"rope_parameters": {**llama3, "rope_theta": 500.0}, "rope_scaling": None, "rope_theta": 500.0},
                 {"rope_scaling": llama3, "rope_theta": 250.0}):
        theirs = transformers.LlamaConfig(**{**LLAMA, **keys}).rope_parameters
        ours = config_from_hf({**LLAMA, **keys})
        assert ours.rope_base == theirs["rope_theta"], keys
        assert ours.rope_scaling == ("llama3" if theirs["rope_type"] == "llama3" else "none"), keys
        if ours.rope_scaling == "llama3":
            assert ours.rope_factor == theirs["factor"], keys


@pytest.mark.parametrize("hf_cfg,named", UNSUPPORTED, ids=[u[1] for u in UNSUPPORTED])
def test_unsupported_transformers_configs_refused_in_one_line(hf_cfg, named):
    with pytest.raises(UserError) as e:
        config_from_hf(hf_cfg)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_bias_flags_and_zero_biases(bpe_tok):
    """Llama with attention biases but no MLP biases imports as bias=true with zero MLP biases; GPT-2 whose
    biases are all zero imports as bias=false. Both are the same math as the source."""
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, pos="rope", norm="rmsnorm",
                      mlp="swiglu", mlp_hidden=64)
    ours = GPT(cfg)
    randomize(ours, 1)
    hf = {"model.embed_tokens.weight": ours.transformer.wte.weight.detach(), "model.norm.weight": torch.ones(32),
          "lm_head.weight": ours.lm_head.weight.detach()}
    q, k, v = ours.transformer.h[0].attn.c_attn.weight.detach().chunk(3)
    qb, kb, vb = ours.transformer.h[0].attn.c_attn.bias.detach().chunk(3)
    gate, up = ours.transformer.h[0].mlp.c_fc.weight.detach().chunk(2)
    p = "model.layers.0."
    hf.update({p + "input_layernorm.weight": torch.ones(32), p + "post_attention_layernorm.weight": torch.ones(32),
               p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
               p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb,
               p + "self_attn.o_proj.weight": ours.transformer.h[0].attn.c_proj.weight.detach(),
               p + "self_attn.o_proj.bias": torch.zeros(32), p + "mlp.gate_proj.weight": gate,
               p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": ours.transformer.h[0].mlp.c_proj.weight.detach()})
    hf_cfg = {**LLAMA, "vocab_size": 64, "num_hidden_layers": 1, "attention_bias": True, "mlp_bias": False}
    cfg2 = config_from_hf(hf_cfg, hf)
    sd = state_dict_from_hf(hf_cfg, hf, cfg2)
    assert cfg2.bias and not sd["transformer.h.0.mlp.c_fc.bias"].any()
    assert torch.equal(sd["transformer.h.0.attn.c_attn.bias"], ours.transformer.h[0].attn.c_attn.bias.detach())

    gpt2 = {"transformer.wte.weight": torch.randn(64, 32), "transformer.wpe.weight": torch.randn(1024, 32)}
    for name in ("ln_1", "ln_2", "ln_f"):
        prefix = "transformer." + ("" if name == "ln_f" else "h.0.")
        gpt2.update({f"{prefix}{name}.weight": torch.ones(32), f"{prefix}{name}.bias": torch.zeros(32)})
    for name, (n_in, n_out) in {"attn.c_attn": (32, 96), "attn.c_proj": (32, 32), "mlp.c_fc": (32, 128),
                                "mlp.c_proj": (128, 32)}.items():
        gpt2.update({f"transformer.h.0.{name}.weight": torch.randn(n_in, n_out), f"transformer.h.0.{name}.bias": torch.zeros(n_out)})
    gpt2_cfg = {**GPT2, "n_layer": 1}
    assert config_from_hf(gpt2_cfg).bias and not config_from_hf(gpt2_cfg, gpt2).bias
    sd = state_dict_from_hf(gpt2_cfg, {k.removeprefix("transformer."): v for k, v in gpt2.items()})  # a bare GPT2Model's names
    assert torch.equal(sd["transformer.h.0.attn.c_attn.weight"], gpt2["transformer.h.0.attn.c_attn.weight"].t())


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_hf_tokenizer_imports(tmp_path, transformers, bpe_tok, char_tok, kind):
    """A tokenizer.json re-saved by transformers still loads as ours and encodes the same."""
    tok = bpe_tok if kind == "bpe" else char_tok
    run, _ = make_run(tmp_path, tok, {})
    out = export_checkpoint(run, tmp_path / "hf")
    transformers.AutoTokenizer.from_pretrained(out).save_pretrained(tmp_path / "resaved")
    again = load_hf_tokenizer(tmp_path / "resaved")
    assert again.kind == kind
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)


def test_other_tokenizers_load_as_hf_kind_and_unloadable_ones_are_refused(tmp_path, bpe_tok):
    """A BPE file in another shape (a Metaspace split) is encoded by `tokenizers` itself (kind "hf"), not by
    scratchgpt's GPT-2 fast path; a file `tokenizers` cannot load is one line."""
    from tokenizers import Tokenizer as HFTokenizer

    spec = json.loads(bpe_tok.to_json())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_hf_tokenizer(tmp_path)
    assert tok.kind == "hf"
    theirs = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    theirs.encode_special_tokens = True  # a literal <|endoftext|> in text is text, as in all of scratchgpt
    for text in TEXTS:
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False).ids
    spec["model"]["merges"] = [["not", "in vocab"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="tokenizers library cannot load") as e:
        load_hf_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------
# Classifiers


def make_classifier_run(tmp: Path, tok, options: dict, labels: list[str]) -> tuple[Path, torch.nn.Module]:
    from scratchgpt.heads import GPTClassifier

    run, gpt = make_run(tmp, tok, options, extra={"classifier": {"labels": labels, "pooling": "last"}})
    clf = GPTClassifier(gpt, len(labels), "last").eval()
    with torch.no_grad():
        clf.head.weight.normal_(0, 0.3)
        clf.head.bias.normal_(0, 1.0)  # a trained head's bias: score has none, so export folds it into the norm
    from scratchgpt.checkpoint import CONFIG_FILE, HEAD_FILE, MODEL_FILE, model_tensors, write_checkpoint

    best = run / "best"  # written again with its head, so best/state.json lists (and hashes) it
    write_checkpoint(run, 7, tensors={MODEL_FILE: model_tensors(gpt),
                                      HEAD_FILE: {k: v.contiguous() for k, v in clf.head.state_dict().items()}},
                     json_files={CONFIG_FILE: json.loads((best / CONFIG_FILE).read_text())},
                     tokenizer_file=best / "tokenizer.json", state={"step": 7, "tokens": 3584}, aliases=["latest", "best"])
    return run, clf


@pytest.mark.parametrize("options,kind,arch", [
    ({}, "bpe", "GPT2ForSequenceClassification"),
    (dict(pos="rope", bias=False, tie_embeddings=False), "char", "GPTNeoXForSequenceClassification"),
    (dict(norm_placement="post", bias=False), "char", "OPTForSequenceClassification"),
], ids=["gpt2-bpe", "neox-char", "opt-post-char"])
def test_classifier_export_matches(tmp_path, transformers, bpe_tok, char_tok, options, kind, arch):
    from scratchgpt.heads import classifier_logits

    tok = bpe_tok if kind == "bpe" else char_tok
    labels = ["negative", "neutral", "positive"]
    run, clf = make_classifier_run(tmp_path, tok, options, labels)
    out = export_checkpoint(run, tmp_path / "hf")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(theirs).__name__ == arch and theirs.config.id2label[2] == "positive"
    texts = ["It was fine.", "Terrible, I want my money back!!", "a", "我们的模型"]
    assert hf_tok.pad_token_id == theirs.config.pad_token_id
    batch = hf_tok(texts, padding=True, return_tensors="pt")  # right-padded, rows of different lengths
    with torch.no_grad():
        ref = classifier_logits(clf, [tok.encode(t) for t in texts])
        assert max_diff(theirs(**batch).logits, ref) <= 1e-4


def test_classifier_export_message_names_its_class(tmp_path, bpe_tok, capsys):
    run, _ = make_classifier_run(tmp_path, bpe_tok, {}, ["no", "yes"])
    code, _, err = cli(capsys, "export", run, "--out", tmp_path / "hf")
    assert code == 0, err
    assert "AutoModelForSequenceClassification.from_pretrained(" in err and "GPT2ForSequenceClassification" in err
    assert "AutoModelForCausalLM" not in err


def test_classifier_refusals(tmp_path, bpe_tok):
    run, _ = make_classifier_run(tmp_path, bpe_tok, dict(pos="rope", norm="rmsnorm", mlp="swiglu"), ["a", "b"])
    with pytest.raises(UserError, match="RMSNorm has none to fold"):
        export_checkpoint(run, tmp_path / "hf")
    with pytest.raises(UserError, match="pooling='mean'"):
        hf_architecture(ModelConfig(vocab_size=50, **SMALL), classifier_pooling="mean")


# ---------------------------------------------------------------------------------------
# LoRA runs as PEFT adapter folders


def make_lora_run(tmp: Path, tok, options: dict, extra: dict | None = None) -> Path:
    """A LoRA run over a randomized base run, as `finetune ... --lora` writes it, with nonzero A and B
    (`extra`: more keys for the LoRA run's config.json)."""
    from scratchgpt.checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, CONFIG_FILE, load_run, weights_sha256,
                                       write_checkpoint)
    from scratchgpt.lora import add_lora, adapter_tensors, lora_config_dict

    base, _ = make_run(tmp, tok, options, seed=4)
    loaded = load_run(base)
    adapter = lora_config_dict(4, 8.0, 0.0)
    wrapped = add_lora(loaded.model, adapter)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    ckpt = base / "best"
    finetune = {"task": "sft", "base": str(ckpt.resolve()), "base_sha256": weights_sha256(ckpt),
                "train_file": "sft.jsonl", "val_file": "val.jsonl", "lora": adapter}
    config = dict(loaded.config, **(extra or {}), finetune=finetune)
    run = tmp / "lora"
    write_checkpoint(run, 5, tensors={ADAPTER_FILE: adapter_tensors(wrapped)},
                     json_files={CONFIG_FILE: config, ADAPTER_CONFIG_FILE: adapter},
                     tokenizer_file=ckpt / "tokenizer.json",
                     state={"step": 5, "tokens": 640, "val": {"val_loss": 1.75, "val_tokens": 99}},
                     aliases=["latest", "best"])
    return run


ADAPTERS = [  # (variant, the HF modules LoRA lands on)
    ("gpt2", ["c_attn", "c_fc", "c_proj"]),
    ("opt-post-relu-nobias-untied", ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]),
    ("neox-relu2-bias-untied", ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]),
    ("llama-bias-untied", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("arcee-gelu-bias", ["down_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("qwen3", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("llama-gqa-eps", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),  # B split unevenly
    ("qwen2", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("gemma", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("phi3-gqa-untied", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),  # fused as ours: A and B as they are
]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # transformers inside PEFT
@pytest.mark.parametrize("name,targets", one_quick_per(  # quick: GPT-2, Llama and Phi-3's fused projections
    ADAPTERS, lambda a: a[0] if a[0] in ("gpt2", "llama-bias-untied", "phi3-gqa-untied") else "the others",
    [a[0] for a in ADAPTERS]))
def test_lora_adapter_export_matches_peft(tmp_path, transformers, bpe_tok, name, targets):
    peft = pytest.importorskip("peft")
    from scratchgpt.checkpoint import load_run
    from scratchgpt.hf import export_adapter

    options, arch = {v[0]: v[1:] for v in VARIANTS}[name]
    run = make_lora_run(tmp_path, bpe_tok, options)
    out = export_adapter(run, tmp_path / "adapter", model_type=EXPORT_AS.get(arch))
    files = [".scratchgpt", "README.md", "adapter_config.json", "adapter_model.safetensors", "base"]
    assert sorted(p.name for p in out.iterdir()) == files
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["base_model_name_or_path"]) == ("LORA", "CAUSAL_LM", "base")
    assert config["target_modules"] == targets and config["fan_in_fan_out"] == (name == "gpt2")
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)

    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base").eval()
    x = torch.randint(0, bpe_tok.vocab_size, (2, SMALL["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base(x).logits
        theirs = peft.PeftModel.from_pretrained(base, out).eval()
        ours = load_run(run).model(x)
        assert max_diff(plain, ours) > 0.5  # the adapter changes the function: the parity below tests it
        assert max_diff(theirs(x).logits, ours) <= 1e-4
    card = (out / "README.md").read_text()
    for fact in ("library_name: peft", "PeftModel.from_pretrained(base, \"adapter\")", "AutoPeftModelForCausalLM",
                 "sft.jsonl", "1.7500", ", ".join(targets)):
        assert fact in card, fact


def test_lora_adapter_export_refusals(tmp_path, bpe_tok):
    from scratchgpt.hf import export_adapter

    run = make_lora_run(tmp_path, bpe_tok, dict(pos="rope", bias=False),
                        extra={"classifier": {"labels": ["a", "b"], "pooling": "last"}})
    for call, named in ((lambda: export_adapter(run, tmp_path / "out"), "export it merged"),
                        (lambda: export_adapter(tmp_path / "run", tmp_path / "out"), "not a LoRA adapter"),
                        (lambda: export_checkpoint(run, tmp_path / "out"), "merge it first")):
        with pytest.raises(UserError) as e:
            call()
        assert named in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_merged_lora_run_card_keeps_the_lora_runs_record(tmp_path, bpe_tok):
    pytest.importorskip("peft")
    from scratchgpt.finetune import merge_lora

    run = make_lora_run(tmp_path, bpe_tok, dict(pos="rope", bias=False))
    merged = merge_lora(run, tmp_path / ".tmp-merge" / "run")  # as `scratchgpt export` merges before exporting
    card = (export_checkpoint(merged, tmp_path / "hf") / "README.md").read_text()
    for fact in ("# lora", "LoRA merged into the weights", "sft.jsonl", "val loss: 1.7500", "640 in 5 steps"):
        assert fact in card, fact
