"""Checkpoints: the one writer (store.py), the one loader (load.py), what a load trusts (verify.py), and rank-aware
I/O (fsdp.py)."""

from .load import LoadedRun, load_run
from .store import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, CONFIG_FILE, FORMAT_VERSION, HEAD_FILE, MODEL_FILE, OPTIM_FILE,
                    STATE_FILE, TOKENIZER_FILE, StreamedTensors, Which, load_model_tensors, load_tensors, model_tensors,
                    optimizer_from_tensors, optimizer_to_tensors, remove_stale_temps, resolve_checkpoint, rng_state,
                    save_checkpoint, set_rng_state, weights_sha256, write_checkpoint)
from .verify import check_resume_state, checkpoint_candidates, find_resumable, repair_aliases, verify_checkpoint

__all__ = [
    "ADAPTER_CONFIG_FILE", "ADAPTER_FILE", "CONFIG_FILE", "FORMAT_VERSION", "HEAD_FILE", "MODEL_FILE", "OPTIM_FILE",
    "STATE_FILE", "TOKENIZER_FILE", "LoadedRun", "StreamedTensors", "Which", "check_resume_state",
    "checkpoint_candidates", "find_resumable", "load_model_tensors", "load_run", "load_tensors", "model_tensors",
    "optimizer_from_tensors", "optimizer_to_tensors", "remove_stale_temps", "repair_aliases", "resolve_checkpoint",
    "rng_state", "save_checkpoint", "set_rng_state", "verify_checkpoint", "weights_sha256", "write_checkpoint",
]
