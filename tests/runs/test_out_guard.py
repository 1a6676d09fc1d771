"""What --out, --force and --output may touch (issue 22.2; runs/guard.py): every --out/--force/--output case of
the reliability sweep (section A) holds: one `error:` line, and nothing that existed changed."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from runs_fixtures import TINY, fx, main, ok, one_error, snapshot, tree  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # builds a classifier and a LoRA run once per session


def refused(capsys, root: Path, *args: object, says: str = "") -> str:
    before = snapshot(root)
    line = one_error(capsys, *args)
    assert says in line, line
    assert snapshot(root) == before, line  # nothing that existed changed, nothing was added
    return line


# ---------------------------------------------------------------- --force never replaces what it did not write
@pytest.mark.parametrize("case", ["P25", "X04", "I35", "M04", "F-keep"])
def test_force_never_replaces_an_unrelated_folder(tree, capsys, case):
    argv = {"P25": ["prepare", tree / "corpus", "--out", tree / "keep", "--tokenizer", "char"],
            "X04": ["export", tree / "run", "--out", tree / "keep"],
            "I35": ["import-hf", tree / "hf", "--out", tree / "keep"],
            "M04": ["merge-lora", tree / "lora", "--out", tree / "keep"],
            "F-keep": ["finetune", "classify", tree / "run", "--train", tree / "cls.csv", "--val", tree / "cls.csv",
                       "--out", tree / "keep", "--max-steps", "1"]}[case]
    refused(capsys, tree, *argv, "--force", says="scratchgpt did not write")


@pytest.mark.parametrize("case", ["P09", "X01", "prepare-over-export", "import-over-data"])
def test_force_never_replaces_another_kind(tree, capsys, case):
    argv = {"P09": ["prepare", tree / "corpus", "--out", tree / "run", "--tokenizer", "char"],
            "X01": ["export", tree / "cls", "--out", tree / "run"],
            "prepare-over-export": ["prepare", tree / "corpus", "--out", tree / "hf", "--tokenizer", "char"],
            "import-over-data": ["import-hf", tree / "hf", "--out", tree / "data"]}[case]
    refused(capsys, tree, *argv, "--force", says="--force replaces only a")


def test_force_never_replaces_a_run_holding_the_users_files(tree, capsys):
    (tree / "run" / "notes.txt").write_text("mine")
    refused(capsys, tree, "train", "--data", tree / "data", "--out", tree / "run", "--force", *TINY,
            says="notes.txt, which scratchgpt did not write")


# ---------------------------------------------------------------- inputs, checkpoints, folders inside runs, links
@pytest.mark.parametrize("case", ["T49", "F13", "T24", "export-into-checkpoint", "prepare-into-data"])
def test_outputs_never_go_inside_a_run_or_a_checkpoint(tree, capsys, case):
    argv = {"T49": ["train", "--data", tree / "data", "--out", tree / "run" / "best", "--force", *TINY],
            "F13": ["finetune", "classify", tree / "run", "--train", tree / "cls.csv", "--val", tree / "cls.csv",
                    "--out", tree / "run" / "best", "--force", "--max-steps", "1"],
            "T24": ["train", "--data", tree / "data", "--out", tree / "run" / "latest" / "nested", *TINY],
            "export-into-checkpoint": ["export", tree / "run", "--out", tree / "cls" / "checkpoints" / "x"],
            "prepare-into-data": ["prepare", tree / "corpus", "--out", tree / "data" / "sub", "--tokenizer", "char"]}
    refused(capsys, tree, *argv[case], says="is inside the")


def test_outputs_never_replace_their_input(tree, capsys):
    (tree / "in").mkdir()
    shutil.copy(tree / "corpus", tree / "in" / "in.txt")
    (tree / "in" / "notes.txt").write_text("precious")
    refused(capsys, tree, "prepare", tree / "in" / "in.txt", "--out", tree / "in", "--force", "--tokenizer", "char",
            says="holds the input")  # P24b
    refused(capsys, tree, "export", tree / "run" / "best", "--out", tree / "run", "--force", says="holds the input")
    refused(capsys, tree, "merge-lora", tree / "lora", "--out", tree / "lora", "--force", says="holds the input")


def test_a_symlink_out_is_refused_and_its_target_kept(tree, capsys):
    (tree / "link").symlink_to("run")  # T23
    refused(capsys, tree, "train", "--data", tree / "data", "--out", tree / "link", "--force", *TINY,
            says="symbolic link")
    refused(capsys, tree, "export", tree / "cls", "--out", tree / "link", "--force", says="symbolic link")
    ok(capsys, "train", "--out", tree / "link", "--resume", "--train.max_iters", "3")  # continuing it replaces nothing
    assert (tree / "link").is_symlink() and json.loads((tree / "run" / "latest" / "state.json").read_text())["step"] == 3


def test_resume_from_a_negative_step_changes_nothing(tree, capsys):
    run = tree / "run"  # T36: state.json's step edited to -5
    for alias in ("latest", "best"):
        state = run / alias / "state.json"
        data = json.loads(state.read_text())
        state.unlink()  # (a hard link into checkpoints/: break it, as an editor would)
        state.write_text(json.dumps(dict(data, step=-5)))
    shutil.rmtree(run / "checkpoints")
    (run / "samples.jsonl").write_text(json.dumps({"step": 1, "prompt": "a", "text": "b"}) + "\n")
    refused(capsys, tree, "train", "--out", run, "--resume", "--train.max_iters", "8", says="state.json")  # (its own hash no longer matches)


# ---------------------------------------------------------------- what --force does replace
def test_force_replaces_what_scratchgpt_wrote_of_the_same_kind(tree, capsys):
    ok(capsys, "prepare", tree / "corpus", "--out", tree / "data", "--force", "--tokenizer", "char")
    ok(capsys, "export", tree / "run", "--out", tree / "hf", "--force")
    ok(capsys, "import-hf", tree / "hf", "--out", tree / "imported")
    ok(capsys, "import-hf", tree / "hf", "--out", tree / "imported", "--force")
    ok(capsys, "merge-lora", tree / "lora", "--out", tree / "merged")
    ok(capsys, "merge-lora", tree / "lora", "--out", tree / "merged", "--force")
    for d in ("data", "hf", "imported", "merged"):
        assert json.loads((tree / d / ".scratchgpt").read_text())["kind"] in ("data", "hf-model", "run")
    assert (tree / "keep" / "notes.txt").read_text() == "precious"


def test_a_run_from_before_the_marker_is_still_a_run(tree, capsys):
    (tree / "run" / ".scratchgpt").unlink()  # written by an earlier version: recognised by its layout
    ok(capsys, "train", "--data", tree / "data", "--out", tree / "run", "--force", *TINY)
    assert (tree / "run" / ".scratchgpt").exists()
    (tree / "keep" / "config.json").write_text(json.dumps({"format_version": 1, "model": {}}))
    refused(capsys, tree, "train", "--data", tree / "data", "--out", tree / "keep", "--force", *TINY,
            says="scratchgpt did not write")  # a config.json alone makes no run


# ---------------------------------------------------------------- --output: a file
def predict(tree: Path, output: Path | str) -> list[str]:
    return ["predict", tree / "cls", "--input", tree / "cls.csv", "--output", output]


@pytest.mark.parametrize("case", ["PR3", "PR4", "PR5", "input"])
def test_output_refusals(tree, capsys, case):
    (tree / "dir.jsonl").mkdir()
    output, says = {"PR3": ("/proc/scratchgpt-test.jsonl", "/proc/scratchgpt-test.jsonl"),
                    "PR4": (tree / "dir.jsonl", "is a directory"),
                    "PR5": (tree / "cls" / "config.json", "is inside the run"),
                    "input": (tree / "cls.csv", "is the input")}[case]
    refused(capsys, tree, *predict(tree, output), says=says)


def test_output_writes_through_a_symlink(tree, capsys):
    (tree / "target.jsonl").write_text("old\n")  # PR7
    (tree / "link.jsonl").symlink_to("target.jsonl")
    ok(capsys, *predict(tree, tree / "link.jsonl"))
    assert (tree / "link.jsonl").is_symlink() and os.readlink(tree / "link.jsonl") == "target.jsonl"
    assert len((tree / "target.jsonl").read_text().splitlines()) == 8


def test_output_writes_into_a_fifo_and_never_replaces_it(tree, capsys):
    fifo = tree / "fifo"  # PR8
    os.mkfifo(fifo)
    refused(capsys, tree, *predict(tree, fifo), says="FIFO that nothing reads")  # no reader: no hang
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    ok(capsys, *predict(tree, fifo))
    reader.join(10)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and got and len(got[0].splitlines()) == 8


@pytest.mark.skipif(not os.access("/dev/full", os.W_OK), reason="no writable /dev/full")
def test_output_to_a_device_is_written_into_not_replaced(tree, capsys):
    before = os.stat("/dev/full")  # DF4: as root the device node itself was replaced
    line = one_error(capsys, *predict(tree, "/dev/full"))
    assert "No space left on device" in line
    after = os.stat("/dev/full")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


# ---------------------------------------------------------------- the umask
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_and_folders_get_the_users_umask(tree, capsys, mask):
    old = os.umask(mask)
    try:
        ok(capsys, "prepare", tree / "corpus", "--out", tree / "d2", "--tokenizer", "char")
        ok(capsys, "export", tree / "run", "--out", tree / "hf2")
        ok(capsys, *predict(tree, tree / "p.jsonl"))
        ok(capsys, "train", "--data", tree / "data", "--out", tree / "r2", *TINY)
    finally:
        os.umask(old)
    for p in [tree / "p.jsonl", tree / "d2", tree / "hf2", tree / "r2", *(tree / "d2").iterdir(),
              *(tree / "hf2").iterdir(), *(tree / "r2").rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


# ---------------------------------------------------------------- the run kind and info
def test_info_and_report_name_the_kind_from_one_vocabulary(fx, capsys):
    from scratchgpt.report import read_run
    from scratchgpt.runs.kind import run_kind

    for name, kind, report_word in (("run", "lm", "pretraining"), ("cls", "classifier", "classifier"),
                                    ("lora", "sft (LoRA adapter)", "sft")):
        capsys.readouterr()
        assert main("info", fx[name]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["kind"] == kind and ".scratchgpt" not in info["files"] and "config.json" in info["files"]
        assert read_run(fx[name])["kind"] == report_word
    assert run_kind({"finetune": {"task": "sft"}}) == "sft" and run_kind({"model": {}}) == "lm"


def test_report_writes_only_into_a_run(tree, capsys):
    for target, says in (("run/best", "is a checkpoint folder, not a run directory: give its run"),
                         ("hf", "is a Hugging Face export"), ("data", "is a data directory")):
        refused(capsys, tree, "report", tree / target, says=says)
