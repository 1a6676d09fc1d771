"""RunLog: what a training run records as it goes (metrics.jsonl, samples.jsonl, TensorBoard, loss.png)."""

from __future__ import annotations

from pathlib import Path

from ..utils import atomic_write
from .files import METRICS_FILE, PLOT_FILE, SAMPLES_FILE, TENSORBOARD_DIR
from .rows import append_row, cut_back, read_rows


class RunLog:
    """metrics.jsonl, TensorBoard (when installed) and loss.png, written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, plot: bool):
        self.out, self.enabled, self.plot = out, enabled, plot
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / TENSORBOARD_DIR))
            except Exception:  # tensorboard not installed: metrics.jsonl and loss.png still record everything
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        append_row(self.out / METRICS_FILE, record)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def sample(self, step: int, prompt: str, text: str) -> None:
        """RUN/samples.jsonl: every sample printed during training, for the report."""
        if self.enabled:
            append_row(self.out / SAMPLES_FILE, {"step": step, "prompt": prompt, "text": text})

    def truncate(self, step: int) -> None:
        """On resume: drop the rows past the checkpoint's step, which the resumed run writes again."""
        if self.enabled:
            for name in (METRICS_FILE, SAMPLES_FILE):
                cut_back(self.out / name, step)

    def draw(self) -> None:
        if not (self.enabled and self.plot):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = read_rows(self.out / METRICS_FILE)
        fig, ax = plt.subplots(figsize=(7, 4))
        tr = [(r["tokens"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        va = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), label="train", alpha=0.7)
        if va:
            ax.plot(*zip(*va), "o-", label="val")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(self.out / PLOT_FILE, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
