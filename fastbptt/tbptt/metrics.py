"""The run's metrics log (``metrics.jsonl``, one JSON record per line) and its plot."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

from .checkpoint import atomic_write


def read_metrics(path: str | os.PathLike, *, on_torn_tail: Optional[Callable[[int, str], None]] = None) -> list[dict]:
    """The records of a metrics log. A last line that is not a whole record (a run killed while
    appending it) is dropped and reported to ``on_torn_tail(line_number, text)``; a bad line
    before the end is an error naming the file and line."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not {"kind", "step"} <= record.keys():
                raise ValueError
        except ValueError:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{str(path)!r}, line {number}: not a metrics record ({line[:60]!r}); delete "
                                 "that line or the file to go on") from None
            if on_torn_tail is not None:
                on_torn_tail(number, line)
            break
        records.append(record)
    return records


def write_metrics(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Replaces the log with ``records``, atomically."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text), mode="w")


def append_metrics(path: str | os.PathLike, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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
