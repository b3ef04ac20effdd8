"""What a run writes for people to look at: metrics.jsonl (one JSON object per line) and loss.png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes


def running_mean(values: list[float], window: int) -> list[float]:
    """out[i] = mean(values[i - window + 1 : i + 1]), over fewer values at the start (for loss curves)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


class MetricsLog:
    """Append-only metrics.jsonl; on resume, rows after the checkpoint's step are dropped first."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        kept: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in self.read(self.path) if r.get("step", 0) <= resume_step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self.rows = kept

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, Any]]:
        rows = []
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return rows

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, path: str | os.PathLike, title: str = "") -> Path | None:
        """Training loss per step (and its running mean) with held-out loss on top."""
        train = [(r["step"], r["loss"]) for r in self.rows if r.get("split") == "train"]
        held = [(r["step"], r["loss"]) for r in self.rows if r.get("split") == "eval"]
        if not train and not held:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        if train:
            steps, losses = zip(*train)
            window = len(losses) // 20  # a running mean only once there are enough steps to smooth
            if window > 1:
                ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="train loss (per step)")
                ax.plot(
                    steps, running_mean(losses, window), color="tab:blue", lw=2, label=f"train loss (mean of {window})"
                )
            else:
                ax.plot(steps, losses, color="tab:blue", lw=1.5, label="train loss (per step)")
        if held:
            steps, losses = zip(*held)
            style = "o--" if len(held) > 2 else "o"  # two far-apart points joined would suggest a path
            ax.plot(steps, losses, style, color="tab:orange", lw=1.5, ms=7, label="held-out loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(title or "lorakit train")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        return path
