"""Memory in proportion to the model (issue 24): `import-hf` of the real SmolLM2-135M peaks below 1.5x its fp32
weights, in a fresh process; `sample` and `chat` stay within a fixed share of what torch, tokenizers and the weights
alone hold (bench/memory.py measures serve too; BENCHMARKS.md has the figures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from real_model import floor_code

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(900)]

SRC = Path(__file__).resolve().parents[2] / "src"


# the command, run as `python -m scratchgpt` runs it, saying its own peak (VmHWM: this process's memory alone; the
# child's ru_maxrss would also count the copy of this big test process it was forked from)
PEAK = """
import atexit, sys
from scratchgpt.cli import main
atexit.register(lambda: sys.stderr.write(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))))
sys.exit(main(sys.argv[1:]))
"""


def peak_rss_bytes(argv: list[str], stdin: str = "", code: str = PEAK) -> int:
    """Peak resident set size of the scratchgpt command ARGV (or of `code`) in a fresh process."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, input=stdin, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stderr.rsplit("VmHWM:", 1)[1].split()[0]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's /proc")
def test_import_hf_holds_the_weights_less_than_once(real_hf_dir, tmp_path):
    weights = sum(f.stat().st_size for f in real_hf_dir.glob("*.safetensors"))
    peak = peak_rss_bytes(["import-hf", str(real_hf_dir), "--out", str(tmp_path / "run")])
    # (streamed: torch, the tokenizer and the largest tensor; measured 495 MB for 538 MB of weights)
    assert peak < 1.5 * weights, f"import-hf peaked at {peak / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's /proc")
def test_sample_and_chat_hold_little_beyond_the_libraries(real_run):
    """scratchgpt's own share of a fresh `sample` and `chat` (its modules and CLI, its side of the tokenizer, the
    UTF-8 guard, the code a forward runs): measured 56 and 58 MB on the Intel Xeon; a second `tokenizers` object
    for chat templates' special tokens (chat's before 3713ba2) was 25 MB more."""
    floor = peak_rss_bytes([], code=floor_code(real_run / "best"))
    sample = peak_rss_bytes(["sample", str(real_run), "--prompt", "Hi", "--max-new-tokens", "1"])
    chat = peak_rss_bytes(["chat", str(real_run), "--max-new-tokens", "4", "--temperature", "0"],
                          stdin="What is the capital of France?\n")
    for name, peak in (("sample", sample), ("chat", chat)):
        assert peak - floor < 72e6, f"{name} peaked at {peak / 1e6:.0f} MB, {(peak - floor) / 1e6:.0f} MB over the " \
                                    f"libraries' {floor / 1e6:.0f} MB"
