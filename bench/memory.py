"""Peak memory and start-up time of the commands that load a real model, each in a fresh process.

    python bench/memory.py                 # the released SmolLM2-135M-Instruct (tests/real_model.py fetches it)
    python bench/memory.py --hf-dir DIR    # any transformers folder import-hf takes

Runs `scratchgpt import-hf`, `scratchgpt sample --max-new-tokens 1` and `scratchgpt serve` (until /health answers,
one chat completion, then SIGTERM) as child processes and reads each one's peak resident set size from
os.wait4 (the kernel's ru_maxrss of that child alone). The goal (issue 24): each peak below 1.5x the size of
the model's fp32 weights (each row says x_weights and below_goal; tests/hf/test_real_memory.py checks
import-hf's). Time to first token (goal: within 2 s): a fresh `scratchgpt sample --stream` process, from spawn
to its first generated character on stdout, the least of --first-token-runs; beside it the cost of
`import torch` and of the CLI's imports alone, and two floors: what torch, tokenizers and the weights in use
hold with no scratchgpt code (and with fastapi and uvicorn imported, serve's). Prints one JSON object (sizes
in MB = 1e6 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "TOKENIZERS_PARALLELISM": "false"}
CLI = [sys.executable, "-m", "scratchgpt"]


def _peak_mb(proc: subprocess.Popen) -> tuple[int, float, float]:
    """(exit status, peak RSS in MB, CPU seconds) of a child, reaped here."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # (Linux: ru_maxrss is in KiB)
    return proc.returncode, usage.ru_maxrss * 1024 / 1e6, usage.ru_utime + usage.ru_stime


def measure(args: list[str]) -> dict:
    """Run one command; its peak RSS, wall time and CPU time (user + system: what a loaded machine distorts less)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    code, peak, cpu = _peak_mb(proc)
    if code != 0:
        raise SystemExit(f"scratchgpt {' '.join(args)} failed ({code}):\n{err.decode()[-2000:]}")
    return {"peak_rss_mb": round(peak), "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu, 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_serve(run: Path) -> dict:
    """`scratchgpt serve RUN`: start, wait for /health, one chat completion of 8 tokens, SIGTERM; its peak RSS."""
    port = _free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(CLI + ["serve", str(run), "--port", str(port), "--device", "cpu"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 300:
                    raise SystemExit("serve did not come up")
                time.sleep(0.2)
        ready = time.perf_counter() - t0
        body = json.dumps({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8, "temperature": 0})
        req = urllib.request.Request(url + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=120).read()
    finally:
        proc.send_signal(signal.SIGTERM)
    code, peak, cpu = _peak_mb(proc)
    return {"peak_rss_mb": round(peak), "ready_s": round(ready, 2), "cpu_s": round(cpu, 2), "exit": code}


def first_token(run: Path) -> dict:
    """Seconds from spawning `scratchgpt sample --stream` to its first generated character on stdout."""
    prompt = "The capital of France is"
    t0 = time.perf_counter()
    proc = subprocess.Popen(CLI + ["sample", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens",
                                   "8", "--stream", "--device", "cpu"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    seen = b""
    while len(seen) <= len(prompt.encode()):
        byte = proc.stdout.read(1)
        if not byte:
            break
        seen += byte
    ttft = time.perf_counter() - t0
    proc.stdout.read()
    _peak_mb(proc)
    return {"time_to_first_token_s": round(ttft, 2)}


def import_cost(code: str) -> dict:
    """Wall and CPU seconds and peak RSS of `python -c CODE` (what imports alone cost)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    code, peak, cpu = _peak_mb(proc)
    if code != 0:
        raise SystemExit(f"python -c failed ({code}):\n{err.decode()[-2000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(peak)}


def floor(run: Path, serve: bool) -> dict:
    """Peak of tests/real_model.py's floor_code for the run's checkpoint: what torch, tokenizers and the weights in
    use hold with no scratchgpt code (for serve, with fastapi and uvicorn too)."""
    sys.path.insert(0, str(REPO / "tests"))
    from real_model import floor_code

    ckpt = run / "best" if (run / "best").is_dir() else run / "latest" if (run / "latest").is_dir() else run
    return import_cost(floor_code(ckpt, serve))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", type=Path, help="a transformers folder (default: the real SmolLM2-135M-Instruct)")
    p.add_argument("--keep", type=Path, help="write the imported run here (default: a temporary folder)")
    p.add_argument("--run", type=Path, help="measure this imported run (skips import-hf)")
    p.add_argument("--first-token-runs", type=int, default=1,
                   help="fresh processes timed to their first token (min and median; a busy machine scatters them)")
    a = p.parse_args()
    if a.hf_dir is None:
        sys.path.insert(0, str(REPO / "tests"))
        from real_model import real_model_folder

        a.hf_dir = real_model_folder()
    weights = sum(f.stat().st_size for f in a.hf_dir.glob("*.safetensors"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    run = a.keep or tmp / "run"
    try:
        result = {"hf_dir": a.hf_dir.name, "weights_mb": round(weights / 1e6), "limit_mb": round(1.5 * weights / 1e6),
                  "import torch": import_cost("import torch"),
                  "import torch, scratchgpt.chat": import_cost("import torch, scratchgpt.chat")}
        if a.run is None:
            result["import-hf"] = measure(["import-hf", str(a.hf_dir), "--out", str(run), "--force"])
        else:
            run = a.run
        result["sample (1 token)"] = measure(["sample", str(run), "--prompt", "Hi", "--max-new-tokens", "1",
                                              "--device", "cpu"])
        result["serve"] = measure_serve(run)
        times = [first_token(run)["time_to_first_token_s"] for _ in range(max(1, a.first_token_runs))]
        result["floor: torch + tokenizers + weights"] = floor(run, serve=False)
        result["floor: the same + fastapi, uvicorn"] = floor(run, serve=True)
        result["time_to_first_token_s"] = min(times)
        if len(times) > 1:
            result["time_to_first_token_median_s"] = round(statistics.median(times), 2)
        for key in ("import-hf", "sample (1 token)", "serve", "floor: torch + tokenizers + weights",
                    "floor: the same + fastapi, uvicorn"):  # each against the goal
            if key in result:
                peak = result[key]["peak_rss_mb"]
                result[key].update(x_weights=round(peak / result["weights_mb"], 2),
                                   below_goal=peak < result["limit_mb"])
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
