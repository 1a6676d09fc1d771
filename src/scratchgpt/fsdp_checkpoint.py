"""FSDP2 checkpoints: sharded state via `torch.distributed.checkpoint`, plus a full model export.

A checkpoint written under FSDP has the single-process layout, except that the optimizer lives
in shards instead of `optimizer.safetensors`:

    step-0000100/model.safetensors     full weights, gathered to rank 0: `sample`, `eval`, any resume
    step-0000100/sharded/shard-*.safetensors
                                       every rank's shards of model and optimizer, written in
                                       parallel by `torch.distributed.checkpoint` (its safetensors
                                       writer: no pickle), each tensor's offsets in the file header
    step-0000100/state.json ...        as a single-process checkpoint (hashes cover the shards too)

Resuming under FSDP reads only this rank's slices of the shards, for any world size (DCP
reshards by offsets); one process or DDP reads them whole. The directory is assembled under a
temporary name and renamed into place, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as tdist

from . import UserError

SHARDED_DIR = "sharded"


def _sharded_state(model: torch.nn.Module, optimizers: list) -> tuple[dict, list]:
    """DCP's input: model and optimizer tensors (DTensor shards) by name; the optimizer's plain data apart, for JSON."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    metas = []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars: dict = {}
        for pid, st in sd["state"].items():
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{i}.{pid}.{key}"] = value  # same names as optimizer.safetensors, prefixed
                else:
                    scalars.setdefault(str(pid), {})[key] = value
        metas.append({"param_groups": sd["param_groups"], "scalars": scalars})
    return tensors, metas


def save_fsdp(out: Path, model, optimizers, state: dict, config: dict, tokenizer_file, tcfg, ctx, is_best: bool) -> Path:
    """Every rank writes its shards; rank 0 adds the full model export and the JSON, then swaps the directory in."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .checkpoint import (CONFIG_FILE, FORMAT_VERSION, MODEL_FILE, STATE_FILE, TOKENIZER_FILE, _link_or_copy,
                             _swap_dir)
    from .utils import atomic_write_json, sha256_file

    run_dir = Path(out)
    history = run_dir / "checkpoints"
    final = history / f"step-{state['step']:07d}"
    tmp = history / f".tmp-fsdp-{state['step']:07d}"  # one name every rank can derive without a broadcast
    master = ctx.rank == 0
    if master:
        history.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save of this step
        tmp.mkdir()
    tdist.barrier()
    try:
        tensors, metas = _sharded_state(model, optimizers)
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED_DIR), save_distributed=True))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if master:
            if getattr(model.cfg, "tie_embeddings", False):
                full.pop("lm_head.weight", None)  # shared with wte; safetensors refuses shared storage
            save_file({k: v.contiguous() for k, v in full.items()}, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            atomic_write_json(tmp / CONFIG_FILE, config)
            files = [MODEL_FILE] + sorted(str(p.relative_to(tmp)) for p in (tmp / SHARDED_DIR).iterdir())
            if tokenizer_file is not None and Path(tokenizer_file).exists():
                shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
                files.append(TOKENIZER_FILE)
            full_state = dict(state, format_version=FORMAT_VERSION, optimizer=metas,
                              sharded={"dir": SHARDED_DIR, "world_size": ctx.world, "writer": "torch.distributed.checkpoint"
                                       " HuggingFaceStorageWriter (safetensors, offsets in each file's header)"})
            full_state["sha256"] = {name: sha256_file(tmp / name) for name in files + [CONFIG_FILE]}
            atomic_write_json(tmp / STATE_FILE, full_state)
            _swap_dir(tmp, final)
            for alias in ["latest"] + (["best"] if is_best else []):
                link_tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{alias}-", dir=run_dir))
                shutil.copytree(final, link_tmp, copy_function=_link_or_copy, dirs_exist_ok=True)  # hard links
                _swap_dir(link_tmp, run_dir / alias)
            steps = sorted(history.glob("step-*"))
            for stale in steps[: max(0, len(steps) - max(tcfg.keep_last, 1))]:
                shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    tdist.barrier()  # nobody runs ahead (or exits) before the checkpoint is in place
    return final


def load_sharded(sharded_dir: Path, model: torch.nn.Module, optimizers: list, metas: list, ctx) -> dict:
    """Read an FSDP checkpoint's shards; returns the optimizer tensors as '<optimizer>.<param id>.<name>'.

    Under FSDP: this rank's slices, as DTensors laid out like the live parameters, and the model
    weights are loaded from the shards too. Otherwise (one process, DDP): whole tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.tensor import DTensor

    from .distributed import param_of_key

    sharded = ctx.parallel == "fsdp"
    try:
        stored = HuggingFaceStorageReader(str(sharded_dir)).read_metadata().state_dict_metadata
    except Exception as e:  # a damaged shard header: name the directory rather than DCP's internals
        raise UserError(f"{sharded_dir}: cannot read the sharded checkpoint ({e})") from None
    params = param_of_key(optimizers, metas)
    live_model = model.state_dict() if sharded else {}
    templates = {}
    for key, md in stored.items():
        if key.startswith("optim."):
            p = params.get(key[len("optim."):].rsplit(".", 1)[0])
            if p is None:
                raise UserError(f"{sharded_dir}: {key} has no parameter in this model")
            like = p if isinstance(p, DTensor) and tuple(md.size) == tuple(p.shape) else None
        elif key.startswith("model.") and sharded:
            like = live_model.get(key[len("model."):])
            if like is None:
                raise UserError(f"{sharded_dir}: {key} has no parameter in this model")
        else:
            continue  # whole-tensor readers take the weights from model.safetensors
        if like is not None:
            templates[key] = torch.zeros_like(like, dtype=md.properties.dtype)  # DTensor: this rank's slice is read
        else:
            templates[key] = torch.zeros(md.size, dtype=md.properties.dtype)
    # no_dist: without FSDP every rank reads whole tensors independently, no collectives needed
    dcp.load(templates, storage_reader=HuggingFaceStorageReader(str(sharded_dir)), no_dist=not sharded)
    if sharded:
        weights = {k[len("model."):]: v for k, v in templates.items() if k.startswith("model.")}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
        if missing or unexpected:
            raise UserError(f"{sharded_dir}: does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out = {}
    for key, t in templates.items():
        if key.startswith("optim."):
            p = params[key[len("optim."):].rsplit(".", 1)[0]]
            out[key[len("optim."):]] = t if isinstance(t, DTensor) or t.dim() == 0 else t.to(p.device)
    return out
