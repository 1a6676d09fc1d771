"""search.png, the picture of a search: each trial's val loss, every trial's val curve, parameter importances."""

from __future__ import annotations

import math
from pathlib import Path

from .utils import atomic_write

PRUNED = "pruned"  # a trial's status when the pruner stopped it (trials.jsonl)


def draw_search(path: Path, records: list[dict], study=None) -> None:
    """search.png: each trial's val loss in order (pruned ones where they stopped) with the best so far,
    every trial's val curve over steps, and (from 2 complete trials on) Optuna's parameter importances."""
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist, curves, imp) = plt.subplots(1, 3, figsize=(15, 4))
    done = [r for r in records if r["status"] == "complete"]
    pruned = [r for r in records if r["status"] == PRUNED and r.get("val_loss") is not None]
    hist.plot([r["trial"] for r in done], [r["val_loss"] for r in done], "o", label="complete")
    if pruned:
        hist.plot([r["trial"] for r in pruned], [r["val_loss"] for r in pruned], "x", color="grey",
                  label="pruned (last eval)")
    best, xs, ys = math.inf, [], []
    for r in done:
        best = min(best, r["val_loss"])
        xs.append(r["trial"])
        ys.append(best)
    hist.step(xs, ys, where="post", color="tab:red", label="best so far")
    hist.set(title="optimization history", xlabel="trial", ylabel="val loss")
    for r in records:
        if r.get("evals"):
            steps, losses = zip(*r["evals"])
            line, = curves.plot(steps, losses, "--" if r["status"] == PRUNED else "-", alpha=0.7, marker=".")
            if r["status"] == PRUNED:
                curves.plot(steps[-1:], losses[-1:], "x", color=line.get_color(), markersize=8)
    curves.set(title="val loss per trial (x: pruned there)", xlabel="step", ylabel="val loss")
    importances = _importances(study) if study is not None and len(done) >= 2 else {}
    if importances:
        names = list(importances)[::-1]
        imp.barh(names, [importances[k] for k in names])
        imp.set(title="parameter importances (fANOVA)", xlabel="importance")
    else:
        imp.axis("off")
        imp.text(0.5, 0.5, "parameter importances need\n2 complete trials that differ", ha="center", va="center")
    for ax in (hist, curves):
        ax.grid(alpha=0.3)
    hist.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def _importances(study) -> dict:
    import optuna

    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # e.g. every complete trial has the same params
        return {}
