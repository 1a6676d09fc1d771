"""A Hypothesis state machine over a tree of everything a user's disk holds beside scratchgpt's folders (runs, data
dirs, exports, a folder of the user's notes, symlinks to a run and to a file, a FIFO), running random commands
(prepare, train, export, import-hf, merge-lora, predict --output, report, eval) with random --out/--output and --force.

Invariant (issue 22.2): every file outside the command's own output keeps its hash, links stay links, the
FIFO stays a FIFO; an existing folder is replaced only when it held nothing of the user's; every failure is
exactly one `error:` line."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test  # noqa: E402

from runs_fixtures import TINY, fx, main, snapshot  # noqa: E402, F401 (fixture)

pytestmark = pytest.mark.slow

# where a folder output may be asked to go: new paths, every kind of existing folder, paths inside runs and
# checkpoints, a link, a FIFO, a file
FOLDER_OUTS = ["new", "new2/deep", "data", "run", "cls", "hf", "keep", "run/best", "run/latest/nested",
               "cls/checkpoints", "data/sub", "link-run", "fifo", "keep/notes.txt", "run/config.json"]
FILE_OUTS = ["p.jsonl", "run/config.json", "run/p.jsonl", "cls/best/p.jsonl", "link-file", "fifo", "keep/notes.txt",
             "data", "cls.csv", "hf/config.json"]

REPORTED = ["run", "cls", "run/best", "hf", "data", "keep", "link-run", "new"]  # what report and eval are given


class Tree(RuleBasedStateMachine):
    fx: dict[str, Path] = {}
    base: Path = Path()

    @initialize()
    def build(self) -> None:
        self.root = Path(tempfile.mkdtemp(dir=self.base))
        for name, src in self.fx.items():
            if src.is_dir():
                shutil.copytree(src, self.root / name, symlinks=True)
            else:
                shutil.copy2(src, self.root / name)
        (self.root / "keep").mkdir()
        (self.root / "keep" / "notes.txt").write_text("precious")
        (self.root / "target.txt").write_text("the link's target")
        (self.root / "link-run").symlink_to("run")
        (self.root / "link-file").symlink_to("target.txt")
        os.mkfifo(self.root / "fifo")

    def teardown(self) -> None:
        shutil.rmtree(getattr(self, "root", self.base / "none"), ignore_errors=True)

    def command(self, args: list, out: str, folder: bool, also: tuple[str, ...] = ()) -> None:
        """Run one command, then check the invariant against the tree before it (`also`: more files it writes)."""
        before = snapshot(self.root)
        code = main(*args)
        assert code in (0, 1), args
        mine = {out, *also}
        if not folder:  # a file output given through a link (to it or to its folder) is written at the target
            mine |= {os.path.relpath(os.path.realpath(self.root / m), self.root) for m in mine}
        after = snapshot(self.root)
        for key, value in before.items():
            if any(key == m or key.startswith(m + "/") for m in mine):
                continue
            assert after.get(key) == value, (args, key)  # outside the output: unchanged, not removed
        added = [k for k in after if k not in before and not any(k == m or k.startswith(m + "/") or m.startswith(k + "/")
                                                                 for m in mine)]  # (or a new parent of the output)
        assert not added, (args, added)
        if code == 0 and folder and out in before:
            inside = [k for k in before if k.startswith(out + "/")]
            assert before[out] == "dir" and not any(k.endswith("notes.txt") for k in inside), (args, inside)

    @rule(out=st.sampled_from(FOLDER_OUTS), force=st.booleans())
    def prepare(self, out: str, force: bool) -> None:
        self.command(["prepare", self.root / "corpus", "--out", self.root / out, "--tokenizer", "char",
                      *(["--force"] if force else [])], out, folder=True)

    @rule(out=st.sampled_from(FOLDER_OUTS), force=st.booleans())
    def train(self, out: str, force: bool) -> None:
        self.command(["train", "--data", self.root / "data", "--out", self.root / out, *TINY,
                      *(["--force"] if force else [])], out, folder=True)

    @rule(src=st.sampled_from(["run", "cls"]), out=st.sampled_from(FOLDER_OUTS), force=st.booleans())
    def export(self, src: str, out: str, force: bool) -> None:
        self.command(["export", self.root / src, "--out", self.root / out, *(["--force"] if force else [])],
                     out, folder=True)

    @rule(out=st.sampled_from(FOLDER_OUTS), force=st.booleans())
    def import_hf(self, out: str, force: bool) -> None:
        self.command(["import-hf", self.root / "hf", "--out", self.root / out, *(["--force"] if force else [])],
                     out, folder=True)

    @rule(out=st.sampled_from(FOLDER_OUTS), force=st.booleans())
    def merge_lora(self, out: str, force: bool) -> None:
        self.command(["merge-lora", self.root / "lora", "--out", self.root / out, *(["--force"] if force else [])],
                     out, folder=True)

    @rule(run=st.sampled_from(REPORTED))
    def report(self, run: str) -> None:
        self.command(["report", self.root / run], f"{run}/report.html", folder=False)

    @rule(run=st.sampled_from(REPORTED))
    def eval(self, run: str) -> None:
        self.command(["eval", self.root / run], f"{run}/eval-lm.json", folder=False,
                     also=(f"{run}/eval.json",))

    @rule(output=st.sampled_from(FILE_OUTS))
    def predict(self, output: str) -> None:
        self.command(["predict", self.root / "cls", "--input", self.root / "cls.csv", "--output", self.root / output],
                     output, folder=False)


def test_no_command_changes_what_is_not_its_output(fx, tmp_path, capsys):  # noqa: F811
    Tree.fx, Tree.base = dict(fx), tmp_path
    run_state_machine_as_test(Tree, settings=settings(max_examples=20, stateful_step_count=6, deadline=None,
                                                      suppress_health_check=list(HealthCheck)))
