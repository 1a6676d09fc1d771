"""What `--out`, `--force` and `--output` may touch: the data-safety rules, checked here and nowhere else.

- A folder output (a run, a data dir, an export, a search) may be a new path, or, with --force, a folder
  of the same kind that scratchgpt itself wrote: one holding the marker file (MARKER_FILE, written with
  every such folder) or, for runs and data dirs written before the marker existed, one laid out exactly
  as scratchgpt lays them out. Either way every name in it must be one scratchgpt writes there: a
  folder with a file of the user's in it (notes.txt) is never replaced, nor one with another run
  inside it.
- An output is never one of the command's inputs, an ancestor or a descendant of one, a checkpoint
  folder, or a path inside another run, data dir or export (OTHER/best, OTHER/latest/nested).
- A symbolic link as a folder output is refused (its target is not ours to replace); a file output
  given as a link is written through to its target.
- A file output (predict --output) never replaces a directory, a device or a FIFO: a FIFO or a character
  device is written into (a FIFO only when a reader is there), anything else refused; an existing
  file inside a run or another scratchgpt folder is never overwritten.

Every refusal is a UserError: one `error: ...` line.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
from pathlib import Path
from typing import Iterable, Literal, Optional

from .. import UserError
from ..utils import atomic_write_json
from .files import (BEST, CHECKPOINTS, CONFIG_FILE, ENVIRONMENT_FILE, LATEST, MARKER_FILE, META_FILE, METRICS_FILE,
                    OLD_EVAL_FILE, PLOT_FILE, REPORT_FILE, RESULT_FILE, SAMPLES_FILE, SEARCH_BEST_CONFIG_FILE,
                    SEARCH_BEST_FILE, SEARCH_PLOT_FILE, STATE_FILE, STUDY_FILE, TENSORBOARD_DIR, TOKENIZER_FILE,
                    TRIALS_FILE, eval_file)

Kind = Literal["run", "data", "hf-model", "hf-adapter", "search", "gguf"]
KIND_NAMES = {"run": "run", "data": "data directory", "hf-model": "Hugging Face export",
              "hf-adapter": "PEFT adapter export", "search": "search", "gguf": "GGUF export",
              "checkpoint": "checkpoint folder"}

# the names each kind of folder holds (patterns); hidden names are temp files and the marker
_NAMES: dict[str, tuple[str, ...]] = {
    "run": (CONFIG_FILE, ENVIRONMENT_FILE, METRICS_FILE, SAMPLES_FILE, RESULT_FILE, REPORT_FILE, PLOT_FILE,
            TENSORBOARD_DIR, LATEST, BEST, CHECKPOINTS, eval_file("*"), OLD_EVAL_FILE, "*.log"),
    "data": (META_FILE, TOKENIZER_FILE, "*.bin", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json", "generation_config.json"),
    "search": (STUDY_FILE, TRIALS_FILE, SEARCH_BEST_FILE, SEARCH_BEST_CONFIG_FILE, SEARCH_PLOT_FILE,
               "trial-[0-9][0-9][0-9]*"),
}
_MARKER_MAX = 1 << 16


def write_marker(folder: Path, kind: Kind) -> None:
    """Mark `folder` as scratchgpt's, of this kind; exports record the names they hold (nothing else is theirs)."""
    record: dict = {"kind": kind, "format_version": 1}
    if kind not in _NAMES:
        record["files"] = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    atomic_write_json(folder / MARKER_FILE, record)


