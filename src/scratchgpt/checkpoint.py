"""Checkpoints: safetensors for tensors, JSON for everything else, atomic directory swaps.

Layout of a run directory:

    RUN/config.json                  the resolved config of the run
    RUN/checkpoints/step-0000100/    one complete checkpoint per save (the newest `keep_last` kept)
    RUN/latest/                      the newest checkpoint (hard links into checkpoints/)
    RUN/best/                        the checkpoint with the lowest val loss

Each checkpoint directory holds model.safetensors, optimizer.safetensors, state.json (step,
tokens, RNG states, data cursor, scheduler/scaler state, file hashes), config.json and
tokenizer.json. A directory is written under a temporary name and renamed into place only
when every file is fsynced, so a kill at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import UserError
from .utils import atomic_write_json, fsync_dir, read_json, sha256_file

FORMAT_VERSION = 1
MODEL_FILE, OPTIM_FILE, STATE_FILE, CONFIG_FILE, TOKENIZER_FILE = (
    "model.safetensors",
    "optimizer.safetensors",
    "state.json",
    "config.json",
    "tokenizer.json",
)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain GPT inside DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied head (safetensors refuses shared storage, and it is redundant)."""
    model = unwrap(model)
    sd = model.state_dict()
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    model = unwrap(model)
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


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain JSON data."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap_dir(tmp: Path, final: Path) -> None:
    """Put `tmp` at `final`; at every instant either the old or the new directory is complete."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


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
    """Write checkpoints/step-N atomically, then point latest (and best) at it. Returns its path."""
    run_dir = Path(run_dir)
    history = run_dir / "checkpoints"
    history.mkdir(parents=True, exist_ok=True)
    final = history / f"step-{state['step']:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=history))
    try:
        save_file(model_tensors(model), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        files = [MODEL_FILE]
        optim_meta = None
        if optimizer is not None:
            # several optimizers (Muon + AdamW) share one file: keys are "<optimizer index>.<param id>.<name>"
            tensors, optim_meta = {}, []
            for i, opt in enumerate(optimizer if isinstance(optimizer, list) else [optimizer]):
                t, m = optimizer_to_tensors(opt)
                tensors.update({f"{i}.{k}": v for k, v in t.items()})
                optim_meta.append(m)
            save_file(tensors, str(tmp / OPTIM_FILE))
            files.append(OPTIM_FILE)
        for name in files:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        atomic_write_json(tmp / CONFIG_FILE, config)
        if tokenizer_file is not None and Path(tokenizer_file).exists():
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
            files.append(TOKENIZER_FILE)
        full_state = dict(state, format_version=FORMAT_VERSION, optimizer=optim_meta)
        full_state["sha256"] = {name: sha256_file(tmp / name) for name in files + [CONFIG_FILE]}
        atomic_write_json(tmp / STATE_FILE, full_state)
        _swap_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for alias in ["latest"] + (["best"] if is_best else []):
        link_tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{alias}-", dir=run_dir))
        for f in final.iterdir():
            _link_or_copy(f, link_tmp / f.name)
        _swap_dir(link_tmp, run_dir / alias)
    steps = sorted(history.glob("step-*"))
    for stale in steps[: max(0, len(steps) - max(keep_last, 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def verify_checkpoint(ckpt: Path) -> dict:
    """Check every file against the hashes in state.json; UserError names the first bad file."""
    ckpt = Path(ckpt)
    state_path = ckpt / STATE_FILE
    if not state_path.exists():
        raise UserError(f"{state_path}: missing (incomplete checkpoint)")
    try:
        state = read_json(state_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{state_path}: corrupt ({e})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{state_path}: unsupported checkpoint format {state.get('format_version')!r}")
    for name, digest in state.get("sha256", {}).items():
        path = ckpt / name
        if not path.exists():
            raise UserError(f"{path}: missing")
        if sha256_file(path) != digest:
            raise UserError(f"{path}: checksum mismatch (truncated or corrupted)")
    return state


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Where a resume may start, newest first: latest, then the kept history."""
    run_dir = Path(run_dir)
    out = [run_dir / "latest"] if (run_dir / "latest").exists() else []
    out += sorted((run_dir / "checkpoints").glob("step-*"), reverse=True)
    return out


def find_resumable(run_dir: Path, log=print) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint that verifies; corrupt ones are reported, never silently skipped."""
    errors = []
    for ckpt in checkpoint_candidates(run_dir):
        try:
            return ckpt, verify_checkpoint(ckpt)
        except UserError as e:
            errors.append(str(e))
            log(f"warning: skipping corrupt checkpoint: {e}")
    if errors:
        raise UserError(f"no intact checkpoint in {run_dir}: {errors[0]}")
    return None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def resolve_checkpoint(run: Path, which: str = "best") -> Path:
    """A run dir (picks `which`, falling back to latest) or a checkpoint dir itself."""
    run = Path(run)
    if not run.exists():
        raise UserError(f"{run}: no such run directory")
    if (run / MODEL_FILE).exists():
        return run
    for name in ([which, "latest"] if which != "latest" else ["latest"]):
        if (run / name / MODEL_FILE).exists():
            return run / name
    raise UserError(f"{run}: no checkpoint found (expected {run}/{which}/{MODEL_FILE})")


def load_model(run: Path, which: str = "best", device: str | torch.device = "cpu", verify: bool = True):
    """Load a trained model for inference: returns (model in eval mode, tokenizer, config dict)."""
    from .model import GPT, ModelConfig
    from .tokenizer import Tokenizer

    ckpt = resolve_checkpoint(run, which)
    if verify:
        verify_checkpoint(ckpt)
    config = read_json(ckpt / CONFIG_FILE)
    model = GPT(ModelConfig(**config["model"]))
    load_model_tensors(model, load_tensors(ckpt / MODEL_FILE))
    model.to(device).eval()
    tokenizer = Tokenizer.load(ckpt / TOKENIZER_FILE)
    return model, tokenizer, config
