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
import difflib
import json
import math
import os
import shutil
import sys
import time
import typing
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from . import UserError
from .checks import check_range
from .model import ModelConfig
from .optim import OptimConfig
from .runtime import INTERRUPTED, Interrupted, stop_on_signals
from .runs.files import (CONFIG_FILE, SEARCH_BEST_CONFIG_FILE, SEARCH_BEST_FILE, SEARCH_PLOT_FILE, STUDY_FILE,
                         TRIALS_FILE)
from .runs.guard import check_placement, write_marker
from .runs.rows import append_row, drop_torn_tail, read_rows, write_rows
from .train import TrainConfig
from .utils import atomic_write, atomic_write_json, json_text, load_yaml, read_json, read_text

CONFIG_MAX_BYTES = 1 << 20  # a search space is a few lines; anything this large is the wrong file

Method = Literal["grid", "random", "bayes"]
METHODS = ("grid", "random", "bayes")
Pruner = Literal["none", "median", "halving"]
PRUNERS = ("none", "median", "halving")
PRUNED = "pruned"
SECTIONS = {"model": ModelConfig, "train": TrainConfig, "optim": OptimConfig}
FORMAT_VERSION = 1
_RANGE_KEYS = {"low", "high", "log", "step"}


# ---------------------------------------------------------------- search space
def _field_types() -> dict[str, Any]:
    """Dotted key -> resolved type annotation, for every field of the three config sections."""
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            out[f"{section}.{f.name}"] = hints[f.name]
    return out


def _scalar_types(hint: Any) -> Optional[list[Any]]:
    """The allowed scalar types (or Literal values) of a field; None if it isn't a scalar field."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return [("literal", typing.get_args(hint))]
    if origin is Union:
        parts = [_scalar_types(a) if a is not type(None) else [type(None)] for a in typing.get_args(hint)]
        return None if any(p is None for p in parts) else [t for p in parts for t in p]
    if hint in (int, float, bool, str):
        return [hint]
    return None  # tuples (optim.betas) etc.: Optuna's categorical choices must be scalars


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """`value` as the field's type, or UserError; numeric strings are accepted for floats because
    YAML 1.1 (PyYAML) reads `1e-4` as a string."""
    types = _scalar_types(hint)
    if types is None:
        raise UserError(f"search space: {key} can't be searched (only number, string and boolean fields can)")
    for t in types:
        if isinstance(t, tuple):
            if value in t[1]:
                return value
        elif t is type(None) and value is None:
            return None
        elif t is bool and isinstance(value, bool):
            return value
        elif t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        elif t is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif t is str and isinstance(value, str):
            return value
    allowed = [repr(v) for t in types if isinstance(t, tuple) for v in t[1]]
    want = ", ".join(allowed) if allowed else " or ".join("null" if t is type(None) else t.__name__ for t in types)
    raise UserError(f"search space: {key} = {value!r} is not valid (expected {want})")


def _numeric_kind(hint: Any) -> Optional[str]:
    types = _scalar_types(hint) or []
    if int in types:
        return "int"
    if float in types:
        return "float"
    return None


def _flatten(raw: Mapping) -> dict[str, Any]:
    """Accept `optim: {lr: ...}` as well as `optim.lr: ...`."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        is_range = isinstance(value, Mapping) and (set(value) & (_RANGE_KEYS | {"choices"}))
        if key in SECTIONS and isinstance(value, Mapping) and not is_range:
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    return flat


