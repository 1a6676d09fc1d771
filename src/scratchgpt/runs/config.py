"""RUN/config.json: the run's settings (model, train, optim, data, command), written and read here only.

Each checkpoint keeps its own copy, covered by its sha256 list and read through the checkpoint loader;
this is the run-level copy that `--resume`, the report, `info` and a recorded command start from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from .. import UserError
from ..utils import atomic_write_json, read_json
from .files import CONFIG_FILE, LATEST


def write_run_config(run: str | Path, config: dict[str, Any]) -> None:
    """Write (atomically, with the umask) the run's config.json."""
    atomic_write_json(Path(run) / CONFIG_FILE, config)


def read_run_config(run: str | Path, sections: Iterable[str] = ()) -> dict[str, Any]:
    """The run's config.json, checked: a damaged one, or one whose `sections` are not objects, is one line."""
    path = Path(run) / CONFIG_FILE
    how = f"damaged or edited by hand: restore it from the checkpoint's copy, {Path(run) / LATEST / CONFIG_FILE}"
    try:
        config = read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path.parent}: not a run directory (no config.json)") from None
    except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError)
        raise UserError(f"{path}: not JSON ({str(e)[:80]}); {how}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object; {how}")
    for key in sections:
        if not isinstance(config.get(key), dict):
            raise UserError(f"{path}: its {key} section must be an object, got {str(config.get(key))[:40]}; {how}")
    return config


def run_config_or_none(run: str | Path) -> Optional[dict[str, Any]]:
    """The run's config.json where it is there and whole, else None (for what only shows a run: the report)."""
    try:
        return read_run_config(run)
    except (UserError, OSError):
        return None
