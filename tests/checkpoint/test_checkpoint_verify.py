"""Everything a load trusts is verified (issue 22 item 3, reliability sweep's "silently wrong models"): state.json
hashes itself and lists every file's hash (a missing list or hash is an error, never a skipped check; format 1
runs, written before, still load, with their resume state checked field by field); a damaged RUN/config.json
stops a resume in one line; the tokenizer is the model's; a LoRA adapter has every tensor its config implies."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import cli, train_bpe_tokenizer
from scratchgpt import UserError
from scratchgpt.checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, CONFIG_FILE, STATE_FILE, TOKENIZER_FILE,
                                   load_run, verify_checkpoint, weights_sha256, write_checkpoint)
from scratchgpt.checkpoint.store import STATE_SHA256, state_digest
from scratchgpt.tokenizer import train_char_tokenizer


def edit_json(path: Path, edit) -> None:
    """Edit a JSON file of a checkpoint in place (as a user would: the hard links to it are broken first)."""
    data = json.loads(path.read_text())
    edit(data)
    path.unlink()
    path.write_text(json.dumps(data))


def reseal(ckpt: Path, version: int = 2) -> None:
    """Recompute a checkpoint's sha256 list and state hash after an edit: what a careful forger does."""
    def fix(state):
        state["sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in ckpt.iterdir() if p.is_file() and p.name != STATE_FILE}
        state["format_version"] = version
        state.pop(STATE_SHA256, None)
        if version >= 2:
            state[STATE_SHA256] = state_digest(state)

    edit_json(ckpt / STATE_FILE, fix)


def one_error(code: int, err: str, *needles: str) -> str:
    assert code == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def run(tmp_path, tiny_run) -> Path:
    """A copy of the tiny run with best/ only, its files its own (no hard links into the session's run)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("checkpoints", "latest"))
    return copy


# ---------------------------------------------------------------- state.json and its lists
@pytest.mark.slow
def test_state_json_is_covered_by_its_own_hash(run, capsys):
    best = run / "best"
    state = verify_checkpoint(best)
    assert state["format_version"] == 2 and state[STATE_SHA256] == state_digest(state)
    edit_json(best / STATE_FILE, lambda s: s.update(step=-5))  # (sweep T36: not noticed before)
    with pytest.raises(UserError, match=r"state.json: checksum mismatch \(edited or corrupted\)"):
        verify_checkpoint(best)
    edit_json(best / STATE_FILE, lambda s: s.pop(STATE_SHA256))
    with pytest.raises(UserError, match=f"state.json: no {STATE_SHA256}: state.json can't be verified"):
        verify_checkpoint(best)
    code, _, err = cli(capsys, "sample", run, "--max-new-tokens", "3")
    one_error(code, err, str(best / STATE_FILE), f"no {STATE_SHA256}")


@pytest.mark.parametrize("version", [1, 2])
def test_a_missing_sha256_list_or_entry_is_an_error(run, version):
    best = run / "best"
    reseal(best, version)
    assert verify_checkpoint(best)["format_version"] == version  # format 1 (no state hash) still loads
    edit_json(best / STATE_FILE, lambda s: s["sha256"].pop(CONFIG_FILE))
    if version >= 2:
        edit_json(best / STATE_FILE, lambda s: s.update({STATE_SHA256: state_digest(s)}))
    with pytest.raises(UserError, match=f"{CONFIG_FILE}: not in .*sha256 list"):
        verify_checkpoint(best)
    edit_json(best / STATE_FILE, lambda s: s.pop("sha256"))  # (sweep S11: verification silently off before)
    if version >= 2:
        edit_json(best / STATE_FILE, lambda s: s.update({STATE_SHA256: state_digest(s)}))
    with pytest.raises(UserError, match="no sha256 list: the checkpoint's files can't be verified"):
        verify_checkpoint(best)


@pytest.mark.slow
def test_resume_refuses_damaged_state_and_config_in_one_line(tmp_path, tiny_run, capsys):
    """A damaged state.json (format 2: its hash; format 1: field by field) or RUN/config.json: one line, and
    metrics.jsonl is not cut first (sweep T27-T30, T33, T36-T38)."""
    cases = {
        "config {}": (lambda r: (r / CONFIG_FILE).write_text("{}"), "its model section must be an object"),
        "config list": (lambda r: (r / CONFIG_FILE).write_text("[]"), "not a JSON object"),
        "config binary": (lambda r: (r / CONFIG_FILE).write_bytes(bytes(range(256)) * 4), "not JSON"),
        "train a string": (lambda r: edit_json(r / CONFIG_FILE, lambda c: c.update(train="x")),
                           "its train section must be an object, got x"),
        "n_embd": (lambda r: edit_json(r / CONFIG_FILE, lambda c: c["model"].update(n_embd=64)),
                   "model.n_embd is 64, but"),
        "step -5": (lambda r: edit_json(r / "latest" / STATE_FILE, lambda s: s.update(step=-5)),
                    "latest/state.json: checksum mismatch"),
        "v1 step -5": (lambda r: (edit_json(r / "latest" / STATE_FILE, lambda s: s.update(step=-5)),
                                  reseal(r / "latest", 1)), "step must be an integer >= 0, got -5"),
        "v1 no rng": (lambda r: (edit_json(r / "latest" / STATE_FILE, lambda s: s.pop("rng")),
                                 reseal(r / "latest", 1)), "rng must be the saved random generator states"),
        "v1 no optimizer": (lambda r: (edit_json(r / "latest" / STATE_FILE, lambda s: s.pop("optimizer")),
                                       reseal(r / "latest", 1)), "optimizer must be a list"),
        "checkpoint config list": (lambda r: ((r / "latest" / CONFIG_FILE).unlink(),
                                              (r / "latest" / CONFIG_FILE).write_text("[]"), reseal(r / "latest")),
                                   'latest/config.json: not a run\'s config (it needs a "model" object)'),
    }
    for name, (damage, needle) in cases.items():
        r = tmp_path / name.replace(" ", "-")
        shutil.copytree(tiny_run, r, ignore=shutil.ignore_patterns("checkpoints"))
        damage(r)
        metrics = (r / "metrics.jsonl").read_bytes()
        code, _, err = cli(capsys, "train", "--out", r, "--resume", "--train.max_iters", "4")
        one_error(code, err, needle)
        assert (r / "metrics.jsonl").read_bytes() == metrics, name


def test_finetune_resume_refuses_a_checkpoint_config_of_the_wrong_shape(tmp_path, tiny_run, capsys):
    """finetune --resume reads the interrupted checkpoint's options from its config.json: a resealed one that is not
    a run's config is one line, before anything changes."""
    csv = tmp_path / "cls.csv"
    csv.write_text("text,label\n" + "".join(f"{'good day' if i % 2 else 'bad day'},{i % 2}\n" for i in range(8)))
    out = tmp_path / "ft"
    code, _, err = cli(capsys, "finetune", "classify", tiny_run, "--train", csv, "--val", csv, "--out", out,
                       "--max-steps", "2", "--eval-interval", "2", "--batch-size", "4", "--device", "cpu")
    assert code == 0, err
    latest = out / "latest"
    for p in [p for p in latest.iterdir() if p.is_file()]:  # its own files (no hard links into checkpoints/)
        data = p.read_bytes()
        p.unlink()
        p.write_bytes(data)
    edit_json(latest / STATE_FILE, lambda s: s.update(resume={"epoch": 0}))  # as a run stopped by Ctrl-C
    (latest / CONFIG_FILE).unlink()
    (latest / CONFIG_FILE).write_text("[]")
    reseal(latest)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = cli(capsys, "finetune", "classify", tiny_run, "--train", csv, "--val", csv, "--out", out,
                       "--max-steps", "2", "--eval-interval", "2", "--batch-size", "4", "--device", "cpu", "--resume")
    one_error(code, err, 'latest/config.json: not a run\'s config (it needs a "model" object)')
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_checkpoint_config_of_the_wrong_shape_is_one_line(run, tmp_path, capsys):
    """load_run, and export (a transformers folder, a GGUF file), which read the checkpoint's config themselves."""
    best = run / "best"  # (sweep S10: resealed, so only its shape can tell)
    exports = [("--out", tmp_path / "hf")]
    try:
        import gguf  # noqa: F401
        exports.append(("--format", "gguf", "--out", tmp_path / "model.gguf"))
    except ImportError:
        pass
    for text, needle in (("[]", 'needs a "model" object'), ('{"model": {"n_layr": 2}}', "does not describe a model"),
                         ('{"model": {}, "classifier": "x"}', "classifier section must be an object"),
                         ('{"model": {}, "classifier": {"labels": 3}}', "classifier.labels must be a list")):
        (best / CONFIG_FILE).unlink()
        (best / CONFIG_FILE).write_text(text)
        reseal(best)
        with pytest.raises(UserError, match=needle):
            load_run(run)
        for args in exports:
            code, _, err = cli(capsys, "export", run, *args)
            one_error(code, err, str(best / CONFIG_FILE))


# ---------------------------------------------------------------- the tokenizer is the model's
def test_a_tokenizer_from_another_run_is_refused(run, capsys):
    from conftest import english_text

    best = run / "best"
    char_vocab = load_run(run).tokenizer.vocab_size
    swaps = [(train_char_tokenizer(["abc"]), None, f"3 tokens, but the model was trained on {char_vocab}"),
             (train_bpe_tokenizer([english_text(20_000)], 300), None, "a bpe tokenizer, but the run was trained with "
                                                                        "a char one"),
             (train_bpe_tokenizer([english_text(20_000)], 300), "bpe",
              f"300 tokens, but the model has only {char_vocab} embeddings")]
    for tok, kind, needle in swaps:
        (best / TOKENIZER_FILE).unlink()
        tok.save(best)
        if kind:
            edit_json(best / CONFIG_FILE, lambda c: c.update(tokenizer=kind))
        reseal(best)  # (sweep S07/S08: with the hashes fixed up)
        with pytest.raises(UserError, match=needle):
            load_run(run)
    code, _, err = cli(capsys, "sample", run, "--max-new-tokens", "3")
    one_error(code, err, str(best / TOKENIZER_FILE), "embeddings")


# ---------------------------------------------------------------- LoRA adapters are complete
@pytest.fixture
def lora_run(tmp_path, tiny_run) -> Path:
    """A LoRA run on the tiny run: an adapter of r=2 on every target, with nonzero lora_A and lora_B."""
    from scratchgpt.lora import adapter_tensors, add_lora, lora_config_dict

    base = load_run(tiny_run)
    adapter_cfg = lora_config_dict(2, 4.0, 0.0)
    g = torch.Generator().manual_seed(0)
    tensors = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in adapter_tensors(add_lora(base.gpt.train(),
                                                                                               adapter_cfg)).items()}
    config = dict(base.config, finetune={"base": str(tiny_run), "base_sha256": weights_sha256(base.checkpoint)})
    out = tmp_path / "lora"
    for step, drop in ((1, None), (2, "lora_A"), (3, "lora_B")):  # the damaged adapters, resealed as S22/M05/M06
        kept = {k: v for k, v in tensors.items() if not (drop and k.endswith(f"h.0.attn.c_attn.{drop}.weight"))}
        assert len(kept) == len(tensors) - bool(drop)
        write_checkpoint(out / str(step), step, tensors={ADAPTER_FILE: kept}, tokenizer_file=base.checkpoint /
                         TOKENIZER_FILE, json_files={CONFIG_FILE: config, ADAPTER_CONFIG_FILE: adapter_cfg},
                         state={"step": step, "tokens": 0}, aliases=["latest", "best"])
    return out


@pytest.mark.slow
def test_an_adapter_missing_a_tensor_is_refused(lora_run, tmp_path, capsys):
    intact = load_run(lora_run / "1")
    assert intact.is_lora
    for step, missing in ((2, "lora_A"), (3, "lora_B")):
        with pytest.raises(UserError, match=rf"adapter_model.safetensors: the adapter is incomplete: "
                                            rf"\S*h\.0\.attn\.c_attn\.{missing}\.weight missing"):
            load_run(lora_run / str(step))
        code, _, err = cli(capsys, "merge-lora", lora_run / str(step), "--out", tmp_path / f"merged{step}")
        one_error(code, err, f"c_attn.{missing}.weight missing")
        assert not (tmp_path / f"merged{step}").exists()
