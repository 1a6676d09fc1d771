"""Faults of the machine (issue 22, reliability sweep B/D): a full disk, a file size limit, a read-only folder
or an impossible path give one `error:` line, and what existed (earlier checkpoints, report.html, an export's
destination) stays as it was; a killed save (of latest/, best/, loss.png) is repaired by the next resume,
which starts from the newest intact checkpoint wherever it is."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli, load_lm, tiny_flags
from scratchgpt.checkpoint import checkpoint_candidates, find_resumable, remove_stale_temps, repair_aliases
from scratchgpt.utils import atomic_write_json

pytestmark = pytest.mark.slow  # trains, or drives the CLI in a subprocess


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(code: int, err: str, *needles: str) -> str:
    """Exactly one `error:` line, no traceback; returns it."""
    assert code == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def step_of(ckpt: Path) -> int:
    return json.loads((ckpt / "state.json").read_text())["step"]


@pytest.fixture
def run10(tmp_path, char_data, capsys) -> Path:
    """A 10-step run with checkpoints at 5 and 10 (val loss falls: step 10 is best)."""
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", run,
                       *tiny_flags(**{"train.max_iters": 10, "train.eval_interval": 5, "train.threads": 1}))
    assert code == 0, err
    assert step_of(run / "best") == 10 and step_of(run / "latest") == 10
    return run


# ---------------------------------------------------------------- impossible and read-only outputs, full stdout
def test_impossible_outputs_give_one_line(tmp_path, char_data, tiny_run, capsys):
    code, _, err = cli(capsys, "train", "--data", char_data, "--out", "/proc/scratchgpt-test/run", *tiny_flags())
    one_error(code, err, "/proc/scratchgpt-test", "No such file or directory")
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK):
        code, _, err = cli(capsys, "train", "--data", char_data, "--out", "/sys/scratchgpt-test", *tiny_flags())
        one_error(code, err, "/sys/scratchgpt-test")
    for args in (("export", tiny_run, "--out", "/proc/scratchgpt-test/hf"),
                 ("prepare", char_data / "meta.json", "--out", "/proc/scratchgpt-test/d", "--tokenizer", "char")):
        code, _, err = cli(capsys, *args)
        one_error(code, err, "/proc/scratchgpt-test")


class FullStdout:
    """A stdout on a full disk (like `> /dev/full`): every write fails with ENOSPC."""

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        pass

    def fileno(self):
        raise OSError(errno.EBADF, "no fileno")


def test_stdout_on_a_full_disk_is_one_line(tiny_run, capsys, monkeypatch):
    for args in (("eval", tiny_run), ("sample", tiny_run, "--max-new-tokens", "5")):
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdout", FullStdout())
        from scratchgpt.cli import main

        code = main([str(a) for a in args])
        monkeypatch.undo()
        one_error(code, capsys.readouterr().err, "standard output: No space left on device")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_appended_rows_name_their_file_on_a_full_disk():
    from scratchgpt.faults import one_line
    from scratchgpt.runs.rows import append_row

    with pytest.raises(OSError) as e:  # (metrics.jsonl is appended to every step: often the first write to fail)
        append_row("/dev/full", {"step": 1})
    assert one_line(e.value) == "/dev/full: No space left on device"


# One process drives every command under a file size limit and (where it can) without root's DAC override,
# so torch is imported once. Each case: (argv, what the error line says).
DRIVER = r"""
import json, os, resource, sys
from scratchgpt.cli import main
cases = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
for argv in cases:
    sys.stderr.write("@@case\n")
    sys.stderr.write(f"@@code {main(argv)}\n")
