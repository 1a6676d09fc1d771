"""`scratchgpt export` / `import-hf` / `train --train.init_from`: runs trained with every shipped config leave
through the Hugging Face format and load in transformers; an imported GPT-2-shaped model samples, evaluates,
fine-tunes (classify, SFT, LoRA) and starts a new pretraining run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli, tiny_flags
from scratchgpt.checkpoint import load_run
from scratchgpt.cli import main

transformers = pytest.importorskip("transformers")


def one_line_error(capsys, *args) -> str:
    code, _, err = cli(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


def our_logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_run(run).gpt(ids)


@pytest.mark.parametrize("config", [pytest.param("shakespeare-char-nanogpt.yaml", marks=pytest.mark.slow),
                                    pytest.param("shakespeare-char-fast.yaml", marks=pytest.mark.slow),
                                    pytest.param("shakespeare-char-gpu.yaml", marks=pytest.mark.slow),
                                    "the default recipe"])
def test_runs_of_every_shipped_config_export_and_load_in_transformers(config, tmp_path, char_data, capsys):
    run, out = tmp_path / "run", tmp_path / "hf"
    flags = tiny_flags(**{"train.max_iters": 3, "train.eval_interval": 3, "train.target_val_loss": "null",
                          "train.sample_tokens": 0, "train.report": "false"})
    # the config's own architecture (positions, norms, MLP, biases, tying), at a test's size
    flags = [f for f in flags if not f.startswith(("--model.",))] + [
        "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64", "--model.block_size=32"]
    recipe = [] if config == "the default recipe" else ["--config", REPO / "configs" / config]  # no --config: the recipe
    if config == "shakespeare-char-fast.yaml":  # its qk norm (RMS, beside LayerNorm and GELU) is in no HF architecture
        code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / "qk", *recipe, *flags)
        assert code == 0, err
        assert one_line_error(capsys, "export", tmp_path / "qk", "--out", out).startswith(
            "error: model.qk_norm=true exports only as Qwen3")
        assert not out.exists()
        flags.append("--model.qk_norm=false")  # what the recipe's comment says to do for a run to export
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", run, *recipe, *flags)
    assert code == 0, err
    code, _, err = cli(capsys, "export", run, "--out", out)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= \
        {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "scratchgpt train" in card and (not recipe or config in card)  # the recorded training command
    ids = torch.randint(0, load_run(run).gpt.cfg.vocab_size, (2, 20))
    assert (hf_logits(out, ids) - our_logits(run, ids)).abs().max() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "To be, or not to be"
    assert tok.decode(tok(text)["input_ids"]) == text == load_run(run).tokenizer.decode(tok(text)["input_ids"])
    assert one_line_error(capsys, "export", run, "--out", out).endswith("pass --force to replace it")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, char_data) -> Path:
    """A GPT-2 model saved by transformers, with our char tokenizer (what a user brings: any GPT-2-family folder)."""
    folder = tmp_path_factory.mktemp("gpt2")
    vocab = json.loads((char_data / "meta.json").read_text())["vocab_size"]
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     activation_function="gelu", n_inner=None)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes((char_data / "tokenizer.json").read_bytes())
    return folder


@pytest.fixture(scope="module")
def imported(gpt2_folder, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("imported") / "run"
    assert main(["import-hf", str(gpt2_folder), "--out", str(run)]) == 0
    return run


def test_imported_gpt2_matches_and_samples_evaluates_and_serves(imported, gpt2_folder, char_data, capsys):
    ids = torch.randint(0, 50, (2, 30))
    assert (hf_logits(gpt2_folder, ids) - our_logits(imported, ids)).abs().max() <= 1e-4
    code, out, err = cli(capsys, "sample", imported, "--prompt", "the ", "--max-new-tokens", "8", "--seed", "1")
    assert code == 0 and out.startswith("the "), err
    code, out, err = cli(capsys, "eval", imported, "--data", char_data)
    assert code == 0 and json.loads(out)["perplexity"] > 1, err
    assert "pass --data" in one_line_error(capsys, "eval", imported)  # an imported run records no data dir


@pytest.mark.slow
def test_imported_gpt2_fine_tunes_and_continues_pretraining(imported, char_data, tmp_path, capsys):
    rows = [{"prompt": w, "response": w[::-1]} for w in ("abc", "hello", "world", "stone", "river", "quiet")]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cls = tmp_path / "cls.jsonl"
    cls.write_text("".join(json.dumps({"text": w, "label": str(len(w) % 2)}) + "\n" for w in
                           ("abc", "hello", "world", "stone", "river", "quiet", "to", "be")))
    for mode, data, extra in (("sft", sft, []), ("sft", sft, ["--lora"]), ("classify", cls, [])):
        out = tmp_path / f"{mode}{len(extra)}"
        code, _, err = cli(capsys, "finetune", mode, imported, "--train", data, "--val", data, "--out", out,
                           "--max-steps", "2", "--device", "cpu", *extra)
        assert code == 0, err
    code, out, err = cli(capsys, "sample", tmp_path / "sft1", "--prompt", "abc", "--max-new-tokens", "5", "--seed", "1")
    assert code == 0, err  # the LoRA run on the imported base, no merge needed

    run = tmp_path / "continued"
    flags = [f for f in tiny_flags(**{"train.max_iters": 4, "train.eval_interval": 4}) if not f.startswith("--model.")]
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", run, "--train.init_from", imported, *flags)
    assert code == 0, err
    assert "initialised from" in err
    start = load_run(imported).gpt.state_dict()
    after = load_run(run).gpt
    assert after.cfg.n_embd == 32 and after.cfg.n_layer == 2  # the imported architecture
    assert any(not torch.equal(start[k], v) for k, v in after.state_dict().items())  # and it trained from there
    state = json.loads((run / "latest/state.json").read_text())
    assert state["step"] == 4  # a fresh schedule: steps count from 0
    msg = one_line_error(capsys, "train", "--data", char_data, "--out", tmp_path / "x", "--train.init_from", imported,
                         "--model.n_layer", "3")
    assert "--model.n_layer" in msg and "architecture" in msg


def test_init_from_refuses_data_prepared_with_another_tokenizer(imported, tmp_path, capsys):
    from scratchgpt.data import prepare

    (tmp_path / "t.txt").write_text("completely different characters: 0123456789 " * 200)
    prepare([str(tmp_path / "t.txt")], tmp_path / "d", tokenizer="char", progress=False)
    msg = one_line_error(capsys, "train", "--data", tmp_path / "d", "--out", tmp_path / "r",
                         "--train.init_from", imported)
    assert "another tokenizer" in msg and "--tokenizer-from" in msg
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_lora_run_exports_merged(imported, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": w, "response": w}) + "\n" for w in ("abc", "hello", "world", "be")))
    lora = tmp_path / "lora"
    code, _, err = cli(capsys, "finetune", "sft", imported, "--train", data, "--val", data, "--out", lora, "--lora",
                       "--max-steps", "3", "--lr", "0.05", "--device", "cpu")
    assert code == 0, err
    code, _, err = cli(capsys, "export", lora, "--out", tmp_path / "hf")
    assert code == 0, err
    ids = torch.randint(0, 50, (2, 16))
    assert (hf_logits(tmp_path / "hf", ids) - our_logits(lora, ids)).abs().max() <= 1e-4
    assert not list(tmp_path.glob(".hf.merge-*"))  # the temporary merged run is gone
    peft = pytest.importorskip("peft")
    code, _, err = cli(capsys, "export", lora, "--adapter", "--out", tmp_path / "adapter")
    assert code == 0 and "PeftModel.from_pretrained" in err, err
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (model(ids).logits - our_logits(lora, ids)).abs().max() <= 1e-4
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "scratchgpt finetune sft" in card  # the fine-tune's own command, not the base's
