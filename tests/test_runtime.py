"""Where the work runs: the device picker (GPU counts simulated), the MFU peak (datasheet table,
measured and cached), and the CPU paths chosen by measurement at start (Muon's Newton-Schulz dtype)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from scratchgpt import UserError
from scratchgpt import muon as muon_module
from scratchgpt import runtime
from scratchgpt.runtime import Peak, peak_flops, pick_device, pick_dtype, table_peak


# ---------------------------------------------------------------- the device picker
@pytest.fixture
def gpus(monkeypatch):
    """A machine with `n` CUDA GPUs, as far as pick_device can tell, and torchrun's LOCAL_* variables."""

    def machine(n: int, local_rank: int | None = None, local_world: int | None = None) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        for key, value in (("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", local_world)):
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, str(value))

    return machine


def test_auto_takes_this_ranks_gpu(gpus):
    gpus(2)
    assert pick_device("auto") == torch.device("cuda", 0)
    gpus(2, local_rank=1, local_world=2)
    assert pick_device("auto") == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda", 1)
    assert pick_device("cpu") == torch.device("cpu")  # gloo runs stay on the CPU where CUDA exists
    gpus(0)
    assert pick_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("local_rank", [0, 1])  # every rank refuses, not only the ones without a GPU
def test_more_ranks_than_gpus_is_one_line_naming_both_and_the_fix(gpus, local_rank):
    gpus(1, local_rank=local_rank, local_world=2)
    with pytest.raises(UserError) as e:
        pick_device("auto")
    msg = str(e.value)
    assert "\n" not in msg and "2 ranks" in msg and "1 GPU" in msg
    assert "--nproc_per_node 1" in msg and "--train.device cpu" in msg


