"""Session fixtures of the harness tests (imported by their modules): local task YAMLs over tiny datasets, a BPE data dir, and tiny runs of
each family `export` writes, trained for a few steps (so their logits mean something)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from conftest import english_text  # noqa: E402

# model options that export as each transformers family (tests/hf/test_hf.py's VARIANTS, one per class)
FAMILIES = {
    "gpt2": {},
    "opt": dict(norm_placement="post"),
    "gpt_neox": dict(pos="rope", bias=False),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4, n_kv_head=2),
    "arcee": dict(pos="rope", norm="rmsnorm", mlp="relu2", bias=False),
    "qwen2": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True),
    "qwen3": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True),
    "gemma": dict(pos="rope", norm="rmsnorm", mlp="geglu_tanh", bias=False, scale_embeddings=True),
    "mistral": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "phi3": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
}
EXPORT_AS = {"mistral": "mistral", "phi3": "phi3"}  # Llama computations that export as these when asked


@pytest.fixture(scope="session")
def harness_tasks(tmp_path_factory) -> Path:
    from local_tasks import write_tasks

    return write_tasks(tmp_path_factory.mktemp("harness"))


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory) -> Path:
    from scratchgpt.data import prepare

    root = tmp_path_factory.mktemp("hdata")
    (root / "corpus.txt").write_text(english_text(60_000), encoding="utf-8")
    prepare(inputs=[str(root / "corpus.txt")], out=root / "bpe", tokenizer="bpe", vocab_size=400, progress=False)
    return root / "bpe"


def train_tiny(data: Path, out: Path, steps: int = 30, **model) -> Path:
    from scratchgpt.model import ModelConfig
    from scratchgpt.optim import OptimConfig
    from scratchgpt.train import TrainConfig, train

    train(data=data, out=out, model=ModelConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=96), **model}),
          train=TrainConfig(batch_size=8, max_iters=steps, eval_interval=steps, eval_iters=1, sample_tokens=0,
                            progress=False, tensorboard=False, plot=False, final_eval=False, report=False,
                            peak_flops=1.0, threads=1, device="cpu", dtype="float32"),
          optim=OptimConfig(warmup_iters=2, lr=3e-3))
    return out


@pytest.fixture(scope="session")
def family_runs(bpe_data, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (run, its `scratchgpt export`)."""
    from scratchgpt.hf import export_checkpoint

    root = tmp_path_factory.mktemp("hruns")
    out = {}
    for name, options in FAMILIES.items():
        run = train_tiny(bpe_data, root / name, **options)
        out[name] = (run, export_checkpoint(run, root / f"{name}-hf", model_type=EXPORT_AS.get(name)))
    return out


@pytest.fixture(scope="session")
def gpt2_run(family_runs) -> tuple[Path, Path]:
    return family_runs["gpt2"]


def hflm(export: Path, dtype: str = "float64", batch_size: int = 4):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(export), dtype=dtype, batch_size=batch_size, device="cpu")


def metrics(lm, tasks, include: Path, **options) -> dict[str, float]:
    """simple_evaluate's figures, {"task/metric,filter": value} (stderrs left out), on the local tasks only."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                  bootstrap_iters=0, log_samples=False, verbosity="ERROR", **options)
    return {f"{task}/{key}": v for task, res in out["results"].items() for key, v in res.items()
            if isinstance(v, (int, float)) and "stderr" not in key}
