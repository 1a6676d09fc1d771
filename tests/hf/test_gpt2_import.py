"""Released GPT-2 checkpoints (gpt2, gpt2-medium, distilgpt2) import as they are on the Hugging Face hub:
bare key names, causal-mask buffers, a tied head with no tensor, gelu_new, a 50257-token byte-level BPE
tokenizer.json in the old format with `<|endoftext|>` = 50256. The imported run matches transformers
(logits, greedy text, tokenizer ids), samples, fine-tunes, continues pretraining and exports back.

The folder is made here exactly as the hub lays it out, at a tiny size (no network, no downloads).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import cli, english_text, export_import_export, randomize, tiny_flags, train_bpe_tokenizer
from scratchgpt import UserError
from scratchgpt.checkpoint import load_run
from scratchgpt.generate import generate_tokens
from scratchgpt.hf import import_hf, load_hf_tokenizer
from scratchgpt.model import mlp_activation
from scratchgpt.prompts import encode_with_eot
from scratchgpt.tokenizer import EOT

transformers = pytest.importorskip("transformers")

VOCAB, N_POS = 50257, 64  # GPT-2's vocabulary (EOT = 50256); a tiny context
TRICKY = [
    "Hello world, it's 2024!\n\n  Indented line\twith a tab.   \n",
    "我们的模型到处都能用。 naïve café — “quotes” ½ Ⅻ x² 🙂🚀 \u200b\u3000end",
    f"one document{EOT}the next {EOT}\n{EOT}",
    " <|endoftext|> <|end of text|> <| endoftext |>",
    "they'll've 've 'S 's's''' \r\n\r\n\n   \t  x",
    "A\U00031350 \u2ffc",  # CJK Extension H (Unicode 15): newer than Python 3.11's tables, a letter to tokenizers
]


def hub_tokenizer_spec(vocab: dict[str, int], merges: list[str]) -> dict:
    """tokenizer.json as openai-community/gpt2 has it: written by an early `tokenizers` (no model "type", no
    use_regex), <|endoftext|> an added "normalized" special token, ByteLevel post-processor and decoder."""
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": VOCAB - 1, "special": True, "content": EOT, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True},
        "model": {"dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "vocab": vocab, "merges": merges},
    }


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """50256 byte-level BPE tokens: the 256 bytes, merges learned on English text, then merges of byte pairs
    to fill GPT-2's size; <|endoftext|> comes last, at 50256, as in GPT-2."""
    from tokenizers.pre_tokenizers import ByteLevel

    learned = json.loads(train_bpe_tokenizer([english_text(60_000)], 600).to_json())["model"]["merges"]
    learned = [m if isinstance(m, str) else " ".join(m) for m in learned]
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for m in learned:
        vocab[m.replace(" ", "")] = len(vocab)
        merges.append(m)
    pairs = ((a, b) for a in alphabet for b in alphabet)
    while len(vocab) < VOCAB - 1:
        a, b = next(pairs)
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append(f"{a} {b}")
    return vocab, merges


def hub_config(**overrides) -> dict:
    """config.json with every key openai-community/gpt2's has (tiny sizes)."""
    return {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": N_POS, "n_embd": 32, "n_head": 2, "n_layer": 2,
        "n_positions": N_POS, "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": VOCAB,
        **overrides,
    }