def load_space(spec: Union[str, os.PathLike, Mapping]) -> dict[str, dict]:
    """Parse and check a search space: a mapping, a YAML/JSON file, or inline YAML/JSON text.

    Returns the normalised space: key -> {"choices": [...]} or
    {"type": "int"|"float", "low", "high", "log", "step"}. Bad input raises UserError.
    """
    if isinstance(spec, (str, os.PathLike)) and not isinstance(spec, Mapping):
        text, what = str(spec), "search space (neither a file nor inline YAML/JSON)"
        path = Path(text)
        if text.strip() and "\n" not in text and path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
            if not path.exists():
                raise UserError(f"search space file {path} does not exist")
            text, what = read_text(path, limit=CONFIG_MAX_BYTES), f"search space file {path}"
        elif len(text) > CONFIG_MAX_BYTES:
            raise UserError("--space: no such file, and too long to be inline YAML/JSON")
        spec = load_yaml(text, what)  # JSON is YAML, so one parser reads both
    if not isinstance(spec, Mapping):
        raise UserError('search space must be a mapping of config keys to choices or ranges, e.g. '
                        '\'{"optim.lr": {"low": 1e-4, "high": 1e-2, "log": true}, "model.n_embd": [32, 64]}\'')
    flat = _flatten(spec)
    if not flat:
        raise UserError("search space is empty: give at least one key to search")
    types = _field_types()
    space: dict[str, dict] = {}
    for key, value in flat.items():
        if key not in types:
            close = _closest_key(key, list(types))
            hint = f" (did you mean {close}?)" if close else " (keys look like model.n_embd, optim.lr, train.batch_size)"
            raise UserError(f"search space: unknown key {key!r}{hint}")
        space[key] = _param(key, types[key], value)
    return space


def _closest_key(key: str, keys: list[str]) -> Optional[str]:
    """The likeliest intended key: an abbreviation first (learning_rate -> lr), else the closest spelling."""
    name = key.rsplit(".", 1)[-1]
    initials = "".join(w[0] for w in name.split("_") if w)
    abbreviated = [k for k in keys if len(initials) > 1 and k.rsplit(".", 1)[-1] == initials]
    if abbreviated:
        return abbreviated[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return close[0] if close else None


def _param(key: str, hint: Any, value: Any) -> dict:
    if isinstance(value, Mapping) and set(value) == {"choices"}:
        value = value["choices"]
    if isinstance(value, (list, tuple)):
        choices = []
        for v in value:
            v = _coerce(key, hint, v)
            if v not in choices:  # a repeated value would only be evaluated twice
                choices.append(v)
        if not choices:
            raise UserError(f"search space: {key} has no choices")
        return {"choices": choices}
    if not isinstance(value, Mapping):
        raise UserError(f"search space: {key} needs a list of choices or a range {{low, high[, log, step]}}, "
                        f"got {value!r}")
    unknown = set(value) - _RANGE_KEYS
    if unknown or not {"low", "high"} <= set(value):
        raise UserError(f"search space: {key} range needs low and high (and optionally log, step); "
                        f"got keys {sorted(map(str, value))}")
    kind = _numeric_kind(hint)
    if kind is None:
        raise UserError(f"search space: {key} is not numeric: give a list of choices")
    low, high = _coerce(f"{key}.low", float, value["low"]), _coerce(f"{key}.high", float, value["high"])
    step = _coerce(f"{key}.step", float, value["step"]) if value.get("step") is not None else None
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"search space: {key}.log must be true or false")
    if kind == "int":
        raw = [value["low"], value["high"]] + ([value["step"]] if value.get("step") is not None else [])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            raise UserError(f"search space: {key} is an integer field: low, high and step must be integers")
        low, high, step = int(low), int(high), int(step) if step is not None else 1
    if not low < high:
        raise UserError(f"search space: {key} needs low < high, got {low} and {high}")
    if step is not None and step <= 0:
        raise UserError(f"search space: {key}.step must be positive")
    if log and low <= 0:
        raise UserError(f"search space: {key} with log: true needs low > 0")
    if log and step not in (None, 1):
        raise UserError(f"search space: {key}: log and step can't be combined")
    return {"type": kind, "low": low, "high": high, "log": log, "step": step}


def grid_values(key: str, p: dict) -> list:
    """The finite list of values a parameter takes in a grid search."""
    if "choices" in p:
        return list(p["choices"])
    if p["type"] == "int":
        return list(range(p["low"], p["high"] + 1, p["step"] or 1))
    if not p["step"]:
        raise UserError(f"grid search needs a finite set of values: give {key} a list of choices or a step")
    n = int(math.floor((p["high"] - p["low"]) / p["step"] + 1e-9))
    return [float(f"{p['low'] + i * p['step']:.12g}") for i in range(n + 1)]  # 12 digits: no 0.30000000000000004


