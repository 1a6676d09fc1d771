"""Multi-process training on CPU (gloo, via torchrun): DDP and FSDP2 match one process with gradient
accumulation over the same global batch, checkpoints move between world sizes and layouts, and a
rank that dies ends the job (or, under --max-restarts, the job resumes from its last checkpoint).

Every run is the same 10-step job on a 2-layer, 32-dim model with global batch 8 (micro-batches
of 2: 4 accumulation steps in one process, 2 per rank in 2 processes, so DDP's no_sync and
FSDP2's deferred reduce-scatter are both exercised). Runs are shared by the tests (module
fixtures). Starting a worker costs ~6 s of imports (torch, and torch._dynamo, which torch.optim
pulls in), so most launches use torchrun's agent in-process with workers forked from a server
that imported torch once; the failure test runs the real `torchrun` command line.

The model has no biases: the key bias of attention has an identically zero true gradient
(softmax ignores a constant added to every score), so its gradient is pure rounding noise that
Adam normalises into full-size updates; any two summation orders then disagree on it by ~1e-4
relative, which says nothing about the distributed code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocesses, signals, torchrun or many fuzz examples

STEPS, SAVE_AT = 10, 5
FLAGS = {
    "config": "{}",  # the config classes' defaults, not the built-in recipe that `train` uses without --config
    "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 16, "model.bias": "false",
    "train.batch_size": 8, "train.micro_batch_size": 2, "train.max_iters": STEPS, "train.eval_interval": SAVE_AT,
    "train.eval_iters": 1, "train.log_interval": 1, "train.keep_last": 5, "train.threads": 1,
    "train.peak_flops": 1e15,  # skip the matmul benchmark
    "train.device": "cpu", "train.dtype": "float32",  # gloo on CPUs, even where CUDA is present (test_gpu.py: nccl)
    "train.sample_tokens": 0, "train.progress": "false", "train.tensorboard": "false", "train.plot": "false",
    "train.final_eval": "false", "optim.warmup_iters": 2, "optim.lr": 3e-3,
}
ENV = {"OMP_NUM_THREADS": "1", "SCRATCHGPT_DIST_TIMEOUT": "30", "TOKENIZERS_PARALLELISM": "false"}


def flags(**extra) -> list[str]:
    return [f"--{k}={v}" for k, v in {**FLAGS, **extra}.items()]


def torchrun(*args: str, nproc: int = 2, max_restarts: int = 0, env: dict | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m scratchgpt train ARGS` (torchrun is torch.distributed.run)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.1", "-m", "scratchgpt", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, **(env or {})})


def elastic(*args: str, nproc: int = 2, max_restarts: int = 0, env: dict | None = None, worker=None) -> dict:
    """`scratchgpt train ARGS` under torchrun's own agent (`elastic_launch`, what the torchrun CLI calls),
    run from this process. Workers fork from a server that imports torch once for the whole file,
    instead of every worker of every launch paying ~6 s for it. Raises ChildFailedError on failure."""
    import multiprocessing
    import signal
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    multiprocessing.set_forkserver_preload([__name__, "scratchgpt.cli", "scratchgpt.train", "torch._dynamo",
                                            "torch.distributed.checkpoint", "torch.distributed.fsdp"])
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=uuid.uuid4().hex, max_restarts=max_restarts,
                          monitor_interval=0.1, start_method="forkserver")  # = torchrun --standalone
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return elastic_launch(config, worker or _elastic_worker)(list(args), {**ENV, **(env or {})})
    finally:
        for sig, handler in handlers.items():  # the agent installs its own; give pytest its back
            signal.signal(sig, handler)


def _elastic_worker(args: list, env: dict) -> int:
    os.environ.update(env)  # forked from the server: the environment is the server's, not this test's
    from scratchgpt.cli import main

    code = main(["train", *args])
    if code:
        raise SystemExit(code)
    return code


def _weights_worker(args: list, env: dict) -> int:
    """_elastic_worker that also saves every rank's final weights as RUN/rank-R.safetensors (only rank 0 saves
    checkpoints: this shows what the other ranks hold)."""
    from safetensors.torch import save_file

    import scratchgpt.train as train_module

    finish = train_module.finish

    def finish_and_dump(s, stop_reason):
        save_file({k: v.detach().clone().contiguous() for k, v in s.net.state_dict().items()},
                  str(s.out / f"rank-{s.ctx.rank}.safetensors"))
        return finish(s, stop_reason)

    train_module.finish = finish_and_dump
    return _elastic_worker(args, env)


def single(*args: str) -> None:
    """One process, in this interpreter (torch is already imported: saves seconds per run)."""
    from scratchgpt.cli import main

    assert main(["train", *args]) == 0


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if r.get("train_loss") is not None}  # a restart's rows win


def weights(run: Path, which: str = "latest") -> dict[str, torch.Tensor]:
    return load_file(str(run / which / "model.safetensors"))


def loss_error(a: Path, b: Path, steps) -> float:
    la, lb = losses(a), losses(b)
    return max(abs(la[s] - lb[s]) / abs(lb[s]) for s in steps)


def weight_error(a: dict, b: dict) -> float:
    """Largest per-tensor relative difference ||a - b|| / ||b||."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in b)


