"""What a load trusts, verified: a checkpoint's files against the sha256 list in its state.json, and
state.json against its own hash (format 2); where a resume starts (the newest intact checkpoint,
wherever it is), and the aliases a killed save left behind, repaired.

Runs written before format 2 have no hash of state.json: they load as before (their files are
checked against its list, which must be there), a resume checks the state's fields one by one, and
the next save writes format 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import UserError
from ..utils import read_json, sha256_file
from .store import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, BEST, CHECKPOINT_PREFIX, CHECKPOINTS, CONFIG_FILE,
                    FORMAT_VERSION, HEAD_FILE, LATEST, MODEL_FILE, OPTIM_FILE, STATE_FILE, STATE_SHA256, TOKENIZER_FILE,
                    point_alias, state_digest)

# the files a loader reads: where one is there, the sha256 list must name it
CHECKED_FILES = (CONFIG_FILE, TOKENIZER_FILE, MODEL_FILE, OPTIM_FILE, HEAD_FILE, ADAPTER_FILE, ADAPTER_CONFIG_FILE)


def _history(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each checkpoints/step-N the run keeps."""
    folders = (run_dir / CHECKPOINTS).glob(f"{CHECKPOINT_PREFIX}*")
    return [(int(p.name.removeprefix(CHECKPOINT_PREFIX)), p) for p in folders if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()]


def repair_aliases(run_dir: Path, log=print) -> list[str]:
    """Point latest/ and best/ at the newest intact checkpoint written for them, where a kill between the
    checkpoint's rename and its alias swaps left them older (best/ would stay a stale model for good: the
    resumed run believes that step is already its best). Returns the aliases it moved."""
    run_dir = Path(run_dir)
    history = _history(run_dir)
    moved = []
    for alias in (LATEST, BEST):
        current = _state_or_none(run_dir / alias)
        at = current.get("step") if current is not None else None
        for step, ckpt in sorted(history, reverse=True):
            if isinstance(at, int) and at >= step:
                break
            state = _state_or_none(ckpt)
            if state is None or alias not in state.get("aliases", ()):
                continue
            try:
                verify_checkpoint(ckpt)
            except UserError:
                continue
            point_alias(run_dir, alias, ckpt)
            log(f"note: {alias}/ was {'missing' if at is None else f'at step {at}'} after an interrupted save: "
                f"it is now {ckpt.name}")
            moved.append(alias)
            break
    return moved


def _state_or_none(ckpt: Path) -> Optional[dict]:
    try:
        state = read_json(ckpt / STATE_FILE)
    except (OSError, ValueError, UserError):  # (UserError: not a regular file)
        return None
    return state if isinstance(state, dict) else None


def verify_checkpoint(ckpt: Path) -> dict:
    """Check state.json against its own hash and every file against the hashes it lists; UserError names the
    first bad file. A checkpoint of format 1 (before state.json hashed itself) is still read: its files are
    checked, and a resume checks its state field by field (check_resume_state)."""
    ckpt = Path(ckpt)
    state_path = ckpt / STATE_FILE
    if not state_path.exists():
        raise UserError(f"{state_path}: missing (incomplete checkpoint)")
    try:
        state = read_json(state_path)
    except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError)
        raise UserError(f"{state_path}: corrupt ({str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise UserError(f"{state_path}: corrupt (not a JSON object)")
    version = state.get("format_version")
    if version not in (1, FORMAT_VERSION) or isinstance(version, bool):
        raise UserError(f"{state_path}: unsupported checkpoint format {str(version)[:40]!r}")
    if version >= 2 and STATE_SHA256 not in state:
        raise UserError(f"{state_path}: no {STATE_SHA256}: state.json can't be verified (edited by hand or damaged; "
                        "use another checkpoint of the run)")
    if version >= 2 and state[STATE_SHA256] != state_digest(state):
        raise UserError(f"{state_path}: checksum mismatch (edited or corrupted)")
    listed = state.get("sha256")
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise UserError(f"{state_path}: no sha256 list: the checkpoint's files can't be verified (edited by hand or "
                        "damaged; use another checkpoint of the run)")
    for name in CHECKED_FILES:
        if (ckpt / name).exists() and name not in listed:
            raise UserError(f"{ckpt / name}: not in {state_path}'s sha256 list (edited by hand?)")
    for name, digest in listed.items():
        path = ckpt / name
        if not path.exists():
            raise UserError(f"{path}: missing")
        if sha256_file(path) != digest:  # (a FIFO or a device in its place is refused by name, never read)
            raise UserError(f"{path}: checksum mismatch (truncated or corrupted)")
    return state


def check_resume_state(state: dict, where: Path) -> dict:
    """The fields a training resume reads, checked one by one (format 1 states have no hash of their own)."""
    def bad(field: str, want: str) -> UserError:
        return UserError(f"{where}: {field} must be {want}, got {str(state.get(field, 'nothing'))[:60]} "
                         "(a damaged state.json; use another checkpoint of the run)")

    for field in ("step", "tokens"):
        value = state.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(field, "an integer >= 0")
    rng = state.get("rng")
    if not isinstance(rng, dict) or not all(isinstance(rng.get(k), list) for k in ("python", "numpy", "torch")):
        raise bad("rng", "the saved random generator states")
    if not isinstance(state.get("optimizer"), list):  # (a training checkpoint always has its optimizers' states)
        raise bad("optimizer", "a list of optimizer states")
    best = state.get("best_val_loss")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))):
        raise bad("best_val_loss", "a number or null")
    return state


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Where a resume may start, newest step first wherever it is (latest/ or the kept history; latest/
    first at equal steps). A kill during the swap of latest/ leaves a newer complete checkpoints/step-N."""
    run_dir = Path(run_dir)
    history = [(step, 0, p) for step, p in _history(run_dir)]
    latest = run_dir / LATEST
    if latest.exists():
        history.append((_step_of(latest), 1, latest))
    return [p for _, _, p in sorted(history, key=lambda t: (t[0], t[1]), reverse=True)]


def _step_of(ckpt: Path) -> int:
    """The step a checkpoint's state.json names; unreadable ones sort first (they are tried, and reported)."""
    try:
        step = read_json(ckpt / STATE_FILE).get("step")
    except (OSError, ValueError, AttributeError, UserError):  # (UserError: not a regular file)
        return 2**63
    return step if isinstance(step, int) and not isinstance(step, bool) else 2**63


def find_resumable(run_dir: Path, log=print) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint that verifies; corrupt ones are reported, never silently skipped."""
    errors = []
    for ckpt in checkpoint_candidates(run_dir):
        try:
            return ckpt, check_resume_state(verify_checkpoint(ckpt), ckpt / STATE_FILE)
        except UserError as e:
            errors.append(str(e))
            log(f"warning: skipping corrupt checkpoint: {e}")
    if errors:
        raise UserError(f"no intact checkpoint in {run_dir}: {errors[0]}")
    return None
