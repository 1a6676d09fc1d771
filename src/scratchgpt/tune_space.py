"""tune's search space: parsing and checking it (`load_space`), the values a grid takes, and a trial's configs
(`apply_params`). The format is described in tune.py's docstring."""

from __future__ import annotations

import difflib
import math
import os
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from . import UserError
from .model import ModelConfig
from .optim import OptimConfig
from .train_plan import TrainConfig
from .utils import load_yaml, read_text

CONFIG_MAX_BYTES = 1 << 20  # a search space is a few lines; anything this large is the wrong file

Method = Literal["grid", "random", "bayes"]
METHODS = ("grid", "random", "bayes")
SECTIONS = {"model": ModelConfig, "train": TrainConfig, "optim": OptimConfig}
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


def apply_params(base: dict[str, Any], params: Mapping[str, Any]) -> tuple[ModelConfig, TrainConfig, OptimConfig]:
    """The three config sections of a trial: `base` (section -> dataclass) with `params` set.

    ValueError when the combination is invalid (e.g. n_embd not divisible by n_head).
    """
    sections = {name: {} for name in SECTIONS}
    for key, value in params.items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    return tuple(replace(base[name], **sections[name]) for name in SECTIONS)  # type: ignore[return-value]


def load_section(cls, d: dict):
    d = dict(d)
    if "betas" in d:
        d["betas"] = tuple(d["betas"])
    return cls(**d)


