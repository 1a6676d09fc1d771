"""Hostile input files get one short `error:` line, never a traceback or an echo of the whole input: --config
and --space that are binary, latin-1, 30 MB long or YAML alias bombs; transformers config.json that is not an
object; damaged metrics.jsonl, trials.jsonl and study.json (the 2026-12-06 reliability sweep: T39-T43c, U01,
U08c, U10, I02, I03, R02, R08, D06)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import assert_held, cli, tiny_flags


def alias_bomb(levels: int) -> bytes:
    """A YAML "billion laughs": 9**levels strings from a few hundred bytes of text."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return ("\n".join(lines) + f"\ntrain: {{max_iters: *a{levels - 1}}}\n").encode()


CONFIGS = {  # what --config/--space holds -> what the error line says
    "binary": (bytes(range(256)) * 16, "not UTF-8 text"),
    "latin-1": (b"train:\n  max_iters: 4 # caf\xe9\n", "not UTF-8 text (invalid continuation byte at byte 27)"),
    "30 MB line": (b"a" * 30_000_000, "larger than 1,048,576 bytes"),
    "9-level alias bomb": (alias_bomb(9), "expands to more than 100,000 values"),
    "7-level alias bomb": (alias_bomb(7), "expands to more than 100,000 values"),
    "recursive alias": (b"a: &a [*a]\ntrain: {max_iters: *a}\n", "refers to itself"),
    "1,500-deep nesting": (b"[" * 1_500 + b"]" * 1_500, "nested too deeply"),  # (PyYAML takes 2 s to see it)
}
CONFIG_CASES = [pytest.param("train", name, marks=[pytest.mark.slow] if "deep" in name else []) for name in CONFIGS]
CONFIG_CASES += [("tune", "binary"), ("tune", "9-level alias bomb")]  # (tune's --config is the same action)


@pytest.mark.parametrize("command, name", CONFIG_CASES)
def test_hostile_config_files_are_one_short_line(capsys, tmp_path, deadline, command, name):
    data, says = CONFIGS[name]
    (tmp_path / "cfg.yaml").write_bytes(data)
    code, _, err = cli(capsys, command, "--config", tmp_path / "cfg.yaml", "--out", tmp_path / "o")
    assert_held(code, err, "--config", str(tmp_path / "cfg.yaml"), says)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["binary", "30 MB line", "9-level alias bomb"])
def test_hostile_search_spaces_are_one_short_line(capsys, tmp_path, deadline, char_data, name):
    data, says = CONFIGS[name]
    (tmp_path / "space.yaml").write_bytes(data)
    code, _, err = cli(capsys, "tune", "--data", char_data, "--out", tmp_path / "o", "--space", tmp_path / "space.yaml")
    assert_held(code, err, "space.yaml", says)


def test_inline_config_still_works_and_huge_values_are_cut(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--config", json.dumps({"train": {"max_iters": "x" * 50_000}}),
                       "--out", tmp_path / "o")
    line = assert_held(code, err, "--train.max_iters", "characters cut")
    assert len(line) < 700
    code, _, err = cli(capsys, "train", "--model.n_layer", "9" * 50_000 + "x", "--out", tmp_path / "o")
    assert_held(code, err, "--model.n_layer", "characters cut")
    code, _, err = cli(capsys, "t" * 50_000)
    assert_held(code, err, "unknown command", "characters cut")


@pytest.mark.parametrize("config", ["[]", '"gpt2"', "3", "null"])
def test_hf_config_that_is_not_an_object(capsys, tmp_path, config):
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "config.json").write_text(config)
    code, _, err = cli(capsys, "import-hf", tmp_path / "h", "--out", tmp_path / "o")
    assert_held(code, err, "config.json", "expected a JSON object")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_report_skips_damaged_metrics_lines(capsys, tmp_path, tiny_run):
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    with open(run / "metrics.jsonl", "ab") as f:  # binary garbage, then JSON rows that are not usable objects
        f.write(bytes(range(128, 256)) * 3 + b'\n[1,2]\n"x"\n{"step": "nine", "val_loss": 1}\n')
    code, _, err = cli(capsys, "report", run)
    assert code == 0 and "Traceback" not in err, err
    assert (run / "report.html").stat().st_size > 0


def test_data_info_refuses_negative_sample_tokens(capsys, char_data):
    code, out, err = cli(capsys, "data-info", char_data, "--sample-tokens", "-5")
    assert_held(code, err, "--sample-tokens", "-5")
    assert "first -5" not in out


@pytest.fixture(scope="module")
def search(tmp_path_factory, char_data):
    """A finished 1-trial search (tune --out) to damage copies of."""
    from scratchgpt.cli import main

    out = tmp_path_factory.mktemp("tune") / "t"
    code = main(
        ["tune", "--data", str(char_data), "--out", str(out), "--trials", "1", "--space", '{"optim.lr": [0.001, 0.002]}',
         *tiny_flags(**{"train.max_iters": 2, "train.eval_interval": 1, "train.eval_iters": 1})])
    assert code == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damage, says", [
    (lambda t: (t / "study.json").write_text("[]"), "expected a JSON object, got list"),
    (lambda t: (t / "study.json").write_bytes(b"\xff\xfe{"), "study.json: unreadable"),
    (lambda t: (t / "study.json").write_text(json.dumps({**json.loads((t / "study.json").read_text()), "base": 3})),
     "damaged (base.model"),
    (lambda t: (t / "trials.jsonl").write_bytes(b"\x9c\xff garbage\n" + (t / "trials.jsonl").read_bytes()),
     "line 1 is not a JSON object"),
    (lambda t: (t / "trials.jsonl").write_bytes(b'[1]\n' + (t / "trials.jsonl").read_bytes()),
     "line 1 is not a JSON object"),
    (lambda t: (t / "trials.jsonl").open("ab").write(b"\x9c\xff garbage\n\x01 torn"), "line 2 is not a JSON object"),
], ids=["study-list", "study-binary", "study-base-not-mapping", "trials-binary", "trials-not-object", "trials-tail"])
def test_resuming_a_damaged_search(capsys, tmp_path, search, damage, says):
    t = tmp_path / "t"
    shutil.copytree(search, t)
    damage(t)
    before = {p.name: p.read_bytes() for p in t.iterdir() if p.is_file()}
    code, _, err = cli(capsys, "tune", "--out", t, "--resume", "--trials", "2")
    assert_held(code, err, says)
    assert before == {p.name: p.read_bytes() for p in t.iterdir() if p.is_file()}


@pytest.mark.slow
def test_a_damaged_trial_config_is_one_line(capsys, tmp_path, search):
    """best-config.json takes the best trial's model section from its run's config.json: damaged, one line."""
    t = tmp_path / "t"
    shutil.copytree(search, t)
    (t / "trial-000" / "config.json").write_text("[]")
    before = {p: p.read_bytes() for p in t.rglob("*") if p.is_file()}
    code, _, err = cli(capsys, "tune", "--out", t, "--resume", "--trials", "1")
    assert_held(code, err, "trial-000/config.json: not a run's config")
    assert before == {p: p.read_bytes() for p in t.rglob("*") if p.is_file()}
