"""`scratchgpt merge-lora`: fold a LoRA run's adapter into its base, a full checkpoint of its own.

Not needed to use a LoRA run (every command applies the adapter on load), but a merged run
loads without its base, exports as plain weights, and quantizes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from .. import UserError
from ..checkpoint import (ADAPTER_FILE, CONFIG_FILE, STATE_FILE, TOKENIZER_FILE, Which, load_run, resolve_checkpoint,
                          write_checkpoint)
from ..utils import read_json
from ..runs.config import write_run_config
from ..runs.files import BEST, LATEST
from ..runs.guard import check_out
from ..runs.staging import staged
from .loop import run_files


def merge_lora(run: str | os.PathLike, out: str | os.PathLike, *, base: Optional[str | os.PathLike] = None,
               which: Which = "best", force: bool = False) -> Path:
    """Fold a LoRA run's adapter into its base: a full checkpoint that out/best and out/latest point at.

    Args:
        run: a LoRA run (finetune --lora)
        out: new run directory
    """
    ckpt = resolve_checkpoint(Path(run), which)
    if not (ckpt / ADAPTER_FILE).exists():
        raise UserError(f"{ckpt} holds no LoRA adapter ({ADAPTER_FILE}); nothing to merge")
    out = Path(out)
    inputs = [Path(run), ckpt] + ([Path(base)] if base is not None else [])
    check_out(out, "run", force=force, inputs=inputs)  # before the merge's work (staged checks again)
    loaded = load_run(ckpt, base=base, merge=True)
    config = dict(loaded.config)
    config["finetune"] = dict(config.get("finetune") or {}, lora=None, merged_from=str(ckpt.resolve()))
    state = read_json(ckpt / STATE_FILE)
    step = state.get("step", 0)
    with staged(out, "run", force=force, inputs=inputs) as tmp:
        final = write_checkpoint(tmp, step, tensors=run_files(loaded.model, lora=False),
                                 json_files={CONFIG_FILE: config}, tokenizer_file=ckpt / TOKENIZER_FILE,
                                 state={"step": step, "tokens": state.get("tokens", 0), "merged": True},
                                 aliases=[LATEST, BEST])
        write_run_config(tmp, config)
    print(f"merged {ckpt} into {out / final.relative_to(tmp)}", file=sys.stderr)
    return out / BEST
