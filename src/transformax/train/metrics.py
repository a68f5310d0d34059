"""Run observability: metrics as JSON lines, throughput / MFU, and the loss plot."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path


class MetricsLog:
    """Append-only JSON lines at ``path``; one object per record, each with a ``step``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.start = time.time()

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run logs them again)."""
        if self.path.exists():
            kept = [r for r in self.read() if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        """Append ``record`` with ``time`` (Unix seconds) and ``elapsed_s`` (since this log was
        opened: the process's run)."""
        now = time.time()
        record = {**record, "time": round(now, 3), "elapsed_s": round(now - self.start, 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """The records; a line that is not a JSON record (torn by a crash mid-write) is dropped
        with a warning."""
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                record = line
            if isinstance(record, dict) and "step" in record:
                records.append(record)
            elif record is not None:
                warnings.warn(f"{self.path}: line {number} is not a metrics record (torn by an "
                              f"interrupted write?); dropped: {line[:80]!r}", RuntimeWarning,
                              stacklevel=2)
        return records


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, n_devices: int) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * n_devices)


def plot_losses(records: list[dict], path: str | Path, title: str = "") -> None:
    """Train loss (records with ``loss``) and eval loss (``eval_loss``) against step, above the
    learning rate (``lr``), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), dpi=100, sharex=True,
                                    gridspec_kw={"height_ratios": [3, 1]})
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval (held out)", lw=1.5)
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if lrs:
        ax_lr.plot(*zip(*lrs), color="tab:green", lw=1.2)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
