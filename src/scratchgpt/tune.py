"""Hyperparameter search (`scratchgpt tune`): grid, random or Bayesian (TPE), with Optuna.

Every trial is a real, short training run in OUT/trial-NNN, scored by its validation loss:
the full-split loss of its best checkpoint when `train.final_eval` is on (the default), else the
best periodic estimate. Lower is better.

Pruning (`--pruner`, default median): each periodic evaluation's val loss goes to Optuna's
pruner through train()'s `on_eval` callback; a trial whose loss is worse than the median of
earlier complete trials at the same step (`median`: from the 2nd-5th complete trial on, never
in a trial's first quarter of train.max_iters), or that doesn't make its successive-halving
rung (`halving`), stops there and is recorded as pruned. A trial's last evaluation is never
pruned (it is done by then).

Search space: a mapping from dotted config keys to choices or ranges (YAML or JSON):

    optim.lr: {low: 1e-4, high: 1e-2, log: true}   # a range: float, or int when low/high are ints
    model.n_embd: [32, 64]                        # choices
    model.n_layer: {low: 2, high: 6, step: 2}     # int range with a step
    optim: {weight_decay: [0.0, 0.1]}             # a section may also be nested

Grid search takes every combination (ranges need a step, or to be ints).

Files in OUT (JSON only; the Optuna study lives in memory and is rebuilt from trials.jsonl):

    study.json        method, seed, space, pruner and base config: what `--resume` must match
    trials.jsonl      one line per trial: params, val loss, each evaluation, wall time, status
                      (complete, pruned, failed, or interrupted)
    best.json         the best trial so far: params, val loss and its full resolved config
    best-config.json  that config alone, for `scratchgpt train --config`
    search.png        the optimization history, every trial's val curve, parameter importances
    trial-NNN/        each trial's run directory, with its training log in train.log

Trials are numbered from 0 everywhere: trial-000 is trials.jsonl's "trial": 0 and Optuna's trial 0.

Resuming replays the recorded trials (and their evaluations, for the pruner) through the same
seeded sampler without training, so the search goes on exactly as if it had never stopped. The
first Ctrl-C or SIGTERM lets the running trial save a checkpoint and records it as interrupted;
`--resume` continues that trial's training from its checkpoint (bit-exactly), then the search.
A trial cut short by a crash runs again from its start.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from . import UserError
from .checkpoint.load import checkpoint_config
from .checks import check_range
from .model import ModelConfig
from .optim import OptimConfig
from .runtime import INTERRUPTED, Interrupted, stop_on_signals
from .runs.files import (CONFIG_FILE, SEARCH_BEST_CONFIG_FILE, SEARCH_BEST_FILE, SEARCH_PLOT_FILE, STUDY_FILE,
                         TRIAL_LOG_FILE, TRIALS_FILE)
from .runs.guard import check_placement, write_marker
from .runs.rows import append_row, drop_torn_tail, read_rows, write_rows
from .train_plan import TrainConfig
from .tune_plot import PRUNED, draw_search
from .tune_space import METHODS, SECTIONS, Method, apply_params, grid_size, grid_values, load_section, load_space
from .utils import atomic_write_json, json_text, read_json

Pruner = Literal["none", "median", "halving"]
PRUNERS = ("none", "median", "halving")
FORMAT_VERSION = 1


# ---------------------------------------------------------------- the search
class _TrialFailed(Exception):
    """A trial whose training failed (bad combination, NaN loss, out of memory): recorded, not fatal."""


def _sampler(method: str, space: dict[str, dict], seed: int, startup: int):
    import optuna

    if method == "grid":
        return optuna.samplers.GridSampler({k: grid_values(k, p) for k, p in space.items()}, seed=seed)
    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def _pruner(settings: dict):
    """Optuna's pruner for the saved settings (None: never prune)."""
    import optuna

    name = settings.get("pruner", "none")  # searches saved before pruners existed had none
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings["pruner_startup_trials"],
                                           n_warmup_steps=settings["pruner_warmup_steps"])
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _report_eval(trial, step: int, val_loss: float, max_iters: int) -> bool:
    """Give the pruner one evaluation; True when the trial should stop (never at its last step)."""
    trial.report(val_loss, step)
    return step < max_iters and trial.should_prune()


