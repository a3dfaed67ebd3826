"""The run's metrics log (``metrics.jsonl``, one JSON record per line) and its plot."""
from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike, *,
                 ylabel: str = "perplexity (exp of the mean loss)") -> Path:
    """Training and validation perplexity against tokens, and the LR against updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax.plot([r["tokens"] for r in train], [r["train_ppl"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_ppl"] for r in val], "o-", label="validation")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if train:
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set_xlabel("update")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(True, alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
