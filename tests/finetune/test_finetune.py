"""Fine-tuning: a classifier that beats the majority baseline, SFT that answers held-out prompts,
prompt masking, LoRA (only adapters train; merged == unmerged), MLM, and one-line errors."""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import random
import string
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

from conftest import cli, load_lm  # noqa: E402
from scratchgpt import UserError  # noqa: E402
from scratchgpt.checkpoint import load_run  # noqa: E402
from scratchgpt.data import mlm_mask_batch  # noqa: E402
from scratchgpt.finetune import (  # noqa: E402
    FinetuneOptions, finetune_classify, finetune_sft, pack_rows, setup_trainable, sft_labels, sft_loss, train_classifier,
)
from scratchgpt.heads import GPTClassifier, classifier_logits  # noqa: E402
from scratchgpt.prompts import default_template, encode_conversation  # noqa: E402
from scratchgpt.model import GPT, ModelConfig  # noqa: E402

BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)
COMPACT = {"user": "{prompt}=", "assistant_end": ".\n", "stop": ["."]}  # short: a tiny model learns to copy fast


# ---------------------------------------------------------------- data the tests make from CPython's own files
def prose_lines() -> list[str]:
    """English sentences from the pydoc topics (not indented: no code examples)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for ln in topics[key].splitlines():
            s = ln.strip()
            if ln[:1].isspace() or not 40 <= len(s) <= 90 or not s.isascii():
                continue
            if sum(c.isalpha() or c == " " for c in s) >= 0.9 * len(s):
                out.append(s)
    return out


def code_lines() -> list[str]:
    """Lines of stdlib Python source that are code (not comments or docstrings)."""
    import argparse
    import configparser
    import csv
    import json.decoder
    import json.encoder

    out = []
    for mod in (textwrap, json.encoder, json.decoder, argparse, configparser, csv, random):
        for ln in inspect.getsource(mod).splitlines():
            s = ln.strip()
            if not 30 <= len(s) <= 90 or not s.isascii() or s[0] in "#\"'" or not any(c in s for c in "()=[]:"):
                continue
            if sum(c.isalpha() or c == " " for c in s) < 0.9 * len(s):
                out.append(s)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def one_line_error(capsys, *args) -> str:
    code, _, err = cli(capsys, *args)
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def ft_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ft")


@pytest.fixture(scope="session")
def base_run(ft_root) -> Path:
    """A char-level 2-layer, 32-dim GPT pretrained for 40 steps on English and Python source."""
    from pydoc_data.topics import topics

    from scratchgpt.data import prepare
    from scratchgpt.optim import OptimConfig
    from scratchgpt.train import TrainConfig, train

    # printable ASCII first: the train split (the head) then knows every character the test files use
    text = string.printable + "\n\n".join(topics[k] for k in sorted(topics))[:60000] + inspect.getsource(textwrap)
    (ft_root / "corpus.txt").write_text(text, encoding="utf-8")
    prepare([str(ft_root / "corpus.txt")], ft_root / "data", tokenizer="char", progress=False)
    train(data=ft_root / "data", out=ft_root / "base", model=ModelConfig(**BASE),
          train=TrainConfig(max_iters=40, batch_size=16, eval_interval=40, eval_iters=2, sample_tokens=0, progress=False,
                            tensorboard=False, plot=False, final_eval=False, peak_flops=1e12, device="cpu",
                            dtype="float32"),
          optim=OptimConfig(lr=3e-3, warmup_iters=5))
    return ft_root / "base"


@pytest.fixture(scope="session")
def cls_files(ft_root) -> tuple[Path, Path]:
    """Prose vs code lines, 60/40, so the majority baseline is 0.6."""
    rng = random.Random(0)
    prose, code = prose_lines(), code_lines()
    rng.shuffle(prose)
    rng.shuffle(code)
    rows = [{"text": t, "label": "prose"} for t in prose[:180]] + [{"text": t, "label": "code"} for t in code[:120]]
    rng.shuffle(rows)
    return write_jsonl(ft_root / "cls_train.jsonl", rows[:220]), write_jsonl(ft_root / "cls_val.jsonl", rows[220:])


@pytest.fixture(scope="session")
def cls_run(ft_root, base_run, cls_files) -> tuple[Path, dict]:
    out = ft_root / "cls"
    result = finetune_classify(base_run, *cls_files, out, options=FinetuneOptions(epochs=3, lr=1e-3, device="cpu"),
                               log=lambda m: None)
    return out, result


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return sorted({"".join(rng.choice(string.ascii_lowercase) for _ in range(4)) for _ in range(n)})


@pytest.fixture(scope="session")
def sft_run(ft_root, base_run) -> tuple[Path, list[str]]:
    """SFT on copying a 4-letter word; val words are held out of training."""
    pool = words(700, 1)
    random.Random(2).shuffle(pool)
    train_w, val_w = pool[:600], pool[600:640]
    write_jsonl(ft_root / "copy_train.jsonl", [{"prompt": w, "response": w} for w in train_w])
    write_jsonl(ft_root / "copy_val.jsonl", [{"prompt": w, "response": w} for w in val_w])
    (ft_root / "compact.json").write_text(json.dumps(COMPACT))
    finetune_sft(base_run, ft_root / "copy_train.jsonl", ft_root / "copy_val.jsonl", ft_root / "sft",
                 template=ft_root / "compact.json",
                 options=FinetuneOptions(epochs=6, lr=1e-2, warmup_steps=30, device="cpu"),
                 log=lambda m: None)
    return ft_root / "sft", val_w


# ---------------------------------------------------------------- classification
@pytest.mark.slow
def test_classifier_beats_majority_baseline_and_reports_while_training(cls_run, cls_files, capsys):
    out, result = cls_run
    best = result["best"]
    assert result["majority_baseline"] == pytest.approx(0.6, abs=0.05)
    assert best["accuracy"] >= 0.85 and best["accuracy"] >= result["majority_baseline"] + 0.2
    assert best["macro_f1"] >= 0.8
    assert result["initial"]["accuracy"] < best["accuracy"]  # learned, not there from the start
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "accuracy" in ln]
    assert len(evals) >= 4 and all({"macro_f1", "confusion_matrix", "val_loss"} <= set(r) for r in evals)
    assert sum(map(sum, evals[-1]["confusion_matrix"])) == 80
    config = json.loads((out / "best/config.json").read_text())
    assert config["classifier"]["labels"] == ["code", "prose"] and config["finetune"]["task"] == "classify"
    assert result["truncated"] > 0  # lines up to 90 chars, context 64: cut and counted

    # eval --task classify on the val file reproduces the best checkpoint's figures
    code, stdout, _ = cli(capsys, "eval", out, "--task", "classify", "--data", cls_files[1])
    assert code == 0
    ev = json.loads(stdout)
    assert ev["accuracy"] == pytest.approx(best["accuracy"]) and ev["macro_f1"] == pytest.approx(best["macro_f1"])
    assert ev["confusion_matrix"] == best["confusion_matrix"]
    assert json.loads((out / "eval-classify.json").read_text())["accuracy"] == ev["accuracy"]
    print(f"\nclassification: accuracy {best['accuracy']:.3f}, macro-F1 {best['macro_f1']:.3f}, "
          f"baseline {result['majority_baseline']:.3f}")


@pytest.mark.slow
def test_predict_writes_labels_and_probabilities(cls_run, cls_files, ft_root, capsys):
    out, result = cls_run
    code, stdout, _ = cli(capsys, "predict", out, "--input", cls_files[1])
    assert code == 0
    rows = [json.loads(ln) for ln in stdout.splitlines()]
    truth = [json.loads(ln)["label"] for ln in cls_files[1].read_text().splitlines()]
    assert len(rows) == len(truth) == 80
    for r in rows:
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(r["probs"], key=r["probs"].get)
    accuracy = sum(r["label"] == t for r, t in zip(rows, truth)) / len(truth)
    assert accuracy == pytest.approx(result["best"]["accuracy"])  # the best checkpoint, as reported
    inp = ft_root / "to_predict.csv"
    inp.write_text('text,id\n"x = f(a, b)[0]",1\n"A line, with a comma, of prose.",2\n')
    code, _, _ = cli(capsys, "predict", out, "--input", inp, "--output", ft_root / "pred.csv")
    lines = (ft_root / "pred.csv").read_text().splitlines()
    assert code == 0 and lines[0] == "text,label,prob_code,prob_prose" and len(lines) == 3
    assert lines[2].startswith('"A line, with a comma, of prose.",')


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("causal", [True, False])
def test_padding_never_changes_a_prediction(pooling, causal):
    torch.manual_seed(0)
    model = GPTClassifier(GPT(ModelConfig(vocab_size=20, causal=causal, **BASE)), 3, pooling).eval()
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [3, 3]]
    with torch.no_grad():
        batched = classifier_logits(model, seqs)
        alone = torch.cat([classifier_logits(model, [s]) for s in seqs])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_freeze_except_trains_only_the_last_blocks(base_run, ft_root):
    gpt = load_run(base_run).gpt.train()
    model = setup_trainable(GPTClassifier(gpt, 2), freeze_except=1)
    before = {n: sha(p) for n, p in model.named_parameters()}
    seqs = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [2, 2]] * 4
    train_classifier(model, seqs, [0, 1, 0, 1] * 4, seqs, [0, 1, 0, 1] * 4, ["a", "b"],
                     FinetuneOptions(max_steps=3, batch_size=8, lr=1e-2, device="cpu"), ft_root / "freeze", log=lambda m: None)
    changed = {n for n, p in model.named_parameters() if sha(p) != before[n]}
    assert changed and all(n.startswith(("gpt.transformer.h.1.", "gpt.transformer.ln_f", "head.")) for n in changed)
    assert any(n.startswith("head.") for n in changed) and any(n.startswith("gpt.transformer.h.1.") for n in changed)


def test_best_checkpoint_and_early_stopping(tmp_path):
    from scratchgpt.finetune import fit

    model = torch.nn.Linear(2, 1)
    scores = iter([0.1, 0.5, 0.7, 0.6, 0.65, 0.9, 0.95])  # step 0, then one per step
    saved = []

    def loss_of(batch):
        return model(torch.ones(1, 2)).square().sum()

    result = fit(model, lambda epoch: [0] * 100, loss_of, lambda: {"score": next(scores)},
                  lambda ev, best: best is None or ev["score"] > best["score"],
                  lambda name, progress, ev: saved.append((name, progress["step"], ev["score"])),
                  FinetuneOptions(epochs=1, eval_interval=1, patience=2, lr=1e-3, device="cpu"), tmp_path, lambda s, ev, tl: "",
                  lambda m: None)
    assert saved == [("best", 1, 0.5), ("best", 2, 0.7), ("latest", 4, 0.65)]
    assert result["steps"] == 4 and result["best"]["step"] == 2 and result["stop_reason"].startswith("early stopping")


# ---------------------------------------------------------------- LoRA
@pytest.mark.slow
def test_lora_trains_only_adapters(base_run, ft_root):
    gpt = load_run(base_run).gpt.train()
    model = setup_trainable(GPTClassifier(gpt, 2), lora={"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]})
    before = {n: sha(p) for n, p in model.named_parameters()}
    seqs = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [2, 2]] * 4
    train_classifier(model, seqs, [0, 1, 0, 1] * 4, seqs, [0, 1, 0, 1] * 4, ["a", "b"],
                     FinetuneOptions(max_steps=3, batch_size=8, lr=1e-2, device="cpu"), ft_root / "lora_unit", log=lambda m: None)
    changed = {n for n, p in model.named_parameters() if sha(p) != before[n]}
    base_names = [n for n in before if "lora_" not in n and ".head." not in n]
    assert len(base_names) > 20 and not changed & set(base_names)  # every base weight's checksum is unchanged
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert all("lora_" in n or ".head." in n for n in changed)


@pytest.mark.slow
def test_lora_run_saves_adapter_alone_and_merges_exactly(base_run, cls_files, ft_root, capsys):
    from safetensors.torch import load_file

    base_file = base_run / "best/model.safetensors"
    base_sha = hashlib.sha256(base_file.read_bytes()).hexdigest()
    out = ft_root / "cls_lora"
    code, _, err = cli(capsys, "finetune", "classify", base_run, "--train", cls_files[0], "--val", cls_files[1],
                       "--out", out, "--lora", "--lora-r", "4", "--max-steps", "12", "--eval-interval", "6",
                       "--device", "cpu")
    assert code == 0, err
    assert "accuracy" in err and "<- predicted" in err  # metrics and confusion matrix while training
    assert "longer than the context of 64 tokens; kept their first 64" in err
    assert hashlib.sha256(base_file.read_bytes()).hexdigest() == base_sha
    ckpt = out / "best"
    assert not (ckpt / "model.safetensors").exists()
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert (ckpt / "adapter_model.safetensors").stat().st_size < base_file.stat().st_size / 2
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4

    code, _, err = cli(capsys, "merge-lora", out, "--out", ft_root / "cls_merged")
    assert code == 0, err
    unmerged, tok = load_run(out, merge=False).model, load_run(out).tokenizer
    merged = load_run(ft_root / "cls_merged").model
    assert type(unmerged).__name__ == "PeftModel" and isinstance(merged, GPTClassifier)
    seqs = [tok.encode("def f(x): return x"), tok.encode("Some words of plain English prose.")]
    with torch.no_grad():
        a, b = classifier_logits(unmerged, seqs), classifier_logits(merged, seqs)
    assert (a - b).abs().max().item() < 1e-5
    # the adapter changed the model: merged weights differ from the base's
    base_sd = load_file(base_file)
    assert not torch.equal(merged.gpt.transformer.h[0].attn.c_attn.weight, base_sd["transformer.h.0.attn.c_attn.weight"])

    # an adapter on another base is refused, naming both
    other = ft_root / "other_base"
    torch.manual_seed(5)
    from scratchgpt.checkpoint import save_checkpoint

    cfg = json.loads((base_run / "best/config.json").read_text())
    save_checkpoint(other, model=GPT(ModelConfig(**cfg["model"])), optimizer=None, state={"step": 0}, config=cfg,
                    tokenizer_file=base_run / "best/tokenizer.json", is_best=True)
    msg = one_line_error(capsys, "merge-lora", out, "--out", ft_root / "m2", "--base", other)
    assert "different base" in msg and str(ckpt) in msg


# ---------------------------------------------------------------- SFT
@pytest.mark.slow
def test_sft_answers_held_out_prompts(sft_run, capsys):
    from scratchgpt.chat import chat
    from scratchgpt.generate import GenerationConfig

    run, val_w = sft_run
    code, stdout, _ = cli(capsys, "eval", run, "--task", "generate", "--data", run.parent / "copy_val.jsonl",
                          "--max-new-tokens", "8")
    assert code == 0
    ev = json.loads(stdout)
    assert ev["n"] == 40 and ev["exact_match"] >= 0.8 and ev["chrf"] >= 80
    assert (run / "eval-generate.json").exists()
    # chat reads the template stored in the checkpoint and formats the turn exactly as in training
    _r = load_run(run)
    model, tok, config = _r.model, _r.tokenizer, _r.config
    assert config["chat_template"]["user"] == COMPACT["user"]
    replies = io.StringIO()
    lines = [ln for w in val_w[:10] for ln in (w + "\n", "/reset\n")]  # single-turn, as trained
    chat(model, tok, config, lines, replies, GenerationConfig(temperature=0.0, max_new_tokens=8), err=io.StringIO())
    hits = sum(r == w for r, w in zip(replies.getvalue().splitlines(), val_w[:10]))
    assert hits >= 8
    # `sample` wraps the prompt in the stored template too, and prints only the reply
    sampled = []
    for w in val_w[:5]:
        code, stdout, _ = cli(capsys, "sample", run, "--prompt", w, "--temperature", "0", "--max-new-tokens", "8",
                              "--device", "cpu")
        assert code == 0
        sampled.append(stdout.strip())
    assert sum(s == w for s, w in zip(sampled, val_w[:5])) >= 4
    print(f"\nSFT copy task: exact match {ev['exact_match']:.3f}, BLEU {ev['bleu']:.1f}, chrF {ev['chrf']:.1f}, "
          f"chat {hits}/10")


def test_sft_loss_is_on_response_tokens_only(base_run):
    from scratchgpt.tokenizer import Tokenizer

    tok = Tokenizer.load(base_run / "best")
    tmpl = default_template(tok)
    ids, learn = encode_conversation(tok, tmpl, [("user", "abc"), ("assistant", "xyz")])
    prompt_len = len(tok.encode("### Instruction:\nabc\n\n### Response:\n"))
    assert tok.decode(ids) == "### Instruction:\nabc\n\n### Response:\nxyz\n### End\n"
    x, y = sft_labels(ids, learn)
    assert x == ids[:-1]
    assert all(v == -100 for v in y[: prompt_len - 1])  # every label predicting a prompt token is masked
    assert y[prompt_len - 1:] == ids[prompt_len:]  # every response token (and the end marker) is learned
    _, y_all = sft_labels(ids, learn, mask_prompt=False)
    assert y_all == ids[1:]

    torch.manual_seed(0)
    logits = torch.randn(1, len(x), tok.vocab_size)
    labels = torch.tensor([y])
    loss = sft_loss(logits, labels)
    poked = logits.clone()
    poked[0, : prompt_len - 1] += 10 * torch.randn(prompt_len - 1, tok.vocab_size)
    assert sft_loss(poked, labels).item() == pytest.approx(loss.item(), abs=1e-6)
    poked[0, prompt_len] += 10 * torch.randn(tok.vocab_size)
    assert sft_loss(poked, labels).item() != pytest.approx(loss.item(), abs=1e-3)

    # multi-turn: only the assistant's turns are learned
    turns = [("system", "be brief"), ("user", "hi"), ("assistant", "yo"), ("user", "ok"), ("assistant", "ab")]
    ids, learn = encode_conversation(tok, tmpl, turns)
    learned = "".join(tok.decode([t]) for t, m in zip(ids, learn) if m)
    assert learned == "yo\n### End\nab\n### End\n"


def test_pack_keeps_whole_examples():
    ex = [([1] * 5, [False] * 5), ([2] * 4, [True] * 4), ([3] * 7, [True] * 7), ([4] * 2, [False] * 2)]
    rows = pack_rows(ex, [0, 1, 2, 3], 10)
    assert [r[0] for r in rows] == [[1] * 5 + [2] * 4, [3] * 7 + [4] * 2]
    assert [r[1] for r in rows] == [[False] * 5 + [True] * 4, [True] * 7 + [False] * 2]


@pytest.mark.slow
def test_sft_cli_lora_pack_default_template_and_merge(base_run, ft_root, capsys):
    from scratchgpt.prompts import ChatTemplate

    rows = [{"prompt": w, "response": w[::-1]} for w in words(40, 3)]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ih"}]})
    write_jsonl(ft_root / "rev.jsonl", rows)
    out = ft_root / "sft_lora"
    code, _, err = cli(capsys, "finetune", "sft", base_run, "--train", ft_root / "rev.jsonl", "--val",
                       ft_root / "rev.jsonl", "--out", out, "--lora", "--pack", "--max-steps", "2", "--device", "cpu")
    assert code == 0, err
    config = json.loads((out / "best/config.json").read_text())
    assert config["chat_template"] == default_template(load_run(out).tokenizer)
    assert ChatTemplate.from_config(config) is not None and config["finetune"]["pack"] is True
    code, _, err = cli(capsys, "merge-lora", out, "--out", ft_root / "sft_merged")
    assert code == 0, err
    model, _, merged_cfg = load_lm(ft_root / "sft_merged")  # what `sample` and `chat` load
    assert merged_cfg["chat_template"] == config["chat_template"]


@pytest.mark.slow
def test_lora_run_works_directly_with_sample_chat_serve_and_eval(base_run, ft_root, capsys, monkeypatch):
    """No merge needed: every command loads a LoRA run through the one loader, which applies the adapter."""
    rows = [{"prompt": w, "response": w[::-1]} for w in words(40, 5)]
    write_jsonl(ft_root / "rev2.jsonl", rows)
    lora, merged = ft_root / "sft_lora_direct", ft_root / "sft_lora_direct_merged"
    code, _, err = cli(capsys, "finetune", "sft", base_run, "--train", ft_root / "rev2.jsonl", "--val",
                       ft_root / "rev2.jsonl", "--out", lora, "--lora", "--max-steps", "6", "--lr", "0.05")
    assert code == 0, err
    assert cli(capsys, "merge-lora", lora, "--out", merged)[0] == 0
    seeded = ["--prompt", "abcd", "--temperature", "1", "--seed", "3", "--max-new-tokens", "12", "--device", "cpu"]
    texts = {}
    for name, run in (("lora", lora), ("merged", merged)):
        code, out, err = cli(capsys, "sample", run, *seeded, "--raw")
        assert code == 0, err
        texts[name] = out
    assert texts["lora"] == texts["merged"]  # the adapter is applied, exactly as merged

    replies = []
    for run in (lora, merged):
        monkeypatch.setattr("sys.stdin", io.StringIO("abcd\n/exit\n"))
        code, chat_out, err = cli(capsys, "chat", run, "--seed", "3", "--max-new-tokens", "8", "--device", "cpu")
        assert code == 0 and chat_out, err
        replies.append(chat_out)
    assert replies[0] == replies[1]

    losses = {}
    for name, run in (("lora", lora), ("merged", merged), ("base", base_run)):
        code, out, err = cli(capsys, "eval", run)
        assert code == 0, err
        losses[name] = json.loads(out)["val_loss"]
    assert losses["lora"] == pytest.approx(losses["merged"], rel=1e-5) and losses["lora"] != losses["base"]

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    apps = []
    monkeypatch.setattr("scratchgpt.serve.command._graceful_server",  # the app serve() builds, instead of running it
                        lambda config, srv: type("NoServer", (), {"run": lambda self: apps.append(config.app)})())
    code, _, err = cli(capsys, "serve", lora, "--port", "0", "--device", "cpu")
    assert code == 0 and len(apps) == 1, err
    body = {"prompt": "abcd", "max_tokens": 12, "temperature": 1, "seed": 3}
    reply = TestClient(apps[0]).post("/v1/completions", json=body).json()
    assert reply["choices"][0]["text"] == texts["lora"][len("abcd"):].removesuffix("\n")


def test_commands_refuse_run_kinds_they_cannot_use(cls_run, capsys):
    import importlib.util

    run, _ = cls_run
    commands = [["sample", run, "--prompt", "x"], ["chat", run]]
    if importlib.util.find_spec("uvicorn") and importlib.util.find_spec("fastapi"):  # the serve extra
        commands.append(["serve", run, "--port", "0"])
    for command in commands:
        msg = one_line_error(capsys, *command)
        assert "classification run" in msg and "predict" in msg


# ---------------------------------------------------------------- MLM
def test_mlm_masking_is_bert_style_and_deterministic():
    V = 101  # 100 tokenizer ids + [MASK] = 100
    x = torch.randint(0, 100, (64, 256), generator=torch.Generator().manual_seed(0))
    inp, lab = mlm_mask_batch(x, V, {"vocab_size": 100}, step=3, micro=0, rank=0, seed=7)
    chosen = lab != -100
    assert torch.equal(lab[chosen], x[chosen])
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.01)
    masked = inp[chosen] == 100
    kept = inp[chosen] == x[chosen]
    assert masked.float().mean().item() == pytest.approx(0.8, abs=0.03)
    assert (~masked & ~kept).float().mean().item() == pytest.approx(0.1 * (1 - 1 / 100), abs=0.02)  # random ids
    assert torch.equal(inp[~chosen], x[~chosen]) and int(inp.max()) <= 100
    again, _ = mlm_mask_batch(x, V, {"vocab_size": 100}, step=3, micro=0, rank=0, seed=7)
    other, _ = mlm_mask_batch(x, V, {"vocab_size": 100}, step=4, micro=0, rank=0, seed=7)
    assert torch.equal(inp, again) and not torch.equal(inp, other)
    _, lab1 = mlm_mask_batch(x[:, :2], V, None, step=0, micro=0, rank=0, seed=0)
    assert ((lab1 != -100).sum(1) >= 1).all()  # every row has a target


@pytest.mark.slow
def test_mlm_loss_falls_and_attention_is_bidirectional(ft_root, base_run):
    from scratchgpt.optim import OptimConfig
    from scratchgpt.train import TrainConfig, train

    out = ft_root / "mlm"
    train(data=ft_root / "data", out=out, model=ModelConfig(**BASE),
          train=TrainConfig(objective="mlm", max_iters=60, batch_size=16, eval_interval=60, eval_iters=2, log_interval=1,
                            sample_tokens=0, progress=False, tensorboard=False, plot=False, peak_flops=1e12,
                            device="cpu", dtype="float32"),
          optim=OptimConfig(lr=3e-3, warmup_iters=5))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["train_loss"], sum(r["train_loss"] for r in rows[-10:]) / 10
    print(f"\nMLM: train loss {first:.3f} -> {last:.3f}, val {rows[-1]['val_loss']:.3f}")
    assert last < first - 1.0
    model, tok, config = load_lm(out)
    assert config["model"]["causal"] is False and model.cfg.vocab_size == tok.vocab_size + 1
    x = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog")])
    y = x.clone()
    y[0, 30] = (y[0, 30] + 1) % tok.vocab_size
    with torch.no_grad():
        assert not torch.allclose(model(x)[0, 5], model(y)[0, 5])  # position 5 sees position 30
        causal, _, _ = load_lm(base_run)
        torch.testing.assert_close(causal(x)[0, 5], causal(y)[0, 5])  # a causal model does not


# ---------------------------------------------------------------- bad input: one line naming file, line or label
@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(base_run, cls_files, ft_root, capsys):
    d = ft_root / "bad"
    d.mkdir()
    train_f, val_f = cls_files

    def classify(train, val=val_f, *extra):
        return one_line_error(capsys, "finetune", "classify", base_run, "--train", train, "--val", val,
                              "--out", d / "out", "--max-steps", "1", *extra)

    (d / "nocol.csv").write_text("sentence,label\nhello there,a\n")
    msg = classify(d / "nocol.csv")
    assert "nocol.csv" in msg and "'text'" in msg and "sentence" in msg
    (d / "ragged.csv").write_text("text,label\nhello,a\nhow are,you,b\n")
    assert "ragged.csv:3" in classify(d / "ragged.csv") and "3 fields" in classify(d / "ragged.csv")
    write_jsonl(d / "empty_label.jsonl", [{"text": "hi", "label": "a"}, {"text": "ho", "label": " "}])
    assert "empty_label.jsonl:2" in classify(d / "empty_label.jsonl") and "empty label" in classify(d / "empty_label.jsonl")
    (d / "notjson.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", label: y}\n')
    assert "notjson.jsonl:2" in classify(d / "notjson.jsonl") and "not valid JSON" in classify(d / "notjson.jsonl")
    write_jsonl(d / "val_new.jsonl", [{"text": "some text here", "label": "poetry"}])
    msg = classify(train_f, d / "val_new.jsonl")
    assert "val_new.jsonl:1" in msg and "'poetry'" in msg
    write_jsonl(d / "chinese.jsonl", [{"text": "plain", "label": "a"}, {"text": "你好 world", "label": "b"}])
    msg = classify(d / "chinese.jsonl", d / "chinese.jsonl")
    assert "chinese.jsonl:2" in msg and "'你'" in msg and "'好'" in msg
    msg = classify(train_f, val_f, "--lora", "--freeze-except", "1")
    assert "--lora" in msg and "--freeze-except" in msg
    write_jsonl(d / "sft_bad.jsonl", [{"prompt": "a", "response": "b"}, {"question": "a"}])
    msg = one_line_error(capsys, "finetune", "sft", base_run, "--train", d / "sft_bad.jsonl", "--val",
                         d / "sft_bad.jsonl", "--out", d / "o2")
    assert "sft_bad.jsonl:2" in msg and "prompt" in msg
    write_jsonl(d / "sft_long.jsonl", [{"prompt": "x" * 100, "response": "y"}])
    msg = one_line_error(capsys, "finetune", "sft", base_run, "--train", d / "sft_long.jsonl", "--val",
                         d / "sft_long.jsonl", "--out", d / "o3")
    assert "sft_long.jsonl:1" in msg and "context of 64" in msg
    msg = one_line_error(capsys, "predict", base_run, "--input", val_f)
    assert "not a classification run" in msg
    assert not (d / "out").exists() or not any((d / "out").iterdir())


def test_unknown_characters_are_named_even_with_unk():
    from scratchgpt.prompts import encode_strict
    from scratchgpt.tokenizer import train_char_tokenizer

    tok = train_char_tokenizer(["abc "], add_unk=True)
    assert tok.encode("abz") == [1, 2, tok.unk_id]  # plain encode maps it to <unk> silently
    with pytest.raises(UserError, match=r"2 character\(s\) not in .*'x', 'z'"):
        encode_strict(tok, "a zx")
    assert encode_strict(tok, "cab") == tok.encode("cab")


def test_messages_format_is_validated(ft_root):
    from scratchgpt.data.readers import read_sft

    p = write_jsonl(ft_root / "msgs.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "assistant", "content": "b"}]},
    ])
    with pytest.raises(UserError, match=r"msgs.jsonl:2: message 0 is 'assistant', expected 'user'"):
        read_sft(p)


@pytest.mark.slow
def test_sft_default_template_fits_a_vocabulary_without_its_characters(tmp_path, capsys):
    """A char vocabulary learned from a play has no "#": the default template falls back to one it can encode; a
    --template it can't encode is named as the template's fault, not the data's."""
    from scratchgpt.data import prepare
    from scratchgpt.optim import OptimConfig
    from scratchgpt.prompts import DEFAULT_TEMPLATES
    from scratchgpt.train import TrainConfig, train

    play = "FIRST CITIZEN:\nBefore we proceed any further, hear me speak. End.\nInstruction? Response!\n" * 400
    (tmp_path / "play.txt").write_text(play, encoding="utf-8")
    prepare(inputs=[str(tmp_path / "play.txt")], out=tmp_path / "data", tokenizer="char", progress=False)
    train(data=tmp_path / "data", out=tmp_path / "base", model=ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=32),
          train=TrainConfig(max_iters=1, eval_interval=1, eval_iters=1, batch_size=2, sample_tokens=0, progress=False,
                            tensorboard=False, plot=False, final_eval=False, report=False, device="cpu"),
          optim=OptimConfig(warmup_iters=0))
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "hear me", "response": "speak"}] * 4)
    args = ["finetune", "sft", tmp_path / "base", "--train", tmp_path / "sft.jsonl", "--val", tmp_path / "sft.jsonl",
            "--max-steps", "1", "--device", "cpu"]
    code, _, err = cli(capsys, *args, "--out", tmp_path / "sft")
    assert code == 0, err
    assert json.loads((tmp_path / "sft/best/config.json").read_text())["chat_template"]["user"] == DEFAULT_TEMPLATES[1][0]
    (tmp_path / "hash.json").write_text(json.dumps({"user": "# {prompt}\n", "assistant_end": "\n"}))
    code, _, err = cli(capsys, *args, "--out", tmp_path / "sft2", "--template", tmp_path / "hash.json")
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: ")
    assert "the template (not the data)" in err and "'#'" in err and "sft.jsonl" not in err