def _suggest(trial, method: str, space: dict[str, dict]) -> dict[str, Any]:
    params = {}
    for key, p in space.items():
        if method == "grid" or "choices" in p:
            params[key] = trial.suggest_categorical(key, grid_values(key, p) if method == "grid" else p["choices"])
        elif p["type"] == "int":
            params[key] = trial.suggest_int(key, p["low"], p["high"], step=p["step"] or 1, log=p["log"])
        else:
            params[key] = trial.suggest_float(key, p["low"], p["high"], step=p["step"], log=p["log"])
    return params


def check_base(base: dict, meta: dict, data: Path, space: Mapping[str, Any]) -> None:
    """The checks `train` makes across options and data (warmup within the schedule, context within the data, the
    batch split), made on the base config before the first trial. A failure that names a searched key is left to
    the trials (some of them may pass); any other would fail every trial alike, so it is said now, once."""
    from .train_plan import check_relations

    try:
        check_relations(base["model"], base["train"], base["optim"], 1, meta, data)
    except UserError as e:
        if not any(f"--{key} " in f"{e} " for key in space):
            raise UserError(f"the base config, which every trial starts from: {e}") from None


def _check_same(what: str, given: Any, saved: Any) -> None:
    if given is not None and given != saved:
        raise UserError(f"--resume: {what} differs from the saved search ({saved!r} there, {given!r} now); "
                        "use another --out, or --force to start over")


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _read_study(path: Path) -> dict:
    """study.json of the search being resumed: a damaged one is a one-line error, not a KeyError later."""
    try:
        saved = read_json(path)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise UserError(f"{path}: unreadable ({' '.join(str(e).split())[:120]}); --force starts the search over") \
            from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(saved).__name__}; --force starts the search over")
    if saved.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported format {str(saved.get('format_version'))[:40]!r}")
    base = saved.get("base")
    missing = [k for k in ("space", "method", "seed", "data", "base") if k not in saved] + \
        [f"base.{n}" for n in SECTIONS if not (isinstance(base, dict) and isinstance(base.get(n), dict))]
    if missing or not isinstance(saved["space"], dict):
        raise UserError(f"{path}: damaged ({', '.join(missing) or 'space'} missing or not a mapping); --force starts "
                        "the search over")
    return saved


def _read_trials(path: Path) -> list[dict]:
    records = read_rows(path, strict=True)  # damage refused before the file changes
    for i, r in enumerate(records):
        if r.get("trial") != i:
            raise UserError(f"{path}: expected trial {i} on line {i + 1}, found {r.get('trial')!r}")
    if drop_torn_tail(path):  # a line torn by a crash mid-write: that trial runs again
        _note(f"{path}: dropping an incomplete last line")
    return records


