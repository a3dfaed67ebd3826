"""PNG plots: figures of panels with one line per label against a log2 x axis
(:func:`draw_panels`), and a benchmark run's plots built on them: one figure per (metric, x
axis), one panel per cell type and mode, one line per candidate. In each panel the other case
parameters are held at the combination with the most x values in the run."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from .environment import where

BASELINE = "torch.nn"  # drawn in black, the other labels in colour

Points = list[tuple[float, float]]


@dataclass
class Panel:
    """One panel of :func:`draw_panels`: a line per label through its (x, y) points, with an
    optional dashed gray reference line and a horizontal line at ``hline``."""
    title: str
    xlabel: str
    lines: dict[str, Points]
    ylabel: str = ""
    log_y: bool = False
    reference: Optional[tuple[str, Points]] = None
    hline: Optional[float] = None


def series(rows: Iterable[dict], x: str, y: str, label: Union[str, Callable[[dict], str]]) -> dict[str, Points]:
    """The (x, y) points of row dicts per label, sorted by x, labels in order of appearance;
    ``label`` is a row key or a function of the row."""
    label_of = label if callable(label) else (lambda row: row[label])
    lines: dict[str, Points] = defaultdict(list)
    for row in rows:
        lines[label_of(row)].append((row[x], row[y]))
    return {lab: sorted(pts) for lab, pts in lines.items()}


def draw_panels(panels: list[Panel], path: Path, title: str = "", cols: int = 3, dpi: int = 90) -> Path:
    """Writes the panels as one PNG, ``cols`` to a row, x on a log2 scale; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cols = min(cols, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        for label, pts in panel.lines.items():
            xs, ys = zip(*pts)
            style = dict(color="black", linewidth=2) if label == BASELINE else {}
            ax.plot(xs, ys, marker="o", label=label, **style)
        if panel.reference:
            label, pts = panel.reference
            xs, ys = zip(*pts)
            ax.plot(xs, ys, linestyle="--", color="gray", label=label)
        if panel.hline is not None:
            ax.axhline(panel.hline, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        if panel.log_y:
            ax.set_yscale("log")
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(panel.title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- benchmark runs

X_FIELDS = {"batch": "batch size B", "steps": "sequence length T", "hidden": "hidden size H",
            "input_size": "input size I", "layers": "layers"}
METRICS = ("speedup", "time_per_step", "memory")


def _value(rec: dict, metric: str) -> Optional[float]:
    if rec["status"] != "ok":
        return None
    if metric == "speedup":
        return rec["speedup"]["total"]
    if metric == "time_per_step":
        return rec["time_per_step_us"]
    if metric == "memory":
        mem = rec["memory"]
        b = mem.get("peak_bytes") if mem.get("peak_bytes") is not None else mem.get("saved_bytes")
        return None if b is None else b / 2**20
    raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def _ylabel(metric: str, records: list[dict]) -> str:
    if metric == "speedup":
        return "speedup over torch.nn (x)"
    if metric == "time_per_step":
        return "time per step (us)"
    peak = any(r["memory"].get("peak_bytes") is not None for r in records)
    return "peak memory of a training step (MiB)" if peak else "activation memory kept by autograd (MiB)"


def _panels(records: list[dict], metric: str, x: str):
    """{(cell, mode): (fixed case fields, {label: [(x, y)]}, [(x, output MiB)])}"""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        y = _value(r, metric)
        if y is None:
            continue
        case = r["case"]
        if metric == "memory" and case["mode"] != "train":
            continue
        rest = tuple((k, v) for k, v in case.items() if k not in (x, "cell", "mode"))
        groups[(case["cell"], case["mode"])][rest].append(r)
    panels = {}
    for panel, by_rest in groups.items():
        rest, recs = max(by_rest.items(), key=lambda kv: len({r["case"][x] for r in kv[1]}))
        if len({r["case"][x] for r in recs}) < 2:
            continue
        lines = defaultdict(list)
        outputs = {}
        for r in recs:
            lines[r["candidate"]["label"]].append((r["case"][x], _value(r, metric)))
            outputs[r["case"][x]] = r["memory"]["output_bytes"] / 2**20
        panels[panel] = (dict(rest), {k: sorted(v) for k, v in lines.items()}, sorted(outputs.items()))
    return panels


def _fixed_text(fixed: dict) -> str:
    parts = [f"{short}={fixed[k]}" for k, short in (("batch", "B"), ("hidden", "H"), ("steps", "T")) if k in fixed]
    if "input_size" in fixed and fixed["input_size"] != fixed.get("hidden"):
        parts.append(f"I={fixed['input_size']}")
    if fixed.get("layers", 1) != 1:
        parts.append(f"L={fixed['layers']}")
    if fixed.get("bidirectional"):
        parts.append("bidirectional")
    if fixed.get("loop") == "cell":
        parts.append("cell loop")
    parts.append(str(fixed.get("dtype", "")))
    return " ".join(parts)


def plot(records: list[dict], metric: str, x: str, path: Path, title: str = "") -> Optional[Path]:
    """Writes one PNG; returns its path, or None when the run has fewer than two x values."""
    by_key = _panels(records, metric, x)
    if not by_key:
        return None
    ylabel = _ylabel(metric, records)
    panels = [Panel(title=f"{key[0]} {key[1]}: {_fixed_text(fixed)}", xlabel=X_FIELDS.get(x, x), lines=lines,
                    ylabel=ylabel, log_y=metric != "speedup",
                    reference=("output size", outputs) if metric == "memory" else None,
                    hline=1.0 if metric == "speedup" else None)
              for key, (fixed, lines, outputs) in sorted(by_key.items())]
    return draw_panels(panels, path, title=title)


def plot_all(doc: dict, stem: Path, kinds) -> list[Path]:
    written = []
    env = doc["environment"]
    for metric, x in kinds:
        p = plot(doc["records"], metric, x, stem.with_name(f"{stem.name}-{metric}-vs-{x}.png"),
                 title=f"fastbptt bench '{doc['preset']}' on {where(env)}")
        if p is not None:
            written.append(p)
    return written
