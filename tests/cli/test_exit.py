"""The `scratchgpt` command exits without the interpreter's teardown (cli.exit_fast), but only once everything a
normal exit does that can matter is done: atexit handlers run once, output flushed, other threads finished; and it
never cuts off a profiler, a tracer, or a process group."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO
from scratchgpt.cli import usage

ENV_CODE = f"import sys; sys.path.insert(0, {str(REPO / 'src')!r})\n"


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    # (buffered output, as in a terminal or a pipe: PYTHONUNBUFFERED would hide a missing flush)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, *args, "-c", ENV_CODE + code], capture_output=True, text=True, timeout=120,
                          env=env)


def test_exit_fast_runs_atexit_once_flushes_and_keeps_the_status():
    out = _run("import atexit\n"
               "from scratchgpt.cli import exit_fast\n"
               "atexit.register(lambda: print('bye'))\n"
               "print('unflushed', end='')\n"
               "sys.stderr.write('err')\n"
               "exit_fast(3)\n")
    assert (out.returncode, out.stdout, out.stderr) == (3, "unflushedbye\n", "err")


def test_exit_fast_flushes_what_c_code_printed_and_survives_closed_streams():
    out = _run("import ctypes\n"
               "from scratchgpt.cli import exit_fast\n"
               "ctypes.CDLL(None).printf(b'from C\\n')\n"
               "exit_fast(0)\n")
    assert (out.returncode, out.stdout) == (0, "from C\n")
    # stdout's descriptor closed before Python started (`>&-`): sys.stdout is None, the status is kept
    closed = subprocess.run([sys.executable, "-c", ENV_CODE + "from scratchgpt.cli import exit_fast\nexit_fast(4)\n"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                            preexec_fn=lambda: os.close(1))
    assert (closed.returncode, closed.stderr) == (4, "")


def test_exit_fast_waits_for_other_threads(tmp_path):
    done = tmp_path / "done"
    out = _run("import threading, time, pathlib\n"
               "from scratchgpt.cli import exit_fast\n"
               f"def work(): time.sleep(0.5); pathlib.Path({str(done)!r}).write_text('x')\n"
               "threading.Thread(target=work).start()\n"
               "exit_fast(0)\n")
    assert out.returncode == 0 and done.read_text() == "x"


def test_exit_fast_lets_a_profiler_write_its_file(tmp_path):
    prof = tmp_path / "out.prof"
    code = ENV_CODE + "from scratchgpt.cli import exit_fast\nexit_fast(0)\n"
    script = tmp_path / "prog.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), str(script)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert prof.stat().st_size > 0


def test_the_command_exits_with_its_status_and_all_its_output():
    """`python -m scratchgpt` (the console script's path too): a bad command is status 2 and one line; --help
    prints in full."""
    bad = subprocess.run([sys.executable, "-m", "scratchgpt", "no-such-command"], capture_output=True, text=True,
                         timeout=120, cwd=REPO / "src")
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown command") and bad.stdout == ""
    helped = subprocess.run([sys.executable, "-m", "scratchgpt", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO / "src")
    assert helped.returncode == 0 and helped.stdout == usage() + "\n"
