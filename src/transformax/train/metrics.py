"""Run observability: metrics as JSON lines, throughput / MFU, and the loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Append-only JSON lines at ``path``; one object per record, each with a ``step``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run logs them again)."""
        if self.path.exists():
            kept = [r for r in self.read() if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, n_devices: int) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * n_devices)


def plot_losses(records: list[dict], path: str | Path, title: str = "") -> None:
    """Train loss (records with ``loss``) and eval loss (``eval_loss``) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval (held out)", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
