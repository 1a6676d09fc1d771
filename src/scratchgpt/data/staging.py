"""Where `prepare` and `prepare --merge` write: the check on --out, and the temporary
directory beside it that is renamed into place once complete (nothing half-written is ever
seen at --out, and with --force the old directory survives a failure)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .. import UserError
from ..utils import fsync_dir, replace_dir
from .dataset import META_FILE, TOKENIZER_FILE


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_out(out: Path, force: bool) -> None:
    """--out must be new, or a directory replaced with --force."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"output {out} exists and is not a directory")
        if not force:
            raise UserError(f"output directory {out} already exists (use --force to replace it)")


def new_tmp(out: Path) -> Path:
    """A temporary directory beside `out`, renamed to it when complete."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    except OSError as e:
        raise UserError(f"cannot write the output directory {out}: {e.strerror or e}") from None
    return tmp


def move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished tmp dir to `out`; with force, swap so the old dir survives failure."""
    check_out(out, force)
    replace_dir(tmp, out)


def finish_files(tmp: Path) -> None:
    """Give meta.json and tokenizer.json the user's umask, and make the directory durable."""
    for name in (META_FILE, TOKENIZER_FILE):  # atomic writes create private (0600) files
        os.chmod(tmp / name, 0o666 & ~_umask())
    fsync_dir(tmp)
