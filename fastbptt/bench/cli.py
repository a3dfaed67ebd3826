"""``fastbptt bench``: speed and memory of fastbptt against torch.nn and a compiled cell loop.

Examples::

    fastbptt bench --quick                       # about a minute on 2 CPU cores
    fastbptt bench --preset cpu-kernels          # the CPU kernels' grid, written to benchmarks/results/
    fastbptt bench --preset gpu-kernels          # the GPU kernels' grid, on a GPU
    fastbptt bench --preset cells --threads 1    # per-step cell loops, one thread
    fastbptt bench --cells gru --batch 1 16 64 --hidden 256 --steps 512 --modes train
    fastbptt bench --loop cell --cells lstm --batch 1 32 --hidden 256 --steps 64 --backends cpu
    fastbptt bench --quick --compare old.json    # run, then show the change against old.json
    fastbptt bench --compare old.json new.json   # compare two saved runs, no run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import config, plots, report
from .environment import environment, machine_name, where

GRID_OPTIONS = ("cells", "modes", "dtypes", "batch", "hidden", "input_size", "steps", "layers", "bidirectional",
                "chunk_sizes", "recompute", "backends", "baselines", "loop")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = "Presets: " + "; ".join(f"{n} ({config.DEFAULT_DEVICE[n]})" for n in config.PRESETS)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="small CPU grid, about a minute (the default)")
    which.add_argument("--full", action="store_true", help="the whole grid, for GPUs")
    which.add_argument("--preset", choices=sorted(config.PRESETS), help="a named grid")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="device (default: the preset's)")
    g = parser.add_argument_group("grid (replaces the preset's values in every one of its grids)")
    g.add_argument("--cells", nargs="+", choices=("rnn_tanh", "rnn_relu", "gru", "lstm"), help="recurrent cells")
    g.add_argument("--modes", nargs="+", choices=config.MODES, help="train = forward+backward, infer = forward")
    g.add_argument("--dtypes", nargs="+", choices=config.DTYPES, help="parameter and input dtypes")
    g.add_argument("--batch", nargs="+", type=int, metavar="B", help="batch sizes")
    g.add_argument("--hidden", nargs="+", type=int, metavar="H", help="hidden sizes")
    g.add_argument("--input-size", nargs="+", type=int, metavar="I", dest="input_size",
                   help="default: equal to the hidden size")
    g.add_argument("--steps", nargs="+", type=int, metavar="T", help="sequence lengths (time steps)")
    g.add_argument("--layers", nargs="+", type=int, metavar="L", help="stacked layers")
    g.add_argument("--directions", nargs="+", type=int, choices=(1, 2), metavar="D",
                   help="1: unidirectional, 2: bidirectional")
    g.add_argument("--chunk-size", nargs="+", type=int, metavar="C", dest="chunk_sizes",
                   help="fastbptt's time steps recomputed together in the backward")
    g.add_argument("--recompute", nargs="+", choices=("on", "off", "auto"),
                   help="memory policy: on = keep outputs and chunk states, off = also keep gate pre-activations, "
                        "auto = the modules' default (off while the gates are small, else on)")
    g.add_argument("--backends", nargs="+", help="fastbptt backends, each forced (default: all for the device)")
    g.add_argument("--baselines", nargs="+", choices=config.BASELINES,
                   help="torch.nn is always measured (the ratios are against it)")
    g.add_argument("--loop", choices=config.LOOPS,
                   help="layer = one layer module call on the sequence; cell = a Python loop of one cell module "
                        "over the steps (one layer, one direction; no chunk size or memory policy)")
    t = parser.add_argument_group("timing and output")
    t.add_argument("--warmup", type=int, help="untimed calls per candidate before the rounds")
    t.add_argument("--reps", type=int, help="timed interleaved rounds")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    t.add_argument("--budget", type=float, metavar="SECONDS",
                   help="start no new case after this many seconds; the rest are recorded as skipped")
    t.add_argument("--out", type=Path, help="output folder (default: the preset's)")
    t.add_argument("--name", help="file name stem (default: PRESET-MACHINE)")
    t.add_argument("--no-plots", action="store_true", help="write the JSON and markdown only")
    t.add_argument("--list", action="store_true", help="print the cases and candidates, run nothing")
    t.add_argument("--compare", nargs="+", metavar="JSON",
                   help="OLD.json: run, then compare with it; OLD.json NEW.json: compare two runs, no run")


def build_plan(args: argparse.Namespace) -> config.Plan:
    grid_fields = {}
    for name in GRID_OPTIONS:
        value = getattr(args, name, None)
        if name == "bidirectional" and args.directions:
            value = tuple(d == 2 for d in args.directions)
        if name == "recompute" and value:
            value = tuple({"on": True, "off": False}.get(v, v) for v in value)
        if name == "baselines" and value:
            value = tuple(dict.fromkeys(("torch.nn", *value)))
        if value is not None:
            grid_fields[name] = value if name == "loop" else tuple(value)
    if args.full:
        name = "full"
    elif args.preset:
        name = args.preset
    elif args.quick or not grid_fields:
        name = "quick"
    else:
        name = None
    if name is None:  # a grid from the command line alone
        device = args.device or "cpu"
        plan = config.Plan("custom", [config.Grid(**grid_fields)], device)
    else:
        plan = config.override(config.preset(name, args.device), **grid_fields)
    if args.warmup is not None:
        plan.warmup = args.warmup
    if args.reps is not None:
        plan.reps = args.reps
    if args.out is not None:
        plan.out_dir = str(args.out)
    return plan


def _print(text: str) -> None:
    print(text, flush=True)


def main(args: argparse.Namespace) -> int:
    if args.compare and len(args.compare) > 2:
        _print("--compare takes OLD.json, or OLD.json NEW.json")
        return 2
    if args.compare and len(args.compare) == 2:
        text = report.compare(report.load_json(args.compare[0]), report.load_json(args.compare[1]))
        _print(text)
        return 0
    if args.budget is not None and not args.budget > 0:
        _print(f"--budget must be a positive number of seconds, got {args.budget}")
        return 2
    old = report.load_json(args.compare[0]) if args.compare else None
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        plan = build_plan(args)
        items = plan.items()
    except ValueError as exc:  # a grid that cannot be run (unknown backend, a cell loop with two layers, ...)
        _print(f"fastbptt bench: {exc}")
        return 2
    if args.list:
        for case, cands in items:
            _print(f"{case.key()}: " + ", ".join(c.label for c in cands))
        _print(f"{len(items)} cases, {sum(len(c) for _, c in items)} records")
        return 0
    if plan.device == "cuda" and not torch.cuda.is_available():
        _print("no CUDA device is visible: pass --device cpu, or run this preset on a GPU machine")
        return 2

    env = environment(plan.device)
    _print(f"fastbptt bench '{plan.name}': {len(items)} cases on {plan.device} ({where(env)})")
    from .runner import run_plan
    t0 = time.perf_counter()
    records = run_plan(plan, progress=lambda line: print("  " + line, file=sys.stderr, flush=True),
                       budget_s=args.budget)
    wall = time.perf_counter() - t0
    doc = report.document(plan, env, records)
    doc["wall_s"] = round(wall, 1)

    stem = Path(plan.out_dir) / (args.name or f"{plan.name}-{machine_name(plan.device)}")
    report.save_json(doc, stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(report.markdown(doc))
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if not args.no_plots:
        written += plots.plot_all(doc, stem, plan.plots)
    _print("")
    _print(report.summary_tables(doc))
    if old is not None:
        text = report.compare(old, doc)
        compare_path = stem.with_name(stem.name + "-compare.md")
        compare_path.write_text(text)
        written.append(compare_path)
        _print(text)
    _print(f"wall time {wall:.1f} s; wrote " + ", ".join(str(p) for p in written))
    for status in ("failed", "skipped"):
        count = sum(r["status"] == status for r in records)
        if count:
            _print(f"{count} record(s) {status}; see the notes above and the JSON")
    return 0