@pytest.fixture(scope="module")
def hub_gpt2(tmp_path_factory) -> Path:
    """A folder laid out as openai-community/gpt2 is: config.json, model.safetensors (keys without `transformer.`,
    no lm_head, each layer's attn.bias mask buffer), tokenizer.json, vocab.json, merges.txt, tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=N_POS, vocab_size=VOCAB,
                                     activation_function="gelu_new")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize(model, 1, scale=0.15)  # weights far from init (biases, norm gains): every tensor's mapping matters
    tmp = tmp_path_factory.mktemp("saved")
    model.save_pretrained(tmp, safe_serialization=True)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp / "model.safetensors").items()}
    assert "lm_head.weight" not in tensors  # tied: transformers omits it, as the hub files do
    for i in range(2):  # the buffer the 2019 pickles held and the safetensors conversion kept
        tensors[f"h.{i}.attn.bias"] = torch.ones(N_POS, N_POS).tril().view(1, 1, N_POS, N_POS)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hub_config(), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": 50256}))
    vocab, merges = gpt2_vocab_and_merges()
    (folder / "tokenizer.json").write_text(json.dumps(hub_tokenizer_spec(vocab, merges), ensure_ascii=False))
    (folder / "vocab.json").write_text(json.dumps({**vocab, EOT: VOCAB - 1}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": N_POS}))
    return folder


@pytest.fixture(scope="module")
def imported(hub_gpt2, tmp_path_factory) -> Path:
    from scratchgpt.cli import main

    run = tmp_path_factory.mktemp("imported") / "run"
    assert main(["import-hf", str(hub_gpt2), "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def imported_tokenizer(imported):
    return load_run(imported).tokenizer


@pytest.fixture(scope="module")
def hf_gpt2(hub_gpt2):
    return transformers.AutoModelForCausalLM.from_pretrained(hub_gpt2).eval()


@pytest.fixture(scope="module")
def hf_tokenizers(hub_gpt2):
    """transformers' GPT-2 tokenizer three ways: the folder as AutoTokenizer loads it, the same with
    split_special_tokens, and GPT2Tokenizer built from vocab.json/merges.txt (its own GPT-2 recipe)."""
    auto = transformers.AutoTokenizer.from_pretrained(hub_gpt2)
    split = transformers.AutoTokenizer.from_pretrained(hub_gpt2, split_special_tokens=True)
    merges = [tuple(m.split(" ")) for m in (hub_gpt2 / "merges.txt").read_text().splitlines()[1:]]
    own = transformers.GPT2Tokenizer(vocab=json.loads((hub_gpt2 / "vocab.json").read_text()), merges=merges)
    assert type(auto).__name__ == type(own).__name__ == "GPT2Tokenizer"
    return auto, split, own


def test_gelu_tanh_is_transformers_tanh_gelus():
    """mlp=gelu_tanh computes ACT2FN's gelu_new, gelu_pytorch_tanh and gelu_fast to fp32 rounding; mlp=gelu
    (the exact erf GELU) is 1000x further away, so a checkpoint imported with the wrong one would be visibly off."""
    from transformers.activations import ACT2FN

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-12, 12, 200_001), 3 * torch.randn(100_000, generator=g)])
    ours = mlp_activation(x, "gelu_tanh")
    assert torch.equal(ours, ACT2FN["gelu_pytorch_tanh"](x))  # the same kernel
    for name in ("gelu_new", "gelu_fast", "gelu_python_tanh", "gelu_accurate"):
        assert (ACT2FN[name](x) - ours).abs().max() <= 1e-6, name
    assert (mlp_activation(x, "gelu") - ours).abs().max() > 4e-4


@pytest.mark.slow
def test_hub_gpt2_imports_and_matches_transformers(imported, hf_gpt2):
    loaded = load_run(imported)
    cfg = loaded.gpt.cfg
    assert (cfg.mlp, cfg.vocab_size, cfg.block_size) == ("gelu_tanh", VOCAB, N_POS) and cfg.tie_embeddings and cfg.bias
    assert loaded.tokenizer.vocab_size == VOCAB and loaded.tokenizer.eot_id == VOCAB - 1
    x = torch.randint(0, VOCAB, (2, N_POS), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf_gpt2(x).logits
        assert ref.abs().max() > 1.0  # big enough logits for the bound to mean something
        assert (loaded.gpt(x) - ref).abs().max() <= 1e-4
    prompt = loaded.tokenizer.encode("The quick brown fox")
    ours = generate_tokens(loaded.gpt, [prompt], temperature=0, max_new_tokens=24)[0]
    theirs = hf_gpt2.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert ours == theirs.tolist()


@pytest.mark.slow
def test_sample_prints_transformers_greedy_text(imported, hf_gpt2, hf_tokenizers, capsys):
    auto = hf_tokenizers[0]
    prompt = "Once upon a time, there"
    ids = auto(prompt, return_tensors="pt").input_ids
    out = hf_gpt2.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                           eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    out = out[: out.index(VOCAB - 1)] if VOCAB - 1 in out else out  # sample stops at <|endoftext|>
    assert len(out) >= 10
    # token for token (--no-utf8-guard: this random model's greedy bytes break characters)
    code, text, err = cli(capsys, "sample", imported, "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", "16", "--device", "cpu", "--no-utf8-guard")
    assert code == 0, err
    assert text == prompt + auto.decode(out) + "\n"
    # by default the same text up to the first broken character, then whole characters only
    code, guarded, err = cli(capsys, "sample", imported, "--prompt", prompt, "--temperature", "0",
                             "--max-new-tokens", "16", "--device", "cpu")
    assert code == 0 and "\ufffd" not in guarded and guarded.startswith(text.split("\ufffd")[0]), err


def test_tokenizer_encodes_as_transformers(imported_tokenizer, hub_gpt2, hf_tokenizers):
    ours = imported_tokenizer
    assert ours.to_json() == load_hf_tokenizer(hub_gpt2).to_json()
    for text in TRICKY:
        check_same_ids(ours, hf_tokenizers, text)
    auto = hf_tokenizers[0]
    assert auto.decode([VOCAB - 1]) == ours.decode([VOCAB - 1]) == EOT


def check_same_ids(ours, hf_tokenizers, text: str) -> None:
    auto, split, own = hf_tokenizers
    ids = ours.encode(text)
    # a literal <|endoftext|> is plain text to scratchgpt (as with split_special_tokens); transformers' default
    # makes it the EOT id, which is what encode_with_eot (scratchgpt's templates) does
    assert split(text)["input_ids"] == ids
    assert auto(text)["input_ids"] == own(text)["input_ids"] == encode_with_eot(ours, text)
    if EOT not in text:
        assert auto(text)["input_ids"] == ids
    assert ours.decode(ids) == auto.decode(ids) == text


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.characters(codec="utf-8"), st.sampled_from([" ", "\n", "\t", "'s", "'ll", EOT, "  "])),
                max_size=30).map("".join))
def test_tokenizer_matches_transformers_on_any_text(imported_tokenizer, hf_tokenizers, text):
    check_same_ids(imported_tokenizer, hf_tokenizers, text)


@pytest.mark.slow
def test_export_round_trip_of_imported_gpt2(imported, hf_gpt2, hf_tokenizers, hub_gpt2, tmp_path, capsys):
    export_import_export(capsys, imported, tmp_path)  # hf1, and hf2 exported from its import: the same bytes
    config = json.loads((tmp_path / "hf1" / "config.json").read_text())
    assert config["activation_function"] == "gelu_new" and config["eos_token_id"] == VOCAB - 1
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf1").eval()
    x = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (exported(x).logits - hf_gpt2(x).logits).abs().max() <= 1e-4
    # the model's own tokenizer files go back as they came: the export's tokenizer is the hub folder's
    assert (tmp_path / "hf1" / "tokenizer_config.json").read_bytes() == (hub_gpt2 / "tokenizer_config.json").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf1")
    assert tok(TRICKY[2])["input_ids"] == hf_tokenizers[0](TRICKY[2])["input_ids"]
    assert tok(TRICKY[2], split_special_tokens=True)["input_ids"] == load_run(imported).tokenizer.encode(TRICKY[2])


@pytest.mark.slow
def test_imported_gpt2_fine_tunes_and_continues_pretraining(imported, tmp_path, capsys):
    rows = [{"prompt": f"Say {w}.", "response": f"{w}, {w}!"} for w in ("hello", "world", "stone", "river")]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(capsys, "finetune", "sft", imported, "--train", sft, "--val", sft, "--out", tmp_path / "sft",
                       "--max-steps", "2", "--device", "cpu")
    assert code == 0, err
    assert load_run(tmp_path / "sft").gpt.cfg.mlp == "gelu_tanh"

    (tmp_path / "text.txt").write_text(english_text(20_000))
    code, _, err = cli(capsys, "prepare", tmp_path / "text.txt", "--out", tmp_path / "data",
                       "--tokenizer-from", imported / "best")
    assert code == 0, err
    flags = [f for f in tiny_flags(**{"train.max_iters": 2, "train.eval_interval": 2}) if not f.startswith("--model.")]
    code, _, err = cli(capsys, "train", "--data", tmp_path / "data", "--out", tmp_path / "continued",
                       "--train.init_from", imported, *flags)
    assert code == 0, err
    after = load_run(tmp_path / "continued").gpt
    assert (after.cfg.mlp, after.cfg.vocab_size) == ("gelu_tanh", VOCAB)
    start = load_run(imported).gpt.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in after.state_dict().items())


def rewrite(src: Path, dst: Path, *, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of folder `src` with config.json keys and tensors replaced (a value of None removes a key)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config:
        c = {**json.loads((src / "config.json").read_text()), **config}
        (dst / "config.json").write_text(json.dumps(c))
    if tensors:
        t = {**load_file(src / "model.safetensors"), **tensors}
        save_file({k: v for k, v in t.items() if v is not None}, str(dst / "model.safetensors"))
    return dst


@pytest.mark.slow
def test_hub_gpt2_variants(hub_gpt2, tmp_path, hf_gpt2):
    """Files with masked_bias too (older transformers), bool masks (newer ones), or no buffers all import the same."""
    x = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf_gpt2(x).logits
    variants = {
        "masked_bias": {f"h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)},
        "bool_mask": {f"h.{i}.attn.bias": torch.ones(1, 1, N_POS, N_POS, dtype=torch.bool).tril() for i in range(2)},
        "no_buffers": {f"h.{i}.attn.bias": None for i in range(2)},
    }
    for name, tensors in variants.items():
        src = rewrite(hub_gpt2, tmp_path / name, tensors=tensors)
        run = import_hf(src, tmp_path / f"run-{name}")
        with torch.no_grad():
            assert (load_run(run).gpt(x) - ref).abs().max() <= 1e-4, name


REFUSED = [
    (dict(tensors={"h.1.attn.bias": torch.ones(1, 1, N_POS, N_POS)}), "h.1.attn.bias is not a lower-triangular"),
    (dict(tensors={"h.0.attn.masked_bias": torch.tensor(0.0)}), "not a masking value"),
    (dict(config={"scale_attn_by_inverse_layer_idx": True}), "scale_attn_by_inverse_layer_idx=True"),
    (dict(config={"layer_norm_epsilon": 0.0}), "layer_norm_epsilon"),  # (any positive eps imports as norm_eps)
    (dict(config={"activation_function": "quick_gelu"}), "quick_gelu"),
    (dict(config={"add_cross_attention": True}), "add_cross_attention"),
]


@pytest.mark.parametrize("change,named", REFUSED, ids=[r[1].split()[0] for r in REFUSED])
def test_hub_gpt2_folders_we_cannot_represent_are_refused_in_one_line(hub_gpt2, tmp_path, change, named):
    src = rewrite(hub_gpt2, tmp_path / "src", **change)
    with pytest.raises(UserError) as e:
        import_hf(src, tmp_path / "run")
    assert named in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
