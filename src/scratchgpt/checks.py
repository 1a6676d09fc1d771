"""Option checks: each options dataclass checks every field against its type and allowed range
when it is built (`__post_init__`), so a bad value stops a command before any work, in one line
that names the flag, the value and what is allowed.

Ranges are written in interval notation next to the dataclass ("[0, 1)", "(0, inf)"), so the
table reads like the documentation. Floats must be finite: NaN and infinity are never a setting.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import typing
from typing import Any, Callable, Literal, Mapping, Union

from . import UserError

SEED_MAX = 2**63 - 1  # torch and numpy generators take 64-bit seeds
F32 = "3.4e38"  # about float32's largest: a value the optimizers take as a float32 scalar must fit in one
LR = "[0, 1000]"  # far past any working learning rate or weight decay; beyond, AdamW's bias-corrected step can overflow


class ConfigError(UserError, ValueError):
    """A bad option value: a UserError for the CLI, a ValueError for code that builds configs itself."""


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj: Any, flag: Callable[[str], str], ranges: Mapping[str, str]) -> None:
    """Check (and normalise: list -> tuple, int -> float) every field of the dataclass `obj`."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        typed = _typed(value, hints[f.name], flag(f.name))
        if typed is not value:
            object.__setattr__(obj, f.name, typed)  # frozen dataclasses too
        if f.name in ranges and typed is not None:
            for v in typed if isinstance(typed, tuple) else (typed,):
                check_range(flag(f.name), v, ranges[f.name])


def check_range(flag: str, value: float, interval: str) -> None:
    """`value` inside `interval` ("[0, 1)", "[1, inf)", ...), else ConfigError naming flag, value and range."""
    m = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*([^\]\s)]+)\s*([\])])", interval)
    if m is None:
        raise ValueError(f"bad interval {interval!r}")  # a bug in a range table, not user input
    lo, hi = _number(m.group(2)), _number(m.group(3))
    ok = (lo <= value if m.group(1) == "[" else lo < value) and (value <= hi if m.group(4) == "]" else value < hi)
    if not ok:  # (NaN fails every comparison, so it lands here too)
        raise ConfigError(f"{flag} must be {describe(interval)}, got {_show(value)}")


def bounds(interval: str) -> dict[str, float]:
    """An interval as keyword bounds for a pydantic Field / JSON Schema: "(0, 1]" -> {"gt": 0, "le": 1}."""
    m = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*([^\]\s)]+)\s*([\])])", interval)
    if m is None:
        raise ValueError(f"bad interval {interval!r}")
    lo, hi = _number(m.group(2)), _number(m.group(3))
    out = {} if lo == -math.inf else {("ge" if m.group(1) == "[" else "gt"): lo}
    if hi != math.inf:
        out["le" if m.group(4) == "]" else "lt"] = hi
    return out


def describe(interval: str) -> str:
    """"[1, inf)" -> ">= 1", "(0, inf)" -> "> 0", anything else as written: "in [0, 1)"."""
    m = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*inf\s*\)", interval)
    if m:
        return (">= " if m.group(1) == "[" else "> ") + m.group(2)
    return f"in {interval}"


def _number(text: str) -> float:
    return math.inf if text == "inf" else -math.inf if text == "-inf" else int(text) if re.fullmatch(r"-?\d+", text) \
        else float(text)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def _typed(value: Any, hint: Any, flag: str) -> Any:
    """`value` as the type `hint` describes (tuples from lists, floats from ints), or ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _typed(value, a, flag)
            except ConfigError as e:
                errors.append(str(e).split(" must be ", 1)[-1].split(", got ")[0])
        want = " or ".join(errors + (["null"] if type(None) in args else []))
        raise ConfigError(f"{flag} must be {want}, got {_show(value)}")
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{flag} must be one of {', '.join(map(str, args))}; got {_show(value)}")
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{flag} must be a list, got {_show(value)}")
        inner = args[:1] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        if origin is tuple and inner is args and len(value) != len(args):
            raise ConfigError(f"{flag} must be a list of {len(args)} values, got {_show(list(value))}")
        items = [_typed(v, inner[i] if len(inner) > 1 else inner[0], flag) for i, v in enumerate(value)] \
            if inner else list(value)
        return tuple(items) if origin is tuple else items
    if hint is str and isinstance(value, os.PathLike):  # a path where a file name is asked for
        return value
    if hint in (bool, int, str) and not (isinstance(value, hint) and (hint is bool or not isinstance(value, bool))):
        raise ConfigError(f"{flag} must be {_NAMES[hint]}, got {_show(value)}")
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag} must be {_NAMES[float]}, got {_show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an int past float's range
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be {_NAMES[float]}, got {_show(value)}")
        return value
    if hint is os.PathLike or (isinstance(hint, type) and issubclass(hint, os.PathLike)):
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{flag} must be a path, got {_show(value)}")
    return value
