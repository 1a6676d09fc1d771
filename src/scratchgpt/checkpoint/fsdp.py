"""Checkpoints under torchrun: who writes (rank 0, or every rank under FSDP2) and how state is read back.

FSDP2 checkpoints: sharded state via `torch.distributed.checkpoint`, plus a full model export.

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
from pathlib import Path

import torch
import torch.distributed as tdist

from .. import UserError
from .store import (BEST, CONFIG_FILE, LATEST, MODEL_FILE, OPTIM_FILE, load_tensors, optimizer_from_tensors, save_checkpoint,
                    staging_dir, write_checkpoint)

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


def save_training_checkpoint(out: Path, model, optimizers, state: dict, config: dict, tokenizer_file, ctx,
                             keep_last: int, is_best: bool) -> None:
    """One process / DDP: rank 0 writes the single-process checkpoint. FSDP: sharded state + full model export.
    Every rank calls this; nobody leaves before the checkpoint is in place."""
    if ctx.parallel == "fsdp":
        _save_fsdp(out, model, optimizers, state, config, tokenizer_file, ctx, keep_last, is_best)
    elif ctx.rank == 0:
        save_checkpoint(out, model=model, optimizer=optimizers, state=state, config=config,
                        tokenizer_file=tokenizer_file, keep_last=keep_last, is_best=is_best)
    if ctx.world > 1:
        tdist.barrier()


def _save_fsdp(out: Path, model, optimizers, state: dict, config: dict, tokenizer_file, ctx, keep_last: int,
               is_best: bool) -> Path:
    """Every rank writes its shards into the staging dir; rank 0 adds the full model export and the JSON,
    then write_checkpoint hashes everything and swaps the directory in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    tmp = staging_dir(out, state["step"])
    master = ctx.rank == 0
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save of this step
        tmp.mkdir(parents=True)
    tdist.barrier()
    try:
        tensors, metas = _sharded_state(model, optimizers)
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED_DIR), save_distributed=True))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if master:
            if getattr(model.cfg, "tie_embeddings", False):
                full.pop("lm_head.weight", None)  # shared with wte; safetensors refuses shared storage
            sharded = {"dir": SHARDED_DIR, "world_size": ctx.world,
                       "writer": "torch.distributed.checkpoint HuggingFaceStorageWriter (safetensors, offsets in each "
                                 "file's header)"}
            write_checkpoint(out, state["step"], tensors={MODEL_FILE: {k: v.contiguous() for k, v in full.items()}},
                             json_files={CONFIG_FILE: config}, tokenizer_file=tokenizer_file,
                             state=dict(state, optimizer=metas, sharded=sharded), keep_last=keep_last,
                             aliases=[LATEST] + ([BEST] if is_best else []), staged=True)
    except BaseException:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def load_sharded(sharded_dir: Path, model: torch.nn.Module, optimizers: list, metas: list, ctx) -> dict:
    """Read an FSDP checkpoint's shards; returns the optimizer tensors as '<optimizer>.<param id>.<name>'.

    Under FSDP: this rank's slices, as DTensors laid out like the live parameters, and the model
    weights are loaded from the shards too. Otherwise (one process, DDP): whole tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.tensor import DTensor


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


def load_optimizers(ckpt: Path, model: torch.nn.Module, optimizers: list, state: dict, ctx) -> None:
    """Optimizer state from any checkpoint layout into this run's (possibly sharded) optimizers.

    optimizer.safetensors (one process / DDP) holds full tensors; FSDP checkpoints hold shards.
    Either is reshaped to what the live parameters are: full tensors, or this rank's shards."""
    metas = state["optimizer"]
    if len(metas) != len(optimizers):
        raise UserError(f"{ckpt}: checkpoint has {len(metas)} optimizers, this run {len(optimizers)} "
                        "(optim.optimizer changed?)")
    if (Path(ckpt) / SHARDED_DIR).is_dir():
        tensors = load_sharded(Path(ckpt) / SHARDED_DIR, model, optimizers, metas, ctx)
    else:
        tensors = load_tensors(Path(ckpt) / OPTIM_FILE)
        if ctx.parallel == "fsdp":
            tensors = _shard_like_params(tensors, optimizers, metas)
    for i, opt in enumerate(optimizers):
        sub = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}.")}
        optimizer_from_tensors(opt, sub, metas[i])


def param_of_key(optimizers: list, metas: list) -> dict[str, torch.Tensor]:
    """'<optimizer>.<param id>' -> the live parameter it belongs to (ids follow param_groups order)."""
    out = {}
    for i, (opt, meta) in enumerate(zip(optimizers, metas)):
        for saved, live in zip(meta["param_groups"], opt.param_groups):
            if len(saved["params"]) != len(live["params"]):
                raise UserError("checkpoint optimizer does not match the model (parameter groups differ)")
            for pid, p in zip(saved["params"], live["params"]):
                out[f"{i}.{pid}"] = p
    return out


def _shard_like_params(tensors: dict, optimizers: list, metas: list) -> dict:
    """Full optimizer tensors -> this rank's shards, laid out as their parameter (FSDP2: dim 0)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = param_of_key(optimizers, metas)
    out = {}
    for key, t in tensors.items():
        p = params.get(key.rsplit(".", 1)[0])
        if isinstance(p, DTensor) and tuple(t.shape) == tuple(p.shape):
            # src_data_rank=None: every rank holds the full tensor, so each just slices (no communication)
            t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        out[key] = t
    return out