def grid_size(space: dict[str, dict]) -> int:
    return math.prod(len(grid_values(k, p)) for k, p in space.items())


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


def apply_params(base: dict[str, Any], params: Mapping[str, Any]) -> tuple[ModelConfig, TrainConfig, OptimConfig]:
    """The three config sections of a trial: `base` (section -> dataclass) with `params` set.

    ValueError when the combination is invalid (e.g. n_embd not divisible by n_head).
    """
    sections = {name: {} for name in SECTIONS}
    for key, value in params.items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    return tuple(replace(base[name], **sections[name]) for name in SECTIONS)  # type: ignore[return-value]


def check_base(base: dict, meta: dict, data: Path, space: Mapping[str, Any]) -> None:
    """The checks `train` makes across options and data (warmup within the schedule, context within the data, the
    batch split), made on the base config before the first trial. A failure that names a searched key is left to
    the trials (some of them may pass); any other would fail every trial alike, so it is said now, once."""
    from .train import check_relations

    try:
        check_relations(base["model"], base["train"], base["optim"], 1, meta, data)
    except UserError as e:
        if not any(f"--{key} " in f"{e} " for key in space):
            raise UserError(f"the base config, which every trial starts from: {e}") from None


def _section(cls, d: dict):
    d = dict(d)
    if "betas" in d:
        d["betas"] = tuple(d["betas"])
    return cls(**d)


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
    import optuna

    from .data import default_data_dir
    from .train import train as run_training

    out = Path(out)
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
    if force and not resume:
        _clear(out)
    passed = {"model": model, "train": train, "optim": optim}

    if resume:
        saved = _read_study(study_file)
        if space is not None:
            _check_same("the search space", load_space(space), saved["space"])
        _check_same("--method", method, saved["method"])
        _check_same("--seed", seed, saved["seed"])
        _check_same("--pruner", pruner, saved.get("pruner", "none"))
        _check_same("--data", str(data) if data is not None else None, saved["data"])
        base = {name: _section(cls, saved["base"][name]) for name, cls in SECTIONS.items()}
        for name in SECTIONS:
            if passed[name] is None:
                continue
            for key, value in asdict(passed[name]).items():
                if given is None or f"{name}.{key}" in given:
                    _check_same(f"{name}.{key}", _plain(value), _plain(saved["base"][name][key]))
        settings = saved
    else:
        if space is None:
            raise UserError("--space is required: a YAML/JSON file or inline mapping of config keys to search")
        data_path = Path(data) if data is not None else default_data_dir()
        from .data import load_meta

        meta = load_meta(data_path)  # a bad data dir fails now, not once per trial
        base = {"model": model or ModelConfig(), "train": train or TrainConfig(), "optim": optim or OptimConfig()}
        space_d = load_space(space)
        from .train import fit_warmup

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
    space_n, method_n = settings["space"], settings["method"]
    if method_n == "grid":
        size = grid_size(space_n)
        if trials > size:
            _note(f"the grid has {size} combinations: running {size} trials, not {trials}")
            trials = size
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "search")
    if not resume:
        atomic_write_json(study_file, settings)
    records = _read_trials(trials_file)
    if len(records) >= trials and records[-1]["status"] != INTERRUPTED:
        _note(f"{out} already has {len(records)} trials (--trials {trials}); nothing to run")

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

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own one line per trial replaces Optuna's log
    study = optuna.create_study(direction="minimize", pruner=_pruner(settings),
                                sampler=_sampler(method_n, space_n, settings["seed"], settings["startup_trials"]))
    with stop_on_signals() as signals:
        try:
            study.optimize(objective, n_trials=max(trials, len(records)), catch=(_TrialFailed,))
        finally:  # also after an interrupt: what was done so far is recorded and drawn
            optuna.logging.set_verbosity(verbosity)
            _write_best(out, records, settings)
            draw_search(out / SEARCH_PLOT_FILE, records, study)
    best = _write_best(out, records, settings)
    if best is None:
        first = next((r.get("error") for r in records if r.get("error")), "unknown error")
        raise UserError(f"no trial finished: {first} (logs in {out}/trial-*/train.log)")
    return best


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
        with open(run_dir / "train.log", "a", encoding="utf-8") as log, contextlib.redirect_stderr(log):
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
    log_file = run_dir / "train.log"
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
    base = {name: _section(cls, settings["base"][name]) for name, cls in SECTIONS.items()}
    config = {"data": settings["data"]} | {name: asdict(cfg) for name, cfg in zip(SECTIONS, apply_params(base, r["params"]))}
    run_config = out / r["run"] / CONFIG_FILE
    if run_config.exists():  # what training actually used, e.g. vocab_size filled in from the data
        config["model"] = read_json(run_config)["model"]
    count = {status: sum(rec["status"] == status for rec in records) for status in ("failed", PRUNED)}
    best = {"trial": r["trial"], "run": str(out / r["run"]), "val_loss": r["val_loss"], "params": r["params"],
            "method": settings["method"], "pruner": settings.get("pruner", "none"), "trials_complete": len(done),
            "trials_pruned": count[PRUNED], "trials_failed": count["failed"], "config": config}
    atomic_write_json(out / SEARCH_BEST_FILE, best)
    atomic_write_json(out / SEARCH_BEST_CONFIG_FILE, config)
    return best


