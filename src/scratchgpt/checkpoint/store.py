"""The one checkpoint writer: safetensors for tensors, JSON for everything else, atomic directory swaps.

Layout of a run directory:

    RUN/config.json                  the resolved config of the run
    RUN/checkpoints/step-0000100/    one complete checkpoint per save (the newest `keep_last` kept)
    RUN/latest/                      the newest checkpoint (hard links into checkpoints/)
    RUN/best/                        the checkpoint with the lowest val loss

Every run kind writes through `write_checkpoint`: pretraining (model.safetensors,
optimizer.safetensors), FSDP (plus sharded/, see fsdp.py), classifiers (plus head.safetensors),
SFT, LoRA (adapter_model.safetensors + adapter_config.json instead of full weights) and merged
runs. Each checkpoint directory also holds state.json (step, tokens, RNG states, data cursor,
scheduler/scaler state, the sha256 of every file), config.json and tokenizer.json. A directory
is written under a temporary name and renamed into place only when every file is fsynced, so a
kill at any moment leaves the previous checkpoint loadable; `remove_stale_temps` clears what
such a kill left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import UserError
from ..faults import final_name, save_tensors
from ..model import gpt_of
from ..runs.files import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, BEST, CHECKPOINT_PREFIX, CHECKPOINTS,  # noqa: F401
                          CONFIG_FILE, HEAD_FILE, LATEST, MODEL_FILE, OPTIM_FILE, STATE_FILE, TOKENIZER_FILE)
from ..tokenizer import copy_tokenizer
from ..utils import (atomic_write_json, first_line, json_text, make_temp_dir, read_json, replace_dir, sha256_file,
                     umask)

# 2: state.json carries STATE_SHA256, the hash of the rest of it (format 1, no such key, is still read: see
# verify.py); both list every other file's sha256
FORMAT_VERSION = 2
STATE_SHA256 = "state_sha256"


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The GPT's state dict without the tied head (safetensors refuses shared storage, and it is redundant)."""
    model = gpt_of(model)
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    model = gpt_of(model)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and plain data (JSON)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(device: Optional[torch.device] = None) -> dict:
    """Python, numpy and torch RNG states as plain JSON data; with a CUDA `device`, its generator too
    (only the training device's: touching the others would start a CUDA context on every GPU)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [torch.cuda.get_rng_state(device).tolist()] if device is not None and device.type == "cuda" else [],
    }


def set_rng_state(state: dict, device: Optional[torch.device] = None) -> None:
    """Restore rng_state(); the CUDA generator only onto a CUDA `device` (a run may move between CPU and GPU)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"][0], dtype=torch.uint8), device)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def optimizer_files(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Several optimizers (Muon + AdamW) in one file: keys "<optimizer index>.<param id>.<name>"; plain data apart."""
    tensors, metas = {}, []
    for i, opt in enumerate(optimizers):
        t, m = optimizer_to_tensors(opt)
        tensors.update({f"{i}.{k}": v for k, v in t.items()})
        metas.append(m)
    return tensors, metas


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where a checkpoint is assembled before it is renamed into place; a name every rank can derive."""
    return Path(run_dir) / CHECKPOINTS / f".tmp-{CHECKPOINT_PREFIX}{step:07d}"


class StreamedTensors:
    """A safetensors file whose tensors are made one at a time while it is written: `import_hf` converts a model
    tensor by tensor, so it never holds the whole model. `shapes` names every fp32 tensor first (the header);
    `make[name]()` makes one when its turn comes, and it is let go once written. The file is byte for byte what
    safetensors' save_file writes for the same tensors (one dtype: ordered by name, the header padded with spaces
    to 8 bytes)."""

    def __init__(self, shapes: dict[str, Sequence[int]], make: dict[str, Callable[[], torch.Tensor]]) -> None:
        if shapes.keys() != make.keys():
            raise ValueError("StreamedTensors: every tensor needs a shape and a maker")
        self.shapes = {name: [int(n) for n in shape] for name, shape in shapes.items()}
        self.make = make

    def write(self, path: Path) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in sorted(self.shapes):
            end = offset + 4 * math.prod(self.shapes[name])
            header[name] = {"dtype": "F32", "shape": self.shapes[name], "data_offsets": [offset, end]}
            offset = end
        head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)
        with open(path, "wb", buffering=0) as f:  # (unbuffered: a write's failure is raised by that write)
            self._write(f, len(head).to_bytes(8, "little") + head, path)
            for name in sorted(self.shapes):
                t = self.make[name]()
                if t.dtype != torch.float32 or list(t.shape) != self.shapes[name]:
                    raise ValueError(f"StreamedTensors: {name} is {t.dtype} {list(t.shape)}, the header says "
                                     f"float32 {self.shapes[name]}")
                self._write(f, memoryview(t.detach().cpu().contiguous().numpy().astype("<f4", copy=False)).cast("B"),
                            path)
                del t  # (before the next one is made)

    @staticmethod
    def _write(f, data, path: Path) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[f.write(view):]  # (a raw write may take only part)
        except OSError as e:  # a full disk, a file size limit: named by the file, as save_tensors names it
            raise OSError(e.errno, e.strerror, str(path)) from None


def write_checkpoint(run_dir: Path, step: int, *, tensors: dict[str, "dict[str, torch.Tensor] | StreamedTensors"],
                     json_files: dict[str, Any], tokenizer_file: Optional[Path], state: dict,
                     aliases: Sequence[str] = (LATEST,), keep_last: int = 2, staged: bool = False) -> Path:
    """Write RUN/checkpoints/step-N atomically, then point each alias (latest, best) at it. Returns its path.

    `tensors` maps file names to tensors (safetensors; or StreamedTensors, made while written), `json_files`
    file names to JSON data.
    With `staged`, staging_dir(run_dir, step) already holds files written by others (FSDP
    shards); they are hashed and swapped in with the rest.
    """
    run_dir = Path(run_dir)
    history = run_dir / CHECKPOINTS
    history.mkdir(parents=True, exist_ok=True)
    final = history / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = staging_dir(run_dir, step)
    if not staged:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill during an earlier save of this step
        tmp.mkdir()
    try:
        for name, tensor_dict in tensors.items():
            if isinstance(tensor_dict, StreamedTensors):
                tensor_dict.write(tmp / name)
            else:
                save_tensors(tensor_dict, tmp / name)
            os.chmod(tmp / name, 0o666 & ~umask())  # safetensors makes it 0600 whatever the umask
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        for name, obj in json_files.items():
            atomic_write_json(tmp / name, obj)
        if tokenizer_file is not None and Path(tokenizer_file).exists():
            copy_tokenizer(tokenizer_file, tmp)  # (an imported tokenizer's tokenizer_config.json with it)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != STATE_FILE)
        full_state = dict(state, format_version=FORMAT_VERSION, aliases=list(aliases))  # (for repair_aliases)
        full_state.setdefault("optimizer", None)
        full_state["sha256"] = {name: sha256_file(tmp / name) for name in files}
        full_state = json.loads(json_text(full_state))  # as it will read back (tuples as lists)
        full_state[STATE_SHA256] = state_digest(full_state)
        atomic_write_json(tmp / STATE_FILE, full_state)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for alias in aliases:
        point_alias(run_dir, alias, final)
    steps = sorted(history.glob(f"{CHECKPOINT_PREFIX}*"))
    for stale in steps[: max(0, len(steps) - max(keep_last, 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def point_alias(run_dir: Path, alias: str, ckpt: Path) -> None:
    """RUN/alias (latest, best) becomes a copy of `ckpt` made of hard links, swapped in whole."""
    link_tmp = make_temp_dir(f".tmp-{alias}-", run_dir)
    try:
        shutil.copytree(ckpt, link_tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        replace_dir(link_tmp, run_dir / alias)
    except BaseException:
        shutil.rmtree(link_tmp, ignore_errors=True)
        raise


def save_checkpoint(
    run_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer | list[torch.optim.Optimizer]],
    state: dict,
    config: dict,
    tokenizer_file: Optional[Path],
    keep_last: int = 2,
    is_best: bool = False,
) -> Path:
    """A pretraining checkpoint (full weights, optimizer state) through write_checkpoint."""
    tensors = {MODEL_FILE: model_tensors(model)}
    state = dict(state)
    if optimizer is not None:
        tensors[OPTIM_FILE], state["optimizer"] = optimizer_files(optimizer if isinstance(optimizer, list) else [optimizer])
    return write_checkpoint(run_dir, state["step"], tensors=tensors, json_files={CONFIG_FILE: config},
                            tokenizer_file=tokenizer_file, state=state, keep_last=keep_last,
                            aliases=[LATEST] + ([BEST] if is_best else []))


def state_digest(state: dict) -> str:
    """The sha256 of a state.json's content without its own STATE_SHA256 (canonical JSON: sorted keys)."""
    body = {k: v for k, v in state.items() if k != STATE_SHA256}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete what killed writes left behind: half-written checkpoints (a full model + optimizer each) and the
    temp files of utils.atomic_write (`.loss.png.XXXXXXXX.tmp`, `.config.json.XXXXXXXX.tmp`).

    A `.NAME.old` whose NAME is missing was moved aside by a swap killed before the new one took its
    place (utils.replace_dir): it is still the complete NAME (best/ may be its only copy), so it goes back."""
    run_dir = Path(run_dir)
    for old in [*run_dir.glob(".*.old"), *(run_dir / CHECKPOINTS).glob(".*.old")]:
        final = old.with_name(old.name[1:-len(".old")])
        if old.is_dir() and not final.exists():
            os.replace(old, final)
    stale = [p for p in [*run_dir.glob(".tmp-*"), *run_dir.glob(".*.old"), *(run_dir / CHECKPOINTS).glob(".tmp-*"),
                         *(run_dir / CHECKPOINTS).glob(".*.old")] if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    temp_files = [p for p in run_dir.glob(".*.tmp") if final_name(p.name) and p.is_file() and not p.is_symlink()]
    for p in temp_files:
        p.unlink(missing_ok=True)
    return stale + temp_files


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, mapped from the file where safetensors does that (pages are read as they
    are used, and shared with the page cache)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({first_line(e)})") from None  # one line, whatever the library said


Which = Literal["best", "latest"]  # a run's checkpoint to use: `best` falls back to `latest`


def resolve_checkpoint(run: Path, which: Which = "best") -> Path:
    """A run dir (picks `which`, falling back to latest) or a checkpoint dir itself."""
    run = Path(run)
    if not run.exists():
        raise UserError(f"{run}: no such run directory")
    def holds_weights(d: Path) -> bool:
        return (d / MODEL_FILE).exists() or (d / ADAPTER_FILE).exists()

    if holds_weights(run):
        return run
    for name in ([which, LATEST] if which != LATEST else [LATEST]):
        if holds_weights(run / name):
            return run / name
    raise UserError(f"{run}: no checkpoint found (expected {run}/{which}/{MODEL_FILE} or {ADAPTER_FILE})")


def weights_sha256(ckpt: Path) -> str:
    """What identifies a checkpoint's weights: its full weights, or its LoRA adapter."""
    return sha256_file(ckpt / MODEL_FILE) if (ckpt / MODEL_FILE).exists() else sha256_file(ckpt / ADAPTER_FILE)
