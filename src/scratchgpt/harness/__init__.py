"""The field's standard benchmarks on a run: `scratchgpt eval RUN --task harness --tasks hellaswag,arc_easy`.

lm-evaluation-harness (`pip install 'scratchgpt[harness]'`) runs its tasks on the run through `ScratchLM`
(lm.py: scratchgpt's own batched scoring and KV-cache generation, no export to transformers). Every run kind
loads: pretrained, imported, fine-tuned, LoRA (its adapters unmerged), `--quantize bf16|int8|int4`.

Without `--tasks` it runs DEFAULT_TASKS at `--limit` DEFAULT_LIMIT (a CPU scorecard in minutes for a small
model: the zero-shot tasks of the SmolLM2 and nanochat model cards that need no generation). Their datasets
come from the Hugging Face hub, once, into its cache; offline, `--include-path DIR` names task YAMLs over local
copies (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`).

Results print as the harness's table and are kept in RUN/eval-harness.json (RESULT_FILE; quantized:
eval-harness-int8.json beside it), one entry per task, with the harness's version and each task's version,
shots, limit and sample count; a later run of other tasks adds to it. Each task is saved as it finishes, so
Ctrl-C keeps the finished ones. report.html and the model card `export` writes show them (summary_rows).
`python -m scratchgpt.harness` is not a command: the harness's own CLI takes `--model scratchgpt` (lm.py).
"""

from __future__ import annotations

import difflib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .. import UserError
from ..runs.files import eval_file
from ..utils import atomic_write_json, finite_or_null, read_json

DEFAULT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai")
DEFAULT_LIMIT = 500  # examples per task of the default suite
RESULT_FILE = eval_file("harness")  # eval-harness.json
INSTALL = "pip install 'scratchgpt[harness]'"
BOOTSTRAP_ITERS = 1000  # resamples for the stderr of metrics that are not means (perplexities); the harness's 100000 takes minutes


def lm_eval_module():
    """lm_eval, or a one-line error naming the pip command."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401 (fails where lm-eval's own imports do)
    except ImportError:
        raise UserError(f"--task harness needs lm-evaluation-harness: {INSTALL}") from None
    return lm_eval


def harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def task_names(tasks: Optional[str]) -> list[str]:
    """`--tasks a,b` as a list (DEFAULT_TASKS without it)."""
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    return names or list(DEFAULT_TASKS)


def task_manager(names: list[str], include: Optional[str]):
    """The harness's TaskManager for `names`: over --include-path alone when it holds them all (indexing the
    harness's thousands of built-in YAMLs takes seconds), else over both. Unknown names: one line, with the
    closest names it knows."""
    from lm_eval.tasks import TaskManager

    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=include)
    check_tasks(manager, names)
    return manager


def check_tasks(manager, names: list[str]) -> None:
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f" (closest: {', '.join(close)})" if close else " (`lm_eval ls tasks` lists them)"
            raise UserError(f"unknown harness task {name!r}{hint}; local task YAMLs: --include-path DIR")


def _is_offline(e: BaseException) -> bool:
    names = " ".join(t.__name__ for t in type(e).__mro__)
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        w in names for w in ("Offline", "Connection", "Timeout", "HTTPError", "LocalEntryNotFound", "HfHubHTTP"))


def result_path(run: Path, quantize: str) -> Path:
    return Path(run) / eval_file("harness", quantize or "none")


def _merge(saved: dict, out: dict, settings: dict) -> dict:
    """simple_evaluate's output for one task added to the saved results (a task run again replaces its entry)."""
    for key in ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples", "group_subtasks"):
        saved.setdefault(key, {}).update(out.get(key) or {})
    for name in out.get("results") or {}:
        saved.setdefault("settings", {})[name] = settings
    return saved


def evaluate_harness_cli(run: Path, o, *, which: str, base: Optional[Path], quantize: str) -> dict:
    """`scratchgpt eval RUN --task harness [--tasks a,b] ...` (o: EvalOptions): the table printed, RUN's
    eval-harness.json written after each task."""
    lm_eval = lm_eval_module()
    from lm_eval.utils import make_table

    from .lm import ScratchLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    names = task_names(o.tasks)
    limit = o.limit or (DEFAULT_LIMIT if not o.tasks else None)
    include = str(o.include_path) if o.include_path else None
    if include and not Path(include).exists():
        raise UserError(f"--include-path {include}: no such file or directory")
    manager = task_manager(names, include)
    lm = ScratchLM.from_run(run, which, base=base, quantize=quantize, batch_size=o.batch_size)
    lm.fewshot = o.num_fewshot or 0
    path = result_path(run, quantize)
    saved = read_json(path) if path.is_file() else {}
    saved.update(run=str(run), task="harness", harness_version=harness_version(), quantize=quantize or "none")
    done = []
    try:
        for name in names:
            print(f"harness: {name}" + (f" (first {limit} examples)" if limit else ""), file=sys.stderr, flush=True)
            out = _run_task(lm_eval, lm, manager, name, o, limit)
            settings = {"limit": limit, "num_fewshot": o.num_fewshot, "apply_chat_template": o.apply_chat_template,
                        "batch_size": o.batch_size, "which": which, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                           time.gmtime())}
            saved = _merge(saved, out, settings)
            done.append(name)
            if Path(run).is_dir():
                atomic_write_json(path, finite_or_null(saved))
            print(make_table(out), flush=True)
            if out.get("groups"):
                print(make_table(out, "groups"), flush=True)
    except KeyboardInterrupt:
        kept = f"kept {', '.join(done)} in {path}" if done else "no task had finished"
        raise KeyboardInterrupt(kept) from None
    return saved


def _run_task(lm_eval, lm, manager, name: str, o, limit: Optional[int]) -> dict:
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=o.num_fewshot, limit=limit,
                                      apply_chat_template=o.apply_chat_template, task_manager=manager,
                                      bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, verbosity="WARNING")
    except UserError:
        raise
    except Exception as e:  # the datasets' download, a task's own code
        if o.num_fewshot and "Sample larger than population" in str(e):
            raise UserError(f"--num-fewshot {o.num_fewshot}: {name} has fewer examples than that to show") from None
        if _is_offline(e):
            raise UserError(f"could not fetch the dataset of {name} (offline?): run once with network access, or "
                            "pass --include-path DIR with task YAMLs over local copies (dataset_path: json)") from None
        raise UserError(f"harness task {name}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from None
    if out is None:
        raise UserError(f"harness task {name} gave no results")
    return out


def summary_rows(data: dict) -> list[dict[str, Any]]:
    """One row per task and metric of an eval-harness.json: task, metric (with its filter, where not "none"),
    value, stderr, n_shot, samples, version; for the report and the model card."""
    rows = []
    for task, metrics in sorted((data.get("results") or {}).items()):
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            rows.append({"task": task, "metric": metric if flt in ("none", "") else f"{metric} ({flt})",
                         "value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None,
                         "n_shot": (data.get("n-shot") or {}).get(task),
                         "samples": ((data.get("n-samples") or {}).get(task) or {}).get("effective"),
                         "version": (data.get("versions") or {}).get(task)})
    return rows


def read_summary(run: Path) -> tuple[dict, list[dict[str, Any]]]:
    """(RUN's eval-harness.json, its summary_rows); ({}, []) without a readable one."""
    try:
        data = read_json(Path(run) / RESULT_FILE)
    except (OSError, ValueError, UserError):
        return {}, []
    return (data, summary_rows(data)) if isinstance(data, dict) else ({}, [])