def draw_search(path: Path, records: list[dict], study=None) -> None:
    """search.png: each trial's val loss in order (pruned ones where they stopped) with the best so far,
    every trial's val curve over steps, and (from 2 complete trials on) Optuna's parameter importances."""
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist, curves, imp) = plt.subplots(1, 3, figsize=(15, 4))
    done = [r for r in records if r["status"] == "complete"]
    pruned = [r for r in records if r["status"] == PRUNED and r.get("val_loss") is not None]
    hist.plot([r["trial"] for r in done], [r["val_loss"] for r in done], "o", label="complete")
    if pruned:
        hist.plot([r["trial"] for r in pruned], [r["val_loss"] for r in pruned], "x", color="grey",
                  label="pruned (last eval)")
    best, xs, ys = math.inf, [], []
    for r in done:
        best = min(best, r["val_loss"])
        xs.append(r["trial"])
        ys.append(best)
    hist.step(xs, ys, where="post", color="tab:red", label="best so far")
    hist.set(title="optimization history", xlabel="trial", ylabel="val loss")
    for r in records:
        if r.get("evals"):
            steps, losses = zip(*r["evals"])
            line, = curves.plot(steps, losses, "--" if r["status"] == PRUNED else "-", alpha=0.7, marker=".")
            if r["status"] == PRUNED:
                curves.plot(steps[-1:], losses[-1:], "x", color=line.get_color(), markersize=8)
    curves.set(title="val loss per trial (x: pruned there)", xlabel="step", ylabel="val loss")
    importances = _importances(study) if study is not None and len(done) >= 2 else {}
    if importances:
        names = list(importances)[::-1]
        imp.barh(names, [importances[k] for k in names])
        imp.set(title="parameter importances (fANOVA)", xlabel="importance")
    else:
        imp.axis("off")
        imp.text(0.5, 0.5, "parameter importances need\n2 complete trials that differ", ha="center", va="center")
    for ax in (hist, curves):
        ax.grid(alpha=0.3)
    hist.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def _importances(study) -> dict:
    import optuna

    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # e.g. every complete trial has the same params
        return {}


def tune_cli(**kwargs: Any) -> int:
    """`scratchgpt tune`: run the search, then print the best trial as one JSON line; 130 after an interrupt."""
    try:
        best = tune(**kwargs)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    print(f"best: trial-{best['trial']:03d}, val loss {best['val_loss']:.4f}: {_fmt(best['params'])} "
          f"({best['trials_complete']} complete, {best['trials_pruned']} pruned, {best['trials_failed']} failed; "
          f"full config in {Path(kwargs['out']) / 'best.json'}, picture in {Path(kwargs['out']) / 'search.png'})",
          file=sys.stderr)
    print(json_text({k: best[k] for k in ("trial", "val_loss", "params", "run")}))
    return 0
