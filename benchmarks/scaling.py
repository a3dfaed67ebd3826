"""Scaling study for docs/scaling.md: time and activation memory of the default fastbptt backend
(backend="auto") against sequence length T, batch B and hidden size H.

    python benchmarks/scaling.py                    # run the 'scaling' preset, then summarise
    python benchmarks/scaling.py --from RESULT.json # summarise a saved run
    python benchmarks/scaling.py --smoke            # tiny shapes, to check the script

Writes benchmarks/results/scaling-MACHINE.{json,md}, the plots beside them and
scaling-MACHINE-summary.md: per-step time at each T with a least-squares fit
time = a + b*T (linear growth shows as a constant per-step time and R^2 near 1), and the
memory autograd keeps as a multiple of the output's size, beside torch.nn's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastbptt.bench import config, plots, report
from fastbptt.bench.environment import describe, environment, machine_name
from fastbptt.bench.runner import run_plan

RESULTS = Path(__file__).resolve().parent / "results"


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


SHAPE = ("batch", "hidden", "steps")


def _sweep(records, cell: str, vary: str) -> tuple[dict, dict]:
    """The sweep over ``vary`` with the most points: ({value: {impl: record}}, the fixed fields)."""
    groups: dict = {}
    for r in records:
        c = r["case"]
        if c["cell"] != cell:
            continue
        fixed = tuple((k, c[k]) for k in SHAPE if k != vary)
        groups.setdefault(fixed, {}).setdefault(c[vary], {})[r["candidate"]["impl"]] = r
    if not groups:
        return {}, {}
    fixed, rows = max(groups.items(), key=lambda kv: len(kv[1]))
    return dict(sorted(rows.items())), dict(fixed)


def _mib(n):
    return f"{n / 2**20:.1f}" if n is not None else "-"


def summarise(doc: dict) -> str:
    records = doc["records"]
    cases = [r["case"] for r in records]
    lines = [f"# Scaling of the default backend: {describe(doc['environment'])}", ""]
    backends = sorted({r["notes"].get("resolved_backend", "") for r in records if r["candidate"]["impl"] == "fastbptt"})
    lines.append(f"backend='auto' resolved to: {', '.join(b for b in backends if b) or 'n/a'}; "
                 f"{doc['settings']['warmup']} warm-up + {doc['settings']['reps']} rounds; float32, "
                 "one layer, training step (forward + backward, input gradient included)")
    lines.append("")
    lines.append("Times: the minimum over the rounds (on a shared machine interference only adds time, so the "
                 "minimum is the closest to the code's own cost), the median beside it.")
    lines.append("")
    for cell in sorted({c["cell"] for c in cases}):
        rows, t_fixed = _sweep(records, cell, "steps")
        if len(rows) < 2:
            continue
        lines += [f"## {cell}: against T (B={t_fixed['batch']}, H={t_fixed['hidden']})", "",
                  "| T | fastbptt min ms | median ms | us/step (min) | saved MiB | saved / output | "
                  "torch.nn saved MiB | torch.nn / output |",
                  "|---|---|---|---|---|---|---|---|"]
        xs, ys = [], []
        for t, by in rows.items():
            f, n = by.get("fastbptt"), by.get("torch.nn")
            ok = f and f["status"] == "ok" and f["time"]
            ms = f["time"]["total"]["min_ms"] if ok else None
            med = f["time"]["total"]["median_ms"] if ok else None
            if ms is not None:
                xs.append(t)
                ys.append(ms)
            fm, nm = (f or {}).get("memory", {}), (n or {}).get("memory", {})
            lines.append(f"| {t} | {ms:.1f} | {med:.1f} | {ms * 1e3 / t:.1f} | {_mib(fm.get('saved_bytes'))} | "
                         f"{fm.get('saved_to_output') or 0:.3f} | {_mib(nm.get('saved_bytes'))} | "
                         f"{nm.get('saved_to_output') or 0:.2f} |" if ms is not None else
                         f"| {t} | {f['status'] if f else '-'} | | | | | | |")
        if len(xs) >= 2:
            a, b, r2 = fit_line(xs, ys)
            per_step = [y / x * 1e3 for x, y in zip(xs, ys)]
            lines += ["", f"least-squares fit of the minima: time = {a:.1f} ms + {b * 1e3:.1f} us x T, "
                          f"R^2 = {r2:.4f}; per-step time from "
                          f"{min(per_step):.1f} to {max(per_step):.1f} us over T = {xs[0]}..{xs[-1]}"]
        lines.append("")
        for vary, name in (("batch", "B"), ("hidden", "H")):
            rows, fixed = _sweep(records, cell, vary)
            if len(rows) < 2:
                continue
            other = ", ".join(f"{dict(batch='B', hidden='H', steps='T')[k]}={v}" for k, v in fixed.items())
            lines += [f"### {cell}: against {name} ({other})", "",
                      f"| {name} | fastbptt min ms | median ms | us/step (min) | saved / output | torch.nn / output |",
                      "|---|---|---|---|---|---|"]
            for v, by in rows.items():
                f, n = by.get("fastbptt"), by.get("torch.nn")
                if not f or f["status"] != "ok":
                    lines.append(f"| {v} | {f['status'] if f else '-'} | | | | |")
                    continue
                tt = f["time"]["total"]
                lines.append(f"| {v} | {tt['min_ms']:.1f} | {tt['median_ms']:.1f} | {tt['min_ms'] * 1e3 / fixed['steps']:.1f} | "
                             f"{f['memory']['saved_to_output']:.3f} | "
                             f"{(n or {}).get('memory', {}).get('saved_to_output') or 0:.2f} |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path, help="summarise this saved run instead of running")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, written to benchmarks/out/")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.source:
        doc = report.load_json(args.source)
        stem = args.source.with_suffix("")
    else:
        plan = config.preset("scaling", "cpu")
        if args.smoke:
            plan = config.override(plan, hidden=(8,), batch=(2,), steps=(16, 64))
            plan.reps, plan.out_dir = 1, str(Path(__file__).resolve().parent / "out")
        else:
            plan.out_dir = str(RESULTS)
        env = environment(plan.device)
        records = run_plan(plan, progress=lambda line: print("  " + line, file=sys.stderr, flush=True))
        doc = report.document(plan, env, records)
        stem = Path(plan.out_dir) / f"scaling-{machine_name('cpu')}"
        report.save_json(doc, stem.with_suffix(".json"))
        stem.with_suffix(".md").write_text(report.markdown(doc))
        plots.plot_all(doc, stem, plan.plots)
    text = summarise(doc)
    stem.with_name(stem.name + "-summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
