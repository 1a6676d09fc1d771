"""Masked-LM batches (`train.objective: mlm`): BERT's 80/10/10 masking, a pure function of (seed, step)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: prepare's worker processes import this package too
    import torch

IGNORE = -100
MLM_PROB, MLM_MASK_FRAC, MLM_RANDOM_FRAC = 0.15, 0.8, 0.1


def mlm_mask_batch(x: torch.Tensor, vocab_size: int, meta: Optional[dict], step: int, micro: int, rank: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a batch of token ids: returns (inputs, labels).

    15% of positions are chosen (at least one per row); of those 80% become the mask token,
    10% a random token, 10% stay. Labels are the original ids there and -100 elsewhere.
    The mask token is one extra id past the tokenizer's: `vocab_size` is the model's
    vocabulary (tokenizer + 1), so the mask id is `vocab_size - 1` and random replacements
    are real tokens only. The choice is a pure function of (seed, step, micro, rank), so a
    resumed run masks exactly as the uninterrupted one.
    """
    mask_id = vocab_size - 1
    if meta is not None and int(meta["vocab_size"]) != mask_id:
        raise ValueError(f"mlm: the model needs vocab_size {int(meta['vocab_size']) + 1} (tokenizer + [MASK]), "
                         f"got {vocab_size}")
    rng = np.random.default_rng([int(seed), int(step), int(micro), int(rank), 0x4D4C4D])
    ids = x.numpy() if x.device.type == "cpu" else x.cpu().numpy()
    B, T = ids.shape
    u = rng.random((B, T))
    chosen = u < MLM_PROB
    empty = ~chosen.any(axis=1)  # a row with no target would contribute nothing (and NaN alone)
    chosen[np.flatnonzero(empty), u[empty].argmin(axis=1)] = True
    r = rng.random((B, T))
    random_ids = rng.integers(0, mask_id, size=(B, T))
    inputs = ids.copy()
    inputs[chosen & (r < MLM_MASK_FRAC)] = mask_id
    swap = chosen & (r >= MLM_MASK_FRAC) & (r < MLM_MASK_FRAC + MLM_RANDOM_FRAC)
    inputs[swap] = random_ids[swap]
    labels = np.where(chosen, ids, IGNORE)
    import torch

    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))
