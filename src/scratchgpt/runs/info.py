"""`scratchgpt info RUN`: what a run is and holds, as JSON on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..utils import read_json
from .config import read_run_config
from .files import BEST, LATEST, MARKER_FILE, RESULT_FILE, STATE_FILE, TENSORBOARD_DIR


def run_info(run: Path) -> dict:
    """`scratchgpt info RUN`: config, kind, parameter count, steps, best val loss, files."""
    from ..checkpoint import load_run
    from ..model import GPT, ModelConfig

    run = Path(run)
    config = read_run_config(run, sections=("model",))
    info: dict[str, Any] = {"run": str(run)}
    if (run / LATEST).exists() or (run / BEST).exists():
        loaded = load_run(run, verify=False)
        net = loaded.gpt
        info["kind"] = loaded.kind + (" (LoRA adapter)" if loaded.is_lora else "")
    else:  # started, no checkpoint yet
        net = GPT(ModelConfig(**config["model"]))
    info.update(params=net.num_params(), flops_per_token=net.flops_per_token(), config=config)
    for name in (LATEST, BEST):
        if (run / name / STATE_FILE).exists():
            st = read_json(run / name / STATE_FILE)
            info[name] = {"step": st["step"], "tokens": st.get("tokens"), "best_val_loss": st.get("best_val_loss")}
    if (run / RESULT_FILE).exists():
        info["result"] = read_json(run / RESULT_FILE)
    info["files"] = sorted(str(p.relative_to(run)) for p in run.rglob("*")
                           if p.is_file() and TENSORBOARD_DIR not in p.parts and p.name != MARKER_FILE)
    print(json.dumps(info, indent=2))
    return info