def _marker(folder: Path) -> Optional[dict]:
    try:
        fd = os.open(folder / MARKER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        record = json.loads(os.read(fd, _MARKER_MAX).decode("utf-8"))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return record if isinstance(record, dict) and record.get("kind") in KIND_NAMES else None


def _json_object(path: Path) -> Optional[dict]:
    try:
        if not path.is_file() or path.stat().st_size > (64 << 20):
            return None
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def is_checkpoint(folder: Path) -> bool:
    """A checkpoint folder (RUN/latest, RUN/best, RUN/checkpoints/step-N, or one copied elsewhere)."""
    return (folder / STATE_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def _legacy_kind(folder: Path) -> Optional[str]:
    """A run or data dir written before the marker: recognised by the layout only scratchgpt gives them."""
    config = _json_object(folder / CONFIG_FILE)
    if config is not None and "model" in config and "format_version" in config \
            and any(is_checkpoint(folder / d) for d in (LATEST, BEST)):
        return "run"
    meta = _json_object(folder / META_FILE)
    if meta is not None and "vocab_size" in meta and (folder / TOKENIZER_FILE).is_file():
        return "data"
    study = _json_object(folder / STUDY_FILE)
    if study is not None and ("space" in study or (folder / TRIALS_FILE).is_file()):
        return "search"
    return None


def artifact_kind(folder: str | os.PathLike) -> Optional[str]:
    """The kind of scratchgpt folder `folder` is ("run", "data", ..., "checkpoint"), or None."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    marker = _marker(folder)
    if marker is not None:
        return marker["kind"]
    if is_checkpoint(folder):
        return "checkpoint"
    return _legacy_kind(folder)


def _foreign(folder: Path, kind: str) -> list[str]:
    """The names in `folder` that a folder of this kind never holds (the user's own files)."""
    marker = _marker(folder) or {}
    own = marker.get("files") if isinstance(marker.get("files"), list) else None
    names = []
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue  # the marker, temp files of a killed write
        if own is not None and entry.name in own:
            continue
        if own is None and any(fnmatch.fnmatchcase(entry.name, pat) for pat in _NAMES.get(kind, ())):
            continue
        names.append(entry.name)
    return sorted(names)


def _nested(folder: Path) -> Optional[Path]:
    """A run, data dir or export somewhere inside `folder` (not counting checkpoint folders a run holds, or
    the folders an export's marker lists as its own, such as an adapter export's base/)."""
    own = (_marker(folder) or {}).get("files")
    own = set(own) if isinstance(own, list) else set()
    for root, dirs, files in os.walk(folder):
        if Path(root) == folder:
            dirs[:] = [d for d in dirs if d not in own]
        elif MARKER_FILE in files or artifact_kind(root) not in (None, "checkpoint"):
            return Path(root)
    return None


def enclosing(path: Path) -> Optional[tuple[Path, str]]:
    """The nearest scratchgpt folder strictly above `path` (resolved), with its kind."""
    for parent in Path(os.path.abspath(path)).parents:
        kind = artifact_kind(parent)
        if kind is not None:
            return parent, kind
    return None


def _check_inputs(out: Path, inputs: Iterable[Path], flag: str) -> None:
    real = Path(os.path.realpath(out))
    for given in inputs:
        p = Path(given)
        if not (p.exists() or p.is_symlink()):
            continue
        rp = Path(os.path.realpath(p))
        if rp == real or real in rp.parents:
            raise UserError(f"{flag} {out} holds the input {given}: replacing it would delete what is being read")
        if rp in real.parents and rp.is_dir():
            raise UserError(f"{flag} {out} is inside the input {given}: give a path outside it")


def check_inside(out: Path, kind: str, flag: str = "--out") -> None:
    """An output folder never goes inside another run, data dir, export or checkpoint (a search holds runs)."""
    found = enclosing(out)
    if found is None or (found[1] == "search" and kind == "run"):
        return
    where, what = found
    raise UserError(f"{flag} {out} is inside the {KIND_NAMES[what]} {where}: give a path outside it")


def check_placement(out: Path, kind: str, inputs: Iterable[Path] = (), flag: str = "--out") -> None:
    """Where a folder output may be at all: not a link, not inside another scratchgpt folder, not an input,
    nor an ancestor or a descendant of one."""
    if out.is_symlink():
        raise UserError(f"{flag} {out} is a symbolic link: give the folder itself (its target is not replaced)")
    check_inside(out, kind, flag)
    _check_inputs(out, inputs, flag)


def check_out(out: str | os.PathLike, kind: Kind, *, force: bool, inputs: Iterable[Path] = (),
              exists: Optional[str] = None, empty_is_new: bool = True, flag: str = "--out") -> bool:
    """Check that the command may write the folder `out`; True when it exists and will be replaced.

    `exists` is the refusal when `out` exists and --force was not given (each command keeps its own words);
    `empty_is_new`: an existing empty folder is written into as a new one.
    """
    out = Path(out)
    inputs = list(inputs)
    if out.exists() and not out.is_dir() and not out.is_symlink():
        raise UserError(f"{flag} {out} is a file, not a directory: give a new directory name")
    check_placement(out, kind, inputs, flag)
    if not out.exists() or (empty_is_new and not any(os.scandir(out))):
        return False
    if not force:
        raise UserError(exists or f"{out} already exists and is not empty: pass --force to replace it")
    found = artifact_kind(out)
    if found is None:
        raise UserError(f"{flag} {out} holds files scratchgpt did not write: --force replaces only a "
                        f"{KIND_NAMES[kind]} it wrote; give a new directory name")
    if found != kind:
        raise UserError(f"{flag} {out} is a {KIND_NAMES[found]}, not a {KIND_NAMES[kind]}: --force replaces only a "
                        f"{KIND_NAMES[kind]}; give a new directory name")
    foreign = _foreign(out, kind)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{flag} {out} holds {shown}, which scratchgpt did not write: it is not replaced; "
                        "give a new directory name")
    nested = _nested(out)
    if nested is not None:
        raise UserError(f"{flag} {out} holds another {KIND_NAMES[artifact_kind(nested) or 'run']} ({nested}): "
                        "it is not replaced; give a new directory name")
    return True


# ---------------------------------------------------------------- single files
Target = tuple[Path, Literal["file", "stream"]]


def check_output_file(output: str | os.PathLike, inputs: Iterable[Path] = (), flag: str = "--output") -> Target:
    """Where a file output goes, and how: ("file", path) replaced atomically, or ("stream", path) written into
    (a FIFO or a character device). A link is followed to its target."""
    given = Path(output)
    target = Path(os.path.realpath(given)) if given.is_symlink() else given
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UserError(f"{flag} {given}: {e.strerror or e}") from None
    for p in inputs:
        if st is not None and Path(p).exists() and os.path.samefile(p, target):
            raise UserError(f"{flag} {given} is the input {p}: give another file")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UserError(f"{flag} {given} is a directory: give a file name")
    if st is not None and (stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        return target, "stream"
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UserError(f"{flag} {given} is not a regular file (a socket or block device): give a file name")
    found = enclosing(target)
    if found is not None and (st is not None or found[1] == "checkpoint"):
        raise UserError(f"{flag} {given} is inside the {KIND_NAMES[found[1]]} {found[0]}: scratchgpt never "
                        "overwrites its files; give a path outside it")
    return target, "file"


def write_output_file(output: str | os.PathLike, data: bytes, inputs: Iterable[Path] = (),
                      flag: str = "--output") -> None:
    """Write a file output under the rules above; an OSError becomes one line."""
    from ..utils import atomic_write_bytes

    target, how = check_output_file(output, inputs, flag)
    try:
        if how == "file":
            atomic_write_bytes(target, data)
            return
        try:
            fd = os.open(target, os.O_WRONLY | os.O_NONBLOCK)  # a FIFO nobody reads: ENXIO, not a hang
        except OSError as e:
            if e.errno == 6:  # ENXIO
                raise UserError(f"{flag} {output} is a FIFO that nothing reads") from None
            raise
        try:
            os.set_blocking(fd, True)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {flag} {output}: {e.strerror or e}") from None


# ---------------------------------------------------------------- a run written in place (train, finetune)
_RUN_CONTENT = (CONFIG_FILE, LATEST, CHECKPOINTS, METRICS_FILE)


def run_has_content(out: Path) -> bool:
    """Whether `out` holds (part of) a run: what --resume continues and --force replaces."""
    return out.is_dir() and any((out / n).exists() for n in _RUN_CONTENT)


def _litter(name: str) -> bool:
    """What a run dir may hold before its config.json: logs (tune's train.log), tb/, temp files of a crash."""
    return name == TENSORBOARD_DIR or name.startswith(".") or name.endswith(".log")


def check_run_out(out: Path, *, resume: bool, force: bool, inputs: Iterable[Path] = ()) -> bool:
    """train's --out: new (or holding only a run's litter), the run to --resume, or with --force a run to
    replace (check_out's rules). True when an existing run is to be replaced."""
    out, inputs = Path(out), list(inputs)
    if out.is_symlink() and not resume:  # (--resume continues the run a link points at: nothing is replaced)
        raise UserError(f"--out {out} is a symbolic link: give the folder itself (its target is not replaced)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: give a new directory name")
    has_run = run_has_content(out)
    if out.is_dir() and not has_run and any(not _litter(e.name) for e in os.scandir(out)):
        # e.g. a data dir given as --out by mistake: never written into, and never deleted by --force
        raise UserError(f"--out {out} already holds files that are not a training run: give a new directory name")
    if has_run and not (resume or force):
        raise UserError(f"{out} already holds a run: pass --resume to continue it or --force to replace it")
    if resume:
        check_inside(Path(os.path.realpath(out)), "run")
        _check_inputs(out, inputs, "--out")
        return False
    check_placement(out, "run", inputs)
    if not has_run:
        return False
    return check_out(out, "run", force=True, inputs=inputs)