def test_bad_explicit_devices(gpus):
    gpus(2)
    with pytest.raises(UserError, match=r"2 GPU\(s\) \(cuda:0 \.\. cuda:1\)"):
        pick_device("cuda:2")
    gpus(0)
    with pytest.raises(UserError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(UserError, match="--device 'gpu'"):
        pick_device("gpu")
    gpus(2, local_rank=1, local_world=2)  # torchrun: cuda:0 on every rank would put both on one GPU
    with pytest.raises(UserError, match=r"--device cuda:0 under torchrun: each rank takes its own GPU; pass "
                                        r"--train.device cuda"):
        pick_device("cuda:0")
    gpus(2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)  # one process may take any GPU


def test_auto_dtype_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    """Emulated bf16 (V100, T4: torch's default answer counts emulation) gets fp16 + GradScaler instead."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert pick_dtype("auto", torch.device("cuda", 0)) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert pick_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32


def test_tf32_is_read_through_the_current_api():
    """torch >= 2.9 raises on the legacy allow_tf32 once the new API is used (transformers' tf32=True uses it)."""
    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = "tf32", "none"
        assert runtime.tf32_matmuls()  # inherited from the global setting
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert not runtime.tf32_matmuls() and table_peak("NVIDIA H100 PCIe", torch.float32).flops == 51e12
        runtime.configure_device(torch.device("cuda", 0))  # sets flags only: runs without a GPU
        assert runtime.tf32_matmuls() and table_peak("NVIDIA H100 PCIe", torch.float32).flops == 378e12
    finally:
        (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
         torch.backends.cudnn.conv.fp32_precision) = saved


def test_train_under_torchrun_with_too_few_gpus_errors_before_joining(gpus, monkeypatch, tmp_path, char_data, capsys):
    """The whole path a user takes: `torchrun --nproc_per_node 2 -m scratchgpt train` on a one-GPU machine."""
    import torch.distributed as tdist

    from scratchgpt.cli import main

    gpus(1, local_rank=1, local_world=2)
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    joined = []
    monkeypatch.setattr(tdist, "init_process_group", lambda *a, **k: joined.append(a))
    assert main(["train", "--data", str(char_data), "--out", str(tmp_path / "r"), "--train.max_iters=1",
                 "--optim.warmup_iters=0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 2 ranks on this node but only 1 GPU(s)") and not joined


def test_gloo_where_cuda_exists_when_the_device_is_cpu(gpus, monkeypatch):
    import torch.distributed as tdist

    from scratchgpt import distributed
    from scratchgpt.train import TrainConfig

    gpus(1, local_rank=1, local_world=2)
    for key, value in {"RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    backends = []
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **k: backends.append(backend))
    ctx = distributed.setup(TrainConfig(device="cpu"))
    assert backends == ["gloo"] and ctx.device == torch.device("cpu") and ctx.parallel == "ddp"


# ---------------------------------------------------------------- the MFU peak
@pytest.mark.parametrize("name, dtype, tf32, tflops, entry", [
    ("NVIDIA H200", torch.bfloat16, True, 989.5, "H200 SXM bfloat16"),
    ("NVIDIA H200 NVL", torch.bfloat16, True, 835.5, "H200 NVL bfloat16"),
    ("NVIDIA GH200 480GB", torch.bfloat16, True, 989.5, "GH200 bfloat16"),  # not the H200 its name contains
    ("NVIDIA H100 80GB HBM3", torch.float16, True, 989.5, "H100 SXM float16"),
    ("NVIDIA H100 PCIe", torch.bfloat16, True, 756.5, "H100 PCIe bfloat16"),
    ("NVIDIA A100-SXM4-80GB", torch.float32, True, 156.0, "A100 tf32"),
    ("NVIDIA A100-SXM4-80GB", torch.float32, False, 19.5, "A100 float32"),
    ("NVIDIA A10", torch.bfloat16, True, 125.0, "A10 bfloat16"),  # not the A100
    ("NVIDIA L4", torch.bfloat16, True, 121.0, "L4 bfloat16"),
    ("NVIDIA L40S", torch.bfloat16, True, 362.05, "L40S bfloat16"),  # not the L4
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, True, 165.2, "RTX 4090 bfloat16"),
    ("Tesla V100-SXM2-16GB", torch.float16, True, 125.0, "V100 SXM2 float16"),
])
def test_datasheet_peaks(name, dtype, tf32, tflops, entry):
    # set and restored by hand: the cuBLAS module's attributes are not plain ones (monkeypatch may delattr them)
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        peak = table_peak(name, dtype)
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    assert peak.flops == pytest.approx(tflops * 1e12) and peak.source == f"table: {entry} dense"


def test_unknown_gpu_or_emulated_dtype_has_no_table_entry():
    assert table_peak("NVIDIA Imaginary X1", torch.bfloat16) is None
    assert table_peak("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bf16 units: measure instead


def test_measured_peak_is_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "_MEASURED", {})
    calls = []
    monkeypatch.setattr(runtime, "measure_peak_flops", lambda device, dtype: calls.append(dtype) or 4.2e11)
    cpu = torch.device("cpu")
    first = peak_flops(cpu, torch.float32)
    assert first.flops == 4.2e11 and first.source.startswith("measured: float32 matmul") and calls == [torch.float32]
    monkeypatch.setattr(runtime, "_MEASURED", {})  # a new process: the figure comes from the cache file
    assert peak_flops(cpu, torch.float32).flops == 4.2e11 and len(calls) == 1
    stored = json.loads((tmp_path / "peak_flops.json").read_text())
    assert list(stored.values()) == [4.2e11] and "float32" in next(iter(stored))
    peak_flops(cpu, torch.bfloat16)  # another dtype is another figure
    assert calls == [torch.float32, torch.bfloat16]
    assert peak_flops(cpu, torch.float32, given=1e12) == Peak(1e12, "train.peak_flops")


def test_a_peak_measured_under_load_rises_when_a_run_beats_it(monkeypatch, tmp_path):
    """The cached peak only rises: a run faster than it measures again (once) and the higher figure is kept."""
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "_MEASURED", {})
    rates = iter([1e11, 4e11, 2e11])  # measured busy, then quiet, then busy again
    monkeypatch.setattr(runtime, "robust_peak_flops", lambda device, dtype: next(rates))
    cpu = torch.device("cpu")
    peak = peak_flops(cpu, torch.float32)
    assert peak.flops == 1e11
    assert peak.mfu(5e10) == 0.5 and peak.flops == 1e11  # below the peak: nothing measured
    assert peak.mfu(2e11) == 0.5 and peak.flops == 4e11  # above it: measured again, the higher figure kept
    monkeypatch.setattr(runtime, "_MEASURED", {})
    again = peak_flops(cpu, torch.float32)
    assert again.flops == 4e11  # cached
    assert again.mfu(5e11) == 1.0 and again.flops == 4e11  # a busy re-measurement never lowers it
    stored = json.loads((tmp_path / "peak_flops.json").read_text())
    assert list(stored.values()) == [4e11]


def test_robust_peak_counts_one_thread_times_the_threads(monkeypatch):
    """One busy core slows a 2-thread matmul to its slower thread; one thread times two says what 2 cores do."""
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "measure_peak_flops",
                        lambda device, dtype: {1: 3e10}.get(torch.get_num_threads(), 2e10))
    try:
        torch.set_num_threads(2)
        assert runtime.robust_peak_flops(torch.device("cpu"), torch.float32) == 6e10
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_measure_peak_flops_runs_a_real_matmul():
    flops = runtime.measure_peak_flops(torch.device("cpu"), torch.float32, n=128, budget_s=0.01)
    assert 1e8 < flops < 1e14


