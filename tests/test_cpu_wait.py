"""cpu_wait: the OpenMP spin follows the load at start, never overrides the user, and never changes numbers."""

import os
import subprocess
import sys
import time

import pytest

from scratchgpt import cpu_wait


@pytest.fixture
def before_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh `scratchgpt train`, before the first import


def test_a_quiet_machine_gets_the_short_spin(before_torch, monkeypatch):
    monkeypatch.setattr(cpu_wait, "other_cores_in_use", lambda sample_s=0: 0.1)
    env = {}
    assert "spin 10000" in cpu_wait.choose(env)
    assert env == {"GOMP_SPINCOUNT": str(cpu_wait.QUIET_SPIN)}


def test_a_busy_machine_gets_the_shorter_spin(before_torch, monkeypatch):
    monkeypatch.setattr(cpu_wait, "other_cores_in_use", lambda sample_s=0: 1.0)
    env = {}
    assert "1.0 other cores busy" in cpu_wait.choose(env)
    assert env == {"GOMP_SPINCOUNT": str(cpu_wait.BUSY_SPIN)}


@pytest.mark.parametrize("name", ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"])
def test_what_the_user_set_is_kept(before_torch, name):
    env = {name: "7"}
    assert "environment" in cpu_wait.choose(env)
    assert env == {name: "7"}


def test_nothing_is_set_once_torch_is_loaded():
    env = {}
    assert cpu_wait.choose(env) == "" and env == {}


def test_a_cpu_bound_process_is_seen():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        seen = max(cpu_wait.other_cores_in_use(0.2) or 0 for _ in range(2))
    finally:
        hog.kill()
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat: the load is unknown off Linux")
    assert seen >= cpu_wait.BUSY_CORES


@pytest.mark.slow
def test_the_spin_changes_no_number(tmp_path, char_data):
    """Two processes of the same run, one spinning long and one not at all, log the same losses."""
    import json

    from conftest import tiny_flags

    flags = tiny_flags(**{"train.max_iters": 8, "train.eval_interval": 8, "train.log_interval": 1, "train.threads": 2})
    runs = {}
    for spin in ("0", "300000"):
        out = tmp_path / spin
        env = {**os.environ, "GOMP_SPINCOUNT": spin, "SCRATCHGPT_CACHE_DIR": str(tmp_path / "cache")}
        done = subprocess.run([sys.executable, "-m", "scratchgpt", "train", "--data", str(char_data), "--out", str(out),
                               *map(str, flags)], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "idle threads wait as the environment says" in done.stderr
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[spin] = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(runs["0"]) == 8 and runs["0"] == runs["300000"]


def test_the_load_is_read_before_the_early_hash_starts(monkeypatch):
    """sample's early sha256 runs on a thread of its own: started first, it would read as another process's load."""
    from scratchgpt import cli

    class Stop(Exception):
        pass

    calls = []
    monkeypatch.setattr(cpu_wait, "choose", lambda: calls.append("load"))

    def hash_early(rest):
        calls.append("hash")
        raise Stop

    monkeypatch.setattr(cli, "_hash_weights_early", hash_early)
    with pytest.raises(Stop):
        cli.main(["sample", "RUN"])
    assert calls == ["load", "hash"]