def seeded_run(src: Path, step: int, dst: Path) -> Path:
    """A run dir whose latest checkpoint is `src`'s at `step` (as if it had stopped there)."""
    dst.mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step-{step:07d}", dst / "latest")
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A char-level data dir written directly (train.bin, val.bin, tokenizer.json, meta.json)."""
    from pydoc_data.topics import topics

    from scratchgpt.tokenizer import train_char_tokenizer

    text = "\n\n".join(topics[k] for k in sorted(topics))[:40_000]
    tok = train_char_tokenizer([text])
    ids = tok.encode_array(text).astype(np.uint16)
    d = tmp_path_factory.mktemp("dist_data")
    split = len(ids) * 9 // 10
    ids[:split].tofile(d / "train.bin")
    ids[split:].tofile(d / "val.bin")
    tok.save(d)
    (d / "meta.json").write_text(json.dumps({"format_version": 1, "tokenizer": "char", "vocab_size": tok.vocab_size,
                                             "dtype": "uint16", "train_tokens": split, "val_tokens": len(ids) - split}))
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> Path:
    return tmp_path_factory.mktemp("dist_runs")


@pytest.fixture(scope="module")
def reference(runs, data) -> Path:
    """One process, 4 accumulation micro-steps per optimizer step: the run everything is compared with."""
    single(f"--data={data}", f"--out={runs / 'single'}", *flags())
    return runs / "single"


@pytest.fixture(scope="module")
def ddp(runs, data, reference) -> Path:
    elastic(f"--data={data}", f"--out={runs / 'ddp'}", *flags())  # train.parallel none: DDP under torchrun
    return runs / "ddp"


@pytest.fixture(scope="module")
def fsdp(runs, data, reference) -> Path:
    elastic(f"--data={data}", f"--out={runs / 'fsdp'}", *flags(**{"train.parallel": "fsdp"}))
    return runs / "fsdp"


def test_ddp_matches_single_process_accumulation(reference, ddp):
    assert loss_error(ddp, reference, range(1, STEPS + 1)) < 1e-6
    assert weight_error(weights(ddp), weights(reference)) < 1e-6
    state = json.loads((ddp / "latest" / "state.json").read_text())
    assert state["data"]["world_size"] == 2 and state["data"]["global_batch_size"] == 8
    assert [r["rows"] for r in state["data"]["ranks"]] == [[0, 4], [4, 8]]  # disjoint slices of the global batch
    assert "optimizer.safetensors" in os.listdir(ddp / "latest")  # the single-process layout


def test_fsdp2_matches_single_process_accumulation(reference, fsdp):
    assert loss_error(fsdp, reference, range(1, STEPS + 1)) < 1e-5
    assert weight_error(weights(fsdp), weights(reference)) < 1e-5
    shards = sorted(os.listdir(fsdp / "latest" / "sharded"))
    assert len(shards) == 2 and all(s.endswith(".safetensors") for s in shards)  # one per rank, no pickle


def test_fsdp_export_serves_sample_eval_and_single_process_resume(runs, data, reference, fsdp):
    from conftest import load_lm

    model, tokenizer, _ = load_lm(fsdp, which="latest")  # what `sample` and `eval` load
    assert model(torch.tensor([tokenizer.encode("the ")])).shape[-1] == tokenizer.vocab_size
    # one process picks up FSDP's step-5 checkpoint: weights from the export, optimizer from the shards
    run = seeded_run(fsdp, SAVE_AT, runs / "fsdp_to_single")
    single(f"--out={run}", "--resume")
    assert loss_error(run, reference, range(SAVE_AT + 1, STEPS + 1)) < 1e-5
    assert weight_error(weights(run), weights(reference)) < 1e-5


def test_ddp_checkpoint_resumes_in_one_process(runs, reference, ddp):
    run = seeded_run(ddp, SAVE_AT, runs / "ddp_to_single")
    single(f"--out={run}", "--resume")
    for other in (ddp, reference):  # continues as the uninterrupted DDP run, and as the single-process one
        assert loss_error(run, other, range(SAVE_AT + 1, STEPS + 1)) < 1e-6
        assert weight_error(weights(run), weights(other)) < 1e-6


def test_rank_failure_ends_the_job_and_names_the_rank(runs, data):
    start = time.monotonic()
    proc = torchrun(f"--data={data}", f"--out={runs / 'fault'}", *flags(),
                    env={"SCRATCHGPT_FAULT_RANK": "1", "SCRATCHGPT_FAULT_STEP": "7"}, timeout=90)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    root_cause = proc.stderr.split("Root Cause (first observed failure)")[-1]  # torchrun's failure summary
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause), proc.stderr[-3000:]
    assert "rank 1: injected fault at step 7" in proc.stderr


def test_single_process_checkpoint_resumes_under_ddp_and_survives_a_restart(runs, data, reference):
    """One launch shows two things: a single-process checkpoint continues under DDP, and with
    --max-restarts 1 a rank dying at step 7 costs only a restart from the step-5 checkpoint."""
    run = seeded_run(reference, SAVE_AT, runs / "single_to_ddp")
    elastic(f"--data={data}", f"--out={run}", "--resume", *flags(), max_restarts=1,
            env={"SCRATCHGPT_FAULT_RANK": "1", "SCRATCHGPT_FAULT_STEP": "7"})
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    # attempt 1 died before step 8; attempt 2 went back to step 5 and cut the log back to it: no repeated rows
    assert logged == [6, 7, 8, 9, 10]
    assert json.loads((run / "result.json").read_text())["step"] == STEPS
    assert loss_error(run, reference, range(SAVE_AT + 1, STEPS + 1)) < 1e-6
    assert weight_error(weights(run), weights(reference)) < 1e-6


def test_ranks_take_rank_0s_newton_schulz_and_training_dtypes(runs, data):
    """Rank 1's own measurements would say bf16 (test hooks) for Newton-Schulz and for training on the CPU, rank
    0's fp32: every rank runs fp32, rank 0's choices, recorded in config.json, and the ranks end with the same
    weights."""
    out, muon = runs / "disagree", {"optim.optimizer": "muon", "train.max_iters": 4, "train.eval_interval": 4}
    elastic(f"--data={data}", f"--out={out}", *flags(**muon, **{"train.dtype": "auto"}),
            env={"SCRATCHGPT_TEST_NS_DTYPE": "0:float32,1:bfloat16", "SCRATCHGPT_TEST_CPU_DTYPE": "0:float32,1:bfloat16"},
            worker=_weights_worker)
    single(f"--data={data}", f"--out={runs / 'muon_single'}", *flags(**muon, **{"optim.ns_dtype": "float32"}))
    assert weight_error(weights(out), weights(runs / "muon_single")) < 1e-5  # Muon under DDP: as AdamW
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["ns_dtype"] == "float32" and config["train"]["dtype"] == "float32"
    rank0, rank1 = load_file(str(out / "rank-0.safetensors")), load_file(str(out / "rank-1.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = weights(out)
    assert all(torch.equal(rank0[k], saved[k]) for k in saved)  # what rank 0 saved