def _fmt(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def tune(
    space: Union[str, os.PathLike, Mapping, None] = None,
    out: Union[str, os.PathLike] = "runs/tune",
    *,
    data: Optional[Union[str, os.PathLike]] = None,
    method: Optional[Method] = None,
    trials: int = 20,
    model: Optional[ModelConfig] = None,
    train: Optional[TrainConfig] = None,
    optim: Optional[OptimConfig] = None,
    seed: Optional[int] = None,
    resume: bool = False,
    force: bool = False,
    given: Optional[set[str]] = None,
    pruner: Optional[Pruner] = None,
) -> dict:
    """Run (or continue) a search; returns best.json's content.

    A Ctrl-C or SIGTERM records the running trial as interrupted and raises runtime.Interrupted
    (`resume` continues). With `resume`, the saved space, method, seed and base config are used;
    any given here must match them: the base-config keys named in `given`, or, without `given`,
    every field of a section passed in.

    Args:
        space: YAML/JSON file or inline mapping, e.g. '{"optim.lr": {"low": 1e-4, "high": 1e-2, "log": true},
            "model.n_embd": [32, 64]}'
        out: search directory
        data: prepared data dir (default: the embedded corpus)
        method: grid, random, or bayes (TPE; the default)
        trials: total trials, counting those already done on --resume
        model: the base config of every trial (with train and optim)
        seed: seeds the sampler (default 0); trials train with --train.seed
        resume: continue the search in --out with its saved settings
        force: replace a search that is already in --out
        given: the dotted base-config keys the user set (e.g. "train.max_iters")
        pruner: stop bad trials at an evaluation: median (the default: worse than the median of earlier trials at
            that step), halving (successive halving) or none
    """
    from .train import train as run_training

    out = Path(out)
    _check_request(out, data, trials, seed, method, pruner, resume, force)
    if force and not resume:
        _clear(out)
    passed = {"model": model, "train": train, "optim": optim}
    if resume:
        settings, base = _resumed_settings(out / STUDY_FILE, space, method, seed, pruner, data, passed, given)
    else:
        settings, base = _new_settings(space, method, seed, pruner, data, passed, given, trials)
    trials = _fit_grid(settings, trials)
    records = _start(out, settings, resume, trials)
    _optimize(out, records, settings, base, trials, run_training)
    best = _write_best(out, records, settings)
    if best is None:
        first = next((r.get("error") for r in records if r.get("error")), "unknown error")
        raise UserError(f"no trial finished: {first} (logs in {out}/trial-*/train.log)")
    return best


def _check_request(out: Path, data, trials: int, seed: Optional[int], method: Optional[str],
                   pruner: Optional[str], resume: bool, force: bool) -> None:
    """The checks of tune's arguments before anything is read: --out's kind and state, the ranges and the names."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: give a new directory name")
    check_placement(out, "search", [Path(data)] if data is not None else [])
    if out.is_dir() and any(out.iterdir()) and not ((out / STUDY_FILE).exists() or (out / TRIALS_FILE).exists()):
        raise UserError(f"--out {out} already holds other files (not a search): give a new directory name")
    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    if seed is not None:
        check_range("--seed", seed, "[0, 4294967295]")  # Optuna's samplers take 32-bit seeds
    if method is not None and method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if pruner is not None and pruner not in PRUNERS:
        raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    study_file, trials_file = out / STUDY_FILE, out / TRIALS_FILE
    exists = study_file.exists() or trials_file.exists()
    if exists and not (resume or force):
        raise UserError(f"{out} already holds a search: pass --resume to continue it or --force to replace it")
    if resume and not study_file.exists():
        raise UserError(f"{out}: nothing to resume (no study.json)")


def _fit_grid(settings: dict, trials: int) -> int:
    """The number of trials to run: a grid has no more than its combinations."""
    if settings["method"] == "grid":
        size = grid_size(settings["space"])
        if trials > size:
            _note(f"the grid has {size} combinations: running {size} trials, not {trials}")
            return size
    return trials


def _start(out: Path, settings: dict, resume: bool, trials: int) -> list[dict]:
    """The search directory made (study.json written for a new search); the trials recorded so far."""
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "search")
    if not resume:
        atomic_write_json(out / STUDY_FILE, settings)
    records = _read_trials(out / TRIALS_FILE)
    if len(records) >= trials and records[-1]["status"] != INTERRUPTED:
        _note(f"{out} already has {len(records)} trials (--trials {trials}); nothing to run")
    return records


def _resumed_settings(study_file: Path, space, method, seed, pruner, data, passed: dict,
                      given: Optional[set[str]]) -> tuple[dict, dict]:
    """--resume: the saved settings and base config, after checking that what was given here matches them."""
    saved = _read_study(study_file)
    if space is not None:
        _check_same("the search space", load_space(space), saved["space"])
    _check_same("--method", method, saved["method"])
    _check_same("--seed", seed, saved["seed"])
    _check_same("--pruner", pruner, saved.get("pruner", "none"))
    _check_same("--data", str(data) if data is not None else None, saved["data"])
    base = {name: load_section(cls, saved["base"][name]) for name, cls in SECTIONS.items()}
    for name in SECTIONS:
        if passed[name] is None:
            continue
        for key, value in asdict(passed[name]).items():
            if given is None or f"{name}.{key}" in given:
                # (against the loaded base: an option newer than the study has its default there)
                _check_same(f"{name}.{key}", _plain(value), _plain(getattr(base[name], key)))
    return saved, base


def _new_settings(space, method, seed, pruner, data, passed: dict, given: Optional[set[str]],
                  trials: int) -> tuple[dict, dict]:
    """A new search's settings (study.json) and base config, checked against the data before any trial."""
    from .data import default_data_dir, load_meta
    from .train_plan import fit_warmup

    if space is None:
        raise UserError("--space is required: a YAML/JSON file or inline mapping of config keys to search")
    data_path = Path(data) if data is not None else default_data_dir()
    meta = load_meta(data_path)  # a bad data dir fails now, not once per trial
    base = {"model": passed["model"] or ModelConfig(), "train": passed["train"] or TrainConfig(),
            "optim": passed["optim"] or OptimConfig()}
    space_d = load_space(space)
    # as `train` does: a warmup the user did not set shrinks to fit a short schedule (with a note)
    base["optim"] = fit_warmup(base["optim"], base["train"], None if given is None else dict.fromkeys(given))
    check_base(base, meta, data_path, space_d)  # and so does a base config every trial would fail on
    settings = {"format_version": FORMAT_VERSION, "method": method or "bayes", "seed": 0 if seed is None else seed,
                "space": space_d, "data": str(data_path),
                "base": {name: asdict(cfg) for name, cfg in base.items()}}
    # fixed once: a different number of TPE's random start-up trials would change every later trial
    settings["startup_trials"] = max(1, min(10, trials // 3))
    # the median pruner waits for this many complete trials, and prunes no trial in its first quarter
    # (early losses are close together and noisy)
    settings.update(pruner=pruner or "median", pruner_startup_trials=max(2, min(5, trials // 4)),
                    pruner_warmup_steps=base["train"].max_iters // 4)
    return settings, base


def _optimize(out: Path, records: list[dict], settings: dict, base: dict, trials: int, run_training) -> None:
    """Run Optuna's study over the trials (recorded ones replayed); what was done is recorded and drawn even
    after an interrupt."""
    import optuna

    space_n, method_n = settings["space"], settings["method"]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own one line per trial replaces Optuna's log
    study = optuna.create_study(direction="minimize", pruner=_pruner(settings),
                                sampler=_sampler(method_n, space_n, settings["seed"], settings["startup_trials"]))
    with stop_on_signals() as signals:
        objective = _objective(out, records, settings, base, trials, run_training, signals)
        try:
            study.optimize(objective, n_trials=max(trials, len(records)), catch=(_TrialFailed,))
        finally:  # also after an interrupt: what was done so far is recorded and drawn
            optuna.logging.set_verbosity(verbosity)
            _write_best(out, records, settings)
            draw_search(out / SEARCH_PLOT_FILE, records, study)


def _objective(out: Path, records: list[dict], settings: dict, base: dict, trials: int, run_training, signals):
    """Optuna's objective: replay a recorded trial, continue an interrupted one, or train a new one; each
    outcome is recorded in trials.jsonl before Optuna hears of it."""
    trials_file, space_n, method_n = out / TRIALS_FILE, settings["space"], settings["method"]

    def objective(trial) -> float:
        n = trial.number
        params = _suggest(trial, method_n, space_n)
        earlier = None
        if n < len(records):  # replay: same sampler, same seed, so the same params come out
            rec = records[n]
            if rec["params"] != params:
                raise UserError(f"{trials_file}: trial {n} has params {rec['params']}, but the sampler now proposes "
                                f"{params} (another Optuna version?); continue in a new --out")
            max_iters = apply_params(base, params)[1].max_iters
            for step, loss in rec.get("evals", []):  # the pruner sees what it saw the first time
                _report_eval(trial, step, loss, max_iters)
            if rec["status"] != INTERRUPTED:
                return _outcome(rec)
            earlier = rec  # its training continues from its checkpoint
        if signals.requested:  # a Ctrl-C between trials: start no new one
            raise Interrupted(f"the search stopped before trial-{n:03d}; --resume continues it")
        record = _run_trial(n, params, out, settings, base, run_training, trials, trial, earlier)
        if earlier is None:
            append_row(trials_file, record, durable=True)  # a finished trial is never lost to a crash
            records.append(record)
        else:
            records[n] = record
            write_rows(trials_file, records)
        _write_best(out, records, settings)
        if record["status"] == INTERRUPTED:
            raise Interrupted(f"trial-{n:03d} saved a checkpoint at step {record['step']} and is recorded as "
                              f"interrupted; --resume continues it")
        return _outcome(record)

    return objective


def _outcome(record: dict) -> float:
    """What Optuna is told about a finished trial: its value, or that it was pruned or failed."""
    import optuna

    if record["status"] == PRUNED:
        raise optuna.TrialPruned(f"pruned at step {record['step']}")
    if record["status"] != "complete":
        raise _TrialFailed(record.get("error", "failed"))
    return record["val_loss"]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _clear(out: Path) -> None:
    """--force: remove only what a search writes, never unrelated files that share the directory."""
    for name in (STUDY_FILE, TRIALS_FILE, SEARCH_BEST_FILE, SEARCH_BEST_CONFIG_FILE, SEARCH_PLOT_FILE):
        (out / name).unlink(missing_ok=True)
    for d in out.glob("trial-[0-9][0-9][0-9]*"):
        if d.is_dir():
            shutil.rmtree(d)


def _run_trial(n: int, params: dict, out: Path, settings: dict, base: dict, run_training, total: int, trial,
               earlier: Optional[dict] = None) -> dict:
    """Train trial n (or continue an interrupted one, `earlier`), its evaluations feeding the pruner."""
    run_dir = out / f"trial-{n:03d}"
    record: dict[str, Any] = {"trial": n, "run": run_dir.name, "params": params}
    evals: list[list] = [list(e) for e in earlier["evals"]] if earlier else []
    if run_dir.exists() and earlier is None:
        shutil.rmtree(run_dir)  # left by a crashed attempt at this trial
    t0 = time.perf_counter()
    try:
        model, train_cfg, optim = apply_params(base, params)
        train_cfg = replace(train_cfg, report=False)  # the search has its own picture, search.png

        def on_eval(step: int, val_loss: float) -> Optional[str]:
            evals.append([step, val_loss])
            return PRUNED if _report_eval(trial, step, val_loss, train_cfg.max_iters) else None

        run_dir.mkdir(parents=True, exist_ok=True)
        # each trial's training output goes to its own log, so the terminal shows one line per trial
        with open(run_dir / TRIAL_LOG_FILE, "a", encoding="utf-8") as log, contextlib.redirect_stderr(log):
            result = run_training(data=Path(settings["data"]), out=run_dir, model=model, train=train_cfg, optim=optim,
                                  resume=earlier is not None, on_eval=on_eval)
        record.update(step=result.get("step"), stop_reason=result.get("stop_reason"))
        if result["stop_reason"] in (PRUNED, INTERRUPTED):
            record.update(status=result["stop_reason"], val_loss=evals[-1][1] if evals else None)
        else:
            value = result.get("final_val_loss")
            if value is None:
                value = result.get("best_val_loss")
            if value is None or not math.isfinite(value):
                raise UserError(f"no validation loss (step {result.get('step')}): raise train.max_iters or lower "
                                "train.eval_interval")
            record.update(status="complete", val_loss=value, best_val_loss=result.get("best_val_loss"),
                          final_val_loss=result.get("final_val_loss"))
    except (UserError, ValueError, MemoryError) as e:  # this combination failed; the search goes on
        record.update(status="failed", val_loss=None, error=str(e).splitlines()[0] if str(e) else type(e).__name__)
    except RuntimeError as e:
        if "memory" not in str(e).lower():  # CPU and CUDA out-of-memory are RuntimeErrors; others are bugs
            raise
        record.update(status="failed", val_loss=None, error=str(e).splitlines()[0])
    record["evals"] = evals  # [step, val loss] of each evaluation: what the pruner saw, replayed on --resume
    record["wall_s"] = round(time.perf_counter() - t0 + (earlier or {}).get("wall_s", 0.0), 3)
    log_file = run_dir / TRIAL_LOG_FILE
    status = record["status"]
    if status == "failed":
        outcome = f"failed: {record['error']}" + (f" (see {log_file})" if log_file.exists() and log_file.stat().st_size
                                                 else "")
    elif status == "complete":
        outcome = f"val loss {record['val_loss']:.4f}"
    else:
        outcome = f"{status} at step {record['step']}" + (f", val loss {record['val_loss']:.4f}" if evals else "")
    print(f"trial-{n:03d} ({n + 1}/{total}): {_fmt(params)} -> {outcome} ({record['wall_s']:.1f} s)", file=sys.stderr)
    return record


def _write_best(out: Path, records: list[dict], settings: dict) -> Optional[dict]:
    done = [r for r in records if r["status"] == "complete"]
    if not done:
        return None
    r = min(done, key=lambda r: (r["val_loss"], r["trial"]))
    base = {name: load_section(cls, settings["base"][name]) for name, cls in SECTIONS.items()}
    config = {"data": settings["data"]} | {name: asdict(cfg) for name, cfg in zip(SECTIONS, apply_params(base, r["params"]))}
    run_config = out / r["run"] / CONFIG_FILE
    if run_config.exists():  # what training actually used, e.g. vocab_size filled in from the data
        config["model"] = checkpoint_config(run_config)["model"]  # (a damaged one: one line naming it)
    count = {status: sum(rec["status"] == status for rec in records) for status in ("failed", PRUNED)}
    best = {"trial": r["trial"], "run": str(out / r["run"]), "val_loss": r["val_loss"], "params": r["params"],
            "method": settings["method"], "pruner": settings.get("pruner", "none"), "trials_complete": len(done),
            "trials_pruned": count[PRUNED], "trials_failed": count["failed"], "config": config}
    atomic_write_json(out / SEARCH_BEST_FILE, best)
    atomic_write_json(out / SEARCH_BEST_CONFIG_FILE, config)
    return best


def tune_cli(**kwargs: Any) -> int:
    """`scratchgpt tune`: run the search, then print the best trial as one JSON line; 130 after an interrupt."""
    try:
        best = tune(**kwargs)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    out = Path(kwargs["out"])
    print(f"best: trial-{best['trial']:03d}, val loss {best['val_loss']:.4f}: {_fmt(best['params'])} "
          f"({best['trials_complete']} complete, {best['trials_pruned']} pruned, {best['trials_failed']} failed; "
          f"full config in {out / SEARCH_BEST_FILE}, picture in {out / SEARCH_PLOT_FILE})", file=sys.stderr)
    print(json_text({k: best[k] for k in ("trial", "val_loss", "params", "run")}))
    return 0