"""


def drive(cases: list[list[str]], fsize: int, drop_root: bool) -> list[tuple[int, str]]:
    cmd = [sys.executable, "-c", DRIVER, json.dumps([[str(a) for a in c] for c in cases]), str(fsize)]
    if drop_root:
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = []
    for chunk in proc.stderr.split("@@case\n")[1:]:
        err, _, code = chunk.rpartition("@@code ")
        out.append((int(code), err))
    assert len(out) == len(cases), proc.stderr[-3000:]
    return out


def test_full_disk_and_read_only_folders_keep_what_existed(tmp_path, tiny_run, char_data, capsys):
    code, _, err = cli(capsys, "export", tiny_run, "--out", tmp_path / "hf")
    assert code == 0, err
    resumed, reported, frozen, ro = tmp_path / "resumed", tmp_path / "reported", tmp_path / "frozen", tmp_path / "ro"
    for copy in (resumed, reported, frozen):
        shutil.copytree(tiny_run, copy)
    (reported / "report.html").write_text("the old report")
    ro.mkdir()
    before = {copy: hashes(copy) for copy in (resumed, reported, frozen)}
    cases = [(["train", "--out", resumed, "--resume", "--train.max_iters", "4", "--train.eval_interval", "2"],
              ["model.safetensors", "File too large"]),
             (["export", tiny_run, "--out", tmp_path / "exported"], ["exported", "File too large"]),
             (["import-hf", tmp_path / "hf", "--out", tmp_path / "imported"], ["model.safetensors", "File too large"]),
             (["report", reported], [f"{reported / 'report.html'}: File too large"])]
    read_only = not (os.geteuid() == 0 and shutil.which("setpriv") is None)  # root needs setpriv to lose DAC override
    if read_only:
        cases += [(["train", "--data", char_data, "--out", ro / "run", *tiny_flags()], [f"{ro / 'run'}: Permission denied"]),
                  (["train", "--out", frozen, "--resume", "--train.max_iters", "4"], [str(frozen), "Permission denied"])]
    writable = [ro, frozen, *frozen.rglob("*")]
    for p in writable:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        results = drive([argv for argv, _ in cases], fsize=4096, drop_root=read_only and os.geteuid() == 0)
    finally:
        for p in writable:
            p.chmod(p.stat().st_mode | 0o200)
    for (code, err), (_, needles) in zip(results, cases):
        one_error(code, err, *needles)
    assert hashes(reported) == before[reported] and hashes(frozen) == before[frozen]
    after = hashes(resumed)  # every checkpoint the resume started from is intact
    assert {k: v for k, v in after.items() if "/" in k} == {k: v for k, v in before[resumed].items() if "/" in k}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written export or import


# ---------------------------------------------------------------- killed saves, repaired by the next resume
def test_resume_takes_the_newest_intact_checkpoint_wherever_it_is(run10, capsys):
    # a kill during the swap of latest/ at step 10: checkpoints/step-0000010 is complete, latest/ still step 5
    shutil.rmtree(run10 / "latest")
    shutil.copytree(run10 / "checkpoints" / "step-0000005", run10 / "latest")
    candidates = checkpoint_candidates(run10)
    assert [c.name for c in candidates] == ["step-0000010", "latest", "step-0000005"]
    code, _, err = cli(capsys, "train", "--out", run10, "--resume")
    assert code == 0, err
    assert "at step 10" in err and step_of(run10 / "latest") == 10
    (run10 / "latest" / "state.json").unlink()
    os.mkfifo(run10 / "latest" / "state.json")  # read, it would block for ever: skipped, named
    warnings = []
    ckpt, state = find_resumable(run10, log=warnings.append)
    assert ckpt.name == "step-0000010" and state["step"] == 10
    assert len(warnings) == 1 and "latest/state.json" in warnings[0] and "not a regular file" in warnings[0]


def test_a_kill_during_the_best_swap_is_repaired_by_resume(run10, capsys):
    # killed between the two renames of best/'s swap at the last evaluation: best/ is step 5's, moved aside
    old_best = run10 / ".best.old"
    shutil.rmtree(run10 / "best")
    shutil.copytree(run10 / "checkpoints" / "step-0000005", old_best)
    (run10 / "result.json").unlink()
    code, _, err = cli(capsys, "train", "--out", run10, "--resume", "--train.final_eval", "true")
    assert code == 0, err
    assert "best/ was at step 5 after an interrupted save: it is now step-0000010" in err
    assert step_of(run10 / "best") == 10 and not old_best.exists()
    result = json.loads((run10 / "result.json").read_text())
    best_state = json.loads((run10 / "best" / "state.json").read_text())
    assert result["best_val_loss"] == best_state["best_val_loss"] and result["final_eval_checkpoint"] == "latest"
    assert (run10 / "best" / "model.safetensors").samefile(run10 / "checkpoints/step-0000010/model.safetensors")
    assert load_lm(run10)[0].cfg == load_lm(run10 / "checkpoints/step-0000010")[0].cfg  # what sample loads


KILL_IN_BEST_SWAP = """
import os, signal, sys
from pathlib import Path
import scratchgpt.checkpoint.store as store
real = store.replace_dir
def replace_then_die(tmp, final):
    if Path(final).name == "best" and (Path(final).parent / "checkpoints" / "step-0000010").exists():
        os.kill(os.getpid(), signal.SIGKILL)  # step 10 is saved and latest/ swapped; best/ is still step 5's
    return real(tmp, final)
store.replace_dir = replace_then_die
from scratchgpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_real_kill_in_the_last_best_swap_is_repaired(tmp_path, char_data, capsys):
    """The sweep's case, with a real SIGKILL: best/ at the older step, result.json absent; after --resume,
    best/ is step 10's, and result.json's best loss is best/'s."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_BEST_SWAP, "train", "--data", char_data, "--out", run,
                           *tiny_flags(**{"train.max_iters": 10, "train.eval_interval": 5, "train.threads": 1})],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert step_of(run / "latest") == 10 and step_of(run / "best") == 5 and not (run / "result.json").exists()
    code, _, err = cli(capsys, "train", "--out", run, "--resume")
    assert code == 0, err
    assert "best/ was at step 5 after an interrupted save: it is now step-0000010" in err
    result = json.loads((run / "result.json").read_text())
    assert step_of(run / "best") == 10 and not [p for p in run.iterdir() if p.name.startswith((".tmp", ".best"))]
    assert result["best_val_loss"] == json.loads((run / "best" / "state.json").read_text())["best_val_loss"]


def test_repair_leaves_agreeing_aliases_and_legacy_checkpoints_alone(run10):
    assert json.loads((run10 / "checkpoints/step-0000010/state.json").read_text())["aliases"] == ["latest", "best"]
    assert repair_aliases(run10) == []
    state_path = run10 / "checkpoints" / "step-0000010" / "state.json"
    state = json.loads(state_path.read_text())
    del state["aliases"]  # written before aliases were recorded: nothing says best/ should move
    state_path.unlink()  # (a hard link shared with latest/ and best/)
    atomic_write_json(state_path, state)
    shutil.rmtree(run10 / "best")
    shutil.copytree(run10 / "checkpoints" / "step-0000005", run10 / "best")
    assert repair_aliases(run10) == [] and step_of(run10 / "best") == 5


def test_temp_files_of_killed_writes_are_removed(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step-0000007").mkdir(parents=True)
    litter = [run / ".loss.png.k2x9ab_z.tmp", run / ".config.json.abcdefgh.tmp", run / ".result.json.01234567.tmp"]
    keep = [run / "notes.tmp", run / ".hidden.tmp", run / "loss.png"]
    for p in litter + keep:
        p.write_bytes(b"half")
    removed = remove_stale_temps(run)
    assert not any(p.exists() for p in litter) and all(p.exists() for p in keep)
    assert set(litter) <= set(removed) and not (run / "checkpoints" / ".tmp-step-0000007").exists()