def test_mfu_is_never_above_one(capsys):
    peak = Peak(1e12, "measured: test")
    assert peak.mfu(5e11) == 0.5
    assert peak.mfu(2e12) == 1.0 and peak.mfu(3e12) == 1.0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "--train.peak_flops" in err  # said once


def test_cpu_topology_is_a_sane_count():
    import os

    cores, cpus = runtime.cpu_topology()
    assert 1 <= cores <= cpus <= (os.cpu_count() or 1)


@pytest.mark.parametrize("times, chosen", [({1: 1.0, 2: 0.6}, 2), ({1: 1.0, 2: 1.0}, 1), ({1: 1.0, 2: 1.8}, 1)])
def test_hyperthreads_are_used_only_when_measured_faster(monkeypatch, tmp_path, times, chosen):
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "_THREADS", {})
    monkeypatch.setattr(runtime, "cpu_topology", lambda: (1, 2))  # one core, two hyperthreads
    calls = []
    monkeypatch.setattr(runtime, "time_matmul_threads", lambda counts: calls.append(counts) or dict(times))
    assert runtime.default_threads() == chosen and calls == [(1, 2)]
    assert runtime.default_threads() == chosen and len(calls) == 1  # once per process
    monkeypatch.setattr(runtime, "_THREADS", {})  # a new process, on a busy machine: the cached count
    monkeypatch.setattr(runtime, "time_matmul_threads", lambda counts: calls.append(counts) or {1: 1.0, 2: 9.0}
                        if chosen == 2 else {1: 9.0, 2: 1.0})
    assert runtime.default_threads() == chosen and len(calls) == 1
    monkeypatch.setattr(runtime, "cpu_topology", lambda: (2, 2))  # no SMT: nothing to measure
    assert runtime.default_threads() == 2 and len(calls) == 1


def test_machine_choices_are_measured_once_under_a_lock(monkeypatch, tmp_path):
    """Runs started together: one measures, the others wait for its answer and read it."""
    import threading

    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path))
    calls, results = [], []

    def measure():
        calls.append(1)
        time.sleep(0.05)
        return {"choice": len(calls)}

    workers = [threading.Thread(target=lambda: results.append(runtime.machine_choice("x", measure)[0]["choice"]))
               for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert calls == [1] and results == [1, 1, 1]
    record, source = runtime.machine_choice("x", measure, refresh=lambda old: {"choice": old["choice"] + 1})
    assert record == {"choice": 2} and source.startswith("measured")
    assert runtime.machine_choice("x", measure)[0] == {"choice": 2}


def test_thread_timing_restores_the_thread_count():
    before = torch.get_num_threads()
    times = runtime.time_matmul_threads((1, 2), n=64, rounds=1)
    assert set(times) == {1, 2} and all(t > 0 for t in times.values()) and torch.get_num_threads() == before
